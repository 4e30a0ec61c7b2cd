"""The one predict path: survey files in -> catalogue out, for any task.

    predictor = ClassificationPredictor(model, batch_size=256, redshift="scan")  # the task's part
    predict_files(["spec-4055-55359-0001.fits", "coadds/"], predictor, "catalogue.fits")

What is shared (this module): finding the inputs (`input_files`), refusing an output that
would replace an input or an existing file (`check_output`; the catalogue is written
atomically by `CatalogueWriter`), cutting files into pieces of at most `chunk_rows`
objects (`readers.piece_readers`), running the pieces in worker processes (forked on
Linux, threads elsewhere: `data_cards.workers.in_parallel`), and writing each piece's
rows as soon as it is done, so memory is bounded by the pieces in flight whatever the
number of objects.
Every object the reader listed gets a row: its identifiers (ID, CARD, FILE, PLATE/MJD/
FIBERID, TARGETID, OBJECT, RA/DEC), the task's columns, and FLAGS ('|'-joined codes);
objects the reader or the task skipped, and files that could not be used or hold no
objects (empty_file), get their flags and null task columns.

What a task gives (`Predictor`), built once per run from its loaded model:
- `verb` ("classify") and `modality` ("spectrum"): the progress label, and the kind of
  file it reads (others get a `not_a_<modality>` row);
- `columns`: the `CatalogueColumn`s it writes this run, in catalogue order, with units
  (a subset of its `Task.catalogue_columns`); a column with unit None is text;
- `device`: where its model runs (worker processes on the CPU only);
- `workers`: None for one worker per core, or a cap (1: one piece at a time);
- `predict(samples) -> PiecePrediction`: for one piece (a sequence of Samples, maybe
  lazy: read each once), the ids of the objects it predicted, their columns (numpy
  arrays in that order; None for a column its model cannot fill) and a readers `Flag`
  (severity SKIPPED) for each sample it left out (index = position in the piece).
It runs in a worker, single-threaded; the predict path never looks inside a model.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.workers import in_parallel, keep_freed_memory, n_workers

if TYPE_CHECKING:  # annotations only: check_output (the tiled deblend / detect verbs) must not pay torch's import
    import torch

    from cosmofm.heads.base import CatalogueColumn


@dataclass
class PiecePrediction:
    """A task's predictions for one piece: `ids` of the predicted samples, in order; `columns`
    (name -> one value per id, or None: the model cannot fill it, written null); `skipped`,
    a readers Flag per sample left out (its id None when the sample could not be read)."""

    ids: list[str]
    columns: dict[str, np.ndarray | None]
    skipped: list = field(default_factory=list)


class Predictor(Protocol):
    """The task's part of the predict path (see the module docstring)."""

    verb: str
    modality: str
    columns: Sequence[CatalogueColumn]
    device: torch.device
    workers: int | None

    def predict(self, samples: Sequence[Sample]) -> PiecePrediction: ...


def predict_files(inputs, predictor: Predictor, output, card=None, progress: bool = True, chunk_rows: int = 1024,
                  overwrite: bool = False) -> dict:
    """Run `predictor` on every object of `inputs` (files, folders of them, datasets folders);
    write one catalogue row per object to `output` (.fits / .parquet). Returns {"output",
    "n_rows", "n_predicted", "n_files", "flags": {code: rows}}; InputError when nothing
    usable remains. `card`: the data card for files that do not name theirs."""
    from tqdm.auto import tqdm

    from cosmofm.data_cards.io.catalogue import ID_COLUMNS, CatalogueWriter, catalogue_format
    from cosmofm.data_cards.readers import piece_readers

    files = input_files(inputs)
    catalogue_format(output)  # a bad suffix fails now, not after the run
    check_output(output, inputs, files, overwrite)
    if chunk_rows < 1:
        raise InputError("chunk_rows", f"must be >= 1, got {chunk_rows}", "e.g. 1024 rows per piece")
    workers = n_workers(predictor.workers)
    jobs = ((path, read) for path in files for read in piece_readers(path, card, chunk_rows=chunk_rows, min_pieces=workers))
    texts = {c.name for c in predictor.columns if c.unit is None}

    def predict_piece(job) -> tuple:
        """(catalogue rows of one piece, objects predicted, problem or None); reads the piece itself."""
        path, read = job
        try:
            result = read()
        except InputError as e:
            return _row_table([path.stem], path, {"FLAGS": np.array([f"unreadable: {e.problem}"])}), 0, str(e)
        if result.n_objects == 0 and len(result.samples) == 0:
            return _row_table([path.stem], path, {"FLAGS": np.array(["empty_file: the file holds no objects"])}), 0, f"{path}: holds no objects"
        if result.modality != predictor.modality:
            return (_row_table([path.stem], path, {"FLAGS": np.array([f"not_a_{predictor.modality}: {result.modality}"])}), 0,
                    f"{path}: is a {result.modality} file")
        prediction = predictor.predict(result.samples)
        return _piece_table(path, result, prediction, texts), len(prediction.ids), None

    order = ["ID", "CARD", "FILE", *ID_COLUMNS.values(), *(c.name for c in predictor.columns), "FLAGS"]
    units = {c.name: c.unit for c in predictor.columns if c.unit is not None}
    n_rows, n_used, problems, flagged = 0, 0, [], Counter()
    bar = tqdm(desc=predictor.verb, unit=predictor.modality, disable=not progress)
    with CatalogueWriter(output, units=units, order=order, overwrite=overwrite) as catalogue:  # pieces go to disk as they finish
        for table, n, problem in in_parallel(predict_piece, jobs, workers, processes=predictor.device.type == "cpu",
                                             initializer=keep_freed_memory):
            catalogue.add(table)
            n_rows += len(table)
            n_used += n
            for row, k in zip(*np.unique(np.asarray(table["FLAGS"]), return_counts=True)):  # one entry per distinct FLAGS, not per row
                flagged.update({code.split(":")[0]: int(k) for code in str(row).split("|") if code})
            bar.update(n)
            if problem:
                problems.append(problem)
        bar.close()
        if n_used == 0:
            why = problems[0] if problems else ", ".join(f"{n} {code}" for code, n in sorted(flagged.items()))
            raise InputError(", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else ""),
                             f"nothing usable to {predictor.verb}" + (f" ({why})" if why else ""),
                             f"give {predictor.modality} files readable by `cosmofm inspect`")
    return {"output": str(output), "n_rows": n_rows, "n_predicted": n_used, "n_files": len(files), "flags": dict(sorted(flagged.items()))}


