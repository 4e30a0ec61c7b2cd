"""The batched redshift scan (heads/redshift_scan.py) against the truth and the full template fit."""

import numpy as np
import pytest
import torch

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.heads.redshift_scan import RedshiftScanner
from cosmofm.heads.template_fit import TemplateFitter, build_templates


@pytest.fixture(scope="module")
def templates():
    return build_templates(n_per_class=12, n_components=4, seed=5)


@pytest.fixture(scope="module")
def spectra():
    return mock_samples(load_card("sdss-like"), 60, seed=41)


def _arrays(spectra):
    wave = np.stack([s.coords["wavelength"] for s in spectra])
    return wave, np.stack([s.values for s in spectra]), np.stack([s.ivar for s in spectra])


def test_scan_finds_redshifts_of_every_family(templates, spectra):
    wave, flux, ivar = _arrays(spectra)
    classes = [s.meta["labels"]["spectral_class"] for s in spectra]
    z_true = np.array([s.meta["labels"]["redshift"] for s in spectra])
    z, z_err = RedshiftScanner(templates).fit(wave[0], flux, ivar, classes)
    dz = np.abs(z - z_true) / (1 + z_true)
    good = dz < 0.0033  # 1000 km/s
    assert good.mean() >= 0.9
    for family in ("STAR", "GALAXY", "QSO"):
        rows = [i for i, c in enumerate(classes) if c.startswith(family)]
        assert rows and good[rows].mean() >= 0.8, family
    # sub-bin precision from the parabola: far below the 4-pixel (9e-4 in z) bins
    assert np.median(dz[good]) < 2e-4
    assert np.all(z_err[good] > 0) and np.median(np.abs(z - z_true)[good] / z_err[good]) < 3

    # the full fit of the same class agrees wherever it is right
    fitter = TemplateFitter(templates)
    full = np.array([fitter.fit(s.coords["wavelength"], s.values, s.ivar, classes=[c]).z for s, c in zip(spectra[:20], classes[:20])])
    both = good[:20] & (np.abs(full - z_true[:20]) / (1 + z_true[:20]) < 0.0033)
    assert both.sum() >= 15
    np.testing.assert_allclose(z[:20][both], full[both], atol=5e-4 * (1 + z_true[:20][both]).max())


def test_grids_masks_and_bad_input(templates, spectra):
    wave, flux, ivar = _arrays(spectra[:12])
    classes = [s.meta["labels"]["spectral_class"] for s in spectra[:12]]
    scanner = RedshiftScanner(templates)
    shared = scanner.fit(wave[0], flux, ivar, classes)
    per_row = scanner.fit(torch.as_tensor(wave), torch.as_tensor(flux), torch.as_tensor(ivar), classes)  # (N, L) grids, torch
    np.testing.assert_allclose(per_row[0], shared[0], rtol=0, atol=1e-9)
    descending = scanner.fit(wave[0, ::-1].copy(), flux[:, ::-1].copy(), ivar[:, ::-1].copy(), classes)  # a grid running red to blue
    # the descending grid is binned by scattering pixels, the ascending one by summing groups of
    # them: float32 sums in another order, 1e-5 in z being 3 km/s
    np.testing.assert_allclose(descending[0], shared[0], rtol=0, atol=1e-5)

    # masked pixels carry nothing, even NaN fluxes behind them; an all-masked spectrum has no redshift
    flux2, ivar2 = flux.copy(), ivar.copy()
    flux2[0, 100:400], ivar2[0, 100:400] = np.nan, 0
    ivar2[1] = 0
    z, z_err = scanner.fit(wave[0], flux2, ivar2, classes)
    assert np.isfinite(z[0]) and abs(z[0] - shared[0][0]) < 0.0033 * (1 + shared[0][0])
    assert np.isnan(z[1]) and np.isnan(z_err[1])
    np.testing.assert_allclose(z[2:], shared[0][2:], atol=1e-9)

    # a shift of the wavelength grid by a known redshift moves the answer by it
    z_shift = 0.05
    moved, _ = scanner.fit(wave[0] * (1 + z_shift), flux, ivar, ["GALAXY"] * len(flux))
    base, _ = scanner.fit(wave[0], flux, ivar, ["GALAXY"] * len(flux))
    agree = np.abs(base - np.array([s.meta["labels"]["redshift"] for s in spectra[:12]])) < 0.003
    np.testing.assert_allclose((1 + moved[agree]) / (1 + base[agree]), 1 + z_shift, atol=2e-4)

    with pytest.raises(InputError, match="classes: .*NOT_A_CLASS"):
        scanner.fit(wave[0], flux, ivar, ["NOT_A_CLASS"] * len(flux))
    with pytest.raises(InputError, match="one class per row"):
        scanner.fit(wave[0], flux, ivar, classes[:3])
    with pytest.raises(InputError, match="bin_pixels"):
        RedshiftScanner(templates, bin_pixels=0)


