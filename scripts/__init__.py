"""cosmofm: a self-supervised foundation model for astronomical data.

`import cosmofm` registers the models with transformers' Auto classes and offers
`cosmofm.from_pretrained(path_or_repo_id)`, which downloads a hub release when given a
repo id (`cosmofm.finetune.hub`) and verifies its checksums before loading.
The subpackages live in the project's top-level folders: cosmofm.data_cards,
cosmofm.pretrain, cosmofm.heads, cosmofm.finetune; this folder (scripts/) holds the
CLI, the demo, recipes and benchmarks.
"""

from cosmofm.pretrain import CosmoFMConfig, CosmoFMForPretraining, CosmoFMModel  # registers Auto classes
from cosmofm.release import from_pretrained

__version__ = "0.1.0"
__all__ = ["CosmoFMConfig", "CosmoFMForPretraining", "CosmoFMModel", "from_pretrained", "__version__"]
