"""Linear-theory cosmology for the 21cm model: P(k), sigma(R), D(z), distances, M_min(z), f_coll(z).

- Linear matter power spectrum P(k) = A k^n_s T(k)^2 with the Eisenstein & Hu (1998,
  ApJ 496, 605) no-wiggle transfer function (their eqs. 26-31), normalised to SIGMA_8
  with a real-space top-hat of radius 8/h Mpc.
- Warm dark matter (M_WDM > 0 keV), as 21cmFAST 1.x-3.x with P_CUTOFF, the simulator of
  Neutsch et al. (2022) and 21cmPIE-INN (Schosser et al. 2024): T(k) is multiplied by the
  Bode, Ostriker & Turok (2001, ApJ 556, 93, eq. A9) cut-off [1 + (0.361 k R_c)^2.4]^(-5/1.2),
  R_c = 0.201 (Omega_dm h^2 / 0.15)^0.15 (g_x / 1.5)^-0.29 (m / keV)^-1.15 Mpc, read in
  comoving Mpc as 21cmFAST's `init_ps` does (BOT01 write h^-1 Mpc; the Mpc reading is within
  ~20 % in k of the Viel et al. 2005 refit), g_x = 1.5. T^2 = 1/2 at k_hm = 1.00 / R_c. Set
  before the SIGMA_8 normalisation (at 8/h Mpc the cut-off changes sigma by < 1e-4), so
  sigma(M), f_coll, the excursion set, the heating and the Lyman-alpha background all see it.
  The minimum source mass is also raised to the WDM "Jeans" mass of Barkana, Haiman & Ostriker
  (2001, ApJ 558, 482, eq. 10) times 21cmFAST's fudge factor 60 (`wdm_jeans_mass`), as
  21cmFAST's ionisation box does with P_CUTOFF; here in `min_source_mass`, which the global
  collapsed fraction and the conditional EPS barriers of `reionization` and `spin` use.
- Growth factor D(z) (D(0) = 1) from the integral solution for matter + Lambda
  (Heath 1977): D(a) ~ H(a) int_0^a da' / (a' H(a'))^3. Radiation is left out of the
  growth (a < 0.4 % effect at z < 30).
- Comoving distances from astropy's E(z) (Planck 2018 radiation and neutrinos, as
  21cmFAST's `CosmoParams.cosmo`), integrated on a fine grid so that the inverse
  z(distance) is a table lookup; they agree with `astropy ... comoving_distance` to
  better than 1e-6.
- Minimum source halo mass from the virial temperature (Barkana & Loeb 2001, Phys. Rep.
  349, 125, eq. 26; mean molecular weight 0.6 above 1e4 K, 1.22 below, as 21cmFAST).
- Global collapsed fraction above M_min: Press-Schechter, erfc(nu / sqrt 2), or
  Sheth-Tormen with the Jenkins et al. (2001) parameters that 21cmFAST uses
  (A = 0.353, a = 0.73, p = 0.175).

Units: k in 1/Mpc, P in Mpc^3, R in comoving Mpc, M in Msun (no h), z dimensionless.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from astropy.cosmology import Planck18

from cosmofm.data_cards.mocks.sim21cm.params import COSMO_KEY, SimParams

DELTA_C = 1.686  # spherical-collapse threshold (21cmFAST's delta_c_sph)
RHO_CRIT_H2 = 2.775e11  # critical density today / h^2 in Msun / Mpc^3
NU21_HZ = 1420405751.768  # rest frequency of the 21cm line
ST_A, ST_a, ST_p = 0.353, 0.73, 0.175  # Sheth-Tormen, Jenkins et al. (2001) fit as in 21cmFAST
L_FACTOR = (4 * math.pi / 3) ** (-1 / 3)  # radius of the sphere with a unit cube's volume (0.620)
BODE_EPS, BODE_ETA, BODE_NU = 0.361, 5.0, 1.2  # Bode, Ostriker & Turok (2001) WDM transfer function, as 21cmFAST
G_X = 1.5  # WDM degrees of freedom (a fermionic thermal relic), 21cmFAST's g_x
WDM_JEANS_FUDGE = 60.0  # 21cmFAST's factor on Barkana, Haiman & Ostriker (2001) eq. 10


def wdm_cutoff_radius(m_wdm: float, omega_dm_h2: float) -> float:
    """Bode et al. (2001) eq. A9 cut-off radius R_c in comoving Mpc (21cmFAST's reading), m_wdm in keV."""
    return 0.201 * (omega_dm_h2 / 0.15) ** 0.15 * (G_X / 1.5) ** -0.29 * m_wdm**-1.15


def wdm_transfer(k: np.ndarray, m_wdm: float, omega_dm_h2: float) -> np.ndarray:
    """WDM / CDM transfer function T(k) = [1 + (eps k R_c)^(2 nu)]^(-eta/nu), k in 1/Mpc; 1 for m_wdm = 0 (CDM)."""
    k = np.asarray(k, dtype=float)
    if m_wdm == 0:
        return np.ones_like(k)
    x = BODE_EPS * k * wdm_cutoff_radius(m_wdm, omega_dm_h2)
    return (1 + x ** (2 * BODE_NU)) ** (-BODE_ETA / BODE_NU)


def half_mode_wavenumber(m_wdm: float, omega_dm_h2: float) -> float:
    """k_hm (1/Mpc) where the WDM power is half the CDM power, T(k_hm)^2 = 1/2."""
    x = (2 ** (BODE_NU / (2 * BODE_ETA)) - 1) ** (1 / (2 * BODE_NU))
    return x / (BODE_EPS * wdm_cutoff_radius(m_wdm, omega_dm_h2))


def wdm_jeans_mass(m_wdm: float, omega_dm_h2: float) -> float:
    """Effective WDM "Jeans" mass in Msun below which no source forms (BHO01 eq. 10 x 60, 21cmFAST's M_J_WDM); 0 for CDM."""
    if m_wdm == 0:
        return 0.0
    z_eq = 3600 * omega_dm_h2 / 0.15
    return WDM_JEANS_FUDGE * 3.06e8 * (1.5 / G_X) * math.sqrt(omega_dm_h2 / 0.15) * m_wdm**-4 * (z_eq / 3000) ** 1.5


def eisenstein_hu_nowiggle(k: np.ndarray, omega_m: float, omega_b: float, h: float, t_cmb: float = 2.7255) -> np.ndarray:
    """EH98 no-wiggle transfer function T(k), k in 1/Mpc (EH98 eqs. 26-31)."""
    theta = t_cmb / 2.7
    om_h2, ob_h2, fb = omega_m * h**2, omega_b * h**2, omega_b / omega_m
    s = 44.5 * np.log(9.83 / om_h2) / np.sqrt(1 + 10 * ob_h2**0.75)  # sound horizon, Mpc (eq. 26)
    alpha = 1 - 0.328 * np.log(431 * om_h2) * fb + 0.38 * np.log(22.3 * om_h2) * fb**2  # eq. 31
    gamma_eff = omega_m * h * (alpha + (1 - alpha) / (1 + (0.43 * k * s) ** 4))  # eq. 30
    q = k * theta**2 / (gamma_eff * h)  # eq. 28 (k / h in h/Mpc)
    l0 = np.log(2 * np.e + 1.8 * q)
    c0 = 14.2 + 731 / (1 + 62.5 * q)
    return l0 / (l0 + c0 * q**2)


def tophat_window(x: np.ndarray) -> np.ndarray:
    """Fourier transform of a real-space spherical top-hat, W(kR) = 3 (sin x - x cos x) / x^3."""
    x = np.asarray(x, dtype=float)
    # evaluated on the whole grid and then picked (no masked gathers: it runs once per filter radius on
    # quarter k grids of millions of points); in place, the same operations in the same order
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sin(x)
        out -= x * np.cos(x)
        out *= 3
        out /= x**3
    return np.where(x > 1e-3, out, 1 - x**2 / 10)  # series below 1e-3, avoids cancellation


class Cosmology:
    """Tables of one cosmology: build once per parameter set with `cosmology(params)`."""

    def __init__(self, params: SimParams):
        self.params = params
        p = params
        self.astropy = Planck18.clone(name=None, H0=100 * p.hlittle, Om0=p.OMm, Ob0=p.OMb)
        self.rho_m = p.OMm * RHO_CRIT_H2 * p.hlittle**2  # mean matter density today, Msun / Mpc^3
        self.omega_dm_h2 = (p.OMm - p.OMb) * p.hlittle**2  # sets the WDM cut-off and Jeans mass
        # P(k) on a log grid wide enough for sigma(R) from 1e-3 to 1e3 Mpc.
        self._lnk = np.linspace(np.log(1e-6), np.log(1e5), 3000)
        k = np.exp(self._lnk)
        raw = k**p.POWER_INDEX * self.transfer(k) ** 2
        self._amp = 1.0
        self._pk_raw = raw
        self._amp = p.SIGMA_8**2 / self._sigma2_raw(np.array([8.0 / p.hlittle]))[0]
        # sigma(R) table, log-log interpolated.
        self._lnr = np.linspace(np.log(1e-3), np.log(2e3), 200)
        self._lnsig2 = np.log(self._amp * self._sigma2_raw(np.exp(self._lnr)))
        # Growth factor on a grid in a = 1/(1+z), normalised to 1 today (matter + Lambda).
        a = np.linspace(1e-4, 1.0, 20001)
        e = np.sqrt(p.OMm / a**3 + (1 - p.OMm))
        integrand = 1 / (a * e) ** 3
        # int_0^a[0] in the matter era is (2/5) a^(5/2) / OMm^(3/2)
        start = 0.4 * a[0] ** 2.5 / p.OMm**1.5
        integral = start + np.concatenate([[0.0], np.cumsum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(a))])
        growth = 2.5 * p.OMm * e * integral
        self._a, self._growth = a, growth / growth[-1]
        # Comoving distance table from astropy's E(z).
        self._z = np.linspace(0.0, 40.0, 40001)
        inv_e = np.asarray(self.astropy.inv_efunc(self._z))
        dh = 299792.458 / (100 * p.hlittle)  # Hubble distance c / H0 in Mpc
        # Simpson-like accuracy via trapezoid on a 0.001 grid (error < 1e-7 relative).
        self._dc = dh * np.concatenate([[0.0], np.cumsum(0.5 * (inv_e[1:] + inv_e[:-1]) * np.diff(self._z))])
        self.hubble_distance = dh

    # --- power spectrum and variance -------------------------------------------------
    def transfer(self, k: np.ndarray) -> np.ndarray:
        """Matter transfer function: EH98 no-wiggle, times the WDM cut-off when M_WDM > 0 (CDM: EH98 exactly)."""
        p = self.params
        t = eisenstein_hu_nowiggle(k, p.OMm, p.OMb, p.hlittle)
        return t * wdm_transfer(k, p.M_WDM, self.omega_dm_h2) if p.M_WDM > 0 else t

    def _sigma2_raw(self, radius: np.ndarray) -> np.ndarray:
        k = np.exp(self._lnk)
        w = tophat_window(np.outer(radius, k))
        integrand = k**3 * self._pk_raw * w**2 / (2 * np.pi**2)
        return np.trapezoid(integrand, self._lnk, axis=1)

    def power(self, k, z: float = 0.0) -> np.ndarray:
        """Linear matter power spectrum P(k, z) in Mpc^3, k in 1/Mpc."""
        k = np.asarray(k, dtype=float)
        kk = np.where(k > 0, k, 1.0)
        p = self._amp * kk**self.params.POWER_INDEX * self.transfer(kk) ** 2
        return np.where(k > 0, p, 0.0) * self.growth(z) ** 2

    def sigma2_radius(self, radius) -> np.ndarray:
        """sigma^2 of the linear field today smoothed with a top-hat of comoving radius R (Mpc)."""
        return np.exp(np.interp(np.log(np.asarray(radius, dtype=float)), self._lnr, self._lnsig2))

    def mass_to_radius(self, mass) -> np.ndarray:
        return (3 * np.asarray(mass, dtype=float) / (4 * np.pi * self.rho_m)) ** (1 / 3)

    def radius_to_mass(self, radius) -> np.ndarray:
        return 4 * np.pi / 3 * self.rho_m * np.asarray(radius, dtype=float) ** 3

    def sigma2_mass(self, mass) -> np.ndarray:
        return self.sigma2_radius(self.mass_to_radius(mass))

    # --- growth and distances ----------------------------------------------------------
    def growth(self, z) -> np.ndarray:
        """Linear growth factor D(z), D(0) = 1."""
        a = 1 / (1 + np.asarray(z, dtype=float))
        return np.interp(a, self._a, self._growth)

    def growth_rate(self, z) -> np.ndarray:
        """Linear growth rate f = dln D / dln a (the Kaiser factor of redshift-space distortions)."""
        if not hasattr(self, "_f"):
            self._f = np.gradient(np.log(self._growth), np.log(self._a))
        a = 1 / (1 + np.asarray(z, dtype=float))
        return np.interp(a, self._a, self._f)

    def comoving_distance(self, z) -> np.ndarray:
        """Line-of-sight comoving distance in Mpc."""
        z = np.asarray(z, dtype=float)
        if np.any(z > self._z[-1]):
            raise ValueError(f"redshift above the table's {self._z[-1]}")
        return np.interp(z, self._z, self._dc)

    def redshift_at_distance(self, distance) -> np.ndarray:
        """Inverse of comoving_distance (linear interpolation in a 1e-3 table, error < 1e-6 in z)."""
        return np.interp(np.asarray(distance, dtype=float), self._dc, self._z)

    def hubble_parameter(self, z) -> np.ndarray:
        """H(z) in km/s/Mpc."""
        return 100 * self.params.hlittle * np.asarray(self.astropy.efunc(z))

    # --- sources ----------------------------------------------------------------------
    def virial_mass(self, z, log10_tvir: float) -> np.ndarray:
        """Halo mass (Msun) with virial temperature 10**log10_tvir K at z (Barkana & Loeb 2001, eq. 26)."""
        z = np.asarray(z, dtype=float)
        t = 10.0**log10_tvir
        mu = 1.22 if t < 9.99999e3 else 0.6
        om = self.params.OMm
        omz = om * (1 + z) ** 3 / (om * (1 + z) ** 3 + (1 - om))
        d = omz - 1
        delta_vir = 18 * np.pi**2 + 82 * d - 39 * d**2  # Bryan & Norman 1998
        return 7030.97 / self.params.hlittle * np.sqrt(omz / (om * delta_vir)) * (t / (mu * (1 + z))) ** 1.5

    def min_source_mass(self, z, log10_tvir: float) -> np.ndarray:
        """M_min(z) of sources (Msun): the virial mass, raised to the WDM Jeans mass when M_WDM > 0 (21cmFAST's P_CUTOFF)."""
        m_vir = self.virial_mass(z, log10_tvir)
        if self.params.M_WDM == 0:
            return m_vir
        return np.maximum(m_vir, wdm_jeans_mass(self.params.M_WDM, self.omega_dm_h2))

    def half_mode_mass(self) -> float:
        """WDM half-mode mass M_hm = 4 pi / 3 rho_m (pi / k_hm)^3 in Msun (Schneider et al. 2012); 0 for CDM."""
        if self.params.M_WDM == 0:
            return 0.0
        return float(self.radius_to_mass(np.pi / half_mode_wavenumber(self.params.M_WDM, self.omega_dm_h2)))

    def fcoll_global(self, z, log10_tvir: float, hmf: str = "ST") -> np.ndarray:
        """Mass fraction in haloes above M_min(z) (`min_source_mass`): Press-Schechter ("PS") or Sheth-Tormen ("ST")."""
        z = np.atleast_1d(np.asarray(z, dtype=float))
        return self.fcoll_above(z, self.min_source_mass(z, log10_tvir), hmf)

    def fcoll_above(self, z, mass, hmf: str = "ST") -> np.ndarray:
        """Mass fraction in haloes above `mass` (Msun, broadcast against z): Press-Schechter ("PS") or Sheth-Tormen ("ST")."""
        z, mass = np.broadcast_arrays(np.atleast_1d(np.asarray(z, dtype=float)), np.asarray(mass, dtype=float))
        sigma_min = np.sqrt(self.sigma2_mass(mass))
        nu = DELTA_C / (self.growth(z) * sigma_min)
        if hmf == "PS":
            return erfc(nu / np.sqrt(2))
        if hmf != "ST":
            raise ValueError(f"unknown hmf {hmf!r}")
        # F = int_{nu_hat_min}^inf A sqrt(2/pi) (1 + nu^-2p) exp(-nu^2/2) dnu, nu_hat = sqrt(a) delta_c / sigma.
        lo = np.sqrt(ST_a) * nu
        t = np.linspace(0.0, 1.0, 1201)[None, :]
        x = lo[:, None] + 14.0 * t  # the integrand is < 1e-40 past lo + 14
        f = ST_A * np.sqrt(2 / np.pi) * (1 + x ** (-2 * ST_p)) * np.exp(-(x**2) / 2)
        return np.trapezoid(f, x, axis=1)


