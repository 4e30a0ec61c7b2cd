"""Fine-tuning strategies: which parameters of a backbone + head model train, and how fast.

    strategy = Strategy("last-n", n_blocks=2, layer_decay=0.75)
    optimizer = torch.optim.AdamW(apply_strategy(model, strategy, lr=1e-3, weight_decay=0.01))
    for epoch in ...:
        model.train()
        eval_frozen_layers(model, strategy)  # frozen layers run without dropout
        ...
    model = finish_strategy(model, strategy)  # LoRA merged into the weights, all trainable again

The strategies (zoobot's `finetune.py` knobs: `n_blocks`, per-block LR decay), counted
over the backbone's `layer_groups()` (embeddings, blocks, final norm), so no strategy
looks at module names or types:

- `frozen`: a probe on the frozen backbone; only the head trains (zoobot's n_blocks=0).
- `last-n`: the last `n_blocks` transformer blocks, the final norm and the head train.
- `lora`: low-rank adapters (Hu et al. 2021, via peft) on the attention qkv / proj
  layers train with the head; merged into the weights when training ends.
- `full`: everything trains.
- `student`: only the model's student trains: the fast path some heads carry (the
  deblending head's `PixelStudent`, `model.student`), distilled from the rest of a
  fine-tuned release of the task, which stays frozen in eval mode and is its teacher.
  The forward runs with `student=True` (`Strategy.forward_options`), in training and
  in the evaluation that follows.

`layer_decay` (layer-wise LR decay, `CosmoFMPreTrainedModel.parameter_groups`) scales
the LR of whatever backbone parameters train: the last block's is the backbone LR, each
block below gets a further factor `layer_decay`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from cosmofm.data_cards.errors import InputError

STRATEGIES = ("frozen", "last-n", "lora", "full", "student")
LORA_TARGETS = r".*attn\.(qkv|proj)"  # the attention's fused qkv and output projections


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(kw_only=True)
class StrategyKnobs:
    """The settings of a fine-tuning strategy beside its name, flat as a recipe's
    `finetune:` section writes them (fine-tune configs inherit them; `Strategy` checks them).

    Args:
        n_blocks (`int`, 0): "last-n": trailing transformer blocks that train (>= 1).
        layer_decay (`float`, 1.0): LR factor per block below the last, in (0, 1]; 1 = none.
        backbone_lr_scale (`float`, 0.3): backbone LR / head LR where backbone weights
            train ("full", "last-n"); the adapters of "lora" train at the head's LR.
        lora_rank (`int`, 8), lora_alpha (`int`, 16): LoRA adapter rank and scale.
    """

    n_blocks: int = 0
    layer_decay: float = 1.0
    backbone_lr_scale: float = 0.3
    lora_rank: int = 8
    lora_alpha: int = 16

    def knobs(self) -> dict:
        """These settings as keyword arguments of `Strategy`."""
        return {f.name: getattr(self, f.name) for f in fields(StrategyKnobs)}


@dataclass
class Strategy(StrategyKnobs):
    """How a backbone + head model is fine-tuned: `Strategy(name, **knobs)`, with `name`
    one of STRATEGIES ("frozen" by default) and the `StrategyKnobs` as keywords."""

    name: str = "frozen"

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise InputError("strategy", f"is {self.name!r}", f"use one of {list(STRATEGIES)}")
        if self.name == "lora" and not peft_available():
            raise InputError("strategy", "lora needs peft, which is not installed", "pip install -c constraints.txt peft, or use frozen, last-n or full")
        if self.name == "last-n" and self.n_blocks < 1:
            raise InputError("n_blocks", f"is {self.n_blocks}; last-n trains at least one block", "give n_blocks >= 1 (0 blocks is strategy frozen)")
        if self.name != "last-n" and self.n_blocks != 0:
            raise InputError("n_blocks", f"is {self.n_blocks}, but only strategy last-n trains a number of blocks", "use strategy last-n, or drop n_blocks")
        if not 0 < self.layer_decay <= 1:
            raise InputError("layer_decay", f"must be in (0, 1], got {self.layer_decay}", "e.g. 0.75, or 1 for no decay")
        if self.name in ("frozen", "student") and self.layer_decay != 1:
            raise InputError("layer_decay", f"has no effect with strategy {self.name} (no backbone parameter trains)", "use last-n, lora or full, or drop layer_decay")
        if not self.backbone_lr_scale > 0:
            raise InputError("backbone_lr_scale", f"must be > 0, got {self.backbone_lr_scale}", "e.g. 0.3")

    def forward_options(self) -> dict:
        """Keyword arguments of the model's forward under this strategy: the student's path for "student"."""
        return {"student": True} if self.name == "student" else {}


def train_last_blocks(backbone, n_blocks: int) -> None:
    """Freeze `backbone` except its last `n_blocks` transformer blocks and final norm (0: all frozen)."""
    groups = backbone.layer_groups()  # embeddings, blocks..., final norm
    blocks = len(groups) - 2
    if not 0 <= n_blocks <= blocks:
        raise InputError("n_blocks", f"is {n_blocks}; the backbone has {blocks} blocks", f"give 1 to {blocks}, or strategy full to train the embeddings too")
    backbone.requires_grad_(False)
    for group in groups[len(groups) - 1 - n_blocks:] if n_blocks else ():
        group.requires_grad_(True)


def add_lora(model, rank: int, alpha: int) -> None:
    """Wrap the backbone of `model` in peft LoRA adapters (which freezes all else in it)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    setattr(model, model.base_model_prefix, get_peft_model(model.base_model, lora))


def apply_strategy(model, strategy: Strategy, lr: float, weight_decay: float) -> list[dict]:
    """Set what trains in `model` (a CosmoFMPreTrainedModel with a head) for `strategy`;
    return its AdamW parameter groups (head at `lr`, the backbone as `Strategy` says)."""
    if strategy.name == "student":
        if getattr(model, "student", None) is None:
            raise InputError("strategy", f"student trains the model's student, and this {type(model).__name__} has none",
                             "give the head one (deblending: head.student_widths=[16, 32, 48, 64]), or use another strategy")
        model.requires_grad_(False)
        model.student.requires_grad_(True)
        return model.parameter_groups(lr, weight_decay, head_lr=lr)
    if strategy.name in ("frozen", "last-n"):
        train_last_blocks(model.base_model, strategy.n_blocks)
    elif strategy.name == "lora":
        add_lora(model, strategy.lora_rank, strategy.lora_alpha)
    backbone_lr = lr * (strategy.backbone_lr_scale if strategy.name in ("full", "last-n") else 1.0)
    return model.parameter_groups(backbone_lr, weight_decay, strategy.layer_decay, head_lr=lr)


def eval_frozen_layers(model, strategy: Strategy) -> None:
    """After `model.train()`: the layer groups that do not train under frozen / last-n go
    back to eval mode, so a frozen backbone also runs without dropout; under "student"
    everything but the student (the teacher)."""
    if strategy.name == "student":
        for part in model.children():
            part.train(part is model.student)
    if strategy.name in ("frozen", "last-n"):
        for group in model.base_model.layer_groups():
            if not any(p.requires_grad for p in group.parameters()):
                group.eval()


def finish_strategy(model, strategy: Strategy):
    """After training: LoRA adapters merged into the weights (a plain model again), every
    parameter trainable; returns the model."""
    if strategy.name == "lora":
        setattr(model, model.base_model_prefix, model.base_model.merge_and_unload())
    (model if strategy.name == "student" else model.base_model).requires_grad_(True)  # a head's frozen teacher too
    return model
