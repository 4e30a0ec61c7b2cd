"""Hugging Face `datasets` storage for `Sample`s: one Arrow schema for every modality.

Each row is one sample with the columns of `FEATURES`:

    id, modality, card   string
    values, ivar         list<float32>        the arrays, flattened (C order)
    shape                list<int32>          to un-flatten them
    coords               list<list<float64>>  one list per axis, in AXES[modality] order
    pair_id              string               "" when the sample has none
    meta                 string               the rest of sample.meta as JSON (labels, ...)

Because every modality shares the schema, one dataset can mix spectra, images, cubes and
fields. `write_dataset` streams samples into a dataset saved with `save_to_disk` plus a
Hugging Face dataset card (README.md) rendered from the data cards; `SampleDataset`
reads it back (or Parquet shards with the same schema) as a memory-mapped,
`torch.utils.data.Dataset`-compatible sequence of Samples, decoding rows straight from
the Arrow buffers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from datasets import Features, List, Value

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import data_unit, meta_from_columns, meta_to_json, pair_id_of
from cosmofm.data_cards.sample import AXES, COORD_UNITS, Sample
from cosmofm.data_cards.schema import DataCard, load_card

FEATURES = Features(
    {
        "id": Value("string"),
        "modality": Value("string"),
        "card": Value("string"),
        "values": List(Value("float32")),
        "ivar": List(Value("float32")),
        "shape": List(Value("int32")),
        "coords": List(List(Value("float64"))),
        "pair_id": Value("string"),
        "meta": Value("string"),
    }
)
COLUMNS = tuple(FEATURES)
ARROW_SCHEMA: pa.Schema = FEATURES.arrow_schema

# Rows per Arrow record batch while writing: bounds the writer's memory (64 cubes of
# 64x32x32 are ~32 MB) while keeping batches large enough for fast sequential reads.
_BATCH_ROWS = 64
# ... and values per batch, so huge samples neither fill memory nor overflow the int32
# list offsets of one batch (2**31 elements).
_BATCH_ELEMENTS = 2**26
_MAX_LIST = 2**31 - 1


# ---------------------------------------------------------------------------- rows


def sample_to_row(sample: Sample) -> dict[str, Any]:
    """One dataset row for `sample` (arrays stay numpy; `datasets` converts them in bulk)."""
    return {
        "id": sample.id,
        "modality": sample.modality,
        "card": sample.card,
        "values": np.ascontiguousarray(sample.values, dtype=np.float32).ravel(),
        "ivar": np.ascontiguousarray(sample.ivar, dtype=np.float32).ravel(),
        "shape": [int(n) for n in sample.shape],
        "coords": [np.asarray(sample.coords[axis], dtype=np.float64) for axis in AXES[sample.modality]],
        "pair_id": pair_id_of(sample),
        "meta": meta_to_json(sample),
    }


def row_to_sample(row: dict[str, Any]) -> Sample:
    """The Sample stored in `row` (lists or numpy arrays both work)."""
    where = f"row {row.get('id')!r}"
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise InputError(where, f"has no column(s) {missing}", f"a row needs {list(COLUMNS)} (see sample_to_row)")
    modality = row["modality"]
    if modality not in AXES:
        raise InputError(f"{where}.modality", f"unknown modality {modality!r}", f"use one of {list(AXES)}")
    shape = tuple(int(n) for n in row["shape"])
    values = _unflatten(row["values"], shape, np.float32, f"{where}.values")
    ivar = _unflatten(row["ivar"], shape, np.float32, f"{where}.ivar")
    coords = _coords(row["coords"], modality, f"{where}.coords")
    return _sample(modality, values, ivar, coords, row["card"], row["id"], row["pair_id"], row["meta"], where)


def _unflatten(flat, shape: tuple[int, ...], dtype, where: str) -> np.ndarray:
    flat = np.asarray(flat, dtype=dtype)
    if flat.size != int(np.prod(shape)):
        raise InputError(where, f"has {flat.size} elements but shape is {shape}", "store the flattened array and its shape together (sample_to_row)")
    return flat.reshape(shape)


def _coords(lists, modality: str, where: str) -> dict[str, np.ndarray]:
    axes = AXES[modality]
    if len(lists) != len(axes):
        raise InputError(where, f"has {len(lists)} axes; a {modality} needs {len(axes)} {axes}", "store one coordinate list per axis in AXES order")
    return {axis: np.asarray(c, dtype=np.float64) for axis, c in zip(axes, lists)}


def _sample(modality, values, ivar, coords, card, sample_id, pair_id, meta_json, where) -> Sample:
    meta = meta_from_columns(card, sample_id, pair_id, meta_json, f"{where}.meta")
    try:
        return Sample(modality, values, ivar, coords, meta)
    except InputError as e:
        raise InputError(f"{where}: {e.field}", e.problem, e.fix) from None


# ---------------------------------------------------------------------------- writing


def write_dataset(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    cards: Iterable[DataCard | str],
    shard_size: str | int = "500MB",
    pretty_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Stream `samples` into a Hugging Face dataset at `out_dir`; returns `out_dir`.

    Samples are consumed as they come and written to an Arrow file in record batches of
    at most 64 rows, so the iterable may be a generator over more data than fits in
    memory. `out_dir` gets the `save_to_disk` files (shards of at most `shard_size`), a
    dataset card README.md rendered from `cards`, and data_cards/<name>.yaml copies of the
    cards. Everything is built in a temporary sibling folder and moved into place at the
    end, so an interrupted write never leaves a half-written dataset at `out_dir`.

    Args:
        samples: Samples whose meta["card"] names one of `cards` (a sample without a card
            name is taken to belong to the only card, when there is one).
        cards: DataCards (or names/paths for `load_card`) of the samples.
        shard_size: `max_shard_size` of `save_to_disk`, e.g. "500MB".
        pretty_name: title of the dataset card; default from the card names.
        overwrite: replace an existing `out_dir` that holds a saved dataset.
    """
    out_dir = Path(out_dir)
    by_name = _cards_by_name(cards)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as out_dir, so the final move is a rename, not a copy.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "dataset"
        ds = _build(samples, by_name, Path(tmp))
        counts = _counts(ds)
        ds.save_to_disk(str(staged), max_shard_size=shard_size)
        del ds  # drop the memory map of the cache file before the folder goes
        (staged / "README.md").write_text(dataset_card_text(list(by_name.values()), counts, pretty_name))
        (staged / "data_cards").mkdir()
        for name, card in by_name.items():
            (staged / "data_cards" / f"{name}.yaml").write_text(yaml.safe_dump(card.to_dict(), sort_keys=False, allow_unicode=True))
        _move_into_place(staged, out_dir, Path(tmp))
    return out_dir


