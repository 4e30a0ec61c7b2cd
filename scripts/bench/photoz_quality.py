"""Photo-z quality benchmark (issue 16): the image photo-z head against classical photometry baselines.

    python -m cosmofm.bench.photoz_quality --out docs/bench --work /tmp/photoz_bench

Data: galaxies (GALAXY* classes) of the lsst-like image mocks, mock universe 1, whose
magnitudes and sizes follow the luminosity functions (data_cards/mocks/luminosity.py),
so brightness and size carry their weak redshift information. The labelled set is split
by index as every fine-tune splits it (`finetune.run.split_indices`): train (first 60 %),
calibration (20 %, the temperature of p(z)), test (last 20 %). A **shifted** test set,
never seen in training, comes from another mock universe (2) observed with 1.4x the PSF
FWHM and 2x the sky noise per band (worse seeing, a shallower survey).

Arms, at 10 % and 100 % of the training labels, each with 3 training seeds:
- `knn` and `mlp`: the classical baselines beside the head (`heads/photoz_baseline.py`:
  colours, magnitude and concentration from aperture photometry of the same stamps
  (`heads/photometry.py`); kNN with k and the kernel width chosen by cross-validation on
  the training labels only; an ANNz-style network, the head's photometry branch alone,
  with width and steps chosen on a held-out fifth of the training labels; `mlp-refit`:
  then retrained on all the training labels with those settings);
- `scratch`: the head (image tokens + the photometry branch, `PhotozHeadConfig.from_card`)
  on a fresh backbone of the demo's shape, everything trained;
- `frozen`, `lora`, `full`: the head on the demo's multi-modal backbone (pretrained on
  spectra, images, cubes and lightcones of mock universe 0: no labelled or test object).
The network arms of one label fraction train for the same number of optimizer steps.
Metrics (`heads/photoz_metrics.py`, via `PhotozTask.metrics`): NMAD of dz/(1+z),
outlier fraction (|dz|/(1+z) > 0.15), bias, PIT KS distance, 68 / 95 % coverage.

Results go to OUT/photoz_quality.json after every run (a rerun with the same --work
skips finished runs) and OUT/photoz_quality.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from cosmofm.bench import seed_summary, write_report
from cosmofm.bench.pretrain_throughput import machine_info
from cosmofm.data_cards.schema import load_card
from cosmofm.finetune.recipe import labelled_mocks
from cosmofm.finetune.run import TaskFinetuneConfig, collect_outputs, finetune_task, split_indices
from cosmofm.heads.photoz import PhotozHeadConfig, PhotozTask
from cosmofm.heads.photoz_baseline import KNNPhotoz, MLPPhotoz, photometry_features
from cosmofm.pretrain.recipe import PretrainRecipe

GALAXIES = {"spectral_class": "GALAXY*"}
LABELLED_SEED, SHIFTED_SEED = 1, 2  # mock universes; the demo backbone is pretrained on universe 0
SHIFT = {"psf_fwhm": 1.4, "sky_noise": 2.0}  # factors applied to every band of the shifted test set
ARMS = ("scratch", "frozen", "lora", "full")
BASELINES = {"knn": KNNPhotoz, "mlp": MLPPhotoz, "mlp-refit": functools.partial(MLPPhotoz, refit=True)}
HEADLINE = ("nmad", "outlier_fraction", "bias", "pit_ks", "coverage_68", "coverage_95")


def shifted_card(card, factors: dict[str, float] = SHIFT):
    """`card` observed differently: each band's psf_fwhm and sky_noise scaled by `factors`."""
    bands = [dataclasses.replace(b, **{k: getattr(b, k) * f for k, f in factors.items()}) for b in card.bands]
    return dataclasses.replace(card, bands=bands)


def demo_backbone(work: Path) -> Path:
    """The demo's multi-modal backbone (recipe `demo`), pretrained into WORK/pretrain once."""
    from cosmofm.pretrain.train import pretrain

    model = work / "pretrain" / "model"
    if not (model / "manifest.json").is_file():
        recipe = PretrainRecipe.load("demo")
        recipe.run.output_dir, recipe.run.trackers, recipe.run.progress = str(work / "pretrain"), [], True
        pretrain(recipe, overwrite=True)
    return model


