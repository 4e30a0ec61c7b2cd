"""Benchmarks (`python -m cosmofm.bench.NAME`), and the one way they write their JSON.

`write_report(out, name, report)` writes `out/name` as strict JSON (NaN / inf as null,
numpy scalars as Python numbers: `finite`), atomically, making `out` if needed.
`seed_summary(runs, arms, fractions, metrics, splits)` is the one mean +- spread over
fine-tune seeds that the value-of-pretraining benches (photo-z, deblending) report.
"""

from __future__ import annotations

from pathlib import Path


def finite(obj):
    """nan / inf -> None and numpy scalars -> Python, so the JSON is strict."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_report(out, name: str, report: dict) -> dict:
    """`finite(report)`, written atomically to out/name (out made if needed); returns it."""
    from cosmofm.data_cards.io.atomic import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = finite(report)
    atomic_write_json(out / name, report)
    return report


def seed_summary(runs: dict, arms, metrics, splits=("test",)) -> dict:
    """Mean and sample standard deviation over seeds, per arm and label fraction.

    `runs` maps "ARM/FRACTION/SEED" to a run's results, which hold one dict of metrics per
    split (`run[split][metric]`). Returns {"ARM/FRACTION": {"seeds": n,
    "SPLIT_METRIC": [mean, stdev]}} for every arm and fraction with at least one run done
    (stdev 0.0 for one seed), in the order of `arms`, then label fraction from 100 % down.
    Every fraction in `runs` is summarised, not only those of the latest invocation, so a
    bench resumed for a few missing rows still reports them all.
    """
    import statistics

    fractions = sorted({float(k.split("/")[1]) for k in runs}, reverse=True)
    summary = {}
    for arm in arms:
        for fraction in fractions:
            done = [v for k, v in runs.items() if k.startswith(f"{arm}/{fraction}/")]
            if not done:
                continue
            entry = {"seeds": len(done)}
            for split in splits:
                for m in metrics:
                    values = [d[split][m] for d in done]
                    entry[f"{split}_{m}"] = [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
            summary[f"{arm}/{fraction}"] = entry
    return summary
