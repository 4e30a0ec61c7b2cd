"""Shared fixtures: shipped cards and a few mocks of each modality (offline, generated)."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a real hub

from cosmofm.data_cards import load_card  # noqa: E402
from cosmofm.data_cards.mocks.generators import mock_samples  # noqa: E402

CARD_NAMES = ["sdss-like", "lsst-like", "ska-hi-like", "lightcone-21cm"]
MIXED_STEPS = 4  # mixed_backend_runs: steps of each run, checkpoints every 2


@pytest.fixture(scope="session")
def cards():
    return {name: load_card(name) for name in CARD_NAMES}


@pytest.fixture(scope="session")
def sdss(cards):
    """The sdss-like card, which most spectral tests use."""
    return cards["sdss-like"]


@pytest.fixture(scope="session")
def mixed_samples(cards):
    """4 spectra, 4 images (paired with the spectra), 2 cubes, 2 lightcone chunks."""
    return (
        mock_samples(cards["sdss-like"], 4, seed=3)
        + mock_samples(cards["lsst-like"], 4, seed=3)
        + mock_samples(cards["ska-hi-like"], 2, seed=3)
        + mock_samples(cards["lightcone-21cm"], 2, seed=3)
    )


@pytest.fixture
def tiny_config():
    from cosmofm.pretrain import CosmoFMConfig

    return CosmoFMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, spectrum_patch_size=128,
        cube_patch_size=[16, 16, 16], field_patch_size=[16, 16, 16], coord_frequencies=6, projection_dim=16,
        survey_names=CARD_NAMES,
    )


@pytest.fixture(scope="session")
def mixed_backend_runs(tmp_path_factory):
    """DDP and FSDP2, in fp32 and under bf16 autocast, on 2 CPU processes (gloo; one launch) with
    the tiny recipe's corpus of all four modalities: MIXED_STEPS steps, checkpoints at steps 2 and
    4. (folder holding one run folder per name, each rank's `launch_runs` result.) Shared by
    tests/test_backends.py and tests/test_sharded_checkpoint.py."""
    from launch import launch_runs  # tests/launch.py

    out = tmp_path_factory.mktemp("mixed-backends")
    sets = [f"optim.max_steps={MIXED_STEPS}", "run.save_every=2", "run.keep_last=2"]
    runs = [{"name": name, "backend": name.partition("-")[0], "sets": sets + (["run.mixed_precision=bf16"] if name.endswith("bf16") else [])}
            for name in ("ddp", "fsdp2", "ddp-bf16", "fsdp2-bf16")]
    return out, launch_runs(out, runs)
