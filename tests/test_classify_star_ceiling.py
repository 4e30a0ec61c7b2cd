"""The star-class ceiling fit (scripts/bench/classify_star_ceiling.py): its closed-form
marginalisation against brute force, the dust map's E(B-V) cells, and a noiseless generator
star at a grid point."""

import math

import numpy as np
import pytest
import torch

from cosmofm.bench.classify_star_ceiling import PriorGrid, StarFit, gls_marginal, map_ebv_cells, normal_equations
from cosmofm.data_cards.mocks import instrument
from cosmofm.data_cards.mocks.spectra import C_KMS, ObjectParams
from cosmofm.data_cards.mocks.survey import DUST_MAP_ERROR, survey_model


def test_gls_marginal_equals_brute_force_integral():
    """A flat amplitude and one calibration coefficient with a Gaussian prior (non-zero mean):
    the closed form equals -2 ln of the integral over both on a fine grid."""
    rng = np.random.default_rng(3)
    n = 40
    t = np.linspace(-1, 1, n)
    template = 1 + 0.3 * np.sin(3 * t)
    X = np.column_stack([template, template * t])  # y = A m (1 + c t)
    w = rng.uniform(50, 200, n)
    y = 1.3 * template * (1 + 0.08 * t) + rng.normal(0, 1, n) / np.sqrt(w)
    mean, sd = np.array([0.0, 0.05]), 0.07  # prior on b = (A, A c): A flat, A c ~ N(0.05, 0.07^2)
    precision = np.diag([0.0, 1 / sd**2])
    got = gls_marginal(*(torch.from_numpy(a) for a in (X.T @ (w[:, None] * X), X.T @ (w * y), np.array(w @ y**2), mean, precision)),
                       torch.tensor([False, True])).item()

    Q = X.T @ (w[:, None] * X) + precision
    (b0, b1), (s0, s1) = np.linalg.solve(Q, X.T @ (w * y) + precision @ mean), np.sqrt(np.diag(np.linalg.inv(Q)))
    a_grid = np.linspace(b0 - 12 * s0, b0 + 12 * s0, 481)  # the posterior's +- 12 sigma, 20 points a sigma
    c_grid = np.linspace(b1 - 12 * s1, b1 + 12 * s1, 481)
    A, C = np.meshgrid(a_grid, c_grid, indexing="ij")
    r = y[None, None, :] - A[..., None] * X[:, 0] - C[..., None] * X[:, 1]
    chi2 = (w * r * r).sum(-1) + ((C - mean[1]) / sd) ** 2
    cmin = chi2.min()
    integral = np.exp(-0.5 * (chi2 - cmin)).sum() * (a_grid[1] - a_grid[0]) * (c_grid[1] - c_grid[0]) / math.sqrt(2 * math.pi * sd**2)
    brute = cmin - 2 * math.log(integral) + math.log(2 * math.pi)  # gls_marginal drops the -ln(2 pi) of each flat entry
    assert abs(got - brute) < 1e-6 * max(1.0, abs(brute)), (got, brute)


def test_normal_equations_match_explicit_design():
    rng = np.random.default_rng(0)
    n, T, S, J, k = 30, 2, 3, 2, 7
    m0, mf, mg = (torch.from_numpy(rng.uniform(0.5, 1.5, (T, n))) for _ in range(3))
    family, ext = torch.from_numpy(rng.normal(size=(n, k))), torch.from_numpy(rng.uniform(0.8, 1, (S, J, n)))
    y, w = torch.from_numpy(rng.normal(size=(S, n))), torch.from_numpy(rng.uniform(1, 2, (S, n)))
    t, j = 1, 1
    for shared in (True, False):  # one set of extinction cells for all stars, or each star its own (--map-ebv)
        cells = ext[:1] if shared else ext
        H, h = normal_equations(m0, mf, mg, family, y, w, cells)
        for s in range(S):
            e = cells[0 if shared else s, j]
            X = torch.cat([m0[t, :, None] * e[:, None] * family, (mf[t] * e)[:, None], (mg[t] * e)[:, None]], 1)
            torch.testing.assert_close(H[t, s, j], X.T @ (w[s, :, None] * X))
            torch.testing.assert_close(h[t, s, j], X.T @ (w[s] * y[s]))


