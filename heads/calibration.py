"""Calibrated uncertainty for classifiers: temperature scaling, ECE, conformal sets.

- Temperature scaling (Guo et al. 2017, ICML): one scalar T fitted on a calibration
  split by minimising the negative log-likelihood of softmax(logits / T).
- Expected calibration error: top-label ECE with equal-width confidence bins.
- Monte-Carlo (dropout) ensembles: mean probabilities and the split of predictive
  entropy into expected (aleatoric) entropy and mutual information (epistemic; Houlsby
  et al. 2011, "BALD"; Gal, Islam & Ghahramani 2017).
- Split-conformal prediction sets (Vovk et al. 2005; the "LAC" score 1 - p_true of
  Sadinle, Lei & Wasserman 2019): with the finite-sample quantile, sets contain the
  true class with probability >= 1 - alpha for exchangeable data.
Functions take numpy arrays or tensors and check shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check(probs: np.ndarray, labels: np.ndarray):
    if probs.ndim != 2:
        raise ValueError(f"expected (N, C) probabilities or logits, got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"expected {probs.shape[0]} integer labels, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]})")


def fit_temperature(logits, labels, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T)."""
    logits, labels = torch.as_tensor(_as_numpy(logits), dtype=torch.float64), torch.as_tensor(_as_numpy(labels), dtype=torch.long)
    _check(logits.numpy(), labels.numpy())
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = _as_numpy(logits) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class EnsemblePrediction:
    probs: np.ndarray  # (N, C) mean of the members' probabilities
    total_entropy: np.ndarray  # (N,) entropy of the mean [nats]
    aleatoric: np.ndarray  # (N,) mean of the members' entropies [nats]
    epistemic: np.ndarray  # (N,) mutual information = total - aleatoric [nats], >= 0


def ensemble_prediction(member_logits, temperature: float = 1.0) -> EnsemblePrediction:
    """Combine (S, N, C) logits of S ensemble members (or MC-dropout passes)."""
    logits = _as_numpy(member_logits)
    if logits.ndim != 3:
        raise ValueError(f"expected (S, N, C) member logits, got shape {logits.shape}")
    members = np.stack([softmax(m, temperature) for m in logits])  # (S, N, C)
    mean = members.mean(axis=0)
    entropy = lambda p: -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=-1)  # noqa: E731
    total, aleatoric = entropy(mean), entropy(members).mean(axis=0)
    return EnsemblePrediction(mean, total, aleatoric, np.clip(total - aleatoric, 0, None))


def error_detection_auroc(uncertainty, is_error) -> float:
    """AUROC of `uncertainty` (N,) as a detector of misclassified samples (`is_error` (N,) bool):
    the probability that an error has a higher uncertainty than a correct prediction (ties
    count half; Mann-Whitney U). nan when either group is empty."""
    u, e = _as_numpy(uncertainty).astype(float), _as_numpy(is_error).astype(bool)
    n_err, n_ok = int(e.sum()), int((~e).sum())
    if n_err == 0 or n_ok == 0:
        return float("nan")
    order = np.argsort(u, kind="mergesort")
    ranks = np.empty(len(u))
    sorted_u = u[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_u, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[e].sum() - n_err * (n_err + 1) / 2) / (n_err * n_ok))


@dataclass
class ReliabilityCurve:
    bin_edges: np.ndarray  # (B + 1,)
    confidence: np.ndarray  # (B,) mean top-label probability per bin (nan if empty)
    accuracy: np.ndarray  # (B,) fraction correct per bin
    counts: np.ndarray  # (B,)


def reliability_curve(probs, labels, n_bins: int = 15) -> ReliabilityCurve:
    probs, labels = _as_numpy(probs), _as_numpy(labels)
    _check(probs, labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / counts
        acc = np.bincount(idx, correct.astype(float), n_bins) / counts
    return ReliabilityCurve(edges, mean_conf, acc, counts)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of (bin fraction) x |accuracy - confidence|."""
    curve = reliability_curve(probs, labels, n_bins)
    full = curve.counts > 0
    return float(np.sum(curve.counts[full] / curve.counts.sum() * np.abs(curve.accuracy[full] - curve.confidence[full])))


@dataclass
class ConformalClassifier:
    """Split-conformal prediction sets with the LAC score s = 1 - p(true class)."""

    alpha: float
    threshold: float  # a class enters the set when 1 - p <= threshold

    @classmethod
    def fit(cls, probs, labels, alpha: float = 0.1, uncovered=None) -> "ConformalClassifier":
        """The threshold at level alpha from calibration `probs` and `labels`. `uncovered`
        (N,) bool: calibration objects whose set will be empty whatever the threshold (flagged
        out of set): counted as misses, so the sets with those emptied still cover 1 - alpha.
        Where they alone exceed alpha the threshold is 1 (every class in every other set)."""
        probs, labels = _as_numpy(probs), _as_numpy(labels)
        _check(probs, labels)
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        n = len(labels)
        scores = 1.0 - probs[np.arange(n), labels]
        if uncovered is not None:
            scores = np.where(np.asarray(uncovered, bool), np.inf, scores)
        level = min(1.0, np.ceil((n + 1) * (1 - alpha)) / n)  # finite-sample correction
        return cls(alpha, float(min(1.0, np.quantile(scores, level, method="higher"))))

    def predict_sets(self, probs) -> np.ndarray:
        """(N, C) boolean membership; never empty (the top class is always kept)."""
        probs = _as_numpy(probs)
        sets = (1.0 - probs) <= self.threshold
        sets[np.arange(len(probs)), probs.argmax(axis=1)] = True
        return sets


# Conformal levels `default_alpha` chooses from, largest first.
ALPHA_GRID = (0.1, 0.05, 0.02, 0.01, 0.005)


def default_alpha(probs, labels, grid: tuple[float, ...] = ALPHA_GRID) -> float:
    """The conformal level to use when none is asked for, from calibration data.

    The largest alpha of `grid` below the top-1 error rate: sets that never drop the top
    class cover at least the accuracy, so at alpha >= error rate they are nearly all
    singletons and say nothing; below it they widen exactly where the classifier is
    unsure. No smaller than the calibration block resolves (alpha >= 1/(n+1)); the
    largest alpha of the grid when the error rate exceeds it.
    """
    probs, labels = _as_numpy(probs), _as_numpy(labels)
    _check(probs, labels)
    error = float(np.mean(probs.argmax(axis=1) != labels))
    resolved = [a for a in grid if a >= 1.0 / (len(labels) + 1)] or [max(grid)]
    below = [a for a in resolved if a < error]
    return max(below) if below else min(resolved)


def coverage(sets: np.ndarray, labels) -> float:
    labels = _as_numpy(labels)
    return float(np.mean(sets[np.arange(len(labels)), labels]))
