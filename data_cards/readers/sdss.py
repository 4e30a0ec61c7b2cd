"""SDSS / BOSS / eBOSS spectra: `spec-PLATE-MJD-FIBER.fits` (full and lite) and multi-object tables.

Data model (https://data.sdss.org/datamodel/files/BOSS_SPECTRO_REDUX/RUN2D/spectra/lite/PLATE4/spec.html):

* HDU 0: header only; TELESCOP = 'SDSS 2.5-M', PLATEID, MJD, FIBERID, PLUG_RA/PLUG_DEC,
  BUNIT ('1E-17 erg/cm^2/s/Ang'), VACUUM ('T'), HELIO_RV (the heliocentric correction
  the pipeline already applied, km/s).
* HDU 1 `COADD`: one row per pixel with `flux` [1e-17 erg/s/cm^2/A], `loglam` (log10 of
  the vacuum wavelength in A), `ivar`, `and_mask`, `or_mask`, `wdisp` (LSF sigma in
  pixels of 1e-4 dex), `sky`, `model`.
* HDU 2 `SPECOBJ`: the pipeline's CLASS, SUBCLASS, Z, Z_ERR, ZWARNING, PLUG_RA/PLUG_DEC...
  kept in `meta["pipeline"]`, never in `meta["labels"]` and never used as input; the
  dust map's E(B-V) (BOSS spAll SFD_EBV, or EBV) where the row has it, as `meta["ebv"]`.
* HDU 3 `SPZLINE` and (full files only) per-exposure HDUs: not read.

Multi-object tables (`specObj`/`spAll`-style rows with PLATE, MJD, FIBERID plus vector
FLUX, LOGLAM or WAVELENGTH, IVAR[, AND_MASK] columns) read one spectrum per row. A
specObj catalogue without spectra is recognised and refused with a message saying so.

Pixels with any `and_mask` bit set (bad in every exposure) get ivar = 0, as specutils
does; `mask_bits=` chooses the bits instead.
"""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np

from cosmofm.data_cards.dust import EBV_KEY, recorded_ebv
from cosmofm.data_cards.errors import InputError
from astropy.io import fits

from cosmofm.data_cards.io.fits_io import parse_unit
from cosmofm.data_cards.readers.common import (
    SKIPPED,
    Flags,
    ReadResult,
    air_to_vacuum,
    choose_card,
    column,
    convert_flux,
    fits_hdus,
    get_hdu,
    hdu_named,
    identifiers_table,
    json_safe,
    open_fits,
    spectrum_sample,
)

FLUX_UNIT = u.Unit("1e-17 erg / (s cm2 Angstrom)")  # the data model's unit when no BUNIT/TUNIT says otherwise
_MARKER = ("sdss-like", "SDSS/BOSS spec file (TELESCOP = 'SDSS 2.5-M', COADD HDU)")
_PIPELINE = ("CLASS", "SUBCLASS", "Z", "Z_ERR", "ZWARNING", "SN_MEDIAN_ALL", "RCHI2")
_DLOGLAM = 1e-4  # BOSS pixel width in log10(lambda)


def sniff_spec(path: Path) -> bool:
    hdus = fits_hdus(path)
    if not hdus:
        return False
    coadd = hdu_named(hdus, "COADD")
    if coadd is not None and coadd.kind == "table" and "LOGLAM" in coadd.columns:
        return True
    primary = hdus[0].header
    # A file that says it is an SDSS fibre spectrum is ours even when its COADD is broken.
    return str(primary.get("TELESCOP", "")).startswith("SDSS") and "FIBERID" in primary and "CFMFMT" not in primary


def sniff_table(path: Path) -> bool:
    hdus = fits_hdus(path)
    return bool(hdus) and hdu_named(hdus, "COADD") is None and any(
        h.kind == "table" and {"PLATE", "MJD", "FIBERID"} <= set(h.columns) for h in hdus
    )


