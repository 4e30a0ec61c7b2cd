"""DESI `coadd-*.fits` files: per-camera B/R/Z spectra joined onto one grid.

Data model (desidatamodel, DESI_SPECTRO_REDUX/SPECPROD/healpix/.../coadd-SURVEY-PROGRAM-PIXNUM):

* `FIBERMAP` (table, one row per target): TARGETID, TARGET_RA, TARGET_DEC,
  COADD_FIBERSTATUS, OBJTYPE, EBV (SFD98 dust map, kept as `meta["ebv"]`,
  data_cards/dust.py), ...; `EXP_FIBERMAP`, `SCORES`: not read.
* per camera X in B, R, Z: `X_WAVELENGTH` [nwave] (Angstrom, vacuum, barycentric),
  `X_FLUX` [nspec, nwave] (BUNIT '10**-17 erg/(s cm2 Angstrom)'), `X_IVAR` [nspec, nwave],
  `X_MASK` [nspec, nwave] (0 = good; may be a compressed image), `X_RESOLUTION`
  [nspec, ndiag, nwave] (diagonals of the resolution matrix).

The cameras share one 0.8 A lattice (b 3600-5800, r 5760-7620, z 7520-9824 A), so the
joined spectrum lives on the union of the camera grids (7781 pixels for the full range):
pixels seen by one camera keep their values; in the overlaps each pixel is the
inverse-variance weighted mean of the cameras, flux = sum(ivar_k f_k) / sum(ivar_k) and
ivar = sum(ivar_k), so no pixel counts twice. Cameras off a common lattice (not DESI,
but files laid out like it) are joined by interpolating the redder camera onto the bluer
one's pixels inside the overlap, with a flag. Nothing else is resampled.
"""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np

from cosmofm.data_cards.dust import EBV_KEY, recorded_ebv
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import parse_unit
from cosmofm.data_cards.readers.common import (
    KEPT,
    SKIPPED,
    Flags,
    ReadResult,
    choose_card,
    convert_flux,
    fits_hdus,
    get_hdu,
    hdu_named,
    identifiers_table,
    image_data,
    json_safe,
    open_fits,
    spectrum_sample,
)

FLUX_UNIT = u.Unit("1e-17 erg / (s cm2 Angstrom)")
_MARKER = ("desi-like", "DESI coadd layout (FIBERMAP + B/R/Z_WAVELENGTH, _FLUX, _IVAR HDUs)")


def sniff(path: Path) -> bool:
    hdus = fits_hdus(path)
    if not hdus:
        return False
    names = {h.name for h in hdus}
    return "FIBERMAP" in names and any(n.endswith("_WAVELENGTH") or n.endswith("_FLUX") for n in names)


def count(path: Path) -> int:
    """Targets in a coadd file, from the FIBERMAP header alone."""
    fibermap = hdu_named(fits_hdus(path) or (), "FIBERMAP")
    return int(fibermap.header.get("NAXIS2", 0)) if fibermap is not None else 0