def test_map_ebv_cells_follow_the_maps_posterior():
    """Cells of equal mass around the closed-form posterior of a log-normal prior times the
    map's log-normal error; a map value no prior draw comes near is refused."""
    rng = np.random.default_rng(1)
    mu, sd = math.log(0.86 * 0.035), 0.75  # draw_ebv's log-normal (clipping at 0.6 is negligible here)
    draws = np.sort(np.exp(rng.normal(mu, sd, 200000)))
    for map_ebv in (0.01, 0.1, 0.3):
        cells = map_ebv_cells(map_ebv, draws)
        post_sd = 1 / math.sqrt(1 / sd**2 + 1 / DUST_MAP_ERROR**2)
        post_median = math.exp(post_sd**2 * (mu / sd**2 + math.log(map_ebv) / DUST_MAP_ERROR**2))
        assert np.allclose([math.exp(m) for m, _, _ in cells], 1 / 3, atol=0.01)
        lo, mid, hi = (mean for _, mean, _ in cells)
        assert lo < mid < hi and abs(mid / post_median - 1) < 0.02, (map_ebv, cells, post_median)
        assert abs(hi / lo - math.exp(2 * 1.09 * post_sd)) < 0.15 * math.exp(2 * 1.09 * post_sd)  # third-means of a log-normal: +-1.09 sd
    with pytest.raises(ValueError, match="tail"):
        map_ebv_cells(50.0, draws)
    with pytest.raises(ValueError, match="positive"):
        map_ebv_cells(float("nan"), draws)
    with pytest.raises(ValueError, match="sorted"):
        map_ebv_cells(0.1, draws[::-1])


def test_noiseless_generator_star_gets_its_class():
    """A G2 star at a grid node, made by the generator (survey_model, a calibration error,
    a radial velocity), is called G2 over F9 and K1 with posterior > 0.99."""
    grid = PriorGrid(classes=("STAR_F9", "STAR_G2", "STAR_K1"), teff_step=100.0, teff_half_range=100.0, feh_edges=(-0.6, -0.4),
                     ebv_edges=(0.02, 0.04), logg_edges={(False, True): (4.1, 4.3), (False, False): (4.5, 4.7)}, n_draws=3000)
    wave = np.geomspace(3600.0, 10400.0, 4608)
    fit = StarFit(wave, 2000.0, grid)
    cell = fit.cells(5800.0)[0]
    (_, ebv, _), = fit.ebv
    rv = 37.0
    obj = ObjectParams("STAR_G2", rv / C_KMS, {"teff": 5800.0, "logg": cell["logg"], "feh": cell["feh"],
                                               "alpha_fe": float(np.clip(-0.3 * cell["feh"], 0, 0.3)), "vsini_kms": cell["vsini"], "ebv_mw": ebv})
    flux = 3.0 * survey_model(obj, wave, 2000.0) * instrument.calibration_error(wave, np.random.default_rng(5))
    ivar = (30.0 / flux) ** 2
    log_ev = fit.log_evidence(flux[None], ivar[None], np.array([obj.z]))
    post = fit.class_posterior(log_ev)
    assert post.shape == (1, 3)
    assert post[0, 1] > 0.99, post
    assert fit.teff[log_ev[0].argmax()] == 5800.0
    wrong_rv = fit.log_evidence(flux[None], ivar[None], np.array([-obj.z]))  # templates shifted the wrong way fit worse
    assert log_ev[0].max() > wrong_rv[0].max() + 10
    mapped = fit.class_posterior(fit.log_evidence(flux[None], ivar[None], np.array([obj.z]), map_ebv=np.array([ebv])))
    assert mapped[0, 1] > 0.99, mapped
