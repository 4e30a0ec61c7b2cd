"""FITS reader and writer for `Sample`s: one binary table of same-shape samples per file.

File layout (format version 1, header key CFMFMT):

* primary HDU: header keys CARD (the data card's name), MODALITY, CFMFMT.
* a BinTableHDU named "SAMPLES", one row per sample:
  ID (string), VALUES and IVAR (float32 vectors with TDIM = the sample shape),
  one float64 vector column per axis of AXES[modality] (name = axis upper-cased,
  TUNIT = COORD_UNITS[axis]), PAIR_ID (string, "" if none) and META (the rest of
  `sample.meta` as JSON, e.g. labels).

VALUES carries the card's data unit as TUNIT (see `data_unit`). On reading, VALUES and
the coordinates are converted with astropy from whatever TUNIT the file has to the
card's units, so files written by other tools work as long as their units are
physical. Every failure while reading is an `InputError` naming the file and the
HDU/column, never a raw astropy or numpy traceback.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

import astropy.units as u
import numpy as np
from astropy.io import fits

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import AXES, COORD_UNITS, RowError, Sample, mask_invalid, validate
from cosmofm.data_cards.schema import CubeCard, DataCard, FieldCard, ImageCard, SpectrumCard, load_card

FORMAT_VERSION = 1
TABLE = "SAMPLES"
# meta keys stored in their own columns, not in the META JSON
_OWN_COLUMNS = ("card", "id", "pair_id")
# Spellings other tools write that astropy does not know (SDSS headers use "Ang").
_UNIT_ALIASES = {"Ang": u.AA, "Angs": u.AA, "Angstroms": u.AA}


def data_unit(card: DataCard) -> u.UnitBase:
    """The astropy unit of `Sample.values` for samples of `card`."""
    if isinstance(card, (SpectrumCard, ImageCard)):
        return u.Unit(card.flux_unit)
    if isinstance(card, CubeCard):
        return u.Unit(card.brightness_unit)
    if isinstance(card, FieldCard):
        return u.Unit(card.unit)
    raise InputError("card", f"{type(card).__name__} has no data unit", "pass a SpectrumCard, ImageCard, CubeCard or FieldCard")


# ---------------------------------------------------------------------------- meta helpers
# Shared with hf_io: both formats keep card/id/pair_id in columns and the rest as JSON.


def meta_to_json(sample: Sample) -> str:
    """`sample.meta` minus card, id and pair_id, as a JSON string (numpy scalars allowed)."""
    rest = {k: v for k, v in sample.meta.items() if k not in _OWN_COLUMNS}
    try:
        return json.dumps(rest, default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as e:
        bad = next((k for k, v in rest.items() if not _json_ok(v)), "?")
        raise InputError(f"sample {sample.id!r}: meta[{bad!r}]", f"is not JSON-serialisable ({e})", "keep meta to numbers, strings, lists and dicts") from None


def pair_id_of(sample: Sample) -> str:
    """The sample's pair_id as a string; "" when it has none."""
    pid = sample.meta.get("pair_id")
    return "" if pid is None else str(pid)


def meta_from_columns(card: str, sample_id: str, pair_id: str, meta_json: str, where: str) -> dict[str, Any]:
    """Rebuild `Sample.meta` from the stored columns; `where` names the row for errors."""
    try:
        rest = json.loads(meta_json) if meta_json else {}
    except json.JSONDecodeError as e:
        raise InputError(where, f"META is not valid JSON ({e})", "store the rest of sample.meta as a JSON object string") from None
    if not isinstance(rest, dict):
        raise InputError(where, f"META is a JSON {type(rest).__name__}, not an object", "store meta as a JSON object, e.g. '{\"labels\": {}}'")
    meta = {"card": card, "id": sample_id, **rest}
    if pair_id:
        meta["pair_id"] = pair_id
    return meta


def _json_default(v):
    # numpy scalars and arrays sneak into labels easily; store them as plain numbers/lists.
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON-serialisable")


def _json_ok(v) -> bool:
    try:
        json.dumps(v, default=_json_default)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------- writing


