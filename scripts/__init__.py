"""cosmofm: a self-supervised foundation model for astronomical data.

A thin facade, imported lazily (PEP 562): `import cosmofm` loads neither torch nor
transformers; `cosmofm.from_pretrained(path_or_repo_id)` (`cosmofm.finetune.release`:
downloads a hub release when given a repo id, verifies its checksums, and loads the
backbone or the registered task model its config.json names) and the backbone classes
are imported on first use. Importing `cosmofm.pretrain` (which any of them does)
registers CosmoFM with transformers' Auto classes, so `AutoModel.from_pretrained` needs
`import cosmofm.pretrain` first.

The subpackages live in the project's top-level folders: cosmofm.data_cards,
cosmofm.pretrain, cosmofm.heads, cosmofm.finetune; this folder (scripts/) holds the
CLI, the demo and benchmarks. Nothing below imports from here.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first access
_LAZY = {
    "from_pretrained": "cosmofm.finetune.release",
    "CosmoFMConfig": "cosmofm.pretrain",
    "CosmoFMForPretraining": "cosmofm.pretrain",
    "CosmoFMModel": "cosmofm.pretrain",
}
__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cosmofm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