def read_spec(path: Path, card=None, mask_bits: int | None = None, limit: int | None = None) -> ReadResult:
    """One spec / spec-lite file -> one spectrum Sample (plus the pipeline's answers as metadata)."""
    with open_fits(path) as hdul:
        primary = hdul[0].header
        try:
            coadd = hdul["COADD"]
        except KeyError:
            # Files written without EXTNAME still hold the coadd in HDU 1.
            coadd = hdul[1] if len(hdul) > 1 and isinstance(hdul[1], fits.BinTableHDU) and column(hdul[1].data, ["loglam"]) else None
            if coadd is None:
                get_hdu(hdul, "COADD", path, "an SDSS spec/spec-lite file has the coadded spectrum in HDU 1 named COADD; re-download the file")
        where = f"{path}[COADD]"
        data = coadd.data
        cols = {name: column(data, [name]) for name in ("flux", "loglam", "ivar", "and_mask", "wdisp")}
        missing = [n for n in ("flux", "loglam", "ivar") if cols[n] is None]
        if missing:
            raise InputError(where, f"column(s) {missing} missing (has {list(data.columns.names)})", "an SDSS COADD table has flux, loglam, ivar, and_mask, ... columns; re-download the file")
        loglam = np.asarray(data[cols["loglam"]], dtype=np.float64).ravel()
        flux = np.asarray(data[cols["flux"]], dtype=np.float64).ravel()
        ivar = np.asarray(data[cols["ivar"]], dtype=np.float64).ravel()
        and_mask = np.asarray(data[cols["and_mask"]]).ravel() if cols["and_mask"] else None
        wdisp = np.asarray(data[cols["wdisp"]], dtype=np.float64).ravel() if cols["wdisp"] else None
        _same_lengths(where, flux=flux, loglam=loglam, ivar=ivar, and_mask=and_mask)
        flux_unit = parse_unit(coadd.columns[cols["flux"]].unit, f"{where}.{cols['flux']}", None)
        if flux_unit is None:  # the data model puts the unit in the primary header's BUNIT
            flux_unit = parse_unit(primary.get("BUNIT"), f"{path}[PRIMARY].BUNIT", FLUX_UNIT, "BUNIT")
        ivar_unit = parse_unit(coadd.columns[cols["ivar"]].unit, f"{where}.{cols['ivar']}", None)
        specobj = _specobj_row(hdul)

    notes = ["wavelengths = 10**loglam (vacuum, heliocentric as published by the SDSS pipeline)"]
    wave = 10.0**loglam
    if _is_air(primary.get("VACUUM")):
        wave = air_to_vacuum(wave)
        notes[0] = "VACUUM = F: air wavelengths converted to vacuum (Morton 2000)"
    card, reason = choose_card(card, "spectrum", str(path), markers=[_MARKER], coverage=(wave.min(), wave.max()))
    flux, ivar = convert_flux(flux, ivar, flux_unit, card, wave, where, ivar_unit)
    bad = _bad_pixels(and_mask, mask_bits)

    plate = _number(specobj.get("PLATE", primary.get("PLATEID", primary.get("PLATE"))), int)
    mjd = _number(specobj.get("MJD", primary.get("MJD")), int)
    fiber = _number(specobj.get("FIBERID", primary.get("FIBERID")), int)
    sid = f"spec-{plate:04d}-{mjd:05d}-{fiber:04d}" if None not in (plate, mjd, fiber) else path.stem
    ids = {
        "plate": plate, "mjd": mjd, "fiberid": fiber,
        "ra": _number(specobj.get("PLUG_RA", primary.get("PLUG_RA", primary.get("RA")))),
        "dec": _number(specobj.get("PLUG_DEC", primary.get("PLUG_DEC", primary.get("DEC")))),
    }
    meta = {**ids, "format": "sdss-spec", "medium": "vacuum", "frame": "heliocentric", "helio_rv_applied_kms": _number(primary.get("HELIO_RV"))}
    if specobj:
        meta["pipeline"] = {k.lower(): json_safe(specobj[k]) for k in _PIPELINE if k in specobj}
        if "SPECOBJID" in specobj:
            meta["specobjid"] = str(json_safe(specobj["SPECOBJID"]))
        ebv = recorded_ebv(specobj.get("SFD_EBV", specobj.get("EBV")))
        if ebv is not None:
            meta[EBV_KEY] = ebv  # the spAll row's dust-map E(B-V) (data_cards/dust.py)
    if wdisp is not None:
        meta["resolving_power"] = _resolving_power(wdisp, bad)
    flags = Flags()
    sample = spectrum_sample(0, sid, wave, flux, ivar, card, meta, flags, bad=bad)
    result = ReadResult(
        "sdss-spec", path, "spectrum", card, reason, [sample] if sample else [], flags,
        identifiers_table([{"id": sid, "used": sample is not None, **ids}]), notes, n_objects=1,
    )
    return result.require_usable()


