"""Evaluation metrics of classification and redshift, shared by the fine-tune, the tests and the benchmarks.

They live in `heads/metrics.py`, beside the tasks whose `Task.metrics` use them (heads do
not import finetune); this module names them for the fine-tune side.
"""

from cosmofm.heads.metrics import (  # noqa: F401  (re-exported)
    CATASTROPHIC_DZ,
    MIN_PULLS,
    NMAD_SCALE,
    classification_metrics,
    pull_width,
    redshift_error_scale,
    redshift_metrics,
)

__all__ = ["CATASTROPHIC_DZ", "MIN_PULLS", "NMAD_SCALE", "classification_metrics", "pull_width", "redshift_error_scale", "redshift_metrics"]
