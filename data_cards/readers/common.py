"""What every survey-format reader shares: the result type, flags, cheap FITS sniffing,
card choice, air/vacuum and rest-frame conventions, and the per-object spectrum checks.

A reader turns one file into a `ReadResult`: the Samples it could use, one `Flag` per
per-object problem (all-masked spectrum, NaNs, negative ivar, grid outside the card,
a flux scale no survey records),
an identifiers table (one row per object in the file, used or not) and file-level
notes (conversions applied). Per-object problems never raise; an `InputError` is for a
file that is unusable as a whole (missing HDU, unknown unit, mismatched lengths,
wavelengths nowhere near the card: `check_coverage`) or that leaves nothing usable
(`ReadResult.require_usable`).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import astropy.units as u
import numpy as np
from astropy import constants as const
from astropy.io import fits
from astropy.table import Table

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import to_card_unit
from cosmofm.data_cards.sample import MASKED_ELEMENTS, Sample, mask_invalid
from cosmofm.data_cards.schema import DEFAULT_CARDS, DataCard, SpectrumCard, available_cards, load_card

C_KMS = const.c.to_value("km/s")
ANGSTROM = u.Unit("Angstrom")

# Flag actions: what happened to the object.
SKIPPED, MASKED, KEPT = "skipped", "masked", "kept"

# Identifier meta keys every reader uses (so catalogues line up across formats); RA/Dec in degrees.
ID_KEYS = ("plate", "mjd", "fiberid", "targetid", "object", "ra", "dec")
ID_UNITS = {"ra": "deg", "dec": "deg"}


@dataclass
class Flag:
    """One per-object problem: which object, what, and what the reader did about it."""

    index: int  # row / object number in the file
    id: str
    code: str  # short machine-readable name, e.g. "all_masked"
    detail: str
    action: str  # SKIPPED, MASKED (some elements set to ivar 0) or KEPT (noted only)


@dataclass
class ReadResult:
    """What a reader made of one file.

    Attributes:
        format: registry name of the format ("sdss-spec", "desi-coadd", ...).
        path: the file.
        modality: "spectrum", "image", "cube" (or "field" for our own files).
        card: the DataCard the samples belong to (None for a datasets folder mixing cards).
        card_reason: why that card (given explicitly / header markers / coverage).
        samples: the usable objects (a list, or a lazy sequence for datasets folders).
        flags: per-object problems, one Flag each.
        identifiers: astropy Table, one row per object in the file with `id`, `used` and
            whatever the format identifies objects by (PLATE/MJD/FIBERID, TARGETID, OBJECT,
            RA/DEC in deg); for a datasets folder, row i is samples[i].
        notes: file-level conventions applied ("air wavelengths converted to vacuum", ...).
        n_objects: objects in the file (may exceed len(samples) when some were skipped or
            `limit` cut the read short).
    """

    format: str
    path: Path
    modality: str
    card: DataCard | None
    card_reason: str
    samples: Sequence[Sample]
    flags: list[Flag] = field(default_factory=list)
    identifiers: Table = field(default_factory=Table)
    notes: list[str] = field(default_factory=list)
    n_objects: int = 0

    def flag_counts(self) -> dict[str, int]:
        return dict(Counter(f.code for f in self.flags))

    def require_usable(self) -> "ReadResult":
        """Raise InputError when the file held objects but none is usable."""
        if len(self.samples) == 0:
            counts = ", ".join(f"{n} {code}" for code, n in sorted(self.flag_counts().items())) or "no objects"
            first = self.flags[0].detail if self.flags else "the file holds no objects"
            raise InputError(str(self.path), f"nothing usable in this {self.format} file ({counts}; e.g. {first})", "check the file (or the card's wavelength range); per-object problems are listed by `cosmofm inspect`")
        return self


class Flags(list):
    """A list of Flag with a helper to add one."""

    def add(self, index: int, sid: str, code: str, detail: str, action: str) -> None:
        self.append(Flag(index, sid, code, detail, action))


# ---------------------------------------------------------------------------- FITS sniffing


def is_fits(path: Path) -> bool:
    """True when the file starts like a FITS file (plain or gzipped)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if head == b"\x1f\x8b":
                with gzip.open(path, "rb") as g:
                    return g.read(9) == b"SIMPLE  ="
            return head + f.read(7) == b"SIMPLE  ="
    except OSError:
        return False


