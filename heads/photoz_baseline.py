"""Classical photo-z baselines beside the head, on photometry measured from the same stamps.

What a photo-z user would run on the same images without a foundation model, on the
features of `heads/photometry.py` (colours, magnitude and concentration from aperture
photometry of the pixels, never the mock's truth fluxes; the head's photometry branch
reads the same):

- **kNN regression** (as in e.g. Ball et al. 2008, ApJ 683, 12; Beck et al. 2016, MNRAS
  460, 1371): k chosen by 5-fold cross-validation on NMAD of dz/(1+z); the point
  estimate and p(z) are the neighbours' redshifts, each spread as a Gaussian in
  ln(1 + z) (width chosen on a held-out fifth of the training set by the mean log p of
  the true bin), on the head's bins, so PIT and coverage compare with the head's.
- **an ANNz-style network** (Collister & Lahav 2004, PASP 116, 345: a small MLP on the
  photometry, trained on the training set and stopped on a validation set): the head's
  photometry branch alone with the head's binned p(z) output and loss; its width and
  the number of steps chosen on a held-out fifth of the training labels by NMAD, its
  logit temperature fitted there. The stronger of the two on these mocks, and what the
  head's image tokens must add to (the backbone's value, measured in the benchmark).

Metrics go through `PhotozTask.metrics`, the head's own path. `python -m
cosmofm.heads.photoz_baseline --card lsst-like --n 2000` prints both baselines and a
constant predictor (everyone gets the training set's p(z); its median as the estimate).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads.photometry import PhotometryBranch, photometry_features as stamp_features, reference_band_index
from cosmofm.heads.photoz import PhotozHeadConfig, PhotozTask, pdf_summary, redshifts_from_samples, smoothed_targets

K_GRID = (5, 10, 20, 40, 80)
WIDTH_GRID = (0.005, 0.01, 0.02, 0.04)  # kernel sigma in ln(1 + z)


def photometry_features(samples: Sequence[Sample], reference_band: str = "r") -> np.ndarray:
    """(N, B + 1) `heads.photometry.photometry_features` of image samples; the reference
    band by name (from `meta["truth"]["filters"]`), the middle one when unnamed."""
    rows = []
    for s in samples:
        if s.modality != "image":
            raise InputError(f"{s.meta.get('id', '?')}", f"is a {s.modality}, not an image", "the photometry baselines measure image stamps")
        bands = s.meta.get("truth", {}).get("filters", []) or [str(i) for i in range(s.values.shape[0])]
        ref = reference_band_index(bands, reference_band)
        t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64))[None] for k, v in s.coords.items()}
        rows.append(stamp_features(torch.from_numpy(s.values)[None], torch.from_numpy(s.ivar)[None], t["dec_offset"], t["ra_offset"], ref))
    return torch.cat(rows).double().numpy()


class KNNPhotoz:
    """Standardised features -> k nearest training objects -> their redshifts as p(z) on the head's bins."""

    def __init__(self, head: PhotozHeadConfig | None = None, k_grid: Sequence[int] = K_GRID, width_grid: Sequence[float] = WIDTH_GRID, seed: int = 0):
        self.head = head or PhotozHeadConfig()
        self.k_grid, self.width_grid, self.seed = tuple(k_grid), tuple(width_grid), seed

    def fit(self, features: np.ndarray, z: np.ndarray) -> "KNNPhotoz":
        from sklearn.metrics import make_scorer
        from sklearn.model_selection import GridSearchCV, KFold
        from sklearn.neighbors import KNeighborsRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from cosmofm.heads.photoz_metrics import point_metrics

        features, z = np.asarray(features, dtype=np.float64), np.asarray(z, dtype=np.float64)
        if features.ndim != 2 or z.shape != (len(features),):
            raise ValueError(f"expected features (N, F) and z (N,), got {features.shape} and {z.shape}")
        ks = [k for k in self.k_grid if k <= 0.8 * len(z) - 1] or [1]
        scorer = make_scorer(lambda zt, zp: -point_metrics(zt, zp)["nmad"])
        search = GridSearchCV(make_pipeline(StandardScaler(), KNeighborsRegressor(weights="uniform")),
                              {"kneighborsregressor__n_neighbors": ks}, scoring=scorer, cv=KFold(5, shuffle=True, random_state=self.seed))
        search.fit(features, z)
        self.k = int(search.best_params_["kneighborsregressor__n_neighbors"])
        self.cv_nmad = {int(k): float(-s) for k, s in zip(ks, search.cv_results_["mean_test_score"])}
        # kernel width on a held-out fifth of the training set, then refit on all of it
        held = np.random.default_rng(self.seed).permutation(len(z)) < len(z) // 5
        self._fit_neighbours(features[~held], z[~held])
        true_bin = self.head.bin_index(z[held]).numpy()
        score = {w: float(np.mean(np.log(self._pdf(features[held], w)[np.arange(held.sum()), true_bin] + 1e-12))) for w in self.width_grid}
        self.width = max(score, key=score.get)
        self._fit_neighbours(features, z)
        return self

    def _fit_neighbours(self, features, z):
        from sklearn.neighbors import NearestNeighbors
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(features)
        self.index = NearestNeighbors(n_neighbors=self.k).fit(self.scaler.transform(features))
        self.z_train = z

    def _pdf(self, features, width: float) -> np.ndarray:
        _, idx = self.index.kneighbors(self.scaler.transform(features))  # (N, k)
        return neighbour_pdf(self.z_train[idx], self.head.bin_edges().numpy(), width)

    def predict(self, features: np.ndarray) -> dict[str, torch.Tensor]:
        """The head's output fields: `probs` (N, B) and `pdf_summary`'s point estimate and intervals."""
        probs = torch.from_numpy(self._pdf(np.asarray(features, dtype=np.float64), self.width)).float()
        return {"probs": probs, **pdf_summary(probs, self.head.bin_edges(dtype=torch.float32))}


