"""The speed round of the 21cm model (issue 18's paper-size target) against the expressions it replaced.

Shared forward FFT of delta0 (`density.TophatSmoother`: one for the excursion set, the heating
shells and the velocities), windows at the distinct |k| and products without full-grid
temporaries, inverse FFTs slab by slab (`density.irfftn_by_slabs`), the heating shells'
per-cell tables and the last excursion step in cache-sized blocks. Each must give what
the direct expression gives, and a small lightcone must give the numbers it gave before the round.
"""

import numpy as np
import pytest
import scipy.fft

from cosmofm.data_cards.mocks.sim21cm import SimParams, cosmology
from cosmofm.data_cards.mocks.sim21cm import spin as spin_module
from cosmofm.data_cards.mocks.sim21cm.cosmology import tophat_window
from cosmofm.data_cards.mocks.sim21cm.density import TophatSmoother, gaussian_field, irfftn_by_slabs, k_grid, k_magnitude
from cosmofm.data_cards.mocks.sim21cm.reionization import lightcone_slices
from cosmofm.data_cards.mocks.sim21cm.spin import spin_fields, velocity_gradient


def _masked_tophat_window(x):
    """tophat_window as it was written before the round (masked gathers)."""
    x = np.asarray(x, dtype=float)
    out = np.ones_like(x)
    big = x > 1e-3
    out[big] = 3 * (np.sin(x[big]) - x[big] * np.cos(x[big])) / x[big] ** 3
    out[~big] = 1 - x[~big] ** 2 / 10
    return out


def test_tophat_window_is_the_masked_formula():
    x = np.concatenate([[0.0, 1e-5, 1e-3, 1.0000001e-3, 0.5, 4.493409], np.random.default_rng(0).uniform(0, 60, 10_001)])
    np.testing.assert_array_equal(tophat_window(x), _masked_tophat_window(x))  # bit for bit
    assert float(tophat_window(0.0)) == 1.0
    assert abs(float(tophat_window(4.493409))) < 1e-6  # first zero of the window, tan x = x


@pytest.mark.parametrize("shape", [(7, 6, 5), (8, 9, 10), (40, 14, 14), (33, 12, 13), (130, 70, 70)])
def test_inverse_fft_by_slabs_is_irfftn(shape):
    """Axis 0 over the box, then axes 1 and 2 slab by slab, unscaled until one 1 / N: irfftn's result, bit for bit."""
    spectrum = scipy.fft.rfftn(np.random.default_rng(4).standard_normal(shape))
    direct = scipy.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2))
    np.testing.assert_array_equal(irfftn_by_slabs(spectrum.copy(), shape), direct)
    assert np.abs(direct).max() > 1.0  # a unit-variance field comes back, not zeros


@pytest.mark.parametrize("shape", [(7, 6, 5), (8, 9, 10), (40, 14, 14)])
def test_smoother_is_the_full_grid_filter(shape):
    """Mirrored quarter-grid window into a reused buffer == irfftn(rfftn(f) * W(|k| R)) on the full grid, bit for bit."""
    field = np.random.default_rng(1).standard_normal(shape)
    smooth = TophatSmoother(field, 1.5)
    dk, kmag = scipy.fft.rfftn(field), k_magnitude(shape, 1.5)
    first = {}
    for radius in (0.93, 4.0, 15.0):
        first[radius] = smooth(radius)
        direct = scipy.fft.irfftn(dk * tophat_window(kmag * radius), s=shape, axes=(0, 1, 2))
        np.testing.assert_array_equal(first[radius], direct)
    # the buffer is reused (and overwritten by the inverse FFT): earlier radii come back the same
    np.testing.assert_array_equal(smooth(0.93), first[0.93])
    # into a caller's array (the excursion set's and the shells' reused result): the same values, in that array
    out = np.full(shape, np.nan)
    assert smooth(4.0, out=out) is out
    np.testing.assert_array_equal(out, first[4.0])
    assert first[15.0].std() < first[0.93].std() < field.std()