def write_fits(samples: Iterable[Sample], path: str | os.PathLike, card: DataCard) -> Path:
    """Write samples of one modality and one shape to `path` (atomically); returns the path.

    The file is first written to a temporary file in the same folder and then moved over
    `path` with `os.replace`, so a reader never sees a half-written file.
    """
    samples = list(samples)
    path = Path(path)
    _check_writable(samples, path, card)
    modality, shape = samples[0].modality, samples[0].shape
    unit = data_unit(card)
    dim = "(" + ",".join(str(n) for n in reversed(shape)) + ")"  # FITS TDIM is fastest-axis first
    size = int(np.prod(shape))
    columns = [
        _string_column("ID", [s.id for s in samples], path),
        fits.Column("VALUES", format=f"{size}E", dim=dim, unit=_unit_string(unit), array=np.stack([s.values for s in samples])),
        fits.Column("IVAR", format=f"{size}E", dim=dim, unit=_unit_string(unit**-2), array=np.stack([s.ivar for s in samples])),
    ]
    for axis, n in zip(AXES[modality], shape):
        coords = np.stack([s.coords[axis] for s in samples]).astype(np.float64)
        columns.append(fits.Column(axis.upper(), format=f"{n}D", unit=COORD_UNITS[axis], array=coords))
    columns.append(_string_column("PAIR_ID", [pair_id_of(s) for s in samples], path))
    columns.append(_string_column("META", [meta_to_json(s) for s in samples], path))

    primary = fits.PrimaryHDU()
    primary.header["CARD"] = (card.name, "cosmofm data card of these samples")
    primary.header["MODALITY"] = (modality, "spectrum, image, cube or field")
    primary.header["CFMFMT"] = (FORMAT_VERSION, "cosmofm FITS layout version")
    hdul = fits.HDUList([primary, fits.BinTableHDU.from_columns(columns, name=TABLE)])

    # A fresh name in the same folder (so os.replace is an atomic rename); not mkstemp,
    # whose 0600 permissions would stick to the final file.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        hdul.writeto(tmp)
        os.replace(tmp, path)
    except BaseException:
        # Never leave a half-written temp file behind, whatever went wrong.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_writable(samples: list, path: Path, card: DataCard) -> None:
    if not samples:
        raise InputError(str(path), "no samples to write", "pass at least one Sample")
    bad = next((i for i, s in enumerate(samples) if not isinstance(s, Sample)), None)
    if bad is not None:
        raise InputError(f"{path}: samples[{bad}]", f"is a {type(samples[bad]).__name__}, not a Sample", "build Samples first (see cosmofm.data_cards.Sample)")
    if not path.parent.is_dir():
        raise InputError(str(path), f"folder {path.parent} does not exist", "create the folder first")
    modalities = sorted({s.modality for s in samples})
    if len(modalities) > 1:
        raise InputError(str(path), f"samples mix modalities {modalities}", "write one FITS file per modality")
    if modalities[0] != card.modality:
        raise InputError(str(path), f"samples are {modalities[0]}s but card {card.name!r} is a {card.modality} card", "pass the card the samples were made with")
    shapes = sorted({s.shape for s in samples})
    if len(shapes) > 1:
        raise InputError(str(path), f"samples have {len(shapes)} different shapes {shapes[:4]}", "write one FITS file per shape (or cut the samples to one shape)")
    other = sorted({s.card for s in samples if s.card and s.card != card.name})
    if other:
        raise InputError(str(path), f"samples belong to card(s) {other}, not {card.name!r}", "write one FITS file per card")


def _string_column(name: str, strings: list[str], path: Path) -> fits.Column:
    # FITS strings are ASCII; refuse others here rather than fail inside astropy.
    bad = next((s for s in strings if not s.isascii()), None)
    if bad is not None:
        raise InputError(f"{path}: {name}", f"{bad[:40]!r} is not ASCII", "FITS strings are ASCII: use ASCII IDs and labels (or the datasets format)")
    width = max(1, max(len(s) for s in strings))
    return fits.Column(name, format=f"{width}A", array=np.array(strings, dtype=f"U{width}"))


def _unit_string(unit: u.UnitBase) -> str:
    # Prefer the FITS unit standard; fall back to astropy's generic string when it cannot say it.
    try:
        return unit.to_string("fits")
    except (ValueError, TypeError):
        return unit.to_string()


# ---------------------------------------------------------------------------- reading


