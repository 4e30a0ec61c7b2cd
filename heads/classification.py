"""Spectral classification head: class logits and a redshift with uncertainty from the pooled embedding.

`CosmoFMForSpectralClassification` = the CosmoFM backbone + a small MLP on the pooled
embedding (`CosmoFMOutput.pooled`) with two outputs:

- class logits over the data card's `spectral_class` label schema, trained with
  cross-entropy; calibrated after training by temperature scaling (Guo et al. 2017)
  and split-conformal sets (`heads/calibration.py`), both stored in the config;
- the mean and log-variance of log(1 + z), trained with the Gaussian negative
  log-likelihood (Nix & Weigend 1994; Kendall & Gal 2017, aleatoric term), so every
  redshift comes with a 1-sigma error;
- an out-of-set score (`ood_score`): the Mahalanobis distance of features to the nearest
  class (heads/out_of_set.py, Lee et al. 2018; `ood_features`: the mean of the last
  block's tokens before the backbone's final norm, or for older models the pooled
  embedding next to the hidden layer), fitted after training on the training block;
  a spectrum scoring above `ood_threshold` belongs to none of the classes, and its
  conformal set is empty (issue 17).

Everything the head needs (class names, widths, temperature, conformal threshold,
out-of-set threshold) lives in `config.task` (a plain dict, see `ClassificationHeadConfig`)
and the detector's class means and precision are buffers in model.safetensors, so
`save_pretrained` -> `from_pretrained` (transformers' or `cosmofm.from_pretrained`)
restores the calibrated model exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification

from cosmofm.data_cards.dust import DereddenedSpectra
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads.base import CatalogueColumn, CosmoFMForTask, Task, TaskHeadConfig, TaskOutput, register_task
from cosmofm.heads.out_of_set import DEFAULT_FALSE_FLAG_RATE, OOD_FEATURES, OutOfSetDetector, block_output, flag_threshold
from cosmofm.heads.pooling import POOLINGS, PooledHead
from cosmofm.heads.redshift_net import RedshiftNet, RedshiftNetConfig, RedshiftPrediction, spectra_on_grid
from cosmofm.pretrain.data import CosmoFMBatch
from cosmofm.pretrain.modeling_cosmofm import CosmoFMOutput, masked_token_mean

TASK_TYPE = "spectral-classification"
LOGVAR_RANGE = (-14.0, 4.0)  # clamp on log sigma^2 of log(1+z): sigma in ~[1e-3, 7.4]


@dataclass
class ClassificationHeadConfig(TaskHeadConfig):
    """The head's settings; stored as `config.task` (a dict, with `type` and `schema_version`) in config.json.

    Args:
        class_names: ordered class names; index = class id (the card's label schema).
        hidden_size (`int`, 128): width of the head's hidden layer.
        dropout (`float`, 0.1): dropout before each head layer.
        redshift (`bool`, True): also predict log(1+z) mean and log-variance.
        pooling (`str`, "attention"): how tokens become one vector: "attention" (learned
            queries attend over the tokens, next to their mean; a line in one token of 72 is
            not averaged away) or "mean" (the backbone's mean-pooled embedding).
        pooling_heads (`int`, 4): attention-pooling queries.
        class_label (`str`, "spectral_class"): key of the class in `Sample.meta["labels"]`.
        redshift_label (`str`, "redshift"): key of the redshift in `Sample.meta["labels"]`.
        redshift_weight (`float`, 0.1): weight of the redshift NLL in the loss (see FinetuneConfig).
        temperature (`float`, 1.0): softmax temperature fitted on a calibration split.
        conformal_alpha (`float | None`): miscoverage level of the conformal sets.
        conformal_threshold (`float | None`): LAC score threshold (class in set when 1 - p <= it).
        redshift_error_scale (`float`, 1.0): factor on the redshift scan's errors, fitted on a
            calibration split (heads.metrics.redshift_error_scale).
        card (`str`): the data card whose label schema gave the classes.
        ood_buffers (`bool`, True): the model holds the out-of-set detector's buffers
            (`ood.means`, `ood.precision`; heads.out_of_set). False only for heads saved
            before the detector existed (their releases lack those tensors).
        ood_fitted (`bool`, False): the buffers hold a fit (class means and tied precision of
            the training block's `features`); until then `ood_score` is None.
        ood_threshold (`float | None`): Mahalanobis score above which a spectrum is flagged out
            of set (its conformal set empty); None = the detector does not flag.
        ood_false_flag_rate (`float | None`): the in-set false-flag rate the threshold was set
            for, on the calibration block (heads.out_of_set.flag_threshold).
        ood_features (`str`, "backbone"): what the detector reads (`features`): "backbone" = the
            mean over valid tokens of the last transformer block's output before the
            backbone's final norm (flags more carbon and M stars, heads.out_of_set);
            "head" = the pooled embedding next to the hidden layer (configs saved before
            the field existed).
        redshift_net (`dict | None`): the settings (`RedshiftNetConfig.to_dict`) of a redshift
            network (heads/redshift_net.py) that measures z from the spectrum itself, p(z) by
            cross-correlating learned rest-frame kernels; its weights are `redshift_net.*`.
            None = no such network (the catalogue's Z comes from the scan or the head).
        galactic_dereddening (`bool`, False): every spectrum is de-reddened by the Milky-Way
            E(B-V) its file records (`meta["ebv"]`, data_cards/dust.py) before the model sees
            it, in training and prediction (`input_spectra`); training spectra must carry one,
            predicted spectra without one are classified as read and flagged.
    """

    class_names: list[str] = field(default_factory=list)
    hidden_size: int = 128
    dropout: float = 0.1
    redshift: bool = True
    pooling: str = "attention"
    pooling_heads: int = 4
    class_label: str = "spectral_class"
    redshift_label: str = "redshift"
    redshift_weight: float = 0.1
    temperature: float = 1.0
    conformal_alpha: float | None = None
    conformal_threshold: float | None = None
    redshift_error_scale: float = 1.0
    card: str = ""
    ood_buffers: bool = True
    ood_fitted: bool = False
    ood_threshold: float | None = None
    ood_false_flag_rate: float | None = None
    ood_features: str = "backbone"
    redshift_net: dict | None = None
    galactic_dereddening: bool = False

    TYPE: ClassVar[str] = TASK_TYPE

    def __post_init__(self):
        super().__post_init__()
        self.class_names = [str(c) for c in self.class_names]
        if len(self.class_names) < 2:
            raise InputError("task.class_names", f"needs at least 2 classes, got {self.class_names}", "build the head config from a card with a class label schema (ClassificationHeadConfig.from_card)")
        if len(set(self.class_names)) != len(self.class_names):
            raise InputError("task.class_names", "has duplicates", "give each class once")
        if not self.temperature > 0:
            raise InputError("task.temperature", f"must be > 0, got {self.temperature}", "refit it with heads.calibration.fit_temperature")
        if not self.redshift_error_scale > 0:
            raise InputError("task.redshift_error_scale", f"must be > 0, got {self.redshift_error_scale}", "refit it with heads.metrics.redshift_error_scale")
        if self.pooling not in POOLINGS:
            raise InputError("task.pooling", f"is {self.pooling!r}", f"use one of {POOLINGS}")
        if (self.ood_fitted or self.ood_threshold is not None) and not self.ood_buffers:
            raise InputError("task.ood_fitted", "is set, but the head has no out-of-set buffers (ood_buffers false)",
                             "fit the detector with model.set_out_of_set, which adds the buffers")
        if self.ood_threshold is not None and not self.ood_fitted:
            raise InputError("task.ood_threshold", "is set, but the detector was not fitted (ood_fitted false)", "fit it with model.set_out_of_set")
        if self.ood_features not in OOD_FEATURES:
            raise InputError("task.ood_features", f"is {self.ood_features!r}", f"use one of {OOD_FEATURES}")
        if self.ood_false_flag_rate is not None and not 0 < self.ood_false_flag_rate < 1:
            raise InputError("task.ood_false_flag_rate", f"must be in (0, 1), got {self.ood_false_flag_rate}", "e.g. 0.015")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_card(cls, card, **kwargs) -> "ClassificationHeadConfig":
        """Classes from the card's `kind: class` label schema (named `class_label`)."""
        key = kwargs.get("class_label", "spectral_class")
        schema = next((s for s in card.labels if s.name == key and s.kind == "class"), None)
        if schema is None or not schema.classes:
            raise InputError(f"card {card.name}: labels", f"has no class label schema named {key!r}", "use a spectrum card with a spectral_class label schema (e.g. sdss-like)")
        return cls(class_names=list(schema.classes), card=card.name, **kwargs)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ClassificationHeadConfig":
        if isinstance(d, dict):
            # configs saved before attention pooling existed used the mean; those saved before
            # the out-of-set detector have no buffers for it in their weights; those saved
            # before `ood_features` fitted it on the head's features
            d = {"pooling": "mean", "ood_buffers": False, "ood_features": "head", **d}
        return super().from_dict(d)

    @property
    def ood_active(self) -> bool:
        """Whether spectra are flagged out of set (a fitted detector with a threshold)."""
        return self.ood_fitted and self.ood_threshold is not None


@dataclass
class SpectralClassificationOutput(TaskOutput):
    """What the classification model returns.

    loss: cross-entropy (+ redshift_weight x Gaussian NLL of log(1+z)); only with labels.
    logits: (N, C) raw class logits (divide by `config.task["temperature"]` for calibrated ones).
    log1pz_mean, log1pz_logvar: (N,) predicted log(1+z) and its log-variance (None without redshift).
    redshift, redshift_err: (N,) z = exp(mean) - 1 and its 1-sigma error (1+z) * sigma.
    classification_loss, redshift_loss: the two loss terms.
    mc_logits: (S, N, C) logits of S Monte-Carlo-dropout passes of the head (only with mc_samples > 0).
    ood_score: (N,) squared Mahalanobis distance of `features` to the nearest class (float64;
        None until the detector is fitted); above `config.task["ood_threshold"]` = out of set.
    features: what the detector reads (`ood_features`): (N, D) the mean of the last block's tokens
        before the final norm, or (N, P + H) the pooled embedding next to the head's hidden layer.
    backbone: the backbone's CosmoFMOutput.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    log1pz_mean: torch.Tensor | None = None
    log1pz_logvar: torch.Tensor | None = None
    redshift: torch.Tensor | None = None
    redshift_err: torch.Tensor | None = None
    classification_loss: torch.Tensor | None = None
    redshift_loss: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None
    ood_score: torch.Tensor | None = None
    features: torch.Tensor | None = None
    backbone: CosmoFMOutput | None = None


class SpectralClassificationHead(PooledHead):
    """tokens -> pooled (`pool_tokens`) -> hidden (N, H) -> (class logits (N, C), log(1+z) mean and log-variance (N, 2), hidden)."""

    def __init__(self, in_size: int, head: ClassificationHeadConfig):
        super().__init__(in_size, head.hidden_size, head.dropout, head.pooling, head.pooling_heads)
        self.classifier = nn.Linear(head.hidden_size, head.n_classes)
        self.redshift = nn.Linear(head.hidden_size, 2) if head.redshift else None

    def forward(self, pooled: torch.Tensor):
        h = self.features(pooled)  # (N, H)
        logits = self.classifier(h)  # (N, C)
        z = self.redshift(h) if self.redshift is not None else None  # (N, 2)
        return logits, z, h


@register_task(TASK_TYPE, auto_class=AutoModelForSequenceClassification)
class CosmoFMForSpectralClassification(CosmoFMForTask):
    """Backbone + spectral classification / redshift head; the head's settings are `config.task`."""

    head_config_class = ClassificationHeadConfig

    def __init__(self, config):
        super().__init__(config)  # self.head_config, self.cosmofm
        self.head = SpectralClassificationHead(config.hidden_size, self.head_config)
        self.ood = OutOfSetDetector(self.head_config.n_classes, self.ood_feature_size) if self.head_config.ood_buffers else None
        net = self.head_config.redshift_net
        self.redshift_net = RedshiftNet(RedshiftNetConfig.from_dict(net)) if net else None
        self.post_init()

    @property
    def class_names(self) -> list[str]:
        return list(self.head_config.class_names)

    def set_calibration(self, temperature: float, alpha: float | None = None, threshold: float | None = None) -> None:
        """Store the fitted temperature and conformal threshold (saved with the config)."""
        self._set_task(temperature=float(temperature), conformal_alpha=None if alpha is None else float(alpha),
                       conformal_threshold=None if threshold is None else float(threshold))

    @property
    def ood_feature_size(self) -> int:
        """Width of `features`, what the out-of-set detector reads: with ood_features "backbone"
        the backbone's width (heads/out_of_set.py says why); with "head" the pooled embedding
        and the hidden layer side by side. Lee et al. (2018) use the penultimate layer; on our mocks
        (issue 17: 32- and 64-wide classifiers, 5 out-of-set kinds) the two together gave the
        best AUROC of the three (0.898 / 0.907 against 0.891 / 0.866 hidden alone and 0.825 /
        0.895 pooled alone): which of the two sees sky fibres or white dwarfs better changed
        from model to model; the AUROC of the pair was never below either's."""
        if self.head_config.ood_features == "backbone":
            return self.config.hidden_size
        return self.head.norm.normalized_shape[0] + self.head_config.hidden_size

    def set_out_of_set(self, features, labels, calibration_features, rate: float = DEFAULT_FALSE_FLAG_RATE) -> dict:
        """Fit the out-of-set detector: class means and tied precision from the training
        block's `features` (N, P + H; the forward's) and class ids `labels` (N,), the
        threshold from the scores of the calibration block's `calibration_features` (M, P + H)
        at false-flag `rate` (heads.out_of_set.flag_threshold). Buffers and config are saved
        with the model; a head loaded from before the detector existed gets its buffers here.
        A calibration block too small to resolve `rate` (fewer than 1 / rate - 1 spectra)
        leaves the threshold None: scores, but no flags. Returns {"threshold", "shrinkage",
        "calibration_flagged"}: the last, (M,) bool, the calibration spectra it flags."""
        if self.ood is None:
            ref = next(self.head.parameters())
            self.ood = OutOfSetDetector(self.head_config.n_classes, self.ood_feature_size).to(ref.device)
            self._set_task(ood_buffers=True)
        fit = self.ood.fit(features, labels)
        scores = self.ood(torch.as_tensor(calibration_features, device=self.ood.means.device)).cpu().numpy()
        threshold = flag_threshold(scores, rate)
        threshold = threshold if np.isfinite(threshold) else None  # inf is not JSON
        self._set_task(ood_fitted=True, ood_threshold=threshold, ood_false_flag_rate=float(rate))
        flagged = self.out_of_set(scores)
        return {"threshold": threshold, **fit, "calibration_flagged": np.zeros(len(scores), bool) if flagged is None else flagged}

    def out_of_set(self, ood_score: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
        """(N,) bool: scores above the fitted threshold; None when the detector does not flag."""
        if ood_score is None or not self.head_config.ood_active:
            return None
        score = ood_score.detach().cpu().numpy() if isinstance(ood_score, torch.Tensor) else np.asarray(ood_score)
        return score > self.head_config.ood_threshold

    def set_redshift_net(self, net: RedshiftNet) -> None:
        """Carry `net` (trained and calibrated: heads.redshift_net.train_redshift_net) as the
        model's redshift network; its settings go into the config, its weights into the model's."""
        self.redshift_net = net.to(next(self.head.parameters()).device)
        self._set_task(redshift_net=net.cfg.to_dict())

    def input_spectra(self, samples: Sequence[Sample], training: bool = False) -> Sequence[Sample]:
        """`samples` as this model reads them: de-reddened (lazily) when the head says
        `galactic_dereddening`; with `training`, a spectrum without its E(B-V) is an error."""
        if not self.head_config.galactic_dereddening:
            return samples
        return DereddenedSpectra(samples, require=training)

    def network_redshifts(self, samples: Sequence[Sample], classes=None, probs: bool = True) -> RedshiftPrediction:
        """z, z_err and p(z) of spectrum Samples from the redshift network (`set_redshift_net`);
        `classes` (predicted, one per sample): z_err and p(z) calibrated for their families;
        without `probs` no p(z) (`heads.redshift_net.decode`)."""
        if self.redshift_net is None:
            raise InputError("redshift", "this model carries no redshift network", "use the scan (redshift: scan), or train one with redshift_net_steps")
        flux, ivar = spectra_on_grid(samples, self.redshift_net.cfg)
        device = self.redshift_net.kernels.device
        return self.redshift_net.predict(torch.from_numpy(flux).to(device), torch.from_numpy(ivar).to(device), classes=classes, probs=probs)

    def set_redshift_error_scale(self, scale: float) -> None:
        """Store the factor on the redshift scan's errors (saved with the config)."""
        self._set_task(redshift_error_scale=float(scale))

    def forward(self, batch: CosmoFMBatch, class_labels: torch.Tensor | None = None, redshift: torch.Tensor | None = None,
                mc_samples: int = 0) -> SpectralClassificationOutput:
        """Class logits and redshift; `mc_samples` > 0 adds that many passes of the head with
        its dropout on (Monte-Carlo dropout, Gal & Ghahramani 2016, on the head only: the
        backbone runs once, so S passes cost S small MLPs, not S models)."""
        from_backbone = self.head_config.ood_features == "backbone"
        with block_output(self.cosmofm.encoder.layers[-1]) if from_backbone else nullcontext() as last_block:
            out = self.cosmofm(batch)
        pooled = self.head.pool_tokens(out)  # no dropout before here: pooled once, also for the MC passes
        logits, z, hidden = self.head(pooled)
        if from_backbone:
            features = masked_token_mean(last_block["output"], out.attention_mask)  # (N, D), before the final norm
        else:
            features = torch.cat([pooled, hidden], dim=-1)  # (N, P + H)
        ood_score = self.ood(features) if self.ood is not None and self.head_config.ood_fitted else None
        mc_logits = None
        if mc_samples > 0:
            was_training = self.head.training
            self.head.train()
            with torch.no_grad():
                mc_logits = torch.stack([self.head(pooled)[0] for _ in range(mc_samples)])  # (S, N, C)
            self.head.train(was_training)
        mean = logvar = z_pred = z_err = None
        if z is not None:
            mean = z[:, 0]  # (N,)
            logvar = z[:, 1].clamp(*LOGVAR_RANGE)  # (N,)
            z_pred = torch.expm1(mean)
            z_err = (1 + z_pred) * torch.exp(0.5 * logvar)  # delta method: dz = (1+z) d log(1+z)
        loss = cls_loss = z_loss = None
        if class_labels is not None:
            cls_loss = F.cross_entropy(logits.float(), class_labels.to(logits.device))
            loss = cls_loss
        if redshift is not None and mean is not None:
            target = torch.log1p(redshift.to(mean.device, torch.float32).clamp(min=-0.99))
            z_loss = 0.5 * (logvar.float() + (target - mean.float()) ** 2 * torch.exp(-logvar.float())).mean()
            loss = z_loss * self.head_config.redshift_weight if loss is None else loss + self.head_config.redshift_weight * z_loss
        return SpectralClassificationOutput(
            loss=loss, logits=logits, log1pz_mean=mean, log1pz_logvar=logvar, redshift=z_pred, redshift_err=z_err,
            classification_loss=cls_loss, redshift_loss=z_loss, mc_logits=mc_logits, ood_score=ood_score, features=features, backbone=out,
        )

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Temperature-scaled softmax probabilities, (N, C) numpy."""
        from cosmofm.heads.calibration import softmax

        return softmax(logits.detach().float().cpu(), self.head_config.temperature)

    def prediction_sets(self, probs: np.ndarray, empty: np.ndarray | None = None) -> np.ndarray | None:
        """(N, C) conformal set membership, or None when no conformal threshold was fitted.
        Rows where `empty` (N,) bool is True get an empty set: spectra flagged out of set or
        too poorly covered, for which no class of the model is a claim the data support."""
        from cosmofm.heads.calibration import ConformalClassifier

        if self.head_config.conformal_threshold is None:
            return None
        sets = ConformalClassifier(self.head_config.conformal_alpha or 0.1, self.head_config.conformal_threshold).predict_sets(probs)
        if empty is not None:
            sets[np.asarray(empty, dtype=bool)] = False
        return sets


def labels_from_samples(samples: Sequence[Sample], head: ClassificationHeadConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class ids (N,) long, redshifts (N,) float32 or None) from `Sample.meta["labels"]`."""
    index = {c: i for i, c in enumerate(head.class_names)}
    ids, zs = [], []
    for s in samples:
        labels = s.meta.get("labels") or {}
        name = labels.get(head.class_label)
        if name not in index:
            raise InputError(f"{s.id}: labels.{head.class_label}", f"is {name!r}, not one of the model's classes", f"label samples with one of {head.class_names}")
        ids.append(index[name])
        zs.append(labels.get(head.redshift_label))
    z = None
    if head.redshift:
        if any(v is None for v in zs):
            raise InputError(f"labels.{head.redshift_label}", "is missing for some samples", "give every training sample a redshift, or set redshift=False")
        z = torch.tensor(zs, dtype=torch.float32)
    return torch.tensor(ids, dtype=torch.long), z


@register_task(TASK_TYPE)
class ClassificationTask(Task):
    """The task seam's view of classification (heads.base.Task): targets from the samples'
    labels, and the catalogue columns `cosmofm classify` writes (finetune.classify's
    predictor picks those of its run: Z_NETWORK with a fitted redshift, EPISTEMIC with
    Monte-Carlo dropout, OOD_SCORE and OUT_OF_SET with a fitted out-of-set detector)."""

    modality = "spectrum"
    finetune_module = "cosmofm.finetune.classification"  # its runner: distillation, conformal sets, scan redshifts, figures

    def __init__(self, head: ClassificationHeadConfig):
        self.head = head
        self.catalogue_columns = [
            CatalogueColumn("CLASS", None, "predicted class (the most probable)"),
            *(CatalogueColumn(f"P_{c}", "", f"temperature-scaled probability of {c}") for c in head.class_names),
            CatalogueColumn("CONFORMAL_SET", None, "'|'-joined classes of the split-conformal prediction set; empty when OUT_OF_SET or LOW_COVERAGE"),
            CatalogueColumn("OOD_SCORE", "", "squared Mahalanobis distance of the model's features to the nearest class (heads.out_of_set)"),
            CatalogueColumn("OUT_OF_SET", None, "OOD_SCORE above the fitted threshold: like none of the classes"),
            CatalogueColumn("LOW_COVERAGE", None, "pixels with ivar > 0 cover too little of the card's log-wavelength range for a class decision"),
            CatalogueColumn("Z", "", "redshift (scan, template fit or network)"),
            CatalogueColumn("Z_ERR", "", "1-sigma error of Z"),
            CatalogueColumn("Z_NETWORK", "", "the network's own redshift, when Z is fitted"),
            CatalogueColumn("EPISTEMIC", "", "mutual information of Monte-Carlo-dropout passes [nats]"),
        ]

    def targets(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        labels, z = labels_from_samples(samples, self.head)
        return {"class_labels": labels} if z is None else {"class_labels": labels, "redshift": z}

    def metrics(self, outputs, targets) -> dict:
        """Accuracy, macro and per-class recall, confusion matrix (heads.metrics) of the
        temperature-scaled `outputs["logits"]` against `targets["class_labels"]`; redshift
        figures when both sides have one."""
        from cosmofm.heads.calibration import softmax
        from cosmofm.heads.metrics import classification_metrics, redshift_metrics

        probs = softmax(torch.as_tensor(outputs["logits"]).float(), self.head.temperature)
        result = classification_metrics(probs, np.asarray(targets["class_labels"]), self.head.class_names)
        if outputs.get("redshift") is not None and targets.get("redshift") is not None:
            result.update(redshift_metrics(np.asarray(targets["redshift"]), np.asarray(outputs["redshift"])))
        return result


__all__ = [
    "ClassificationHeadConfig",
    "ClassificationTask",
    "CosmoFMForSpectralClassification",
    "SpectralClassificationHead",
    "SpectralClassificationOutput",
    "labels_from_samples",
]
