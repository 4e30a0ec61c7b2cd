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
from cosmofm.data_cards.hf_io import SampleDataset, write_dataset
from cosmofm.data_cards.mock import mock_samples
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


def mock_corpus(cards: list[str], counts: list[int], seed: int) -> Iterator[Sample]:
    """Mocks of each card in turn; spectra and images with the same seed are paired objects."""
    for name, n in zip(cards, counts):
        card = load_card(name)
        for i in range(n):
            yield from mock_samples(card, 1, seed=seed, start=i)


def load_corpus(data, out_dir: str | Path) -> tuple[ConcatSamples, list[str]]:
    """Open the recipe's datasets (or make the mock corpus); returns (samples, card names)."""
    paths = [Path(p) for p in data.datasets]
    if not paths:
        key = hashlib.sha256(json.dumps([data.mock_cards, data.mock_counts, data.mock_seed]).encode()).hexdigest()[:10]
        path = Path(out_dir) / "data" / f"mock-{key}"
        if not (path / "dataset_info.json").exists():
            cards = [load_card(n) for n in data.mock_cards]
            write_dataset(mock_corpus(data.mock_cards, data.mock_counts, data.mock_seed), path, cards)
        paths = [path]
    parts = []
    for p in paths:
        if not p.exists():
            raise InputError("recipe.data.datasets", f"{p} does not exist", "make it with `cosmofm mock` or fix the path")
        parts.append(SampleDataset(p))
    names = sorted({c for part in parts for c in part.cards})
    return ConcatSamples(parts), names