@dataclass(frozen=True)
class HDUInfo:
    """A header-only view of one HDU (cheap to get for every sniffer)."""

    index: int
    name: str  # EXTNAME upper-cased ("PRIMARY" for HDU 0)
    kind: str  # "image", "table" or "empty"
    header: fits.Header
    columns: tuple[str, ...]  # upper-cased column names for tables


def fits_hdus(path: str | os.PathLike) -> tuple[HDUInfo, ...] | None:
    """Headers of every HDU in `path`, read once per file version; None if not readable FITS."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    if not p.is_file() or not is_fits(p):
        return None
    return _fits_hdus(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _fits_hdus(path: str, mtime_ns: int, size: int) -> tuple[HDUInfo, ...] | None:
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
                for i, hdu in enumerate(hdul):
                    header = hdu.header.copy()
                    name = "PRIMARY" if i == 0 else str(header.get("EXTNAME", f"HDU{i}")).strip().upper()
                    if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)) and not isinstance(hdu, fits.CompImageHDU):
                        kind = "table"
                        columns = tuple(c.name.upper() for c in hdu.columns)
                    else:
                        kind = "image" if header.get("NAXIS", 0) > 0 or isinstance(hdu, fits.CompImageHDU) else "empty"
                        columns = ()
                    out.append(HDUInfo(i, name, kind, header, columns))
    except (OSError, ValueError, TypeError, KeyError, IndexError, EOFError):
        return None
    return tuple(out)


def hdu_named(hdus: Sequence[HDUInfo], name: str) -> HDUInfo | None:
    return next((h for h in hdus if h.name == name.upper()), None)


def open_fits(path: Path) -> fits.HDUList:
    """fits.open with memory mapping (image scaling left to `image_data`); unreadable files
    become an InputError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            return fits.open(path, memmap=True, do_not_scale_image_data=True)
    except (OSError, ValueError, TypeError, EOFError) as e:
        raise InputError(str(path), f"is not a readable FITS file ({type(e).__name__}: {e})", "check that it is a complete FITS file (re-download it)") from None


def image_data(hdu, rows: slice | None = None) -> np.ndarray:
    """An image HDU's data (or its first rows), memory-mapped, with BSCALE/BZERO/BLANK applied.

    `open_fits` opens files with `do_not_scale_image_data=True`, because astropy cannot
    memory-map scaled integer images (e.g. DESI's uint32 masks, BZERO = 2**31); the scaling
    is applied here to the requested rows only.
    """
    raw = hdu.data if rows is None else hdu.data[rows]
    return scaled(hdu.header, raw)


def scaled(header: fits.Header, raw: np.ndarray) -> np.ndarray:
    """Physical values of raw image data: raw * BSCALE + BZERO, BLANK -> NaN (ints: exact)."""
    bscale, bzero, blank = header.get("BSCALE", 1), header.get("BZERO", 0), header.get("BLANK")
    if bscale == 1 and bzero == 0 and blank is None:
        return raw
    if raw.dtype.kind in "iu" and bscale == 1 and float(bzero).is_integer() and blank is None:
        return raw.astype(np.int64) + int(bzero)  # e.g. uint32 stored as int32 + 2**31
    out = raw.astype(np.float64) * bscale + bzero
    if blank is not None and raw.dtype.kind in "iu":
        out[raw == blank] = np.nan
    return out


def get_hdu(hdul: fits.HDUList, name: str, path: Path, fix: str) -> fits.hdu.base.ExtensionHDU:
    """The HDU called `name`, or an InputError listing the HDUs the file has."""
    try:
        return hdul[name]
    except KeyError:
        names = [h.name or f"HDU{i}" for i, h in enumerate(hdul)]
        raise InputError(f"{path}[{name}]", f"HDU {name} is missing (HDUs: {names})", fix) from None


