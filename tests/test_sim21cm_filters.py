"""The fast top-hat filtering of the 21cm model against its reference expressions."""

import numpy as np
import pytest

from cosmofm.data_cards.mocks.sim21cm.cosmology import tophat_window
from cosmofm.data_cards.mocks.sim21cm.density import k_magnitude, tophat_smoother, tophat_windows


@pytest.mark.parametrize("shape", [(7, 6, 5), (8, 9, 10), (12, 8, 8)])
def test_quarter_grid_window_is_the_full_grid_window(shape):
    windows = tophat_windows(shape, 1.5)
    kmag = k_magnitude(shape, 1.5)
    for radius in (0.93, 4.0, 15.0):
        np.testing.assert_array_equal(windows(radius), tophat_window(kmag * radius))  # bit for bit


def test_smoother_is_the_direct_filter():
    field = np.random.default_rng(0).standard_normal((24, 16, 16))
    kmag = k_magnitude(field.shape, 2.0)
    smooth = tophat_smoother(field, 2.0)
    for radius in (1.3, 5.0):
        direct = np.fft.irfftn(np.fft.rfftn(field) * tophat_window(kmag * radius), s=field.shape, axes=(0, 1, 2))
        assert np.abs(smooth(radius) - direct).max() < 1e-13
    # a wider top-hat averages more cells: the smoothed field's variance falls with R
    assert smooth(5.0).std() < smooth(1.3).std() < field.std()


@pytest.mark.parametrize("shape", [(40, 16, 16), (12, 12), (33,)])
def test_gaussian_field_is_the_direct_construction(shape):
    """gaussian_field's amplitudes come from `radial`: the field equals the one built on the full |k| grid, bit for bit."""
    from cosmofm.data_cards.mocks.sim21cm import SimParams, cosmology
    from cosmofm.data_cards.mocks.sim21cm.cosmology import L_FACTOR
    from cosmofm.data_cards.mocks.sim21cm.density import gaussian_field

    power = cosmology(SimParams()).power
    kmag = k_magnitude(shape, 2.0)
    amp = np.sqrt(power(kmag) / 2.0**3) * tophat_window(kmag * L_FACTOR * 2.0)
    amp.flat[0] = 0.0
    direct = np.fft.irfftn(np.fft.rfftn(np.random.default_rng(3).standard_normal(shape)) * amp, s=shape, axes=tuple(range(len(shape))))
    np.testing.assert_array_equal(gaussian_field(np.random.default_rng(3), shape, 2.0, power, cell_average=True), direct)
