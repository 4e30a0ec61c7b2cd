"""Spectral classification on survey-grade mocks (issue 17): in distribution and under shifts, three seeds.

The mocks of card `sdss-like-survey` (data_cards/mocks/survey.py: stars with log g, [Fe/H]
and Galactic dust, stellar-population galaxies, sky and flux-calibration residuals, bad
columns, S/N 2-100). Stages, cached under --work so a rerun reuses data and backbone:
1. unlabelled survey mocks (seed 101) -> the `spectra-small` backbone pretrained by masked
   modelling on them for --pretrain-steps (its pixel weight changed by --pixel-weight:
   `ivar_local` is the recipe `spectra-small-local`);
2. labelled survey mocks (seed 21), split by index 75 % train / 10 % calibration / 15 % test;
3. per fine-tune seed: a full fine-tune, calibrated on the calibration block (temperature,
   conformal), scored on the test block: accuracy, macro and per-class recall, ECE,
   conformal coverage;
4. the shift suite: the test block's objects observed again under settings the training
   set never had (SHIFTS: a card's `mock_shift` or resolving power; same seed and indices,
   so each shifted spectrum pairs with its in-distribution one); macro recall, its drop,
   and ECE per shift, for every seed;
5. out-of-set detection: N_OUT_OF_SET objects outside the 13 classes (M, carbon and white
   dwarf stars, sky and broken fibres): AUROC, false-flag rate on the in-set test block,
   detection rate per kind;
6. the fair classical baseline (heads/classical_classifier.py, templates the generator did
   not make) head to head with the network on the first N_BASELINE test spectra, per-class
   recall with bootstrap errors;
7. stages 3-6 again from the demo's multi-modal backbone (pretrained on basic mocks of four
   modalities; `--arms demo-multimodal`), or from the shared one (recipe `shared`: the same
   four modalities and shape with the spectral stem, 1/sigma pixel weights and survey
   spectra, pretrained into WORK once; `--arms shared-multimodal`), at the same epochs; or from
   a fresh backbone of the shared one's shape (`--arms scratch-shared`: the same steps, the
   backbone at the head's learning rate), the value of pretraining.

Targets (issue 17): in distribution macro recall >= 0.95, every class >= 0.90, ECE <= 0.02,
coverage within 0.01 of nominal; under each shift macro recall drops <= 0.03, ECE <= 0.05;
out-of-set AUROC >= 0.95 at <= 2 % false flags; macro recall >= the classical baseline's.
Run: `python -m cosmofm.bench.classify_survey --out docs/bench --work DIR`; with
`--pixel-weight ivar_local --name classify_survey_localweight` for the local pixel weight;
`--galactic-dereddening` fine-tunes heads that read spectra de-reddened by the mocks' dust-map
E(B-V) (data_cards/dust.py; caches made before the mocks wrote it need a fresh --work).
The report is written after every fine-tune; with --resume, a rerun with the same settings,
--out and --name keeps the runs already there and does only the missing (arm, seed) pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from cosmofm.bench.classify_quality import mock_folder, pretrained_backbone
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.io.hf_io import SampleDataset, write_dataset
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.classification import FinetuneConfig, finetune_classification
from cosmofm.finetune.classify import predict
from cosmofm.heads.calibration import coverage, expected_calibration_error, softmax
from cosmofm.heads.classification import labels_from_samples
from cosmofm.heads.metrics import classification_metrics
from cosmofm.heads.template_fit import class_family
from cosmofm.pretrain.configuration_cosmofm import PIXEL_WEIGHTS
from cosmofm.pretrain.recipe import PretrainRecipe

CARD = "sdss-like-survey"
RECIPE = "spectra-small"
PIXEL_WEIGHT = "ivar"  # the recipe's; --pixel-weight pretrains (and names the caches of) another
LABELLED_SEED, PRETRAIN_SEED = 21, 101
SPLIT = {"calibration_fraction": 0.1, "test_fraction": 0.15}
TRAIN = {"batch_size": 64, "lr": 2e-3, **SPLIT}
N_BASELINE = 2000  # test spectra the classical baseline also classifies (issue 17: >= 2,000)
N_OUT_OF_SET, OUT_OF_SET_SEED = 1000, 7  # out-of-set mocks, 200 of each kind
ARMS = ("survey-spectra", "demo-multimodal", "shared-multimodal", "scratch-shared")  # which backbone the fine-tunes start from (`backbones`)
SCRATCH = ARMS[3]  # the shared backbone's shape, fresh weights: the value of pretraining at the same steps
DEFAULT_ARMS = ARMS[:2]
SHARED_RECIPE = "shared"  # the shared multi-modal backbone's recipe (pretrain/recipes/shared.yaml)
# Settings the training mocks never had: card fields replaced on the survey card. The
# redshift shift keeps galaxies' Halpha on the grid (z < 0.58), so their BPT classes stay decidable.
SHIFTS = {
    "reddening x3": {"mock_shift": {"ebv_scale": 3.0}},
    "calibration error x2": {"mock_shift": {"calibration_scale": 2.0}},
    "sky residuals x3": {"mock_shift": {"sky_residual_scale": 3.0}},
    "S/N x0.5": {"mock_shift": {"snr_scale": 0.5}},
    "resolution R 1500": {"resolving_power": 1500.0},
    "redshift: galaxies 0.3-0.5, QSOs 3.5-4.2": {"mock_shift": {"galaxy_z_range": [0.3, 0.5], "qso_z_range": [3.5, 4.2]}},
}


def survey_backbone(work: Path, card, steps: int, n_corpus: int, pixel_weight: str = PIXEL_WEIGHT) -> str:
    """The release folder of `spectra-small` with `pixel_weight` pretrained for `steps` on unlabelled survey mocks (cached)."""
    corpus = work / f"corpus-{card.name}-{n_corpus}-seed{PRETRAIN_SEED}"
    name = "pretrain-survey" + _weight_slug(pixel_weight)
    if not (work / f"{name}-{steps}" / "model" / "config.json").exists():
        mock_folder(card, corpus, n_corpus, PRETRAIN_SEED)
    return pretrained_backbone(work, steps, name=name, overrides=(f"data.datasets=[{corpus}]", f"model.pixel_weight={pixel_weight}"))


def _weight_slug(pixel_weight: str) -> str:
    """Suffix of the cache folders of a backbone (and its fine-tunes) with a pixel weight other than the recipe's."""
    return "" if pixel_weight == PIXEL_WEIGHT else f"-{pixel_weight.replace('_', '-')}"