def column(data, names: Iterable[str]) -> str | None:
    """The first of `names` (case-insensitive) that is a column of the FITS table `data`."""
    have = {n.upper(): n for n in data.columns.names}
    return next((have[n.upper()] for n in names if n.upper() in have), None)


def header_value(headers: Iterable[fits.Header], *keys: str, default=None):
    """The first of `keys` found in any of `headers` (in order), else `default`."""
    for h in headers:
        for k in keys:
            if k in h and h[k] is not None and str(h[k]).strip() != "":
                return h[k]
    return default


# ---------------------------------------------------------------------------- conventions


def vacuum_to_air(wave_vac: np.ndarray) -> np.ndarray:
    """Air wavelengths [A] from vacuum ones, by the IAU standard formula of Morton (2000,
    ApJS 130, 403, eq. 3): n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s^2) + 1.5998e-4 / (38.9 - s^2),
    s = 1e4 / lambda_vac [um^-1], lambda_air = lambda_vac / n. Below 2000 A wavelengths
    are vacuum by convention and are returned unchanged."""
    w = np.asarray(wave_vac, dtype=np.float64)
    s2 = (1e4 / w) ** 2
    n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2)
    return np.where(w >= 2000.0, w / n, w)


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Vacuum wavelengths [A] from air ones: the exact inverse of `vacuum_to_air` (Morton 2000),
    found by fixed-point iteration lambda_vac = lambda_air * n(lambda_vac); n - 1 ~ 3e-4 and
    varies slowly, so 4 iterations reach float64 precision (< 1e-9 A)."""
    a = np.asarray(wave_air, dtype=np.float64)
    v = a.copy()
    for _ in range(4):
        s2 = (1e4 / v) ** 2
        n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s2) + 1.5998e-4 / (38.9 - s2)
        v = a * n
    return np.where(a >= 2000.0, v, a)


# FITS WCS Paper III SPECSYS values; heliocentric and barycentric differ by < 0.02 km/s,
# far below any spectral resolution we read, so both count as "corrected".
_CORRECTED_FRAMES = {"BARYCENT", "HELIOCEN", "SOURCE"}
# Keywords (km/s) giving the correction to add to topocentric velocities.
_CORRECTION_KEYS = ("BARYCORR", "HELIO_RV", "VHELIO", "BERV", "ESO QC VRAD BARYCOR", "ESO DRS BERV", "HIERARCH ESO QC VRAD BARYCOR")


def to_barycentric(wave: np.ndarray, specsys: str | None, headers: Sequence[fits.Header]) -> tuple[np.ndarray, str, str | None]:
    """Wavelengths in the heliocentric/barycentric frame.

    Returns (wave, frame, problem): when the header says TOPOCENT and gives a correction
    velocity v (km/s, `_CORRECTION_KEYS`), lambda_bary = lambda_topo * (1 + v / c); when it
    says TOPOCENT without one, the wavelengths are returned unchanged with a problem text
    for a flag. A missing SPECSYS is reported as frame "unknown" (no flag: most survey
    pipelines publish corrected wavelengths without saying so).
    """
    frame = str(specsys or "").strip().upper()
    if frame in _CORRECTED_FRAMES:
        return wave, frame.lower(), None
    if frame.startswith("TOPOCENT"):
        v = header_value(headers, *_CORRECTION_KEYS)
        if v is None:
            return wave, "topocentric", "SPECSYS = TOPOCENT and no barycentric correction keyword (BARYCORR, HELIO_RV, ...): wavelengths left topocentric"
        return np.asarray(wave, dtype=np.float64) * (1 + float(v) / C_KMS), "barycentric", None
    return wave, frame.lower() or "unknown", None


def wavelength_in_angstrom(values: np.ndarray, unit: u.UnitBase, where: str) -> np.ndarray:
    """A spectral coordinate (wavelength, frequency or energy) in Angstrom."""
    try:
        return (np.asarray(values, dtype=np.float64) * unit).to_value(ANGSTROM, equivalencies=u.spectral())
    except u.UnitsError:
        raise InputError(where, f"unit {unit.to_string()!r} is not a wavelength", "give wavelengths in Angstrom, nm or um (or say so in TUNIT / the unit option)") from None


# ---------------------------------------------------------------------------- card choice


def resolve_card(card: DataCard | str | os.PathLike | None) -> DataCard | None:
    if card is None or isinstance(card, DataCard):
        return card
    return load_card(card)


def choose_card(card, modality: str, where: str, markers: Sequence[tuple[str, str]] = (), coverage: tuple[float, float] | None = None,
                wavelength_unit: u.UnitBase | None = None) -> tuple[DataCard, str]:
    """The card for a file and why: explicit > header markers > the only / best-covering shipped card.

    Args:
        card: explicit DataCard, name or YAML path, or None to infer.
        markers: (card name, reason) pairs the reader found in the headers, best first.
        coverage: the file's wavelength range [A], to pick among several spectrum cards;
            InputError when it lies nowhere near the chosen card's range (`check_coverage`).
        wavelength_unit: the unit the file states for its wavelengths, named in that error.
    """
    chosen, reason = _choose_card(card, modality, where, markers, coverage)
    if coverage is not None:
        check_coverage(chosen, coverage, where, wavelength_unit)
    return chosen, reason


def _choose_card(card, modality: str, where: str, markers: Sequence[tuple[str, str]], coverage: tuple[float, float] | None) -> tuple[DataCard, str]:
    if card is not None:
        card = resolve_card(card)
        if card.modality != modality:
            raise InputError(where, f"holds {modality} data but card {card.name!r} is a {card.modality} card", f"pass a {modality} card")
        return card, "given explicitly"
    shipped = {name: load_card(name) for name in available_cards()}
    for name, reason in markers:
        if name in shipped and shipped[name].modality == modality:
            return shipped[name], reason
    # cards of a mock variant (e.g. sdss-like-survey: another generator on sdss-like's grid)
    # describe a simulator, not a survey's files: a reader never picks one unasked
    candidates = [c for c in shipped.values() if c.modality == modality and getattr(c, "mock_realism", "basic") == "basic"]
    if not candidates:
        raise InputError(where, f"no shipped {modality} card", "pass card=... (a YAML data card)")
    if len(candidates) == 1:
        return candidates[0], f"the only shipped {modality} card"
    if coverage is not None and all(isinstance(c, SpectrumCard) for c in candidates):
        lo, hi = coverage

        def overlap(c: SpectrumCard) -> float:
            return max(0.0, min(hi, c.wavelength_max.value) - max(lo, c.wavelength_min.value)) / max(hi - lo, 1e-9)

        best = max(candidates, key=lambda c: (overlap(c), -abs(c.wavelength_max.value - c.wavelength_min.value - (hi - lo))))
        return best, f"no survey markers in the headers; closest wavelength coverage ({lo:.0f}-{hi:.0f} A covered {overlap(best):.0%} by the card); pass --card to choose another"
    default = shipped[DEFAULT_CARDS[modality]]
    return default, f"no survey markers in the headers; the default {modality} card; pass a card to choose another"


# ---------------------------------------------------------------------------- plausibility

# Wavelengths farther than this factor from a card's range are not a spectrum the card
# could describe but a unit error (a TUNIT of 'm' on numbers in Angstrom puts them at
# 3.6e13 A); nearer, an object that misses the range is flagged on its own.
NEAR_CARD = 2.0
WAVELENGTH_UNITS = ("Angstrom", "nm", "um", "mm", "cm", "m")  # the units a file's numbers may really be in
FLAM = u.Unit("erg / (s cm2 Angstrom)")
# The flux scale of a spectrum (median over unmasked pixels of |flux| + sigma) in
# erg/s/cm2/A that a survey spectrograph records: from the noise of the deepest 8-m
# spectra (~1e-21) to stars of magnitude ~0 (~1e-9, far brighter than fibre surveys
# observe); the shipped cards' unit, 1e-17, sits in the middle. Outside, the stated flux
# unit is almost surely wrong: values in Jy under an erg/s/cm2/A unit are ~1e12 too high.
FLUX_SCALE_RANGE = (1e-21, 1e-9)
FLUX_SCALE_STRIDE = 8  # every 8th unmasked pixel judges the scale: cheap, and ample at factors of 1e3


def check_coverage(card: DataCard, coverage: tuple[float, float], where: str, unit: u.UnitBase | None = None) -> None:
    """InputError when wavelengths [A] spanning `coverage` lie nowhere near the card's range
    (beyond a factor NEAR_CARD of it), naming the stated `unit` and, where the numbers would
    fall in the card's range in another length unit, that one."""
    lo, hi = (float(x) for x in coverage)
    if not isinstance(card, SpectrumCard) or not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
        return  # nothing finite to judge: the per-object checks say why
    c_lo, c_hi = card.wavelength_min.to_value(ANGSTROM), card.wavelength_max.to_value(ANGSTROM)
    if hi >= c_lo / NEAR_CARD and lo <= c_hi * NEAR_CARD:
        return
    fix = "check the wavelength unit (TUNIT / BUNIT, or the wavelength_unit option), or pass the card of this spectrograph"
    if unit is not None and unit.physical_type == "length":
        per_angstrom = unit.to(ANGSTROM)
        fits = [name for name in WAVELENGTH_UNITS if lo / per_angstrom * u.Unit(name).to(ANGSTROM) < c_hi and hi / per_angstrom * u.Unit(name).to(ANGSTROM) > c_lo]
        if fits:
            fix = f"the numbers fall in the card's range if they are in {fits[0]}: correct the unit (TUNIT / BUNIT, or the wavelength_unit option)"
    stated = f" (stated unit {unit.to_string()!r})" if unit is not None else ""
    raise InputError(where, f"wavelengths {lo:.4g}-{hi:.4g} Angstrom{stated} lie nowhere near card {card.name!r} ({c_lo:.0f}-{c_hi:.0f} Angstrom)", fix)


