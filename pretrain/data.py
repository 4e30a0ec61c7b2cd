"""Batches of Samples for the backbone, and the layout-independent batch sampler.

A batch may mix modalities: `collate_samples` groups samples by (modality, shape),
each group is tokenized by its modality's tokenizer, and the backbone runs all
tokens through one encoder. Every sample carries its own seed (from its position in
the sample stream), so the tokens it masks are the same whatever the number of
processes or data workers, and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from cosmofm.data_cards.sample import AXES, Sample


@dataclass
class ModalityBatch:
    """Samples of one modality and one shape."""

    modality: str
    values: torch.Tensor  # (n, *shape) float32
    ivar: torch.Tensor  # (n, *shape) float32, 0 = masked
    coords: dict[str, torch.Tensor]  # axis name -> (n, axis length) float64
    rows: torch.Tensor  # (n,) long: rows of these samples in the whole batch

    def to(self, device) -> "ModalityBatch":
        return ModalityBatch(
            self.modality,
            self.values.to(device, non_blocking=True),
            self.ivar.to(device, non_blocking=True),
            {k: v.to(device, non_blocking=True) for k, v in self.coords.items()},
            self.rows.to(device, non_blocking=True),
        )


@dataclass
class CosmoFMBatch:
    """A mixed-modality batch: the backbone's only input type."""

    groups: list[ModalityBatch]
    sample_seeds: torch.Tensor  # (N,) int64, seeds the per-sample token mask
    survey_ids: torch.Tensor  # (N,) long, index into config.survey_names + 1 (0 = other)
    pair_ids: list[str] = field(default_factory=list)  # same non-empty id = same object
    ids: list[str] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.sample_seeds.shape[0])

    def to(self, device) -> "CosmoFMBatch":
        return CosmoFMBatch(
            [g.to(device) for g in self.groups],
            self.sample_seeds.to(device),
            self.survey_ids.to(device),
            self.pair_ids,
            self.ids,
            self.labels,
        )


def collate_samples(samples: Sequence[Sample], survey_names: Sequence[str] = (), seeds: Sequence[int] | None = None) -> CosmoFMBatch:
    """Group samples by (modality, shape) into one `CosmoFMBatch`."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    groups: dict[tuple, list[int]] = {}
    for row, s in enumerate(samples):
        groups.setdefault((s.modality, s.shape), []).append(row)
    out = []
    for (modality, _), rows in groups.items():
        members = [samples[r] for r in rows]
        out.append(
            ModalityBatch(
                modality,
                torch.from_numpy(_stack_rows([s.values for s in members])),
                torch.from_numpy(_stack_rows([s.ivar for s in members])),
                {a: _stack_axis([s.coords[a] for s in members]) for a in AXES[modality]},
                torch.tensor(rows, dtype=torch.long),
            )
        )
    slot = {name: i + 1 for i, name in enumerate(survey_names)}
    return CosmoFMBatch(
        groups=out,
        sample_seeds=torch.tensor(list(seeds) if seeds is not None else range(len(samples)), dtype=torch.long),
        survey_ids=torch.tensor([slot.get(s.card, 0) for s in samples], dtype=torch.long),
        pair_ids=[str(s.meta.get("pair_id", "")) for s in samples],
        ids=[s.id for s in samples],
        labels=[s.meta.get("labels", {}) for s in samples],
    )


def _stack_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """np.stack(arrays), without the copy when they are consecutive rows of one block (the
    samples of one piece of a file, as readers hand them out); tokenizers never write into
    a batch's arrays, so the view is safe."""
    base = arrays[0].base
    # base may be no array at all: arrays unpickled from a worker process (mock generator
    # pools) are views of the bytes they came in
    if not isinstance(base, np.ndarray) or base.ndim != arrays[0].ndim + 1 or not base.flags.c_contiguous or any(a.base is not base for a in arrays):
        return np.stack(arrays)
    row = arrays[0].nbytes
    offset = arrays[0].__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if offset % row or any(a.__array_interface__["data"][0] != arrays[0].__array_interface__["data"][0] + k * row for k, a in enumerate(arrays)):
        return np.stack(arrays)
    return base[offset // row: offset // row + len(arrays)]


def rows_equal(x: torch.Tensor) -> bool:
    """Whether every row of x (n, ...) equals the first: one grid shared by a whole batch (a
    survey file's). The stride-0 views `collate_samples` makes of such grids answer without
    a pass over the values."""
    return x.stride(0) == 0 or bool((x == x[:1]).all())


def _stack_axis(arrays: list[np.ndarray]) -> torch.Tensor:
    """(n, L) coordinates of one axis; readers share one grid array between the samples of
    a survey file, and those become a stride-0 view (no copy, and tokenizers see it as shared)."""
    if all(a is arrays[0] for a in arrays):
        return torch.from_numpy(arrays[0]).expand(len(arrays), -1)
    return torch.from_numpy(np.stack(arrays))


class GlobalBatchSampler:
    """Yields this rank's share of each global batch, from a given step on.

    The sample stream is a concatenation of seeded permutations (one per epoch), so
    global batch `s` holds stream positions [s*B, (s+1)*B) whatever the process count;
    rank r of w takes the r-th contiguous slice. Resuming at step s is O(1) and exact,
    which is why we shard here rather than through `accelerator.prepare(dataloader)`.
    Items are `(dataset index, sample seed)` pairs.

    `block` > 1 shuffles runs of `block` consecutive samples as units: a corpus that
    stores each object's views side by side (spectrum i, image i) then keeps them in
    the same batch and process, which the cross-modal objective needs.
    """

    def __init__(self, n_samples: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0, n_steps: int | None = None, block: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be divisible by the number of processes {world_size}")
        if (global_batch // world_size) % block:
            raise ValueError(f"the per-process batch {global_batch // world_size} must be a multiple of the pairing block {block}")
        if n_samples < block:
            raise ValueError("the dataset is empty")
        self.n, self.batch, self.rank, self.world, self.block = n_samples - n_samples % block, global_batch, rank, world_size, block
        self.seed, self.start_step, self.n_steps = seed, start_step, n_steps
        self._perm_epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n // self.block, generator=g), epoch
        within = position % self.n
        return int(self._perm[within // self.block]) * self.block + within % self.block

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        local = self.batch // self.world
        first = step * self.batch + self.rank * local
        return [(self._index(p), self.seed * 1_000_003 + p) for p in range(first, first + local)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.n_steps is None or step < self.start_step + self.n_steps:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        if self.n_steps is None:
            raise TypeError("an endless sampler has no length")
        return self.n_steps


class SeededSamples:
    """Map-style dataset over Samples taking `(index, seed)` keys from GlobalBatchSampler."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Sample, int]:
        index, seed = key
        return self.samples[index], seed


class Collator:
    """Picklable collate function for DataLoader workers."""

    def __init__(self, survey_names: Sequence[str] = ()):
        self.survey_names = list(survey_names)

    def __call__(self, items: list[tuple[Sample, int]]) -> CosmoFMBatch:
        samples, seeds = zip(*items)
        return collate_samples(samples, self.survey_names, seeds)
