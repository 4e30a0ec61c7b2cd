"""Calibrate a fine-tuned classifier and score it: what `finetune_classification` runs after training.

`calibrate_and_evaluate` fits the temperature (Guo et al. 2017) and the split-conformal
threshold on the calibration block and the out-of-set detector (heads/out_of_set.py:
class means and tied precision of the training block's features, the flag threshold at
the target false-flag rate on the calibration block) and stores them in the model, then
scores the test block (accuracy, recall per class, ECE before / after, conformal coverage
and set size, the out-of-set false-flag rate, network redshifts, optionally the
Monte-Carlo-dropout ensemble); when `classify` would
write scan redshifts, `calibrate_scan_redshifts` fits their error scale on the
calibration block and scores them too. `eval_results` turns the metrics into the
model-card JSON (`finetune/model_card.load_eval_results` format).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cosmofm.data_cards.sample import Sample
from cosmofm.finetune.classify import predict, untemplated_classes
from cosmofm.heads.metrics import classification_metrics, pull_width, redshift_error_scale, redshift_metrics
from cosmofm.heads.calibration import (
    ConformalClassifier,
    coverage,
    default_alpha,
    ensemble_prediction,
    error_detection_auroc,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from cosmofm.heads.classification import CosmoFMForSpectralClassification
from cosmofm.heads.out_of_set import DEFAULT_FALSE_FLAG_RATE
from cosmofm.heads.redshift_scan import RedshiftScanner, redshift_candidates, scan_samples


def calibrate_and_evaluate(model: CosmoFMForSpectralClassification, samples: Sequence[Sample], splits: dict, labels: np.ndarray,
                           redshifts: np.ndarray | None, alpha: float | None = None, mc_samples: int = 0,
                           ood_rate: float = DEFAULT_FALSE_FLAG_RATE) -> tuple[dict, dict]:
    """Fit temperature and conformal threshold on the calibration block and the out-of-set
    detector on the training block with its threshold at false-flag rate `ood_rate` on the
    calibration block (all stored in the model), test on the test block. `alpha` None:
    chosen from the calibration block (`default_alpha`). The test block's conformal
    coverage and set size are those of the sets `classify` writes: empty for spectra flagged
    out of set ("ood_false_flag_rate" of the in-set test block, against "ood_target_rate"),
    which the conformal threshold counts as misses on the calibration block, so the sets
    cover 1 - alpha with them emptied.

    With mc_samples > 0 the test block is also scored by the Monte-Carlo-dropout ensemble
    of the head (metrics under "mc_dropout": accuracy, ECE of the mean probabilities at
    the fitted temperature, and how well each uncertainty flags errors, as AUROC).
    """
    train = predict(model, [samples[int(i)] for i in splits["train"]], features=True)
    cal = predict(model, [samples[int(i)] for i in splits["calibration"]], features=True)
    ood = model.set_out_of_set(train["features"], labels[splits["train"]], cal["features"], ood_rate)
    test = predict(model, [samples[int(i)] for i in splits["test"]], mc_samples=mc_samples)  # after the fit: with ood_score
    flagged = model.out_of_set(test["ood_score"])  # None: the calibration block was too small to set a threshold
    y_cal, y_test = labels[splits["calibration"]], labels[splits["test"]]
    temperature = fit_temperature(cal["logits"], y_cal)
    p_cal_raw, p_cal = softmax(cal["logits"]), softmax(cal["logits"], temperature)
    alpha = default_alpha(p_cal, y_cal) if alpha is None else alpha
    # the sets `classify` writes are empty for spectra flagged out of set: count those as misses
    conformal = ConformalClassifier.fit(p_cal, y_cal, alpha, uncovered=ood["calibration_flagged"])
    model.set_calibration(temperature, conformal.alpha, conformal.threshold)

    p_raw, p_test = softmax(test["logits"]), softmax(test["logits"], temperature)
    sets = model.prediction_sets(p_test, empty=flagged)
    cls = classification_metrics(p_test, y_test, model.class_names)
    metrics = {
        "n_train": int(len(splits["train"])), "n_calibration": int(len(y_cal)), "n_test": int(len(y_test)),
        "accuracy": cls["accuracy"], "macro_recall": cls["macro_recall"], "per_class_recall": cls["per_class_recall"],
        "ece_before": expected_calibration_error(p_raw, y_test), "ece_after": expected_calibration_error(p_test, y_test),
        "ece_calibration_before": expected_calibration_error(p_cal_raw, y_cal), "ece_calibration_after": expected_calibration_error(p_cal, y_cal),
        "temperature": float(temperature), "conformal_alpha": float(alpha), "conformal_threshold": conformal.threshold,
        "conformal_coverage": coverage(sets, y_test), "conformal_mean_set_size": float(sets.sum(axis=1).mean()),
        "confusion": cls["confusion"].tolist(),
        "ood_target_rate": float(ood_rate), "ood_threshold": ood["threshold"], "ood_covariance_shrinkage": ood["shrinkage"],
        "ood_false_flag_rate": float(flagged.mean()) if flagged is not None else 0.0,
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
    arrays = {"probs": p_test, "probs_raw": p_raw, "labels": y_test, "ood_score": test["ood_score"]}
    if redshifts is not None and "redshift" in test:
        z_true = redshifts[splits["test"]]
        metrics.update(redshift_metrics(z_true, test["redshift"]))
        arrays.update(z_true=z_true, z_pred=test["redshift"], z_err=test["redshift_err"])
    if redshifts is not None and model.redshift_net is not None:  # `classify --redshift network`
        z_true = redshifts[splits["test"]]
        net = model.network_redshifts([samples[int(i)] for i in splits["test"]])
        metrics.update({f"redshift_net_{k.removeprefix('redshift_')}": v for k, v in redshift_metrics(z_true, net.z).items()})
        arrays.update(z_true=z_true, z_net=net.z, z_net_err=net.z_err)
    if redshifts is not None and not untemplated_classes(model):  # the scan's redshifts (`classify --redshift scan`) get calibrated errors
        scan_metrics, scan_arrays = calibrate_scan_redshifts(model, samples, splits, redshifts, p_cal, p_test)
        metrics.update(scan_metrics)
        arrays.update(scan_arrays)
    return metrics, arrays


def calibrate_scan_redshifts(model: CosmoFMForSpectralClassification, samples: Sequence[Sample], splits: dict, redshifts: np.ndarray,
                             p_cal: np.ndarray, p_test: np.ndarray) -> tuple[dict, dict]:
    """Redshifts of the calibration and test blocks by the scan of their predicted classes
    (`classify`'s default): the error scale fitted on the calibration block (stored in the
    model), the test block's metrics ("redshift_scan_*", with the pull width after scaling)."""
    scanner, names = RedshiftScanner(), np.array(model.class_names)
    z_cal, err_cal = scan_samples(scanner, [samples[int(i)] for i in splits["calibration"]], redshift_candidates(p_cal, names))
    scale = redshift_error_scale(redshifts[splits["calibration"]], z_cal, err_cal)
    model.set_redshift_error_scale(scale)
    z_scan, err_scan = scan_samples(scanner, [samples[int(i)] for i in splits["test"]], redshift_candidates(p_test, names))
    z_true = redshifts[splits["test"]]
    metrics = {f"redshift_scan_{k[len('redshift_'):]}": v for k, v in redshift_metrics(z_true, z_scan).items()}
    metrics.update(redshift_scan_error_scale=scale, redshift_scan_pull_width=pull_width(z_true, z_scan, err_scan * scale))
    return metrics, {"z_true": z_true, "z_scan": z_scan, "z_scan_err": err_scan * scale}


def eval_results(metrics: dict, card_name: str) -> dict:
    """The model-card evaluation JSON (`finetune/model_card.load_eval_results` format)."""
    keys = ["accuracy", "macro_recall", "ece_before", "ece_after", "conformal_coverage", "conformal_mean_set_size", "ood_false_flag_rate",
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
