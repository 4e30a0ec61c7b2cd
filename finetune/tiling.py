"""Tiled inference over images and cubes larger than memory: tile plan, workers, de-duplication.

    plan = TilePlan(shape=(4096, 4096), tile=512, overlap=64)
    summary = run_tiled(open_mosaic("field.fits"), finder, "catalogue.fits", plan, template=empty_table)

The plumbing `cosmofm deblend` (finetune/deblend.py) and `cosmofm detect` (finetune/detect.py)
share. A *source* (`data_cards.readers.mosaic`: `Mosaic`, `SurveyCube`) reads any region
of a memory-mapped FITS file; a *tile finder* (the shared contract below) finds sources
in one tile; this module cuts the array into tiles, runs the finder over them in worker
processes and writes one catalogue:

1. The plan (`TilePlan`): along each tiled axis (rows, columns; and channels for cubes)
   the *cores* partition the array exactly (k near-equal pieces, k the fewest for which
   core + overlap <= tile), and a tile is its core grown by half the overlap on each
   inner side, clipped at the array's edges (so edge tiles are smaller, never padded).
2. Each tile is read lazily (`source.read`: a `hdu.section` of the memory-mapped file)
   with its own header (`source.tile_header`: the WCS with CRPIX shifted to the tile),
   and a tile with no usable pixel (every ivar 0 / NaN) is skipped and counted.
3. `finder(values, ivar, header) -> Table` returns 0-based centroid columns in the tile's
   frame (`ROW`, `COL`; cubes `CHAN`, `ROW`, `COL`) plus its property columns. They are
   shifted to the full frame, and a source is kept only by the tile whose core holds its
   centre (a centroid c is in core [lo, hi) when lo - 0.5 <= c < hi - 0.5; the outermost
   cores extend to infinity, so a centroid just off the image is kept once). A source of
   half-extent below overlap / 2 lies whole in the tile whose core holds its centre, so it
   is measured exactly as on the full image; its other copies are dropped.
4. World columns from the full WCS (`source.add_world`: RA/DEC, or ra/dec/central_freq),
   then the verb's `finish` (flags, renames, optional per-source stamps).
5. Tiles run in worker processes (`data_cards.workers.in_parallel`: forked, at most two
   tiles per worker in flight, results in tile order), and each tile's rows go to the
   catalogue as soon as it is done (`CatalogueWriter`: spooled, then written atomically).
   Peak memory is one tile and its temporaries per worker, whatever the image size.
6. Launched as several processes (accelerate launch / torchrun, e.g. one per GPU, on one
   node or several), each runs every world-th tile and rank 0 writes the same catalogue
   (`finetune.tiling_dist`); one process without a launcher forms no process group.

Catalogue (.fits): an empty primary HDU carrying the run's keywords (method, tile plan,
skipped tiles, input flags), the catalogue BinTable, then optionally one ImageHDU per
source stamp (EXTNAME SRC<ID>), assembled from spooled parts and renamed into place, so the
file appears whole or not at all. CatalogueWriter writes a single table, so the primary
keywords and the stamps are joined here byte-wise (FITS HDUs are 2880-byte-block
sequences); `.parquet` gets the rows only (no keywords, no stamps).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
from astropy.io import fits
from astropy.table import Table

from cosmofm.data_cards.errors import InputError

TileFinder = Callable[[np.ndarray, "np.ndarray | None", fits.Header], Table]
TILE_ROW = "_TILE_ROW"  # the finder's row index, kept through the core cut for `finish` (segmentation labels)


class TileSource(Protocol):
    """What the tiler reads from (`data_cards.readers.mosaic.Mosaic` / `SurveyCube`)."""

    shape: tuple[int, ...]  # the tiled axes, e.g. (H, W) or (C, H, W)
    axes: tuple[str, ...]  # the finder's centroid column per axis, e.g. ("ROW", "COL")

    def read(self, region: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]: ...

    def tile_header(self, region: tuple[slice, ...]) -> fits.Header: ...

    def add_world(self, table: Table) -> None: ...


# ---------------------------------------------------------------------------- the plan


def axis_tiles(n: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(read_lo, read_hi, core_lo, core_hi) of each tile along an axis of n pixels: cores
    partition [0, n) in the fewest near-equal pieces for which every tile fits in `tile`."""
    if n <= tile:
        return [(0, n, 0, n)]
    low = overlap // 2  # grown on the low side; overlap - low on the high side
    k = max(1, math.ceil((n - overlap) / (tile - overlap)))
    while True:
        cuts = [round(j * n / k) for j in range(k + 1)]
        spans = [(max(0, cuts[j] - low), min(n, cuts[j + 1] + overlap - low), cuts[j], cuts[j + 1]) for j in range(k)]
        if max(hi - lo for lo, hi, _, _ in spans) <= tile:
            return spans
        k += 1