def _cards_by_name(cards: Iterable[DataCard | str]) -> dict[str, DataCard]:
    if isinstance(cards, (DataCard, str, os.PathLike)):
        cards = [cards]  # a single card is a common slip; accept it
    out: dict[str, DataCard] = {}
    for c in cards:
        card = c if isinstance(c, DataCard) else load_card(c)
        out[card.name] = card
    if not out:
        raise InputError("cards", "is empty", "pass the DataCard of every card the samples belong to")
    return out


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not overwrite:
        raise InputError(str(out_dir), "already exists", "choose a new folder, or pass overwrite=True to replace a saved dataset")
    if not (out_dir / "state.json").exists():
        # Only ever delete something we recognise as a saved dataset.
        raise InputError(str(out_dir), "exists and is not a saved dataset; refusing to replace it", "choose a new folder")


def _move_into_place(staged: Path, out_dir: Path, tmp: Path) -> None:
    if out_dir.exists():
        old = tmp / "old"
        os.replace(out_dir, old)  # the TemporaryDirectory deletes it
    os.replace(staged, out_dir)


def _build(samples: Iterable[Sample], cards: dict[str, DataCard], tmp: Path) -> datasets.Dataset:
    """Stream samples into an Arrow file in `tmp`, a batch at a time, and memory-map it.

    `Dataset.from_generator` would do the same but its example encoder turns every numpy
    array into a Python list of scalars (measured: ~300 spectra/s, ~20 cubes/s of
    64x32x32); building each record batch from numpy buffers writes 10-100x faster.
    """
    path = tmp / "samples.arrow"
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ARROW_SCHEMA) as writer:
        for batch in _batches(_checked(samples, cards)):
            writer.write_batch(_record_batch(batch))
            n += len(batch)
    if n == 0:
        raise InputError("samples", "is empty", "pass at least one Sample")
    # The schema carries FEATURES in its metadata, so datasets restores the exact features.
    return datasets.Dataset.from_file(str(path))


