"""Helpers of the multi-process tests: `accelerate launch` on CPU (gloo) with a free port, and
a small sharded pretraining dataset to stream."""

import socket
import sys
from pathlib import Path

N_SPECTRA, N_IMAGES = 40, 24


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """The command that starts `num_processes` copies of a script (append the script or `-m module`)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]


def sharded_dataset(folder: Path) -> Path:
    """N_SPECTRA + N_IMAGES = 64 samples of two cards in several Arrow shard files."""
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.io.hf_io import write_dataset
    from cosmofm.data_cards.mocks.generators import mock_samples

    samples = mock_samples(load_card("sdss-like"), N_SPECTRA, seed=7) + mock_samples(load_card("lsst-like"), N_IMAGES, seed=7)
    write_dataset(samples, folder, ["sdss-like", "lsst-like"], shard_size="700KB")
    assert len(list(folder.glob("data-*.arrow"))) >= 3, "the test needs a sharded dataset"
    return folder