def input_files(inputs) -> list[Path]:
    """Files (and datasets folders) named by `inputs`: paths, or folders of them (not recursive)."""
    from cosmofm.data_cards.readers import detect

    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    out = []
    for p in paths:
        if not p.exists():
            raise InputError(str(p), "does not exist", "check the path")
        if p.is_dir() and (fmt := detect(p)) is not None and fmt.name == "datasets":
            out.append(p)
        elif p.is_dir():
            out += sorted(q for q in p.iterdir() if not q.name.startswith(".") and (q.is_file() or detect(q) is not None))
        else:
            out.append(p)
    if not out:
        raise InputError(", ".join(map(str, paths)), "holds no files", "give survey files, a folder of them or a datasets folder")
    return out


def check_output(output, inputs, files: list[Path], overwrite: bool = False) -> None:
    """InputError unless `output` may take a catalogue: not one of the input `files` (nor a
    link to one), not inside a datasets folder that is read, not in a folder given as
    input (its files are read: the catalogue would be read next time, or replace one),
    not a folder, and not an existing file unless `overwrite`."""
    out = Path(output)
    target = out.resolve()
    folders = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs) if Path(p).is_dir() and Path(p) not in files]  # datasets folders are files
    for f in files:
        if target == f.resolve() or (out.exists() and f.exists() and os.path.samefile(out, f)):
            raise InputError(str(out), f"is one of the inputs ({f})", "write the catalogue to a new file")
        if f.is_dir() and target.is_relative_to(f.resolve()):
            raise InputError(str(out), f"lies inside the datasets folder {f}, which is read", "write the catalogue outside the inputs")
    for folder in folders:
        if target.parent == folder.resolve():
            raise InputError(str(out), f"lies in the input folder {folder}, whose files are read", "write the catalogue outside the input folders")
    if out.is_dir():
        raise InputError(str(out), "is a folder", "give a catalogue file name ending in .fits or .parquet")
    if out.exists() and not overwrite:
        raise InputError(str(out), "already exists", "choose another name, or pass --overwrite (overwrite=True) to replace it")


# ---------------------------------------------------------------------------- catalogue rows of a piece


def _piece_table(path: Path, result, prediction: PiecePrediction, texts: set[str] = frozenset()):
    """One catalogue row per object the reader listed (used or flagged), predictions where
    the task predicted it; FLAGS from the reader's flags and the task's skipped ones.
    `texts`: columns that are text (null = masked), the others are numbers (null = NaN)."""
    from astropy.table import MaskedColumn

    from cosmofm.data_cards.io.catalogue import ID_COLUMNS

    ident = result.identifiers
    ids = [str(x) for x in ident["id"]] if len(ident) else prediction.ids
    position = {sid: k for k, sid in enumerate(prediction.ids)}
    take = np.array([position.get(sid, -1) for sid in ids], dtype=np.int64)
    used = take >= 0
    columns: dict[str, object] = {"CARD": np.full(len(ids), result.card.name if result.card is not None else "")}
    for key, name in ID_COLUMNS.items():
        if len(ident) and key in ident.colnames:
            values = np.asarray(ident[key])
            missing = np.isnan(values) if values.dtype.kind == "f" else (values == "") if values.dtype.kind == "U" else np.zeros(len(values), bool)
            if not missing.all():
                columns[name] = MaskedColumn(values, mask=missing, unit=ident[key].unit) if missing.any() else values
    for name, values in prediction.columns.items():
        if values is None:  # the model cannot fill it: null, of the column's own kind
            columns[name] = MaskedColumn(np.full(len(ids), ""), mask=np.ones(len(ids), bool)) if name in texts else np.full(len(ids), np.nan)
        elif values.dtype.kind == "f":
            columns[name] = np.where(used, values[np.where(used, take, 0)], np.nan)
        else:
            columns[name] = MaskedColumn(values[np.where(used, take, 0)], mask=~used) if not used.all() else values[take]
    flags: dict[str, list[str]] = {}
    for f in result.flags:
        flags.setdefault(f.id, []).append(f.code)
    for f in prediction.skipped:  # a lazy sequence's rows are the identifiers' rows
        flags.setdefault(f.id if f.id is not None else ids[f.index], []).append(f.code)
    columns["FLAGS"] = np.array(["|".join(flags.get(sid, [])) for sid in ids], dtype=str)
    return _row_table(ids, path, columns)


def _row_table(ids: list[str], path: Path, columns: dict):
    """A catalogue piece: ID and FILE, then `columns` (units are the writer's, in `predict_files`)."""
    from astropy.table import Table

    t = Table()
    t["ID"] = np.array(ids)
    t["FILE"] = np.full(len(ids), path.name)
    for name, values in columns.items():
        t[name] = values
    return t


__all__ = ["PiecePrediction", "Predictor", "check_output", "input_files", "predict_files"]
