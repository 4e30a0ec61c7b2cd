"""Data cards, the Sample contract, and readers/writers (FITS, Hugging Face datasets).

Everything downstream of this package consumes only `Sample`s (DESIGN.md section 2).
"""

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.schema import (
    CubeCard,
    DataCard,
    FieldCard,
    ImageCard,
    MODALITIES,
    SpectrumCard,
    available_cards,
    load_card,
)
from cosmofm.data_cards.sample import COORD_UNITS, Sample

__all__ = [
    "COORD_UNITS",
    "CubeCard",
    "DataCard",
    "FieldCard",
    "ImageCard",
    "InputError",
    "MODALITIES",
    "Sample",
    "SpectrumCard",
    "available_cards",
    "load_card",
]
