"""Readers for what surveys publish: one module per format family, one registry, one entry point.

    from cosmofm.data_cards.readers import read_any
    result = read_any("spec-4055-55359-0001.fits")          # card inferred from the headers
    result = read_any("coadd-main-dark-10016.fits", card="desi-like")
    result.samples, result.flags, result.identifiers, result.card, result.card_reason

Every format registers a `Format(name, modality, description, sniff, read)`. `sniff(path)`
is cheap (headers / schema / suffix only); `read(path, card=None, **options)` returns a
`ReadResult`. `detect` asks the sniffers in registry order (most specific first, plain
tables last) and `read_any` reads with the first that answers. Formats:

| name | module | what |
|---|---|---|
| cosmofm-fits | ours | our own FITS layout (fits_io) |
| datasets | ours | datasets folders / Parquet shards (hf_io) |
| sdss-spec | sdss | SDSS/BOSS/eBOSS spec-PLATE-MJD-FIBER.fits (full and lite) |
| sdss-table | sdss | specObj-style multi-object tables with spectra |
| desi-coadd | desi | DESI coadd-*.fits, cameras joined |
| eso-sdp | eso | ESO Phase 3 SCIENCE.SPECTRUM (also 4MOST) |
| fits-cube | cubes | radio spectral cubes (RA/Dec/frequency or velocity) |
| fits-image | images | images with a celestial WCS (one band per HDU or a band cube) |
| table | tables | FITS / Parquet / CSV tables of wavelength, flux, error or ivar |
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.fits_io import count_rows
from cosmofm.data_cards.readers import cubes, desi, eso, images, ours, sdss, tables
from cosmofm.data_cards.readers.common import Flag, ReadResult, air_to_vacuum, fits_hdus, is_fits, vacuum_to_air
from cosmofm.data_cards.readers.cubes import iter_cube_chunks
from cosmofm.data_cards.readers.images import cutouts, read_cutouts


@dataclass(frozen=True)
class Format:
    name: str
    modality: str
    description: str
    sniff: Callable[[Path], bool]
    read: Callable[..., ReadResult]
    # For files of many objects: their number, from headers alone; `read` then takes
    # `rows=slice(...)`, and `iter_read` streams the file in bounded memory.
    count: Callable[[Path], int] | None = None


FORMATS: list[Format] = [
    Format("cosmofm-fits", "", "cosmofm FITS layout (SAMPLES table)", ours.sniff_fits, ours.read_fits, count_rows),
    Format("datasets", "", "cosmofm datasets folder / Parquet shards", ours.sniff_dataset, ours.read_dataset),
    Format("sdss-spec", "spectrum", "SDSS/BOSS/eBOSS spec / spec-lite file (COADD + SPECOBJ HDUs)", sdss.sniff_spec, sdss.read_spec),
    Format("desi-coadd", "spectrum", "DESI coadd file (FIBERMAP + per-camera B/R/Z HDUs)", desi.sniff, desi.read, desi.count),
    Format("eso-sdp", "spectrum", "ESO Phase 3 1D spectrum (SPECTRUM table: WAVE, FLUX, ERR, QUAL)", eso.sniff, eso.read),
    Format("sdss-table", "spectrum", "SDSS specObj-style table (PLATE, MJD, FIBERID + spectra columns)", sdss.sniff_table, sdss.read_table),
    Format("fits-cube", "cube", "FITS spectral cube (RA, Dec, frequency/velocity)", cubes.sniff, cubes.read),
    Format("fits-image", "image", "FITS image(s) with a celestial WCS", images.sniff, images.read),
    Format("table", "spectrum", "plain table (FITS / Parquet / CSV) of wavelength, flux, error or ivar", tables.sniff, tables.read),
]


def register(fmt: Format, before: str | None = None) -> None:
    """Add a format (before the named one, else just ahead of the catch-all plain tables)."""
    names = [f.name for f in FORMATS]
    if fmt.name in names:
        raise InputError("format", f"{fmt.name!r} is already registered", "pick another name")
    FORMATS.insert(names.index(before or "table"), fmt)


def get_format(name: str) -> Format:
    for f in FORMATS:
        if f.name == name:
            return f
    raise InputError("format", f"unknown format {name!r}", f"use one of {[f.name for f in FORMATS]}")


def detect(path: str | os.PathLike) -> Format | None:
    """The first registered format whose sniffer recognises `path` (None if none does)."""
    p = Path(path)
    for f in FORMATS:
        try:
            if f.sniff(p):
                return f
        except (OSError, ValueError):
            continue
    return None


def read_any(path: str | os.PathLike, card=None, format: str | None = None, **options) -> ReadResult:
    """Read any supported file into Samples plus flags, identifiers and the card used.

    Args:
        path: the file (or datasets folder).
        card: a DataCard, a shipped card name or a YAML path; default: inferred from the
            headers (`ReadResult.card_reason` says how).
        format: a registry name to skip detection.
        **options: passed to the format's reader (e.g. `limit`, `wavelength_unit`,
            `flux_unit`, `medium`, `positions`/`size` for images, `chunks` for cubes).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "does not exist", "check the path")
    fmt = get_format(format) if format else detect(p)
    if fmt is None and p.is_file() and is_fits(p) and fits_hdus(p) is None:
        raise InputError(str(p), "is truncated or corrupt (its FITS headers cannot be read)", "re-download or re-write the file")
    if fmt is None:
        raise InputError(str(p), f"is not a format cosmofm recognises ({_what_it_is(p)})", f"supported: {', '.join(f.name for f in FORMATS)}; see `cosmofm.data_cards.readers` for what each needs")
    try:
        return fmt.read(p, card=card, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise InputError(f"{p} ({fmt.name})", f"option not understood: {e}", "see the reader's signature in cosmofm.data_cards.readers") from None
        raise


def iter_read(path: str | os.PathLike, card=None, format: str | None = None, chunk_rows: int = 1024, **options) -> Iterator[ReadResult]:
    """`read_any` in pieces of at most `chunk_rows` objects, for files too big to hold at once.

    Formats that can count their objects from headers (cosmofm FITS, DESI coadds) are read
    in pieces of near-equal size, at most `chunk_rows` rows each (only those rows are read),
    so memory stays bounded whatever the file size (a million spectra); each piece is a
    ReadResult of its own rows, flags and identifiers, with file-wide row numbers; a piece
    may hold no usable object (its flags say why). Other formats hold one or a few objects
    per file and come in one piece, as `read_any` reads them. `piece_readers` gives the
    same pieces as calls to make later (e.g. in parallel).
    """
    for read in piece_readers(path, card, format, chunk_rows, **options):
        yield read()


def piece_readers(path: str | os.PathLike, card=None, format: str | None = None, chunk_rows: int = 1024, min_pieces: int = 1,
                  **options) -> list[Callable[[], ReadResult]]:
    """The pieces of `iter_read` as zero-argument functions, each reading its own rows (at
    most `chunk_rows`). Where the format can split, the pieces are as near equal in size
    as rows allow and come in a multiple of `min_pieces`, so that that many parallel
    workers each get the same share and finish together (40,000 rows in pieces of 1,024
    would leave one worker a last piece of 64 rows while the other works through a whole one)."""
    if chunk_rows < 1:
        raise InputError("chunk_rows", f"must be >= 1, got {chunk_rows}", "e.g. 1024")
    p = Path(path)
    fmt = get_format(format) if format else (detect(p) if p.exists() else None)
    if fmt is None or fmt.count is None or "limit" in options:
        return [functools.partial(read_any, p, card=card, format=format, **options)]
    total = fmt.count(p)
    share = max(1, min_pieces)
    n_pieces = max(1, -(-total // chunk_rows))  # pieces of at most chunk_rows ...
    n_pieces = -(-n_pieces // share) * share  # ... rounded up to a multiple of the workers
    bounds = [i * total // n_pieces for i in range(n_pieces + 1)]  # sizes differ by at most one row
    rows = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [slice(0, 1)]  # an empty file: one (empty) piece
    return [functools.partial(read_any, p, card=card, format=fmt.name, rows=r, **options) for r in rows]


def _what_it_is(p: Path) -> str:
    if p.is_dir():
        return "a folder without state.json, dataset_info.json or sample Parquet shards"
    hdus = fits_hdus(p)
    if hdus is None:
        return f"not FITS, suffix {p.suffix!r}"
    parts = []
    for h in hdus:
        desc = f"{h.name} ({h.kind}"
        if h.columns:
            desc += ": " + ", ".join(h.columns[:8]) + (", ..." if len(h.columns) > 8 else "")
        parts.append(desc + ")")
    return "FITS with HDUs " + "; ".join(parts) + "; no survey markers (COADD, B_FLUX + FIBERMAP, SPECTRUM, celestial WCS) and no wavelength/flux columns"


__all__ = [
    "FORMATS",
    "Flag",
    "Format",
    "ReadResult",
    "air_to_vacuum",
    "cutouts",
    "detect",
    "get_format",
    "iter_cube_chunks",
    "iter_read",
    "piece_readers",
    "read_any",
    "read_cutouts",
    "register",
    "vacuum_to_air",
]