def block_scores(model, samples, labels: np.ndarray, redshifts: np.ndarray | None = None) -> dict:
    """Accuracy, macro / per-class recall, confusion matrix (rows true, columns predicted), ECE
    (calibrated) and conformal coverage of `samples`; with `redshifts`, also the recall of each
    galaxy / QSO class in redshift bins (`recall_by_redshift`)."""
    outputs = predict(model, samples, batch_size=256)
    probs = softmax(outputs["logits"], model.head_config.temperature)
    m = classification_metrics(probs, labels, model.class_names)
    out = {"accuracy": m["accuracy"], "macro_recall": m["macro_recall"], "per_class_recall": m["per_class_recall"],
           "confusion": m["confusion"].tolist(), "ece": expected_calibration_error(probs, labels)}
    pred = np.argmax(probs, axis=1)
    if outputs.get("ood_score") is not None:  # what the catalogue does with them: flags, and errors it does not flag
        flagged = flags(model, usable_spectra(model, samples), np.asarray(outputs["ood_score"]))
        wrong = pred != labels
        out.update(flagged=float(flagged.mean()), wrong_unflagged=float(np.mean(wrong & ~flagged)),
                   accuracy_unflagged=float(1 - wrong[~flagged].mean()) if (~flagged).any() else float("nan"))
    if redshifts is not None:
        out["recall_by_redshift"] = recall_by_redshift(pred, labels, redshifts, model.class_names)
    sets = model.prediction_sets(probs)
    if sets is not None:
        out["conformal_coverage"] = coverage(sets, labels)
    return out