def read(path: Path, card=None, limit: int | None = None, keep_sky: bool = False, rows: slice | None = None) -> ReadResult:
    """Every target of a coadd file (or the `rows` range of FIBERMAP rows, memory-mapped,
    for bounded memory) as one joined spectrum Sample."""
    hdus = fits_hdus(path) or ()
    names = [h.name for h in hdus]
    cameras = sorted({n[: -len("_FLUX")] for n in names if n.endswith("_FLUX")} | {n[: -len("_WAVELENGTH")] for n in names if n.endswith("_WAVELENGTH")})
    if not cameras:
        raise InputError(f"{path}[B_FLUX]", f"no camera HDUs X_WAVELENGTH / X_FLUX (HDUs: {names})", "a DESI coadd has B_, R_, Z_ WAVELENGTH/FLUX/IVAR/MASK HDUs; re-download the file")
    fix = "a DESI coadd has X_WAVELENGTH, X_FLUX, X_IVAR (and X_MASK) HDUs for each camera X; re-download the file"
    with open_fits(path) as hdul:
        fibermap = get_hdu(hdul, "FIBERMAP", path, fix).data
        nspec = len(fibermap)
        start, stop, _ = (rows or slice(None)).indices(nspec)
        stop = max(start, stop if limit is None else min(stop, start + limit))
        sel, n = slice(start, stop), stop - start
        cams = []
        for cam in cameras:
            w_hdu = get_hdu(hdul, f"{cam}_WAVELENGTH", path, fix)
            f_hdu = get_hdu(hdul, f"{cam}_FLUX", path, fix)
            i_hdu = get_hdu(hdul, f"{cam}_IVAR", path, fix)
            wave = np.asarray(image_data(w_hdu), dtype=np.float64).ravel()
            w_unit = parse_unit(w_hdu.header.get("BUNIT"), f"{path}[{cam}_WAVELENGTH].BUNIT", u.AA, "BUNIT")
            wave = (wave * w_unit).to_value(u.AA, equivalencies=u.spectral())
            f_shape, i_shape = _shape(f_hdu), _shape(i_hdu)
            if len(f_shape) != 2 or f_shape[1] != wave.size:
                raise InputError(f"{path}[{cam}_FLUX]", f"has shape {f_shape} but {cam}_WAVELENGTH has {wave.size} pixels", "FLUX must be [nspec, nwave] on the camera's wavelength grid; re-download the file")
            if i_shape != f_shape:
                raise InputError(f"{path}[{cam}_IVAR]", f"has shape {i_shape}, {cam}_FLUX has {f_shape}", "IVAR must match FLUX; re-download the file")
            if f_shape[0] != nspec:
                raise InputError(f"{path}[{cam}_FLUX]", f"has {f_shape[0]} spectra but FIBERMAP has {nspec} rows", "FLUX rows are FIBERMAP rows; re-download the file")
            flux = np.asarray(image_data(f_hdu, sel), dtype=np.float64)
            ivar = np.asarray(image_data(i_hdu, sel), dtype=np.float64)
            flux_unit = parse_unit(f_hdu.header.get("BUNIT"), f"{path}[{cam}_FLUX].BUNIT", FLUX_UNIT, "BUNIT")
            ivar_unit = parse_unit(i_hdu.header.get("BUNIT"), f"{path}[{cam}_IVAR].BUNIT", None, "BUNIT")
            mask = None
            if f"{cam}_MASK" in names:
                mask = np.asarray(image_data(hdul[f"{cam}_MASK"], sel))
                if mask.shape != flux.shape:
                    raise InputError(f"{path}[{cam}_MASK]", f"has shape {mask.shape}, {cam}_FLUX has {flux.shape}", "MASK must match FLUX; re-download the file")
            rpower = None
            if f"{cam}_RESOLUTION" in names:
                rpower = _resolving_power(np.asarray(image_data(hdul[f"{cam}_RESOLUTION"], sel), dtype=np.float64), wave)
            cams.append({"name": cam.lower(), "wave": wave, "wave_unit": w_unit, "flux": flux, "ivar": ivar, "mask": mask, "flux_unit": flux_unit, "ivar_unit": ivar_unit, "R": rpower})
        fm = {c.upper(): np.asarray(fibermap[c][sel]) for c in fibermap.columns.names if c.upper() in ("TARGETID", "TARGET_RA", "TARGET_DEC", "COADD_FIBERSTATUS", "FIBERSTATUS", "OBJTYPE", "EBV")}
        primary = hdul[0].header
        survey = {k.lower(): json_safe(primary[k]) for k in ("SURVEY", "PROGRAM", "SPGRP", "SPGRPVAL", "HPXPIXEL", "TILEID", "SPECPROD") if k in primary}

    cams.sort(key=lambda c: c["wave"].min())
    lo, hi = min(c["wave"].min() for c in cams), max(c["wave"].max() for c in cams)
    units = {c["wave_unit"] for c in cams}
    card, reason = choose_card(card, "spectrum", f"{path}[{cams[0]['name'].upper()}_WAVELENGTH]", markers=[_MARKER], coverage=(lo, hi),
                               wavelength_unit=units.pop() if len(units) == 1 else None)
    aligned = _on_one_lattice([c["wave"] for c in cams])
    notes = [f"cameras {'+'.join(c['name'] for c in cams)} joined on {'their common lattice' if aligned else 'the bluer camera grid in overlaps (interpolated)'}; overlaps inverse-variance weighted", "wavelengths vacuum, barycentric (DESI convention)"]
    if n < nspec:
        notes.append(f"read targets {start}-{stop - 1} of {nspec}" + (" (limit)" if limit is not None else ""))

    flags, samples, id_rows = Flags(), [], []
    for j in range(n):
        i = start + j  # the FIBERMAP row, for ids and flags; j indexes the arrays read
        targetid = int(fm["TARGETID"][j]) if "TARGETID" in fm else None
        sid = f"desi-{targetid}" if targetid is not None else f"{path.stem}-{i}"
        ids = {"targetid": targetid, "ra": _float(fm.get("TARGET_RA"), j), "dec": _float(fm.get("TARGET_DEC"), j)}
        status = fm.get("COADD_FIBERSTATUS", fm.get("FIBERSTATUS"))
        objtype = str(json_safe(fm["OBJTYPE"][j])) if "OBJTYPE" in fm else ""
        if objtype == "SKY" and not keep_sky:
            flags.add(i, sid, "sky_fiber", f"{sid}: OBJTYPE = SKY (a sky fibre, not a target)", SKIPPED)
            id_rows.append({"id": sid, "used": False, **ids})
            continue
        parts = []
        for c in cams:
            f, iv = convert_flux(c["flux"][j], c["ivar"][j], c["flux_unit"], card, c["wave"], f"{path}[{c['name'].upper()}_FLUX]", c["ivar_unit"])
            iv = np.where(np.isfinite(iv) & (iv > 0), iv, 0.0)
            if c["mask"] is not None:
                iv = np.where(c["mask"][j] != 0, 0.0, iv)
            parts.append((c["wave"], f, iv))
        wave, flux, ivar = join_cameras(parts) if aligned else _join_interpolated(parts)
        meta = {**ids, "format": "desi-coadd", "medium": "vacuum", "frame": "barycentric", **survey}
        if status is not None:
            meta["fiberstatus"] = int(status[j])
            if int(status[j]) != 0:
                flags.add(i, sid, "fiberstatus", f"{sid}: COADD_FIBERSTATUS = {int(status[j])} (kept; masked pixels already have ivar 0)", KEPT)
        if objtype:
            meta["objtype"] = objtype
        ebv = recorded_ebv(fm["EBV"][j]) if "EBV" in fm else None
        if ebv is not None:
            meta[EBV_KEY] = ebv  # SFD98 at the target, on the SF11 scale (data_cards/dust.py)
        rp = {c["name"]: c["R"][j] for c in cams if c["R"] is not None and c["R"][j] is not None}
        if rp:
            meta["resolving_power"] = rp
        s = spectrum_sample(i, sid, wave, flux, ivar, card, meta, flags)
        id_rows.append({"id": sid, "used": s is not None, **ids})
        if s is not None:
            samples.append(s)
    result = ReadResult("desi-coadd", path, "spectrum", card, reason, samples, flags, identifiers_table(id_rows), notes, n_objects=nspec)
    # A range of rows may hold only sky fibres; whether the whole file is usable is the caller's call.
    return result if rows is not None else result.require_usable()


