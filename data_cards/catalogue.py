"""Catalogues for users: one row per object, the input's identifiers carried through, units kept.

    rows = catalogue_rows(result.samples, [{"CLASS": "QSO", "Z": 2.1 * u.dimensionless_unscaled}, ...])
    write_catalogue(rows, "predictions.fits")      # FITS binary table, TUNIT per column
    write_catalogue(rows, "predictions.parquet")   # Parquet, unit in each field's metadata

Identifier columns use the surveys' own names: ID, PLATE, MJD, FIBERID (SDSS), TARGETID
(DESI), OBJECT (ESO), RA and DEC in degrees. A value that is an astropy Quantity keeps its
unit; `units={"Z_ERR": ""}` names the rest. Missing values are masked (FITS TNULL / NaN,
Parquet null). `read_catalogue` reads either back with the units.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Column, MaskedColumn, Table

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample

ID_COLUMNS = {"plate": "PLATE", "mjd": "MJD", "fiberid": "FIBERID", "targetid": "TARGETID", "object": "OBJECT", "ra": "RA", "dec": "DEC"}
DEFAULT_UNITS = {"RA": "deg", "DEC": "deg"}


def catalogue_rows(samples: Iterable[Sample], extra: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per sample: ID, CARD, the identifiers in its meta, then `extra[i]` (predictions)."""
    samples = list(samples)
    if extra is not None and len(extra) != len(samples):
        raise InputError("extra", f"has {len(extra)} rows for {len(samples)} samples", "give one dict of extra columns per sample")
    rows = []
    for i, s in enumerate(samples):
        row: dict[str, Any] = {"ID": s.id, "CARD": s.card}
        row.update({col: s.meta[key] for key, col in ID_COLUMNS.items() if s.meta.get(key) is not None})
        if extra is not None:
            row.update(extra[i])
        rows.append(row)
    return rows


def to_table(rows: Table | Sequence[dict[str, Any]], units: dict[str, str] | None = None) -> Table:
    """Rows (dicts, values may be Quantities) as an astropy Table with units and masks."""
    if isinstance(rows, Table):
        t = rows.copy()
    else:
        rows = list(rows)
        if not rows:
            raise InputError("rows", "is empty", "pass at least one row")
        names: list[str] = []
        for r in rows:
            names += [k for k in r if k not in names]
        t = Table()
        for name in names:
            t[name] = _column([r.get(name) for r in rows], name)
    for name, unit in {**DEFAULT_UNITS, **(units or {})}.items():
        if name in t.colnames and t[name].unit is None:
            try:
                t[name].unit = u.Unit(unit) if unit else None
            except ValueError:
                raise InputError(f"units[{name!r}]", f"{unit!r} is not an astropy unit", "use e.g. 'deg', 'km/s', ''") from None
    return t


def write_catalogue(rows: Table | Sequence[dict[str, Any]], path: str | os.PathLike, units: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write a catalogue to .fits (FITS binary table with TUNITs) or .parquet; atomically."""
    path = Path(path)
    t = to_table(rows, units)
    name = path.name.lower()
    if not path.parent.is_dir():
        raise InputError(str(path), f"folder {path.parent} does not exist", "create the folder first")
    if path.exists() and not overwrite:
        raise InputError(str(path), "already exists", "choose another name or pass overwrite=True")
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        if name.endswith((".fits", ".fit", ".fits.gz")):
            for c in t.colnames:
                if t[c].dtype.kind == "U" and not all(str(v).isascii() for v in t[c]):
                    raise InputError(f"{path}: {c}", "has non-ASCII text", "FITS strings are ASCII; write Parquet instead")
            t.write(tmp, format="fits")
        elif name.endswith(".parquet"):
            pq.write_table(_arrow(t), tmp)
        else:
            raise InputError(str(path), f"suffix {path.suffix!r} is not a catalogue format", "use .fits or .parquet")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_catalogue(path: str | os.PathLike) -> Table:
    """A catalogue written by `write_catalogue`, with units (and masks) restored."""
    path = Path(path)
    if path.name.lower().endswith(".parquet"):
        table = pq.read_table(path)
        t = Table()
        for fld, col in zip(table.schema, table.columns):
            values = col.to_pylist()
            t[fld.name] = _column(values, fld.name)
            unit = (fld.metadata or {}).get(b"unit")
            if unit:
                t[fld.name].unit = unit.decode()
        return t
    return Table.read(path, format="fits")


def _column(values: list, name: str):
    """A (masked) column from Python values; Quantities give the unit, dicts/lists become JSON."""
    unit = next((v.unit for v in values if isinstance(v, u.Quantity)), None)
    if unit is not None:
        values = [None if v is None else (v.to_value(unit) if isinstance(v, u.Quantity) else v) for v in values]
    values = [json.dumps(v) if isinstance(v, (dict, list, tuple)) else (v.item() if isinstance(v, np.generic) else v) for v in values]
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values])
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        data, fill = np.array([bool(v) if v is not None else False for v in values]), False
    elif present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
        data, fill = np.array([int(v) if v is not None else -1 for v in values], dtype=np.int64), -1
    elif present and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present):
        data, fill = np.array([float(v) if v is not None else np.nan for v in values], dtype=np.float64), np.nan
    else:
        data, fill = np.array(["" if v is None else str(v) for v in values]), ""
    if missing.any() and data.dtype.kind != "f":  # floats mark missing values with NaN
        return MaskedColumn(data, name=name, mask=missing, fill_value=fill, unit=unit)
    return Column(data, name=name, unit=unit)


def _arrow(t: Table) -> pa.Table:
    fields, arrays = [], []
    for name in t.colnames:
        col = t[name]
        mask = np.asarray(col.mask) if hasattr(col, "mask") and col.mask is not np.False_ else None
        data = np.asarray(col)
        if data.dtype.kind == "U":
            arr = pa.array(data.tolist(), type=pa.string(), mask=mask)
        else:
            arr = pa.array(data, mask=mask) if mask is not None and mask.any() else pa.array(data)
        meta = {b"unit": col.unit.to_string().encode()} if col.unit is not None else None
        fields.append(pa.field(name, arr.type, metadata=meta))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={b"written_by": b"cosmofm.data_cards.catalogue"}))
