"""Mock multi-band image stamps (the spine's simple bulge + disk Gaussians).

Stamps show the same objects as the spectra of the same (seed, index): band fluxes
are integrated from the object's noiseless spectrum.
"""

from __future__ import annotations

import numpy as np

from cosmofm.data_cards.mock_common import object_rng
from cosmofm.data_cards.mock_spectra import band_fluxes_njy, mock_object
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import ImageCard


def mock_image(card: ImageCard, seed: int, index: int) -> Sample:
    """A stamp of the same object as `mock_spectrum(seed, index)` (bulge + disk Gaussians)."""
    obj, norm = mock_object(seed, index)
    kind, z = obj.cls, obj.z
    rng = object_rng(seed, index, 5)
    bands = np.array([b.wavelength.to_value("Angstrom") for b in card.bands])
    fluxes = band_fluxes_njy(obj, norm, bands)
    shape_rng = object_rng(seed, index, 1)
    n, scale = card.stamp_size, card.pixel_scale.to_value("arcsec")
    offsets = (np.arange(n) - (n - 1) / 2) * scale
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    # Point sources for stars and QSOs, extended bulge + disk for galaxies.
    size = shape_rng.lognormal(np.log(0.8 / (1 + 2 * z)), 0.3) if kind.startswith("GALAXY") else 0.0  # arcsec
    q, pa = shape_rng.uniform(0.3, 1.0), shape_rng.uniform(0, np.pi)
    bulge_frac = shape_rng.uniform(0, 1)
    xr = x * np.cos(pa) + y * np.sin(pa)
    yr = -x * np.sin(pa) + y * np.cos(pa)
    values = np.empty((len(bands), n, n))
    sigma = np.empty(len(bands))
    for b, band in enumerate(card.bands):
        psf = band.psf_fwhm.to_value("arcsec") / 2.3548
        image = np.zeros((n, n))
        for frac, r in ((bulge_frac, 0.4 * size), (1 - bulge_frac, size)):
            sx2, sy2 = r**2 + psf**2, (q * r) ** 2 + psf**2  # Gaussian profile convolved with a Gaussian PSF
            image += frac * np.exp(-0.5 * (xr**2 / sx2 + yr**2 / sy2)) / (2 * np.pi * np.sqrt(sx2 * sy2))
        sigma[b] = band.sky_noise
        values[b] = fluxes[b] * image * scale**2 + rng.normal(0, band.sky_noise, (n, n))
    ivar = np.broadcast_to((1 / sigma**2)[:, None, None], values.shape).copy()
    return Sample(
        "image", values, ivar, {"band_wavelength": bands, "dec_offset": offsets, "ra_offset": offsets},
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "pair_id": f"obj-{seed}-{index}", "labels": {"redshift": z, "spectral_class": kind}},
    )
