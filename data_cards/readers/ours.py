"""Our own formats as registry entries: cosmofm FITS (`fits_io`) and datasets folders / Parquet
shards (`hf_io`). Reading is delegated; this only wraps the result in a ReadResult."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.readers.common import ReadResult, fits_hdus, hdu_named, identifiers_table


def sniff_fits(path: Path) -> bool:
    hdus = fits_hdus(path)
    return bool(hdus) and ("CFMFMT" in hdus[0].header or hdu_named(hdus, "SAMPLES") is not None)


def read_fits(path: Path, card=None, limit: int | None = None, rows: slice | None = None) -> ReadResult:
    from cosmofm.data_cards.fits_io import count_rows, read_fits as _read
    from cosmofm.data_cards.readers.common import resolve_card

    card = resolve_card(card)
    if limit is not None:
        start = (rows or slice(None)).start or 0
        stop = (rows or slice(None)).stop
        rows = slice(start, start + limit if stop is None else min(stop, start + limit))
    samples = _read(path, card, rows)
    if card is None:
        from cosmofm.data_cards.schema import load_card

        hdus = fits_hdus(path)
        name = hdus[0].header.get("CARD") if hdus else None
        card = load_card(str(name)) if name else None
        reason = f"CARD = {name!r} in the primary header"
    else:
        reason = "given explicitly"
    modality = card.modality if card else (samples[0].modality if samples else "")
    rows = [{"id": s.id, "used": True, **{k: s.meta[k] for k in ("ra", "dec") if k in s.meta}} for s in samples]
    return ReadResult("cosmofm-fits", path, modality, card, reason, samples, [], identifiers_table(rows), [], n_objects=count_rows(path))


def sniff_dataset(path: Path) -> bool:
    if path.is_dir():
        return (path / "state.json").exists() or (path / "dataset_info.json").exists() or any(_our_parquet(p) for p in path.glob("*.parquet"))
    return path.suffix == ".parquet" and _our_parquet(path)


def _our_parquet(path: Path) -> bool:
    from cosmofm.data_cards.hf_io import COLUMNS

    try:
        names = set(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError):
        return False
    return set(COLUMNS) <= names


def read_dataset(path: Path, card=None, limit: int | None = None) -> ReadResult:
    from cosmofm.data_cards.hf_io import SampleDataset

    ds = SampleDataset(path)
    cards = ds.load_cards()
    if card is not None:
        raise InputError("card", "a datasets folder names its own cards", "drop the card argument for datasets folders")
    only = next(iter(cards.values())) if len(cards) == 1 else None
    modalities = ds.modalities
    reason = "saved with the dataset" if only else f"several cards saved with the dataset: {', '.join(sorted(cards))}"
    return ReadResult("datasets", path, modalities[0] if len(modalities) == 1 else "+".join(modalities), only, reason, ds, [], identifiers_table([]), [], n_objects=len(ds))
