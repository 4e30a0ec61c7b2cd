"""Fine-tuning task heads and publishing models.

Shared parts: `run`, fine-tuning any registered task (split, model on a backbone, loop,
calibration, evaluation, release; runners by task name) and `recipe`, its YAML recipes
(`recipes/*.yaml`, `cosmofm finetune --task NAME`); `loop`, the one fine-tune loop (Accelerate; sharding, accumulation, bf16,
checkpoints with exact resume); `strategies`, what trains and at which learning rates
(frozen probe, last-n blocks, LoRA, full, layer-wise LR decay); `predict`, the one predict
path, survey files in -> catalogue out for any task that gives it a `Predictor`, and
`task_predict`, the `Predictor` of every registered task (`cosmofm predict`);
`figures`, plotting. Spectral classification on them: `classification` (its own fine-tune runner),
`classification_eval` (calibration and evaluation), `classify` (its predictor). Metrics
live in `cosmofm.heads.metrics`, beside the tasks that use them. Publishing: `release`,
the verified loader behind `cosmofm.from_pretrained`; `release_folder`, release folders
(assemble, verify); `hub`, push and pull; `local_hub`, the local-directory hub;
`model_card`, model cards from the config, data cards and measured metrics.
"""
