"""Figures of a fine-tuning run, written next to its `eval_results.json`.

`save_figure` is the shared part (Agg backend, one PNG per figure, closed after saving);
`plot_figures` draws the classification task's three from the test block's arrays and
metrics of `finetune/classification_eval.calibrate_and_evaluate`: the confusion matrix
(counts and row fractions), the reliability diagram before and after temperature
scaling, and the redshifts, true against predicted (network and scan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cosmofm.heads.calibration import reliability_curve


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` (PNG, 110 dpi) and close it."""
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_figures(arrays: dict, metrics: dict, class_names: Sequence[str], folder: Path) -> list[str]:
    """Confusion matrix (counts and row fractions), reliability diagram, redshift true vs predicted."""
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    confusion = np.asarray(metrics["confusion"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), layout="constrained")
    with np.errstate(invalid="ignore"):
        frac = confusion / confusion.sum(axis=1, keepdims=True)
    for ax, data, title, fmt in ((axes[0], confusion, "counts", "d"), (axes[1], np.nan_to_num(frac), "fraction of true class", ".2f")):
        im = ax.imshow(data, cmap="Blues")
        ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true", title=f"confusion ({title})")
        ax.set_xticklabels(class_names, rotation=90, fontsize=7)
        ax.set_yticklabels(class_names, fontsize=7)
        for (i, j), v in np.ndenumerate(data):
            if v:
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, shrink=0.7)
    paths.append(save_figure(fig, folder / "confusion_matrix.png"))

    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    for probs, label in ((arrays["probs_raw"], f"T=1 (ECE {metrics['ece_before']:.3f})"), (arrays["probs"], f"T={metrics['temperature']:.2f} (ECE {metrics['ece_after']:.3f})")):
        curve = reliability_curve(probs, arrays["labels"], n_bins=10)
        full = curve.counts > 0
        ax.plot(curve.confidence[full], curve.accuracy[full], "o-", label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability (test)", xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    paths.append(save_figure(fig, folder / "reliability.png"))

    if "z_true" in arrays:
        fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
        hi = float(max(arrays["z_true"].max(), np.nanmax(arrays.get("z_pred", arrays["z_true"])))) * 1.05 + 0.01
        if "z_pred" in arrays:
            ax.errorbar(arrays["z_true"], arrays["z_pred"], yerr=arrays["z_err"], fmt=".", ms=3, alpha=0.5, elinewidth=0.5, color="0.6",
                        label=f"head (Z_NETWORK without a redshift network): NMAD {metrics['redshift_nmad']:.2g}, catastrophic {metrics['redshift_catastrophic_fraction']:.3f}")
        if "z_net" in arrays:  # `classify --redshift network` with a redshift network
            ax.errorbar(arrays["z_true"], arrays["z_net"], yerr=arrays["z_net_err"], fmt=".", ms=3, alpha=0.7, elinewidth=0.5, color="C1",
                        label=f"redshift network: NMAD {metrics['redshift_net_nmad']:.2g}, catastrophic {metrics['redshift_net_catastrophic_fraction']:.3f}")
        if "z_scan" in arrays:  # what `classify` writes as Z by default
            ax.errorbar(arrays["z_true"], arrays["z_scan"], yerr=arrays["z_scan_err"], fmt=".", ms=3, alpha=0.7, elinewidth=0.5, color="C0",
                        label=f"scan of the predicted class (Z): NMAD {metrics['redshift_scan_nmad']:.2g}, catastrophic {metrics['redshift_scan_catastrophic_fraction']:.3f}")
        ax.plot([0, hi], [0, hi], "k:", lw=1)
        ax.legend(loc="upper left", fontsize=7)
        ax.set(xlabel="true z", ylabel="predicted z", title="redshifts of the test block")
        paths.append(save_figure(fig, folder / "redshift.png"))
    return [str(p) for p in paths]
