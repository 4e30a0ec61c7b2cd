"""Luminosity functions of the mock universe, seen through a magnitude-limited window.

A survey that targets every object with 16.5 <= r <= 20.5 (`SURVEY_WINDOW`, the window
of the spectrum and image mocks) sees galaxies and quasars with the joint distribution

    dN / dz dM  =  dV/dz(z) phi(M, z)      where  16.5 <= M + DM(z) + K(z) <= 20.5,

with phi the class's luminosity function, DM the Planck18 distance modulus and K the
K-correction of each object's own SED from the LF's band to the observed r band
(`mock_spectra.mock_object` computes it from the spectrum model). `draw_in_window`
samples (z, M) from it exactly, without rejection: z from its marginal (tabulated over
the class's redshift range), then M from phi(M, z) truncated to the window at that z.
Brightness, and through the size-luminosity relation size, then carry the redshift
information they carry on the sky: bright objects are mostly near, faint ones far. With
the sky's red / blue mix (their phi*) and the mock SEDs' K-corrections, the galaxy LFs
below give a median z of 0.100 at r < 17.77 and 0.197 at r < 19.8, where SDSS's main
sample has 0.10 (Strauss et al. 2002, AJ 124, 1810) and GAMA 0.2 (Baldry et al. 2010,
MNRAS 404, 86).

The luminosity functions (magnitudes AB, as published for h = 0.7; distances are
Planck18's, whose 5 log10(h / 0.7) = -0.07 mag offset is well inside the M* errors):
- Galaxies: Schechter functions in rest-frame B (speclite bessell-B) for red and blue
  galaxies, with linear luminosity and exponential density evolution, from the forward
  model of Herbel et al. 2017 (JCAP 08, 035), as SkyPy ships them (its SDSS photometry
  example reproduces SDSS r-band counts with them):
  red   M*(z) = -20.372 - 0.708 z, phi*(z) = 3.51e-3 exp(-0.706 z) Mpc^-3, alpha = -0.5;
  blue  M*(z) = -20.405 - 0.941 z, phi*(z) = 3.70e-3 exp(-0.103 z) Mpc^-3, alpha = -1.3.
  Red galaxies are half as many per volume at z = 1 as today, as Faber et al. 2007 (ApJ
  665, 265) found. Passive galaxies use the red LF, star-forming and starburst galaxies
  the blue one, Seyfert hosts the red one (massive, bulge-dominated early spirals,
  Kauffmann et al. 2003, MNRAS 346, 1055, not the dwarfs of the blue faint end).
- Quasars: the double power law with pure luminosity evolution of Palanque-Delabrouille
  et al. 2016 (A&A 587, A41, Table 4 "PLE", eq. 7), in M_g(z=2) (g band K-corrected to
  z = 2, as Richards et al. 2006): M*(2.2) = -26.71, log10 phi* = -6.01 Mpc^-3 mag^-1;
  z <= 2.2: alpha = -4.31, beta = -1.54, k1 = -0.08, k2 = -0.40; z > 2.2: alpha = -3.04,
  beta = -1.38, k1 = -0.25, k2 = -0.05. Fitted over 0.68 < z < 4; the mocks' QSOs start
  at z = 0.3, where the PLE form is extrapolated (M* = -23.5 at z = 0.3).
Only each class's redshift-magnitude distribution matters here: class fractions are set
by the generator (balanced classes), not by phi*.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cosmofm.data_cards.mocks.common import distance_tables

SURVEY_WINDOW = (16.5, 20.5)  # apparent r (AB) of every object the spectrum and image mocks show
_D = np.arange(-10.0, 16.0, 0.005)  # M - M* [mag]: grid of the cumulative tables


def _cumulative_table(phi: np.ndarray) -> np.ndarray:
    """int_{-inf}^{d} phi dM on _D (trapezoid; the integral brighter than _D[0] is negligible)."""
    return np.concatenate([[0.0], np.cumsum(0.5 * (phi[1:] + phi[:-1]) * np.diff(_D))])


@dataclass(frozen=True)
class Schechter:
    """phi(M, z) = 0.4 ln(10) phi*(z) x^(alpha + 1) exp(-x), x = 10^(-0.4 (M - M*(z))), with
    M*(z) = m_star + m_star_slope z and phi*(z) = phi_star exp(phi_star_exp z)."""

    key: str  # name of the absolute magnitude, e.g. "M_B"
    band: str  # speclite filter
    band_z: float  # the band is K-corrected to this redshift (0: rest frame)
    alpha: float
    m_star: float  # AB mag
    m_star_slope: float  # mag per unit z
    phi_star: float  # Mpc^-3
    phi_star_exp: float  # per unit z

    def characteristic(self, z):
        return self.m_star + self.m_star_slope * np.asarray(z)

    def density(self, z):
        return self.phi_star * np.exp(self.phi_star_exp * np.asarray(z))

    @functools.cached_property
    def _table(self) -> np.ndarray:
        x = 10 ** (-0.4 * _D)
        return _cumulative_table(0.4 * np.log(10) * x ** (self.alpha + 1) * np.exp(-x))

    def cumulative(self, d, z):
        """int phi / phi* dM over M < M*(z) + d."""
        return np.interp(d, _D, self._table)

    def inverse_cumulative(self, g: float, z: float) -> float:
        return float(np.interp(g, self._table, _D))


@dataclass(frozen=True)
class DoublePowerLaw:
    """phi(M, z) = phi* / (10^(0.4 (alpha + 1) d) + 10^(0.4 (beta + 1) d)), d = M - M*(z), with
    M*(z) = m_star - 2.5 (k1 (z - z_pivot) + k2 (z - z_pivot)^2); (alpha, beta, k1, k2) are
    `low` at z <= z_pivot and `high` above."""

    key: str
    band: str
    band_z: float
    m_star: float  # M* at z_pivot, AB mag
    log_phi_star: float  # log10 Mpc^-3 mag^-1
    z_pivot: float
    low: tuple[float, float, float, float]  # alpha, beta, k1, k2
    high: tuple[float, float, float, float]

    def characteristic(self, z):
        z = np.asarray(z)
        k1 = np.where(z <= self.z_pivot, self.low[2], self.high[2])
        k2 = np.where(z <= self.z_pivot, self.low[3], self.high[3])
        dz = z - self.z_pivot
        return self.m_star - 2.5 * (k1 * dz + k2 * dz**2)

    def density(self, z):
        return np.full(np.shape(z), 10.0**self.log_phi_star)

    @functools.cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(_cumulative_table(1 / (10 ** (0.4 * (a + 1) * _D) + 10 ** (0.4 * (b + 1) * _D))) for a, b, *_ in (self.low, self.high))

    def cumulative(self, d, z):
        low, high = self._tables
        return np.where(np.asarray(z) <= self.z_pivot, np.interp(d, _D, low), np.interp(d, _D, high))

    def inverse_cumulative(self, g: float, z: float) -> float:
        return float(np.interp(g, self._tables[0] if z <= self.z_pivot else self._tables[1], _D))


LuminosityFunction = Schechter | DoublePowerLaw

RED = Schechter("M_B", "bessell-B", 0.0, -0.5, -20.37196157, -0.70798041, 0.0035097, -0.70596888)
BLUE = Schechter("M_B", "bessell-B", 0.0, -1.3, -20.40492365, -0.9408582, 0.00370253, -0.10268436)
QSO_PLE = DoublePowerLaw("M_g(z=2)", "sdss2010-g", 2.0, -26.71, -6.01, 2.2, (-4.31, -1.54, -0.08, -0.40), (-3.04, -1.38, -0.25, -0.05))
CLASS_LF: dict[str, LuminosityFunction] = {
    "GALAXY": RED, "GALAXY_AGN": RED, "GALAXY_STARFORMING": BLUE, "GALAXY_STARBURST": BLUE,
    "QSO": QSO_PLE, "QSO_BROADLINE": QSO_PLE,
}


def _window_bounds(lf: LuminosityFunction, z, k_correction, window):
    """d = M - M*(z) at the window's bright and faint ends, at redshifts z."""
    t = distance_tables()
    base = np.interp(z, t.z, t.distmod) + k_correction(z) + lf.characteristic(z)
    return window[0] - base, window[1] - base