def read_fits(path: str | os.PathLike, card: DataCard | None = None, rows: slice | None = None, masked: list | None = None) -> list[Sample]:
    """Read the samples in a FITS file written by `write_fits` (or laid out like one).

    Args:
        path: the FITS file.
        card: the data card that interprets the numbers; by default the card named by the
            file's CARD header, loaded with `load_card`.
        rows: read only these rows of the SAMPLES table (a slice with step 1), so a file
            of a million spectra can be read in bounded memory (`count_rows` says how many
            there are). Only the rows asked for are read.
        masked: a list to collect masked elements in, rather than fail on them: with one,
            elements whose IVAR is NaN, inf or negative, or whose VALUES are NaN/inf with
            IVAR > 0, get IVAR 0 (`sample.mask_invalid`) and each row with some adds
            (row, ID, code, count) per problem; without, such a row is an InputError.

    VALUES are converted from their TUNIT to the card's data unit (IVAR by 1/factor^2;
    flux densities per frequency and per wavelength convert into each other using the
    sample's wavelengths), coordinates from their TUNIT to COORD_UNITS (spectral
    equivalencies allowed, e.g. nm -> Angstrom). A column without TUNIT is taken to be in
    the card's unit already. The rows are checked as one block (`sample.validate`).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "does not exist", "check the path (and that the file was downloaded)")
    if not path.is_file():
        raise InputError(str(path), "is not a file", "give the path of a .fits file")
    if rows is not None and rows.step not in (None, 1):
        raise InputError("rows", f"step {rows.step} is not supported", "read a contiguous range of rows, e.g. slice(0, 4096)")
    header, table = _load_table(path, rows)
    card = _card_for(path, header, card)
    modality, axes = card.modality, AXES[card.modality]
    where = f"{path}[{TABLE}]"
    nrows = table["nrows"]
    if nrows == 0:
        return []
    first = table["first_row"]

    values = _column(table, "VALUES", where, card)
    ivar = _column(table, "IVAR", where, card)
    if values.ndim - 1 != len(axes):
        raise InputError(
            f"{where}.VALUES", f"holds arrays of shape {values.shape[1:]} per row; a {modality} needs {len(axes)} axes {axes}",
            "set TDIM of VALUES and IVAR to the sample shape (write_fits does this)",
        )
    if ivar.shape != values.shape:
        raise InputError(f"{where}.IVAR", f"has shape {ivar.shape[1:]} per row but VALUES has {values.shape[1:]}", "give IVAR the same shape (and TDIM) as VALUES")
    coords = {axis: _coord_column(table, axis, where, nrows) for axis in axes}
    ids = _strings(table, "ID", nrows) or [f"{path.stem}-{first + i}" for i in range(nrows)]
    pair_ids = _strings(table, "PAIR_ID", nrows) or [""] * nrows
    metas = _strings(table, "META", nrows) or [""] * nrows

    v_unit = _unit(table, "VALUES", where, data_unit(card))
    factor = _flux_factor(v_unit, card, where)
    ivar_factor = _ivar_factor(table, v_unit, where)
    if callable(factor):  # f_nu <-> f_lambda: a factor per pixel, from each row's wavelengths
        factor = np.stack([factor({axis: c[min(i, len(c) - 1)] for axis, c in coords.items()}) for i in range(nrows)])
    if not (np.all(factor == 1.0) and ivar_factor == 1.0):
        # Scale in float64 so a factor like 1e19 does not lose float32 precision twice.
        factor = np.asarray(factor, dtype=np.float64)
        values, ivar = values * factor, ivar * (ivar_factor / factor**2)
    # A grid the same in every row was read once (_copy_rows): check it once and share it
    # between the samples (a tenth of the memory and of the checking time of per-row copies).
    coords = {axis: c[0] if len(c) == 1 else c for axis, c in coords.items()}
    for attempt in range(2):
        try:
            values, ivar, coords = validate(modality, values, ivar, coords, block=True, own=True)  # values: our copy of the rows
            break
        except RowError as e:
            if masked is None or attempt:
                raise InputError(f"{where} row {first + e.row} (ID {ids[e.row]!r}): {e.field}", e.problem, e.fix) from None
            # only when some row fails: good pieces pay nothing for the masking
            ivar, counts = mask_invalid(values, ivar, block=True)
            masked.extend((first + int(i), ids[i], code, int(n[i])) for code, n in counts.items() for i in np.flatnonzero(n))

    samples = []
    for i in range(nrows):
        meta = meta_from_columns(card.name, ids[i], pair_ids[i], metas[i], f"{where} row {first + i} (ID {ids[i]!r}).META")
        samples.append(Sample.validated(modality, values[i], ivar[i], {axis: c[i] if c.ndim == 2 else c for axis, c in coords.items()}, meta))
    return samples


def count_rows(path: str | os.PathLike) -> int:
    """Rows of the SAMPLES table, from its header alone (0 when there is none)."""
    from cosmofm.data_cards.readers.common import fits_hdus, hdu_named

    hdu = hdu_named(fits_hdus(path) or (), TABLE)
    return int(hdu.header.get("NAXIS2", 0)) if hdu is not None else 0


def _load_table(path: Path, rows: slice | None = None) -> tuple[fits.Header, dict]:
    """Read the primary header and every column of SAMPLES (`rows` of it) into memory, errors as InputError.

    Truncated files only warn in astropy (and may then fail anywhere), so warnings are
    recorded and checked before any exception is interpreted.
    """
    table: dict[str, Any] = {}
    failure = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path, memmap=True, lazy_load_hdus=False) as hdul:
                # silentfix: repair what astropy can (e.g. lower-case keywords), raise on the rest
                hdul.verify("silentfix+exception")
                header = hdul[0].header.copy()
                names = [h.name for h in hdul]
                if TABLE not in names:
                    failure = ("missing", names)
                else:
                    hdu = hdul[TABLE]
                    if not isinstance(hdu, fits.BinTableHDU):
                        failure = ("not_table", type(hdu).__name__)
                    else:
                        # coordinate grids usually repeat in every row: keep one copy
                        table.update(_copy_rows(path, hdu, rows, shared=frozenset(a.upper() for a in COORD_UNITS)))
        except (OSError, TypeError, ValueError, KeyError, IndexError, EOFError, fits.VerifyError) as e:
            failure = ("corrupt", f"{type(e).__name__}: {e}")
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message).lower() or "Error validating header" in str(w.message)]
    if truncated:
        raise InputError(str(path), f"is truncated or corrupt ({truncated[0].splitlines()[0]})", "re-download or re-write the file")
    if failure and failure[0] == "corrupt":
        raise InputError(str(path), f"is not a readable FITS file ({failure[1][:200]})", "check that it is a complete FITS file (re-download or re-write it)")
    if failure and failure[0] == "missing":
        raise InputError(f"{path}[{TABLE}]", f"no HDU named {TABLE} (HDUs: {failure[1]})", "write the file with cosmofm.data_cards.io.fits_io.write_fits, or name the sample table SAMPLES")
    if failure:
        raise InputError(f"{path}[{TABLE}]", f"is a {failure[1]}, not a binary table", "store samples in a BinTableHDU named SAMPLES")
    return header, table


def _copy_rows(path: Path, hdu: fits.BinTableHDU, rows: slice | None, shared: frozenset[str] = frozenset()) -> dict[str, Any]:
    """nrows, first_row and (array, unit) per column of `rows` of a binary table, as native copies;
    a column named in `shared` whose rows are all equal comes back as its first row only.

    The rows are read with numpy straight from the file (the record layout from the column
    definitions, big-endian as FITS stores it), so only those rows are read.
    astropy's own table data is not used for this: on close it copies every column of the
    whole table into memory while a view of it is alive. Columns astropy must interpret
    (scaled, variable-length) fall back to it, for the whole table.
    """
    total = int(hdu.header.get("NAXIS2", 0))
    start, stop, _ = (rows or slice(None)).indices(total)
    stop = max(start, stop)
    out: dict[str, Any] = {"nrows": stop - start, "first_row": start}
    plain = hdu.columns.dtype
    simple = all(c.bscale in (None, 1) and c.bzero in (None, 0) and not c.format.startswith(("P", "Q")) for c in hdu.columns)
    if not simple or plain.itemsize != hdu.header.get("NAXIS1"):
        data = hdu.data
        for col in hdu.columns:
            out[col.name.upper()] = (None if data is None else np.array(data[col.name][start:stop]), col.unit)
        return out
    disk = np.dtype([(name, plain.fields[name][0].base.newbyteorder(">") if plain.fields[name][0].base.kind in "fiu" else plain.fields[name][0].base,
                      plain.fields[name][0].shape) for name in plain.names])
    if total == 0 or stop == start:
        for col in hdu.columns:
            out[col.name.upper()] = (np.zeros((0, *plain.fields[col.name][0].shape), plain.fields[col.name][0].base), col.unit)
        return out
    with open(path, "rb") as f:  # one read of the rows: steadier than faulting in a memory map
        f.seek(hdu.fileinfo()["datLoc"] + start * disk.itemsize)
        block = np.fromfile(f, dtype=disk, count=stop - start)
    if len(block) != stop - start:
        raise EOFError(f"{path} ends after {len(block)} of the {stop - start} rows asked for")
    for col in hdu.columns:
        field = block[col.name]
        if col.name.upper() in shared and len(field) > 1 and field.ndim > 1 and (field == field[:1]).all():
            field = field[:1]  # the same in every row: compared in place, one row copied
        if field.dtype.kind in "fiu":
            array = field.astype(field.dtype.newbyteorder("="))
        else:  # FITS pads strings with spaces or NULs
            array = np.char.rstrip(np.char.decode(field, "ascii", errors="replace"))
        out[col.name.upper()] = (array, col.unit)
    return out


def _card_for(path: Path, header: fits.Header, card: DataCard | None) -> DataCard:
    version = header.get("CFMFMT", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{path}[PRIMARY].CFMFMT", f"format version {version!r} is newer than this reader ({FORMAT_VERSION})", "update cosmofm")
    if card is None:
        name = header.get("CARD")
        if not name:
            raise InputError(f"{path}[PRIMARY].CARD", "header has no CARD key", "pass card=load_card(...) to read_fits")
        try:
            card = load_card(str(name))
        except InputError as e:
            raise InputError(f"{path}[PRIMARY].CARD", f"{e.problem}", "pass card=load_card('path/to/card.yaml') to read_fits") from None
    modality = header.get("MODALITY")
    if modality and modality != card.modality:
        raise InputError(f"{path}[PRIMARY].MODALITY", f"the file holds {modality} samples but card {card.name!r} is a {card.modality} card", "pass the card the file was written with")
    return card


def _column(table: dict, name: str, where: str, card: DataCard) -> np.ndarray:
    if name not in table:
        raise InputError(f"{where}.{name}", f"column {name} is missing", f"add a float32 {name} column with TDIM = the {card.modality} shape (write_fits writes it)")
    array = table[name][0]
    if array is None:
        return np.zeros((0,), np.float32)
    if array.dtype.kind not in "fiu":
        raise InputError(f"{where}.{name}", f"has dtype {array.dtype}, not numbers", "store VALUES and IVAR as float32 vector columns")
    return array


def _coord_column(table: dict, axis: str, where: str, nrows: int) -> np.ndarray:
    name = axis.upper()
    if name not in table:
        raise InputError(f"{where}.{name}", f"column {name} is missing", f"add a float64 vector column {name} with one {axis} per element, TUNIT = {COORD_UNITS[axis]}")
    array = table[name][0]
    if array is None or array.dtype.kind not in "fiu":
        raise InputError(f"{where}.{name}", f"has dtype {None if array is None else array.dtype}, not numbers", "store coordinates as float64 vector columns")
    # a repeat-1 column reads as (nrows,); a grid shared by every row as (1, L)
    array = np.asarray(array, dtype=np.float64).reshape(len(array) if array.ndim > 1 else nrows, -1)
    unit = _unit(table, name, where, u.Unit(COORD_UNITS[axis]))
    if unit == u.Unit(COORD_UNITS[axis]):
        return array
    try:
        return (array * unit).to_value(COORD_UNITS[axis], equivalencies=u.spectral())
    except u.UnitsError:
        raise InputError(f"{where}.{name}", f"unit {unit.to_string()!r} cannot be converted to {COORD_UNITS[axis]}", f"store {axis} in {COORD_UNITS[axis]} (or a unit convertible to it)") from None


def _strings(table: dict, name: str, nrows: int) -> list[str] | None:
    if name not in table or table[name][0] is None:
        return None
    array = table[name][0]
    if array.dtype.kind == "U":  # decoded and stripped already (_copy_rows)
        return array.tolist()
    # FITS pads strings with trailing blanks; astropy may hand back bytes for odd TFORMs.
    return [(s.decode("ascii", "replace") if isinstance(s, bytes) else str(s)).rstrip() for s in array]


def _unit(table: dict, name: str, where: str, default: u.UnitBase) -> u.UnitBase:
    """The column's TUNIT as an astropy unit; `default` if it has none."""
    return parse_unit(table[name][1], f"{where}.{name}", default)


