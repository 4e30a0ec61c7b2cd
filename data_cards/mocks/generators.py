"""Mock observations of every modality, driven by a data card: the registry.

One generator per modality, each in its own module and deterministic given
(seed, index): spectra (mocks/spectra.py, 13 classes with an instrument model),
image stamps (mocks/images.py), HI cube chunks (mocks/cubes.py) and 21cm lightcone
chunks (mocks/fields.py). Spectra and images of the same (seed, index) show the same
object and share `meta["pair_id"]`.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Sequence

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cubes import mock_cube
from cosmofm.data_cards.mocks.fields import mock_field
from cosmofm.data_cards.mocks.blends import mock_blend  # noqa: F401 (re-exported)
from cosmofm.data_cards.mocks.images import mock_image
from cosmofm.data_cards.mocks.spectra import band_fluxes_njy, mock_object, mock_spectrum, wavelength_grid  # noqa: F401 (re-exported)
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard, DataCard, FieldCard, ImageCard, SpectrumCard
from cosmofm.data_cards.workers import in_parallel

GENERATORS = {SpectrumCard: mock_spectrum, ImageCard: mock_image, CubeCard: mock_cube, FieldCard: mock_field}


def generate(card: DataCard, n: int, seed: int = 0, workers: int = 1, progress: bool = False,
             indices: Sequence[int] | None = None) -> Iterator[Sample]:
    """Yield mocks 0..n-1 of `card` in order (or those of `indices`, n of them), made by
    `workers` processes.

    Each sample depends only on (seed, index), so the output is identical for any
    number of workers; samples stream out, so n can exceed memory.
    """
    index = range(n) if indices is None else [int(i) for i in indices]
    if len(index) != n:
        raise InputError("indices", f"{len(index)} indices for n = {n}", "give n = len(indices)")
    # picklable: processes, forked where the OS has it, so workers inherit the imported modules
    # instead of re-importing torch/transformers through the cosmofm package (seconds each)
    yield from in_parallel(partial(_one, card, seed), index, workers, processes=True, picklable=True,
                           chunksize=max(1, min(64, n // (4 * max(workers, 1)))), progress=progress, desc=f"mock {card.name}",
                           unit="sample", total=n)


def _one(card: DataCard, seed: int, index: int) -> Sample:
    return GENERATORS[type(card)](card, seed, index)


def mock_samples(card: DataCard, n: int, seed: int = 0, start: int = 0) -> list[Sample]:
    """`n` samples of `card`'s modality; indices start..start+n-1 (same index = same object)."""
    generate = GENERATORS[type(card)]
    return [generate(card, seed, i) for i in range(start, start + n)]
