"""Benchmarks (`python -m cosmofm.bench.NAME`), and the one way they write their JSON.

`write_report(out, name, report)` writes `out/name` as strict JSON (NaN / inf as null,
numpy scalars as Python numbers: `finite`), atomically, making `out` if needed.
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