def recall_by_redshift(pred: np.ndarray, labels: np.ndarray, redshifts: np.ndarray, class_names, n_bins: int = 4) -> dict:
    """{class: [[z_lo, z_hi, n, recall], ...]} for every galaxy and QSO class: `n_bins` bins of
    equal width over the class's redshifts in this block (where in a shifted range it fails)."""
    out = {}
    for c, name in enumerate(class_names):
        mine = labels == c
        if class_family(name) == "STAR" or mine.sum() < n_bins:
            continue
        edges = np.linspace(redshifts[mine].min(), redshifts[mine].max() + 1e-9, n_bins + 1)
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = mine & (redshifts >= lo) & (redshifts < hi)
            rows.append([float(lo), float(hi), int(inside.sum()), float(np.mean(pred[inside] == c)) if inside.any() else float("nan")])
        out[name] = rows
    return out


def labelled_folder(work: Path, card_name: str, n: int, seed: int = LABELLED_SEED) -> Path:
    """The cached datasets folder of the n labelled mocks (seed `seed`) of card `card_name`."""
    return work / f"labelled-{card_name}-{n}-seed{seed}"


def shift_folder(work: Path, name: str, n: int) -> Path:
    """The cached datasets folder of the test block of n labelled mocks under shift `name` of SHIFTS."""
    return work / f"shift-{''.join(c if c.isalnum() else '-' for c in name)}-{n}"


def shifted_tests(card, work: Path, n: int, test_index: np.ndarray) -> dict[str, list]:
    """The test block's objects under each shift of SHIFTS (cached datasets folders)."""
    return {name: mock_folder(dataclasses.replace(card, **change), shift_folder(work, name, n), len(test_index), LABELLED_SEED, indices=test_index)
            for name, change in SHIFTS.items()}


def backbones(work: Path, card, arms: list[str], pretrain_steps: int, n_corpus: int, pixel_weight: str = PIXEL_WEIGHT) -> dict[str, str]:
    """Release folder of each arm's backbone: ARMS[0] the spectra-only backbone pretrained on
    survey mocks (with `pixel_weight`), ARMS[1] the demo's multi-modal backbone, ARMS[2] the
    shared multi-modal one (recipe SHARED_RECIPE, its own steps and corpus), SCRATCH None (a fresh
    backbone of SHARED_RECIPE's shape)."""
    from cosmofm.bench.photoz_quality import demo_backbone

    make = {ARMS[0]: lambda: survey_backbone(work, card, pretrain_steps, n_corpus, pixel_weight), ARMS[1]: lambda: str(demo_backbone(work)),
            ARMS[2]: lambda: pretrained_backbone(work, PretrainRecipe.load(SHARED_RECIPE).optim.max_steps, name="pretrain-shared", recipe=SHARED_RECIPE),
            SCRATCH: lambda: None}
    return {arm: make[arm]() for arm in arms}


def pretraining_record(model_dir: str, tail: int = 50) -> dict:
    """Cost and losses of a backbone the bench pretrained (its run folder's bench_pretrain.json
    and metrics.jsonl): seconds, steps, and each modality's masked-modelling loss averaged
    over the first and the last `tail` steps."""
    run = Path(model_dir).parent
    record = json.loads((run / "bench_pretrain.json").read_text()) if (run / "bench_pretrain.json").is_file() else {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] if (run / "metrics.jsonl").is_file() else []
    for key, part in (("per_modality_loss_first", rows[:tail]), ("per_modality_loss_last", rows[-tail:])):
        names = sorted({m for r in part for m in r.get("per_modality_loss", {})})
        record[key] = {m: float(np.mean([r["per_modality_loss"][m] for r in part if m in r["per_modality_loss"]])) for m in names}
    return record