def _checked(samples: Iterable[Sample], cards: dict[str, DataCard]) -> Iterator[dict[str, Any]]:
    """Rows of `samples`, each checked against `cards`."""
    only = next(iter(cards)) if len(cards) == 1 else None
    for i, sample in enumerate(samples):
        if not isinstance(sample, Sample):
            raise InputError(f"samples[{i}]", f"is a {type(sample).__name__}, not a Sample", "yield Sample objects")
        name = sample.card or only
        if name not in cards:
            raise InputError(f"samples[{i}] (id {sample.id!r}).meta['card']", f"{sample.card!r} is not one of the cards {sorted(cards)}", "pass the sample's card in `cards`")
        if cards[name].modality != sample.modality:
            raise InputError(f"samples[{i}] (id {sample.id!r})", f"is a {sample.modality} but card {name!r} is a {cards[name].modality} card", "fix meta['card'] or the modality")
        if sample.values.size > _MAX_LIST:
            raise InputError(f"samples[{i}] (id {sample.id!r})", f"has {sample.values.size} values, more than one Arrow list holds ({_MAX_LIST})", "cut it into smaller chunks")
        row = sample_to_row(sample)
        row["card"] = name
        yield row


def _batches(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Group rows into record batches of at most _BATCH_ROWS rows and _BATCH_ELEMENTS values."""
    batch, elements = [], 0
    for row in rows:
        if batch and (len(batch) >= _BATCH_ROWS or elements + row["values"].size > _BATCH_ELEMENTS):
            yield batch
            batch, elements = [], 0
        batch.append(row)
        elements += row["values"].size
    if batch:
        yield batch


def _record_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    axis_lists = [c for r in rows for c in r["coords"]]
    coords = pa.ListArray.from_arrays(_offsets([len(r["coords"]) for r in rows]), _list_array(axis_lists, pa.float64()))
    columns = {
        "values": _list_array([r["values"] for r in rows], pa.float32()),
        "ivar": _list_array([r["ivar"] for r in rows], pa.float32()),
        "shape": _list_array([np.asarray(r["shape"], np.int32) for r in rows], pa.int32()),
        "coords": coords,
    }
    for name in ("id", "modality", "card", "pair_id", "meta"):
        columns[name] = pa.array([r[name] for r in rows], pa.string())
    return pa.RecordBatch.from_arrays([columns[c] for c in COLUMNS], schema=ARROW_SCHEMA)


def _list_array(arrays: list[np.ndarray], type: pa.DataType) -> pa.ListArray:
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), pa.array(flat, type))


def _offsets(lengths: list[int]) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets.astype(np.int32), pa.int32())


def _counts(ds: datasets.Dataset) -> dict[str, int]:
    """Samples per card name, counted in Arrow (no Python loop over rows)."""
    counts = pc.value_counts(ds.data.table.column("card"))
    return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}


# ---------------------------------------------------------------------------- dataset card

_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]


def dataset_card_text(cards: list[DataCard], counts: dict[str, int], pretty_name: str | None = None) -> str:
    """README.md for the Hub: YAML front matter + a body rendered from the data cards."""
    modalities = sorted({c.modality for c in cards})
    licenses = sorted({c.license.lower() for c in cards})
    total = sum(counts.get(c.name, 0) for c in cards)
    pretty_name = pretty_name or "cosmofm samples: " + ", ".join(c.name for c in cards)
    front = {
        "license": licenses[0] if len(licenses) == 1 else licenses,
        "pretty_name": pretty_name,
        "tags": ["astronomy", "cosmofm", *modalities],
        "size_categories": [next((cat for limit, cat in _SIZE_CATEGORIES if total < limit), "n>100M")],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {pretty_name}", ""]
    lines += [
        f"{total} samples from {len(cards)} data card(s), written by `cosmofm.data_cards.io.hf_io.write_dataset`.",
        "Every number is physical: units are fixed by the data cards below and by the coordinate units in the schema.",
        "",
        "| card | modality | survey | samples | license |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c.name} | {c.modality} | {_cell(c.survey)} | {counts.get(c.name, 0)} | {c.license} |" for c in cards]
    lines += ["", *_schema_section(modalities), "", "## Data cards", ""]
    for card in cards:
        lines += _card_section(card, counts.get(card.name, 0))
    return "\n".join(lines) + "\n"


def _schema_section(modalities: list[str]) -> list[str]:
    lines = [
        "## Schema",
        "",
        "One row per sample; all modalities share the columns.",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
        "| id | string | sample id |",
        "| modality | string | spectrum, image, cube or field |",
        "| card | string | name of the data card (see below and `data_cards/`) |",
        "| values | `list<float32>` | data, flattened in C order; unit = the card's data unit |",
        "| ivar | `list<float32>` | inverse variance per value (0 = masked) |",
        "| shape | `list<int32>` | array shape of values and ivar |",
        "| coords | `list<list<float64>>` | one coordinate list per axis (order below) |",
        "| pair_id | string | same physical object in another modality (\"\" if none) |",
        "| meta | string | JSON: labels and other metadata |",
        "",
        "Axes and coordinate units:",
        "",
    ]
    for m in modalities:
        lines.append(f"- {m}: " + ", ".join(f"{a} [{COORD_UNITS[a]}]" for a in AXES[m]))
    lines += [
        "",
        "Load as Samples (memory-mapped):",
        "",
        "```python",
        "from cosmofm.data_cards.io.hf_io import SampleDataset",
        'samples = SampleDataset("path/to/this/folder")',
        "```",
    ]
    return lines


def _card_section(card: DataCard, n: int) -> list[str]:
    d = card.to_dict()
    block = d[card.block]
    lines = [f"### {card.name} ({card.modality})", "", f"**Survey:** {card.survey}  ", f"**Samples:** {n}  ", f"**Data unit:** `{data_unit(card).to_string()}`", ""]
    if card.description:
        lines += [card.description.strip(), ""]
    lines += ["| field | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(_fmt(v))} |" for k, v in block.items() if k != "bands"]
    if "bands" in block:
        keys = list(block["bands"][0])
        lines += ["", "Bands:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(_fmt(b[k])) for k in keys) + " |" for b in block["bands"]]
    if card.labels:
        lines += ["", "Labels (in `meta`):", ""]
        for lab in card.labels:
            detail = "classes " + ", ".join(lab.classes) if lab.kind == "class" else f"unit `{lab.unit or 'dimensionless'}`"
            lines.append(f"- `{lab.name}`: {lab.kind}, {detail}")
    lines.append("")
    for title, text in (("Provenance", card.provenance), ("Intended use", card.intended_use), ("Citation", card.citation)):
        if text:
            lines.append(f"**{title}:** {text.strip()}  ")
    lines += [f"**License:** {card.license}  ", f"**Splits:** {_fmt(card.splits)}", ""]
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def _cell(text: str) -> str:
    # Keep markdown tables intact whatever the card says.
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


# ---------------------------------------------------------------------------- reading


@dataclass
class _Batch:
    """Numpy views of one Arrow record batch: list offsets and flat child buffers."""

    values_offsets: np.ndarray
    values: np.ndarray
    ivar_offsets: np.ndarray
    ivar: np.ndarray
    shape_offsets: np.ndarray
    shape: np.ndarray
    coords_offsets: np.ndarray  # row -> range of axis lists
    axis_offsets: np.ndarray  # axis list -> range in coords_flat
    coords_flat: np.ndarray
    strings: dict[str, pa.Array]  # id, modality, card, pair_id, meta


class SampleDataset:
    """Samples stored by `write_dataset` (or Parquet shards with `FEATURES`), memory-mapped.

    A plain sequence (`len(ds)`, `ds[i]`) returning `Sample`s, so it can be handed to
    `torch.utils.data.DataLoader` directly. Rows are decoded from the Arrow buffers with
    numpy (no Python lists), and the data stay on disk until a row is read, so datasets
    larger than memory work.

    Args:
        path: a folder written by `write_dataset` / `save_to_disk`, a .parquet file, or a
            folder of .parquet shards.
        cache_dir: where `datasets` puts the Arrow copy of Parquet input (default: its cache).
    """

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.cache_dir = cache_dir
        self._open()

    # Workers of a DataLoader started with "spawn" get a pickled copy: send only the path
    # and re-open there, instead of pickling numpy views of the whole memory map.
    def __getstate__(self):
        return {"path": self.path, "cache_dir": self.cache_dir}

    def __setstate__(self, state):
        self.path, self.cache_dir = state["path"], state["cache_dir"]
        self._open()

    def _open(self) -> None:
        self.hf = _load(self.path, self.cache_dir)
        # load_from_disk / from_parquet give a dataset without an indices mapping, so the
        # underlying table's rows are the dataset's rows.
        self._record_batches = self.hf.data.table.to_batches()
        sizes = [b.num_rows for b in self._record_batches]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._batches: dict[int, _Batch] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._decode(self._batch(b), i - int(self._starts[b]), i)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"SampleDataset({str(self.path)!r}, {len(self)} samples, cards={self.cards})"

    @property
    def modalities(self) -> list[str]:
        """Modalities present, sorted."""
        return self._unique("modality")

    @property
    def cards(self) -> list[str]:
        """Names of the data cards present, sorted."""
        return self._unique("card")

    def load_cards(self) -> dict[str, DataCard]:
        """The DataCards saved next to the data by `write_dataset` (shipped cards otherwise)."""
        out = {}
        for name in self.cards:
            saved = self.path / "data_cards" / f"{name}.yaml"
            out[name] = load_card(saved if saved.exists() else name)
        return out

    def _unique(self, column: str) -> list[str]:
        return sorted(str(x) for x in pc.unique(self.hf.data.table.column(column)).to_pylist())

    def _batch(self, b: int) -> _Batch:
        batch = self._batches.get(b)
        if batch is None:
            batch = self._batches[b] = decode_batch(self._record_batches[b], self.path, int(self._starts[b]))
        return batch

    def _decode(self, batch: _Batch, j: int, i: int) -> Sample:
        s = batch.strings
        sample_id = s["id"][j].as_py()
        where = f"{self.path} row {i} (id {sample_id!r})"
        modality = s["modality"][j].as_py()
        if modality not in AXES:
            raise InputError(f"{where}.modality", f"unknown modality {modality!r}", f"use one of {list(AXES)}")
        shape = tuple(batch.shape[batch.shape_offsets[j] : batch.shape_offsets[j + 1]].tolist())
        # Slices of the memory-mapped buffers; np.array copies them once so the Sample is
        # writable and independent of the file (a few microseconds even for a cube).
        values = _unflatten(batch.values[batch.values_offsets[j] : batch.values_offsets[j + 1]], shape, np.float32, f"{where}.values")
        ivar = np.array(_unflatten(batch.ivar[batch.ivar_offsets[j] : batch.ivar_offsets[j + 1]], shape, np.float32, f"{where}.ivar"))
        a0, a1 = batch.coords_offsets[j], batch.coords_offsets[j + 1]
        axis_lists = [np.array(batch.coords_flat[batch.axis_offsets[k] : batch.axis_offsets[k + 1]]) for k in range(a0, a1)]
        coords = _coords(axis_lists, modality, f"{where}.coords")
        return _sample(modality, values, ivar, coords, s["card"][j].as_py(), sample_id, s["pair_id"][j].as_py(), s["meta"][j].as_py(), where)


def decode_batch(rb: pa.RecordBatch, path: Path, start: int) -> _Batch:
    """Zero-copy numpy views of one record batch's list columns."""
    where = f"{path} rows {start}-{start + rb.num_rows - 1}"
    for name in COLUMNS:
        if rb.column(name).null_count:
            raise InputError(f"{where}.{name}", f"has {rb.column(name).null_count} missing (null) entries", "write every column for every row (write_dataset does)")

    def flat(name: str):
        arr = rb.column(name)
        # .offsets honour a sliced array's offset; .values is the whole child buffer, which
        # is what those offsets index into.
        return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)

    coords = rb.column("coords")
    inner = coords.values
    if inner.null_count:
        raise InputError(f"{where}.coords", "has null axis lists", "store one coordinate list per axis")
    v_off, v = flat("values")
    i_off, iv = flat("ivar")
    s_off, sh = flat("shape")
    return _Batch(
        values_offsets=v_off, values=v, ivar_offsets=i_off, ivar=iv, shape_offsets=s_off, shape=sh,
        coords_offsets=coords.offsets.to_numpy(), axis_offsets=inner.offsets.to_numpy(), coords_flat=inner.values.to_numpy(zero_copy_only=False),
        strings={name: rb.column(name) for name in ("id", "modality", "card", "pair_id", "meta")},
    )