class MLPPhotoz:
    """ANNz-style baseline: `PhotometryBranch` + a linear layer over the head's p(z) bins,
    trained with the head's loss (cross-entropy on smoothed targets); width and steps
    chosen on a held-out fifth of the training set (by NMAD), temperature fitted there.
    With `refit`, a fresh network of the chosen width is then trained on the whole
    training set for the chosen number of steps (what a user does once the settings are
    chosen; the temperature stays the held-out one)."""

    def __init__(self, head: PhotozHeadConfig | None = None, widths: Sequence[int] = (64, 128), max_steps: int = 6000,
                 eval_every: int = 250, batch_size: int = 32, lr: float = 1e-3, dropout: float = 0.0, seed: int = 0,
                 refit: bool = False):
        self.head = head or PhotozHeadConfig()
        self.dropout, self.refit = dropout, refit
        self.widths, self.max_steps, self.eval_every = tuple(widths), max_steps, eval_every
        self.batch_size, self.lr, self.seed = batch_size, lr, seed

    def _network(self, n_features: int, width: int) -> nn.Module:
        return nn.Sequential(PhotometryBranch(n_features, width, self.dropout), nn.Linear(width, self.head.n_bins))

    def _train(self, x: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, width: int, steps: int, evaluate=None) -> nn.Module:
        """A network of `width` trained for `steps` on x[rows]; `evaluate(step, net)` every `eval_every` steps and at the end."""
        torch.manual_seed(self.seed)
        net = self._network(x.shape[1], width)
        net[0].set_standardisation(x[rows])
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=1e-2)
        rng = torch.Generator().manual_seed(self.seed)
        for step in range(1, steps + 1):
            idx = rows[torch.randint(len(rows), (self.batch_size,), generator=rng)]
            loss = F.cross_entropy(net(x[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if evaluate is not None and (step % self.eval_every == 0 or step == steps):
                net.eval()
                evaluate(step, net)
                net.train()
        return net.eval()

    def fit(self, features: np.ndarray, z: np.ndarray) -> "MLPPhotoz":
        from cosmofm.heads.calibration import fit_temperature
        from cosmofm.heads.photoz_metrics import point_metrics

        x, z = torch.as_tensor(np.asarray(features), dtype=torch.float32), torch.as_tensor(np.asarray(z), dtype=torch.float32)
        held = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(z)) < len(z) // 5)
        edges = self.head.bin_edges(dtype=torch.float32)
        target = smoothed_targets(z, edges, self.head.target_width)
        best = {"nmad": float("inf")}
        self.curves = {}

        def evaluate(step, net):
            with torch.no_grad():
                probs = net(x[held]).softmax(-1)
            nmad = point_metrics(z[held].numpy(), pdf_summary(probs, edges)["redshift"].numpy())["nmad"]
            self.curves[width][step] = nmad
            if nmad < best["nmad"]:
                best.update(nmad=nmad, width=width, steps=step, state={k: v.clone() for k, v in net.state_dict().items()})

        with torch.random.fork_rng(devices=[]):  # seeded here without moving the caller's random stream
            for width in self.widths:
                self.curves[width] = {}
                self._train(x, target, torch.nonzero(~held).squeeze(1), width, self.max_steps, evaluate)
            self.val_nmad, self.width, self.steps = best["nmad"], best["width"], best["steps"]
            self.net = self._network(x.shape[1], self.width).eval()
            self.net.load_state_dict(best["state"])  # the standardisation included
            with torch.no_grad():
                logits = self.net(x[held])
            if self.refit:
                self.net = self._train(x, target, torch.arange(len(z)), self.width, self.steps)
        self.temperature = fit_temperature(logits, self.head.bin_index(z[held]))
        return self

    def predict(self, features: np.ndarray) -> dict[str, torch.Tensor]:
        """The head's output fields: `probs` (N, B) and `pdf_summary`'s point estimate and intervals."""
        with torch.no_grad():
            probs = (self.net(torch.as_tensor(np.asarray(features), dtype=torch.float32)) / self.temperature).softmax(-1)
        return {"probs": probs, **pdf_summary(probs, self.head.bin_edges(dtype=torch.float32))}


def neighbour_pdf(z_neighbours: np.ndarray, edges: np.ndarray, width: float) -> np.ndarray:
    """(N, B) p(z): each of the (N, k) neighbours' redshifts a Gaussian of sigma `width` in ln(1 + z), averaged."""
    from scipy.special import ndtr

    cdf = ndtr((np.log1p(edges)[None, None, :] - np.log1p(z_neighbours)[..., None]) / width).mean(axis=1)  # (N, B + 1)
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0  # mass beyond the grid into the end bins
    return np.diff(cdf, axis=1)


def constant_prediction(z_train: np.ndarray, n: int, head: PhotozHeadConfig) -> dict[str, torch.Tensor]:
    """Every object gets the training set's redshift distribution (its median as the estimate)."""
    edges = head.bin_edges().numpy()
    hist = np.histogram(np.clip(z_train, 0, head.z_max), bins=edges)[0].astype(np.float64)
    probs = torch.from_numpy(np.tile(hist / hist.sum(), (n, 1))).float()
    return {"probs": probs, **pdf_summary(probs, head.bin_edges(dtype=torch.float32))}


def galaxy_mocks(card, n: int, seed: int = 0) -> list[Sample]:
    """Image mocks of the first `n` galaxies (GALAXY* classes: no stars, no QSOs) of mock
    universe `seed`; classes come from `draw_source` (~1 ms), so only galaxies are rendered."""
    from cosmofm.data_cards.mocks.images import draw_source, mock_image

    out, index = [], 0
    while len(out) < n:
        if draw_source(card, seed, index).spectral_class.startswith("GALAXY"):
            out.append(mock_image(card, seed, index))
        index += 1
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.mocks.generators import generate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--card", default="lsst-like")
    p.add_argument("--n", type=int, default=2000, help="mocks (train 3/4, test 1/4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--galaxies", action="store_true", help="n galaxies (GALAXY* classes) instead of n objects of every class")
    args = p.parse_args(argv)
    start = time.perf_counter()
    card = load_card(args.card)
    samples = galaxy_mocks(card, args.n, args.seed) if args.galaxies else list(generate(card, args.n, seed=args.seed, workers=args.workers))
    mock_s = time.perf_counter() - start
    z = redshifts_from_samples(samples).numpy().astype(np.float64)
    x = photometry_features(samples)
    n_train = 3 * len(samples) // 4
    head = PhotozHeadConfig()
    task = PhotozTask(head)
    knn = KNNPhotoz(head).fit(x[:n_train], z[:n_train])
    mlp = MLPPhotoz(head).fit(x[:n_train], z[:n_train])
    target = {"redshift": torch.from_numpy(z[n_train:])}
    report = {
        "card": args.card, "n_mocks": args.n, "mock_seconds": round(mock_s, 1), "n_train": n_train, "n_test": len(z) - n_train,
        "galaxies_only": args.galaxies, "k": knn.k, "kernel_width": knn.width, "cv_nmad": knn.cv_nmad,
        "knn": task.metrics(knn.predict(x[n_train:]), target),
        "mlp_width": mlp.width, "mlp_steps": mlp.steps, "mlp": task.metrics(mlp.predict(x[n_train:]), target),
        "constant": task.metrics(constant_prediction(z[:n_train], len(z) - n_train, head), target),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
