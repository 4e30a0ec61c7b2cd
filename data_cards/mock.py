"""Mock observations of every modality, driven by a data card: the registry.

One generator per modality, each in its own module and deterministic given
(seed, index): spectra (mock_spectra.py, 13 classes with an instrument model),
image stamps (mock_images.py), HI cube chunks (mock_cubes.py) and 21cm lightcone
chunks (mock_fields.py). Spectra and images of the same (seed, index) show the same
object and share `meta["pair_id"]`.
"""

from __future__ import annotations

from cosmofm.data_cards.mock_cubes import mock_cube
from cosmofm.data_cards.mock_fields import mock_field
from cosmofm.data_cards.mock_images import mock_image
from cosmofm.data_cards.mock_spectra import band_fluxes_njy, mock_object, mock_spectrum, wavelength_grid  # noqa: F401 (re-exported)
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard, DataCard, FieldCard, ImageCard, SpectrumCard

GENERATORS = {SpectrumCard: mock_spectrum, ImageCard: mock_image, CubeCard: mock_cube, FieldCard: mock_field}


def mock_samples(card: DataCard, n: int, seed: int = 0, start: int = 0) -> list[Sample]:
    """`n` samples of `card`'s modality; indices start..start+n-1 (same index = same object)."""
    generate = GENERATORS[type(card)]
    return [generate(card, seed, i) for i in range(start, start + n)]