@dataclass(frozen=True)
class Tile:
    """One tile: `read` (slices of the full array it covers) and `core` ((lo, hi) pixel
    bounds per axis on the centroids it keeps; +-inf at the array's outer edges)."""

    index: int
    read: tuple[slice, ...]
    core: tuple[tuple[float, float], ...]

    @property
    def origin(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.read)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.read)

    def holds(self, centres: np.ndarray) -> np.ndarray:
        """(n,) bool: which full-frame centroids (n, ndim) lie in the core (NaN: none)."""
        keep = np.ones(len(centres), bool)
        for ax, (lo, hi) in enumerate(self.core):
            c = centres[:, ax]
            keep &= (c >= lo - 0.5) & (c < hi - 0.5)  # NaN compares False: dropped
        return keep


@dataclass(frozen=True)
class TilePlan:
    """Tiles of at most `tile` pixels per axis overlapping by `overlap` (ints: the same on
    every axis, or one per axis in array order) over an array of `shape`."""

    shape: tuple[int, ...]
    tile: tuple[int, ...] | int
    overlap: tuple[int, ...] | int = 0

    def __post_init__(self):
        nd = len(self.shape)
        tile, overlap = (_per_axis(v, nd, name) for v, name in ((self.tile, "tile"), (self.overlap, "overlap")))
        for t, o, n in zip(tile, overlap, self.shape):
            if t < 1 or o < 0:
                raise InputError("tile", f"tile {tile} / overlap {overlap} must be >= 1 / >= 0 pixels", "e.g. --tile 512 --overlap 64")
            if o >= t and n > t:
                raise InputError("overlap", f"{overlap} must be smaller than the tile {tile}", "give an overlap of about the largest source's size, well below the tile")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "overlap", overlap)
        object.__setattr__(self, "_axes", [axis_tiles(int(n), t, o) for n, t, o in zip(self.shape, tile, overlap)])

    def __len__(self) -> int:
        return math.prod(len(a) for a in self._axes)

    def __iter__(self) -> Iterator[Tile]:
        for index, spans in enumerate(itertools.product(*self._axes)):
            read = tuple(slice(lo, hi) for lo, hi, _, _ in spans)
            core = tuple((-math.inf if c0 == 0 else float(c0), math.inf if c1 == n else float(c1)) for (_, _, c0, c1), n in zip(spans, self.shape))
            yield Tile(index, read, core)

    @property
    def largest(self) -> tuple[int, ...]:
        """The largest tile's shape (what one worker holds)."""
        return tuple(max(hi - lo for lo, hi, _, _ in a) for a in self._axes)


def _per_axis(value, nd: int, name: str) -> tuple[int, ...]:
    values = (value,) * nd if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != nd or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise InputError(name, f"{value!r} is not one whole number or {nd} of them", f"e.g. {name} 512, or {nd} comma-separated numbers in array order")
    return tuple(int(v) for v in values)


# ---------------------------------------------------------------------------- the run


