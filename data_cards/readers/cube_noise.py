"""Noise that varies across the field of a spectral cube (primary-beam corrected cubes).

A cube corrected for the primary beam has noise rising as 1 / PB away from the pointing
centre(s): twice the centre's where the beam response is half. A finder that scales the
noise per channel only (SoFiA-2's default, `SurveyCube.noise`) then sees the noisy parts as
full of significant emission. SoFiA-2's answer is local noise scaling (`scaleNoise.mode =
local`): divide the cube by its local noise. Here the spatial part is measured once, as a
coarse grid of robust rms values (`measure_noise_pattern`), assumed the same in every
channel up to the channel's own noise level (a primary beam changes little over a band):

    sigma(c, y, x) = noise_c x pattern(y, x),   pattern's median over the field = 1.

`SurveyCube.read` divides the values by the pattern when one is set (`SurveyCube.noise_pattern`),
so a finder sees a cube of uniform noise per channel, as the head was trained on; the
fluxes it measures are multiplied back by the pattern at each source (`NoisePattern.at`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

PATTERN_CELLS = 16  # grid cells per side (fewer for small cubes: at least MIN_CELL_PIXELS each)
MIN_CELL_PIXELS = 8
PATTERN_CHANNELS = 64  # channels sampled (evenly) to measure it
SPREAD_TO_APPLY = 1.2  # `detect_cube(noise="auto")` scales locally above this p90 / p10 ratio of the cells


@dataclass(frozen=True)
class NoisePattern:
    """The relative noise on a coarse grid: `cells` (gy, gx), median 1, over a field of `shape` (H, W)."""

    cells: np.ndarray
    shape: tuple[int, int]

    @property
    def spread(self) -> float:
        """p90 / p10 of the cells: ~1 for uniform noise, ~2 for a cube out to half power."""
        finite = self.cells[np.isfinite(self.cells)]
        return float(np.percentile(finite, 90) / np.percentile(finite, 10)) if finite.size else 1.0

    def _weights(self, k: int, pixels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Linear interpolation between the cell centres of axis k at `pixels`: (lower cell,
        upper cell, weight of the upper); flat beyond the outer centres."""
        n, cells = self.shape[k], self.cells.shape[k]
        pos = np.clip((np.asarray(pixels, np.float64) + 0.5) * cells / n - 0.5, 0.0, cells - 1.0)  # in cell-centre units
        lo = np.minimum(np.floor(pos).astype(int), cells - 1)
        hi = np.minimum(lo + 1, cells - 1)
        return lo, hi, pos - lo

    def region(self, rows: slice, cols: slice) -> np.ndarray:
        """float32 (h, w) pattern over a region of the field (bilinear between cell centres)."""
        y0, y1, ty = self._weights(0, np.arange(*rows.indices(self.shape[0])))
        x0, x1, tx = self._weights(1, np.arange(*cols.indices(self.shape[1])))
        along_x = self.cells[:, x0] * (1 - tx) + self.cells[:, x1] * tx  # (gy, w)
        return (along_x[y0] * (1 - ty)[:, None] + along_x[y1] * ty[:, None]).astype(np.float32)

    def at(self, rows, cols) -> np.ndarray:
        """The pattern at (fractional) pixel positions, e.g. a catalogue's ROW and COL."""
        y0, y1, ty = self._weights(0, rows)
        x0, x1, tx = self._weights(1, cols)
        c = self.cells
        return (c[y0, x0] * (1 - ty) * (1 - tx) + c[y0, x1] * (1 - ty) * tx + c[y1, x0] * ty * (1 - tx) + c[y1, x1] * ty * tx)


def measure_noise_pattern(cube, cells: int = PATTERN_CELLS, channels: int = PATTERN_CHANNELS) -> NoisePattern:
    """The spatial noise pattern of a `SurveyCube`: on `channels` evenly spaced channels, each
    divided by its own noise (`cube.noise`), 1.4826 x median |x| in each cell of a grid of at
    most `cells` per side (blank voxels left out; sources hardly move a median), normalised to
    a median of 1 over the cells. Reads the cube's values before any pattern is applied."""
    c, h, w = cube.shape
    gy, gx = (max(1, min(cells, n // MIN_CELL_PIXELS)) for n in (h, w))
    noise = cube.noise
    usable = np.flatnonzero(np.isfinite(noise) & (noise > 0))
    if usable.size == 0:
        return NoisePattern(np.ones((gy, gx)), (h, w))
    picked = usable[np.unique(np.linspace(0, usable.size - 1, min(channels, usable.size)).round().astype(int))]
    step = max(1, math.ceil(math.sqrt(h * w / 262144)))  # at most ~260,000 pixels of each channel
    planes = np.stack([np.abs(cube._raw((slice(ch, ch + 1), slice(0, h), slice(0, w)))[0, ::step, ::step]) / noise[ch] for ch in picked])
    cell_y, cell_x = np.arange(0, h, step) * gy // h, np.arange(0, w, step) * gx // w  # the cell of each sampled row / column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-blank cell: NaN, filled below
        grid = np.array([[1.4826 * np.nanmedian(planes[:, cell_y == i][:, :, cell_x == j]) for j in range(gx)] for i in range(gy)])
    if not np.isfinite(grid).any():
        return NoisePattern(np.ones((gy, gx)), (h, w))
    grid = np.where(np.isfinite(grid) & (grid > 0), grid, np.nanmedian(grid))
    return NoisePattern(grid / np.median(grid), (h, w))


__all__ = ["NoisePattern", "SPREAD_TO_APPLY", "measure_noise_pattern"]