def run(out: Path, work: Path, n: int, seeds: list[int], epochs: int, pretrain_steps: int, n_corpus: int, arms: list[str],
        tilts: dict | None = None, pixel_weight: str = PIXEL_WEIGHT, name: str = "classify_survey", resume: bool = False,
        label_fraction: float = 1.0) -> dict:
    """The whole bench; the report is written to out/<name>.json (after every fine-tune). `resume`:
    keep the runs of an earlier out/<name>.json made with the same settings, run only the missing ones."""
    card = load_card(CARD)
    work.mkdir(parents=True, exist_ok=True)
    samples = mock_folder(card, labelled_folder(work, card.name, n), n, LABELLED_SEED)
    report = {"machine": machine_info(), "card": CARD, "n_samples": n, "labelled_seed": LABELLED_SEED, "recipe": RECIPE,
              "pixel_weight": pixel_weight, "pretrain_steps": pretrain_steps, "pretrain_corpus": n_corpus, "finetune_epochs": epochs, "tilts": tilts or {}, "label_fraction": label_fraction, "shifts": SHIFTS,
              "runs": []}
    settings = ("card", "n_samples", "labelled_seed", "pixel_weight", "pretrain_steps", "pretrain_corpus", "finetune_epochs", "tilts", "label_fraction")
    earlier = json.loads((out / f"{name}.json").read_text()) if resume and (out / f"{name}.json").is_file() else {}
    before_option = {"label_fraction": 1.0}  # settings a report written before their option existed ran at
    if all(earlier.get(k, before_option.get(k)) == json.loads(json.dumps(report[k], default=float)) for k in settings):  # same settings: keep its runs
        report["runs"] = earlier.get("runs", [])
        report["pretraining"] = earlier.get("pretraining", {})
    elif earlier:
        print(f"--resume: {out / name}.json was made with other settings ({', '.join(settings)}); starting afresh", flush=True)
    for arm, backbone in backbones(work, card, arms, pretrain_steps, n_corpus, pixel_weight).items():
        weight = pixel_weight if arm == ARMS[0] else PIXEL_WEIGHT  # the multi-modal backbones keep their own
        if arm == ARMS[2]:
            report.setdefault("pretraining", {})[arm] = {"recipe": SHARED_RECIPE, **pretraining_record(backbone)}
        for seed in seeds:
            if any((r["arm"], r["seed"]) == (arm, seed) for r in report["runs"]):
                continue  # done by an earlier run with the same settings
            report["runs"].append(finetune_and_score(samples, card, work, n, arm, backbone, seed, epochs, tilts, weight, label_fraction))
            _write(report, out, name, arms)
    return _write(report, out, name, arms)


