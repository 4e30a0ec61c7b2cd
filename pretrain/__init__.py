"""The backbone, its tokenizers, objectives and pretraining loop.

Importing this package registers CosmoFM with transformers' Auto classes, so
`AutoModel.from_pretrained(path)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.data import CosmoFMBatch, ModalityBatch, collate_samples
from cosmofm.pretrain.modeling_cosmofm import (
    CosmoFMForPretraining,
    CosmoFMModel,
    CosmoFMOutput,
    CosmoFMPreTrainedModel,
    CosmoFMPretrainingOutput,
)

AutoConfig.register("cosmofm", CosmoFMConfig, exist_ok=True)
AutoModel.register(CosmoFMConfig, CosmoFMModel, exist_ok=True)
AutoModelForPreTraining.register(CosmoFMConfig, CosmoFMForPretraining, exist_ok=True)

__all__ = [
    "CosmoFMBatch",
    "CosmoFMConfig",
    "CosmoFMForPretraining",
    "CosmoFMModel",
    "CosmoFMOutput",
    "CosmoFMPreTrainedModel",
    "CosmoFMPretrainingOutput",
    "ModalityBatch",
    "collate_samples",
]
