"""What the mock generators share: per-object random streams, constants, noise fields.

Every generator is deterministic given (seed, index): `object_rng(seed, index, stream)`
gives independent streams for an object's physics, its noise, its shape, ... so any
sample can be regenerated alone and generation can run in parallel.
"""

from __future__ import annotations

import numpy as np
from astropy import constants as const

C_KMS = const.c.to_value("km/s")
C_ANGSTROM_S = const.c.to_value("Angstrom/s")


def object_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def smooth_noise(rng, shape, sigma_pix) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed by a Gaussian of sigma_pix per axis (via FFT)."""
    white = rng.normal(size=shape)
    k = np.meshgrid(*[np.fft.fftfreq(s) for s in shape], indexing="ij")
    kernel = np.exp(-2 * np.pi**2 * sum((ki * si) ** 2 for ki, si in zip(k, sigma_pix)))
    field = np.fft.ifftn(np.fft.fftn(white) * kernel).real
    return field / field.std()
