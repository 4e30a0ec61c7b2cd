"""Spectral classification quality (issue 5): the fine-tuned classifier vs chi-square template fitting, on the same held-out mocks.

Stages (cached under --work, default OUT/work, so a rerun reuses data and the pretrained backbone):
1. labelled sdss-like mocks at the card's S/N (typical_snr 8 with lognormal scatter),
   split by index into train / calibration / test blocks (finetune.split_indices);
2. a spectral backbone pretrained by masked modelling on separate, unlabelled mocks
   (recipe `spectra-small`);
3. a full fine-tune from it, scored on the test block: accuracy, macro and per-class
   recall, ECE before / after temperature scaling, conformal coverage and set size,
   the Monte-Carlo-dropout ensemble of the head, and redshift (catastrophic fraction
   |dz|/(1+z) > 0.0033 and NMAD) from the network alone and refined by the template
   fitter for the network's class;
4. the template fitter (heads/template_fit.py) on the first `n_baseline` test spectra,
   with the network's numbers on the same spectra, head to head;
5. conformal coverage on the test block for alpha 0.005-0.1 (plain and never-empty sets);
   with --student KEY=VALUE ...: a faster model (the spectra-small recipe with those
   model settings, e.g. spectrum_stem_stride=4) distilled from the fine-tuned one, its
   test metrics next to the teacher's (--post-only redoes this stage on a cached run);
6. with --label-efficiency: test accuracy and macro recall with 1 / 10 / 100 % of the
   training labels for frozen / LoRA / full fine-tunes of the pretrained backbone and
   the same model trained from scratch.

Targets (issue 5): macro recall >= 0.95, every class >= 0.90 and >= the baseline;
ECE <= 0.02; conformal coverage within 0.01 of 1 - alpha; catastrophic redshift
fraction <= the baseline's; pretrained beats scratch at 1 % and 10 % of the labels.
Run: `python -m cosmofm.bench.classify_quality --out docs/bench [--label-efficiency]`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cosmofm.data_cards.io.hf_io import SampleDataset, write_dataset
from cosmofm.data_cards.mocks.generators import generate
from cosmofm.data_cards.schema import load_card
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.finetune.classification import FinetuneConfig, finetune_classification, split_indices
from cosmofm.finetune.classification_eval import calibrate_scan_redshifts
from cosmofm.finetune.classify import predict
from cosmofm.finetune.figures import plot_figures
from cosmofm.heads.metrics import classification_metrics, redshift_metrics
from cosmofm.heads.calibration import softmax
from cosmofm.heads.classification import labels_from_samples
from cosmofm.heads.redshift_scan import RedshiftScanner, redshift_candidates, scan_samples
from cosmofm.heads.template_fit import TemplateFitter, refine_redshifts
from cosmofm.pretrain.checkpoint import latest_checkpoint
from cosmofm.pretrain.recipe import PretrainRecipe
from cosmofm.pretrain.train import pretrain

CARD = "sdss-like"
RECIPE = "spectra-small"
# every run here splits the same way: 75 % train, 10 % calibration, 15 % test (by index)
SPLIT = {"calibration_fraction": 0.1, "test_fraction": 0.15}
# the fine-tuning settings every run shares (strategy, epochs and labels vary)
TRAIN = {"batch_size": 64, "lr": 2e-3, **SPLIT}


def labelled_mocks(work: Path, n: int, seed: int) -> list:
    """n labelled mock spectra, generated once into a datasets folder and read back."""
    return mock_folder(load_card(CARD), work / f"{CARD}-{n}-seed{seed}", n, seed)


def mock_folder(card, folder: Path, n: int, seed: int, indices=None, workers: int = 2) -> list:
    """Mocks (seed, index) of `card` for indices 0..n-1 (or `indices`), written once as a
    datasets folder and read back."""
    if not (folder / "dataset_info.json").exists():
        write_dataset(generate(card, n, seed=seed, workers=workers, progress=True, indices=indices), folder, [card])
    ds = SampleDataset(folder)
    return [ds[i] for i in range(len(ds))]


def pretrained_backbone(work: Path, max_steps: int, name: str = "pretrain", overrides: tuple[str, ...] = (), recipe: str = RECIPE) -> str:
    """The release folder of a `spectra-small` (or `recipe`) backbone pretrained for max_steps into
    work/<name>-<max_steps> (cached), the recipe changed by `overrides`."""
    out = work / f"{name}-{max_steps}"
    if not (out / "model" / "config.json").exists():
        recipe = PretrainRecipe.load(recipe, [f"run.output_dir={out}", f"optim.max_steps={max_steps}", f"run.save_every={max_steps}",
                                              "run.progress=true", *overrides])
        t0 = time.perf_counter()
        # an interrupted earlier bench run: continue from its checkpoint, or start it again
        resume = latest_checkpoint(out) is not None
        summary = pretrain(recipe, resume=resume, overwrite=not resume)
        (out / "bench_pretrain.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "steps": summary["steps"],
                                                            "loss_first": summary["losses"][0], "loss_last": summary["losses"][-1]}))
    return str(out / "model")


def template_baseline(samples, test_index: np.ndarray, n_baseline: int) -> dict:
    """Template-fit the first n_baseline test spectra: classes, redshifts and speed."""
    fitter = TemplateFitter()
    classes, z = [], []
    t0 = time.perf_counter()
    for i in tqdm(test_index[:n_baseline], desc="template fit", unit="spectrum"):
        s = samples[int(i)]
        fit = fitter.fit(s.coords["wavelength"], s.values, s.ivar)
        classes.append(fit.spectral_class)
        z.append(fit.z)
    return {"classes": classes, "z": np.array(z), "spectra_per_s": n_baseline / (time.perf_counter() - t0)}


def refined_redshift(subset, model, logits: np.ndarray, z_true: np.ndarray) -> dict:
    """Redshift metrics and speed of the two fits of each spectrum's predicted class: the
    full template fit (`classify --redshift template`) and the batched scan (the default)."""
    refined = refine_redshifts(subset, [model.class_names[k] for k in logits.argmax(1)])
    return {"network_refined_redshift": redshift_metrics(z_true, refined["z"]), "refine_spectra_per_s": refined["spectra_per_s"],
            **scan_redshift(subset, model, logits, z_true)}


def scan_redshift(subset, model, logits: np.ndarray, z_true: np.ndarray) -> dict:
    """Redshift metrics and speed of the scan, with the candidate classes `cosmofm classify` scans."""
    candidates = redshift_candidates(softmax(logits, model.head_config.temperature), np.array(model.class_names))
    scanner = RedshiftScanner()
    scan_samples(scanner, subset[:8], candidates[:8])  # builds the templates outside the timing
    t0 = time.perf_counter()
    z, _ = scan_samples(scanner, subset, candidates)
    return {"network_scan_redshift": redshift_metrics(z_true, z), "scan_spectra_per_s": len(subset) / (time.perf_counter() - t0)}


def head_to_head(samples, model, test_index: np.ndarray, labels: np.ndarray, z_true: np.ndarray, n_baseline: int) -> dict:
    """Network vs template fitting on the same first n_baseline test spectra."""
    names = model.class_names
    base = template_baseline(samples, test_index, n_baseline)
    subset = [samples[int(i)] for i in test_index[:n_baseline]]
    net = predict(model, subset)
    probs = softmax(net["logits"], model.head_config.temperature)
    y = labels[test_index[:n_baseline]]
    zt = z_true[test_index[:n_baseline]]
    one_hot = np.eye(len(names))[[names.index(c) for c in base["classes"]]]
    out = {"n_spectra": int(n_baseline), "template_fit_spectra_per_s": base["spectra_per_s"]}
    for key, p, z in (("network", probs, net["redshift"]), ("template_fit", one_hot, base["z"])):
        m = classification_metrics(p, y, names)
        out[key] = {"accuracy": m["accuracy"], "macro_recall": m["macro_recall"], "per_class_recall": m["per_class_recall"], **redshift_metrics(zt, z)}
    return {**out, **refined_redshift(subset, model, net["logits"], zt)}


def truth(samples, model) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, redshifts) of the samples under the model's label schema."""
    ids, z = labels_from_samples(samples, model.head_config)
    return ids.numpy(), z.numpy()


