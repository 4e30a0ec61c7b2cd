"""The deblending bench's report (`deblend_quality`): its headline rows per method, the mean +- std
over training seeds of several runs (`--seed-summary`, one summary per --test-shift setting), and
the figure of their flux errors against the test seeing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def headline(report: dict, band: str) -> dict:
    """Per method: detection F1 and recall vs separation [FWHM], blended- and isolated-source flux
    bias / NMAD (MAPE for blended) in the reference band, speed."""
    rows = {}
    for name, res in report.items():
        if not isinstance(res, dict) or "stamps_per_s" not in res:
            continue
        for m, r in ([(None, res)] if "detection" in res else [(k, v) for k, v in res.items() if isinstance(v, dict) and "detection" in v]):
            fb = r["flux_blended"][band]
            rows[name if m is None else f"{name} {m}"] = {
                "f1": r["detection"]["f1"], "precision": r["detection"]["precision"], "recall": r["detection"]["recall"],
                "blended_bias": fb["bias"], "blended_nmad": fb["scatter"], "blended_mape": fb["mape"], "n_blended": fb["n"],
                "isolated_bias": r["flux_isolated"][band]["bias"], "isolated_nmad": r["flux_isolated"][band]["scatter"],
                "n_isolated": r["flux_isolated"][band]["n"],
                "isolated_mape": r["flux_isolated"][band]["mape"],
                "recall_vs_separation": {f"{b['lo']:g}-{b['hi']:g}": b["recall"] for b in r["detection_vs_separation"]},
                "blended_mape_vs_mag": {f"{b['lo']:g}-{b['hi']:g}": b["mape"] for b in r["flux_blended_vs_mag"]},
                "blended_bias_vs_mag": {f"{b['lo']:g}-{b['hi']:g}": b["bias"] for b in r["flux_blended_vs_mag"]},
                "isolated_mape_vs_mag": {f"{b['lo']:g}-{b['hi']:g}": b["mape"] for b in r["flux_isolated_vs_mag"]},
                "mape_vs_separation": {f"{b['lo']:g}-{b['hi']:g}": b["mape"] for b in r["flux_vs_separation"]},
                "blended_mape_by_kind": {k: v["mape"] for k, v in r.get("flux_blended_by_kind", {}).items()},
                "blended_bias_by_kind": {k: v["bias"] for k, v in r.get("flux_blended_by_kind", {}).items()},
                "iou": r["segmentation_iou_matched_mean"], "stamps_per_s": res["stamps_per_s"]}
    return rows


def seed_columns(row: dict) -> dict:
    """A headline row's scalar columns, its binned ones flattened ("blended_mape_vs_mag 19-20")."""
    flat = {}
    for k, v in row.items():
        flat.update({f"{k} {b}": x for b, x in v.items()} if isinstance(v, dict) else {k: v})
    return flat


def summarise_seeds(reports: dict[str, dict]) -> dict:
    """Mean and sample std (`seed_summary`) over training seeds of every headline row and column
    of `reports` (name -> a run's JSON, all of one config), beside each run's seed, steps and load."""
    from cosmofm.bench import seed_summary
    from cosmofm.data_cards.errors import InputError

    runs, meta = {}, []
    for i, (name, rep) in enumerate(reports.items()):
        # a run of --model is its saved head's; others are their --train-seed's (0 before the option)
        seed = rep["training"].get("loaded", rep["args"].get("train_seed", 0))
        if any(m["train_seed"] == seed for m in meta):
            raise InputError(name, f"repeats training seed {seed}", "give one run per --train-seed (per saved head with --model)")
        runs.update({f"{row}/1.0/{i}": {"test": seed_columns(cols)} for row, cols in rep["headline"].items()})
        meta.append({"run": name, "train_seed": seed, "steps": rep["training"].get("steps"), "train_s": rep["training"].get("train_s"),
                     "test_shift": rep.get("test_shift", {}),
                     "loadavg_start": rep["machine"]["loadavg_start"], "loadavg_end": rep["machine"]["loadavg_end"]})
    first = next(iter(reports.values()))
    summary = {}
    for row in first["headline"]:  # per row, the columns finite in every run (an oracle has no speed)
        done = [v["test"] for k, v in runs.items() if k.startswith(f"{row}/")]
        cols = [c for c in done[0] if all(c in d and d[c] is not None and np.isfinite(d[c]) for d in done)]
        e = seed_summary(runs, [row], cols)[f"{row}/1.0"]
        summary[row] = {m.removeprefix("test_"): v for m, v in e.items()}
    return {"args": {k: v for k, v in first["args"].items() if k not in ("out", "train_seed")}, "runs": meta, "summary": summary}


def write_seed_summary(paths: Sequence[Path], out: Path, name: str = "deblend_quality_seeds.json") -> dict:
    """`summarise_seeds` of the runs' JSON at `paths`, written to out/`name`. Runs of several
    test settings (--test-shift) are summarised per setting: {"by_test_shift": {"psf_scale=1.25":
    summary, ...}}, "none" for the unshifted test blends."""
    from cosmofm.bench import write_report

    groups: dict[str, dict] = {}
    shifts: dict[str, dict] = {}  # label -> the runs' --test-shift
    for p in paths:
        rep = json.loads(p.read_text())
        shift = rep.get("test_shift", {})
        label = ",".join(f"{k}={v:g}" for k, v in sorted(shift.items())) or "none"
        groups.setdefault(label, {})[str(p)] = rep
        shifts[label] = shift
    summaries = {label: summarise_seeds(reports) for label, reports in groups.items()}
    report = write_report(out, name, next(iter(summaries.values())) if len(summaries) == 1 else {"by_test_shift": summaries})
    seeing = {shifts[label].get("psf_scale", 1.0): e["summary"] for label, e in summaries.items() if set(shifts[label]) <= {"psf_scale"}}
    if len(seeing) >= 2:
        seeing_figure(seeing, (out / name).with_suffix(".png"))
    for label, summary in summaries.items():
        for row, e in summary["summary"].items():
            cols = ("f1", "blended_bias", "blended_nmad", "blended_mape", "isolated_mape", "stamps_per_s")
            print(f"{label}: {row} ({e['seeds']} seeds): " + ", ".join(f"{c} {e[c][0]:.4g} +- {e[c][1]:.2g}" for c in cols if c in e))
    return report


def seeing_figure(by_scale: dict[float, dict], path: Path) -> None:
    """Blended NMAD and MAPE (mean +- std over seeds) against the test PSF FWHM scale, for the
    head (detection, true centres) and sep's aperture flux: `write_seed_summary`'s runs of
    several --test-shift psf_scale settings (1 = the card's, the "none" runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(by_scale)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, col, label in zip(axes, ("blended_nmad", "blended_mape"), ("blended NMAD (r)", "blended MAPE [%] (r)")):
        for row, name in (("head", "head (detection)"), ("head_known_positions", "head (true centres)"), ("sep aperture", "sep aperture")):
            pts = [(x, by_scale[x][row][col]) for x in scales if col in by_scale[x].get(row, {})]
            if pts:
                x, (m, e) = np.array([p[0] for p in pts]), np.array([p[1] for p in pts]).T
                ax.errorbar(x, m, yerr=e, marker="o", ms=4, capsize=2, label=name)
        ax.axvline(1.0, color="k", lw=0.5, ls=":")
        ax.set(xlabel="test PSF FWHM / the training card's", ylabel=label)
    axes[0].legend(fontsize=8)
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """Lay out `fig`, write it to `path` atomically (90 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)
