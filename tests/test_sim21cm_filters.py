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
