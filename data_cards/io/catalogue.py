"""Catalogues for users: one row per object, the input's identifiers carried through, units kept.

    rows = catalogue_rows(result.samples, [{"CLASS": "QSO", "Z": 2.1 * u.dimensionless_unscaled}, ...])
    write_catalogue(rows, "predictions.fits")      # FITS binary table, TUNIT per column
    write_catalogue(rows, "predictions.parquet")   # Parquet, unit in each field's metadata
    with CatalogueWriter("big.parquet") as out:    # piece by piece, for any number of rows
        for piece in pieces:
            out.add(piece)

Identifier columns use the surveys' own names: ID, PLATE, MJD, FIBERID (SDSS), TARGETID
(DESI), OBJECT (ESO), RA and DEC in degrees. A value that is an astropy Quantity keeps its
unit; `units={"Z_ERR": ""}` names the rest ("" is dimensionless: an empty TUNIT in FITS,
an empty unit in Parquet's field metadata). Missing values are masked (FITS TNULL / NaN,
Parquet null). `read_catalogue` reads either back with the units.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
from astropy.table import Column, MaskedColumn, Table

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample

try:
    import fcntl
except ImportError:  # Windows: spools are not locked (see _locked_spool)
    fcntl = None

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
        t = rows.copy(copy_data=False)  # new columns (units set below stay ours), the caller's data
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
                t[name].unit = u.Unit(unit)  # "": dimensionless
            except ValueError:
                raise InputError(f"units[{name!r}]", f"{unit!r} is not an astropy unit", "use e.g. 'deg', 'km/s', ''") from None
    return t


def write_catalogue(rows: Table | Sequence[dict[str, Any]], path: str | os.PathLike, units: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write a catalogue to .fits (FITS binary table with TUNITs) or .parquet; atomically.
    For one piece at a time (any number of rows), use `CatalogueWriter`."""
    with CatalogueWriter(path, units=units, overwrite=overwrite) as out:
        out.add(rows)
    return out.path


def catalogue_format(path: str | os.PathLike) -> str:
    """"fits" or "parquet", from the file name; InputError for any other suffix."""
    name = Path(path).name.lower()
    if name.endswith((".fits", ".fit")):
        return "fits"
    if name.endswith(".parquet"):
        return "parquet"
    raise InputError(str(path), f"suffix {Path(path).suffix!r} is not a catalogue format", "use .fits or .parquet")


