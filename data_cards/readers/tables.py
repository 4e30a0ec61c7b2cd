"""Plain spectrum tables: FITS binary tables, Parquet and CSV/ECSV with wavelength, flux and
error (or ivar) columns.

Two layouts are understood:

* long: one row per pixel (scalar columns); one spectrum per file, or one per value of an
  id column (`id`, `object_id`, `targetid`, `object`, `name`, `specid`);
* wide: one row per spectrum, array-valued columns (FITS vector columns, Parquet lists).

Columns are found by name (case-insensitive; `columns={"wavelength": "lam_vac", ...}`
overrides). Units come from the column metadata: FITS TUNIT, Parquet field metadata
`unit` (or astropy's table_meta_yaml), the ECSV header, or a CSV header written as
`wave [nm]` / `wave (nm)`; `wavelength_unit=` and `flux_unit=` supply them otherwise. A
column named `loglam` is log10(wavelength / Angstrom) as in SDSS. Without any unit the
reader refuses the file and says which option to pass: a guessed flux unit is a silent
factor of 1e17. Wavelengths are taken to be in the card's medium unless `medium=` says
otherwise; air is converted to vacuum (Morton 2000).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Table

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import parse_unit
from cosmofm.data_cards.readers.common import (
    SKIPPED,
    Flags,
    ReadResult,
    air_to_vacuum,
    choose_card,
    convert_flux,
    fits_hdus,
    identifiers_table,
    json_safe,
    open_fits,
    spectrum_sample,
    wavelength_in_angstrom,
)

ROLES: dict[str, tuple[str, ...]] = {
    "wavelength": ("wavelength", "wave", "lambda", "lam", "wl", "wavelength_vac", "wavelength_air", "loglam"),
    "flux": ("flux", "f_lambda", "flam", "flux_density", "fnu", "f_nu", "spectrum"),
    "error": ("error", "err", "flux_err", "flux_error", "sigma", "uncertainty", "noise", "e_flux", "fluxerr", "stddev"),
    "ivar": ("ivar", "inverse_variance", "flux_ivar", "invvar", "weight"),
    "mask": ("mask", "qual", "quality", "and_mask", "bad", "flag", "flags"),
    "id": ("id", "object_id", "objid", "targetid", "object", "name", "specid", "source_id"),
    "ra": ("ra", "target_ra", "ra_deg"),
    "dec": ("dec", "target_dec", "dec_deg"),
}
SUFFIXES = (".csv", ".ecsv", ".parquet", ".pq", ".txt", ".dat")
_HEADER_UNIT = re.compile(r"^\s*(?P<name>[^\[\(]+?)\s*(?:\[(?P<u1>[^\]]+)\]|\((?P<u2>.+)\))\s*$")  # "wave [nm]" or "wave (nm)"


def sniff(path: Path) -> bool:
    if path.suffix.lower() in SUFFIXES or path.name.lower().endswith(".csv.gz"):
        return path.is_file()
    hdus = fits_hdus(path)
    return bool(hdus) and any(h.kind == "table" and _find(h.columns, "flux") for h in hdus)


def read(path: Path, card=None, columns: dict[str, str] | None = None, wavelength_unit: str | None = None, flux_unit: str | None = None, medium: str | None = None, limit: int | None = None) -> ReadResult:
    """The spectra in a plain table, on their own wavelength grids."""
    cols, where = _load(path)
    names = list(cols)
    role = {r: _find(names, r, (columns or {}).get(r)) for r in ROLES}
    if columns:
        unknown = {r: c for r, c in columns.items() if r not in ROLES or c not in cols}
        if unknown:
            raise InputError(f"{where}: columns option", f"{unknown} are not (role, column) pairs of this table (roles {list(ROLES)}, columns {names})", "map a role to one of the table's columns")
    missing = [r for r in ("wavelength", "flux") if role[r] is None]
    if role["error"] is None and role["ivar"] is None:
        missing.append("error or ivar")
    if missing:
        raise InputError(where, f"no {' / '.join(missing)} column found (columns: {names})", "name them e.g. wavelength, flux, error (or ivar), or pass columns={'wavelength': ..., 'flux': ..., 'error': ...}")

    w_name, f_name = role["wavelength"], role["flux"]
    loglam = w_name.lower() == "loglam"
    w_unit = u.AA if loglam else _unit(cols, w_name, where, wavelength_unit, "wavelength_unit", "Angstrom")
    f_unit = _unit(cols, f_name, where, flux_unit, "flux_unit", "1e-17 erg / (s cm2 Angstrom)")
    e_name, i_name = role["error"], role["ivar"]
    if e_name:
        e_unit = parse_unit(cols[e_name][1], f"{where}.{e_name}", f_unit)
        try:
            e_scale = float(e_unit.to(f_unit))
        except u.UnitsError:
            raise InputError(f"{where}.{e_name}", f"unit {e_unit.to_string()!r} differs from {f_name}'s {f_unit.to_string()!r}", "give the error in the flux unit") from None
        i_unit = None
    else:
        e_scale = None
        i_unit = parse_unit(cols[i_name][1], f"{where}.{i_name}", None)

    spectra = _spectra(cols, role, where, limit)
    coverage = [wavelength_in_angstrom(10.0 ** s["wave"] if loglam else s["wave"], w_unit, f"{where}.{w_name}") for s in spectra]
    finite = [c[np.isfinite(c)] for c in coverage]
    lo = min((c.min() for c in finite if c.size), default=0.0)
    hi = max((c.max() for c in finite if c.size), default=1.0)
    card, reason = choose_card(card, "spectrum", f"{where}.{w_name}", coverage=(lo, hi), wavelength_unit=None if loglam else w_unit)
    medium = medium or card.medium
    notes = [f"wavelength column {w_name!r} ({'log10 Angstrom' if loglam else w_unit.to_string()}), flux {f_name!r} ({f_unit.to_string()}), {'error ' + repr(e_name) if e_name else 'ivar ' + repr(i_name)}",
             f"wavelengths taken as {medium}" + (" and converted to vacuum (Morton 2000)" if medium == "air" else "")]

    flags, samples, id_rows = Flags(), [], []
    for i, (s, wave) in enumerate(zip(spectra, coverage)):
        sid = s["id"] or (path.stem if len(spectra) == 1 else f"{path.stem}-{i}")
        ids = {"object": s["id"] or None, "ra": s.get("ra"), "dec": s.get("dec")}
        if not (len(s["wave"]) == len(s["flux"]) == len(s["noise"])):
            flags.add(i, sid, "length_mismatch", f"{sid}: wavelength/flux/error lengths {len(s['wave'])}/{len(s['flux'])}/{len(s['noise'])} differ", SKIPPED)
            id_rows.append({"id": sid, "used": False, **ids})
            continue
        if medium == "air":
            wave = air_to_vacuum(wave)
        noise = np.asarray(s["noise"], dtype=np.float64)
        if e_scale is not None:
            err = noise * e_scale
            ok = np.isfinite(err) & (err > 0)
            ivar = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
        else:
            ivar = noise
        flux, ivar = convert_flux(s["flux"], ivar, f_unit, card, wave, f"{where}.{f_name}", i_unit)
        bad = None if s.get("mask") is None else np.asarray(s["mask"]) != 0
        if s["long"]:  # rows of a long table need not be in wavelength order
            order = np.argsort(wave, kind="stable")
            wave, flux, ivar = wave[order], flux[order], ivar[order]
            bad = None if bad is None else bad[order]
        meta = {k: v for k, v in ids.items() if v is not None}
        meta.update({"format": "table", "medium": "vacuum", "frame": "unknown"})
        sample = spectrum_sample(i, sid, wave, flux, ivar, card, meta, flags, bad=bad)
        id_rows.append({"id": sid, "used": sample is not None, **ids})
        if sample is not None:
            samples.append(sample)
    return ReadResult("table", path, "spectrum", card, reason, samples, flags, identifiers_table(id_rows), notes, n_objects=len(spectra)).require_usable()


# ---------------------------------------------------------------------------- loading


def _load(path: Path) -> tuple[dict[str, tuple[Any, str | None]], str]:
    """{column: (values, unit text or None)} and a `where` naming file (and HDU)."""
    suffix = path.suffix.lower()
    # Errors name "file[table].column", like "file[HDU].column" for FITS.
    if suffix in (".parquet", ".pq"):
        return _load_parquet(path), f"{path}[table]"
    if suffix in (".csv", ".ecsv", ".txt", ".dat", ".gz"):
        return _load_ascii(path), f"{path}[table]"
    hdus = fits_hdus(path) or ()
    info = next((h for h in hdus if h.kind == "table" and _find(h.columns, "flux")), None) or next((h for h in hdus if h.kind == "table"), None)
    if info is None:
        raise InputError(str(path), f"has no table HDU (HDUs: {[h.name for h in hdus]})", "give a FITS binary table with wavelength, flux and error columns")
    with open_fits(path) as hdul:
        hdu = hdul[info.index]
        data = hdu.data
        cols = {c.name: (np.array(data[c.name]), c.unit) for c in hdu.columns}
    return cols, f"{path}[{info.name}]"


def _load_parquet(path: Path) -> dict:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(str(path), f"is not a readable Parquet file ({e})", "re-write it (e.g. with pandas or pyarrow)") from None
    yaml_units = _astropy_yaml_units(table.schema)
    cols = {}
    for fld, col in zip(table.schema, table.columns):
        unit = (fld.metadata or {}).get(b"unit")
        unit = unit.decode() if unit is not None else yaml_units.get(fld.name)
        if pa.types.is_list(fld.type) or pa.types.is_large_list(fld.type) or pa.types.is_fixed_size_list(fld.type):
            values = _split_lists(col.combine_chunks())
        else:
            values = col.to_numpy(zero_copy_only=False)
        cols[fld.name] = (values, unit)
    return cols


def _split_lists(arr) -> list[np.ndarray]:
    """A list-typed Arrow column as one float64 array per row (nulls -> empty), without Python lists."""
    if pa.types.is_fixed_size_list(arr.type):
        flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        return list(flat.reshape(len(arr), arr.type.list_size))
    offsets = arr.offsets.to_numpy()
    flat = arr.values.to_numpy(zero_copy_only=False).astype(np.float64)
    valid = np.asarray(arr.is_valid())
    return [flat[offsets[i] : offsets[i + 1]] if valid[i] else np.zeros(0) for i in range(len(arr))]


def _astropy_yaml_units(schema: pa.Schema) -> dict[str, str]:
    """Units astropy writes into Parquet schema metadata (table_meta_yaml)."""
    raw = (schema.metadata or {}).get(b"table_meta_yaml")
    if not raw:
        return {}
    from astropy.table import meta

    try:
        header = meta.get_header_from_yaml(raw.decode().splitlines())
    except Exception:  # noqa: BLE001 - foreign metadata is optional; never fail on it
        return {}
    return {d["name"]: str(d["unit"]) for d in header.get("datatype", []) if d.get("unit")}


def _load_ascii(path: Path) -> dict:
    with open(path, "rt", errors="replace") as f:
        first = f.readline()
    fmt = "ascii.ecsv" if first.startswith("# %ECSV") else ("ascii.csv" if path.suffix.lower() in (".csv", ".gz") else "ascii")
    try:
        t = Table.read(path, format=fmt)
    except Exception as e:  # noqa: BLE001 - astropy's ascii readers raise many types
        raise InputError(str(path), f"could not be read as a table ({type(e).__name__}: {str(e)[:200]})", "write a CSV with a header line (wavelength,flux,error)") from None
    cols = {}
    for name in t.colnames:
        unit = None if t[name].unit is None else t[name].unit.to_string()
        m = _HEADER_UNIT.match(name)
        if m and unit is None:
            name_clean, unit = m.group("name").strip(), (m.group("u1") or m.group("u2")).strip()
        else:
            name_clean = name
        cols[name_clean] = (np.asarray(t[name]), unit)
    return cols


def _find(names, role: str, override: str | None = None) -> str | None:
    if override:
        return override if override in names else None
    by_lower = {n.lower(): n for n in names}
    return next((by_lower[c] for c in ROLES[role] if c in by_lower), None)


def _unit(cols: dict, name: str, where: str, option: str | None, option_name: str, example: str) -> u.UnitBase:
    if option is not None:
        return parse_unit(option, option_name, None, "option")
    unit = parse_unit(cols[name][1], f"{where}.{name}", None, "unit")
    if unit is None:
        raise InputError(f"{where}.{name}", "has no unit in the file's column metadata", f"pass {option_name}='{example}' (or write the unit into the table: TUNIT, Parquet field metadata, ECSV, or a 'name [unit]' CSV header)")
    return unit


def _spectra(cols: dict, role: dict, where: str, limit: int | None) -> list[dict]:
    """Split the columns into spectra: wide (array cells) or long (rows = pixels)."""
    flux = cols[role["flux"]][0]
    noise_name = role["error"] or role["ivar"]
    wide = (isinstance(flux, list)) or (isinstance(flux, np.ndarray) and (flux.ndim == 2 or flux.dtype == object))
    get = lambda r: None if role[r] is None else cols[role[r]][0]  # noqa: E731
    if wide:
        n = len(flux) if limit is None else min(limit, len(flux))
        out = []
        for i in range(n):
            out.append({
                "wave": np.asarray(get("wavelength")[i], dtype=np.float64).ravel(),
                "flux": np.asarray(flux[i], dtype=np.float64).ravel(),
                "noise": np.asarray(cols[noise_name][0][i], dtype=np.float64).ravel(),
                "mask": None if get("mask") is None else np.asarray(get("mask")[i]).ravel(),
                "id": None if get("id") is None else str(json_safe(get("id")[i])),
                "ra": None if get("ra") is None else float(get("ra")[i]),
                "dec": None if get("dec") is None else float(get("dec")[i]),
                "long": False,
            })
        return out
    lengths = {r: len(cols[role[r]][0]) for r in ("wavelength", "flux") if role[r]} | {noise_name: len(cols[noise_name][0])}
    if len(set(lengths.values())) > 1:
        raise InputError(where, f"columns have different lengths {lengths}", "give one wavelength, flux and error per row")
    ids = get("id")
    groups = [(None, np.arange(len(flux)))] if ids is None else [(str(json_safe(k)), np.flatnonzero(np.asarray(ids) == k)) for k in dict.fromkeys(np.asarray(ids).tolist())]
    if limit is not None:
        groups = groups[:limit]
    out = []
    for key, rows in groups:
        out.append({
            "wave": np.asarray(get("wavelength")[rows], dtype=np.float64),
            "flux": np.asarray(flux[rows], dtype=np.float64),
            "noise": np.asarray(cols[noise_name][0][rows], dtype=np.float64),
            "mask": None if get("mask") is None else np.asarray(get("mask")[rows]),
            "id": key,
            "ra": None if get("ra") is None else float(np.asarray(get("ra")[rows])[0]),
            "dec": None if get("dec") is None else float(np.asarray(get("dec")[rows])[0]),
            "long": True,
        })
    return out
