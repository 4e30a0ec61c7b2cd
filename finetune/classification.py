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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.finetune.metrics import classification_metrics, pull_width, redshift_error_scale, redshift_metrics
from cosmofm.finetune.loop import LoopConfig, finetune_loop
from cosmofm.finetune.strategies import Strategy
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
from cosmofm.heads.classification import ClassificationHeadConfig, ClassificationTask, CosmoFMForSpectralClassification, labels_from_samples
from cosmofm.heads.template_fit import REDSHIFT_METHODS
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.data import collate_samples, rows_equal


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

    Streaming (the shared predict path, `finetune.predict.predict_files`): files are cut
    into pieces of at most `chunk_rows` objects; one worker per CPU core (a forked process
    on Linux, a thread elsewhere) reads a piece and runs `ClassificationPredictor` on it
    in batches of `batch_size` (the redshift scan on the whole piece at once), and each
    piece's rows go to disk as soon as it is done. The default piece keeps each array of
    BOSS-like spectra (1024 x 4608 float32, 19 MB) under glibc's 32 MB mmap threshold:
    with worker threads, pieces of 2048 rows classified 40,000 spectra ~30 % slower on 2
    cores (worker processes keep freed memory anyway).
    """
    from cosmofm.finetune.predict import predict_files

    clf = load_classifier(model).eval()
    method = redshift_method(clf, redshift)
    if mc_samples < 0:
        raise InputError("mc_samples", f"must be >= 0, got {mc_samples}", "e.g. 20, or 0 for none")
    if batch_size < 1:
        raise InputError("batch_size", f"must be >= 1, got {batch_size}", "e.g. 256 spectra per batch")
    predictor = ClassificationPredictor(clf, batch_size, method, mc_samples)
    summary = predict_files(inputs, predictor, output, card=card, progress=progress, chunk_rows=chunk_rows, overwrite=overwrite)
    return {"output": summary["output"], "n_rows": summary["n_rows"], "n_classified": summary["n_predicted"],
            "n_files": summary["n_files"], "flags": summary["flags"]}


class ClassificationPredictor:
    """Classification's part of the predict path (`finetune.predict.Predictor`): class
    probabilities, conformal sets and a redshift per spectrum of a piece, spectra with too
    few unmasked pixels skipped (`classifiable`). `redshift`: see `classify` (already
    checked by `redshift_method`); `mc_samples` > 0 runs one piece at a time (Monte-Carlo
    dropout switches the head to training mode for its passes)."""

    verb, modality = "classify", "spectrum"

    def __init__(self, clf: CosmoFMForSpectralClassification, batch_size: int = 256, redshift: str = "network", mc_samples: int = 0):
        from cosmofm.heads.classification import ClassificationTask
        from cosmofm.heads.redshift_scan import RedshiftScanner

        self.clf, self.batch_size, self.redshift, self.mc_samples = clf, batch_size, redshift, mc_samples
        self.device = next(clf.parameters()).device
        self.workers = 1 if mc_samples else None
        self.scanner = RedshiftScanner() if redshift == "scan" else None  # shared: its template FFTs are cached
        optional = {"Z_NETWORK": redshift != "network", "EPISTEMIC": mc_samples > 0}
        self.columns = [c for c in ClassificationTask(clf.head_config).catalogue_columns if optional.get(c.name, True)]

    def predict(self, samples: Sequence[Sample]):
        from cosmofm.finetune.predict import PiecePrediction

        skipped: list = []
        ids, columns = _predict_columns(self.clf, samples, self.batch_size, self.redshift, self.mc_samples, self.scanner, skipped)
        return PiecePrediction(ids, columns, skipped)


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

