"""The model card (README.md with YAML metadata) of a release, generated, never hand-written.

Everything in the card comes from three sources, so two releases of the same model
differ only where their inputs differ:

* `config.json`: architecture, sizes, objectives, surveys, schema version;
* the data cards the model was trained on (`data_cards/*.yaml`): surveys, modalities,
  licences, provenance, citations, and whether the data are simulated;
* the evaluation JSON (`eval_results.json`), which becomes the card's `model-index`
  (the Hub's format for measured metrics) and the evaluation table.

Evaluation JSON format (one entry per task and dataset; `name` and `split` optional)::

    {"results": [
      {"task": {"type": "masked-modelling", "name": "Masked-token reconstruction"},
       "dataset": {"type": "sdss-like+lsst-like", "name": "held-out mocks", "split": "test"},
       "metrics": [{"type": "chi2_per_dof", "name": "masked chi2/dof", "value": 1.07}]}
    ]}

The front matter follows the Hub's model card specification and parses with
`huggingface_hub.ModelCard` (tested).
"""

from __future__ import annotations

import json
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.schema import DataCard

LIBRARY_NAME = "cosmofm"
MODEL_LICENSE = "bsd-3-clause"  # cosmofm's own licence; the data's are listed per card
_MODALITY_WORDS = {"spectrum": "spectra (1D)", "image": "multi-band images (2D)", "cube": "radio cubes (3D)",
                   "field": "simulated fields / lightcones (3D)"}


# ---------------------------------------------------------------------------------
# Evaluation results
# ---------------------------------------------------------------------------------


def load_eval_results(source: str | os.PathLike | dict | list) -> list[dict]:
    """Read and check an evaluation JSON (path, dict with "results", or the list itself).

    Returns the results normalised to the Hub's model-index entries. Errors name the
    offending field, e.g. `eval_results.json: results[0].metrics[1].value`.
    """
    where = "eval_results"
    raw: Any = source
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            raw = json.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(where, "does not exist", "give the evaluation JSON written by the evaluation step") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(where, f"is not valid JSON ({exc})", "fix the file") from exc
    results = raw.get("results") if isinstance(raw, dict) else raw
    if not isinstance(results, list):
        raise InputError(f"{where}: results", "must be a list of {task, dataset, metrics} entries", "see cosmofm.finetune.model_card")
    out = []
    for i, entry in enumerate(results):
        at = f"{where}: results[{i}]"
        if not isinstance(entry, dict):
            raise InputError(at, "must be an object with task, dataset and metrics", "see cosmofm.finetune.model_card")
        task = _strings(entry.get("task"), f"{at}.task", required=("type",), optional=("name",))
        dataset = _strings(entry.get("dataset"), f"{at}.dataset", required=("type", "name"), optional=("split", "config", "revision"))
        metrics = entry.get("metrics")
        if not isinstance(metrics, list) or not metrics:
            raise InputError(f"{at}.metrics", "must be a non-empty list", 'e.g. [{"type": "accuracy", "value": 0.9}]')
        clean = []
        for j, metric in enumerate(metrics):
            m = _strings(metric, f"{at}.metrics[{j}]", required=("type",), optional=("name",))
            value = metric.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{at}.metrics[{j}].value", f"must be a finite number, got {value!r}", "record the measured value")
            clean.append({**m, "value": float(value) if isinstance(value, float) else value})
        out.append({"task": task, "dataset": dataset, "metrics": clean})
    return out


def _strings(block: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    if not isinstance(block, dict):
        raise InputError(where, "must be an object", f"give {', '.join(required)} as strings")
    out = {}
    for name in required + optional:
        value = block.get(name)
        if value is None and name in optional:
            continue
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}.{name}", f"must be a non-empty string, got {value!r}", f"set {name}")
        out[name] = value
    return out


def model_index(results: list[dict], model_name: str) -> list[dict]:
    """The Hub's `model-index` metadata for `results` (as returned by load_eval_results)."""
    return [{"name": model_name, "results": results}] if results else []


# ---------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------