def read_table(path: Path, card=None, mask_bits: int | None = None, limit: int | None = None) -> ReadResult:
    """A specObj-style table with one spectrum per row (vector FLUX / LOGLAM / IVAR columns)."""
    hdus = fits_hdus(path) or ()
    info = next(h for h in hdus if h.kind == "table" and {"PLATE", "MJD", "FIBERID"} <= set(h.columns))
    where = f"{path}[{info.name}]"
    with open_fits(path) as hdul:
        hdu = hdul[info.index]
        data = hdu.data
        wave_col = column(data, ["LOGLAM", "WAVELENGTH", "WAVE", "LAMBDA"])
        flux_col, ivar_col = column(data, ["FLUX"]), column(data, ["IVAR", "FLUX_IVAR"])
        if not (wave_col and flux_col and ivar_col):
            missing = [n for n, c in (("FLUX", flux_col), ("LOGLAM or WAVELENGTH", wave_col), ("IVAR", ivar_col)) if c is None]
            raise InputError(where, f"is an SDSS catalogue (PLATE, MJD, FIBERID) without spectra: no {', '.join(missing)} column", "this is a specObj/spAll catalogue; read the spec-lite files of its objects (spec-PLATE-MJD-FIBER.fits) or a table with vector FLUX, LOGLAM, IVAR columns")
        mask_col = column(data, ["AND_MASK", "ANDMASK", "MASK"])
        n_total = len(data)
        n = n_total if limit is None else min(limit, n_total)
        rows = data[:n]
        fixed = {c: hdu.columns[c].format for c in (wave_col, flux_col, ivar_col)}
        repeats = {c: _repeat(f) for c, f in fixed.items()}
        if len({r for r in repeats.values() if r is not None}) > 1:
            raise InputError(where, f"vector columns have different lengths {repeats}", "give FLUX, IVAR and the wavelength column the same number of pixels per row")
        flux_unit = parse_unit(hdu.columns[flux_col].unit, f"{where}.{flux_col}", FLUX_UNIT)
        ivar_unit = parse_unit(hdu.columns[ivar_col].unit, f"{where}.{ivar_col}", None)
        wave_unit = None if wave_col.upper() == "LOGLAM" else parse_unit(hdu.columns[wave_col].unit, f"{where}.{wave_col}", u.AA)
        columns = {c.upper(): c for c in data.columns.names}
        table = {k: rows[c] for k, c in columns.items() if k in ("PLATE", "MJD", "FIBERID", "PLUG_RA", "PLUG_DEC", "RA", "DEC", "SPECOBJID", "SFD_EBV", "EBV", *_PIPELINE)}
        arrays = [(np.asarray(rows[wave_col][i], np.float64), np.asarray(rows[flux_col][i], np.float64), np.asarray(rows[ivar_col][i], np.float64), None if mask_col is None else np.asarray(rows[mask_col][i])) for i in range(n)]

    if wave_col.upper() == "LOGLAM":
        waves = [10.0**np.where(w > 0, w, np.nan) for w, *_ in arrays]  # zero padding -> NaN, trimmed below
    else:
        waves = [(w * wave_unit).to_value(u.AA, equivalencies=u.spectral()) for w, *_ in arrays]
    lo = min((np.nanmin(w) for w in waves if np.isfinite(w).any()), default=3600.0)
    hi = max((np.nanmax(w) for w in waves if np.isfinite(w).any()), default=10400.0)
    card, reason = choose_card(card, "spectrum", f"{where}.{wave_col}", markers=[_MARKER], coverage=(lo, hi), wavelength_unit=wave_unit)
    flags, samples, id_rows = Flags(), [], []
    for i, (wave, (_, flux, ivar, mask)) in enumerate(zip(waves, arrays)):
        ids = {
            "plate": _number(table.get("PLATE", [None] * n)[i], int), "mjd": _number(table.get("MJD", [None] * n)[i], int), "fiberid": _number(table.get("FIBERID", [None] * n)[i], int),
            "ra": _number(table.get("PLUG_RA", table.get("RA", [None] * n))[i]), "dec": _number(table.get("PLUG_DEC", table.get("DEC", [None] * n))[i]),
        }
        sid = f"spec-{ids['plate']:04d}-{ids['mjd']:05d}-{ids['fiberid']:04d}" if None not in (ids["plate"], ids["mjd"], ids["fiberid"]) else f"{path.stem}-{i}"
        if not (len(wave) == len(flux) == len(ivar)):
            flags.add(i, sid, "length_mismatch", f"{sid}: wavelength/flux/ivar lengths {len(wave)}/{len(flux)}/{len(ivar)} differ", SKIPPED)
            id_rows.append({"id": sid, "used": False, **ids})
            continue
        keep = np.isfinite(wave)  # drop zero padding of fixed-width rows
        flux_c, ivar_c = convert_flux(flux[keep], ivar[keep], flux_unit, card, wave[keep], where, ivar_unit)
        meta = {**ids, "format": "sdss-table", "medium": "vacuum", "frame": "heliocentric"}
        pipeline = {k.lower(): json_safe(table[k][i]) for k in _PIPELINE if k in table}
        if pipeline:
            meta["pipeline"] = pipeline
        if "SPECOBJID" in table:
            meta["specobjid"] = str(json_safe(table["SPECOBJID"][i]))
        ebv = recorded_ebv(table.get("SFD_EBV", table.get("EBV", [None] * n))[i])
        if ebv is not None:
            meta[EBV_KEY] = ebv
        bad = None if mask is None else _bad_pixels(mask[keep], mask_bits)
        s = spectrum_sample(i, sid, wave[keep], flux_c, ivar_c, card, meta, flags, bad=bad)
        id_rows.append({"id": sid, "used": s is not None, **ids})
        if s is not None:
            samples.append(s)
    notes = ["one spectrum per row; wavelengths vacuum, heliocentric (SDSS convention)"]
    if n < n_total:
        notes.append(f"read the first {n} of {n_total} rows (limit)")
    return ReadResult("sdss-table", path, "spectrum", card, reason, samples, flags, identifiers_table(id_rows), notes, n_objects=n_total).require_usable()