@functools.lru_cache(maxsize=16)
def _cached(key: tuple) -> Cosmology:
    return Cosmology(SimParams(**dict(zip(COSMO_KEY, key))))


def cosmology(params: SimParams) -> Cosmology:
    """The (cached) tables for `params`' cosmology."""
    return _cached(params.cosmo_key)


def frequency_hz(z) -> np.ndarray:
    """Observed frequency of the 21cm line emitted at redshift z."""
    return NU21_HZ / (1 + np.asarray(z, dtype=float))


# --- erfc and its inverse without scipy --------------------------------------------------
def erfc(x) -> np.ndarray:
    """Complementary error function, fractional error < 1.2e-7 (Numerical Recipes `erfcc`)."""
    x = np.asarray(x, dtype=float)
    z = np.abs(x)
    t = 1 / (1 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    ans = t * np.exp(poly)
    return np.where(x >= 0, ans, 2 - ans)


def erfcinv(y) -> np.ndarray:
    """Inverse of erfc for y in (0, 2), by bisection on [-7, 7] (exact to ~1e-12)."""
    y = np.asarray(y, dtype=float)
    lo, hi = np.full(y.shape, -7.0), np.full(y.shape, 7.0)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        above = erfc(mid) > y  # erfc decreases: the root is to the right
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 0.5 * (lo + hi)
