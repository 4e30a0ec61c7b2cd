"""Fine-tune, calibrate and evaluate the spectral classification head; classify survey files.

    result = finetune_classification(samples, card, FinetuneConfig(strategy="frozen", output_dir="runs/cls"),
                                     backbone="runs/a/model")
    classify(["spec-4055-55359-0001.fits"], "runs/cls/model", "predictions.fits")

Fine-tuning (zoobot's `finetune.py` in spirit: one class per task, few knobs, one way
to name the starting weights): the labelled samples are split by index into train /
calibration / test blocks; the model trains with AdamW in the minimal Accelerate loop
(pretrain/train.py), with one of the strategies of `finetune/strategies.py` (frozen
probe, last-n blocks, LoRA, full; layer-wise LR decay). Then the temperature (Guo et al. 2017)
and split-conformal threshold (alpha from the calibration error rate unless given) are fitted on the calibration block and
stored in the config, and the test block gives the metrics written to
`eval_results.json` (the format `finetune/model_card.load_eval_results` reads) and three
figures (confusion matrix, reliability diagram, redshift true vs predicted).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.finetune.metrics import classification_metrics, pull_width, redshift_error_scale, redshift_metrics
from cosmofm.finetune.strategies import Strategy, apply_strategy, eval_frozen_layers, finish_strategy
from cosmofm.heads.calibration import (
    ConformalClassifier,
    coverage,
    default_alpha,
    ensemble_prediction,
    error_detection_auroc,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
    softmax,
)
from cosmofm.heads.classification import ClassificationHeadConfig, CosmoFMForSpectralClassification, labels_from_samples
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.data import collate_samples, rows_equal


@dataclass
class FinetuneConfig:
    """Fine-tuning knobs.

    Args:
        strategy (`str`, "frozen"): "frozen" (head only), "last-n" (the last n_blocks
            blocks and the head), "lora" or "full" (`finetune.strategies`).
        n_blocks (`int`, 0): blocks trained by "last-n".
        layer_decay (`float`, 1.0): layer-wise LR decay, the factor per block below the last.
        epochs (`int`, 5): passes over the training block.
        batch_size (`int`, 32): samples per optimizer step.
        lr (`float`, 1e-3): AdamW peak learning rate (head; the backbone uses lr * backbone_lr_scale),
            reached after `warmup_fraction` of the steps and decayed to 0 on a cosine (as in pretraining).
        warmup_fraction (`float`, 0.05): fraction of the optimizer steps spent warming up.
        backbone_lr_scale (`float`, 0.3): backbone LR / head LR for "full" and "last-n".
        weight_decay (`float`, 0.01): AdamW weight decay on matrices.
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
        seed (`int`, 0): shuffling and init seed.
        output_dir (`str | None`): where the model, eval_results.json and figures go.
        progress (`bool`, False): show a progress bar.
    """

    strategy: str = "frozen"
    n_blocks: int = 0
    layer_decay: float = 1.0
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    backbone_lr_scale: float = 0.3
    weight_decay: float = 0.01
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
    seed: int = 0
    output_dir: str | None = None
    progress: bool = False

    def __post_init__(self):
        self.tuning  # building the Strategy checks its knobs
        if not 0 < self.label_fraction <= 1:
            raise InputError("label_fraction", f"must be in (0, 1], got {self.label_fraction}", "e.g. 0.1 for 10% of the labels")
        if not (0 < self.calibration_fraction < 1 and 0 < self.test_fraction < 1 and self.calibration_fraction + self.test_fraction < 1):
            raise InputError("calibration_fraction / test_fraction", "must be positive and sum to less than 1", "e.g. 0.2 and 0.2")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}", "e.g. 0.05")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("epochs / batch_size", "must be >= 1", "train for at least one epoch")
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


def _batches(samples: Sequence[Sample], index: np.ndarray, batch_size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(index), batch_size):
        yield [samples[int(i)] for i in index[start : start + batch_size]]


@torch.no_grad()
def predict(model: CosmoFMForSpectralClassification, samples: Sequence[Sample], batch_size: int = 64, device=None,
            mc_samples: int = 0) -> dict[str, np.ndarray]:
    """Raw logits (N, C), redshift and its error (N,) for samples, in order; with
    mc_samples > 0 also "mc_logits" (S, N, C) of Monte-Carlo-dropout passes of the head."""
    model.eval()
    device = device or next(model.parameters()).device
    names = model.config.survey_names
    logits, z, z_err, mc = [], [], [], []
    for chunk in _batches(samples, np.arange(len(samples)), batch_size):
        out = model(collate_samples(chunk, names).to(device), mc_samples=mc_samples)
        logits.append(out.logits.float().cpu())
        if out.mc_logits is not None:
            mc.append(out.mc_logits.float().cpu())
        if out.redshift is not None:
            z.append(out.redshift.float().cpu())
            z_err.append(out.redshift_err.float().cpu())
    res = {"logits": torch.cat(logits).numpy()}
    if mc:
        res["mc_logits"] = torch.cat(mc, dim=1).numpy()
    if z:
        res["redshift"], res["redshift_err"] = torch.cat(z).numpy(), torch.cat(z_err).numpy()
    return res


def _make_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # as pretrain.train.make_accelerator: a process may run several jobs one after another
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available())


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
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    cfg = cfg or FinetuneConfig()
    if len(samples) < 10:
        raise InputError("samples", f"only {len(samples)} labelled samples", "give at least 10 (train, calibration and test blocks)")
    splits = split_indices(len(samples), cfg)
    set_seed(cfg.seed)
    strategy = cfg.tuning
    model = build_model(card, cfg, backbone, backbone_config)
    param_groups = apply_strategy(model, strategy, cfg.lr, cfg.weight_decay)
    head = model.head_config
    labels, redshifts = labels_from_samples(samples, head)
    teacher_logits = None
    if teacher is not None:
        teacher = load_classifier(teacher)
        if teacher.class_names != head.class_names:
            raise InputError("teacher", f"predicts {teacher.class_names}, not this card's classes", "distil from a model fine-tuned on the same label schema")
        teacher_logits = torch.zeros(len(samples), head.n_classes)
        teacher_logits[splits["train"]] = torch.as_tensor(predict(teacher, [samples[int(i)] for i in splits["train"]], batch_size=256)["logits"])

    optimizer = torch.optim.AdamW(param_groups)
    train = splits["train"]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    n_steps = cfg.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_fraction * n_steps), n_steps)

    accelerator = _make_accelerator()
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand (see pretrain.train)
    rng = np.random.default_rng(cfg.seed)
    survey_names = accelerator.unwrap_model(model).config.survey_names
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"finetune ({cfg.strategy})", disable=not cfg.progress)
    history = []
    for _ in range(cfg.epochs):
        model.train()
        eval_frozen_layers(accelerator.unwrap_model(model), strategy)
        order = rng.permutation(train)
        total = 0.0
        for index in np.array_split(order, steps_per_epoch):
            batch = collate_samples([samples[int(i)] for i in index], survey_names).to(accelerator.device)
            idx = torch.as_tensor(index)
            out = model(batch, labels[idx].to(accelerator.device), None if redshifts is None else redshifts[idx].to(accelerator.device))
            loss = out.loss
            if teacher_logits is not None:
                t = cfg.distill_temperature
                kd = torch.nn.functional.kl_div(torch.log_softmax(out.logits.float() / t, -1), torch.softmax(teacher_logits[idx].to(accelerator.device) / t, -1),
                                                reduction="batchmean")
                loss = loss + cfg.distill_weight * t * t * kd
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(index)
            bar.update(1)
        history.append(total / len(train))
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    bar.close()
    model = finish_strategy(accelerator.unwrap_model(model), strategy)

    metrics, arrays = calibrate_and_evaluate(model, samples, splits, labels.numpy(), None if redshifts is None else redshifts.numpy(), cfg.alpha,
                                              cfg.mc_samples)
    result = {"model": model, "metrics": metrics, "history": history, "splits": {k: v.tolist() for k, v in splits.items()}}
    if cfg.output_dir:
        result.update(save_run(model, metrics, arrays, card, cfg, history))
    accelerator.end_training()
    return result


def calibrate_and_evaluate(model: CosmoFMForSpectralClassification, samples: Sequence[Sample], splits: dict, labels: np.ndarray,
                           redshifts: np.ndarray | None, alpha: float | None = None, mc_samples: int = 0) -> tuple[dict, dict]:
    """Fit temperature and conformal threshold on the calibration block (stored in the model), test on the test block.
    `alpha` None: chosen from the calibration block (`default_alpha`).

    With mc_samples > 0 the test block is also scored by the Monte-Carlo-dropout ensemble
    of the head (metrics under "mc_dropout": accuracy, ECE of the mean probabilities at
    the fitted temperature, and how well each uncertainty flags errors, as AUROC).
    """
    cal = predict(model, [samples[int(i)] for i in splits["calibration"]])
    test = predict(model, [samples[int(i)] for i in splits["test"]], mc_samples=mc_samples)
    y_cal, y_test = labels[splits["calibration"]], labels[splits["test"]]
    temperature = fit_temperature(cal["logits"], y_cal)
    p_cal_raw, p_cal = softmax(cal["logits"]), softmax(cal["logits"], temperature)
    alpha = default_alpha(p_cal, y_cal) if alpha is None else alpha
    conformal = ConformalClassifier.fit(p_cal, y_cal, alpha)
    model.set_calibration(temperature, conformal.alpha, conformal.threshold)

    p_raw, p_test = softmax(test["logits"]), softmax(test["logits"], temperature)
    sets = conformal.predict_sets(p_test)
    cls = classification_metrics(p_test, y_test, model.class_names)
    metrics = {
        "n_train": int(len(splits["train"])), "n_calibration": int(len(y_cal)), "n_test": int(len(y_test)),
        "accuracy": cls["accuracy"], "macro_recall": cls["macro_recall"], "per_class_recall": cls["per_class_recall"],
        "ece_before": expected_calibration_error(p_raw, y_test), "ece_after": expected_calibration_error(p_test, y_test),
        "ece_calibration_before": expected_calibration_error(p_cal_raw, y_cal), "ece_calibration_after": expected_calibration_error(p_cal, y_cal),
        "temperature": float(temperature), "conformal_alpha": float(alpha), "conformal_threshold": conformal.threshold,
        "conformal_coverage": coverage(sets, y_test), "conformal_mean_set_size": float(sets.sum(axis=1).mean()),
        "confusion": cls["confusion"].tolist(),
    }
    if "mc_logits" in test:
        ens = ensemble_prediction(test["mc_logits"], temperature)
        wrong = p_test.argmax(1) != y_test
        metrics["mc_dropout"] = {
            "samples": int(mc_samples), "accuracy": float(np.mean(ens.probs.argmax(1) == y_test)),
            "ece": expected_calibration_error(ens.probs, y_test),
            "error_auroc_epistemic": error_detection_auroc(ens.epistemic, wrong),
            "error_auroc_total_entropy": error_detection_auroc(ens.total_entropy, wrong),
            "error_auroc_softmax": error_detection_auroc(1 - p_test.max(1), wrong),
            "mean_epistemic_nats": float(ens.epistemic.mean()),
        }
    arrays = {"probs": p_test, "probs_raw": p_raw, "labels": y_test}
    if redshifts is not None and "redshift" in test:
        z_true = redshifts[splits["test"]]
        metrics.update(redshift_metrics(z_true, test["redshift"]))
        arrays.update(z_true=z_true, z_pred=test["redshift"], z_err=test["redshift_err"])
    if redshifts is not None and redshift_method(model) == "scan":  # the redshifts `classify` writes by default
        scan_metrics, scan_arrays = calibrate_scan_redshifts(model, samples, splits, redshifts, p_cal, p_test)
        metrics.update(scan_metrics)
        arrays.update(scan_arrays)
    return metrics, arrays


def calibrate_scan_redshifts(model: CosmoFMForSpectralClassification, samples: Sequence[Sample], splits: dict, redshifts: np.ndarray,
                             p_cal: np.ndarray, p_test: np.ndarray) -> tuple[dict, dict]:
    """Redshifts of the calibration and test blocks by the scan of their predicted classes
    (`classify`'s default): the error scale fitted on the calibration block (stored in the
    model), the test block's metrics ("redshift_scan_*", with the pull width after scaling)."""
    from cosmofm.heads.redshift_scan import RedshiftScanner

    scanner, names = RedshiftScanner(), np.array(model.class_names)
    z_cal, err_cal = scan_samples(scanner, [samples[int(i)] for i in splits["calibration"]], redshift_candidates(p_cal, names))
    scale = redshift_error_scale(redshifts[splits["calibration"]], z_cal, err_cal)
    model.set_redshift_error_scale(scale)
    z_scan, err_scan = scan_samples(scanner, [samples[int(i)] for i in splits["test"]], redshift_candidates(p_test, names))
    z_true = redshifts[splits["test"]]
    metrics = {f"redshift_scan_{k[len('redshift_'):]}": v for k, v in redshift_metrics(z_true, z_scan).items()}
    metrics.update(redshift_scan_error_scale=scale, redshift_scan_pull_width=pull_width(z_true, z_scan, err_scan * scale))
    return metrics, {"z_true": z_true, "z_scan": z_scan, "z_scan_err": err_scan * scale}


