"""Classical baseline for spectral classification: chi-square template fitting.

A redrock-like fitter (Bailey et al., in prep.; DESI's redshift pipeline): for each
class, a small PCA basis of rest-frame templates plus a low-order calibration
polynomial is fitted by weighted linear least squares at every trial redshift; the
class and redshift of lowest chi-square win, refined by a parabola through the
chi-square minimum (which also gives the redshift error from its curvature).

Spectra are resampled onto a grid uniform in log10(wavelength) with step DELTA, so a
trial redshift is an integer shift of the rest-frame templates and the normal
equations at *all* shifts are cross-correlations, computed with FFTs: O(K^2 N log N)
per class instead of O(N_z N K^2).

Templates are not the generator's: they are PCA eigenspectra of a separate set of
noiseless mock objects (other random parameters), as a pipeline's templates are
built from archetypes that never match a given object exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.mocks.spectra import CLASSES, draw_object, rest_model

DELTA = 1e-4  # dex per pixel of the log-wavelength grid (SDSS's loglam step)
REST_LOG_RANGE = (np.log10(700.0), np.log10(11500.0))
# trial redshift ranges per class family: (z_min, z_max)
Z_RANGES = {"STAR": (-0.002, 0.002), "GALAXY": (-0.002, 0.9), "QSO": (0.1, 4.2)}
# where a catalogue's Z comes from (`cosmofm classify --redshift`): the eigenspectrum scan
# (heads.redshift_scan), the full template fit (refine_redshifts below) or the network's
# own; here, with no torch, so the CLI parser can offer them without loading torch
REDSHIFT_METHODS = ("scan", "template", "network")


def class_family(cls: str) -> str:
    """STAR, GALAXY or QSO: the family, whose redshift range a class shares."""
    return cls.split("_")[0]


@dataclass
class TemplateSet:
    """PCA eigenspectra per class on a rest-frame log10-wavelength grid of step DELTA."""

    log_start: float  # log10 of the first rest-frame pixel, a multiple of DELTA
    bases: dict[str, np.ndarray]  # class -> (K, T) orthonormal eigenspectra

    @property
    def n_pixels(self) -> int:
        return next(iter(self.bases.values())).shape[1]


def build_templates(n_per_class: int = 60, n_components: int = 4, seed: int = 20240, resolving_power: float = 3000.0) -> TemplateSet:
    """Eigenspectra of `n_per_class` noiseless rest-frame mock objects per class."""
    i0, i1 = (int(np.round(v / DELTA)) for v in REST_LOG_RANGE)
    wave = 10 ** (np.arange(i0, i1) * DELTA)
    rng = np.random.default_rng(seed)
    bases = {}
    for cls in CLASSES:
        rows = []
        for _ in range(n_per_class):
            obj = draw_object(rng, cls)
            obj.z = 0.0
            model = rest_model(obj, wave, resolving_power)
            rows.append(model / np.median(np.abs(model)))
        bases[cls] = _leading_right_singular_vectors(np.array(rows), n_components)
    return TemplateSet(log_start=i0 * DELTA, bases=bases)


def _leading_right_singular_vectors(rows: np.ndarray, k: int) -> np.ndarray:
    """The first k right singular vectors (k, L) of rows (m, L), m << L, ~8x faster than the SVD
    of the wide matrix, which dominated building the templates (once per process, before the
    first classification). With rows^T = Q R, rows = U S V^T has the U and S of the small R^T,
    and V^T = S^-1 U^T rows; only R is formed (Householder, so as accurate as the full SVD,
    unlike the eigenvectors of rows rows^T). Signs are arbitrary, as an SVD's; every fit is
    linear in the eigenspectra."""
    r = np.linalg.qr(rows.T, mode="r")
    u, s, _ = np.linalg.svd(r.T)
    return (u[:, :k].T @ rows) / s[:k, None]


def to_log_grid(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Resample onto log10(wavelength) = multiples of DELTA; masked pixels stay masked."""
    i0, i1 = int(np.ceil(np.log10(wave[0]) / DELTA)), int(np.floor(np.log10(wave[-1]) / DELTA))
    return i0 * DELTA, *resample_log(wave, flux, ivar, np.arange(i0, i1 + 1) * DELTA)


def resample_log(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, log_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flux, ivar) linearly interpolated onto log10(wavelength) = `log_grid`. A resampled pixel
    is usable only if both pixels it interpolates from are; pixels in a gap between the windows
    of a multi-window spectrograph or off the spectrum's range get ivar = 0."""
    lw = np.log10(wave)
    f = np.interp(log_grid, lw, flux)
    iv = np.interp(log_grid, lw, ivar)
    nearest_bad = np.interp(log_grid, lw, (ivar <= 0).astype(float)) > 0
    step = np.median(np.diff(lw))
    gap = np.interp(log_grid, lw[:-1] + step / 2, (np.diff(lw) > 5 * step).astype(float)) > 0.5
    outside = (log_grid < lw[0]) | (log_grid > lw[-1])
    return f, np.where(nearest_bad | gap | outside, 0.0, iv)


def legendre_rows(n: int, degree: int) -> np.ndarray:
    """(degree + 1, n) Legendre polynomials P_0..P_degree on n points spanning [-1, 1]: the
    low-order continuum terms of a template fit."""
    return np.polynomial.legendre.legvander(np.linspace(-1, 1, n), degree).T


