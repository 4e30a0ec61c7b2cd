"""The template-fitting baseline recovers classes and redshifts of mock spectra."""

import numpy as np
import pytest

from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.heads.template_fit import DELTA, TemplateFitter, build_templates, to_log_grid


@pytest.fixture(scope="module")
def fitter():
    return TemplateFitter(build_templates(n_per_class=12, n_components=3, seed=5))


def test_redshifts_and_class_families(fitter, cards):
    spectra = mock_samples(cards["sdss-like"], 40, seed=31)
    fits = [fitter.fit(s.coords["wavelength"], s.values, s.ivar) for s in spectra]
    z_true = np.array([s.meta["labels"]["redshift"] for s in spectra])
    z_fit = np.array([f.z for f in fits])
    catastrophic = np.abs(z_fit - z_true) / (1 + z_true) > 0.0033
    assert catastrophic.mean() <= 0.05
    family = [s.meta["labels"]["spectral_class"].split("_")[0] == f.spectral_class.split("_")[0] for s, f in zip(spectra, fits)]
    assert np.mean(family) >= 0.9
    good = ~catastrophic
    pull = (z_fit - z_true)[good] / np.array([f.z_err for f in fits])[good]
    assert np.all(np.array([f.z_err for f in fits]) > 0) and np.median(np.abs(pull)) < 5


def test_works_on_linear_and_gapped_grids(fitter):
    from cosmofm.data_cards import load_card

    for name in ("desi-like", "4most-hrs"):
        spectra = mock_samples(load_card(name), 12, seed=8)
        fits = [fitter.fit(s.coords["wavelength"], s.values, s.ivar) for s in spectra]
        family = [s.meta["labels"]["spectral_class"].split("_")[0] == f.spectral_class.split("_")[0] for s, f in zip(spectra, fits)]
        assert np.mean(family) >= 0.75, name


def test_log_resampling_keeps_masks_and_grid():
    wave = np.linspace(4000, 5000, 2000)
    ivar = np.ones_like(wave)
    ivar[1000:1010] = 0
    log0, f, iv = to_log_grid(wave, np.sin(wave / 30), ivar)
    assert abs(log0 / DELTA - round(log0 / DELTA)) < 1e-6
    grid = 10 ** (log0 + np.arange(f.size) * DELTA)
    assert np.all(iv[(grid > wave[999] + 0.5) & (grid < wave[1010] - 0.5)] == 0)
    np.testing.assert_allclose(f[iv > 0], np.sin(grid[iv > 0] / 30), atol=2e-3)


def test_refinement_fits_only_the_given_class(fitter, cards):
    from cosmofm.heads.template_fit import refine_redshifts

    spectra = [s for s in mock_samples(cards["sdss-like"], 40, seed=32) if not s.meta["labels"]["spectral_class"].startswith("STAR")][:10]
    z_true = np.array([s.meta["labels"]["redshift"] for s in spectra])
    classes = [s.meta["labels"]["spectral_class"] for s in spectra]
    whole = refine_redshifts(spectra, classes, fitter=fitter)  # the class's whole redshift range
    assert np.mean(np.abs(whole["z"] - z_true) / (1 + z_true) < 0.0033) >= 0.8
    # only the given class is fitted: a star's templates cannot reach a galaxy's redshift
    stars = refine_redshifts(spectra[:3], ["STAR_K1"] * 3, fitter=fitter)
    assert np.all(np.abs(stars["z"]) <= 0.0021)


def test_eigenspectra_are_the_leading_right_singular_vectors():
    """build_templates takes the eigenspectra from the QR factor of the wide matrix of model
    spectra (faster than its SVD): they must be the SVD's leading right singular vectors, to
    sign, and orthonormal, also when the singular values span many decades (stellar classes)."""
    from cosmofm.heads.template_fit import _leading_right_singular_vectors

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((30, 30)) @ (rng.standard_normal((30, 2000)) * np.logspace(0, -8, 30)[:, None])
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    got = _leading_right_singular_vectors(rows, 4)
    assert got.shape == (4, 2000)
    np.testing.assert_allclose(np.abs(np.sum(got * vt[:4], axis=1)), 1.0, atol=1e-12)
    np.testing.assert_allclose(got @ got.T, np.eye(4), atol=1e-12)