class CatalogueWriter:
    """A catalogue written piece by piece, in memory bounded by one piece, for any number of rows.

        with CatalogueWriter("predictions.fits", order=["ID", "CLASS", "Z"]) as out:
            for piece in pieces:  # Tables or row dicts; a piece may lack some columns
                out.add(piece)
        # the file appears on leaving the block (temp file + rename), never half-written

    Each piece is spooled as an Arrow file in a hidden folder beside the output, locked
    while the writer lives (a new writer of the same output removes the spools killed
    runs left, `remove_stale_spools`). On close
    the columns of all pieces are merged (a column a piece lacks is null there: NaN for
    floats; an int column that meets floats becomes float), then the pieces are streamed
    into the output one at a time: Parquet row groups, or the rows of a FITS binary table
    whose header (string widths, TNULLs, units) is known by then.
    """

    def __init__(self, path: str | os.PathLike, units: dict[str, str] | None = None, order: Sequence[str] = (), overwrite: bool = True):
        self.path, self.units, self.order = Path(path), units, list(order)
        self.fits = catalogue_format(self.path) == "fits"
        if not self.path.parent.is_dir():
            raise InputError(str(self.path), f"folder {self.path.parent} does not exist", "create the folder first")
        if self.path.exists() and not overwrite:
            raise InputError(str(self.path), "already exists", "choose another name or pass overwrite=True")
        remove_stale_spools(self.path)
        self.spool, self._lock = _locked_spool(self.path)
        self.parts: list[Path] = []
        self.fields: dict[str, pa.Field] = {}  # merged over the pieces, in first-seen order
        self.nulls: set[str] = set()  # columns with a null somewhere
        self.pieces_with: dict[str, int] = {}  # column -> pieces that have it (fewer than all: nulls)
        self.widths: dict[str, int] = {}  # bytes of the longest string per text column (FITS nA)
        self.n_rows = 0

    def add(self, rows: Table | Sequence[dict[str, Any]]) -> None:
        """Spool one piece (an astropy Table, or row dicts as `write_catalogue` takes)."""
        piece = _arrow(to_table(rows, self.units))
        for fld, col in zip(piece.schema, piece.columns):
            known = self.fields.get(fld.name)
            self.fields[fld.name] = fld if known is None else known.with_type(_merged_type(known.type, fld.type, fld.name))
            self.pieces_with[fld.name] = self.pieces_with.get(fld.name, 0) + 1
            if col.null_count:
                self.nulls.add(fld.name)
            if pa.types.is_string(fld.type) or pa.types.is_binary(fld.type):
                if self.fits and pa.types.is_string(fld.type) and pc.all(pc.string_is_ascii(col)).as_py() is False:
                    raise InputError(f"{self.path}: {fld.name}", "has non-ASCII text", "FITS strings are ASCII; write Parquet instead")
                longest = pc.max(pc.binary_length(col)).as_py() or 0
                self.widths[fld.name] = max(self.widths.get(fld.name, 1), longest)
        self.parts.append(self.spool / f"part-{len(self.parts):06d}.arrow")
        feather.write_feather(piece, self.parts[-1], compression="uncompressed")
        self.n_rows += piece.num_rows

    def close(self) -> Path:
        """Merge the pieces into the output file (atomically); remove the spool."""
        if not self.parts:
            self.abort()
            raise InputError("rows", "is empty", "pass at least one row")
        names = [c for c in self.order if c in self.fields] + [c for c in self.fields if c not in self.order]
        schema = pa.schema([self.fields[c] for c in names], metadata={b"written_by": b"cosmofm.data_cards.io.catalogue"})
        self.nulls |= {c for c in names if self.pieces_with[c] < len(self.parts)}  # null in the pieces that lack it
        tmp = self.spool / f"{self.path.name}.tmp"  # in the spool: a run killed while merging leaves nothing beside it
        try:
            pieces = (_conform(feather.read_table(p), schema) for p in self.parts)
            if self.fits:
                _write_fits_rows(tmp, schema, pieces, self.n_rows, self.widths, self.nulls)
            else:
                with pq.ParquetWriter(tmp, schema) as writer:
                    for group in _row_groups(pieces, ROW_GROUP):
                        writer.write_table(group)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
            self.abort()
        return self.path

    def abort(self) -> None:
        """Drop the spooled pieces (the output file is not touched)."""
        shutil.rmtree(self.spool, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    def __enter__(self) -> "CatalogueWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


SPOOL_LOCK = "lock"  # the file in a spool its writer holds an exclusive lock on while alive


def _spools(path: Path) -> list[Path]:
    """Spool folders of catalogues written to `path` (live or left by a killed run)."""
    name = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.parts")
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*.parts") if name.fullmatch(p.name))


def _locked_spool(path: Path):
    """A new spool folder for `path`, with its lock held: (folder, open lock file or None).

    The folder is made and locked under a name `remove_stale_spools` ignores, then renamed
    into place, so no spool is ever seen without its lock. Without fcntl (Windows) there
    is no lock, and spools are never removed by another run."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent))
    lock = None
    if fcntl is not None:
        lock = open(staging / SPOOL_LOCK, "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: never held
    spool = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.parts"
    staging.rename(spool)
    return spool, lock


def remove_stale_spools(path: str | os.PathLike) -> list[Path]:
    """Remove the spool folders a killed run writing `path` left behind; returns them.

    A spool is stale when no process holds the lock on its lock file (the writer holds it
    while alive; a killed process's locks go with it) or it has none (a spool of an older
    cosmofm). Spools of other outputs are never touched."""
    if fcntl is None:
        return []
    removed = []
    for spool in _spools(Path(path)):
        try:
            lock = open(spool / SPOOL_LOCK, "r+")
        except FileNotFoundError:
            lock = None
        except OSError:
            continue  # not ours to judge (permissions, a vanished folder)
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        finally:
            if lock is not None:
                lock.close()
        shutil.rmtree(spool, ignore_errors=True)
        removed.append(spool)
    return removed


ROW_GROUP = 65536  # rows per Parquet row group: pieces of ~1,000 rows are gathered up to this


def _row_groups(pieces: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Consecutive pieces concatenated into tables of at least `size` rows (the last may be shorter)."""
    held: list[pa.Table] = []
    rows = 0
    for piece in pieces:
        held.append(piece)
        rows += piece.num_rows
        if rows >= size:
            yield pa.concat_tables(held)
            held, rows = [], 0
    if held:
        yield pa.concat_tables(held)


def _merged_type(a: pa.DataType, b: pa.DataType, name: str) -> pa.DataType:
    """One type for a column seen as `a` in some pieces and `b` in others."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(a) for f in numeric) and any(f(b) for f in numeric):
        return pa.float64()
    raise InputError(f"catalogue column {name}", f"is {a} in one piece and {b} in another", "give the column one type in every piece")


def _conform(piece: pa.Table, schema: pa.Schema) -> pa.Table:
    """`piece` with `schema`'s columns: missing ones null (NaN for floats), types cast."""
    columns = []
    for fld in schema:
        if fld.name in piece.column_names:
            col = piece.column(fld.name)
            col = col.cast(fld.type) if col.type != fld.type else col
        else:
            col = pa.nulls(piece.num_rows, fld.type)
        if pa.types.is_floating(fld.type) and col.null_count:  # floats mark missing values with NaN
            col = pc.fill_null(col, float("nan"))
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


INT_NULL = np.iinfo(np.int64).min  # TNULL of integer FITS columns: no survey identifier takes it


def _write_fits_rows(path: Path, schema: pa.Schema, pieces: Iterable[pa.Table], n_rows: int, widths: dict[str, int], nulls: set[str]) -> None:
    """A FITS file (empty primary HDU + one binary table) streamed piece by piece.

    astropy builds the header from column definitions; the rows are packed big-endian
    records, written as they come, padded to the 2880-byte block at the end."""
    from astropy.io import fits

    columns, dtypes = [], []
    for fld in schema:
        unit = (fld.metadata or {}).get(b"unit")
        if pa.types.is_string(fld.type) or pa.types.is_binary(fld.type):
            form, dtype, null = f"{widths[fld.name]}A", f"S{widths[fld.name]}", None
        elif pa.types.is_boolean(fld.type):
            form, dtype, null = "L", "S1", None  # T / F / NUL for null
        elif pa.types.is_floating(fld.type):
            form, dtype, null = ("E", ">f4", None) if fld.type.bit_width == 32 else ("D", ">f8", None)
        elif pa.types.is_integer(fld.type):
            form, dtype, null = "K", ">i8", INT_NULL if fld.name in nulls else None
        else:
            raise InputError(f"catalogue column {fld.name}", f"has type {fld.type}", "give numbers, text or booleans")
        columns.append(fits.Column(name=fld.name, format=form, null=null, unit=_fits_unit(unit.decode()) if unit else None))
        dtypes.append((fld.name, dtype))
    header = fits.BinTableHDU.from_columns(columns, nrows=0).header
    header["NAXIS2"] = n_rows
    for i, fld in enumerate(schema, start=1):
        if (fld.metadata or {}).get(b"unit") == b"":  # dimensionless: an empty TUNIT says so (read_catalogue)
            header[f"TUNIT{i}"] = ""
    record = np.dtype(dtypes)
    if record.itemsize != header["NAXIS1"]:
        raise RuntimeError(f"FITS row of {header['NAXIS1']} bytes, packed {record.itemsize}")  # a bug of ours, not of the input
    written = 0
    with open(path, "wb") as f:
        f.write(fits.PrimaryHDU().header.tostring().encode("ascii"))
        f.write(header.tostring().encode("ascii"))
        for piece in pieces:
            rows = np.empty(piece.num_rows, record)
            for fld, col in zip(schema, piece.columns):
                rows[fld.name] = _fits_values(col, fld.type)
            f.write(rows.tobytes())
            written += piece.num_rows
        f.write(b"\0" * (-(written * record.itemsize) % 2880))
    if written != n_rows:
        raise RuntimeError(f"wrote {written} FITS rows of {n_rows}")


def _fits_unit(unit: str) -> str:
    """A unit string in the FITS standard's spelling where it has one (km s-1 for km / s)."""
    try:
        return u.Unit(unit).to_string(format="fits")
    except ValueError:
        return unit


def _fits_values(col: pa.ChunkedArray, kind: pa.DataType) -> np.ndarray:
    """A column's values as FITS stores them: ASCII bytes, T/F/NUL, NaN or INT_NULL for null."""
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        return pc.fill_null(col, "" if pa.types.is_string(kind) else b"").to_numpy(zero_copy_only=False).astype(bytes)
    if pa.types.is_boolean(kind):
        return np.array([b"\0" if v is None else b"T" if v else b"F" for v in col.to_pylist()], dtype="S1")
    if pa.types.is_integer(kind):
        return pc.fill_null(col, INT_NULL).to_numpy()
    return col.to_numpy()


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
            if unit is not None:  # b"": dimensionless
                t[fld.name].unit = u.Unit(unit.decode())
        return t
    t = Table.read(path, format="fits")
    from astropy.io import fits

    header = fits.getheader(path, 1)
    for i, name in enumerate(t.colnames, start=1):  # an empty TUNIT: dimensionless (CatalogueWriter writes it)
        if header.get(f"TUNIT{i}") == "" and t[name].unit is None:
            t[name].unit = u.dimensionless_unscaled
    return t


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
    """`t` as an Arrow table: text as strings, masks as nulls, units in each field's metadata."""
    fields, arrays = [], []
    for name in t.colnames:
        col = t[name]
        mask = np.asarray(col.mask) if hasattr(col, "mask") and col.mask is not np.False_ else None
        data = np.asarray(col)
        if data.dtype.byteorder == ">":  # columns of a table read from FITS
            data = data.astype(data.dtype.newbyteorder("="))
        if data.dtype.kind in "US":
            arr = pa.array(data.astype(str), type=pa.string(), mask=mask)
        else:
            arr = pa.array(data, mask=mask) if mask is not None and mask.any() else pa.array(data)
        meta = {b"unit": col.unit.to_string().encode()} if col.unit is not None else None
        fields.append(pa.field(name, arr.type, metadata=meta))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={b"written_by": b"cosmofm.data_cards.io.catalogue"}))