def parse_unit(text, where: str, default: u.UnitBase | None = None, keyword: str = "TUNIT") -> u.UnitBase | None:
    """A unit string from a FITS header or table as an astropy unit; `default` when blank.

    Knows the spellings other tools write ("Ang", "1E-17 erg/cm^2/s/Ang", "10**-17 ...")
    and raises `InputError` naming `where` (file[HDU].column or keyword) when astropy
    cannot parse the string or it is logarithmic. Shared by every reader in data_cards.
    """
    if text is None or not str(text).strip():
        return default
    example = default.to_string() if default is not None else "Angstrom"
    with warnings.catch_warnings(), u.add_enabled_aliases(_UNIT_ALIASES):
        warnings.simplefilter("ignore", u.UnitsWarning)  # e.g. "multiple slashes"; we parse it anyway
        for fmt in ("generic", "fits"):
            try:
                unit = u.Unit(str(text).strip(), format=fmt)
                break
            except ValueError:
                continue
        else:
            raise InputError(where, f"{keyword} {text!r} is not a unit astropy understands", f"write {keyword} as an astropy/FITS unit string such as {example!r}")
    if isinstance(unit, u.FunctionUnitBase):
        raise InputError(where, f"{keyword} {text!r} is logarithmic", f"store linear values in {example!r}")
    return unit