def _write(report: dict, out: Path, name: str, arms: list[str]) -> dict:
    """Summaries (every arm with runs) and targets (of arms[0]) of `report`, written to out/<name>.json."""
    done = [a for a in ARMS if any(r["arm"] == a for r in report["runs"])]
    report["summary"] = {arm: summary([r for r in report["runs"] if r["arm"] == arm]) for arm in done}
    report["targets"] = targets(report["summary"][arms[0]]) if arms[0] in report["summary"] else {}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def finetune_and_score(samples, card, work: Path, n: int, arm: str, backbone: str, seed: int, epochs: int, tilts: dict | None = None,
                       pixel_weight: str = PIXEL_WEIGHT, label_fraction: float = 1.0) -> dict:
    """One full fine-tune from `backbone`, scored in distribution and under every shift. `tilts`:
    FinetuneConfig's augmentation of the training spectra ({"tilt_rms": ..., "tilt_ivar_rms": ..., "extra_noise": ..., "redshift_stretch": ...}; None = none).
    label_fraction: the share of the training block whose labels are used (the first ones; the
    calibration and test blocks are the same whatever it is)."""
    tilts = {k: v for k, v in (tilts or {}).items() if v}
    head = {"galactic_dereddening": True} if tilts.pop("galactic_dereddening", False) else {}  # a head setting, not FinetuneConfig's
    slug = ("" if arm == ARMS[0] else f"-{arm}") + _weight_slug(pixel_weight) + "".join(f"-{k.replace('_rms', '')}{_slug_value(v)}" for k, v in sorted(tilts.items())) \
        + (f"-labels{label_fraction:g}" if label_fraction < 1 else "") + ("-dereddened" if head else "")
    # A fresh backbone trains at the head's learning rate (a pretrained one at 0.3 x it, the strategy's default)
    scratch = {"backbone_lr_scale": 1.0} if backbone is None else {}
    cfg = FinetuneConfig(strategy="full", epochs=epochs, seed=seed, output_dir=str(work / f"finetune{slug}-seed{seed}"), progress=True,
                         label_fraction=label_fraction, head=head, **TRAIN, **tilts, **scratch)
    fresh = {**PretrainRecipe.load(SHARED_RECIPE).model, "survey_names": [card.name]} if backbone is None else None
    t0 = time.perf_counter()
    result = finetune_classification(samples, card, cfg, backbone=backbone, backbone_config=fresh)
    model, metrics = result["model"], result["metrics"]
    test_index = np.asarray(result["splits"]["test"])
    keys = ("accuracy", "macro_recall", "per_class_recall", "ece_after", "conformal_alpha", "conformal_coverage")
    row = {"arm": arm, "seed": seed, "seconds": time.perf_counter() - t0, "model_dir": str(Path(cfg.output_dir) / "model"),
           "test": {k: metrics[k] for k in keys}}
    test = [samples[int(i)] for i in test_index]
    row.update(shift_scores(model, card, work, n, test, test_index, metrics["macro_recall"]))
    row["out_of_set"] = out_of_set_scores(model, test, out_of_set_mocks(card, work))
    row["head_to_head"] = head_to_head(model, test[:N_BASELINE], classical_baseline(work, test[:N_BASELINE], n))
    print(json.dumps({k: row[k] for k in ("arm", "seed", "test")}, default=float), flush=True)
    return row


def shift_scores(model, card, work: Path, n: int, test: list, test_index: np.ndarray, macro_recall: float) -> dict:
    """{"test_flags": the flag figures of the test block, "shifts": {name: block_scores and the
    macro recall's drop from `macro_recall`}} of `model`."""
    labels = labels_from_samples(test, model.head_config)[0].numpy()
    in_set = block_scores(model, test, labels)
    out = {"test_flags": {k: in_set[k] for k in ("flagged", "wrong_unflagged", "accuracy_unflagged") if k in in_set}, "shifts": {}}
    for name, shifted in shifted_tests(card, work, n, test_index).items():
        labels, redshifts = (t.numpy() if t is not None else None for t in labels_from_samples(shifted, model.head_config))
        scores = block_scores(model, shifted, labels, redshifts)
        scores["macro_recall_drop"] = macro_recall - scores["macro_recall"]
        out["shifts"][name] = scores
    return out


def rescore(out: Path, work: Path, name: str) -> dict:
    """Score every run of out/<name>.json again under the shifts (its saved model, the cached
    test block and shift sets) and rewrite the report: figures added to block_scores after
    the runs were made, without fine-tuning again."""
    from cosmofm.finetune.classify import load_classifier
    from cosmofm.finetune.run import split_indices

    report = json.loads((out / f"{name}.json").read_text())
    card, n = load_card(report["card"]), report["n_samples"]
    samples = mock_folder(card, labelled_folder(work, card.name, n, report["labelled_seed"]), n, report["labelled_seed"])
    test_index = split_indices(n, FinetuneConfig(**SPLIT))["test"]
    test = [samples[int(i)] for i in test_index]
    for row in report["runs"]:
        row.update(shift_scores(load_classifier(row["model_dir"]), card, work, n, test, test_index, row["test"]["macro_recall"]))
        print(json.dumps({"arm": row["arm"], "seed": row["seed"], "test_flags": row["test_flags"]}), flush=True)
    return _write(report, out, name, [report["runs"][0]["arm"]])


