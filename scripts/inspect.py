"""`cosmofm inspect PATH`: say what a file or folder is, in physical terms.

Recognises data cards (YAML), cosmofm FITS files, datasets folders / Parquet, model
release folders and training runs. Survey-native formats (SDSS, DESI, ESO) arrive
with their readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import AXES, COORD_UNITS, Sample


def describe(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "does not exist", "give a FITS file, a datasets folder, a data card or a model folder")
    if p.suffix in (".yaml", ".yml"):
        return _card(p)
    if p.suffix.lower() in (".fits", ".fit", ".fz") or p.name.endswith(".fits.gz"):
        return _fits(p)
    if p.is_dir() and (p / "config.json").exists():
        return _model(p)
    if p.is_dir() and (p / "checkpoints").is_dir():
        return _run(p)
    if p.suffix == ".parquet" or (p.is_dir() and ((p / "dataset_info.json").exists() or list(p.glob("*.parquet")))):
        return _dataset(p)
    raise InputError(str(p), "is not a format cosmofm recognises", "expected a data card (.yaml), FITS file, datasets folder, Parquet, model or run folder")


def _card(p: Path) -> str:
    from cosmofm.data_cards.schema import load_card

    card = load_card(p)
    lines = [f"data card {card.name!r}: {type(card).__name__} ({card.modality}), survey {card.survey}"]
    for key, value in card.to_dict()[card.block].items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _summary(samples: list[Sample], header: str) -> str:
    modalities = sorted({s.modality for s in samples})
    lines = [header, f"  objects: {len(samples)}, modalities: {', '.join(modalities)}, cards: {', '.join(sorted({s.card for s in samples}))}"]
    for modality in modalities:
        group = [s for s in samples if s.modality == modality]
        shapes = sorted({s.shape for s in group})
        lines.append(f"  {modality}: shapes {', '.join(str(s) for s in shapes)}")
        for axis in AXES[modality]:
            lo = min(float(s.coords[axis].min()) for s in group)
            hi = max(float(s.coords[axis].max()) for s in group)
            lines.append(f"    {axis}: {lo:.6g} .. {hi:.6g} {COORD_UNITS[axis]}")
        snr = [np.median(np.abs(s.values[s.ivar > 0]) * np.sqrt(s.ivar[s.ivar > 0])) for s in group if (s.ivar > 0).any()]
        masked = [float((s.ivar == 0).mean()) for s in group]
        lines.append(f"    median per-element S/N: {np.median(snr):.3g}" if snr else "    no unmasked elements")
        lines.append(f"    masked fraction: {np.mean(masked):.3%}")
    return "\n".join(lines)


def _fits(p: Path) -> str:
    from cosmofm.data_cards.fits_io import data_unit, read_fits
    from cosmofm.data_cards.schema import load_card

    samples = read_fits(p)
    unit = data_unit(load_card(samples[0].card)) if samples else "?"
    return _summary(samples, f"FITS file {p} (cosmofm layout), values in {unit}")


def _dataset(p: Path) -> str:
    from cosmofm.data_cards.hf_io import SampleDataset

    ds = SampleDataset(p)
    n = len(ds)
    show = [ds[i] for i in np.linspace(0, n - 1, min(n, 200)).astype(int)] if n else []
    return _summary(show, f"dataset {p}: {n} samples ({len(show)} summarised)")


def _model(p: Path) -> str:
    from cosmofm.pretrain.checkpoint import verify_manifest

    config = json.loads((p / "config.json").read_text())
    try:
        files = verify_manifest(p, required=("config.json",))
        integrity = f"manifest ok ({len(files)} files verified by sha256)"
    except InputError as e:
        integrity = f"NOT VERIFIED: {e}"
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "survey_names", "schema_version")
    lines = [f"model folder {p}: {integrity}"] + [f"  {k}: {config.get(k)}" for k in keys if k in config]
    return "\n".join(lines)


def _run(p: Path) -> str:
    from cosmofm.pretrain.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(p)
    lines = [f"training run {p}", f"  latest checkpoint: {ckpt}"]
    metrics = p / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            lines.append(f"  steps logged: {rows[-1]['step']}, loss {rows[0]['loss']:.4g} -> {rows[-1]['loss']:.4g}")
    return "\n".join(lines)