def flux_factor(unit: u.UnitBase, card: DataCard, where: str):
    """Multiplier from `unit` to the card's data unit: a number, or a function of a Sample's coords.

    Public form of the conversion `read_fits` uses; `where` names the column or HDU.
    """
    return _flux_factor(unit, card, where, column=None)


def ivar_factor(ivar_unit: u.UnitBase | None, value_unit: u.UnitBase, where: str) -> float:
    """Multiplier taking an inverse variance in `ivar_unit` to (`value_unit`)^-2 (1 when None)."""
    if ivar_unit is None:
        return 1.0
    try:
        return _snap(ivar_unit.to(value_unit**-2))
    except u.UnitsError:
        raise InputError(where, f"unit {ivar_unit.to_string()!r} is not the flux unit^-2 ({(value_unit**-2).to_string()!r})", "store the inverse variance as 1/sigma^2 in the flux unit") from None


def to_card_unit(values, ivar, unit: u.UnitBase, card: DataCard, coords: dict, where: str, ivar_unit: u.UnitBase | None = None):
    """(values, ivar) converted from `unit` (ivar from `ivar_unit`, default unit^-2) to the card's data unit.

    `coords` are the Sample's coordinates (needed when f_nu <-> f_lambda depends on
    wavelength). Scaled in float64; returns float64 arrays (the Sample casts them).
    """
    factor = flux_factor(unit, card, where)
    f = factor(coords) if callable(factor) else factor
    extra = ivar_factor(ivar_unit, unit, where)
    values = np.asarray(values, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if np.all(np.asarray(f) == 1.0) and extra == 1.0:
        return values, ivar
    f = np.asarray(f, dtype=np.float64)
    return values * f, ivar * (extra / f**2)


def _flux_factor(unit: u.UnitBase, card: DataCard, where: str, column: str | None = "VALUES"):
    """Multiplier from `unit` to the card's data unit: a number, or per-row function of coords.

    Flux densities per frequency and per wavelength differ by lambda^2/c, which depends on
    each pixel's (spectra) or band's (images) wavelength, hence the per-row function.
    """
    target = data_unit(card)
    try:
        return _snap(unit.to(target))
    except u.UnitsError:
        pass
    if card.modality in ("spectrum", "image"):
        axis = AXES[card.modality][0]
        try:
            unit.to(target, equivalencies=u.spectral_density(1 * u.AA))
        except u.UnitsError:
            pass
        else:
            def per_row(coords):
                wave = coords[axis] * u.Unit(COORD_UNITS[axis])
                f = unit.to(target, equivalencies=u.spectral_density(wave))
                return f if card.modality == "spectrum" else f[:, None, None]
            return per_row
    name = f"{where}.{column}" if column else where
    raise InputError(name, f"unit {unit.to_string()!r} cannot be converted to the card's {target.to_string()!r}", f"store {column or 'the data'} in {target.to_string()!r} or pass the right card")


def _ivar_factor(table: dict, v_unit: u.UnitBase, where: str) -> float:
    """IVAR in (VALUES unit)^-2 is IVAR times this; 1 when IVAR has no TUNIT."""
    unit = _unit(table, "IVAR", where, v_unit**-2)
    try:
        return _snap(unit.to(v_unit**-2))
    except u.UnitsError:
        raise InputError(f"{where}.IVAR", f"unit {unit.to_string()!r} is not VALUES unit^-2 ({(v_unit**-2).to_string()!r})", "store IVAR as 1/sigma^2 in the units of VALUES") from None


def _snap(factor: float) -> float:
    # Unit strings round-trip with float noise in their scale (10**34 vs 1e-17**-2 gives
    # 1.0000000000000002); such a factor means "same unit" and must not perturb the data.
    return 1.0 if abs(factor - 1.0) < 1e-12 else factor