def scan_samples(scanner, samples: Sequence[Sample], candidates: list[list[str]], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(z, z_err) of `samples` by the redshift scan (`RedshiftScanner.fit_best`), batch by batch."""
    z, z_err = np.full(len(samples), np.nan), np.full(len(samples), np.nan)
    for start in range(0, len(samples), batch_size):
        batch = collate_samples(samples[start:start + batch_size])
        z[start:start + batch_size], z_err[start:start + batch_size] = scan_collated(scanner, batch, candidates[start:start + batch_size])
    return z, z_err


def scan_collated(scanner, collated, candidates: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(z, z_err) of the spectra of a collated batch (`collate_samples`), or of a list of them
    (rows numbered across the list), NaN for other modalities. Spectra of one length are
    scanned in one call, whichever batch they came from: the scan's fixed cost per call
    (template transforms picked, small tensors per class family) is paid once per piece
    rather than once per batch (~15 % of the scan for 256-spectrum batches)."""
    batches = collated if isinstance(collated, (list, tuple)) else [collated]
    by_length: dict[int, list] = {}
    offset = 0
    for batch in batches:
        for group in batch.groups:
            if group.modality == "spectrum":
                by_length.setdefault(group.values.shape[1], []).append((group.rows.numpy() + offset, group.coords["wavelength"], group.values, group.ivar))
        offset += len(batch)
    z, z_err = np.full(len(candidates), np.nan), np.full(len(candidates), np.nan)
    for parts in by_length.values():
        rows = np.concatenate([p[0] for p in parts])
        waves = [p[1] for p in parts]
        # one grid for every part (a survey file's): passed once; else one row per spectrum
        shared = all(rows_equal(w) and torch.equal(w[0], waves[0][0]) for w in waves)
        wave = waves[0][0] if shared else torch.cat([w.expand(len(p[2]), -1) for w, p in zip(waves, parts)])
        cat = (lambda i: parts[0][i]) if len(parts) == 1 else (lambda i: torch.cat([p[i] for p in parts]))
        z[rows], z_err[rows], _ = scanner.fit_best(wave, cat(2), cat(3), [candidates[r] for r in rows])
    return z, z_err


def eval_results(metrics: dict, card_name: str) -> dict:
    """The model-card evaluation JSON (`finetune/model_card.load_eval_results` format)."""
    keys = ["accuracy", "macro_recall", "ece_before", "ece_after", "conformal_coverage", "conformal_mean_set_size",
            "redshift_catastrophic_fraction", "redshift_nmad", "redshift_scan_catastrophic_fraction", "redshift_scan_nmad"]
    entries = [{"type": k, "name": k.replace("_", " "), "value": float(metrics[k])} for k in keys if k in metrics and math.isfinite(metrics[k])]
    entries += [{"type": "recall", "name": f"recall {c}", "value": float(v)} for c, v in metrics["per_class_recall"].items()]
    return {
        "results": [{
            "task": {"type": "spectral-classification", "name": "Spectral classification and redshift"},
            "dataset": {"type": "mock", "name": f"{card_name} mocks", "split": "test"},
            "metrics": entries,
        }],
        "details": {k: v for k, v in metrics.items() if k not in ("per_class_recall",)},
    }


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


def plot_figures(arrays: dict, metrics: dict, class_names: Sequence[str], folder: Path) -> list[str]:
    """Confusion matrix (counts and row fractions), reliability diagram, redshift true vs predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    confusion = np.asarray(metrics["confusion"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), layout="constrained")
    with np.errstate(invalid="ignore"):
        frac = confusion / confusion.sum(axis=1, keepdims=True)
    for ax, data, title, fmt in ((axes[0], confusion, "counts", "d"), (axes[1], np.nan_to_num(frac), "fraction of true class", ".2f")):
        im = ax.imshow(data, cmap="Blues")
        ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true", title=f"confusion ({title})")
        ax.set_xticklabels(class_names, rotation=90, fontsize=7)
        ax.set_yticklabels(class_names, fontsize=7)
        for (i, j), v in np.ndenumerate(data):
            if v:
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, shrink=0.7)
    paths.append(folder / "confusion_matrix.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    for probs, label in ((arrays["probs_raw"], f"T=1 (ECE {metrics['ece_before']:.3f})"), (arrays["probs"], f"T={metrics['temperature']:.2f} (ECE {metrics['ece_after']:.3f})")):
        curve = reliability_curve(probs, arrays["labels"], n_bins=10)
        full = curve.counts > 0
        ax.plot(curve.confidence[full], curve.accuracy[full], "o-", label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability (test)", xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    paths.append(folder / "reliability.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if "z_true" in arrays:
        fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
        hi = float(max(arrays["z_true"].max(), np.nanmax(arrays.get("z_pred", arrays["z_true"])))) * 1.05 + 0.01
        if "z_pred" in arrays:
            ax.errorbar(arrays["z_true"], arrays["z_pred"], yerr=arrays["z_err"], fmt=".", ms=3, alpha=0.5, elinewidth=0.5, color="0.6",
                        label=f"network (Z_NETWORK): NMAD {metrics['redshift_nmad']:.2g}, catastrophic {metrics['redshift_catastrophic_fraction']:.3f}")
        if "z_scan" in arrays:  # what `classify` writes as Z by default
            ax.errorbar(arrays["z_true"], arrays["z_scan"], yerr=arrays["z_scan_err"], fmt=".", ms=3, alpha=0.7, elinewidth=0.5, color="C0",
                        label=f"scan of the predicted class (Z): NMAD {metrics['redshift_scan_nmad']:.2g}, catastrophic {metrics['redshift_scan_catastrophic_fraction']:.3f}")
        ax.plot([0, hi], [0, hi], "k:", lw=1)
        ax.legend(loc="upper left", fontsize=7)
        ax.set(xlabel="true z", ylabel="predicted z", title="redshifts of the test block")
        paths.append(folder / "redshift.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return [str(p) for p in paths]


# ---------------------------------------------------------------------------- inference on survey files


def load_classifier(model) -> CosmoFMForSpectralClassification:
    """A classification model from a release folder / repo id (verified) or as given."""
    if isinstance(model, CosmoFMForSpectralClassification):
        return model
    from cosmofm.finetune.release import from_pretrained
    from cosmofm.heads.classification import TASK_TYPE

    return from_pretrained(model, expect_task=TASK_TYPE)  # a backbone or another task's model: refused before loading


def input_files(inputs) -> list[Path]:
    """Files (and datasets folders) named by `inputs`: paths, or folders of them (not recursive)."""
    from cosmofm.data_cards.readers import detect

    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    out = []
    for p in paths:
        if not p.exists():
            raise InputError(str(p), "does not exist", "check the path")
        if p.is_dir() and (fmt := detect(p)) is not None and fmt.name == "datasets":
            out.append(p)
        elif p.is_dir():
            out += sorted(q for q in p.iterdir() if not q.name.startswith(".") and (q.is_file() or detect(q) is not None))
        else:
            out.append(p)
    if not out:
        raise InputError(", ".join(map(str, paths)), "holds no files", "give survey files, a folder of them or a datasets folder")
    return out


REDSHIFT_METHODS = ("scan", "template", "network")


def redshift_method(clf: CosmoFMForSpectralClassification, requested: str | None = None) -> str:
    """Where a catalogue's Z comes from: `requested`, or by default "scan" when the template
    set knows every class of the model (heads.redshift_scan), else "network"."""
    from cosmofm.heads.template_fit import CLASSES as TEMPLATE_CLASSES

    missing = sorted(set(clf.class_names) - set(TEMPLATE_CLASSES))
    if requested is None:
        return "network" if missing else "scan"
    if requested not in REDSHIFT_METHODS:
        raise InputError("redshift", f"is {requested!r}", f"use one of {', '.join(REDSHIFT_METHODS)}")
    if requested != "network" and missing:
        raise InputError("redshift", f"{requested!r} needs templates for every class; {missing} have none", "use redshift 'network' for this model's own classes")
    return requested


def classify(inputs, model, output, batch_size: int = 256, card=None, progress: bool = True, redshift: str | None = None,
             mc_samples: int = 0, chunk_rows: int = 1024, overwrite: bool = False) -> dict:
    """Classify every spectrum in `inputs`; write one catalogue row per object to `output` (.fits / .parquet).

    Each row: ID, CARD, FILE, the file's identifiers (PLATE/MJD/FIBERID, TARGETID, OBJECT,
    RA/DEC), CLASS, P_<class> per class (temperature-scaled), CONFORMAL_SET ('|'-joined
    class names), Z and Z_ERR (dimensionless), FLAGS ('|'-joined reader flag codes).
    `redshift` (`redshift_method`): where Z and Z_ERR come from, for the predicted class:
    "scan" (default; heads.redshift_scan, eigenspectra of that class scanned over its
    redshift range for whole batches, thousands of spectra/s), "template" (the full
    template fit of that class, heads.template_fit.refine_redshifts, ~50 spectra/s) or
    "network" (the head's own redshift; poor for galaxies and QSOs). With a fit, Z_NETWORK
    keeps the network's. `mc_samples` > 0: EPISTEMIC, the mutual information [nats] of
    that many Monte-Carlo-dropout passes of the head.
    Objects the reader flagged and skipped, objects with fewer unmasked pixels than one
    token of the model (`min_unmasked_pixels`: all_masked, too_few_pixels), and files it
    could not use or that hold no objects (empty_file), get a row with their flags and
    null predictions (no class, NaN probabilities and redshift, no conformal set); one bad
    object never costs the others of its file. InputError when nothing usable remains.

    The catalogue is written atomically (temporary file + rename) and never over one of
    the inputs, nor into a folder of inputs that is read; an existing `output` is replaced
    only with `overwrite`. Returns {"output", "n_rows", "n_classified", "n_files",
    "flags": {code: rows}}.

    Streaming: files are cut into pieces of at most `chunk_rows` objects (cosmofm FITS and
    DESI coadds row range by row range, `readers.piece_readers`); one worker per CPU core
    (a forked process on Linux, a thread elsewhere: `_in_parallel`) reads a piece and runs
    the model on it in batches of `batch_size` (the redshift scan on the whole piece at
    once), single-threaded, while the others do the same. Each piece's catalogue rows go
    to disk as soon as it is done (`CatalogueWriter`), so memory is bounded by the pieces
    in flight whatever the number of spectra. The
    default piece keeps each array of BOSS-like spectra (1024 x 4608 float32, 19 MB) under
    glibc's 32 MB mmap threshold: with worker threads, pieces of 2048 rows classified
    40,000 spectra ~30 % slower on 2 cores (worker processes keep freed memory anyway,
    `_keep_freed_memory`).
    """
    from tqdm.auto import tqdm

    from cosmofm.data_cards.io.catalogue import ID_COLUMNS, CatalogueWriter, catalogue_format
    from cosmofm.data_cards.readers import piece_readers
    from cosmofm.heads.redshift_scan import RedshiftScanner

    clf = load_classifier(model).eval()
    method = redshift_method(clf, redshift)
    files = input_files(inputs)
    catalogue_format(output)  # a bad suffix fails now, not after the run
    check_output(output, inputs, files, overwrite)
    if mc_samples < 0:
        raise InputError("mc_samples", f"must be >= 0, got {mc_samples}", "e.g. 20, or 0 for none")
    for name, value in (("batch_size", batch_size), ("chunk_rows", chunk_rows)):
        if value < 1:
            raise InputError(name, f"must be >= 1, got {value}", "e.g. 256 spectra per batch, 1024 rows per piece")
    # MC dropout switches the head to training mode for its passes: one piece at a time then.
    workers = 1 if mc_samples else _n_workers()
    scanner = RedshiftScanner() if method == "scan" else None  # shared: its template FFTs are cached
    jobs = ((path, read) for path in files for read in piece_readers(path, card, chunk_rows=chunk_rows, min_pieces=workers))

    def classify_piece(job) -> tuple:
        """(catalogue rows of one piece, spectra classified, problem or None); reads the piece itself."""
        path, read = job
        try:
            result = read()
        except InputError as e:
            return _row_table([path.stem], path, {"FLAGS": np.array([f"unreadable: {e.problem}"])}), 0, str(e)
        if result.n_objects == 0 and len(result.samples) == 0:
            return _row_table([path.stem], path, {"FLAGS": np.array(["empty_file: the file holds no objects"])}), 0, f"{path}: holds no objects"
        if result.modality != "spectrum":
            return _row_table([path.stem], path, {"FLAGS": np.array([f"not_a_spectrum: {result.modality}"])}), 0, f"{path}: is a {result.modality} file"
        skipped: list = []
        sample_ids, predictions = _predict_columns(clf, result.samples, batch_size, method, mc_samples, scanner, skipped)
        return _piece_table(path, result, sample_ids, predictions, skipped), len(sample_ids), None

    order = ["ID", "CARD", "FILE", *ID_COLUMNS.values(), "CLASS", *(f"P_{c}" for c in clf.class_names), "CONFORMAL_SET", "Z", "Z_ERR", "Z_NETWORK", "EPISTEMIC", "FLAGS"]
    n_rows, n_used, problems, flagged = 0, 0, [], Counter()
    bar = tqdm(desc="classify", unit="spectrum", disable=not progress)
    with CatalogueWriter(output, units={"Z": "", "Z_ERR": "", "Z_NETWORK": ""}, order=order, overwrite=overwrite) as catalogue:  # pieces go to disk as they finish
        for table, n, problem in _in_parallel(classify_piece, jobs, workers, processes=next(clf.parameters()).device.type == "cpu"):
            catalogue.add(table)
            n_rows += len(table)
            n_used += n
            for row, k in zip(*np.unique(np.asarray(table["FLAGS"]), return_counts=True)):  # one entry per distinct FLAGS, not per row
                flagged.update({code.split(":")[0]: int(k) for code in str(row).split("|") if code})
            bar.update(n)
            if problem:
                problems.append(problem)
        bar.close()
        if n_used == 0:
            why = problems[0] if problems else ", ".join(f"{n} {code}" for code, n in sorted(flagged.items()))
            raise InputError(", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else ""), "nothing usable to classify" + (f" ({why})" if why else ""),
                             "give spectra files readable by `cosmofm inspect`")
    return {"output": str(output), "n_rows": n_rows, "n_classified": n_used, "n_files": len(files), "flags": dict(sorted(flagged.items()))}


def check_output(output, inputs, files: list[Path], overwrite: bool = False) -> None:
    """InputError unless `output` may take a catalogue: not one of the input `files` (nor a
    link to one), not inside a datasets folder that is read, not in a folder given as
    input (its files are read: the catalogue would be read next time, or replace one),
    not a folder, and not an existing file unless `overwrite`."""
    out = Path(output)
    target = out.resolve()
    folders = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs) if Path(p).is_dir() and Path(p) not in files]  # datasets folders are files
    for f in files:
        if target == f.resolve() or (out.exists() and f.exists() and os.path.samefile(out, f)):
            raise InputError(str(out), f"is one of the inputs ({f})", "write the catalogue to a new file")
        if f.is_dir() and target.is_relative_to(f.resolve()):
            raise InputError(str(out), f"lies inside the datasets folder {f}, which is read", "write the catalogue outside the inputs")
    for folder in folders:
        if target.parent == folder.resolve():
            raise InputError(str(out), f"lies in the input folder {folder}, whose files classify reads", "write the catalogue outside the input folders")
    if out.is_dir():
        raise InputError(str(out), "is a folder", "give a catalogue file name ending in .fits or .parquet")
    if out.exists() and not overwrite:
        raise InputError(str(out), "already exists", "choose another name, or pass --overwrite (overwrite=True) to replace it")


def _predict_columns(clf: CosmoFMForSpectralClassification, samples: Sequence[Sample], batch_size: int, redshift: str = "network",
                     mc_samples: int = 0, scanner=None, skipped: list | None = None) -> tuple[list[str], dict[str, np.ndarray | None]]:
    """The ids of the classified `samples` and their catalogue columns (one entry each, in
    order; None for a column the model cannot fill). `redshift`: see `classify` ("scan" uses
    `scanner`, a heads.redshift_scan.RedshiftScanner). `samples` may be lazy (a datasets
    folder): each is read once. Objects not worth classifying (`classifiable`) are left
    out, with a readers Flag each in `skipped` (None: not kept)."""
    device = next(clf.parameters()).device
    names = np.array(clf.class_names)

    def run(batch: list[Sample]) -> dict:
        collated = collate_samples(batch, clf.config.survey_names)
        with torch.no_grad():  # grad mode is per thread
            out = clf(collated.to(device), mc_samples=mc_samples)
        probs = clf.probabilities(out.logits)
        part = {"ids": [s.id for s in batch], "probs": probs,
                "z": out.redshift.float().cpu().numpy() if out.redshift is not None else None,
                "z_err": out.redshift_err.float().cpu().numpy() if out.redshift_err is not None else None,
                "epistemic": ensemble_prediction(out.mc_logits, clf.head_config.temperature).epistemic if out.mc_logits is not None else None}
        predicted = names[probs.argmax(1)]
        if redshift == "scan":  # on the collated arrays, all batches of the piece at once (below)
            part["collated"], part["candidates"] = collated, redshift_candidates(probs, names)
        elif redshift == "template":
            from cosmofm.heads.template_fit import refine_redshifts

            refined = refine_redshifts(batch, list(predicted))
            part["z_fit"], part["z_err_fit"] = refined["z"], refined["z_err"]
        return part

    results = list(map(run, classifiable(samples, batch_size, min_unmasked_pixels(clf), [] if skipped is None else skipped)))
    if not results:
        return [], {}
    ids = [i for r in results for i in r["ids"]]
    scanned = None
    if redshift == "scan":
        z, z_err = scan_collated(scanner, [r.pop("collated") for r in results], [c for r in results for c in r.pop("candidates")])
        scanned = z, z_err * clf.head_config.redshift_error_scale

    def joined(key: str) -> np.ndarray | None:
        parts = [r[key] for r in results if r.get(key) is not None]
        return np.concatenate(parts) if parts else None

    def float64(key: str) -> np.ndarray | None:
        values = joined(key)
        return None if values is None else values.astype(np.float64)

    probs = joined("probs")
    sets = clf.prediction_sets(probs)
    columns: dict[str, np.ndarray | None] = {"CLASS": names[probs.argmax(1)], **{f"P_{c}": probs[:, j] for j, c in enumerate(names)}}
    columns["CONFORMAL_SET"] = np.array(["|".join(names[row]) for row in sets]) if sets is not None else None
    columns["Z"], columns["Z_ERR"] = float64("z"), float64("z_err")
    if redshift != "network":
        columns["Z_NETWORK"] = columns["Z"]
        columns["Z"], columns["Z_ERR"] = scanned or (float64("z_fit"), float64("z_err_fit"))
    if mc_samples:
        columns["EPISTEMIC"] = float64("epistemic")
    return ids, columns


def min_unmasked_pixels(clf: CosmoFMForSpectralClassification) -> int:
    """Unmasked pixels a spectrum needs to be classified: one token's worth (the tokenizer's
    spectrum_patch_size, 64 pixels for the shipped recipes). With fewer the network still
    answers (a fully masked spectrum got P = 0.98 for one class and a one-class conformal
    set), but from no data: an answer a catalogue must not present as a measurement."""
    return int(clf.config.spectrum_patch_size)


def classifiable(samples: Sequence[Sample], batch_size: int, min_pixels: int, skipped: list) -> Iterator[list[Sample]]:
    """The samples in batches of `batch_size`, in order, less those that cannot be classified,
    each of which adds a SKIPPED Flag to `skipped` (index = position in
    `samples`, id None for a row of a lazy sequence that could not be read): a row that
    raises InputError (unreadable), no unmasked pixel (all_masked), or fewer than
    `min_pixels` (too_few_pixels). A spectrum's unmasked pixels are counted with numpy over
    its first 4 x `min_pixels` pixels, and over all of them only when those fall short."""
    from cosmofm.data_cards.readers.common import SKIPPED, Flag

    batch: list[Sample] = []
    for i in range(len(samples)):
        try:
            sample = samples[i]
        except InputError as e:
            skipped.append(Flag(i, None, "unreadable", f"not classified: {e}", SKIPPED))
            continue
        n = int(np.count_nonzero(sample.ivar[: 4 * min_pixels] > 0))  # most spectra show enough in their first tokens
        if n < min_pixels:
            n = int(np.count_nonzero(sample.ivar > 0))
        if n < min_pixels:
            skipped.append(Flag(i, sample.id, "all_masked" if n == 0 else "too_few_pixels",
                                f"{sample.id}: {n} unmasked pixels, fewer than one token of the model ({min_pixels}): not classified", SKIPPED))
            continue
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


RUNNER_UP_PROBABILITY = 0.05  # a second class of the predicted family this probable is scanned too


def redshift_candidates(probs: np.ndarray, names: np.ndarray) -> list[list[str]]:
    """Classes whose templates the redshift scan tries per spectrum: the predicted one, and
    the runner-up when it is of the same family (so the same redshift range and template
    count, and their chi-squares compare fairly) and at least RUNNER_UP_PROBABILITY likely.
    On the benchmark's held-out mocks this rescues QSOs the network calls broad-line (or
    the reverse) at ~7 % more scans; CLASS stays the network's."""
    from cosmofm.heads.template_fit import class_family

    top2 = np.argsort(-probs, axis=1)[:, :2]
    family = np.array([class_family(c) for c in names])
    rows = np.arange(len(probs))
    both = (family[top2[:, 0]] == family[top2[:, 1]]) & (probs[rows, top2[:, 1]] >= RUNNER_UP_PROBABILITY)
    first, second = names[top2[:, 0]].tolist(), names[top2[:, 1]].tolist()
    return [[a, b] if two else [a] for a, b, two in zip(first, second, both.tolist())]