def redshift_density(lf: LuminosityFunction, z: np.ndarray, k_correction: Callable[[np.ndarray], np.ndarray],
                     window: tuple[float, float] = SURVEY_WINDOW) -> np.ndarray:
    """dN/dz per steradian at redshifts z of the objects of `lf` whose apparent
    m = M + DM(z) + k_correction(z) lies in `window`: dV/dz phi*(z) int phi dM over the window."""
    lo, hi = _window_bounds(lf, z, k_correction, window)
    t = distance_tables()
    return np.interp(z, t.z, t.dvdz) * lf.density(z) * (lf.cumulative(hi, z) - lf.cumulative(lo, z))


def draw_in_window(lf: LuminosityFunction, z_grid: np.ndarray, k_correction: Callable[[np.ndarray], np.ndarray],
                   rng: np.random.Generator, window: tuple[float, float] = SURVEY_WINDOW) -> tuple[float, float, float]:
    """(z, M, m): one object from dV/dz phi(M, z) over z_grid's range, among those whose
    apparent m = M + DM(z) + k_correction(z) lies in `window`.

    The marginal of z is `redshift_density` on z_grid (piecewise-linear CDF); M is then
    exact: phi(M, z) truncated to the window at the drawn z, so m is inside it by
    construction. Uses two uniforms of `rng`.
    """
    weight = redshift_density(lf, z_grid, k_correction, window)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (weight[1:] + weight[:-1]) * np.diff(z_grid))])
    assert cdf[-1] > 0, f"no object of this luminosity function has {window[0]} <= r <= {window[1]} at {z_grid[0]} <= z <= {z_grid[-1]}"
    u_z, u_m = rng.random(2)
    z = float(np.interp(u_z * cdf[-1], cdf, z_grid))
    lo, hi = (float(v[0]) for v in _window_bounds(lf, np.array([z]), k_correction, window))
    g_lo, g_hi = float(lf.cumulative(lo, z)), float(lf.cumulative(hi, z))
    d = min(max(lf.inverse_cumulative(g_lo + u_m * (g_hi - g_lo), z), lo), hi)
    return z, float(lf.characteristic(z)) + d, window[0] + (d - lo)
