"""The pretraining corpus: saved datasets, or the embedded mock corpus generated once.

The embedded default is written to `<output_dir>/data/mock-<hash>` as a Hugging Face
dataset (memory-mapped Arrow), the same format users' data arrive in, so the demo
exercises the real loading path. Generation is skipped when a complete copy with the
same recipe already exists.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import Iterator

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.hf_io import SampleDataset, write_dataset
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.readers import read_any
from cosmofm.data_cards.readers.ours import sniff_dataset
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import load_card


class ConcatSamples:
    """Several sample datasets seen as one (random access by global index)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = [0]
        for p in parts:
            self.offsets.append(self.offsets[-1] + len(p))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> Sample:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]


PAIR_BLOCK = 2  # the mock corpus stores samples in blocks of two (see mock_corpus)


def mock_corpus(cards: list[str], counts: list[int], seed: int) -> Iterator[Sample]:
    """Mocks of every card, in blocks of PAIR_BLOCK consecutive samples.

    A spectrum card and an image card generated with the same seed describe the same
    objects, so they are interleaved (spectrum i, image i) to keep each pair in one
    block; every other card follows in its own blocks.
    """
    loaded = [load_card(name) for name in cards]
    spectra = [i for i, c in enumerate(loaded) if c.modality == "spectrum"]
    images = [i for i, c in enumerate(loaded) if c.modality == "image"]
    paired = set()
    if spectra and images:
        a, b = spectra[0], images[0]
        paired = {a, b}
        for i in range(min(counts[a], counts[b])):
            yield mock_samples(loaded[a], 1, seed=seed, start=i)[0]
            yield mock_samples(loaded[b], 1, seed=seed, start=i)[0]
        m = min(counts[a], counts[b])
        for k in (a, b):  # the unpaired remainder of the longer one, in whole blocks
            extra = (counts[k] - m) - (counts[k] - m) % PAIR_BLOCK
            for i in range(m, m + extra):
                yield mock_samples(loaded[k], 1, seed=seed, start=i)[0]
    for k, card in enumerate(loaded):
        if k not in paired:
            for i in range(counts[k] - counts[k] % PAIR_BLOCK):
                yield mock_samples(card, 1, seed=seed, start=i)[0]


def ensure_mock_corpus(data, out_dir: str | Path) -> Path:
    """The embedded mock corpus's folder under `<out_dir>/data`, written if not there yet."""
    key = hashlib.sha256(json.dumps(["blocks-v1", data.mock_cards, data.mock_counts, data.mock_seed]).encode()).hexdigest()[:10]
    path = Path(out_dir) / "data" / f"mock-{key}"
    if not (path / "dataset_info.json").exists():
        cards = [load_card(n) for n in data.mock_cards]
        write_dataset(mock_corpus(data.mock_cards, data.mock_counts, data.mock_seed), path, cards)
    return path


def load_corpus(data, out_dir: str | Path) -> tuple[ConcatSamples, list[str], int]:
    """Open the recipe's datasets (or make the mock corpus).

    Returns (samples, card names, pairing block for GlobalBatchSampler).
    """
    paths = [Path(p) for p in data.datasets]
    block = data.pair_block
    if not paths:
        block = PAIR_BLOCK
        paths = [ensure_mock_corpus(data, out_dir)]
    parts, names = [], set()
    for p in paths:
        if not p.exists():
            raise InputError("recipe.data.datasets", f"{p} does not exist", "make it with `cosmofm mock` or fix the path")
        if sniff_dataset(p):
            part = SampleDataset(p)  # memory-mapped: larger than memory is fine
            names |= set(part.cards)
        else:
            # a survey's own files (SDSS, DESI, ESO/4MOST, FITS images and cubes, tables):
            # read as they are, objects the reader flags are left out
            part = list(read_any(p).samples)
            names |= {s.card for s in part}
        parts.append(part)
    return ConcatSamples(parts), sorted(names), block

