"""Mock HI spectral-cube chunks (the spine's simple SDC2-like sources)."""

from __future__ import annotations

import numpy as np

from cosmofm.data_cards.mock_common import C_KMS, object_rng, smooth_noise
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard


def mock_cube(card: CubeCard, seed: int, index: int) -> Sample:
    """An HI source in a chunk of an SKA-like cube: rotating disk, beam-convolved, correlated noise."""
    rng = object_rng(seed, index, 2)
    nf, n = card.n_channels, card.spatial_size
    dnu = card.channel_width.to_value("Hz")
    nu0 = card.frequency_start.to_value("Hz") + rng.integers(0, 6000) * dnu
    freq = nu0 + np.arange(nf) * dnu
    scale, beam = card.pixel_scale.to_value("arcsec"), card.beam_fwhm.to_value("arcsec") / 2.3548
    offsets = (np.arange(n) - (n - 1) / 2) * scale
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    # HI mass -> size (Wang et al. 2016: log D_HI = 0.506 log M_HI - 3.293 kpc) and flux.
    log_mhi = rng.uniform(9.5, 11.0)
    z = card.rest_frequency.to_value("Hz") / freq[nf // 2] - 1
    d_mpc = C_KMS * z / 70.0
    size_kpc = 10 ** (0.506 * log_mhi - 3.293) / 2
    size_arcsec = size_kpc / (d_mpc * 1e3) * 206265
    incl, pa = np.arccos(rng.uniform(0.1, 1)), rng.uniform(0, np.pi)
    xr, yr = x * np.cos(pa) + y * np.sin(pa), -x * np.sin(pa) + y * np.cos(pa)
    sx2, sy2 = size_arcsec**2 / 4 + beam**2, (np.cos(incl) * size_arcsec / 2) ** 2 + beam**2
    sky = np.exp(-0.5 * (xr**2 / sx2 + yr**2 / sy2))
    sky /= sky.sum()
    # Double-horn profile: two Gaussians at +-v_rot sin(i) (Tully-Fisher-like v_rot from mass).
    vrot = 10 ** (0.3 * (log_mhi - 10) + 2.2) * np.sin(incl)
    centre = freq[nf // 2] + rng.uniform(-5, 5) * dnu
    dv_hz = centre * vrot / C_KMS
    horn = sum(np.exp(-0.5 * ((freq - centre - s * dv_hz) / max(dv_hz / 3, dnu)) ** 2) for s in (-1, 1))
    horn /= horn.sum() * dnu
    # Integrated flux S = M_HI / (2.356e5 D^2) Jy km/s (Meyer et al. 2017), to Jy Hz.
    s_jykms = 10**log_mhi / (2.356e5 * d_mpc**2)
    s_jyhz = s_jykms * centre / C_KMS
    beam_area_pix = 2 * np.pi * beam**2 / scale**2
    signal = s_jyhz * horn[:, None, None] * sky[None] * beam_area_pix  # Jy/beam
    noise = smooth_noise(rng, (nf, n, n), (0.5, beam / scale, beam / scale)) * card.noise_per_channel
    ivar = np.full(signal.shape, 1 / card.noise_per_channel**2)
    return Sample(
        "cube", signal + noise, ivar, {"frequency": freq, "dec_offset": offsets, "ra_offset": offsets},
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "labels": {"hi_flux": float(s_jyhz), "log_mhi": float(log_mhi)}},
    )
