"""Classical photo-z baseline beside the head: k-nearest neighbours on photometry measured from the stamps.

What a photo-z user would run on the same images without a network:

- **photometry from the pixels** (never the mock's truth fluxes): per band, the flux in
  circular apertures of radius 1" and 2" around the stamp centre (where catalogue stamps
  put the object) and its error from `ivar`; asinh magnitudes (Lupton, Gunn & Szalay
  1999, AJ 118, 1406; softening = the aperture's 1-sigma noise) so faint and negative
  fluxes stay finite;
- **features**: colours of adjacent bands and the reference band's magnitude in the 2"
  aperture, plus its 1"-2" magnitude difference (a concentration, i.e. a size: sizes
  carry weak redshift information); standardised;
- **kNN regression** (as in e.g. Ball et al. 2008, ApJ 683, 12; Beck et al. 2016, MNRAS
  460, 1371): k chosen by 5-fold cross-validation on NMAD of dz/(1+z); the point
  estimate and p(z) are the neighbours' redshifts, each spread as a Gaussian in
  ln(1 + z) (width chosen on a held-out fifth of the training set by the mean log p of
  the true bin), on the head's bins, so PIT and coverage compare with the head's.

Metrics go through `PhotozTask.metrics`, the head's own path. `python -m
cosmofm.heads.photoz_baseline --card lsst-like --n 2000` prints the baseline and a
constant predictor (everyone gets the training set's p(z); its median as the estimate).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads.photoz import PhotozHeadConfig, PhotozTask, pdf_summary, redshifts_from_samples

APERTURES_ARCSEC = (1.0, 2.0)  # radii; the last is the "total" flux
AB_NJY = 31.4  # AB magnitude of 1 nJy (the image cards' flux unit)
K_GRID = (5, 10, 20, 40, 80)
WIDTH_GRID = (0.005, 0.01, 0.02, 0.04)  # kernel sigma in ln(1 + z)


def aperture_photometry(sample: Sample, radii_arcsec: Sequence[float] = APERTURES_ARCSEC) -> tuple[np.ndarray, np.ndarray]:
    """(flux, error), each (B, R): the pixel sum inside circles of `radii_arcsec` about the
    stamp centre, and its 1-sigma error sqrt(sum 1/ivar) (pixels with ivar 0 are left out)."""
    if sample.modality != "image":
        raise InputError(f"{sample.meta.get('id', '?')}", f"is a {sample.modality}, not an image", "the photometry baseline measures image stamps")
    r = np.hypot(*np.meshgrid(sample.coords["dec_offset"], sample.coords["ra_offset"], indexing="ij"))  # (H, W) arcsec
    inside = r[None] <= np.asarray(radii_arcsec)[:, None, None]  # (R, H, W)
    good = sample.ivar > 0  # (B, H, W)
    var = np.where(good, 1 / np.where(good, sample.ivar, 1), 0)
    flux = np.einsum("bhw,rhw->br", np.where(good, sample.values, 0), inside)
    error = np.sqrt(np.einsum("bhw,rhw->br", var, inside))
    return flux, error


def asinh_magnitude(flux, softening) -> np.ndarray:
    """Lupton et al. (1999) asinh magnitude of a flux in nJy with softening b (nJy): ~AB
    magnitude when flux >> b, finite for flux <= 0."""
    b = np.asarray(softening, dtype=np.float64)
    return AB_NJY - 2.5 / np.log(10) * (np.arcsinh(np.asarray(flux) / (2 * b)) + np.log(b))


def photometry_features(samples: Sequence[Sample], reference_band: str = "r") -> np.ndarray:
    """(N, F) features: B - 1 adjacent-band colours and the reference band's magnitude in
    the largest aperture, then the reference band's small - large aperture magnitude
    (a concentration). The reference band is the middle one when the card has no `reference_band`."""
    rows = []
    for s in samples:
        flux, error = aperture_photometry(s)
        mag = asinh_magnitude(flux, np.maximum(error, 1e-3))  # (B, R)
        bands = [str(b) for b in s.meta.get("truth", {}).get("filters", [])] or []
        ref = next((i for i, b in enumerate(bands) if b.endswith(f"-{reference_band}") or b == reference_band), len(mag) // 2)
        total = mag[:, -1]
        rows.append(np.concatenate([total[:-1] - total[1:], [total[ref], mag[ref, 0] - mag[ref, -1]]]))
    return np.asarray(rows)


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
        edges = self.head.bin_edges().numpy()
        true_bin = np.clip(np.searchsorted(edges, z[held], side="right") - 1, 0, self.head.n_bins - 1)
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
    target = {"redshift": torch.from_numpy(z[n_train:])}
    report = {
        "card": args.card, "n_mocks": args.n, "mock_seconds": round(mock_s, 1), "n_train": n_train, "n_test": len(z) - n_train,
        "galaxies_only": args.galaxies, "k": knn.k, "kernel_width": knn.width, "cv_nmad": knn.cv_nmad,
        "knn": task.metrics(knn.predict(x[n_train:]), target),
        "constant": task.metrics(constant_prediction(z[:n_train], len(z) - n_train, head), target),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
