"""Mock 21cm lightcone chunks (the spine's simple density + ionisation model)."""

from __future__ import annotations

import numpy as np

from cosmofm.data_cards.mock_common import C_KMS, object_rng, smooth_noise
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import FieldCard


def mock_field(card: FieldCard, seed: int, index: int) -> Sample:
    """A chunk of a 21cm lightcone: lognormal density, ionised where smoothed density is high.

    The global neutral fraction follows a tanh history whose midpoint moves to higher
    redshift with more efficient (HII_EFF_FACTOR) and smaller (ION_Tvir_MIN) sources.
    """
    rng = object_rng(seed, index, 3)
    n, nlos = card.n_cells, card.los_cells
    cell = card.box_size.to_value("Mpc") / n
    zeta = rng.uniform(10, 100)
    log_tvir = rng.uniform(4.0, 5.3)
    z_mid = 7.5 + 1.2 * np.log10(zeta / 30) - 1.5 * (log_tvir - 4.7)
    z_lo, z_hi = card.redshift_min, card.redshift_max
    z_start = rng.uniform(z_lo, z_hi)
    # Comoving distance ~ linear in z over a chunk: dD/dz = c / H(z), matter dominated.
    h0, om = 67.7, card.parameters.get("Omega_m", 0.31)
    dd_dz = C_KMS / (h0 * np.sqrt(om * (1 + z_start) ** 3))
    d0 = 2 * C_KMS / h0 / np.sqrt(om) * (1 - 1 / np.sqrt(1 + z_start))
    los = d0 + np.arange(nlos) * cell
    zlos = z_start + (los - d0) / dd_dz
    # Gaussian field with P(k) ~ k^-2 smoothed at 2 cells, then lognormal.
    delta_g = smooth_noise(rng, (nlos, n, n), (1.0, 1.0, 1.0)) * 0.6
    delta = np.exp(delta_g - 0.5 * 0.36) - 1
    xhi_mean = 0.5 * (1 + np.tanh((zlos - z_mid) / 0.7))
    xhi = np.empty_like(delta)
    for i, xm in enumerate(xhi_mean):
        # Ionise the densest cells first so that the slice's neutral fraction is xm.
        thresh = np.quantile(delta_g[i], xm) if 0 < xm < 1 else (np.inf if xm >= 1 else -np.inf)
        xhi[i] = (delta_g[i] <= thresh).astype(float)
    tb = 27.0 * xhi * (1 + delta) * np.sqrt((1 + zlos[:, None, None]) / 10)  # mK
    noise = rng.normal(0, card.noise_sigma, tb.shape)
    transverse = (np.arange(n) - (n - 1) / 2) * cell
    return Sample(
        "field", tb + noise, np.full(tb.shape, 1 / card.noise_sigma**2),
        {"los_distance": los, "y_comoving": transverse, "x_comoving": transverse},
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "labels": {"HII_EFF_FACTOR": float(zeta), "ION_Tvir_MIN": float(log_tvir), "z_start": float(z_start), "xHI_mean": float(xhi.mean())}},
    )
