"""`cosmofm inspect PATH`: say what a file or folder is, in physical terms.

Recognises data cards (YAML), model release folders and training runs here, and every
data format through the reader registry (`cosmofm.data_cards.readers`): cosmofm FITS,
datasets folders / Parquet, SDSS spec / spec-lite and specObj-style tables, DESI coadds,
ESO Phase 3 spectra (4MOST), plain FITS / Parquet / CSV spectrum tables, FITS images and
radio cubes. For data it prints the format, modality, the card chosen and why, the
coordinate ranges with units, the number of objects, the median S/N, the per-object
flags and the conventions applied; a file it cannot use gets one line naming what is
missing.

A model folder is described even when it fails its checks (the manifest's sha256
sums, a config.json that is an object, weights that fit the config): `describe` then
raises `NotVerified`, which carries the description, so `cosmofm inspect` prints it and
exits with status 2.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import AXES, COORD_UNITS, Sample


class NotVerified(InputError):
    """A path that failed a check; `description` is what could still be read from it."""

    def __init__(self, field: str, problem: str, fix: str = "", description: str = ""):
        super().__init__(field, problem, fix)
        self.description = description

    def __reduce__(self):
        return type(self), (self.field, self.problem, self.fix, self.description)


# Objects read for a summary: enough for ranges and S/N, bounded for huge tables / cubes.
PREVIEW_OBJECTS = 2000
PREVIEW_CHUNKS = 16


def describe(path: str | Path, card=None, **options) -> str:
    """A human-readable description of `path`; `card` and `options` go to the reader."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "does not exist", "give a FITS file, a datasets folder, a data card or a model folder")
    if p.suffix in (".yaml", ".yml"):
        return _card(p)
    if p.is_dir() and (p / "config.json").exists():
        return _model(p)
    if p.is_dir() and (p / "checkpoints").is_dir():
        return _run(p)
    return _data(p, card, options)


def _data(p: Path, card, options: dict) -> str:
    from cosmofm.data_cards.readers import detect, read_any

    fmt = detect(p)
    if fmt is not None and fmt.name == "datasets":
        return _dataset(p)
    if fmt is not None and fmt.name == "fits-cube":
        options = {"chunks": "auto", "limit": PREVIEW_CHUNKS, **options}
    elif fmt is not None and fmt.name != "fits-image":  # cosmofm FITS and tables read only the rows previewed
        options = {"limit": PREVIEW_OBJECTS, **options}
    result = read_any(p, card=card, format=fmt.name if fmt else None, **options)
    if result.format == "cosmofm-fits":
        from cosmofm.data_cards.io.fits_io import data_unit

        unit = data_unit(result.card) if result.card else "?"
        return _summary(list(result.samples), f"FITS file {p} (cosmofm layout), values in {unit}") + _extras(result, card_line=True, limit=options.get("limit"))
    from cosmofm.data_cards.io.fits_io import data_unit

    header = (
        f"{fmt.description if fmt else result.format} {p}\n"
        f"  format: {result.format}, modality: {result.modality}, values in {data_unit(result.card)}\n"
        f"  card: {result.card.name} ({result.card_reason})"
    )
    return _summary(list(result.samples), header) + _extras(result, card_line=False, limit=options.get("limit"))


def _extras(result, card_line: bool, limit: int | None = None) -> str:
    """Card and why, object counts, flags, conventions and identifier columns of a ReadResult
    (read up to `limit` objects)."""
    lines = []
    if card_line and result.card is not None:
        lines.append(f"  card: {result.card.name} ({result.card_reason})")
    used = len(result.samples)
    if limit is not None and result.n_objects > limit:
        lines.append(f"  objects in file: {result.n_objects}; the first {limit} read for this summary, {used} usable")
    elif result.n_objects and result.n_objects != used:
        lines.append(f"  objects in file: {result.n_objects}, usable: {used}")
    counts = result.flag_counts()
    if counts:
        lines.append("  flags: " + ", ".join(f"{n} {code}" for code, n in sorted(counts.items())))
        for f in result.flags[:5]:
            lines.append(f"    - [{f.action}] {f.detail}")
        if len(result.flags) > 5:
            lines.append(f"    ... {len(result.flags) - 5} more")
    else:
        lines.append("  flags: none")
    for note in result.notes:
        lines.append(f"  note: {note}")
    ids = [c for c in result.identifiers.colnames if c not in ("id", "used")]
    if ids:
        lines.append("  identifiers: " + ", ".join(c.upper() for c in ids))
    return "\n" + "\n".join(lines)


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


def _dataset(p: Path) -> str:
    from cosmofm.data_cards.io.hf_io import SampleDataset

    ds = SampleDataset(p)
    n = len(ds)
    show = [ds[i] for i in np.linspace(0, n - 1, min(n, 200)).astype(int)] if n else []
    return _summary(show, f"dataset {p}: {n} samples ({len(show)} summarised)")


def _model(p: Path) -> str:
    from cosmofm.finetune.release_folder import verify_release
    from cosmofm.finetune.release import check_release

    failure = None
    try:
        files = verify_release(p)
        cls, _, n_tensors = check_release(p)
        integrity = f"manifest ok ({len(files)} files verified by sha256), weights fit config.json ({n_tensors} tensors of a {cls.__name__})"
    except InputError as e:
        integrity, failure = f"NOT VERIFIED: {e}", e
    config = {}
    with contextlib.suppress(ValueError, OSError):  # shown as far as it parses, verified or not
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "survey_names", "schema_version")
    config = config if isinstance(config, dict) else {}
    lines = [f"model folder {p}: {integrity}"] + [f"  {k}: {config.get(k)}" for k in keys if k in config]
    if failure is not None:
        raise NotVerified(failure.field, failure.problem, failure.fix, description="\n".join(lines))
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