def count_parameters(folder: str | os.PathLike) -> int:
    """Number of stored weights, read from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    from cosmofm.finetune.release_folder import WEIGHTS_INDEX_NAME, release_weight_files

    total = 0
    for name in release_weight_files(folder):
        if name == WEIGHTS_INDEX_NAME:
            continue
        with safe_open(Path(folder) / name, framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def is_simulated(card: DataCard) -> bool:
    """Simulated or mock data (the cards say so in their provenance, or are fields)."""
    text = f"{card.provenance} {card.description}".lower()
    return card.modality == "field" or "mock" in text or "simulat" in text


def _version() -> str:
    try:
        return metadata.version("cosmofm")
    except metadata.PackageNotFoundError:
        return "unknown"


def render_model_card(config: dict, cards: list[DataCard], eval_results: list[dict], recipe: dict | None, *,
                      n_parameters: int | None = None, repo_id: str | None = None) -> str:
    """README.md for a release: YAML front matter (library_name, license, tags, datasets,
    model-index) and a body with details, usage, data, recipe, evaluation, intended use,
    limitations, sim-to-data caveats and integrity notes."""
    arch = (config.get("architectures") or ["CosmoFMModel"])[0]
    modalities = sorted({c.modality for c in cards})
    name = repo_id.split("/")[-1] if repo_id else "cosmofm"
    load_id = repo_id or "path/to/release"
    front = {
        "library_name": LIBRARY_NAME,
        "license": MODEL_LICENSE,
        "pipeline_tag": "feature-extraction",
        "tags": ["astronomy", "astrophysics", "foundation-model", "self-supervised", "safetensors", LIBRARY_NAME,
                 *modalities],
        "datasets": [c.name for c in cards],
        "model-index": model_index(eval_results, name),
    }
    if not front["model-index"]:
        del front["model-index"]
    simulated = [c for c in cards if is_simulated(c)]
    real = [c for c in cards if not is_simulated(c)]
    size = f"{n_parameters / 1e6:.2f}M parameters" if n_parameters is not None else "parameters: see model.safetensors"

    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", ""]
    lines += [
        f"A cosmofm `{arch}` ({size}): a self-supervised transformer backbone for "
        f"{_join([_MODALITY_WORDS.get(m, m) for m in modalities]) or 'astronomical data'}. Every token carries its "
        "physical coordinates (wavelength, band, sky offset, frequency, comoving position), so data from different "
        "surveys and grids share one model. The output is an embedding per token and per sample (`pooled`) "
        "for downstream heads.",
        "",
        "This card is generated by `cosmofm.finetune.model_card` from `config.json`, the data cards in "
        "`data_cards/` and `eval_results.json`; it is not edited by hand.",
        "",
        "## Model details",
        "",
        "| field | value |",
        "|---|---|",
    ]
    details = [("architecture", arch), ("hidden size", config.get("hidden_size")),
               ("layers", config.get("num_hidden_layers")), ("attention heads", config.get("num_attention_heads")),
               ("patch sizes", _patches(config)), ("pretraining objectives", _join(config.get("objectives") or [])),
               ("surveys with their own embedding", _join(config.get("survey_names") or []) or "none"),
               ("config schema_version", config.get("schema_version")), ("transformers", config.get("transformers_version")),
               ("cosmofm", _version()), ("weights", "safetensors (no pickle)")]
    if (config.get("task") or {}).get("galactic_dereddening"):
        details.append(("spectra as read", "de-reddened by each one's Milky-Way E(B-V) (`meta['ebv']`: DESI FIBERMAP EBV, BOSS "
                                            "SFD_EBV, or `cosmofm classify --dust-map`); a spectrum without one is read as is and flagged no_ebv"))
    lines += [f"| {k} | {_cell(v)} |" for k, v in details if v not in (None, "")]
    lines += [
        "",
        "## How to use",
        "",
        "```python",
        "import cosmofm",
        f'model = cosmofm.from_pretrained("{load_id}")             # verifies every sha256 first',
        "",
        "import cosmofm.pretrain             # registers CosmoFM with the transformers Auto classes",
        "from transformers import AutoModel  # also works, without trust_remote_code",
        f'model = AutoModel.from_pretrained("{load_id}")',
        "```",
        "",
        f"or `cosmofm pull {load_id}` (prints the local folder). Pin a revision (`revision=` / `--revision`) "
        "with a tag or commit id for reproducible work.",
        "",
        "## Training data",
        "",
        "| data card | modality | survey | simulated | licence |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c.name} | {c.modality} | {_cell(c.survey)} | {'yes' if is_simulated(c) else 'no'} | {_cell(c.license)} |"
              for c in cards]
    lines += ["", "The full cards (units, grids, resolution, noise, splits) are in `data_cards/`.", ""]
    for c in cards:
        if c.provenance:
            lines.append(f"- **{c.name}**: {_cell(c.provenance)}")
    lines += ["", "## Training recipe", ""]
    lines += _recipe_lines(recipe)
    lines += ["", "## Evaluation", ""]
    if eval_results:
        lines += ["| task | dataset | split | metric | value |", "|---|---|---|---|---|"]
        for r in eval_results:
            for m in r["metrics"]:
                lines.append(f"| {_cell(r['task'].get('name', r['task']['type']))} | {_cell(r['dataset']['name'])} "
                             f"| {_cell(r['dataset'].get('split', ''))} | {_cell(m.get('name', m['type']))} | {m['value']:.4g} |")
        lines += ["", "Measured values, as recorded in `eval_results.json` (also in this card's `model-index`)."]
    else:
        lines.append("No evaluation results were recorded for this release.")
    lines += [
        "",
        "## Intended use",
        "",
        "A backbone to embed astronomical observations and simulations for downstream tasks (classification, "
        "regression, detection, simulation-based inference, emulation) through task heads fine-tuned on labelled data; "
        "a research tool, not a validated measurement pipeline.",
        "",
    ]
    lines += [f"- {c.name}: {_cell(c.intended_use)}" for c in cards if c.intended_use]
    lines += [
        "",
        "## Limitations",
        "",
        "- Inputs must follow the data cards: values in the card's units, inverse variances (0 = masked) and "
        "physical coordinates in cosmofm's fixed units (Angstrom, arcsec, Hz, comoving Mpc). Wrong units give "
        "silently wrong embeddings.",
        "- Surveys not listed under *surveys with their own embedding* share one generic survey embedding; expect "
        "weaker results until the model is tuned on a card for them.",
        "- Embeddings are not calibrated physical estimates; downstream uncertainties must come from the head "
        "and its validation.",
        "- Only the modalities listed above were seen in pretraining.",
        "",
        "## Sim-to-data caveats",
        "",
    ]
    if simulated:
        lines += [
            f"Trained {'only ' if not real else 'partly '}on simulated or mock data: "
            f"{_join([c.name for c in simulated])}. Mocks idealise the instrument and the sky, so real survey data "
            "differ in ways the model has not seen: calibration and flux-scale errors, sky-subtraction residuals, "
            "cosmic rays and artefacts, blending and crowding, RFI and continuum foregrounds (radio), and "
            "selection effects. Simulated fields carry the assumptions of their simulator (listed in the cards). "
            "Metrics measured on mocks do not transfer to real data: validate on labelled real data before "
            "scientific use, and fine-tune on real observations where possible.",
        ]
    else:
        lines.append("All training data are real observations according to their cards; simulation-trained heads "
                     "applied on top of this backbone still need validation on real data.")
    lines += [
        "",
        "## Integrity and versions",
        "",
        "`manifest.json` lists the sha256 and size of every file. `cosmofm.from_pretrained` and `cosmofm pull` "
        "verify all of them before loading and refuse pickle-format files (`.bin`, `.pt`, `.ckpt`, `.pkl`). "
        "`config.json` carries `schema_version`: older releases keep loading; a release newer than the "
        "installed cosmofm stops with an upgrade message. Revisions are immutable: a new push is a new commit "
        "and earlier commits and tags stay downloadable.",
        "",
        "## Citation",
        "",
        "Please cite cosmofm and the surveys / simulators behind the training data:",
        "",
    ]
    lines += [f"- {c.name}: {_cell(c.citation)}" for c in cards if c.citation] or ["- (no citations in the data cards)"]
    return "\n".join(lines) + "\n"


def _recipe_lines(recipe: dict | None) -> list[str]:
    if not recipe:
        return ["No training recipe was recorded for this release."]
    optim, run, data = recipe.get("optim") or {}, recipe.get("run") or {}, recipe.get("data") or {}
    rows = [("optimizer steps", optim.get("max_steps")), ("global batch (samples)", optim.get("global_batch")),
            ("gradient accumulation", optim.get("grad_accum")), ("learning rate (peak)", optim.get("lr")),
            ("warm-up steps", optim.get("warmup_steps")), ("weight decay", optim.get("weight_decay")),
            ("mixed precision", run.get("mixed_precision")), ("seed", run.get("seed")),
            ("datasets", _join(data.get("datasets") or []) or
             (f"embedded mocks: {_join([f'{n} x{k}' for n, k in zip(data.get('mock_cards') or [], data.get('mock_counts') or [])])}"
              if data.get("mock_cards") else None))]
    out = ["| setting | value |", "|---|---|"]
    out += [f"| {k} | {_cell(v)} |" for k, v in rows if v not in (None, "")]
    out += ["", "The complete recipe is `recipe.yaml`; `cosmofm pretrain --config recipe.yaml` reruns it."]
    return out


def _patches(config: dict) -> str:
    parts = [("spectrum", config.get("spectrum_patch_size")), ("image", config.get("image_patch_size")),
             ("cube", config.get("cube_patch_size")), ("field", config.get("field_patch_size"))]
    return ", ".join(f"{k} {'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in parts if v is not None)


def _join(items) -> str:
    return ", ".join(str(i) for i in items)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ").strip()
