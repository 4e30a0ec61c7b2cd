"""What the mock generators share: per-object random streams, constants, noise fields,
filter-curve weights and distance tables.

Every generator is deterministic given (seed, index): `object_rng(seed, index, stream)`
gives independent streams for an object's physics, its noise, its shape, ... so any
sample can be regenerated alone and generation can run in parallel.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from astropy import constants as const

C_KMS = const.c.to_value("km/s")
C_ANGSTROM_S = const.c.to_value("Angstrom/s")
NJY_AB_ZP = 2.5 * math.log10(3631e9)  # 31.4: AB magnitude of 1 nJy
ARCSEC_PER_RAD = 180 / math.pi * 3600
SED_DLOGLAM = 5e-4  # step in ln(lambda) of the grid band integrals use: 3 per line sigma at R = 500


def object_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def smooth_noise(rng, shape, sigma_pix) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed by a Gaussian of sigma_pix per axis (via FFT)."""
    white = rng.normal(size=shape)
    k = np.meshgrid(*[np.fft.fftfreq(s) for s in shape], indexing="ij")
    kernel = np.exp(-2 * np.pi**2 * sum((ki * si) ** 2 for ki, si in zip(k, sigma_pix)))
    field = np.fft.ifftn(np.fft.fftn(white) * kernel).real
    return field / field.std()


@functools.lru_cache(maxsize=64)
def filter_weights(filters: tuple[str | None, ...], wavelengths: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(wave [A], W (B, L)) so that band f_nu = W @ f_nu(wave): photon-counting AB
    average, <f_nu> = int f_nu R dlambda/lambda / int R dlambda/lambda.

    `filters` are speclite filter names; None is a +-10 % top hat around the matching
    entry of `wavelengths` [A] (a plain mean of f_nu over lambda, as `band_fluxes_njy`).
    """
    import speclite.filters

    curves = []
    for name, lam in zip(filters, wavelengths or (None,) * len(filters)):
        if name is None:
            curves.append((np.array([0.9 * lam, 1.1 * lam]), None))
        else:
            f = speclite.filters.load_filter(name)
            keep = f.response > 1e-3 * f.response.max()
            curves.append((np.asarray(f.wavelength[keep], float), (np.asarray(f.wavelength, float), np.asarray(f.response, float))))
    lo = min(c[0].min() for c in curves)
    hi = max(c[0].max() for c in curves)
    wave = np.exp(np.arange(np.log(lo), np.log(hi) + SED_DLOGLAM, SED_DLOGLAM))
    dlam = np.gradient(wave)
    weights = np.zeros((len(curves), wave.size))
    for b, (span, curve) in enumerate(curves):
        if curve is None:
            weights[b] = ((wave >= span[0]) & (wave <= span[1])) * dlam
        else:
            weights[b] = np.interp(wave, *curve, left=0.0, right=0.0) / wave * dlam
        weights[b] /= weights[b].sum()
    return wave, weights


class DistanceTables(NamedTuple):
    """Planck18 distances on a redshift grid (interpolate with np.interp)."""

    z: np.ndarray
    distmod: np.ndarray  # mag
    kpc_per_arcsec: np.ndarray  # proper (angular-diameter) scale
    dvdz: np.ndarray  # comoving volume per unit redshift and steradian [Mpc^3 / sr]


@functools.lru_cache(maxsize=1)
def distance_tables() -> DistanceTables:
    from astropy.cosmology import Planck18

    z = np.concatenate([np.geomspace(1e-4, 0.01, 50, endpoint=False), np.linspace(0.01, 6.0, 1200)])
    return DistanceTables(
        z, Planck18.distmod(z).value, Planck18.angular_diameter_distance(z).to_value("kpc") / ARCSEC_PER_RAD,
        Planck18.differential_comoving_volume(z).to_value("Mpc3 / sr"),
    )