def _xcorr(a: np.ndarray, b: np.ndarray, n_fft: int) -> np.ndarray:
    """r[d] = sum_i a[i] b[i + d] for all d (circular index: d < 0 wraps to the end)."""
    return np.fft.irfft(np.conj(np.fft.rfft(a, n_fft)) * np.fft.rfft(b, n_fft), n_fft)


@dataclass
class FitResult:
    spectral_class: str
    z: float
    z_err: float
    chi2: float
    dof: int
    chi2_per_class: dict[str, float]
    delta_chi2: float  # chi2 gap to the best other class (confidence)


class TemplateFitter:
    """Fits every class's templates over its redshift range; see the module docstring."""

    def __init__(self, templates: TemplateSet | None = None, poly_degree: int = 2):
        self.templates = templates or build_templates()
        self.poly_degree = poly_degree

    def fit(self, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, classes: list[str] | None = None) -> FitResult:
        """Best class and redshift; `classes` limits the templates tried."""
        log0, f, w = to_log_grid(np.asarray(wave, float), np.asarray(flux, float), np.asarray(ivar, float))
        n = f.size
        t = self.templates
        n_fft = int(2 ** np.ceil(np.log2(n + t.n_pixels)))
        off = int(np.round((log0 - t.log_start) / DELTA))  # rest index of obs pixel 0 at z = 0
        poly = legendre_rows(n, self.poly_degree)  # (P, n)
        wf, fwf = w * f, float(np.sum(w * f * f))
        dof = int(np.sum(w > 0))
        pp = (poly * w) @ poly.T  # (P, P), the same at every redshift
        pf = poly @ wf
        results = {}
        for cls in classes or list(t.bases):
            results[cls] = self._scan(cls, t.bases[cls], w, wf, fwf, poly, pp, pf, off, n_fft)
        best = min(results, key=lambda c: results[c][0])
        chi2, z, z_err = results[best]
        others = [results[c][0] for c in results if c != best]
        return FitResult(best, z, z_err, chi2, dof, {c: r[0] for c, r in results.items()}, min(others) - chi2 if others else float("inf"))

    def _scan(self, cls, basis, w, wf, fwf, poly, pp, pf, off, n_fft):
        lo, hi = Z_RANGES[class_family(cls)]
        k_lo, k_hi = (int(np.floor(np.log10(1 + z) / DELTA)) for z in (lo, hi))
        shifts = np.arange(k_lo, k_hi + 1)
        d = (off - shifts) % n_fft  # template index offset j - i for each trial shift
        kb = basis.shape[0]
        p = poly.shape[0]
        m = np.zeros((shifts.size, kb + p, kb + p))
        b = np.zeros((shifts.size, kb + p))
        for i in range(kb):
            b[:, i] = _xcorr(wf, basis[i], n_fft)[d]
            for j in range(i, kb):
                m[:, i, j] = m[:, j, i] = _xcorr(w, basis[i] * basis[j], n_fft)[d]
            for q in range(p):
                m[:, i, kb + q] = m[:, kb + q, i] = _xcorr(w * poly[q], basis[i], n_fft)[d]
        m[:, kb:, kb:] = pp
        b[:, kb:] = pf
        m += np.eye(kb + p) * 1e-9 * np.trace(m, axis1=1, axis2=2)[:, None, None] / (kb + p)  # ridge for empty overlaps
        coef = np.linalg.solve(m, b[..., None])[..., 0]
        chi2 = fwf - np.einsum("zi,zi->z", b, coef)
        i = int(np.argmin(chi2))
        # parabola through the minimum: sub-pixel shift and its 1-sigma error (delta chi2 = 1)
        if 0 < i < chi2.size - 1:
            c_m, c_0, c_p = chi2[i - 1], chi2[i], chi2[i + 1]
            curv = c_m - 2 * c_0 + c_p
            frac = 0.5 * (c_m - c_p) / curv if curv > 0 else 0.0
            sigma_k = np.sqrt(2.0 / curv) if curv > 0 else 1.0
        else:
            frac, sigma_k = 0.0, 1.0
        k = shifts[i] + frac
        z = 10 ** (k * DELTA) - 1
        z_err = (1 + z) * np.log(10) * DELTA * sigma_k
        return float(chi2[i] - (0.25 * (chi2[i - 1] - chi2[i + 1]) * frac if 0 < i < chi2.size - 1 else 0.0)), float(z), float(z_err)


def refine_redshifts(samples, classes: list[str], fitter: TemplateFitter | None = None) -> dict:
    """Redshifts from the template fitter, run only for each spectrum's given class (a
    classifier's prediction) over the class family's whole range: the classical
    chi-square minimum at ~1/13 of the cost of the scan over all classes
    (`cosmofm classify --redshift template`). Fitting only a window around a network's
    redshift was tried and dropped: its galaxy and QSO redshifts are off by more
    (docs/benchmarks.md).

    Returns {"z", "z_err" (N,) arrays, "spectra_per_s"}.
    """
    import time

    fitter = fitter or TemplateFitter()
    z, z_err = np.empty(len(samples)), np.empty(len(samples))
    t0 = time.perf_counter()
    for i, (s, cls) in enumerate(zip(samples, classes)):
        fit = fitter.fit(s.coords["wavelength"], s.values, s.ivar, classes=[cls])
        z[i], z_err[i] = fit.z, fit.z_err
    return {"z": z, "z_err": z_err, "spectra_per_s": len(samples) / max(time.perf_counter() - t0, 1e-9)}