def _slug_value(value) -> str:
    """An augmentation setting in a cache folder's name: 0.3 -> "0.3", ["QSO"] -> "QSO"."""
    return "+".join(value) if isinstance(value, (list, tuple)) else f"{value:g}"


def out_of_set_mocks(card, work: Path, seed: int = OUT_OF_SET_SEED, cache: Path | None = None) -> list:
    """N_OUT_OF_SET spectra of objects outside the 13 classes, cycling through the kinds: read
    from `work` when made there before, else made into `cache` (default `work`) or read from it."""
    from cosmofm.data_cards.mocks.out_of_set import OOS_CLASSES, generate_out_of_set

    name = f"out-of-set-{N_OUT_OF_SET}-seed{seed}"
    folder = work / name if (work / name / "dataset_info.json").exists() else (cache or work) / name
    if not (folder / "dataset_info.json").exists():
        write_dataset(generate_out_of_set(card, N_OUT_OF_SET, seed, OOS_CLASSES), folder, [card])
    ds = SampleDataset(folder)
    return [ds[i] for i in range(len(ds))]


def detector_scores(model, samples) -> tuple[np.ndarray, np.ndarray]:
    """(score, flagged) per spectrum as `cosmofm classify` sees it: spectra with too few
    unmasked pixels are never classified (score +inf, flagged); the rest are flagged when
    the out-of-set score exceeds the model's threshold."""
    usable = usable_spectra(model, samples)
    scores = np.full(len(samples), np.inf)
    scores[usable] = predict(model, [s for s, ok in zip(samples, usable) if ok], batch_size=256)["ood_score"]
    return scores, flags(model, usable, scores)


def usable_spectra(model, samples) -> np.ndarray:
    """Which spectra have enough unmasked pixels for `cosmofm classify` to classify them."""
    from cosmofm.finetune.classify import min_unmasked_pixels

    return np.array([int(np.count_nonzero(s.ivar > 0)) >= min_unmasked_pixels(model) for s in samples])