def flux_scale(flux: np.ndarray, ivar: np.ndarray, wave: np.ndarray, card: SpectrumCard) -> float | None:
    """A spectrum's flux scale in erg/s/cm2/A: the median over (every FLUX_SCALE_STRIDE-th)
    unmasked pixel of |flux| + sigma, for flux and ivar in the card's unit on vacuum
    wavelengths `wave` [A]; None when every pixel is masked."""
    good = np.flatnonzero(ivar > 0)[::FLUX_SCALE_STRIDE]
    if good.size == 0:
        return None
    return float(np.median(np.abs(flux[good]) + 1.0 / np.sqrt(ivar[good]))) * _flam_per_unit(card.flux_unit, float(f"{wave[wave.size // 2]:.2g}"))


def flux_scale_problem(scale: float | None) -> str | None:
    """Why a flux scale (`flux_scale`) is implausible for any survey (FLUX_SCALE_RANGE), or
    None when it is plausible or unknown."""
    lo, hi = FLUX_SCALE_RANGE
    if scale is None or lo <= scale <= hi:
        return None
    off = f"{scale / hi:.0e} x brighter than the brightest" if scale > hi else f"{lo / scale:.0e} x fainter than the faintest"
    return (f"flux scale {scale:.1e} erg/s/cm2/A (median |flux| + sigma) is {off} spectra surveys record ({lo:g}-{hi:g}); the flux unit "
            "is probably wrong (e.g. values in Jy under an erg/s/cm2/A unit): check TUNIT / BUNIT or pass flux_unit")