def label_efficiency(samples, card, backbone: str, fractions, strategies, base_epochs: int, min_steps: int, main: dict) -> list[dict]:
    """Test accuracy per (label fraction, strategy); "scratch" = full fine-tune of a fresh model.
    The full fine-tune with all labels is the main run (`main`: its epochs and metrics)."""
    recipe_model = PretrainRecipe.load(RECIPE).model
    rows = []
    n_train_all = len(split_indices(len(samples), FinetuneConfig(**SPLIT))["train"])
    for fraction in fractions:
        # the same number of optimizer steps is too few for 1 % of the labels: keep >= min_steps
        epochs = min(200, max(base_epochs, math.ceil(min_steps * 64 / max(1, int(fraction * n_train_all)))))
        for strategy in strategies:
            if fraction == 1.0 and strategy == "full":
                m = main["metrics"]
                rows.append({"label_fraction": 1.0, "strategy": "full", "n_labels": m["n_train"], "epochs": main["epochs"],
                             "accuracy": m["accuracy"], "macro_recall": m["macro_recall"], "seconds": main["seconds"]})
                continue
            cfg = FinetuneConfig(strategy="full" if strategy == "scratch" else strategy, epochs=epochs, label_fraction=fraction, **TRAIN)
            t0 = time.perf_counter()
            if strategy == "scratch":
                r = finetune_classification(samples, card, cfg, backbone_config={**recipe_model, "survey_names": [card.name]})
            else:
                r = finetune_classification(samples, card, cfg, backbone=backbone)
            m = r["metrics"]
            rows.append({"label_fraction": fraction, "strategy": strategy, "n_labels": m["n_train"], "epochs": epochs,
                         "accuracy": m["accuracy"], "macro_recall": m["macro_recall"], "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    return rows


def block_predictions(samples, model, splits: dict) -> dict[str, dict]:
    """`predict` on the calibration and test blocks, once for every figure that needs them."""
    return {k: predict(model, [samples[int(i)] for i in splits[k]], batch_size=256) for k in ("calibration", "test")}


def coverage_by_alpha(model, predictions: dict[str, dict], splits: dict, labels: np.ndarray, alphas=(0.005, 0.01, 0.02, 0.05, 0.1)) -> list[dict]:
    """Test-block coverage of split-conformal sets fitted on the calibration block, per alpha:
    plain LAC sets (may be empty; the coverage guarantee is for these) and the never-empty
    sets `cosmofm classify` writes (the top class always kept, so coverage >= accuracy)."""
    from cosmofm.heads.calibration import ConformalClassifier, coverage

    t = model.head_config.temperature
    p_cal, p_test = (softmax(predictions[k]["logits"], t) for k in ("calibration", "test"))
    y_cal, y_test = labels[np.asarray(splits["calibration"])], labels[np.asarray(splits["test"])]
    rows = []
    for alpha in alphas:
        conf = ConformalClassifier.fit(p_cal, y_cal, alpha)
        plain = (1.0 - p_test) <= conf.threshold
        kept = conf.predict_sets(p_test)
        rows.append({"alpha": alpha, "nominal": 1 - alpha, "coverage_lac": coverage(plain, y_test), "mean_set_size_lac": float(plain.sum(1).mean()),
                     "empty_set_fraction": float((plain.sum(1) == 0).mean()), "coverage_never_empty": coverage(kept, y_test),
                     "mean_set_size_never_empty": float(kept.sum(1).mean())})
    return rows


def distil_student(samples, card, teacher_dir: str, overrides: list[str], epochs: int, work: Path, test_index: np.ndarray, z_true: np.ndarray) -> dict:
    """Distil the fine-tuned model into the spectra-small recipe with `overrides` (saved in
    work/student/model, the model `classify_throughput --model` times); test metrics, and the
    scan redshifts of its predicted classes on the head-to-head spectra."""
    student_model = PretrainRecipe.load(RECIPE, [f"model.{o}" for o in overrides]).model
    cfg = FinetuneConfig(strategy="full", epochs=epochs, progress=True, output_dir=str(work / "student"), **TRAIN)
    t0 = time.perf_counter()
    r = finetune_classification(samples, card, cfg, backbone_config={**student_model, "survey_names": [card.name]}, teacher=teacher_dir)
    m = r["metrics"]
    keys = ("accuracy", "macro_recall", "per_class_recall", "ece_after", "conformal_coverage", "redshift_catastrophic_fraction", "redshift_nmad")
    subset = [samples[int(i)] for i in test_index]
    scan = scan_redshift(subset, r["model"], predict(r["model"], subset)["logits"], z_true[test_index])
    return {"overrides": list(overrides), "epochs": epochs, "seconds": time.perf_counter() - t0, **{k: m[k] for k in keys},
            "head_to_head_scan_redshift": scan["network_scan_redshift"], "model_dir": str(work / "student" / "model")}


def run(out: Path, n: int = 24000, epochs: int = 10, pretrain_steps: int = 1500, n_baseline: int = 400, mc_samples: int = 20,
        with_label_efficiency: bool = False, seed: int = 11, min_steps: int = 250, work: Path | None = None, student: list[str] = ()) -> dict:
    card = load_card(CARD)
    work = Path(work) if work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    samples = labelled_mocks(work, n, seed)
    backbone = pretrained_backbone(work, pretrain_steps)
    cfg = FinetuneConfig(strategy="full", epochs=epochs, **TRAIN,
                         mc_samples=mc_samples, output_dir=str(work / "finetune"), progress=True)
    t0 = time.perf_counter()
    result = finetune_classification(samples, card, cfg, backbone=backbone)
    metrics = result["metrics"]
    report = {
        "machine": machine_info(), "card": CARD, "n_samples": n, "seed": seed, "recipe": RECIPE, "pretrain_steps": pretrain_steps, "finetune_epochs": epochs,
        "finetune_seconds": time.perf_counter() - t0, "test": {k: v for k, v in metrics.items() if k != "confusion"},
    }
    model = result["model"]
    labels, z_true = truth(samples, model)
    test_index = np.asarray(result["splits"]["test"])
    report["head_to_head"] = head_to_head(samples, model, test_index, labels, z_true, n_baseline)
    report["conformal_by_alpha"] = coverage_by_alpha(model, block_predictions(samples, model, result["splits"]), result["splits"], labels)
    if with_label_efficiency:
        main = {"metrics": metrics, "epochs": epochs, "seconds": report["finetune_seconds"]}
        report["label_efficiency"] = label_efficiency(samples, card, backbone, (0.01, 0.1, 1.0), ("frozen", "lora", "full", "scratch"),
                                                      base_epochs=max(3, epochs // 3), min_steps=min_steps, main=main)
    if student:
        report["student"] = distil_student(samples, card, str(work / "finetune" / "model"), student, epochs, work,
                                           test_index[:n_baseline], z_true)
    report["targets"] = targets(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classify_quality.json").write_text(json.dumps(report, indent=2))
    for name in ("confusion_matrix.png", "reliability.png", "redshift.png"):
        shutil.copy(work / "finetune" / "figures" / name, out / f"classify_{name}")
    if "label_efficiency" in report:
        plot_label_efficiency(report["label_efficiency"], out / "classify_label_efficiency.png")
    return report


def targets(report: dict) -> dict:
    """Each issue-5 quality target: the measured value and whether it is met."""
    t, h = report["test"], report["head_to_head"]
    out = {
        "macro_recall>=0.95": [t["macro_recall"], t["macro_recall"] >= 0.95],
        "every_class_recall>=0.90": [min(t["per_class_recall"].values()), min(t["per_class_recall"].values()) >= 0.90],
        "macro_recall>=template_fit": [[h["network"]["macro_recall"], h["template_fit"]["macro_recall"]], h["network"]["macro_recall"] >= h["template_fit"]["macro_recall"]],
        "ece<=0.02": [t["ece_after"], t["ece_after"] <= 0.02],
        "coverage_within_0.01 (alpha of the run, never-empty sets)": [t["conformal_coverage"], abs(t["conformal_coverage"] - (1 - t["conformal_alpha"])) <= 0.01],
        "catastrophic_z<=template_fit (network)": [[h["network"]["redshift_catastrophic_fraction"], h["template_fit"]["redshift_catastrophic_fraction"]],
                                                   h["network"]["redshift_catastrophic_fraction"] <= h["template_fit"]["redshift_catastrophic_fraction"]],
        "catastrophic_z<=template_fit (refined)": [[h["network_refined_redshift"]["redshift_catastrophic_fraction"], h["template_fit"]["redshift_catastrophic_fraction"]],
                                                   h["network_refined_redshift"]["redshift_catastrophic_fraction"] <= h["template_fit"]["redshift_catastrophic_fraction"]],
    }
    if "network_scan_redshift" in h:
        out["catastrophic_z<=template_fit (scan, the default)"] = [[h["network_scan_redshift"]["redshift_catastrophic_fraction"], h["template_fit"]["redshift_catastrophic_fraction"]],
                                                                  h["network_scan_redshift"]["redshift_catastrophic_fraction"] <= h["template_fit"]["redshift_catastrophic_fraction"]]
    for row in report.get("conformal_by_alpha", []):
        out[f"coverage_within_0.01 (LAC, alpha {row['alpha']:g})"] = [row["coverage_lac"], abs(row["coverage_lac"] - row["nominal"]) <= 0.01]
    rows = report.get("label_efficiency")
    if rows:
        acc = {(r["label_fraction"], r["strategy"]): r["accuracy"] for r in rows}
        for f in (0.01, 0.1):
            best = max(acc[(f, s)] for s in ("frozen", "lora", "full"))
            out[f"pretrained>scratch@{f:g}"] = [[best, acc[(f, "scratch")]], best > acc[(f, "scratch")]]
    return out


def plot_label_efficiency(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r["n_labels"], r["accuracy"]) for r in rows if r["strategy"] == strategy)
        ax.plot(*zip(*pts), "o-", label=strategy)
    ax.set(xscale="log", xlabel="training labels", ylabel="test accuracy", title="label efficiency (13 classes, sdss-like mocks)")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--work", default=None, help="cache of mocks, backbone and runs (default OUT/work)")
    p.add_argument("--n", type=int, default=24000, help="labelled mocks (75 %% train, 10 %% calibration, 15 %% test)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--n-baseline", type=int, default=400, help="test spectra also template-fitted (~4 per second)")
    p.add_argument("--mc-samples", type=int, default=20)
    p.add_argument("--label-efficiency", action="store_true")
    p.add_argument("--student", nargs="*", default=[], metavar="KEY=VALUE", help="distil into spectra-small with these model settings")
    p.add_argument("--post-only", action="store_true",
                   help="reuse OUT's report and the cached fine-tuned model: recompute conformal coverage by alpha, the fitted redshifts "
                        "of the predicted classes (and the --student); update the report")
    p.add_argument("--min-steps", type=int, default=250, help="optimizer steps at least, in the label-efficiency runs")
    args = p.parse_args(argv)
    if args.post_only:
        from cosmofm.finetune.classify import load_classifier

        out, work = Path(args.out), Path(args.work) if args.work else Path(args.out) / "work"
        report = json.loads((out / "classify_quality.json").read_text())
        samples = labelled_mocks(work, report["n_samples"], report["seed"])
        model = load_classifier(str(work / "finetune" / "model"))
        labels, z_true = truth(samples, model)
        splits = split_indices(len(samples), FinetuneConfig(**SPLIT))
        predictions = block_predictions(samples, model, splits)
        report["conformal_by_alpha"] = coverage_by_alpha(model, predictions, splits, labels)
        t = model.head_config.temperature
        cal, test = predictions["calibration"], predictions["test"]
        p_test = softmax(test["logits"], t)
        scan_metrics, scan_arrays = calibrate_scan_redshifts(model, samples, splits, z_true, softmax(cal["logits"], t), p_test)
        report["test"].update(scan_metrics)
        # the figures again, the redshift one with the scan's redshifts next to the network's
        y_test = labels[splits["test"]]
        arrays = {"probs": p_test, "probs_raw": softmax(test["logits"]), "labels": y_test, "z_pred": test["redshift"], "z_err": test["redshift_err"], **scan_arrays}
        metrics = {**report["test"], "confusion": classification_metrics(p_test, y_test, model.class_names)["confusion"].tolist()}
        for path in plot_figures(arrays, metrics, model.class_names, work / "post-figures"):
            shutil.copy(path, out / f"classify_{Path(path).name}")
        h = report["head_to_head"]
        subset = [samples[int(i)] for i in splits["test"][: h["n_spectra"]]]  # the first spectra of the test block
        h.update(refined_redshift(subset, model, test["logits"][: h["n_spectra"]], z_true[splits["test"][: h["n_spectra"]]]))
        if args.student:
            report["student"] = distil_student(samples, load_card(CARD), str(work / "finetune" / "model"), args.student, report["finetune_epochs"],
                                               work, splits["test"][: h["n_spectra"]], z_true)
        elif "model_dir" in report.get("student", {}):  # the saved student's redshifts, by today's scan
            student = load_classifier(report["student"]["model_dir"])
            index = splits["test"][: h["n_spectra"]]
            subset = [samples[int(i)] for i in index]
            report["student"]["head_to_head_scan_redshift"] = scan_redshift(subset, student, predict(student, subset)["logits"], z_true[index])["network_scan_redshift"]
        report["targets"] = targets(report)
        (out / "classify_quality.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: report[k] for k in ("conformal_by_alpha", "student", "targets") if k in report}, indent=2))
        return report
    report = run(Path(args.out), args.n, args.epochs, args.pretrain_steps, args.n_baseline, args.mc_samples, args.label_efficiency,
                 min_steps=args.min_steps, work=args.work, student=args.student)
    for name, (value, ok) in report["targets"].items():
        print(f"{'MET ' if ok else 'MISS'} {name}: {value}")
    return report


if __name__ == "__main__":
    main()
