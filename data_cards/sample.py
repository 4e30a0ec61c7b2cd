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

# Axes whose coordinates must be positive: (problem, fix) when they are not.
_POSITIVE = {
    "band_wavelength": ("has non-positive wavelengths", f"give effective wavelengths in {COORD_UNITS['band_wavelength']}"),
    "wavelength": ("has non-positive wavelengths", "give vacuum wavelengths in Angstrom"),
    "frequency": ("has non-positive frequencies", "give frequencies in Hz"),
}


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
        self.values, self.ivar, self.coords = validate(self.modality, self.values, self.ivar, self.coords)
        self.meta = dict(self.meta)

    @classmethod
    def validated(cls, modality: str, values: np.ndarray, ivar: np.ndarray, coords: dict[str, np.ndarray], meta: dict[str, Any]) -> "Sample":
        """A Sample from arrays that already passed `validate` (e.g. as one row of a block),
        without checking them again: readers validate a whole block at once."""
        sample = object.__new__(cls)
        sample.modality, sample.values, sample.ivar, sample.coords, sample.meta = modality, values, ivar, coords, dict(meta)
        return sample

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def id(self) -> str:
        return str(self.meta.get("id", ""))

    @property
    def card(self) -> str:
        return str(self.meta.get("card", ""))


class RowError(InputError):
    """An InputError of one row of a block passed to `validate`; `row` is its index."""

    def __init__(self, row: int, field: str, problem: str, fix: str = ""):
        super().__init__(field, problem, fix)
        self.row = row


# What a reader masks in an object rather than rejecting the object (or the file): flag
# code -> the elements it names. A survey scientist expects one bad pixel to cost that
# pixel, not the spectrum: the rest of the object is still measured.
MASKED_ELEMENTS = {
    "bad_ivar": "elements with NaN, inf or negative ivar",
    "nonfinite_flux": "NaN/inf values with ivar > 0",
}


def mask_invalid(values, ivar, block: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray | int]]:
    """`ivar` with the elements `validate` would reject set to 0, and how many there were.

    Those are ivar NaN, inf or negative ("bad_ivar") and NaN/inf values whose ivar is > 0
    ("nonfinite_flux"); everything else is left as it is. Returns (a new ivar array,
    {code: count}) with one count per row for a `block` (n, ...), else a number; codes
    and meanings in MASKED_ELEMENTS.
    """
    values, ivar = np.asarray(values), np.asarray(ivar)
    bad_ivar = ~np.isfinite(ivar) | (ivar < 0)
    bad_values = ~np.isfinite(values) & (ivar > 0) & ~bad_ivar
    axes = tuple(range(1, ivar.ndim)) if block else None
    counts = {"bad_ivar": np.count_nonzero(bad_ivar, axis=axes), "nonfinite_flux": np.count_nonzero(bad_values, axis=axes)}
    return np.where(bad_ivar | bad_values, np.zeros((), ivar.dtype), ivar), counts


def validate(modality: str, values, ivar, coords: dict, block: bool = False, own: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The checks every Sample passes, on one sample or on a block of n at once.

    One sample: values and ivar of shape S (per AXES[modality]), coords[axis] of shape
    (L,). A `block` of n: (n, *S) and (n, L) (or (L,) when all rows share the axis), checked
    with whole-block numpy operations, so readers need not build and check samples one
    by one; the first failing row raises RowError. Returns (values float32 with masked
    non-finite values zeroed, ivar float32, coords float64). `own`: values is the caller's
    own fresh float32 array (a reader's), zeroed in place where needed rather than copied.
    """
    axes = AXES[modality]
    values = np.asarray(values, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
    if values.ndim != len(axes) + block:
        raise InputError(
            "values",
            f"a {modality} needs {len(axes)} axes {axes}{' after the row axis' if block else ''}, got shape {values.shape}",
            "reshape the array or pick the right modality in the data card",
        )
    if ivar.shape != values.shape:
        raise InputError("ivar", f"shape {ivar.shape} differs from values shape {values.shape}", "give one ivar per value")
    rows = values.reshape(len(values), -1) if block else values.reshape(1, -1)
    row_ivar = ivar.reshape(rows.shape)

    def fail(bad_rows: np.ndarray, field: str, problem, fix: str):
        i = int(np.flatnonzero(bad_rows)[0])
        message = problem(i) if callable(problem) else problem
        raise RowError(i, field, message, fix) if block else InputError(field, message, fix)

    finite_ivar = np.isfinite(row_ivar)
    if not finite_ivar.all():
        fail(~finite_ivar.all(1), "ivar", "contains NaN or inf", "use ivar = 0 for pixels without a valid error")
    if (row_ivar < 0).any():
        fail((row_ivar < 0).any(1), "ivar", "has negative entries", "ivar is 1/sigma^2 >= 0; use 0 to mask a pixel")
    bad = ~np.isfinite(rows)
    if bad.any():
        unmasked = bad & (row_ivar > 0)
        if unmasked.any():
            fail(unmasked.any(1), "values", lambda i: f"{int(unmasked[i].sum())} NaN/inf values have ivar > 0", "set ivar = 0 for those elements to mask them")
    # Masked elements carry no information; zero them so no NaN reaches a tensor. (Unless
    # the values are the caller's own: a fresh, writable array, never a view of a caller's
    # memory map.)
    if own and values.flags.writeable:
        values[bad.reshape(values.shape)] = 0.0
    else:
        values = np.where(bad.reshape(values.shape), np.float32(0.0), values)

    missing = [a for a in axes if a not in coords]
    extra = [k for k in coords if k not in axes]
    if missing or extra:
        raise InputError(
            "coords",
            f"a {modality} needs coordinates {axes}; missing {missing}, unexpected {extra}",
            f"give one 1D array per axis in units {[COORD_UNITS[a] for a in axes]}",
        )
    checked = {}
    for axis, n in zip(axes, values.shape[1:] if block else values.shape):
        c = np.asarray(coords[axis], dtype=np.float64)
        if c.shape != (n,) and not (block and c.shape == (len(values), n)):
            raise InputError(f"coords[{axis!r}]", f"shape {c.shape} does not match axis length {n}", "give one coordinate per element along that axis")
        c2 = c.reshape(-1, n)
        if not np.isfinite(c2).all():
            fail(~np.isfinite(c2).all(1), f"coords[{axis!r}]", "contains NaN or inf", "coordinates must be finite")
        if axis in _MONOTONIC and n > 1:
            d = np.diff(c2, axis=1)
            monotonic = (d > 0).all(1) | (d < 0).all(1)
            if not monotonic.all():
                fail(~monotonic, f"coords[{axis!r}]", "is not strictly monotonic", "sort the axis (and the data with it)")
        if axis in _POSITIVE and (c2 <= 0).any():
            fail((c2 <= 0).any(1), f"coords[{axis!r}]", _POSITIVE[axis][0], _POSITIVE[axis][1])
        checked[axis] = c
    return values, ivar, checked