def test_velocity_gradient_on_the_shared_transform():
    """dv/dr from the smoother's transform (quarter-grid mu^2) == the numpy expression on the full grid."""
    shape, cell = (48, 12, 12), 2.0
    cosmo = cosmology(SimParams())
    delta0 = gaussian_field(np.random.default_rng(2), shape, cell, cosmo.power, cell_average=True)
    z = np.linspace(8.0, 12.0, shape[0])
    kz, ky, kx = k_grid(shape, cell)
    k2 = kz**2 + ky**2 + kx**2
    k2.flat[0] = 1.0
    direct = -(cosmo.growth_rate(z) * cosmo.growth(z))[:, None, None] * np.fft.irfftn(np.fft.rfftn(delta0) * (kz**2 / k2), s=shape)
    shared = velocity_gradient(delta0, cell, z, cosmo, TophatSmoother(delta0, cell))
    assert np.abs(shared - direct).max() < 1e-13 * np.abs(direct).max()
    np.testing.assert_array_equal(velocity_gradient(delta0, cell, z, cosmo), shared)  # builds its own smoother
    assert np.abs(direct).max() > 1e-3  # a real signal, not zeros on both sides


def test_spin_fields_do_not_depend_on_the_block_size(monkeypatch):
    """The heating shells' per-cell tables in blocks of one slice == in one block of the whole box (the unblocked loop)."""
    shape, cell = (60, 8, 8), 4.0
    p = SimParams(L_X=40.5)
    cosmo = cosmology(p)
    delta0 = gaussian_field(np.random.default_rng(3), shape, cell, cosmo.power, cell_average=True)
    z = np.linspace(10.0, 20.0, shape[0])
    density = cosmo.growth(z)[:, None, None] * delta0
    monkeypatch.setattr(spin_module, "CHUNK_CELLS", 1 << 40)
    whole = spin_fields(delta0, cell, z, p, cosmo, density)
    monkeypatch.setattr(spin_module, "CHUNK_CELLS", 64)
    blocks = spin_fields(delta0, cell, z, p, cosmo, density)
    for name in ("t_s", "t_k", "x_alpha", "x_c"):
        a, b = getattr(whole, name), getattr(blocks, name)
        assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max(), name
    assert whole.t_k.std(axis=(1, 2)).min() > 0  # the shells make the temperature fluctuate in every slice


def test_lightcone_is_the_one_before_the_speed_round():
    """64 Mpc / 32^2 x 900 slices from z = 5 (z ~ 5-11.5), defaults, seed 0: the slice means the model gave before
    the round (commit 1455a89), to float32 rounding of the per-cell values. T_K values re-taken after the per-cell
    T_K round (`spin._add_cell_heating`, C_AD_START), which changed T_K on purpose (x_HI is untouched), and again
    after the per-cell Delta E of the Ly-alpha heating (`spin._lya_per_cell_density`, <= 6e-4 mK here); all re-taken
    after 21cmFAST's X-ray opacity of the pre-ionised gas (`heating.xray_optical_depth`), which raises x_e late on
    purpose (x_HI mean 0.39861 -> 0.39844, slice 300 at z = 6.3 2.1211 -> 2.1072 mK)."""
    lc = lightcone_slices({}, 64.0, 32, 5.0, 900, seed=0)
    before = {0: 0.0, 150: 0.0, 300: 2.107221, 450: 3.740924, 600: 10.072678, 750: 17.945629, 899: 20.216362}  # mK
    tb = lc.mean_brightness.astype(float)
    for i, value in before.items():
        assert abs(tb[i] - value) < 1e-5, (i, tb[i], value)
    assert abs(float(lc.brightness_temp.astype(float).sum()) - 7412606.858768241) < 1e-6 * 7412606.9
    assert abs(float(lc.x_HI.astype(float).mean()) - 0.3984390013149992) < 1e-7
    assert abs(float(lc.spin_temp.astype(float).mean()) - 1173.3724527704965) < 1e-4