@functools.lru_cache(maxsize=64)
def _flam_per_unit(flux_unit: str, wave: float) -> float:
    """erg/s/cm2/A in one `flux_unit` (at `wave` [A] for a unit per frequency)."""
    return float(u.Unit(flux_unit).to(FLAM, equivalencies=u.spectral_density(wave * ANGSTROM)))


# ---------------------------------------------------------------------------- per-object spectra


def spectrum_sample(index: int, sid: str, wave, flux, ivar, card: SpectrumCard, meta: dict, flags: Flags, bad=None) -> Sample | None:
    """A checked spectrum Sample, or None when the object is unusable (a flag says why).

    `wave` in vacuum Angstrom, `flux`/`ivar` already in the card's units; `bad` (bool per
    pixel) marks pixels the survey's mask rejects. NaN flux or ivar and negative ivar are
    masked with a flag; all-masked spectra, bad wavelength grids and grids outside the
    card's range are skipped with a flag; a flux scale no survey records (a wrong flux
    unit, `flux_scale_problem`) is kept with a flag.
    """
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        flags.add(index, sid, "bad_wavelength", f"{sid}: wavelengths contain NaN, inf or values <= 0", SKIPPED)
        return None
    d = np.diff(wave)
    if wave.size > 1 and not (np.all(d > 0) or np.all(d < 0)):
        flags.add(index, sid, "wavelength_not_monotonic", f"{sid}: wavelengths are not strictly monotonic", SKIPPED)
        return None
    ivar, counts = mask_invalid(flux, ivar)
    for code, n in counts.items():
        if n:
            flags.add(index, sid, code, masked_detail(sid, code, n), MASKED)
    if bad is not None:
        ivar[np.asarray(bad, dtype=bool)] = 0.0
    if not np.any(ivar > 0):
        flags.add(index, sid, "all_masked", f"{sid}: every pixel is masked (ivar = 0 or mask set)", SKIPPED)
        return None
    lo, hi = card.wavelength_min.to_value("Angstrom"), card.wavelength_max.to_value("Angstrom")
    if wave.max() < lo or wave.min() > hi:
        flags.add(index, sid, "outside_card_range", f"{sid}: {wave.min():.0f}-{wave.max():.0f} A does not overlap card {card.name!r} ({lo:.0f}-{hi:.0f} A)", SKIPPED)
        return None
    problem = flux_scale_problem(flux_scale(flux, ivar, wave, card))
    if problem:
        flags.add(index, sid, "implausible_flux_scale", f"{sid}: {problem}", KEPT)
    meta = {"card": card.name, "id": sid, **{k: json_safe(v) for k, v in meta.items()}}
    return Sample("spectrum", flux, ivar, {"wavelength": wave}, meta)


