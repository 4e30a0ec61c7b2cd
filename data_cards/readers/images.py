"""FITS images with a celestial WCS: one band per HDU, or a cube of bands in one HDU.

What is read from the headers:

* band: FILTER / BAND / FILTNAM (HDU header, then primary) or an EXTNAME equal to a card
  band ("g", "HSC-G", "LSST g" all match band g); in a cube of bands, BAND1..BANDn or
  FILTER1..FILTERn keywords, or a WAVE third axis; otherwise the card's band order when
  the counts agree (noted). The effective wavelength comes from the card (PHOTPLAM /
  WAVELEN in Angstrom for bands the card does not list).
* unit: BUNIT when it is a flux density (nJy, Jy, nanomaggy, erg/s/cm2/Hz, ...), else an
  AB zero point (MAGZP, MAGZERO, ZEROPT, ZP, PHOTZP, ZPT, MAGZPT): one count is
  10^(-0.4 ZP) x 3631 Jy. Values are converted to the card's flux unit.
* ivar: a companion HDU `<EXTNAME>_IVAR` / `IVAR` / `INVVAR` (or `_VAR` / `VARIANCE`,
  inverted) and `<EXTNAME>_MASK` / `MASK` (non-zero = bad); without one, a constant ivar
  from the sigma-clipped MAD noise of the band's pixels, noted.
* sky offsets: from the WCS pixel scale, signed by the CD/PC diagonal (RA offsets usually
  decrease with column index, since east is to the left), in arcsec from the image centre
  or, for cutouts, from the requested position.

`read` returns the whole image as one Sample (bands must share the pixel grid), or, with
`positions=` and `size=`, one Sample per position cut with `astropy.nddata.Cutout2D`;
`cutouts` is the same from one single-band file per band. Positions off the image are
flagged and skipped; partly covered stamps are filled with ivar = 0 and flagged.
Data are memory-mapped; only the cut pixels are read.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.nddata.utils import NoOverlapError
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import data_unit, parse_unit
from cosmofm.data_cards.readers.common import (
    MASKED,
    SKIPPED,
    Flags,
    ReadResult,
    choose_card,
    fits_hdus,
    header_value,
    identifiers_table,
    image_data,
    open_fits,
    robust_sigma,
)
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import ImageCard

ZP_KEYS = ("MAGZP", "MAGZERO", "ZEROPT", "ZP", "PHOTZP", "ZPT", "MAGZPT")
_BAND_KEYS = ("FILTER", "BAND", "FILTNAM", "FILTER1")
_COMPANION = re.compile(r"(^|_)(IVAR|INVVAR|VAR|VARIANCE|MASK|WEIGHT|WHT|ERR|ERROR|SIGMA|PSF)$")
_RADIO_SPECTRAL = ("FREQ", "VRAD", "VOPT", "VELO", "FELO", "ZOPT")
MAX_BAND_PLANES = 16  # more planes than this is a spectral cube, not a stack of bands
_MARKERS = [("lsst-like", "LSST/Rubin markers in TELESCOP/INSTRUME")]


def _celestial(h: fits.Header) -> bool:
    return str(h.get("CTYPE1", "")).upper().startswith("RA") and str(h.get("CTYPE2", "")).upper().startswith("DEC")


def sniff(path: Path) -> bool:
    hdus = fits_hdus(path)
    if not hdus:
        return False
    for h in hdus:
        if h.kind != "image" or not _celestial(h.header) or _COMPANION.search(h.name):
            continue
        naxis = h.header.get("NAXIS", 0)
        if naxis == 2:
            return True
        if naxis == 3 and not str(h.header.get("CTYPE3", "")).upper().startswith(_RADIO_SPECTRAL) and h.header.get("NAXIS3", 0) <= MAX_BAND_PLANES:
            return True
    return False


@dataclass
class _Plane:
    """One band's pixels (memory-mapped) with its WCS and conversion to the card's unit."""

    band: str
    wavelength: float  # effective wavelength [A]
    data: np.ndarray  # (H, W), memory-mapped
    wcs: WCS  # celestial
    factor: float  # file unit -> card flux unit
    ivar: np.ndarray | None  # companion ivar in the file's unit^-2, (H, W)
    mask: np.ndarray | None
    where: str


def read(path: Path, card=None, positions=None, size: int | None = None, zero_point: float | None = None, bands: Sequence[str] | None = None, ids: Sequence[str] | None = None, limit: int | None = None) -> ReadResult:
    """The whole image as one Sample, or cutouts of `size` pixels at `positions` (SkyCoord)."""
    hdus = fits_hdus(path) or ()
    primary = hdus[0].header if hdus else fits.Header()
    markers = _MARKERS if any(k in str(primary.get(key, "")).upper() for key in ("TELESCOP", "INSTRUME") for k in ("LSST", "RUBIN")) else []
    card, reason = choose_card(card, "image", str(path), markers=markers)
    hdul = open_fits(path)  # kept open: planes are memory-mapped views
    try:
        planes, notes = _planes(hdul, path, card, zero_point, bands)
        if positions is None:
            return _whole(path, planes, card, reason, notes)
        return _cutouts(path.stem, str(path), planes, card, reason, notes, positions, size, ids, limit)
    finally:
        hdul.close()


def cutouts(image_paths_per_band: dict[str, str | os.PathLike], positions, size_pixels: int, card: ImageCard | str, ids: Sequence[str] | None = None) -> list[Sample]:
    """Stamps of `size_pixels` around each position, one single-band FITS image per band.

    Args:
        image_paths_per_band: {band name in the card: path of that band's image}.
        positions: SkyCoord (scalar or array) of the objects.
        size_pixels: stamp side in pixels.
        card: the ImageCard (or its name): band wavelengths and the flux unit.
        ids: one id per position (default "<first file stem>-<index>").

    Positions off every image are skipped (see `read_cutouts` for the flags).
    """
    return list(read_cutouts(image_paths_per_band, positions, size_pixels, card, ids).samples)


def read_cutouts(image_paths_per_band: dict[str, str | os.PathLike], positions, size_pixels: int, card, ids: Sequence[str] | None = None, zero_point: float | None = None) -> ReadResult:
    """`cutouts` with the flags and identifiers (a ReadResult)."""
    card, reason = choose_card(card, "image", "cutouts")
    if not image_paths_per_band:
        raise InputError("image_paths_per_band", "is empty", "pass {band: path} for at least one band")
    opened, planes, notes = [], [], []
    try:
        for band, p in image_paths_per_band.items():
            hdul = open_fits(Path(p))
            opened.append(hdul)
            got, n = _planes(hdul, Path(p), card, zero_point, None, force_band=band)
            planes += got
            notes += n
        first = Path(next(iter(image_paths_per_band.values())))
        return _cutouts(first.stem, ", ".join(str(p) for p in image_paths_per_band.values()), planes, card, reason, notes, positions, size_pixels, ids, None)
    finally:
        for h in opened:
            h.close()


# ---------------------------------------------------------------------------- planes


def _planes(hdul: fits.HDUList, path: Path, card: ImageCard, zero_point, bands, force_band: str | None = None) -> tuple[list[_Plane], list[str]]:
    primary = hdul[0].header
    names = {(h.name or "").upper(): h for h in hdul}
    science = [(i, h) for i, h in enumerate(hdul) if h.is_image and h.data is not None and _celestial(h.header) and not _COMPANION.search((h.name or "").upper()) and h.header.get("NAXIS", 0) in (2, 3)]
    if not science:
        raise InputError(str(path), "has no image HDU with a celestial WCS (CTYPE1 = 'RA---...', CTYPE2 = 'DEC--...')", "give a FITS image with a WCS")
    planes, notes, hows = [], [], {}
    for k, (i, hdu) in enumerate(science):
        where = f"{path}[{hdu.name or i}]"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(hdu.header).celestial
        data = image_data(hdu)
        ext = (hdu.name or "").upper()
        ivar_cube, mask_cube = _companions(names, ext, len(science) == 1, data.shape, where)
        if data.ndim == 2:
            band = force_band or _band_of(hdu.header, primary, ext, card, bands, k, where)
            stack = [(band, data, ivar_cube, mask_cube, hdu.header)]
        else:
            labels = _plane_bands(hdu.header, data.shape[0], card, bands, where, notes)
            stack = [(lab, data[k], None if ivar_cube is None else ivar_cube[k], None if mask_cube is None else mask_cube[k], hdu.header) for k, lab in enumerate(labels)]
        for band, plane, iv, mk, header in stack:
            lam = _band_wavelength(band, card, header, where)
            factor, how = _flux_factor(header, primary, card, lam, zero_point, where)
            hows.setdefault(how, []).append(band)
            planes.append(_Plane(band, lam, plane, wcs, factor, iv, mk, where))
    notes += [f"band{'s' if len(b) > 1 else ''} {', '.join(b)}: {how}" for how, b in hows.items()]
    return planes, notes


def _companions(names: dict, ext: str, single: bool, shape, where: str):
    ivar = mask = None
    for key, kind in ((f"{ext}_IVAR", "ivar"), (f"{ext}_INVVAR", "ivar"), (f"{ext}_VAR", "var"), (f"{ext}_VARIANCE", "var"), (f"{ext}_MASK", "mask")) + ((("IVAR", "ivar"), ("INVVAR", "ivar"), ("VARIANCE", "var"), ("VAR", "var"), ("MASK", "mask")) if single else ()):
        hdu = names.get(key)
        if hdu is None or hdu.data is None:
            continue
        if tuple(hdu.shape) != tuple(shape):
            raise InputError(f"{where} / {key}", f"has shape {hdu.data.shape}, the image has {shape}", f"{key} must match the image pixel for pixel")
        if kind == "ivar" and ivar is None:
            ivar = image_data(hdu)
        elif kind == "var" and ivar is None:
            var = np.asarray(image_data(hdu), dtype=np.float64)
            ivar = np.where(np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
        elif kind == "mask" and mask is None:
            mask = image_data(hdu)
    return ivar, mask


def _match_band(name: str, card: ImageCard) -> str | None:
    v = str(name).strip().lower()
    for b in card.bands:
        n = b.name.lower()
        if v == n or v in (f"{n}-band", f"{n}band", f"{n}_band") or any(v.endswith(sep + n) for sep in ("-", "_", " ", ".")):
            return b.name
    return None


def _band_of(header, primary, ext, card, bands, k, where) -> str:
    """The band of the k-th science HDU."""
    if bands is not None:
        if k >= len(bands):
            raise InputError(where, f"is image HDU {k + 1} but bands= names only {len(bands)}", "name one band per image HDU, in file order")
        return bands[k]
    for value in [header.get(k) for k in _BAND_KEYS] + [ext] + [primary.get(k) for k in _BAND_KEYS]:
        if value and _match_band(value, card):
            return _match_band(value, card)
    value = header_value([header, primary], *_BAND_KEYS)
    if value and header_value([header, primary], "PHOTPLAM", "WAVELEN", "EFFWAVE") is not None:
        return str(value).strip()
    if len(card.bands) == 1:
        return card.bands[0].name
    raise InputError(where, f"cannot tell the band (FILTER/BAND = {value!r}, EXTNAME = {ext!r}; card bands {[b.name for b in card.bands]})", "add a FILTER keyword naming a card band, or pass bands=[...]")


def _plane_bands(header, n: int, card: ImageCard, bands, where: str, notes: list[str]) -> list[str]:
    if bands is not None:
        if len(bands) != n:
            raise InputError(where, f"has {n} planes but bands= names {len(bands)}", "name one band per plane")
        return list(bands)
    for prefix in ("BAND", "FILTER"):
        labels = [header.get(f"{prefix}{k + 1}") for k in range(n)]
        if all(labels):
            return [_match_band(v, card) or str(v).strip() for v in labels]
    if n == len(card.bands):
        notes.append(f"no BANDn/FILTERn keywords: the {n} planes are taken to be the card's bands in order ({', '.join(b.name for b in card.bands)})")
        return [b.name for b in card.bands]
    raise InputError(where, f"has {n} planes and no BAND1..BAND{n} / FILTER1..FILTER{n} keywords (card has {len(card.bands)} bands)", "add BANDn keywords naming the card's bands, or pass bands=[...]")


def _band_wavelength(band: str, card: ImageCard, header, where: str) -> float:
    for b in card.bands:
        if b.name == band:
            return float(b.wavelength.to_value("Angstrom"))
    lam = header_value([header], "PHOTPLAM", "WAVELEN", "EFFWAVE")
    if lam is not None:
        return float(lam)
    raise InputError(where, f"band {band!r} is not in card {card.name!r} ({[b.name for b in card.bands]}) and no PHOTPLAM/WAVELEN gives its wavelength", "pass a card listing this band")


def _flux_factor(header, primary, card: ImageCard, lam: float, zero_point, where: str) -> tuple[float, str]:
    target = data_unit(card)
    if zero_point is not None:
        return float((zero_point * u.ABmag).to_value(target)), f"zero point {zero_point} (option) -> {target.to_string()}"
    bunit_text = header.get("BUNIT", primary.get("BUNIT"))
    bunit = parse_unit(bunit_text, f"{where}.BUNIT", None, "BUNIT")
    if bunit is not None:
        try:
            return float(bunit.to(target, equivalencies=u.spectral_density(lam * u.AA))), f"BUNIT {bunit_text!r} -> {target.to_string()}"
        except u.UnitsError:
            pass
    zp = header_value([header, primary], *ZP_KEYS)
    if zp is not None:
        return float((float(zp) * u.ABmag).to_value(target)), f"AB zero point {float(zp)} -> {target.to_string()}"
    if bunit is not None:
        raise InputError(f"{where}.BUNIT", f"{bunit_text!r} is not a flux density and no zero point keyword ({', '.join(ZP_KEYS)}) is given", f"add MAGZP (AB mag of one count) or BUNIT in {target.to_string()!r}, or pass zero_point=")
    raise InputError(f"{where}.BUNIT", f"no BUNIT and no zero point keyword ({', '.join(ZP_KEYS)})", f"add BUNIT (e.g. {target.to_string()!r}) or MAGZP to the header, or pass zero_point=")


# ---------------------------------------------------------------------------- samples


def _offsets(wcs: WCS, n: int, centre: float) -> tuple[np.ndarray, float]:
    """Sky offsets [arcsec] of n pixels from pixel `centre` along x (RA) and the |scale| per axis."""
    pm = wcs.pixel_scale_matrix * 3600.0  # arcsec / pixel
    scales = proj_plane_pixel_scales(wcs) * 3600.0
    sign = np.sign(np.diag(pm))
    sign[sign == 0] = 1.0
    return (np.arange(n) - centre) * sign[0] * scales[0], (np.arange(n) - centre) * sign[1] * scales[1]


def _check_grid(planes: list[_Plane], where: str) -> float:
    scales = [proj_plane_pixel_scales(p.wcs).mean() * 3600 for p in planes]
    if max(scales) > min(scales) * 1.01:
        raise InputError(where, f"bands have different pixel scales {dict(zip([p.band for p in planes], np.round(scales, 4)))} arcsec", "resample the bands to one pixel grid first")
    return float(np.mean(scales))


def _ivar_for(p: _Plane, values: np.ndarray, ivar: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """ivar in the card's unit for the (converted) `values`: companion, or MAD estimate."""
    if ivar is not None:
        iv = np.asarray(ivar, dtype=np.float64) / p.factor**2
        return np.where(np.isfinite(iv) & (iv > 0), iv, 0.0), False
    sigma = robust_sigma(values)
    iv = 1.0 / sigma**2 if np.isfinite(sigma) and sigma > 0 else 0.0
    return np.full(values.shape, iv), True


def _whole(path: Path, planes: list[_Plane], card, reason, notes) -> ReadResult:
    where = str(path)
    shapes = {p.data.shape for p in planes}
    if len(shapes) > 1:
        raise InputError(where, f"bands have different image shapes {sorted(shapes)}", "cut aligned stamps instead: read_any(path, positions=SkyCoord(...), size=64)")
    _check_grid(planes, where)
    h, w = planes[0].data.shape
    values, ivars, estimated = [], [], False
    for p in planes:
        v = np.asarray(p.data, dtype=np.float64) * p.factor
        iv, est = _ivar_for(p, v, p.ivar)
        estimated |= est
        if p.mask is not None:
            iv = np.where(np.asarray(p.mask) != 0, 0.0, iv)
        iv = np.where(np.isfinite(v), iv, 0.0)
        values.append(v)
        ivars.append(iv)
    dx, _ = _offsets(planes[0].wcs, w, (w - 1) / 2)
    _, dy = _offsets(planes[0].wcs, h, (h - 1) / 2)
    centre = planes[0].wcs.pixel_to_world((w - 1) / 2, (h - 1) / 2)
    order = np.argsort([p.wavelength for p in planes])
    ids = {"ra": float(centre.icrs.ra.deg), "dec": float(centre.icrs.dec.deg)}
    meta = {"card": card.name, "id": path.stem, **ids, "format": "fits-image", "bands": [planes[k].band for k in order], "pixel_scale_arcsec": float(abs(dx[1] - dx[0])) if w > 1 else None}
    flags = Flags()
    if estimated:
        notes.append("no ivar/variance HDU: ivar from the sigma-clipped MAD pixel noise of each band")
    vals, ivs = np.stack([values[k] for k in order]), np.stack([ivars[k] for k in order])
    if not np.any(ivs > 0):
        flags.add(0, path.stem, "all_masked", f"{path.stem}: every pixel is masked", SKIPPED)
        samples = []
    else:
        samples = [Sample("image", vals, ivs, {"band_wavelength": np.array([planes[k].wavelength for k in order]), "dec_offset": dy, "ra_offset": dx}, meta)]
    return ReadResult("fits-image", path, "image", card, reason, samples, flags, identifiers_table([{"id": path.stem, "used": bool(samples), **ids}]), notes, n_objects=1).require_usable()


def _cutouts(stem: str, where: str, planes: list[_Plane], card, reason, notes, positions, size, ids, limit) -> ReadResult:
    if size is None or int(size) < 1:
        raise InputError("size", f"{size!r} is not a stamp size", "pass size= (pixels on a side) with positions=")
    if not isinstance(positions, SkyCoord):
        raise InputError("positions", f"is a {type(positions).__name__}, not a SkyCoord", "pass astropy.coordinates.SkyCoord(ra, dec, unit='deg')")
    size = int(size)
    _check_grid(planes, where)
    positions = positions.reshape(-1) if not positions.isscalar else positions.reshape((1,))
    n = len(positions) if limit is None else min(limit, len(positions))
    if ids is not None and len(ids) < len(positions):
        raise InputError("ids", f"has {len(ids)} entries for {len(positions)} positions", "give one id per position")
    order = np.argsort([p.wavelength for p in planes])
    planes = [planes[k] for k in order]
    estimated = {}
    flags, samples, id_rows = Flags(), [], []
    for i in range(n):
        pos = positions[i]
        sid = str(ids[i]) if ids is not None else f"{stem}-{i}"
        row = {"id": sid, "ra": float(pos.icrs.ra.deg), "dec": float(pos.icrs.dec.deg)}
        values, ivars, partial, missing = [], [], False, []
        for p in planes:
            try:
                cut = Cutout2D(p.data, pos, (size, size), wcs=p.wcs, mode="partial", fill_value=np.nan, copy=True)
            except NoOverlapError:
                missing.append(p.band)
                continue
            v = np.asarray(cut.data, dtype=np.float64) * p.factor
            if p.ivar is not None:
                iv = np.asarray(Cutout2D(p.ivar, pos, (size, size), wcs=p.wcs, mode="partial", fill_value=0.0).data, dtype=np.float64) / p.factor**2
                iv = np.where(np.isfinite(iv) & (iv > 0), iv, 0.0)
            else:
                if p.band not in estimated:  # one noise level per band, from a sparse grid of its pixels
                    step = max(1, int(np.sqrt(p.data.size / 250_000)))
                    sigma = robust_sigma(np.asarray(p.data[::step, ::step], dtype=np.float64)) * abs(p.factor)
                    estimated[p.band] = 1.0 / sigma**2 if np.isfinite(sigma) and sigma > 0 else 0.0
                iv = np.full(v.shape, estimated[p.band])
            if p.mask is not None:
                mk = Cutout2D(p.mask, pos, (size, size), wcs=p.wcs, mode="partial", fill_value=1).data
                iv = np.where(np.asarray(mk) != 0, 0.0, iv)
            filled = ~np.isfinite(v)
            partial |= bool(filled.any())
            iv = np.where(filled, 0.0, iv)
            values.append(np.where(filled, 0.0, v))
            ivars.append(iv)
            xc, yc = cut.input_position_cutout
        if missing:
            flags.add(i, sid, "outside_image", f"{sid}: ({row['ra']:.5f}, {row['dec']:.5f}) is off the image in band(s) {missing}", SKIPPED)
            id_rows.append({**row, "used": False})
            continue
        ivs = np.stack(ivars)
        if not np.any(ivs > 0):
            flags.add(i, sid, "all_masked", f"{sid}: every pixel of the stamp is masked", SKIPPED)
            id_rows.append({**row, "used": False})
            continue
        if partial:
            flags.add(i, sid, "partial_overlap", f"{sid}: stamp runs off the image or over NaN pixels; those pixels have ivar 0", MASKED)
        dx, _ = _offsets(planes[0].wcs, size, xc)
        _, dy = _offsets(planes[0].wcs, size, yc)
        meta: dict[str, Any] = {"card": card.name, "id": sid, "ra": row["ra"], "dec": row["dec"], "format": "fits-image-cutout", "bands": [p.band for p in planes]}
        samples.append(Sample("image", np.stack(values), ivs, {"band_wavelength": np.array([p.wavelength for p in planes]), "dec_offset": dy, "ra_offset": dx}, meta))
        id_rows.append({**row, "used": True})
    if estimated:
        notes.append(f"no ivar/variance HDU for band(s) {sorted(estimated)}: ivar from the sigma-clipped MAD pixel noise")
    return ReadResult("fits-image", Path(where.split(", ")[0]), "image", card, reason, samples, flags, identifiers_table(id_rows), notes, n_objects=len(positions)).require_usable()
