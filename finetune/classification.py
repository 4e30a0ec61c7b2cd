"""Classification's fine-tune runner (`finetune.run.register_runner`): its knobs and the run.

    result = finetune_classification(samples, card, FinetuneConfig(strategy="frozen", output_dir="runs/cls"),
                                     backbone="runs/a/model")

What every task shares comes from `finetune/run.py`: the labelled samples are split by
index into train / calibration / test blocks, the model is built on the backbone, and
it trains in the one loop (`finetune/loop.py`) with one of the strategies of
`finetune/strategies.py`. What classification adds: distillation from a teacher,
augmentation of the training spectra (`finetune/spectra_augment.py`: smooth random tilts of
the spectra and of their ivar, `tilt_rms` / `tilt_ivar_rms`, nuisances the class must not
depend on such as dust and flux-calibration errors larger than the training mocks carry; a
redshift stretch of galaxies and QSOs, `redshift_stretch`), and an evaluation of its own: `finetune/classification_eval.py`
fits the temperature (Guo et al. 2017) and split-conformal threshold (alpha from the
calibration error rate unless given) on the calibration block and the out-of-set detector
(training block; threshold at `ood_rate` false flags on the calibration block), stores them,
and scores the test block; `save_run` writes the release, `eval_results.json` (the format
`finetune/model_card.load_eval_results` reads) and the figures of `finetune/figures.py`.
Inference with the result (`predict`, `classify` on survey files) is in `finetune/classify.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.finetune.classification_eval import calibrate_and_evaluate, eval_results
from cosmofm.finetune.classify import load_classifier, predict
from cosmofm.finetune.figures import plot_figures
from cosmofm.finetune.loop import finetune_loop
from cosmofm.finetune.run import TaskFinetuneConfig, build_task_model, register_runner, save_task_run, split_indices
from cosmofm.finetune.spectra_augment import AugmentedSpectra
from cosmofm.heads.classification import (
    TASK_TYPE,
    ClassificationHeadConfig,
    ClassificationTask,
    CosmoFMForSpectralClassification,
    labels_from_samples,
)
from cosmofm.heads.out_of_set import DEFAULT_FALSE_FLAG_RATE
from cosmofm.heads.template_fit import class_family


@dataclass
class FinetuneConfig(TaskFinetuneConfig):
    """Classification's fine-tuning knobs: those of every task (`finetune.run.TaskFinetuneConfig`:
    the loop's, the strategy's, label_fraction and the calibration / test fractions) and these.

    Args:
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
        teacher (`str` or None, None): a fine-tuned classification model (folder or repo
            id) to distil from (`finetune_classification`'s `teacher`).
        distill_weight (`float`, 1.0), distill_temperature (`float`, 2.0): knowledge distillation
            from the teacher, when one is given.
        ood_rate (`float`, 0.015): target rate of in-set spectra flagged out of set; the
            detector's threshold is the conformal (1 - ood_rate) quantile of the calibration
            block's scores (heads.out_of_set.flag_threshold), so the test block's rate stays
            near or below it (issue 17 allows 2 %).
        redshift_net_steps (`int`, 0): > 0 trains a redshift network (heads/redshift_net.py)
            for that many steps on the training block after fine-tuning, selected and
            calibrated on the calibration block, and carries it in the model: `classify
            --redshift network` then reads Z from it. 0 = none.
        tilt_rms (`float`, 0.0): > 0 multiplies each training spectrum, every time the loop
            draws it, by a smooth random tilt exp(s(ln lambda)) (`smooth_tilt`: Legendre
            orders 1..tilt_order over the spectrum's own ln-wavelength span, rms of s drawn
            uniformly in [0, tilt_rms]), ivar divided by its square (S/N kept): a continuum
            slope as dust and flux calibration set it, randomised so the class cannot rest
            on it. Calibration and test blocks are never tilted. 0 = off (bit-identical
            to a run without it). A run with tilts cannot resume (the draws follow the epochs).
        tilt_order (`int`, 3): highest Legendre order of the tilts.
        tilt_ivar_rms (`float`, 0.0): > 0 also multiplies each training spectrum's ivar by an
            independent smooth tilt of that rms (drawn as tilt_rms's): in mocks and in
            source-noise-limited data ivar follows the spectrum's own shape, so a network can
            read the continuum (and the Teff it carries) from the noise; this takes that away.
        extra_noise (`float`, 0.0): > 0 adds to each training spectrum, every time the loop
            draws it, Gaussian noise of k times each pixel's own sigma (k uniform in
            [0, extra_noise]) and divides its ivar by 1 + k^2: the same object at a lower S/N,
            with a fresh noise draw each epoch, so the network cannot memorise one draw.
            0 = off. Cannot resume.
        redshift_stretch (`float`, 0.0): > 0 moves each training spectrum of a class in
            `redshift_stretch_families`, every time the loop draws it, along its log-sampled
            grid by whole pixels: (1 + z) times exp(u), u uniform in [-redshift_stretch,
            redshift_stretch] (never below z = 0), the redshift label moved with it and the
            pixels that enter from beyond the grid masked (`finetune.spectra_augment`). It
            widens the redshift range each class is seen at. 0 = off. Cannot resume.
        redshift_stretch_families (`tuple[str, ...]`, ("GALAXY", "QSO")): the class families
            (`heads.template_fit.class_family`: the class name's first word) that are stretched;
            stars, whose class is a temperature at z ~ 0, are not.
    """

    alpha: float | None = None
    mc_samples: int = 0
    head_hidden: int = 128
    head_dropout: float = 0.1
    redshift: bool = True
    redshift_weight: float = 0.1
    teacher: str | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    ood_rate: float = DEFAULT_FALSE_FLAG_RATE
    redshift_net_steps: int = 0
    tilt_rms: float = 0.0
    tilt_order: int = 3
    tilt_ivar_rms: float = 0.0
    extra_noise: float = 0.0
    redshift_stretch: float = 0.0
    redshift_stretch_families: tuple[str, ...] = ("GALAXY", "QSO")

    @property
    def augments(self) -> bool:
        """Whether the training spectra are augmented (tilts, extra noise or redshift stretch): such a run cannot resume."""
        return self.tilt_rms > 0 or self.tilt_ivar_rms > 0 or self.extra_noise > 0 or self.redshift_stretch > 0

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise InputError("alpha", f"must be in (0, 1) or None (chosen from the calibration block), got {self.alpha}", "e.g. 0.05 for 95% coverage")
        if not 0 < self.ood_rate < 1:
            raise InputError("ood_rate", f"must be in (0, 1), got {self.ood_rate}", "e.g. 0.015 for 1.5 % of in-set spectra flagged")
        if self.redshift_net_steps < 0:
            raise InputError("redshift_net_steps", f"must be >= 0, got {self.redshift_net_steps}", "0 = no redshift network, e.g. 3000")
        for name in ("tilt_rms", "tilt_ivar_rms"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(name, f"must be in [0, 1] (an rms in ln), got {getattr(self, name)}", "0 = off, e.g. 0.1 for tilts up to 10 % rms")
        if not 0 <= self.extra_noise <= 3:
            raise InputError("extra_noise", f"must be in [0, 3] (noise added in units of each pixel's own sigma), got {self.extra_noise}",
                             "0 = off, e.g. 1 for S/N down to 0.71 of each spectrum's own")
        if self.tilt_order < 1:
            raise InputError("tilt_order", f"must be >= 1, got {self.tilt_order}", "e.g. 3 (Legendre orders 1-3 in ln wavelength)")
        if not 0 <= self.redshift_stretch <= 0.5:
            raise InputError("redshift_stretch", f"must be in [0, 0.5] (a range in ln(1 + z)), got {self.redshift_stretch}", "0 = off, e.g. 0.1 for (1 + z) within +-10 %")
        if isinstance(self.redshift_stretch_families, str):
            raise InputError("redshift_stretch_families", f"must be a list of class families, got the string {self.redshift_stretch_families!r}",
                             "e.g. [GALAXY, QSO]")
        self.redshift_stretch_families = tuple(self.redshift_stretch_families)
        if self.augments and self.resume:
            raise InputError("resume", "cannot continue a run with augmented spectra (tilt_rms / tilt_ivar_rms / extra_noise / redshift_stretch > 0: "
                             "the draws follow the epochs drawn so far)", "start the run again, or fine-tune without augmentation")


def build_model(card, cfg: FinetuneConfig, backbone=None, backbone_config: dict | None = None) -> CosmoFMForSpectralClassification:
    """The classification model: weights from `backbone` (a release folder or a CosmoFMModel) or
    fresh from `backbone_config` (`finetune.run.build_task_model`); the head from the card's classes."""
    head = ClassificationHeadConfig.from_card(card, hidden_size=cfg.head_hidden, dropout=cfg.head_dropout, redshift=cfg.redshift,
                                              redshift_weight=cfg.redshift_weight, **cfg.head)
    return build_task_model(TASK_TYPE, head, cfg.seed, backbone, backbone_config)


@register_runner(TASK_TYPE, FinetuneConfig)
def finetune_classification(samples: Sequence[Sample], card, cfg: FinetuneConfig | None = None, backbone=None,
                            backbone_config: dict | None = None, teacher=None) -> dict:
    """Fine-tune, calibrate on the calibration block, evaluate on the test block, save.

    Args:
        samples: labelled spectrum Samples (`meta["labels"]` with the card's class and redshift).
        card: the DataCard whose label schema names the classes.
        cfg: the knobs (FinetuneConfig).
        backbone: a pretrained release folder / repo id or a CosmoFMModel; None = fresh backbone.
        backbone_config: CosmoFMConfig arguments of a fresh backbone (only without `backbone`).
        teacher: a fine-tuned classification model (or its folder; default cfg.teacher) to distil from: the
            loss gains cfg.distill_weight x T^2 x KL(teacher || student) of the
            temperature-T (cfg.distill_temperature) class probabilities (Hinton et al.
            2015). Teacher logits are computed once for the training block.

    Returns a dict: model, metrics (test block), history (loss per epoch), splits, paths.
    """
    from accelerate.utils import set_seed

    cfg = cfg or FinetuneConfig()
    teacher = cfg.teacher if teacher is None else teacher
    if len(samples) < 10:
        raise InputError("samples", f"only {len(samples)} labelled samples", "give at least 10 (train, calibration and test blocks)")
    splits = split_indices(len(samples), cfg)
    set_seed(cfg.seed)
    model = build_model(card, cfg, backbone, backbone_config)
    head = model.head_config
    samples = model.input_spectra(samples, training=True)  # de-reddened when the head says so (cfg.head)
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

    seen = AugmentedSpectra(train, cfg.seed, cfg.tilt_rms, cfg.tilt_order, cfg.tilt_ivar_rms, cfg.redshift_stretch,
                            [c for c in head.class_names if class_family(c) in cfg.redshift_stretch_families], head.class_label,
                            head.redshift_label, extra_noise=cfg.extra_noise) if cfg.augments else train
    run = finetune_loop(model, seen, ClassificationTask(head).targets, cfg.tuning, replace(cfg, desc=f"finetune ({cfg.strategy})"), loss)
    model, history = run.model, run.epoch_losses

    if cfg.redshift_net_steps and redshifts is not None:
        classes = np.asarray(head.class_names)[labels.numpy()]  # the per-family calibration of its errors
        train_redshift_network(model, card, samples, splits, redshifts.numpy(), cfg.redshift_net_steps, cfg.seed, classes)
    metrics, arrays = calibrate_and_evaluate(model, samples, splits, labels.numpy(), None if redshifts is None else redshifts.numpy(), cfg.alpha,
                                              cfg.mc_samples, cfg.ood_rate)
    result = {"model": model, "metrics": metrics, "history": history, "splits": {k: v.tolist() for k, v in splits.items()}}
    if cfg.output_dir and run.main_process:
        result.update(save_run(model, metrics, arrays, card, cfg, history))
    return result


def train_redshift_network(model: CosmoFMForSpectralClassification, card, samples: Sequence[Sample], splits: dict, redshifts, steps: int,
                           seed: int, classes=None) -> None:
    """Train a redshift network on the card's grid (`RedshiftNetConfig.for_card`) on the training
    block, keep its best state on the calibration block and calibrate it there
    (`train_redshift_net`; with the samples' `classes`, also per family), and carry it in
    `model` (`set_redshift_net`)."""
    from cosmofm.heads.redshift_net import RedshiftNetConfig, spectra_on_grid, train_redshift_net

    cfg = RedshiftNetConfig.for_card(card)
    blocks = {}
    for name in ("train", "calibration"):
        flux, ivar = spectra_on_grid([samples[int(i)] for i in splits[name]], cfg)
        blocks[name] = {"flux": flux, "ivar": ivar, "z": np.asarray(redshifts)[splits[name]]}
        if classes is not None:
            blocks[name]["cls"] = np.asarray(classes)[splits[name]]
    with torch.random.fork_rng():  # the classifier's random stream is not the network's business
        net, _ = train_redshift_net(blocks["train"], blocks["calibration"], cfg, steps, seed, log=lambda line: None)
    model.set_redshift_net(net)


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
    """The release, eval_results.json and finetune_config.json (`finetune.run.save_task_run`), then the figures."""
    paths = save_task_run(model, eval_results(metrics, card.name), cfg, history)
    return {**paths, "figures": plot_figures(arrays, metrics, model.class_names, Path(cfg.output_dir) / "figures")}
