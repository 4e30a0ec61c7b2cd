"""Task heads on the CosmoFM backbone, one module per task, and their classical baselines.

`base`: the task seam: head configs (`TaskHeadConfig`, saved as `config.task`), the
backbone + head base (`CosmoFMForTask`), `@register_task` and the `Task` protocol; the
loader finds every task registered in this package's modules by `task.type`.
`classification`: spectral class + redshift head (`CosmoFMForSpectralClassification`),
with `calibration` (temperature scaling, conformal sets), `metrics` (classification and
redshift figures, used by `Task.metrics`, the fine-tunes and the benchmarks) and the classical redshift
methods it is compared with and falls back on (`redshift_scan`, `template_fit`).
`photoz`: photometric redshift from image stamps (`CosmoFMForPhotoz`, binned p(z)), with `photoz_metrics` and its kNN baseline `photoz_baseline`.
"""
