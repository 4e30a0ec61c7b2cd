"""FITS spectral cubes (radio): RA / Dec / frequency or velocity, memory-mapped.

What is read from the header (FITS WCS Papers I-III):

* axes: the celestial pair and a spectral axis FREQ, or VRAD / VOPT / VELO (radio, optical,
  relativistic velocity; AIPS 'VELO-LSR' / 'FELO-HEL' are translated by WCSLIB), converted
  to frequency with the rest frequency RESTFRQ / RESTFREQ (the card's, 21 cm by default,
  when the header has none; noted). A degenerate STOKES axis is dropped (the first Stokes
  plane is read when there are several).
* BUNIT: Jy/beam (any case); K (brightness temperature) is converted to Jy/beam per
  channel with the beam (astropy `brightness_temperature`). Values end in the card's
  brightness unit.
* beam: BMAJ, BMIN (deg) and BPA (deg) into meta; missing beam is noted.
* SPECSYS (LSRK, BARYCENT, TOPOCENT...) into meta: radio frequencies stay in their frame.

The cube has no inverse variance; ivar per channel is 1 / sigma^2 with sigma the robust
(sigma-clipped MAD) noise of that channel over the chunk (or the whole plane), and blanked (NaN) voxels
get ivar = 0. `read` returns the whole cube as one Sample (if it has at most `max_voxels`
voxels) or its chunks; `iter_cube_chunks` yields chunks of the card's n_channels x
spatial_size x spatial_size, reading each through `hdu.section` from the memory-mapped
file, so cubes larger than memory work. Edge chunks are padded with ivar = 0.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import astropy.units as u
import numpy as np
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import data_unit, parse_unit
from cosmofm.data_cards.readers.common import (
    SKIPPED,
    Flags,
    ReadResult,
    choose_card,
    fits_hdus,
    identifiers_table,
    json_safe,
    open_fits,
    robust_sigma,
    scaled,
)
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard

_SPECTRAL = ("FREQ", "VRAD", "VOPT", "VELO", "FELO", "ZOPT")
_MARKERS = [("ska-hi-like", "radio HI cube (TELESCOP SKA / MeerKAT / ASKAP)")]


def sniff(path: Path) -> bool:
    hdus = fits_hdus(path)
    if not hdus:
        return False
    for h in hdus:
        if h.kind != "image" or h.header.get("NAXIS", 0) not in (3, 4):
            continue
        ctypes = [str(h.header.get(f"CTYPE{k}", "")).upper() for k in range(1, h.header["NAXIS"] + 1)]
        if any(c.startswith("RA") for c in ctypes) and any(c.startswith("DEC") for c in ctypes) and any(c.startswith(_SPECTRAL) for c in ctypes):
            return True
    return False


@dataclass
class CubeInfo:
    """Everything about a cube that comes from its header (no voxel is read)."""

    hdu_index: int
    shape: tuple[int, int, int]  # (F, H, W) after reordering
    axes: tuple[int, int, int, int | None]  # numpy axes of (spectral, dec, ra, stokes)
    frequency: np.ndarray  # (F,) Hz
    dx: float  # arcsec per pixel along RA (signed: usually < 0)
    dy: float  # arcsec per pixel along Dec
    wcs: WCS
    factor: np.ndarray  # (F,) file unit -> card brightness unit per channel
    beam: dict
    meta: dict
    notes: list[str]


def cube_info(path: Path, card: CubeCard, rest_frequency=None) -> CubeInfo:
    """Parse the cube's header into a CubeInfo; InputError names the missing keyword."""
    hdus = fits_hdus(path) or ()
    info = next((h for h in hdus if h.kind == "image" and h.header.get("NAXIS", 0) in (3, 4)), None)
    if info is None:
        raise InputError(str(path), "has no 3D/4D image HDU", "give a FITS cube with RA, Dec and a frequency or velocity axis")
    h = info.header
    where = f"{path}[{info.name}]"
    naxis = h["NAXIS"]
    ctypes = [str(h.get(f"CTYPE{k}", "")).upper() for k in range(1, naxis + 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(h)
    ctypes_fixed = [c.upper() for c in wcs.wcs.ctype]
    try:
        s = next(k for k, c in enumerate(ctypes_fixed) if c.startswith(_SPECTRAL + ("WAVE",)))
    except StopIteration:
        raise InputError(f"{where}.CTYPE3", f"no frequency or velocity axis (CTYPE = {ctypes})", "label the spectral axis FREQ, VRAD, VOPT or VELO") from None
    lon, lat = wcs.wcs.lng, wcs.wcs.lat
    if lon < 0 or lat < 0:
        raise InputError(f"{where}.CTYPE1", f"no celestial axes (CTYPE = {ctypes})", "label the sky axes RA---XXX and DEC--XXX")
    stokes = next((k for k, c in enumerate(ctypes_fixed) if c.startswith("STOKES")), None)
    notes = []
    np_axis = lambda k: naxis - 1 - k  # noqa: E731 - FITS axis k (0-based) -> numpy axis
    full_shape = tuple(int(h[f"NAXIS{k}"]) for k in range(naxis, 0, -1))
    if stokes is not None and full_shape[np_axis(stokes)] > 1:
        notes.append(f"{full_shape[np_axis(stokes)]} Stokes planes: the first is read")
    others = [k for k in range(naxis) if k not in (s, lon, lat, stokes)]
    if others:
        raise InputError(where, f"has extra axes {[ctypes[k] for k in others]}", "give a cube with RA, Dec, a spectral axis and at most a STOKES axis")
    nf = full_shape[np_axis(s)]

    # Frequencies: the spectral sub-WCS at every channel centre (astropy gives SI units).
    spec = wcs.sub([s + 1])
    world = spec.wcs_pix2world(np.arange(nf, dtype=np.float64), 0)[0]
    cunit = u.Unit(spec.wcs.cunit[0]) if str(spec.wcs.cunit[0]) else None
    ctype = ctypes_fixed[s]
    rest = wcs.wcs.restfrq if wcs.wcs.restfrq > 0 else None
    if rest_frequency is not None:
        rest = u.Quantity(rest_frequency, u.Hz).to_value(u.Hz) if not isinstance(rest_frequency, (int, float)) else float(rest_frequency)
    if ctype.startswith("FREQ"):
        freq = (world * (cunit or u.Hz)).to_value(u.Hz)
    elif ctype.startswith(("WAVE", "AWAV")):
        freq = (world * (cunit or u.m)).to_value(u.Hz, equivalencies=u.spectral())
    else:
        if rest is None:
            rest = card.rest_frequency.to_value(u.Hz)
            notes.append(f"no RESTFRQ/RESTFREQ: velocities converted with the card's rest frequency {rest:.6g} Hz")
        convention = u.doppler_radio if ctype.startswith("VRAD") else (u.doppler_optical if ctype.startswith(("VOPT", "FELO", "ZOPT")) else u.doppler_relativistic)
        vel = world * (cunit or u.m / u.s)
        freq = vel.to_value(u.Hz, equivalencies=convention(rest * u.Hz))
        notes.append(f"spectral axis {ctype!r} ({convention.__name__.replace('doppler_', '')} velocity) converted to frequency with rest frequency {rest:.10g} Hz")
    if not np.all(np.isfinite(freq)) or np.any(freq <= 0):
        raise InputError(f"{where}.CRVAL{s + 1}", "the spectral axis gives non-positive or non-finite frequencies", "check CRVAL/CDELT/CUNIT of the spectral axis and RESTFRQ")

    cel = wcs.celestial
    pm = cel.pixel_scale_matrix * 3600.0
    scales = proj_plane_pixel_scales(cel) * 3600.0
    sign = np.where(np.diag(pm) == 0, 1.0, np.sign(np.diag(pm)))
    dx, dy = float(sign[0] * scales[0]), float(sign[1] * scales[1])

    beam = {}
    if "BMAJ" in h and "BMIN" in h:
        beam = {"beam_major_arcsec": float(h["BMAJ"]) * 3600, "beam_minor_arcsec": float(h["BMIN"]) * 3600, "beam_pa_deg": float(h.get("BPA", 0.0))}
    else:
        notes.append("no BMAJ/BMIN: beam unknown")

    target = data_unit(card)
    text = h.get("BUNIT")
    bunit = parse_unit(_radio_unit(text), f"{where}.BUNIT", None, "BUNIT")
    if bunit is None:
        raise InputError(f"{where}.BUNIT", "is missing", f"add BUNIT (e.g. {target.to_string()!r}) to the header")
    try:
        factor = np.full(nf, float(bunit.to(target)))
    except u.UnitsError:
        if bunit.is_equivalent(u.K) and beam:
            area = (2 * np.pi * (beam["beam_major_arcsec"] * u.arcsec) * (beam["beam_minor_arcsec"] * u.arcsec) / (8 * np.log(2))).to(u.sr)
            jy = np.array([(1 * bunit).to_value(u.Jy, equivalencies=u.brightness_temperature(f * u.Hz, beam_area=area)) for f in freq])
            factor = jy * float((u.Jy / u.beam).to(target, equivalencies=u.beam_angular_area(area)))
            notes.append(f"BUNIT {text!r}: brightness temperature converted to {target.to_string()} per channel with the beam")
        else:
            raise InputError(f"{where}.BUNIT", f"{text!r} cannot be converted to the card's {target.to_string()!r}" + (" (no beam to convert K)" if bunit.is_equivalent(u.K) else ""), f"store the cube in {target.to_string()!r} (or K with BMAJ/BMIN)") from None

    axes = (np_axis(s), np_axis(lat), np_axis(lon), None if stokes is None else np_axis(stokes))
    shape = (nf, full_shape[np_axis(lat)], full_shape[np_axis(lon)])
    specsys = str(h.get("SPECSYS", h.get("SPECSYS3", ""))).strip() or "unknown"
    meta = {"format": "fits-cube", "specsys": specsys, "rest_frequency_hz": rest, "bunit": str(text), **beam}
    for k in ("OBJECT", "TELESCOP"):
        if k in h:
            meta[k.lower()] = json_safe(h[k])
    return CubeInfo(info.index, shape, axes, np.asarray(freq, dtype=np.float64), dx, dy, wcs, factor, beam, meta, notes)


def read(path: Path, card=None, chunks: bool | str = False, limit: int | None = None, max_voxels: int = 2**27, rest_frequency=None) -> ReadResult:
    """The cube as one Sample, or (chunks=True) its card-sized chunks; chunks="auto" picks
    chunks when the cube has more than `max_voxels` voxels."""
    card, reason = _card(path, card)
    info = cube_info(path, card, rest_frequency)
    nvox = int(np.prod(info.shape))
    if chunks == "auto":
        chunks = nvox > max_voxels
    notes = list(info.notes)
    flags, samples, id_rows = Flags(), [], []
    if not chunks:
        if nvox > max_voxels:
            raise InputError(str(path), f"cube has {nvox} voxels (> max_voxels = {max_voxels})", "read it in chunks: read_any(path, chunks=True) or iter_cube_chunks(path)")
        with open_fits(path) as hdul:
            s = _sample(hdul[info.hdu_index], info, card, (0, 0, 0), info.shape, path.stem, flags, 0)
        if s is not None:
            samples.append(s)
        id_rows.append({"id": path.stem, "used": s is not None, "ra": s.meta["ra"] if s else None, "dec": s.meta["dec"] if s else None})
        n_objects = 1
    else:
        starts = list(_chunk_starts(info.shape, card))
        n_objects = len(starts)
        if limit is not None and limit < len(starts):
            notes.append(f"read the first {limit} of {len(starts)} chunks (limit)")
            starts = starts[:limit]
        size = (card.n_channels, card.spatial_size, card.spatial_size)
        with open_fits(path) as hdul:
            for i, start in enumerate(starts):
                sid = f"{path.stem}-c{start[0]}-y{start[1]}-x{start[2]}"
                s = _sample(hdul[info.hdu_index], info, card, start, size, sid, flags, i)
                id_rows.append({"id": sid, "used": s is not None, "ra": s.meta["ra"] if s else None, "dec": s.meta["dec"] if s else None})
                if s is not None:
                    samples.append(s)
    return ReadResult("fits-cube", path, "cube", card, reason, samples, flags, identifiers_table(id_rows), notes, n_objects=n_objects).require_usable()


def iter_cube_chunks(path, card=None, n_channels: int | None = None, spatial_size: int | None = None, rest_frequency=None) -> Iterator[Sample]:
    """Yield the cube's chunks (card.n_channels x card.spatial_size^2 unless given) as Samples.

    The file is memory-mapped and each chunk is read on its own, so memory stays at one
    chunk. Chunks that are entirely blank (NaN) are skipped.
    """
    path = Path(path)
    card, _ = _card(path, card)
    info = cube_info(path, card, rest_frequency)
    size = (n_channels or card.n_channels, spatial_size or card.spatial_size, spatial_size or card.spatial_size)
    flags = Flags()
    with open_fits(path) as hdul:
        hdu = hdul[info.hdu_index]
        for i, start in enumerate(_chunk_starts(info.shape, card, size)):
            s = _sample(hdu, info, card, start, size, f"{path.stem}-c{start[0]}-y{start[1]}-x{start[2]}", flags, i)
            if s is not None:
                yield s


# ---------------------------------------------------------------------------- helpers


def _card(path: Path, card):
    hdus = fits_hdus(path) or ()
    telescop = " ".join(str(h.header.get("TELESCOP", "")).upper() for h in hdus[:2])
    markers = _MARKERS if any(k in telescop for k in ("SKA", "MEERKAT", "ASKAP")) else []
    return choose_card(card, "cube", str(path), markers=markers)


def _chunk_starts(shape, card: CubeCard, size=None):
    nf, ns = (size[0], size[1]) if size else (card.n_channels, card.spatial_size)
    for c in range(0, shape[0], nf):
        for y in range(0, shape[1], ns):
            for x in range(0, shape[2], ns):
                yield (c, y, x)


def _sample(hdu, info: CubeInfo, card: CubeCard, start, size, sid: str, flags: Flags, index: int) -> Sample | None:
    """Read one (F, H, W) block at `start` (padded past the edges) as a Sample."""
    f0, y0, x0 = start
    nf, ny, nx = size
    F, H, W = info.shape
    f1, y1, x1 = min(f0 + nf, F), min(y0 + ny, H), min(x0 + nx, W)
    spec, lat, lon, stokes = info.axes
    slicer = [slice(None)] * len(hdu.shape)
    slicer[spec], slicer[lat], slicer[lon] = slice(f0, f1), slice(y0, y1), slice(x0, x1)
    if stokes is not None:
        slicer[stokes] = 0
    block = np.asarray(scaled(hdu.header, hdu.section[tuple(slicer)]), dtype=np.float64)
    # Reorder the remaining axes to (spectral, dec, ra).
    remaining = [a for a in range(len(hdu.shape)) if a != stokes]
    block = np.transpose(block, [remaining.index(a) for a in (spec, lat, lon)])
    values = np.full((nf, ny, nx), np.nan)
    values[: f1 - f0, : y1 - y0, : x1 - x0] = block
    values *= _extend(info.factor, f0, nf)[:, None, None]
    finite = np.isfinite(values)
    if not finite.any():
        flags.add(index, sid, "all_masked", f"{sid}: every voxel is blank (NaN) or outside the cube", SKIPPED)
        return None
    sigma = robust_sigma(values.reshape(nf, -1), axis=1)
    ivar_c = np.where(np.isfinite(sigma) & (sigma > 0), 1.0 / np.where(sigma > 0, sigma, 1.0) ** 2, 0.0)
    ivar = np.where(finite, ivar_c[:, None, None], 0.0)
    freq = _extend(info.frequency, f0, nf)
    yc, xc = y0 + (ny - 1) / 2, x0 + (nx - 1) / 2
    centre = info.wcs.celestial.pixel_to_world(xc, yc)
    meta = {"card": card.name, "id": sid, "ra": float(centre.icrs.ra.deg), "dec": float(centre.icrs.dec.deg), **info.meta, "origin_voxel": [int(f0), int(y0), int(x0)]}
    coords = {"frequency": freq, "dec_offset": (np.arange(ny) - (ny - 1) / 2) * info.dy, "ra_offset": (np.arange(nx) - (nx - 1) / 2) * info.dx}
    return Sample("cube", np.where(finite, values, 0.0), ivar, coords, meta)


def _extend(a: np.ndarray, start: int, n: int) -> np.ndarray:
    """a[start:start+n], continued linearly past the end (for padded edge chunks)."""
    out = a[start : start + n]
    if out.size == n:
        return out
    step = a[-1] - a[-2] if a.size > 1 else 1.0
    return np.concatenate([out, a[-1] + step * np.arange(1, n - out.size + 1)])


def _radio_unit(text):
    """Radio packages write JY/BEAM, Jy/Beam...: normalise the case astropy needs."""
    if text is None:
        return None
    t = str(text).strip()
    t = re.sub(r"(?i)\bjy\b", "Jy", t)
    t = re.sub(r"(?i)\bbeam\b", "beam", t)
    return t