def run_tiled(source: TileSource, finder: TileFinder, output, plan: TilePlan, *, template: Table, id_column: str = "ID",
              finish: Callable | None = None, keywords: dict | None = None, stamps: bool = False, workers: int | None = None,
              processes: bool = True, progress: bool = True, verb: str = "tiles", overwrite: bool = False, inputs=()) -> dict:
    """Run `finder` over every tile of `source`; write the catalogue to `output` (.fits / .parquet).

    template: the catalogue's columns with units and zero rows (written first, so an empty
        result is a valid catalogue with every column); its order is the catalogue's.
    id_column: the running source number, 0..n-1 in tile order.
    finish(table, tile, values, ivar) -> (table, stamps or None): the verb's last step in
        the worker, after the core cut and the world columns (`TILE_ROW` holds each row's
        index in the finder's answer); stamps: one (data, header) or None per row.
    keywords: (value, comment) or value per primary-header keyword (.fits only).
    stamps: write the stamps `finish` returns (.fits only). workers: None = one per core.
    processes: fork worker processes (False: threads, e.g. for a model on a GPU).
    inputs: the input file(s), which `output` may not replace.

    Returns {"output", "n_sources", "n_tiles", "n_skipped_tiles", "skipped", "seconds"};
    InputError when no tile had a usable pixel. Launched (accelerate launch / torchrun:
    `tiling_dist.launched`), each rank runs its share of the tiles, rank 0 writes the one
    catalogue, and every rank returns the same summary plus "rank", "world_size" and
    "tiles_per_rank" (`finetune.tiling_dist`).
    """
    from cosmofm.data_cards.io.catalogue import catalogue_format
    from cosmofm.data_cards.workers import in_parallel, keep_freed_memory, n_workers
    from cosmofm.finetune.predict import check_output
    from cosmofm.finetune.tiling_dist import launched_ranks

    output = Path(output)
    fmt = catalogue_format(output)
    files = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    check_output(output, files, files, overwrite)
    if stamps and fmt != "fits":
        raise InputError(str(output), "per-source stamps need a FITS catalogue", "write the catalogue as .fits, or leave out --write-stamps")
    if tuple(plan.shape) != tuple(source.shape):
        raise InputError("plan", f"is for shape {plan.shape}, the input is {source.shape}", "build the plan from the source's shape")
    ranks = launched_ranks()  # None: one process, no launcher (no process group is formed)
    tiles = iter(plan) if ranks is None else ranks.tiles(plan)
    n_run = len(plan) if ranks is None else len(tiles)
    workers = min(n_workers(workers), len(plan)) if ranks is None else ranks.workers(workers, n_run)
    if workers < 1:
        raise InputError("workers", f"must be >= 1, got {workers}", "e.g. --workers 2")
    t0 = time.perf_counter()

    def process(tile: Tile) -> dict:
        """One tile in a worker: read, find, shift, keep the core, world columns, finish."""
        values, ivar = source.read(tile.read)
        if ivar is not None and not np.any(ivar > 0):
            return {"index": tile.index, "skipped": "tile_all_masked", "table": None, "stamps": None}
        table = finder(values, ivar, source.tile_header(tile.read))
        table = _checked(table, source.axes, finder)
        table[TILE_ROW] = np.arange(len(table))
        for ax, name in enumerate(source.axes):
            table[name] = np.asarray(table[name], np.float64) + tile.read[ax].start
        centres = np.column_stack([np.asarray(table[n]) for n in source.axes]) if len(table) else np.zeros((0, len(source.axes)))
        table = table[tile.holds(centres)]
        source.add_world(table)
        cut = None
        if finish is not None:
            table, cut = finish(table, tile, values, ivar)
        del table[TILE_ROW]
        table.meta.clear()  # a finder's segmentation map / stamps stay in the worker
        return {"index": tile.index, "skipped": None, "table": table, "stamps": cut if stamps else None}

    results = in_parallel(process, tiles, workers, processes=processes, initializer=keep_freed_memory,
                          progress=progress and (ranks is None or ranks.main), desc=verb, unit="tile", total=n_run)
    if ranks is not None:  # launched: this rank's share of the tiles, then rank 0 merges (finetune.tiling_dist)
        from cosmofm.finetune.tiling_dist import run_shard

        shard = run_shard(ranks, results, output, fmt, plan, template, id_column, stamps, keywords, files, overwrite)
        return {"output": str(output), "n_sources": shard.pop("n_sources"), "n_tiles": len(plan), "n_skipped_tiles": sum(shard["skipped"].values()),
                **shard, "seconds": time.perf_counter() - t0}
    part = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}"
    catalogue_path = Path(f"{part}.catalogue.fits") if fmt == "fits" else output
    stamp_path = Path(f"{part}.stamps") if stamps else None
    try:
        spooled = _spool(results, catalogue_path, stamp_path, template, id_column, True if fmt == "fits" else overwrite, len(plan), files)
        skipped, n_sources = spooled["skipped"], spooled["n_sources"]
        if fmt == "fits":
            _assemble_fits(output, catalogue_path, stamp_path, _primary_keywords(plan, sum(skipped.values()), n_sources, keywords))
    finally:
        for p in (catalogue_path if fmt == "fits" else None, stamp_path):
            if p is not None:
                p.unlink(missing_ok=True)
    return {"output": str(output), "n_sources": n_sources, "n_tiles": len(plan), "n_skipped_tiles": sum(skipped.values()),
            "skipped": dict(skipped), "seconds": time.perf_counter() - t0}