def _n_workers() -> int:
    """Parallel classification workers: one per intra-op thread torch would use (the cores),
    at most 8 (each holds a piece in memory)."""
    return max(1, min(8, torch.get_num_threads()))


def _in_parallel(fn, items: Iterator, workers: int, processes: bool = False) -> Iterator:
    """fn(item) for each item, in order, `workers` at a time, each single-threaded.

    Whole pieces side by side beat one piece over all cores: small models scale badly over
    intra-op threads (2 threads ~1.2x one on 2 cores), and a worker reading its next piece
    overlaps the others' inference. `processes` (where the platform forks, `_can_fork`):
    forked worker processes rather than threads. Threads share the GIL, which the Python
    parts of reading and of building a piece's rows hold, and one address space, whose
    page faults and unmaps they serialise: 2 threads classified 40,000 spectra ~1.3x
    slower than 2 processes on 2 cores. At most two items per worker are submitted at
    once, so a lazy `items` stays lazy.
    """
    if workers < 2:
        yield from map(fn, items)
        return
    if processes and _can_fork():
        import multiprocessing

        # fork: the children inherit fn (a closure over the loaded model) instead of unpickling it
        with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(fn,)) as pool:
            submit, result = lambda item: pool.apply_async(_run_in_worker, (item,)), lambda job: job.get()
            yield from _bounded(items, submit, result, 2 * workers)
        return
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: restored below
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cosmofm-classify") as pool:
            yield from _bounded(items, lambda item: pool.submit(fn, item), lambda job: job.result(), 2 * workers)
    finally:
        torch.set_num_threads(threads)