# ---------------------------------------------------------------------------- joining cameras


def join_cameras(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Join per-camera (wave, flux, ivar) that share one wavelength lattice onto its union.

    A pixel seen by several cameras becomes their inverse-variance weighted mean with
    ivar = the sum of the ivars (where every camera masks it: flux 0, ivar 0). Wavelengths
    are taken from the cameras themselves (the first camera to cover the pixel), so
    non-overlap pixels are bit-identical to the input. `tol` is in units of the pixel step.
    """
    step = float(np.median(np.diff(parts[0][0])))
    origin = float(parts[0][0][0])
    index = [np.rint((w - origin) / step).astype(np.int64) for w, _, _ in parts]
    for (w, _, _), k in zip(parts, index):
        if np.max(np.abs((w - origin) / step - k)) > tol:
            raise InputError("cameras", "wavelength grids are not on one lattice", "use _join_interpolated (read() chooses it automatically)")
    grid = np.unique(np.concatenate(index))
    wave = np.full(grid.size, np.nan)
    num = np.zeros(grid.size)
    den = np.zeros(grid.size)
    for (w, f, iv), k in zip(parts, index):
        pos = np.searchsorted(grid, k)
        fresh = np.isnan(wave[pos])
        wave[pos[fresh]] = w[fresh]
        good = iv > 0
        np.add.at(num, pos[good], iv[good] * f[good])
        np.add.at(den, pos[good], iv[good])
    flux = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return wave, flux, den


def _join_interpolated(parts):
    """Cameras off a common lattice: in each overlap, interpolate the redder camera onto the
    bluer camera's pixels (flux linearly, variance linearly, masked where a neighbour is
    masked) and combine there with inverse-variance weights; outside overlaps pixels are kept."""
    wave, flux, ivar = (np.asarray(a, dtype=np.float64) for a in parts[0])
    for w2, f2, iv2 in parts[1:]:
        inside = (wave >= w2.min()) & (wave <= w2.max())
        if inside.any():
            var2 = np.where(iv2 > 0, 1.0 / np.where(iv2 > 0, iv2, 1.0), np.inf)
            f_i = np.interp(wave[inside], w2, f2)
            j = np.clip(np.searchsorted(w2, wave[inside]), 1, w2.size - 1)
            t = (wave[inside] - w2[j - 1]) / (w2[j] - w2[j - 1])
            v_i = (1 - t) * var2[j - 1] + t * var2[j]
            iv_i = np.where(np.isfinite(v_i) & (v_i > 0), 1.0 / np.where(np.isfinite(v_i) & (v_i > 0), v_i, 1.0), 0.0)
            total = ivar[inside] + iv_i
            flux[inside] = np.divide(ivar[inside] * flux[inside] + iv_i * f_i, total, out=flux[inside].copy(), where=total > 0)
            ivar[inside] = total
        beyond = w2 > wave.max()
        wave = np.concatenate([wave, w2[beyond]])
        flux = np.concatenate([flux, f2[beyond]])
        ivar = np.concatenate([ivar, iv2[beyond]])
    return wave, flux, ivar


def _on_one_lattice(waves: list[np.ndarray], tol: float = 1e-3) -> bool:
    step = np.diff(waves[0])
    if step.size == 0 or np.ptp(step) > tol * np.median(step):
        return False
    step, origin = float(np.median(step)), float(waves[0][0])
    for w in waves:
        d = np.diff(w)
        if d.size and np.ptp(d) > tol * step:
            return False
        k = (w - origin) / step
        if np.max(np.abs(k - np.rint(k))) > tol or (d.size and abs(float(np.median(d)) - step) > tol * step):
            return False
    return True


def _resolving_power(res: np.ndarray, wave: np.ndarray) -> list[float | None]:
    """Median R = lambda / FWHM per spectrum from resolution-matrix diagonals [nspec, ndiag, nwave].

    Row k of the diagonals is offset ndiag//2 - k pixels (desispec.resolution); the LSF
    sigma in pixels is the square root of the second moment over offsets.
    """
    if res.ndim != 3 or res.shape[2] != wave.size:
        return [None] * len(res)
    nd = res.shape[1]
    offsets = (nd // 2 - np.arange(nd)).astype(np.float64)[None, :, None]
    norm = res.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_pix = np.sqrt((res * offsets**2).sum(axis=1) / norm)  # (nspec, nwave)
        dlam = np.gradient(wave)[None, :]
        r = wave[None, :] / (2.3548 * sigma_pix * dlam)
    out = []
    for row in r:
        ok = np.isfinite(row) & (row > 0)
        out.append(float(round(np.median(row[ok]), 1)) if ok.any() else None)
    return out


def _shape(hdu) -> tuple[int, ...]:
    return tuple(hdu.shape)  # from the header; the data stay on disk


def _float(values, i):
    if values is None:
        return None
    v = json_safe(values[i])
    return None if v is None else float(v)