def test_fit_best_keeps_the_lower_chi_square(templates, spectra):
    galaxies = [s for s in spectra if s.meta["labels"]["spectral_class"].startswith("GALAXY")][:10]
    wave, flux, ivar = _arrays(galaxies)
    truth = [s.meta["labels"]["spectral_class"] for s in galaxies]
    scanner = RedshiftScanner(templates)
    alone = scanner.fit(wave[0], flux, ivar, truth)
    # a star's templates explain a galaxy worse than its own class's do
    z, z_err, best = scanner.fit_best(wave[0], flux, ivar, [["STAR_K1", c] for c in truth])
    assert (best == 1).mean() >= 0.8
    np.testing.assert_allclose(z[best == 1], alone[0][best == 1], atol=1e-12)
    single = scanner.fit_best(wave[0], flux, ivar, [[c] for c in truth])
    np.testing.assert_allclose(single[0], alone[0], atol=1e-12)
    np.testing.assert_array_equal(single[2], 0)


@pytest.mark.parametrize("gap", [False, True])
def test_binning_shares_each_pixel_between_its_two_bins(templates, gap):
    """A log-uniform grid is binned by summing groups of pixels, a gapped one by scattering
    them: both must give the cloud-in-cell sums computed pixel by pixel."""
    from cosmofm.heads.template_fit import DELTA

    scanner = RedshiftScanner(templates)
    wave = 10 ** (3.5512 + DELTA * np.arange(1001))
    if gap:
        wave = np.delete(wave, np.arange(300, 340))
    rng = np.random.default_rng(0)
    flux, ivar = rng.normal(size=(3, len(wave))), rng.uniform(0.5, 2.0, size=(3, len(wave)))
    ivar[0, 10:20] = 0
    first, wf, w = scanner._binned(torch.as_tensor(wave), torch.as_tensor(flux, dtype=torch.float32), torch.as_tensor(ivar, dtype=torch.float32))
    position = np.log10(wave) / (scanner.bin * DELTA) - 0.5
    below = np.floor(position)
    index, upper = (below - first).astype(int), position - below
    expected_wf, expected_w = np.zeros((3, wf.shape[1])), np.zeros((3, w.shape[1]))
    for row in range(3):
        for total, values in ((expected_wf[row], flux[row] * ivar[row]), (expected_w[row], ivar[row])):
            np.add.at(total, index, values * (1 - upper))
            np.add.at(total, index + 1, values * upper)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(wf.numpy(), expected_wf, rtol=1e-5, atol=1e-5)


def test_scan_of_several_collated_batches_is_that_of_each(templates, spectra):
    """classify scans a whole piece's batches in one call (`scan_collated` with a list): each
    spectrum must get the redshift the scan of its own batch gives, whether the batches share
    one grid, sit on different grids of one length, or have other lengths (another card)."""
    from cosmofm.heads.redshift_scan import scan_collated
    from cosmofm.heads.template_fit import DELTA
    from cosmofm.data_cards.sample import Sample
    from cosmofm.pretrain.data import collate_samples

    shifted = [Sample("spectrum", s.values, s.ivar, {"wavelength": s.coords["wavelength"] * 10 ** DELTA}, s.meta) for s in spectra[20:27]]
    other_card = mock_samples(load_card("4most-lrs"), 5, seed=42)  # another length
    batches = [collate_samples(spectra[:13]), collate_samples(spectra[13:20]), collate_samples(shifted), collate_samples(other_card)]
    candidates = [[s.meta["labels"]["spectral_class"]] for part in (spectra[:20], shifted, other_card) for s in part]
    galaxy = next(i for i, c in enumerate(candidates) if c[0].startswith("GALAXY"))
    candidates[galaxy] = ["GALAXY", "GALAXY_AGN"]  # a runner-up too
    scanner = RedshiftScanner(templates)
    z, z_err = scan_collated(scanner, batches, candidates)
    start = 0
    for batch in batches:
        zb, errb = scan_collated(scanner, batch, candidates[start : start + len(batch)])
        np.testing.assert_allclose(z[start : start + len(batch)], zb, rtol=0, atol=1e-6)
        np.testing.assert_allclose(z_err[start : start + len(batch)], errb, rtol=1e-3)
        start += len(batch)
    assert start == len(z) == 32 and np.isfinite(z).all()
