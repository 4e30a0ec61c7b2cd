"""ESO Science Data Product 1D spectra (Phase 3 `SCIENCE.SPECTRUM`), also 4MOST's delivery format.

Data model (ESO SDP standard, ESO-044286, section on 1D spectra):

* primary HDU: header only; PRODCATG = 'SCIENCE.SPECTRUM', ORIGIN = 'ESO', TELESCOP,
  INSTRUME, OBJECT, RA, DEC (deg), SPECSYS (e.g. 'BARYCENT' or 'TOPOCENT'), SPEC_RES
  (resolving power), SNR, WAVELMIN/WAVELMAX (nm), MJD-OBS.
* extension `SPECTRUM` (binary table, VOCLASS 'SPECTRUM v1.0'/'v2.0'): one row per
  spectrum, vector columns WAVE (TUNIT 'nm' or 'Angstrom'; TUCDn 'em.wl' = vacuum,
  'em.wl;obs.atmos' = air), FLUX and ERR (same unit, from TUNIT), optionally
  FLUX_REDUCED / ERR_REDUCED (not flux calibrated) and QUAL (0 = good).

Read: ivar = 1 / ERR^2 (0 where ERR <= 0 or not finite, or QUAL != 0); air wavelengths
are converted to vacuum (Morton 2000); topocentric spectra are moved to the barycentre
when a correction keyword is given, else flagged. When FLUX is absent, FLUX_REDUCED /
ERR_REDUCED are used if their unit converts to the card's flux unit. Multi-row tables
(4MOST) may carry per-row OBJECT / RA / DEC columns.
"""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import parse_unit
from cosmofm.data_cards.readers.common import (
    KEPT,
    SKIPPED,
    Flags,
    ReadResult,
    air_to_vacuum,
    choose_card,
    column,
    convert_flux,
    fits_hdus,
    hdu_named,
    identifiers_table,
    json_safe,
    open_fits,
    spectrum_sample,
    to_barycentric,
    wavelength_in_angstrom,
)


def sniff(path: Path) -> bool:
    hdus = fits_hdus(path)
    if not hdus:
        return False
    if str(hdus[0].header.get("PRODCATG", "")).upper().startswith("SCIENCE.SPECTRUM"):
        return True
    spec = hdu_named(hdus, "SPECTRUM")
    return spec is not None and spec.kind == "table" and "WAVE" in spec.columns