def _bounded(items: Iterator, submit, result, limit: int) -> Iterator:
    """result(submit(item)) for each item, in order, with at most `limit` submitted and not yet yielded."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(submit(item))
        if len(pending) >= limit:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def _can_fork() -> bool:
    """Whether worker processes can be forked safely: Linux (macOS forks, but its system
    frameworks are not fork-safe; Windows cannot)."""
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


_WORKER_FN = None  # in a forked worker process: the function it runs (`_in_parallel`)


def _start_worker(fn) -> None:
    global _WORKER_FN
    _WORKER_FN = fn
    torch.set_num_threads(1)  # one core per worker
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """glibc: serve the worker's large arrays from its heap and keep what it frees there,
    rather than mapping fresh pages for each and unmapping them after: a worker allocates
    the same few tens of MB per batch again and again, and faulting them in anew cost ~2 s
    of system time per 40,000 spectra (10x fewer page faults with this). The worker exits
    at the end of the run, which returns the memory. No-op without glibc's mallopt."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 256 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)):
        mallopt(option, value)


def _run_in_worker(item):
    return _WORKER_FN(item)


def _piece_table(path: Path, result, sample_ids: list[str], predictions: dict[str, np.ndarray | None], skipped=()):
    """One catalogue row per object the reader listed (used or flagged), predictions where it
    was classified; FLAGS from the reader's flags and the classifier's `skipped` ones."""
    from astropy.table import MaskedColumn

    from cosmofm.data_cards.io.catalogue import ID_COLUMNS

    ident = result.identifiers
    ids = [str(x) for x in ident["id"]] if len(ident) else sample_ids
    position = {sid: k for k, sid in enumerate(sample_ids)}
    take = np.array([position.get(sid, -1) for sid in ids], dtype=np.int64)
    used = take >= 0
    columns: dict[str, object] = {"CARD": np.full(len(ids), result.card.name if result.card is not None else "")}
    for key, name in ID_COLUMNS.items():
        if len(ident) and key in ident.colnames:
            values = np.asarray(ident[key])
            missing = np.isnan(values) if values.dtype.kind == "f" else (values == "") if values.dtype.kind == "U" else np.zeros(len(values), bool)
            if not missing.all():
                columns[name] = MaskedColumn(values, mask=missing, unit=ident[key].unit) if missing.any() else values
    for name, values in predictions.items():
        if values is None:  # the model cannot fill it: null, of the column's own kind
            columns[name] = MaskedColumn(np.full(len(ids), ""), mask=np.ones(len(ids), bool)) if name == "CONFORMAL_SET" else np.full(len(ids), np.nan)
        elif values.dtype.kind == "f":
            columns[name] = np.where(used, values[np.where(used, take, 0)], np.nan)
        else:
            columns[name] = MaskedColumn(values[np.where(used, take, 0)], mask=~used) if not used.all() else values[take]
    flags: dict[str, list[str]] = {}
    for f in result.flags:
        flags.setdefault(f.id, []).append(f.code)
    for f in skipped:  # a lazy sequence's rows are the identifiers' rows
        flags.setdefault(f.id if f.id is not None else ids[f.index], []).append(f.code)
    columns["FLAGS"] = np.array(["|".join(flags.get(sid, [])) for sid in ids], dtype=str)
    return _row_table(ids, path, columns)


def _row_table(ids: list[str], path: Path, columns: dict):
    """A catalogue piece: ID and FILE, then `columns` (units are the writer's, in `classify`)."""
    from astropy.table import Table

    t = Table()
    t["ID"] = np.array(ids)
    t["FILE"] = np.full(len(ids), path.name)
    for name, values in columns.items():
        t[name] = values
    return t
