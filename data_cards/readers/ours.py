"""Our own formats as registry entries: cosmofm FITS (`fits_io`) and datasets folders / Parquet
shards (`hf_io`). Reading is delegated; this wraps the result in a ReadResult, with the
per-object leniency and checks the survey readers have (bad elements masked with a flag,
not a refused piece; implausible wavelength and flux units)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Table

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.readers.common import (
    KEPT,
    MASKED,
    Flags,
    ReadResult,
    check_coverage,
    fits_hdus,
    flux_scale,
    flux_scale_problem,
    hdu_named,
    identifiers_table,
    masked_detail,
)
from cosmofm.data_cards.sample import Sample, mask_invalid
from cosmofm.data_cards.schema import SpectrumCard


def sniff_fits(path: Path) -> bool:
    hdus = fits_hdus(path)
    return bool(hdus) and ("CFMFMT" in hdus[0].header or hdu_named(hdus, "SAMPLES") is not None)


def read_fits(path: Path, card=None, limit: int | None = None, rows: slice | None = None) -> ReadResult:
    """Our FITS layout. Unlike `fits_io.read_fits`, which refuses a block with one bad
    element, elements with NaN or negative ivar (or NaN values with ivar > 0) are masked
    with a flag on their object alone; for spectra, wavelengths nowhere near the card are
    an InputError naming the WAVELENGTH unit, and an implausible flux scale flags every
    object (`_check_spectra`)."""
    from cosmofm.data_cards.io.fits_io import count_rows, read_fits as _read
    from cosmofm.data_cards.readers.common import resolve_card

    card = resolve_card(card)
    if limit is not None:
        start = (rows or slice(None)).start or 0
        stop = (rows or slice(None)).stop
        rows = slice(start, start + limit if stop is None else min(stop, start + limit))
    masked: list = []
    samples = _read(path, card, rows, masked=masked)
    if card is None:
        from cosmofm.data_cards.schema import load_card

        hdus = fits_hdus(path)
        name = hdus[0].header.get("CARD") if hdus else None
        card = load_card(str(name)) if name else None
        reason = f"CARD = {name!r} in the primary header"
    else:
        reason = "given explicitly"
    flags = Flags()
    for index, sid, code, n in masked:
        flags.add(index, sid, code, masked_detail(sid, code, n), MASKED)
    if isinstance(card, SpectrumCard) and samples:
        _check_spectra(path, samples, card, flags, first=(rows or slice(None)).start or 0)
    modality = card.modality if card else (samples[0].modality if samples else "")
    rows = [{"id": s.id, "used": True, **{k: s.meta[k] for k in ("ra", "dec") if k in s.meta}} for s in samples]
    return ReadResult("cosmofm-fits", path, modality, card, reason, samples, flags, identifiers_table(rows), [], n_objects=count_rows(path))


SCALE_OBJECTS = 16  # objects (evenly spread over a piece) whose median flux scale judges it


def _check_spectra(path: Path, samples: list[Sample], card: SpectrumCard, flags: Flags, first: int) -> None:
    """The survey readers' per-object plausibility checks, for a whole piece of our own
    spectra at once (their grids are shared): wavelengths near the card's range
    (`check_coverage`) and a flux scale some survey records (`flux_scale`, on SCALE_OBJECTS)."""
    grids = {id(s.coords["wavelength"]): s.coords["wavelength"] for s in samples}.values()  # one when the grid is shared
    lo = min(min(g[0], g[-1]) for g in grids)
    hi = max(max(g[0], g[-1]) for g in grids)
    try:
        check_coverage(card, (lo, hi), f"{path}[SAMPLES].WAVELENGTH")
    except InputError:  # only now is the stated unit worth looking up
        check_coverage(card, (lo, hi), f"{path}[SAMPLES].WAVELENGTH", _tunit(path, "WAVELENGTH"))
    picked = [samples[i] for i in np.linspace(0, len(samples) - 1, min(len(samples), SCALE_OBJECTS)).astype(int)]
    scales = [x for x in (flux_scale(s.values, s.ivar, s.coords["wavelength"], card) for s in picked) if x is not None]
    problem = flux_scale_problem(float(np.median(scales)) if scales else None)
    if problem:
        for k, s in enumerate(samples):
            flags.add(first + k, s.id, "implausible_flux_scale", f"{s.id}: the file's {problem}", KEPT)


def _tunit(path: Path, name: str) -> u.UnitBase:
    """The TUNIT of column `name` of the SAMPLES table, from the cached headers (Angstrom when blank)."""
    from cosmofm.data_cards.io.fits_io import parse_unit

    header = hdu_named(fits_hdus(path) or (), "SAMPLES").header
    index = next((i for i in range(1, header.get("TFIELDS", 0) + 1) if str(header.get(f"TTYPE{i}", "")).strip().upper() == name), None)
    return parse_unit(header.get(f"TUNIT{index}") if index else None, f"{path}[SAMPLES].{name}", u.AA)


def sniff_dataset(path: Path) -> bool:
    if path.is_dir():
        return (path / "state.json").exists() or (path / "dataset_info.json").exists() or any(_our_parquet(p) for p in path.glob("*.parquet"))
    return path.suffix == ".parquet" and _our_parquet(path)


def _our_parquet(path: Path) -> bool:
    from cosmofm.data_cards.io.hf_io import COLUMNS

    try:
        names = set(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError):
        return False
    return set(COLUMNS) <= names


def read_dataset(path: Path, card=None, limit: int | None = None) -> ReadResult:
    """A datasets folder / Parquet shards, read lazily (`MaskingDataset`): identifiers list
    every row's id, in the order of the samples."""
    from cosmofm.data_cards.io.hf_io import SampleDataset

    ds = SampleDataset(path)
    cards = ds.load_cards()
    if card is not None:
        raise InputError("card", "a datasets folder names its own cards", "drop the card argument for datasets folders")
    only = next(iter(cards.values())) if len(cards) == 1 else None
    modalities = ds.modalities
    reason = "saved with the dataset" if only else f"several cards saved with the dataset: {', '.join(sorted(cards))}"
    flags = Flags()
    ids = np.array(ds.hf.data.table.column("id").to_pylist(), dtype=str)
    identifiers = Table({"id": ids, "used": np.ones(len(ids), bool)})
    return ReadResult("datasets", path, modalities[0] if len(modalities) == 1 else "+".join(modalities), only, reason, MaskingDataset(ds, flags), flags,
                      identifiers, [], n_objects=len(ds))


class MaskingDataset(Sequence):
    """A SampleDataset whose rows with elements a Sample refuses (NaN or negative ivar, NaN
    values with ivar > 0) come back with those elements masked, and a MASKED flag added to
    `flags` once per row, rather than as an InputError; other bad rows still raise one."""

    def __init__(self, ds, flags: Flags):
        self.ds, self.flags, self._flagged = ds, flags, set()

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Sample:
        try:
            return self.ds[index]
        except InputError:
            from cosmofm.data_cards.io.hf_io import row_to_sample

            i = int(index) % len(self.ds)
            row = self.ds.hf.data.table.slice(i, 1).to_pylist()[0]  # the slow path: one bad row
            row["ivar"], counts = mask_invalid(np.asarray(row["values"], np.float32), np.asarray(row["ivar"], np.float32))
            sample = row_to_sample(row)  # still an InputError when more than elements is wrong
            if i not in self._flagged:
                self._flagged.add(i)
                for code, n in counts.items():
                    if n:
                        self.flags.add(i, sample.id, code, masked_detail(sample.id, code, int(n)), MASKED)
            return sample
