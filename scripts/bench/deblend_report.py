"""The deblending bench's report (`deblend_quality`): its headline rows per method, where the head's
flux error lies (`error_sources`), the blend / model / residual panels, the mean +- std over
training seeds of several runs (`--seed-summary`, one summary per --test-shift setting), and the
figure of their flux errors against the test seeing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


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


def error_sources(model, blends, fwhm: float, ref: int, batch_size: int = 32) -> dict:
    """Where the head's flux error lies, in band `ref`, at the true centres (known-positions
    mode, so without the outskirts correction): the fluxes of its own fractions f beside two
    hybrids with the true fractions t (iso_k / (sum_j iso_j + eps_b), eps_b as its targets):
    "background only" = t_k / (1 - t_bg) x (1 - f_bg), its background share with the true
    split among the sources, and "sources only" = f_k / (1 - f_bg) x (1 - t_bg), the true
    background share with its split. Per estimate, blended (a true neighbour < 2 FWHM) and
    not: `flux_stats` of the relative error against the true total flux, the median |error|
    and the share of the MAPE from the worst tenth of the sources (the tail)."""
    from cosmofm.heads import deblending_metrics as dm
    from cosmofm.heads.deblending import DeblendingTask
    from cosmofm.heads.deblending_predict import padded_positions
    from cosmofm.pretrain.data import collate_samples

    task = DeblendingTask(model.head_config)
    rel: dict[str, list] = {"head": [], "background only": [], "sources only": []}
    blended = []
    for start in range(0, len(blends), batch_size):
        part = blends[start:start + batch_size]
        pos = padded_positions([t.pixel_positions for _, t in part])
        with torch.no_grad():
            samples = [s for s, _ in part]
            fractions = model(collate_samples(samples, model.config.survey_names), positions=pos, **task.inputs(samples)).fractions
        for (s, t), fr in zip(part, fractions):
            k = len(t.pixel_positions)
            f = fr.double().numpy()[:, ref]  # (K' + 1, H, W): the first k are the given sources, background last
            f_src, f_bg = f[:k], f[-1]
            ivar = np.asarray(s.ivar, np.float64)
            image = np.where(ivar[ref] > 0, np.asarray(s.values, np.float64)[ref], 0.0)
            iso = np.clip(np.asarray(t.isolated, np.float64)[:, ref], 0, None)
            eps = model.head_config.background_level * dm.sky_sigma(ivar)[ref]
            t_bg = eps / (iso.sum(0) + eps)
            t_split = iso / np.clip(iso.sum(0), 1e-300, None)
            f_split = f_src / np.clip(f_src.sum(0), 1e-12, None)
            truth = np.asarray(t.flux_njy, np.float64)[:, ref]
            for name, frac in (("head", f_src), ("background only", t_split * (1 - f_bg)), ("sources only", f_split * (1 - t_bg))):
                rel[name].append(((frac * image).sum((-2, -1)) - truth) / truth)
            blended.append(dm.nearest_neighbour_distance(t.pixel_positions) / fwhm < dm.BLENDED_FWHM)  # as score_stamp
    blended = np.concatenate(blended)
    out = {}
    for name, parts in rel.items():
        r = np.concatenate(parts)
        out[name] = {}
        for group, m in (("blended", blended), ("not blended", ~blended)):
            a = np.sort(np.abs(r[m & np.isfinite(r)]))
            tail = a[len(a) - max(1, len(a) // 10):]
            out[name][group] = {**dm.flux_stats(r[m]), "median_abs": float(np.median(a)) if a.size else float("nan"),
                                "worst_tenth_share_of_mape": float(tail.sum() / a.sum()) if a.sum() > 0 else float("nan")}
    return out


def panels_figure(path: Path, blends, head_cats, model, results: dict, ref: int) -> None:
    """Blend / head model / residual panels of three test blends, and flux error vs separation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cosmofm.heads.deblending import DeblendingTask
    from cosmofm.pretrain.data import collate_samples

    picks = [i for i, (_, t) in enumerate(blends) if len(t.pixel_positions) >= 3][:3] or [0, 1, 2]
    fig, axes = plt.subplots(len(picks) + 1, 3, figsize=(10, 3.3 * (len(picks) + 1)))
    for row, i in enumerate(picks):
        s, t = blends[i]
        with torch.no_grad():
            o = model(collate_samples([s], model.config.survey_names), **DeblendingTask(model.head_config).inputs([s]))
        fr = o.fractions[0]
        image = s.values[ref]
        model_img = (fr[:-1, ref].sum(0).numpy() * image)
        lim = np.percentile(image, 99.5)
        stretch = np.arcsinh(lim / (0.1 * lim))
        for ax, img, title in zip(axes[row], (image, model_img, image - model_img), ("blend (r)", "head: sum of sources", "residual (background share)")):
            if "resid" in title:  # its own scale: the background share is noise-level
                r = np.percentile(np.abs(img), 99.5)
                ax.imshow(img, origin="lower", cmap="coolwarm", vmin=-r, vmax=r)
            else:
                ax.imshow(np.arcsinh(img / (0.1 * lim)), origin="lower", cmap="magma", vmin=0, vmax=stretch)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].plot(t.pixel_positions[:, 1], t.pixel_positions[:, 0], "c+", ms=8, label="truth")
        c = head_cats[i].positions
        axes[row, 1].plot(c[:, 1], c[:, 0], "gx", ms=7, label="head")
    ax = axes[-1, 0]
    edges = np.array([0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0])
    mid = 0.5 * (edges[1:] + edges[:-1])
    for name, pts in results["_points"].items():
        sep, rel = pts
        ok = np.isfinite(rel) & np.isfinite(sep)
        med = [np.median(rel[ok & (sep >= lo) & (sep < hi)]) if np.any(ok & (sep >= lo) & (sep < hi)) else np.nan for lo, hi in zip(edges[:-1], edges[1:])]
        mad = [1.4826 * np.median(np.abs(rel[ok & (sep >= lo) & (sep < hi)] - m)) if np.isfinite(m) else np.nan
               for (lo, hi), m in zip(zip(edges[:-1], edges[1:]), med)]
        ax.plot(mid, med, "o-", label=name, ms=3)
        axes[-1, 1].plot(mid, mad, "o-", label=name, ms=3)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="separation to nearest neighbour [PSF FWHM]", ylabel="median (f - f_true) / f_true (r)", ylim=(-0.5, 0.5))
    axes[-1, 1].set(xlabel="separation [PSF FWHM]", ylabel="NMAD of relative flux error (r)", ylim=(0, 0.6))
    axes[-1, 1].legend(fontsize=7)
    axes[-1, 2].axis("off")
    save_png(fig, path)


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
