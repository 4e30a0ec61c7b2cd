"""Fine-tune the spectral classification head: the config, the split, the run.

    result = finetune_classification(samples, card, FinetuneConfig(strategy="frozen", output_dir="runs/cls"),
                                     backbone="runs/a/model")

Fine-tuning (zoobot's `finetune.py` in spirit: one class per task, few knobs, one way
to name the starting weights): the labelled samples are split by index into train /
calibration / test blocks; the model trains with AdamW in the minimal Accelerate loop
(pretrain/train.py), with one of the strategies of `finetune/strategies.py` (frozen
probe, last-n blocks, LoRA, full; layer-wise LR decay). Then `finetune/classification_eval.py`
fits the temperature (Guo et al. 2017) and split-conformal threshold (alpha from the
calibration error rate unless given) on the calibration block, stores them in the config,
and scores the test block; `save_run` writes the release, `eval_results.json` (the format
`finetune/model_card.load_eval_results` reads) and the figures of `finetune/figures.py`.
Inference with the result (`predict`, `classify` on survey files) is in `finetune/classify.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.finetune.classification_eval import calibrate_and_evaluate, eval_results
from cosmofm.finetune.classify import load_classifier, predict
from cosmofm.finetune.figures import plot_figures
from cosmofm.finetune.loop import LoopConfig, finetune_loop
from cosmofm.finetune.strategies import Strategy
from cosmofm.heads.classification import ClassificationHeadConfig, ClassificationTask, CosmoFMForSpectralClassification, labels_from_samples
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig


@dataclass
class FinetuneConfig(LoopConfig):
    """Fine-tuning knobs: the loop's (`finetune.loop.LoopConfig`: epochs (5), batch_size (32),
    lr (1e-3, the head's; cosine after warmup_fraction 0.05 of the steps), weight_decay
    (0.01), grad_accum, mixed_precision, seed (0; shuffling and init), output_dir (the model,
    eval_results.json and figures), checkpoint_every, resume, trackers, progress) and these.

    Args:
        strategy (`str`, "frozen"): "frozen" (head only), "last-n" (the last n_blocks
            blocks and the head), "lora" or "full" (`finetune.strategies`).
        n_blocks (`int`, 0): blocks trained by "last-n".
        layer_decay (`float`, 1.0): layer-wise LR decay, the factor per block below the last.
        backbone_lr_scale (`float`, 0.3): backbone LR / head LR for "full" and "last-n".
        label_fraction (`float`, 1.0): fraction of the training block whose labels are used.
        calibration_fraction (`float`, 0.2): fraction of all samples held out for calibration.
        test_fraction (`float`, 0.2): fraction of all samples held out for the test metrics.
        alpha (`float` or None, None): conformal miscoverage level; None chooses it from
            the calibration block (`heads.calibration.default_alpha`: 0.1 unless the
            classifier errs less often than that, then the largest of 0.05 / 0.02 / 0.01 /
            0.005 below its error rate, so the sets stay informative).
        mc_samples (`int`, 0): Monte-Carlo-dropout passes of the head scored on the test
            block next to the default (temperature scaling + conformal sets); 0 = skip.
        head_hidden (`int`, 128), head_dropout (`float`, 0.1), redshift (`bool`, True): head settings.
        redshift_weight (`float`, 0.1): weight of the redshift Gaussian NLL against the
            class cross-entropy (at 1.0 the NLL, which keeps falling as the predicted
            variance shrinks, halved the test accuracy of our small runs).
        lora_rank (`int`, 8), lora_alpha (`int`, 16): LoRA adapter rank and scale.
        distill_weight (`float`, 1.0), distill_temperature (`float`, 2.0): knowledge distillation
            from a `teacher` (finetune_classification argument), when one is given.
    """

    strategy: str = "frozen"
    n_blocks: int = 0
    layer_decay: float = 1.0
    backbone_lr_scale: float = 0.3
    label_fraction: float = 1.0
    calibration_fraction: float = 0.2
    test_fraction: float = 0.2
    alpha: float | None = None
    mc_samples: int = 0
    head_hidden: int = 128
    head_dropout: float = 0.1
    redshift: bool = True
    redshift_weight: float = 0.1
    lora_rank: int = 8
    lora_alpha: int = 16
    distill_weight: float = 1.0
    distill_temperature: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        self.tuning  # building the Strategy checks its knobs
        if not 0 < self.label_fraction <= 1:
            raise InputError("label_fraction", f"must be in (0, 1], got {self.label_fraction}", "e.g. 0.1 for 10% of the labels")
        if not (0 < self.calibration_fraction < 1 and 0 < self.test_fraction < 1 and self.calibration_fraction + self.test_fraction < 1):
            raise InputError("calibration_fraction / test_fraction", "must be positive and sum to less than 1", "e.g. 0.2 and 0.2")
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise InputError("alpha", f"must be in (0, 1) or None (chosen from the calibration block), got {self.alpha}", "e.g. 0.05 for 95% coverage")

    @property
    def tuning(self) -> Strategy:
        """The fine-tuning strategy these knobs name."""
        return Strategy(self.strategy, self.n_blocks, self.layer_decay, self.backbone_lr_scale, self.lora_rank, self.lora_alpha)


def split_indices(n: int, cfg: FinetuneConfig) -> dict[str, np.ndarray]:
    """Contiguous blocks by index: train (first), calibration, test (last); label_fraction of train kept."""
    n_test = max(1, int(round(cfg.test_fraction * n)))
    n_cal = max(1, int(round(cfg.calibration_fraction * n)))
    n_train_all = n - n_test - n_cal
    n_train = int(math.floor(cfg.label_fraction * n_train_all))
    if n_train < 1:
        raise InputError("samples", f"{n} samples leave no training labels (label_fraction {cfg.label_fraction})", "give more samples or a larger label_fraction")
    return {
        "train": np.arange(n_train),
        "calibration": np.arange(n_train_all, n_train_all + n_cal),
        "test": np.arange(n_train_all + n_cal, n),
    }


def build_model(card, cfg: FinetuneConfig, backbone=None, backbone_config: dict | None = None) -> CosmoFMForSpectralClassification:
    """The classification model: weights from `backbone` (a release folder or a CosmoFMModel) or fresh.

    Exactly one way to name the starting point: `backbone` (folder / module) or
    `backbone_config` (a fresh backbone's CosmoFMConfig arguments), not both.
    """
    from cosmofm.pretrain.modeling_cosmofm import CosmoFMModel

    if backbone is not None and backbone_config is not None:
        raise InputError("backbone / backbone_config", "both given", "start from a pretrained backbone or from a fresh config, not both")
    head = ClassificationHeadConfig.from_card(card, hidden_size=cfg.head_hidden, dropout=cfg.head_dropout, redshift=cfg.redshift,
                                              redshift_weight=cfg.redshift_weight)
    if backbone is None:
        config = CosmoFMConfig(**{"survey_names": [card.name], **(backbone_config or {})})
        torch.manual_seed(cfg.seed)
        return CosmoFMForSpectralClassification.from_backbone_config(config, head)
    if not isinstance(backbone, CosmoFMModel):
        from cosmofm.finetune.release import from_pretrained

        loaded = from_pretrained(backbone)
        if isinstance(loaded, CosmoFMForSpectralClassification) or not isinstance(loaded, CosmoFMModel):
            loaded = getattr(loaded, "cosmofm", None)
        if not isinstance(loaded, CosmoFMModel):
            raise InputError(str(backbone), "holds no CosmoFM backbone", "give a release folder written by `cosmofm pretrain`")
        backbone = loaded
    torch.manual_seed(cfg.seed)
    model = CosmoFMForSpectralClassification.from_backbone_config(backbone.config, head)
    model.cosmofm.load_state_dict(backbone.state_dict())
    return model


def finetune_classification(samples: Sequence[Sample], card, cfg: FinetuneConfig | None = None, backbone=None,
                            backbone_config: dict | None = None, teacher=None) -> dict:
    """Fine-tune, calibrate on the calibration block, evaluate on the test block, save.

    Args:
        samples: labelled spectrum Samples (`meta["labels"]` with the card's class and redshift).
        card: the DataCard whose label schema names the classes.
        cfg: the knobs (FinetuneConfig).
        backbone: a pretrained release folder / repo id or a CosmoFMModel; None = fresh backbone.
        backbone_config: CosmoFMConfig arguments of a fresh backbone (only without `backbone`).
        teacher: a fine-tuned classification model (or its folder) to distil from: the
            loss gains cfg.distill_weight x T^2 x KL(teacher || student) of the
            temperature-T (cfg.distill_temperature) class probabilities (Hinton et al.
            2015). Teacher logits are computed once for the training block.

    Returns a dict: model, metrics (test block), history (loss per epoch), splits, paths.
    """
    from accelerate.utils import set_seed

    cfg = cfg or FinetuneConfig()
    if len(samples) < 10:
        raise InputError("samples", f"only {len(samples)} labelled samples", "give at least 10 (train, calibration and test blocks)")
    splits = split_indices(len(samples), cfg)
    set_seed(cfg.seed)
    model = build_model(card, cfg, backbone, backbone_config)
    head = model.head_config
    labels, redshifts = labels_from_samples(samples, head)
    train = [samples[int(i)] for i in splits["train"]]  # the first n_train samples: loop index i is samples[i]
    loss = None
    if teacher is not None:
        with torch.random.fork_rng():  # loading the teacher draws no random numbers of the student's
            teacher = load_classifier(teacher)
        if teacher.class_names != head.class_names:
            raise InputError("teacher", f"predicts {teacher.class_names}, not this card's classes", "distil from a model fine-tuned on the same label schema")
        teacher_logits = torch.as_tensor(predict(teacher, train, batch_size=256)["logits"])
        loss = _distillation_loss(teacher_logits, cfg.distill_weight, cfg.distill_temperature)

    run = finetune_loop(model, train, ClassificationTask(head).targets, cfg.tuning, replace(cfg, desc=f"finetune ({cfg.strategy})"), loss)
    model, history = run.model, run.epoch_losses

    metrics, arrays = calibrate_and_evaluate(model, samples, splits, labels.numpy(), None if redshifts is None else redshifts.numpy(), cfg.alpha,
                                              cfg.mc_samples)
    result = {"model": model, "metrics": metrics, "history": history, "splits": {k: v.tolist() for k, v in splits.items()}}
    if cfg.output_dir:
        result.update(save_run(model, metrics, arrays, card, cfg, history))
    return result


def _distillation_loss(teacher_logits: torch.Tensor, weight: float, temperature: float):
    """The loop's loss with knowledge distillation (Hinton et al. 2015): the head's loss plus
    weight x T^2 x KL(teacher || student) of the temperature-T class probabilities;
    `teacher_logits` (N, C) of the training samples, indexed by the loop's sample index."""

    def loss(out, index: torch.Tensor) -> torch.Tensor:
        t = temperature
        teacher = torch.softmax(teacher_logits[index].to(out.logits.device) / t, -1)
        kd = torch.nn.functional.kl_div(torch.log_softmax(out.logits.float() / t, -1), teacher, reduction="batchmean")
        return out.loss + weight * t * t * kd

    return loss


def save_run(model: CosmoFMForSpectralClassification, metrics: dict, arrays: dict, card, cfg: FinetuneConfig, history: list[float]) -> dict:
    from cosmofm.pretrain.checkpoint import atomic_write_bytes, save_release

    out = Path(cfg.output_dir)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    # json.dumps, not the strict atomic_write_json: a metric undefined on a small test
    # block (a class with no objects) is written as NaN, as before
    results = json.dumps(eval_results(metrics, card.name), indent=2).encode()
    atomic_write_bytes(model_dir / "eval_results.json", results)
    save_release(model, model_dir)
    atomic_write_bytes(out / "eval_results.json", results)
    atomic_write_bytes(out / "finetune_config.json", json.dumps({**asdict(cfg), "history": history}, indent=2).encode())
    figures = plot_figures(arrays, metrics, model.class_names, out / "figures")
    return {"output_dir": str(out), "model_dir": str(model_dir), "eval_results": str(out / "eval_results.json"), "figures": figures}