def baseline_metrics(name: str, x: np.ndarray, z: np.ndarray, n_train: int, test: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> dict:
    """Fit baseline `name` on the first n_train objects; its metrics on each test set and its tuned settings."""
    task = PhotozTask(PhotozHeadConfig())
    t0 = time.perf_counter()
    fitted = BASELINES[name](task.head, seed=seed).fit(x[:n_train], z[:n_train])
    out = {split: task.metrics(fitted.predict(xt), {"redshift": torch.from_numpy(zt)}) for split, (xt, zt) in test.items()}
    tuned = {"k": fitted.k, "kernel_width": fitted.width} if name == "knn" else {"width": fitted.width, "steps": fitted.steps}
    return {**out, **tuned, "seconds": round(time.perf_counter() - t0, 1)}


def run(work: Path, out: Path, n: int, n_shift: int, seeds: list[int], fractions: list[float], steps: int, arms: list[str],
        backbone: str | None) -> dict:
    results_path = out / "photoz_quality.json"
    report = json.loads(results_path.read_text()) if results_path.is_file() else {}
    report.update(machine=machine_info(), n_labelled=n, n_shifted=n_shift, labelled_seed=LABELLED_SEED, shifted_seed=SHIFTED_SEED,
                  shift=SHIFT, optimizer_steps_per_run=steps, seeds=seeds, label_fractions=fractions)
    runs = report.setdefault("runs", {})

    def save():
        write_report(out, results_path.name, report)

    card = load_card("lsst-like")
    t0 = time.perf_counter()
    samples = labelled_mocks(card, n, LABELLED_SEED, GALAXIES)
    shifted = labelled_mocks(shifted_card(card), n_shift, SHIFTED_SEED, GALAXIES)
    report["mock_seconds"] = round(time.perf_counter() - t0, 1)
    z = np.array([s.meta["labels"]["redshift"] for s in samples])
    z_shift = np.array([s.meta["labels"]["redshift"] for s in shifted])
    splits = split_indices(n, TaskFinetuneConfig())
    test_index = splits["test"]
    n_train_all = int(splits["calibration"][0])
    report["n_test"], report["n_train_all"] = len(test_index), n_train_all

    x, x_shift = photometry_features(samples), photometry_features(shifted)
    for fraction in fractions:
        n_train = int(fraction * n_train_all)
        for seed in seeds:
            for name in BASELINES:
                key = f"{name}/{fraction}/{seed}"
                if key not in runs:
                    runs[key] = baseline_metrics(name, x, z, n_train, {"test": (x[test_index], z[test_index]), "shifted": (x_shift, z_shift)}, seed)
                    print(key, {k: round(runs[key]["test"][k], 4) for k in HEADLINE}, flush=True)
                    save()

    backbone_path = backbone or str(demo_backbone(work))
    shape = {**PretrainRecipe.load("demo").model, "survey_names": ["lsst-like"]}
    shifted_targets = {"redshift": torch.from_numpy(z_shift).float()}
    for fraction in fractions:
        n_train = int(fraction * n_train_all)
        epochs = max(1, round(steps / np.ceil(n_train / 32)))
        for seed in seeds:
            for arm in arms:
                key = f"{arm}/{fraction}/{seed}"
                if key in runs:
                    continue
                cfg = TaskFinetuneConfig(strategy="full" if arm == "scratch" else arm, epochs=epochs, batch_size=32, lr=1e-3,
                                         seed=seed, label_fraction=fraction, progress=True)
                t0 = time.perf_counter()
                if arm == "scratch":
                    r = finetune_task("photoz", samples, card, cfg, backbone_config=shape)
                else:
                    r = finetune_task("photoz", samples, card, cfg, backbone=backbone_path)
                model = r["model"]
                shifted_metrics = PhotozTask(model.head_config).metrics(collect_outputs(model, shifted), shifted_targets)
                runs[key] = {"test": r["metrics"], "shifted": shifted_metrics, "epochs": epochs,
                             "seconds": round(time.perf_counter() - t0, 1), "final_loss": r["history"][-1]}
                print(key, {k: round(r["metrics"][k], 4) for k in HEADLINE}, flush=True)
                save()
    report["summary"] = seed_summary(runs, [*BASELINES, *ARMS], HEADLINE, splits=("test", "shifted"))
    save()
    plot(report, out / "photoz_quality.png")
    print(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    """The summary as the docs' table: mean +- spread over seeds, test block | shifted set."""
    rows = ["| arm | labels | NMAD | outliers | bias | PIT KS | cov. 68 / 95 | shifted NMAD | shifted outliers | shifted cov. 68 / 95 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in report["summary"].items():
        arm, fraction = key.rsplit("/", 1)
        f = lambda name, d=3: f"{e[name][0]:.{d}f} +- {e[name][1]:.{d}f}"  # noqa: E731
        rows.append(f"| {arm} | {float(fraction):.0%} | {f('test_nmad', 4)} | {f('test_outlier_fraction')} | {f('test_bias', 4)} | "
                    f"{f('test_pit_ks')} | {e['test_coverage_68'][0]:.2f} / {e['test_coverage_95'][0]:.2f} | {f('shifted_nmad', 4)} | "
                    f"{f('shifted_outlier_fraction')} | {e['shifted_coverage_68'][0]:.2f} / {e['shifted_coverage_95'][0]:.2f} |")
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("nmad", "outlier_fraction")):
        for split, marker in (("test", "o"), ("shifted", "s")):
            for i, arm in enumerate([*BASELINES, *ARMS]):
                pts = [(f, summary[f"{arm}/{f}"][f"{split}_{metric}"]) for f in report["label_fractions"] if f"{arm}/{f}" in summary]
                if pts:
                    ax.errorbar([p[0] * (1 + 0.04 * i) for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker=marker,
                                color=f"C{i}", ls="-" if split == "test" else ":", label=f"{arm} ({split})")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of training labels")
        ax.set_ylabel(metric.replace("_", " ") + " of dz/(1+z)" if metric == "nmad" else "outlier fraction (|dz|/(1+z) > 0.15)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("photo-z on lsst-like galaxy stamps: mean and spread over 3 seeds; dotted: shifted test set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--work", default="photoz_bench_work", help="folder for the pretrained backbone")
    p.add_argument("--backbone", help="pretrained backbone release (default: pretrain the demo recipe into WORK)")
    p.add_argument("--n", type=int, default=3000, help="labelled galaxies (train 60 %%, calibration 20 %%, test 20 %%)")
    p.add_argument("--n-shift", type=int, default=600, help="galaxies of the shifted test set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every network run (epochs follow from the labels)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    args = p.parse_args(argv)
    return run(Path(args.work), Path(args.out), args.n, args.n_shift, args.seeds, args.fractions, args.steps, args.arms, args.backbone)


if __name__ == "__main__":
    main()