# ---------------------------------------------------------------------------- helpers


def _specobj_row(hdul) -> dict:
    try:
        so = hdul["SPECOBJ"].data
    except KeyError:
        return {}
    if so is None or len(so) == 0:
        return {}
    return {name.upper(): so[name][0] for name in so.columns.names}


def _bad_pixels(and_mask, mask_bits: int | None):
    if and_mask is None:
        return None
    m = np.asarray(and_mask).astype(np.int64)
    return (m != 0) if mask_bits is None else (m & int(mask_bits)) != 0


def _resolving_power(wdisp: np.ndarray, bad) -> float | None:
    """Median R = lambda / FWHM from wdisp (LSF sigma in pixels of 1e-4 dex)."""
    ok = np.isfinite(wdisp) & (wdisp > 0)
    if bad is not None:
        ok &= ~bad
    if not ok.any():
        return None
    sigma_ln = np.median(wdisp[ok]) * _DLOGLAM * np.log(10)
    return float(round(1.0 / (2.3548 * sigma_ln), 1))


def _same_lengths(where: str, **arrays) -> None:
    lengths = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise InputError(where, f"columns have different lengths {lengths}", "every COADD column needs one value per pixel; re-download the file")


def _repeat(tform: str) -> int | None:
    digits = "".join(ch for ch in str(tform).split("(")[0] if ch.isdigit())
    return None if "P" in str(tform).upper() or "Q" in str(tform).upper() else int(digits or 1)


def _is_air(vacuum) -> bool:
    if vacuum is None:
        return False
    return str(vacuum).strip().upper() in ("F", "FALSE", "0")


def _number(v, cast=float):
    """`cast(v)` of a header / table value, or None when it is missing or not a number."""
    v = json_safe(v)
    try:
        return None if v is None or v == "" else cast(v)
    except (TypeError, ValueError):
        return None