def masked_detail(sid: str, code: str, n: int) -> str:
    """The text of a MASKED flag of `sample.mask_invalid`: what was masked, and that the object is kept."""
    return f"{sid}: {n} {MASKED_ELEMENTS[code]} masked (ivar set to 0; the object's other elements are used)"


def convert_flux(flux, ivar, unit: u.UnitBase, card: DataCard, wave: np.ndarray, where: str, ivar_unit: u.UnitBase | None = None):
    """(flux, ivar) in the card's flux unit (f_nu <-> f_lambda per pixel when needed)."""
    return to_card_unit(flux, ivar, unit, card, {"wavelength": wave}, where, ivar_unit)


# ---------------------------------------------------------------------------- identifiers


def json_safe(v: Any) -> Any:
    """Header / table values as plain JSON types (bytes stripped to str, numpy to Python)."""
    if isinstance(v, bytes):
        return v.decode("ascii", "replace").strip()
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, np.generic):
        v = v.item()
        return json_safe(v)
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    if isinstance(v, np.ndarray):
        return [json_safe(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def identifiers_table(rows: list[dict[str, Any]]) -> Table:
    """One row per object: id, used, flags and the identifier keys present, RA/Dec in deg."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    t = Table()
    for k in keys:
        values = [r.get(k) for r in rows]
        if all(isinstance(v, (bool, np.bool_)) for v in values):
            t[k] = np.array(values, dtype=bool)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            t[k] = np.array(values, dtype=np.int64)
        elif all(isinstance(v, (int, float, np.number)) or v is None for v in values) and any(v is not None for v in values):
            t[k] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            t[k] = np.array(["" if v is None else str(v) for v in values])
        if k in ID_UNITS:
            t[k].unit = ID_UNITS[k]
    return t


def robust_sigma(x: np.ndarray, axis=None) -> np.ndarray:
    """Noise sigma that ignores sources: the MAD standard deviation after 3-sigma clipping
    (astropy sigma_clipped_stats), NaN ignored. Plain MAD over-estimates the noise of a
    stamp by ~20 % when a galaxy fills a good part of it; clipping removes that bias."""
    from astropy.stats import sigma_clipped_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(sigma_clipped_stats(x, axis=axis, sigma=3.0, maxiters=5, stdfunc="mad_std")[2])
