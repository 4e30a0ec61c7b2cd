"""Task heads on the CosmoFM backbone, one module per task, and their classical baselines.

`classification`: spectral class + redshift head (`CosmoFMForSpectralClassification`),
with `calibration` (temperature scaling, conformal sets) and the classical redshift
methods it is compared with and falls back on (`redshift_scan`, `template_fit`).
"""