def read(path: Path, card=None, flux_column: str | None = None, wavelength_unit: str | None = None, flux_unit: str | None = None, medium: str | None = None, limit: int | None = None) -> ReadResult:
    """Every row of the SPECTRUM table as one spectrum Sample."""
    hdus = fits_hdus(path) or ()
    info = hdu_named(hdus, "SPECTRUM") or next((h for h in hdus if h.kind == "table" and "WAVE" in h.columns), None)
    if info is None:
        names = [h.name for h in hdus]
        raise InputError(f"{path}[SPECTRUM]", f"HDU SPECTRUM is missing (HDUs: {names})", "an ESO SDP spectrum has its data in a binary-table extension SPECTRUM with WAVE, FLUX, ERR[, QUAL] columns")
    where = f"{path}[{info.name}]"
    primary, ext = hdus[0].header, info.header
    with open_fits(path) as hdul:
        hdu = hdul[info.index]
        data = hdu.data
        if data is None or len(data) == 0:
            raise InputError(where, "has no rows", "an SDP spectrum has one row per spectrum")
        wave_col = column(data, ["WAVE"])
        if flux_column:
            flux_col = column(data, [flux_column])
            err_col = column(data, [flux_column.upper().replace("FLUX", "ERR")])
        else:
            flux_col = column(data, ["FLUX", "FLUX_REDUCED"])
            err_col = column(data, ["ERR", "ERR_REDUCED"] if flux_col and flux_col.upper() == "FLUX" else ["ERR_REDUCED", "ERR"])
        missing = [n for n, c in (("WAVE", wave_col), (flux_column or "FLUX (or FLUX_REDUCED)", flux_col), ("ERR", err_col)) if c is None]
        if missing:
            raise InputError(where, f"column(s) {missing} missing (has {list(data.columns.names)})", "an SDP spectrum needs WAVE, FLUX and ERR columns (QUAL optional)")
        qual_col = column(data, ["QUAL"])
        cols = [c for c in (wave_col, flux_col, err_col, qual_col) if c]
        repeats = {c: _repeat(hdu.columns[c].format) for c in cols}
        if len({r for r in repeats.values() if r is not None}) > 1:
            raise InputError(where, f"columns have different lengths per row {repeats}", "WAVE, FLUX, ERR and QUAL need the same number of elements (NELEM)")
        n_total = len(data)
        n = n_total if limit is None else min(limit, n_total)
        w_unit = _column_unit(hdu, wave_col, where, wavelength_unit, "wavelength_unit", "nm")
        f_unit = _column_unit(hdu, flux_col, where, flux_unit, "flux_unit", "erg / (s cm2 Angstrom)")
        e_unit = parse_unit(hdu.columns[err_col].unit, f"{where}.{err_col}", f_unit)
        try:
            e_scale = float(e_unit.to(f_unit))
        except u.UnitsError:
            raise InputError(f"{where}.{err_col}", f"unit {e_unit.to_string()!r} differs from {flux_col}'s {f_unit.to_string()!r}", "ERR must be in the unit of FLUX") from None
        ucd = str(ext.get(f"TUCD{data.columns.names.index(wave_col) + 1}", "")).strip().lower()
        rows = [(np.asarray(data[wave_col][i], np.float64), np.asarray(data[flux_col][i], np.float64), np.asarray(data[err_col][i], np.float64) * e_scale,
                 None if qual_col is None else np.asarray(data[qual_col][i])) for i in range(n)]
        per_row = {k: np.asarray(data[c][:n]) for k, c in (("object", column(data, ["OBJECT", "OBJ_NAME", "TARGET_NAME", "NAME"])), ("ra", column(data, ["RA"])), ("dec", column(data, ["DEC"]))) if c}

    notes = []
    if medium is None:
        if "obs.atmos" in ucd:
            medium, how = "air", f"TUCD of WAVE = {ucd!r}"
        elif ucd.startswith("em.wl"):
            medium, how = "vacuum", f"TUCD of WAVE = {ucd!r}"
        else:
            medium, how = None, "no TUCD for WAVE"
    else:
        how = "medium option"
    lo_hi = [wavelength_in_angstrom(w[np.isfinite(w)], w_unit, f"{where}.{wave_col}") for w, *_ in rows]
    lo = min((x.min() for x in lo_hi if x.size), default=3700.0)
    hi = max((x.max() for x in lo_hi if x.size), default=9500.0)
    instrume = str(primary.get("INSTRUME", "")).strip()
    markers = []
    if "4MOST" in instrume.upper():
        # The HRS windows lie inside 3926-6790 A; anything wider is LRS.
        hrs = lo >= 3900 and hi <= 6800
        markers = [("4most-hrs" if hrs else "4most-lrs", f"INSTRUME = {instrume!r}, {lo:.0f}-{hi:.0f} A ({'HRS' if hrs else 'LRS'} range)")]
    card, reason = choose_card(card, "spectrum", f"{where}.{wave_col}", markers=markers, coverage=(lo, hi), wavelength_unit=w_unit)
    if medium is None:
        medium, how = card.medium, f"no TUCD for WAVE; the card's medium ({card.medium}) assumed"
    notes.append(f"wavelengths in {medium} ({how})" + ("; converted to vacuum (Morton 2000)" if medium == "air" else ""))
    specsys = ext.get("SPECSYS", primary.get("SPECSYS"))

    base = {k: json_safe(primary[k]) for k in ("TELESCOP", "INSTRUME", "PRODCATG", "SPEC_RES", "SNR", "MJD-OBS", "FLUXCAL") if k in primary}
    flags, samples, id_rows = Flags(), [], []
    for i, (wave, flux, err, qual) in enumerate(rows):
        obj = str(json_safe(per_row["object"][i])) if "object" in per_row else str(primary.get("OBJECT", "")).strip()
        sid = (obj or path.stem) if n_total == 1 else f"{obj or path.stem}-{i}"
        ids = {
            "object": obj or None,
            "ra": float(per_row["ra"][i]) if "ra" in per_row else _float(primary.get("RA")),
            "dec": float(per_row["dec"][i]) if "dec" in per_row else _float(primary.get("DEC")),
        }
        if not (len(wave) == len(flux) == len(err)) or (qual is not None and len(qual) != len(wave)):
            flags.add(i, sid, "length_mismatch", f"{sid}: WAVE/FLUX/ERR lengths {len(wave)}/{len(flux)}/{len(err)} differ", SKIPPED)
            id_rows.append({"id": sid, "used": False, **ids})
            continue
        wave_a = wavelength_in_angstrom(wave, w_unit, f"{where}.{wave_col}")
        if medium == "air":
            wave_a = air_to_vacuum(wave_a)
        wave_a, frame, problem = to_barycentric(wave_a, specsys, [ext, primary])
        if problem:
            flags.add(i, sid, "topocentric", f"{sid}: {problem}", KEPT)
        ok = np.isfinite(err) & (err > 0)
        ivar = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
        flux_c, ivar_c = convert_flux(flux, ivar, f_unit, card, wave_a, f"{where}.{flux_col}")
        meta = {**ids, "format": "eso-sdp", "medium": "vacuum", "frame": frame, "flux_column": flux_col, **{k.lower().replace("-", "_"): v for k, v in base.items()}}
        if "SPEC_RES" in base:
            meta["resolving_power"] = base["SPEC_RES"]
        s = spectrum_sample(i, sid, wave_a, flux_c, ivar_c, card, meta, flags, bad=None if qual is None else qual != 0)
        id_rows.append({"id": sid, "used": s is not None, **ids})
        if s is not None:
            samples.append(s)
    if n < n_total:
        notes.append(f"read the first {n} of {n_total} rows (limit)")
    return ReadResult("eso-sdp", path, "spectrum", card, reason, samples, flags, identifiers_table(id_rows), notes, n_objects=n_total).require_usable()


def _column_unit(hdu, col: str, where: str, option: str | None, option_name: str, example: str) -> u.UnitBase:
    """TUNIT of `col`, or the option; an InputError naming both when neither says."""
    unit = parse_unit(hdu.columns[col].unit, f"{where}.{col}", None)
    if option is not None:
        unit = parse_unit(option, option_name, None, "option")
    if unit is None:
        raise InputError(f"{where}.{col}", "has no TUNIT", f"the SDP standard requires TUNIT; pass {option_name}='{example}' if you know it")
    return unit


def _repeat(tform: str) -> int | None:
    t = str(tform).upper()
    if "P" in t or "Q" in t:
        return None  # variable-length arrays: checked per row
    digits = "".join(ch for ch in t.split("(")[0] if ch.isdigit())
    return int(digits or 1)


def _float(v):
    v = json_safe(v)
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None
