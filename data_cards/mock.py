"""Mock generators, one per modality, driven by a data card.

Spectra come from the physically parametrised 13-class model in mock_spectra.py; the
image, cube and field generators are still the spine's simple ones. Every generator is deterministic
given (seed, index), so any sample can be regenerated alone and generation can run
in parallel. Spectra and images of the same galaxy share `meta["pair_id"]` and their
image band fluxes are integrated from the noiseless spectrum, so the cross-modal
alignment objective has real shared information to learn.
"""

from __future__ import annotations

import numpy as np
from astropy import constants as const

from cosmofm.data_cards.mock_spectra import ObjectParams, draw_object, observe, rest_model
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard, DataCard, FieldCard, ImageCard, SpectrumCard

C_KMS = const.c.to_value("km/s")
C_ANGSTROM_S = const.c.to_value("Angstrom/s")
R_BAND = 6231.0  # Angstrom: objects are normalised to an r-band AB magnitude here


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def wavelength_grid(card: SpectrumCard) -> np.ndarray:
    """The card's pixel centres in Angstrom (vacuum)."""
    lo, hi = card.wavelength_min.to_value("Angstrom"), card.wavelength_max.to_value("Angstrom")
    if card.sampling == "log":
        return np.logspace(np.log10(lo), np.log10(hi), card.n_pixels)
    return np.linspace(lo, hi, card.n_pixels)


def mock_object(seed: int, index: int) -> tuple[ObjectParams, float]:
    """Object (seed, index): its class and physics, and the factor that turns its model
    spectrum into f_lambda [1e-17 erg/s/cm^2/A] for an r-band AB magnitude of 16.5-20.5.

    Spectra and images of the same (seed, index) call this, so they show one object.
    """
    rng = _rng(seed, index, 0)
    obj = draw_object(rng)
    r_mag = rng.uniform(16.5, 20.5)
    f_lambda = 3631e-23 * 10 ** (-0.4 * r_mag) * C_ANGSTROM_S / R_BAND**2 * 1e17
    ref = np.linspace(R_BAND * 0.93, R_BAND * 1.07, 400)
    return obj, f_lambda / max(float(np.mean(rest_model(obj, ref, 2000.0))), 1e-30)


def mock_spectrum(card: SpectrumCard, seed: int, index: int) -> Sample:
    """A spectrum of object (seed, index) through the card's spectrograph (mock_spectra.observe)."""
    obj, norm = mock_object(seed, index)
    wave = wavelength_grid(card)
    flux, ivar, _, and_mask = observe(obj, wave, card.resolving_power, card.typical_snr, _rng(seed, index, 4))
    truth = {"params": {k: float(v) for k, v in obj.params.items()}, "line_fluxes": {k: v * norm for k, v in obj.lines.items()}}
    return Sample(
        "spectrum", flux * norm, ivar / norm**2, {"wavelength": wave},
        {
            "card": card.name, "id": f"{card.name}-{seed}-{index}", "pair_id": f"obj-{seed}-{index}",
            "labels": {"spectral_class": obj.cls, "redshift": obj.z}, "and_mask_bits": int(np.bitwise_or.reduce(and_mask)), "truth": truth,
        },
    )


def band_fluxes_njy(obj: ObjectParams, norm: float, band_wavelengths: np.ndarray) -> np.ndarray:
    """Band fluxes [nJy] of an object from its noiseless spectrum.

    Bands are approximated as top hats of +-10 % around the effective wavelength.
    """
    wave = np.linspace(band_wavelengths.min() * 0.85, band_wavelengths.max() * 1.15, 4000)
    f_lambda = rest_model(obj, wave, 2000.0) * norm * 1e-17  # erg/s/cm^2/A
    f_nu_njy = f_lambda * wave**2 / C_ANGSTROM_S * 1e23 * 1e9
    return np.array([f_nu_njy[np.abs(wave / lam - 1) < 0.1].mean() for lam in band_wavelengths])


def mock_image(card: ImageCard, seed: int, index: int) -> Sample:
    """A stamp of the same object as `mock_spectrum(seed, index)` (bulge + disk Gaussians)."""
    obj, norm = mock_object(seed, index)
    kind, z = obj.cls, obj.z
    rng = _rng(seed, index, 5)
    bands = np.array([b.wavelength.to_value("Angstrom") for b in card.bands])
    fluxes = band_fluxes_njy(obj, norm, bands)
    shape_rng = _rng(seed, index, 1)
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


def _smooth_noise(rng, shape, sigma_pix) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed by a Gaussian of sigma_pix per axis (via FFT)."""
    white = rng.normal(size=shape)
    k = np.meshgrid(*[np.fft.fftfreq(s) for s in shape], indexing="ij")
    kernel = np.exp(-2 * np.pi**2 * sum((ki * si) ** 2 for ki, si in zip(k, sigma_pix)))
    field = np.fft.ifftn(np.fft.fftn(white) * kernel).real
    return field / field.std()


def mock_cube(card: CubeCard, seed: int, index: int) -> Sample:
    """An HI source in a chunk of an SKA-like cube: rotating disk, beam-convolved, correlated noise."""
    rng = _rng(seed, index, 2)
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
    noise = _smooth_noise(rng, (nf, n, n), (0.5, beam / scale, beam / scale)) * card.noise_per_channel
    ivar = np.full(signal.shape, 1 / card.noise_per_channel**2)
    return Sample(
        "cube", signal + noise, ivar, {"frequency": freq, "dec_offset": offsets, "ra_offset": offsets},
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "labels": {"hi_flux": float(s_jyhz), "log_mhi": float(log_mhi)}},
    )


def mock_field(card: FieldCard, seed: int, index: int) -> Sample:
    """A chunk of a 21cm lightcone: lognormal density, ionised where smoothed density is high.

    The global neutral fraction follows a tanh history whose midpoint moves to higher
    redshift with more efficient (HII_EFF_FACTOR) and smaller (ION_Tvir_MIN) sources.
    """
    rng = _rng(seed, index, 3)
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
    delta_g = _smooth_noise(rng, (nlos, n, n), (1.0, 1.0, 1.0)) * 0.6
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


GENERATORS = {SpectrumCard: mock_spectrum, ImageCard: mock_image, CubeCard: mock_cube, FieldCard: mock_field}


def mock_samples(card: DataCard, n: int, seed: int = 0, start: int = 0) -> list[Sample]:
    """`n` samples of `card`'s modality; indices start..start+n-1 (same index = same object)."""
    generate = GENERATORS[type(card)]
    return [generate(card, seed, i) for i in range(start, start + n)]
