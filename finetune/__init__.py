"""Fine-tuning task heads and publishing models.

`classification`: the spectral-classification fine-tune, calibration, evaluation and
`classify` (its predictor on the predict path); `predict`: the one predict path, survey
files in -> catalogue out for any task (streaming pieces, worker processes, rows
written as pieces finish), to which a task gives a small `Predictor`; `strategies`: what trains and at which
learning rates (frozen probe, last-n blocks, LoRA, full, layer-wise LR decay); `metrics`:
classification and redshift metrics shared by fine-tunes, tests and benchmarks;
`release`: the verified loader behind `cosmofm.from_pretrained` (checksums, then the
class from config.json: a backbone, or a task from the heads registry); `hub`: release
folders, push and pull (huggingface_hub, or a local-directory hub); `model_card`: model
cards from the config, data cards and measured metrics.
"""
