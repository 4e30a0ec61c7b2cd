"""scripts/bench/deblend_memory.py with a model: the mosaic carries the model's bands and the
measured child runs the model's tile finder (issue 20's memory target for the head)."""

import pytest
import torch

from cosmofm.bench import deblend_memory
from cosmofm.data_cards import InputError
from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig
from cosmofm.pretrain.checkpoint import write_manifest


def test_a_model_deblends_the_mosaic_in_its_own_bands(tiny_config, tmp_path):
    torch.manual_seed(0)
    head = DeblendingHeadConfig(n_bands=2, bands=["g", "r"], band_wavelengths=[4800.0, 6300.0], card="lsst-like",
                                hidden_size=16, peak_threshold=1e-3)  # untrained: every heatmap pixel is 0.01
    model = CosmoFMForDeblending.from_backbone_config(tiny_config, head)
    model.save_pretrained(tmp_path / "model")
    write_manifest(tmp_path / "model")
    report = deblend_memory.main(["--size", "256", "--density", "0.5", "--tile", "128", "--overlap", "32", "--workers", "1",
                                  "--model", str(tmp_path / "model"), "--bands", "g", "r", "--out", str(tmp_path), "--name", "m.json"])
    assert report["method"] == "model" and report["shape"] == [2, 256, 256] and report["bands"] == ["g", "r"]
    assert report["n_tiles"] == 9 and report["n_sources"] > 0  # 128 px tiles stepping 96 px over 256 px: 3 x 3
    assert report["peak_rss_one_process_mb"] > 100 and (tmp_path / "m.json").exists()
    with pytest.raises(InputError, match="--bands"):
        deblend_memory.main(["--size", "64", "--bands", "g", "Q", "--out", str(tmp_path)])