def _load(path: Path, cache_dir) -> datasets.Dataset:
    if not path.exists():
        raise InputError(str(path), "does not exist", "give a folder written by write_dataset, a .parquet file or a folder of .parquet shards")
    if path.is_file() and path.suffix == ".parquet":
        return _load_parquet([path], cache_dir)
    if path.is_dir() and (path / "state.json").exists():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError, KeyError, pa.ArrowInvalid) as e:
            raise InputError(str(path), f"could not be loaded as a saved dataset ({type(e).__name__}: {e})", "re-write it with write_dataset") from None
        if isinstance(ds, datasets.DatasetDict):
            raise InputError(str(path), f"is a DatasetDict with splits {list(ds)}, not one dataset", "pass the folder of one split (e.g. path/train)")
        check_columns(ds.features.arrow_schema, str(path), exact_types=True)
        return ds
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if shards:
            return _load_parquet(shards, cache_dir)
    raise InputError(str(path), "is not a dataset saved by write_dataset, a .parquet file, or a folder of .parquet shards", "write the samples with cosmofm.data_cards.io.hf_io.write_dataset")


def _load_parquet(files: list[Path], cache_dir) -> datasets.Dataset:
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(str(f), f"is not a readable Parquet file ({e})", "re-write the shard (e.g. Dataset.to_parquet)") from None
        check_columns(schema, str(f), exact_types=False)
    try:
        # `features` casts compatible types (e.g. float64 values) to the shared schema.
        return datasets.Dataset.from_parquet([str(f) for f in files], features=FEATURES, columns=list(COLUMNS), cache_dir=None if cache_dir is None else str(cache_dir))
    except (ValueError, TypeError, OSError, pa.ArrowInvalid, datasets.exceptions.DatasetGenerationError) as e:
        raise InputError(str(files[0].parent if len(files) > 1 else files[0]), f"could not be read with the sample schema ({type(e).__name__}: {e})", "write shards with the columns and types of hf_io.FEATURES") from None


def check_columns(schema: pa.Schema, where: str, exact_types: bool) -> None:
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise InputError(where, f"is not a dataset saved by write_dataset: missing column(s) {missing} (has {schema.names})", "write it with cosmofm.data_cards.io.hf_io.write_dataset (columns: " + ", ".join(COLUMNS) + ")")
    if exact_types:
        for name in COLUMNS:
            have, want = schema.field(name).type, ARROW_SCHEMA.field(name).type
            if have != want:
                raise InputError(f"{where}: column {name}", f"has type {have}, expected {want}", "cast with ds.cast(hf_io.FEATURES) and save again, or re-write with write_dataset")
