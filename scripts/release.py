"""Loading released models: checksums first, then the class named in config.json.

A release folder holds config.json, model.safetensors and manifest.json (sha256 of
every file). `from_pretrained` refuses folders with pickle-format weights and stops
with an error naming the file when one is missing or altered.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PreTrainedModel

from cosmofm.data_cards.errors import InputError
from cosmofm.pretrain import CosmoFMForPretraining, CosmoFMModel
from cosmofm.pretrain.checkpoint import verify_manifest

# Architectures cosmofm can load, by the name transformers writes into config.json.
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {cls.__name__: cls for cls in (CosmoFMModel, CosmoFMForPretraining)}


def from_pretrained(path: str | Path, **kwargs) -> PreTrainedModel:
    """Load a cosmofm release folder, verified, as the class its config names."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(str(path), "is not a folder", "give the folder written by save_pretrained (config.json + model.safetensors)")
    verify_manifest(folder, required=("config.json", "model.safetensors"))
    config = AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or ["CosmoFMModel"]
    cls = MODEL_CLASSES.get(names[0])
    if cls is None:
        raise InputError(f"{folder / 'config.json'}: architectures", f"{names[0]!r} is not a cosmofm model", f"known: {sorted(MODEL_CLASSES)}")
    return cls.from_pretrained(folder, config=config, use_safetensors=True, **kwargs)
