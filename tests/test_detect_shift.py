"""scripts/bench/detect_shift.py: every shift of the detection suite changes the sky it names
(a setting that changes nothing would be a label, not a shift), and the bench runs end to end
on small cubes with a saved model, scoring each finder on the shifted cubes."""

import json

import numpy as np
import pytest
import torch

from cosmofm.bench.detect_shift import SHIFTS, main, shifted_card
from cosmofm.data_cards.mocks.cubes import mock_survey_cube
from cosmofm.data_cards.schema import load_card

REFUSED = "beam 10.5 arcsec (beyond the head's 25 %: refused)"
SMALL = dict(n_channels=48, size=40, density=10000.0, seed=3, log_mhi_min=9.5, frequency_start=1050e6, as_sample=False)


@pytest.fixture(scope="module")
def card():
    return load_card("ska-hi-like")


def _sky(card, change):
    kw = {**SMALL, "density": SMALL["density"] * change.get("density_scale", 1.0), **change.get("cube", {})}
    return mock_survey_cube(shifted_card(card, change), **kw)


def test_every_shift_changes_the_cube(card):
    cube, header, truth = _sky(card, {})
    for name, change in SHIFTS.items():
        if not change:
            continue
        shifted, h, t = _sky(card, change)
        assert shifted.shape == cube.shape
        assert not np.array_equal(np.nan_to_num(shifted, nan=1.0), cube), name
    assert shifted_card(card, SHIFTS["noise x1.5"]).noise_per_channel == pytest.approx(1.5 * card.noise_per_channel)
    flagged = _sky(card, SHIFTS["flagged channels 5 %"])[0]
    assert np.isnan(flagged).all(axis=(1, 2)).sum() >= 2  # whole channels blanked
    dense = _sky(card, SHIFTS["density x3"])[2]
    assert len(dense) > 2 * len(truth)


def test_the_bench_scores_each_finder_on_the_shifted_cubes(card, tmp_path):
    from cosmofm.heads.detection3d import CosmoFMForDetection3D, Detection3DHeadConfig
    from cosmofm.pretrain import CosmoFMConfig
    from cosmofm.pretrain.checkpoint import write_manifest

    torch.manual_seed(0)
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cube_patch_size=[8, 8, 8], coord_frequencies=4,
                projection_dim=8, survey_names=["ska-hi-like"])
    model = CosmoFMForDetection3D.from_backbone_config(CosmoFMConfig(**tiny), Detection3DHeadConfig.from_card(card, max_detections=8))
    model.save_pretrained(tmp_path / "det")
    write_manifest(tmp_path / "det")
    report = main(["--models", str(tmp_path / "det"), "--out", str(tmp_path), "--seeds", "0", "--channels", "64", "--size", "48",
                   "--shifts", "in distribution", "noise x1.5", REFUSED, "--threads", "1"])
    assert json.loads((tmp_path / "detect_shift.json").read_text())["shifts"].keys() == {"in distribution", "noise x1.5", REFUSED}
    base, noisy = (report["shifts"][k] for k in ("in distribution", "noise x1.5"))
    for shift in (base, noisy):
        assert set(shift["totals"]) == {"head_0", "sofia", "sofia_defaults"}
        cube = shift["cubes"][0]
        assert shift["totals"]["sofia"]["score"] == pytest.approx(cube["sofia"]["score"])
    # the same galaxies, half again the noise: fewer of them are above an integrated S/N of 4
    assert base["cubes"][0]["n_truth"] == noisy["cubes"][0]["n_truth"]
    assert noisy["cubes"][0]["n_truth_snr4"] < base["cubes"][0]["n_truth_snr4"]
    # a beam 50 % wider than the training beam: the head refuses the cube and says why, SoFiA still runs
    wide = report["shifts"][REFUSED]
    assert "header.BMAJ/BMIN" in wide["totals"]["head_0"]["refused"] and wide["summary"]["head_refused"] == 1
    assert "head_score" not in wide["summary"] and "score" in wide["totals"]["sofia"]