def _spool(results, catalogue_path: Path, stamp_path: Path | None, template: Table, id_column: str, overwrite: bool,
           whole: int | None = None, files=()) -> dict:
    """The tiles' results, as they come, into a catalogue (ids 0.. in their order) and a stamp
    file; InputError when all `whole` tiles were skipped (None: the caller checks, over ranks).
    Returns n_sources, skipped (Counter), tiles (results read), rows ([tile index, its rows]
    per tile run) and stamps ([id, byte offset, header bytes, bytes] per stamp written)."""
    from cosmofm.data_cards.io.catalogue import CatalogueWriter

    skipped: Counter = Counter()
    n_sources, n_tiles, rows, index = 0, 0, [], []
    stamp_file = open(stamp_path, "wb") if stamp_path else None
    try:
        with CatalogueWriter(catalogue_path, order=list(template.colnames), overwrite=overwrite) as catalogue:
            catalogue.add(template[:0])  # every column with its unit, even when nothing is found
            for result in results:
                n_tiles += 1
                if result["skipped"]:
                    skipped[result["skipped"]] += 1
                    continue
                table = result["table"]
                table[id_column] = np.arange(n_sources, n_sources + len(table), dtype=np.int64)
                if stamp_file is not None and result["stamps"] is not None:
                    for sid, stamp in zip(table[id_column], result["stamps"]):
                        if stamp is not None:
                            at = stamp_file.tell()
                            head = _write_extension(stamp_file, stamp[0], stamp[1], f"SRC{sid}", int(sid))
                            index.append([int(sid), at, head, stamp_file.tell() - at])
                n_sources += len(table)
                rows.append([result["index"], len(table)])
                catalogue.add(table)
            if whole is not None and sum(skipped.values()) == whole:
                raise _nothing_usable(files, whole)
    finally:
        if stamp_file is not None:
            stamp_file.close()
    return {"n_sources": n_sources, "skipped": skipped, "tiles": n_tiles, "rows": rows, "stamps": index}


def _nothing_usable(files, n: int) -> InputError:
    return InputError(str(files[0]) if files else "input", f"nothing usable: all {n} tiles have no pixel with ivar > 0",
                      "give an image or cube with finite, unmasked pixels")


def _primary_keywords(plan: TilePlan, n_skipped: int, n_sources: int, keywords: dict | None) -> dict:
    """The catalogue's primary-header keywords: the tile plan, skipped tiles, sources, then the verb's."""
    return {"NTILES": (len(plan), "tiles run"), "NSKIPTIL": (n_skipped, "tiles skipped: no usable pixel"),
            "TILE": (",".join(map(str, plan.tile)), "tile size [pixels], array order"),
            "OVERLAP": (",".join(map(str, plan.overlap)), "tile overlap [pixels], array order"), "NSOURCES": n_sources, **(keywords or {})}


def _checked(table, axes: Sequence[str], finder) -> Table:
    """The finder's answer as a Table with float centroid columns `axes`, or an InputError."""
    name = getattr(finder, "__name__", type(finder).__name__)
    if not isinstance(table, Table):
        raise InputError(f"tile finder {name}", f"returned a {type(table).__name__}, not an astropy Table", "return a Table (empty when nothing is found)")
    missing = [a for a in axes if a not in table.colnames]
    if missing:
        raise InputError(f"tile finder {name}", f"returned no centroid column(s) {missing}", f"return 0-based tile-frame pixel columns {list(axes)}")
    return table


# ---------------------------------------------------------------------------- FITS assembly


def _write_extension(f, data: np.ndarray, header: fits.Header | None, extname: str, source_id: int) -> int:
    """Append one float32 ImageHDU (header + big-endian data, padded to 2880 bytes) to an open
    file; returns the header's bytes."""
    data = np.asarray(data, np.float32)
    hdu = fits.ImageHDU(data=data, header=header, name=extname)
    hdu.header["ID"] = (source_id, "catalogue row of this source")
    head = hdu.header.tostring().encode("ascii")
    f.write(head)
    raw = np.ascontiguousarray(data, dtype=">f4").tobytes()
    f.write(raw)
    f.write(b"\0" * (-len(raw) % 2880))
    return len(head)


def _assemble_fits(output: Path, catalogue: Path, stamps: Path | None, keywords: dict) -> None:
    """output = primary HDU with `keywords` + the catalogue's BinTable + the stamp HDUs, atomically."""
    primary = fits.PrimaryHDU()
    for key, value in keywords.items():
        primary.header[key] = value
    with fits.open(catalogue) as hdul:
        start = hdul[1].fileinfo()["hdrLoc"]  # the BinTable, after the catalogue's empty primary
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as out:
            out.write(primary.header.tostring().encode("ascii"))
            with open(catalogue, "rb") as f:
                f.seek(start)
                shutil.copyfileobj(f, out, 1 << 22)
            if stamps is not None:
                with open(stamps, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cli_shape(text: str | Sequence[int] | int | None, nd: int, name: str) -> tuple[int, ...] | int | None:
    """A --tile / --overlap argument: "512" (every axis) or "256,128,128" (array order)."""
    if text is None or isinstance(text, (int, tuple, list)):
        return text
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise InputError(f"--{name}", f"{text!r} is not a whole number or comma-separated whole numbers", f"e.g. --{name} 512") from None
    if len(values) == 1:
        return values[0]
    if len(values) != nd:
        raise InputError(f"--{name}", f"{text!r} gives {len(values)} numbers for {nd} axes", f"give one number or {nd}, in array order")
    return values


__all__ = ["TILE_ROW", "Tile", "TileFinder", "TilePlan", "TileSource", "axis_tiles", "cli_shape", "run_tiled"]
