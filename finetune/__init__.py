"""Fine-tuning task heads and publishing models.

`classification`: the spectral-classification fine-tune, calibration, evaluation and
`classify` (survey files in, catalogue out); `hub`: release folders, push and pull
(huggingface_hub, or a local-directory hub); `model_card`: model cards from the config,
data cards and measured metrics.
"""