def flags(model, usable: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The out-of-set flag `cosmofm classify` sets: unusable, or the model's own `out_of_set`
    (None, no flags by score, when the calibration block was too small to set a threshold)."""
    by_score = model.out_of_set(scores)
    return ~usable if by_score is None else ~usable | by_score


def out_of_set_scores(model, test: list, out_of_set: list) -> dict:
    """AUROC, false-flag rate on the in-set test block, detection rate per kind."""
    from cosmofm.heads.out_of_set import out_of_set_metrics

    s_in, f_in = detector_scores(model, test)
    s_out, f_out = detector_scores(model, out_of_set)
    kinds = [s.meta["labels"]["spectral_class"] for s in out_of_set]
    finite = np.isfinite(s_out)  # unclassifiable spectra rank above every score
    s_out = np.where(finite, s_out, max(np.max(s_in), np.max(s_out[finite], initial=0)) + 1)
    return {**out_of_set_metrics(s_in, s_out, f_in, f_out, kinds), "threshold": model.head_config.ood_threshold,
            "unclassifiable": int((~finite).sum())}


def classical_baseline(work: Path, subset: list, n: int) -> dict:
    """The fair classical classifier (heads/classical_classifier.py: BaSeL stars, BC03-MILES
    galaxies, QSO basis) on the first N_BASELINE test spectra of the `n` labelled mocks, run once
    and cached (per n: another n splits off another test block)."""
    from cosmofm.heads.classical_classifier import classify_samples

    path = work / f"classical-baseline-n{n}-{len(subset)}.json"
    if not path.is_file():
        r = classify_samples(subset, workers=2)
        path.write_text(json.dumps({"classes": r["classes"].tolist(), "z": r["z"].tolist(), "spectra_per_s": r["spectra_per_s"]}))
    r = json.loads(path.read_text())
    return {"classes": np.array(r["classes"]), "z": np.array(r["z"]), "spectra_per_s": r["spectra_per_s"]}


def head_to_head(model, subset: list, baseline: dict, n_boot: int = 300) -> dict:
    """Macro and per-class recall of the network and the classical baseline on the same spectra,
    each with a bootstrap standard error over spectra."""
    names = model.class_names
    labels = labels_from_samples(subset, model.head_config)[0].numpy()
    predicted = {"network": predict(model, subset, batch_size=256)["logits"].argmax(1),
                 "classical": np.array([names.index(c) if c in names else -1 for c in baseline["classes"]])}
    rng = np.random.default_rng(0)
    boots = [rng.integers(0, len(labels), len(labels)) for _ in range(n_boot)]
    out = {"n_spectra": len(labels), "classical_spectra_per_s": baseline["spectra_per_s"]}
    for key, pred in predicted.items():
        recall = _recalls(pred, labels, len(names))
        spread = np.array([_recalls(pred[b], labels[b], len(names)) for b in boots])
        out[key] = {"accuracy": float(np.mean(pred == labels)), "macro_recall": float(np.nanmean(recall)),
                    "macro_recall_se": float(np.std(np.nanmean(spread, axis=1))),
                    "per_class_recall": {c: [float(recall[k]), float(np.nanstd(spread[:, k]))] for k, c in enumerate(names)}}
    return out


def _recalls(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.array([np.mean(pred[labels == k] == k) if np.any(labels == k) else np.nan for k in range(n_classes)])


def _spread(values) -> list[float]:
    return [float(np.mean(values)), float(np.std(values))]


def summary(runs: list[dict]) -> dict:
    """Mean and spread over seeds of each headline figure, in distribution and per shift."""
    out = {"in_distribution": {k: _spread([r["test"][k] for r in runs]) for k in ("accuracy", "macro_recall", "ece_after", "conformal_coverage")}}
    out["in_distribution"]["min_class_recall"] = _spread([min(r["test"]["per_class_recall"].values()) for r in runs])
    flag_keys = ("flagged", "wrong_unflagged", "accuracy_unflagged")
    if all("test_flags" in r for r in runs):  # reports made before the flag figures lack them
        out["in_distribution"].update({k: _spread([r["test_flags"][k] for r in runs]) for k in flag_keys})
    for name in runs[0]["shifts"]:
        keys = ("accuracy", "macro_recall", "macro_recall_drop", "ece") + tuple(k for k in flag_keys if all(k in r["shifts"][name] for r in runs))
        out[name] = {k: _spread([r["shifts"][name][k] for r in runs]) for k in keys}
    out["out_of_set"] = {k: _spread([r["out_of_set"][k] for r in runs]) for k in ("auroc", "false_flag_rate", "detection_rate")}
    out["out_of_set"]["per_kind"] = {k: _spread([r["out_of_set"]["detection_rate_per_kind"][k] for r in runs])
                                     for k in runs[0]["out_of_set"]["detection_rate_per_kind"]}
    out["head_to_head"] = {key: {"macro_recall": _spread([r["head_to_head"][key]["macro_recall"] for r in runs])} for key in ("network", "classical")}
    return out


def targets(s: dict) -> dict:
    """Each issue-17 target on the seed means: [value, met]."""
    ind = s["in_distribution"]
    out = {"macro_recall>=0.95": [ind["macro_recall"][0], ind["macro_recall"][0] >= 0.95],
           "every_class_recall>=0.90": [ind["min_class_recall"][0], ind["min_class_recall"][0] >= 0.90],
           "ece<=0.02": [ind["ece_after"][0], ind["ece_after"][0] <= 0.02]}
    ood, h2h = s["out_of_set"], s["head_to_head"]
    out["out-of-set AUROC>=0.95"] = [ood["auroc"][0], ood["auroc"][0] >= 0.95]
    out["out-of-set false flags<=0.02"] = [ood["false_flag_rate"][0], ood["false_flag_rate"][0] <= 0.02]
    out["macro recall>=classical baseline"] = [[h2h["network"]["macro_recall"][0], h2h["classical"]["macro_recall"][0]],
                                               h2h["network"]["macro_recall"][0] >= h2h["classical"]["macro_recall"][0]]
    for name, row in s.items():
        if name not in ("in_distribution", "out_of_set", "head_to_head"):
            out[f"{name}: recall drop<=0.03"] = [row["macro_recall_drop"][0], row["macro_recall_drop"][0] <= 0.03]
            out[f"{name}: ece<=0.05"] = [row["ece"][0], row["ece"][0] <= 0.05]
    return out


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--work", default=None, help="cache of mocks, backbone and runs (default OUT/work)")
    p.add_argument("--n", type=int, default=14000, help="labelled mocks (75 %% train, 10 %% calibration, 15 %% test)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--corpus", type=int, default=8000, help="unlabelled survey mocks to pretrain on")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS,
                   help="backbones to fine-tune from: the spectra-only one pretrained on survey mocks, the demo's multi-modal one, "
                        "the shared multi-modal one (recipe shared, pretrained into WORK once)")
    p.add_argument("--tilt-rms", type=float, default=0.0,
                   help="smooth random tilts of the training spectra up to this rms in ln flux (FinetuneConfig.tilt_rms); 0 = none")
    p.add_argument("--tilt-ivar-rms", type=float, default=0.0,
                   help="independent smooth tilts of the training spectra's ivar (FinetuneConfig.tilt_ivar_rms); 0 = none")
    p.add_argument("--extra-noise", type=float, default=0.0,
                   help="add noise of up to this many times each pixel's sigma to the training spectra, redrawn every epoch (FinetuneConfig.extra_noise); 0 = none")
    p.add_argument("--redshift-stretch", type=float, default=0.0,
                   help="move the training galaxies and QSOs along the grid, (1 + z) x exp(u), |u| <= this (FinetuneConfig.redshift_stretch); 0 = none")
    p.add_argument("--redshift-stretch-families", nargs="+", default=None,
                   help="class families the stretch moves (FinetuneConfig.redshift_stretch_families; default GALAXY QSO)")
    p.add_argument("--galactic-dereddening", action="store_true",
                   help="the head de-reddens every spectrum by its dust-map E(B-V) (meta 'ebv'; data_cards/dust.py), in training and under the shifts")
    p.add_argument("--pixel-weight", default=PIXEL_WEIGHT, choices=PIXEL_WEIGHTS,
                   help="pixel weight of the survey backbone (CosmoFMConfig.pixel_weight; ivar_local = recipe spectra-small-local)")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="share of the training block's labels the fine-tunes use (label efficiency; raise --epochs to keep the steps)")
    p.add_argument("--name", default="classify_survey", help="the report is written to OUT/NAME.json")
    p.add_argument("--rescore", action="store_true",
                   help="score the runs of OUT/NAME.json again under the shifts (saved models, cached sets) and rewrite it; no fine-tuning")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of OUT/NAME.json if made with the same settings; fine-tune only the missing (arm, seed) pairs")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.rescore:
        rescore(out, Path(args.work) if args.work else out / "work", args.name)
        return
    report = run(out, Path(args.work) if args.work else out / "work", args.n, args.seeds, args.epochs, args.pretrain_steps, args.corpus, args.arms,
                 {"tilt_rms": args.tilt_rms, "tilt_ivar_rms": args.tilt_ivar_rms, "extra_noise": args.extra_noise, "redshift_stretch": args.redshift_stretch,
                  "redshift_stretch_families": args.redshift_stretch_families,
                  **({"galactic_dereddening": True} if args.galactic_dereddening else {})},
                 args.pixel_weight, args.name, args.resume, args.label_fraction)
    for name, (value, ok) in report["targets"].items():
        print(f"{'MET ' if ok else 'MISS'} {name}: {value}")
    return report


if __name__ == "__main__":
    main()
