"""The Sample: one object of one modality, the only thing downstream code consumes.

A Sample holds `values` (float32), `ivar` (inverse variance, 0 = masked), `coords`
(the physical coordinate of every element) and `meta` (card name, id, labels).
Coordinates are stored per axis, because every grid we read is separable: the
coordinate of element (i, j, k) is (coords[axis0][i], coords[axis1][j], coords[axis2][k]).
Inside arrays the units are fixed by `COORD_UNITS`; astropy quantities are converted
at the edges (card loading, FITS reading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosmofm.data_cards.errors import InputError

MODALITIES = ("spectrum", "image", "cube", "field")

# Axis names per modality, in array order.
AXES: dict[str, tuple[str, ...]] = {
    "spectrum": ("wavelength",),  # (L,)
    "image": ("band_wavelength", "dec_offset", "ra_offset"),  # (B, H, W)
    "cube": ("frequency", "dec_offset", "ra_offset"),  # (F, H, W)
    "field": ("los_distance", "y_comoving", "x_comoving"),  # (D, H, W)
}

# The unit every coordinate array is stored in (astropy unit strings).
COORD_UNITS: dict[str, str] = {
    "wavelength": "Angstrom",  # vacuum
    "band_wavelength": "Angstrom",  # effective wavelength of the band
    "dec_offset": "arcsec",  # offset from the object / cube centre
    "ra_offset": "arcsec",
    "frequency": "Hz",
    "los_distance": "Mpc",  # comoving, along the line of sight
    "y_comoving": "Mpc",
    "x_comoving": "Mpc",
}

# Axes whose coordinates must be strictly monotonic (sky offsets too, but bands
# are a set: any order of distinct wavelengths is fine).
_MONOTONIC = {"wavelength", "frequency", "dec_offset", "ra_offset", "los_distance", "y_comoving", "x_comoving"}


@dataclass
class Sample:
    """One object of one modality, validated on construction.

    Args:
        modality: one of MODALITIES.
        values: data array, shape per AXES[modality]; units fixed by the data card.
        ivar: inverse variance, same shape; 0 marks masked elements.
        coords: one 1D array per axis name in AXES[modality], units in COORD_UNITS.
        meta: at least "card" and "id"; optional "pair_id" (same physical object seen in
            another modality), "labels" (dict), and anything JSON-serialisable.
    """

    modality: str
    values: np.ndarray
    ivar: np.ndarray
    coords: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise InputError(
                "modality", f"unknown modality {self.modality!r}", f"use one of {', '.join(MODALITIES)}"
            )
        axes = AXES[self.modality]
        values = np.asarray(self.values, dtype=np.float32)
        ivar = np.asarray(self.ivar, dtype=np.float32)
        if values.ndim != len(axes):
            raise InputError(
                "values",
                f"a {self.modality} needs {len(axes)} axes {axes}, got shape {values.shape}",
                "reshape the array or pick the right modality in the data card",
            )
        if ivar.shape != values.shape:
            raise InputError("ivar", f"shape {ivar.shape} differs from values shape {values.shape}", "give one ivar per value")
        if not np.all(np.isfinite(ivar)):
            raise InputError("ivar", "contains NaN or inf", "use ivar = 0 for pixels without a valid error")
        if np.any(ivar < 0):
            raise InputError("ivar", "has negative entries", "ivar is 1/sigma^2 >= 0; use 0 to mask a pixel")
        bad = ~np.isfinite(values)
        if np.any(bad & (ivar > 0)):
            raise InputError(
                "values",
                f"{int(np.sum(bad & (ivar > 0)))} NaN/inf values have ivar > 0",
                "set ivar = 0 for those elements to mask them",
            )
        # Masked elements carry no information; zero them so no NaN reaches a tensor.
        values = np.where(bad, np.float32(0.0), values)

        missing = [a for a in axes if a not in self.coords]
        extra = [k for k in self.coords if k not in axes]
        if missing or extra:
            raise InputError(
                "coords",
                f"a {self.modality} needs coordinates {axes}; missing {missing}, unexpected {extra}",
                f"give one 1D array per axis in units {[COORD_UNITS[a] for a in axes]}",
            )
        coords = {}
        for axis, n in zip(axes, values.shape):
            c = np.asarray(self.coords[axis], dtype=np.float64)
            if c.shape != (n,):
                raise InputError(f"coords[{axis!r}]", f"shape {c.shape} does not match axis length {n}", "give one coordinate per element along that axis")
            if not np.all(np.isfinite(c)):
                raise InputError(f"coords[{axis!r}]", "contains NaN or inf", "coordinates must be finite")
            if axis in _MONOTONIC and n > 1:
                d = np.diff(c)
                if not (np.all(d > 0) or np.all(d < 0)):
                    raise InputError(f"coords[{axis!r}]", "is not strictly monotonic", "sort the axis (and the data with it)")
            coords[axis] = c
        if self.modality == "image" and np.any(coords["band_wavelength"] <= 0):
            raise InputError("coords['band_wavelength']", "has non-positive wavelengths", f"give effective wavelengths in {COORD_UNITS['band_wavelength']}")
        if self.modality == "spectrum" and np.any(coords["wavelength"] <= 0):
            raise InputError("coords['wavelength']", "has non-positive wavelengths", "give vacuum wavelengths in Angstrom")
        if self.modality == "cube" and np.any(coords["frequency"] <= 0):
            raise InputError("coords['frequency']", "has non-positive frequencies", "give frequencies in Hz")
        self.values, self.ivar, self.coords = values, ivar, coords
        self.meta = dict(self.meta)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def id(self) -> str:
        return str(self.meta.get("id", ""))

    @property
    def card(self) -> str:
        return str(self.meta.get("card", ""))
