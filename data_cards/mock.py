"""Small built-in mock generators, one per modality, driven by a data card.

These are the spine's embedded default data: physically motivated but simple
(the realistic simulators are a separate module). Every generator is deterministic
given (seed, index), so any sample can be regenerated alone and generation can run
in parallel. Spectra and images of the same galaxy share `meta["pair_id"]` and their
image band fluxes are integrated from the noiseless spectrum, so the cross-modal
alignment objective has real shared information to learn.
"""

from __future__ import annotations

import numpy as np
from astropy import constants as const

from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard, DataCard, FieldCard, ImageCard, SpectrumCard

C_KMS = const.c.to_value("km/s")
C_ANGSTROM_S = const.c.to_value("Angstrom/s")

# Rest-frame vacuum wavelengths [Angstrom] (SDSS line list).
EMISSION_LINES = {"OII": 3728.5, "Hbeta": 4862.7, "OIII_4960": 4960.3, "OIII_5008": 5008.2, "Halpha": 6564.6, "NII": 6585.3, "SII": 6718.3}
BROAD_LINES = {"Lyalpha": 1215.7, "CIV": 1549.1, "CIII": 1908.7, "MgII": 2799.1, "Hbeta": 4862.7, "Halpha": 6564.6}
STELLAR_ABSORPTION = {"CaK": 3934.8, "CaH": 3969.6, "Hdelta": 4102.9, "Hgamma": 4341.7, "Hbeta": 4862.7, "Mgb": 5176.7, "NaD": 5895.6, "Halpha": 6564.6}
SPECTRAL_CLASSES = ("STAR", "GALAXY", "QSO")


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def wavelength_grid(card: SpectrumCard) -> np.ndarray:
    """The card's pixel centres in Angstrom (vacuum)."""
    lo, hi = card.wavelength_min.to_value("Angstrom"), card.wavelength_max.to_value("Angstrom")
    if card.sampling == "log":
        return np.logspace(np.log10(lo), np.log10(hi), card.n_pixels)
    return np.linspace(lo, hi, card.n_pixels)


def _gauss_lines(wave, centres, sigmas, amps):
    """Sum of Gaussian lines; (L,) from (K,) centres/sigmas/amps."""
    x = (wave[:, None] - centres[None, :]) / sigmas[None, :]
    return (amps[None, :] * np.exp(-0.5 * x**2)).sum(axis=1)


def noiseless_spectrum(kind: str, z: float, wave: np.ndarray, resolving_power: float, rng: np.random.Generator) -> np.ndarray:
    """Noiseless f_lambda in 1e-17 erg/s/cm^2/A for a STAR, GALAXY or QSO at redshift z."""
    rest = wave / (1 + z)
    lsf = wave / resolving_power / 2.3548  # Gaussian sigma of the line-spread function [A]
    if kind == "STAR":
        teff = rng.uniform(4000, 10000)
        # Planck continuum, normalised at 5500 A.
        bb = lambda lam: 1 / (lam**5 * np.expm1(1.4388e8 / (lam * teff)))  # noqa: E731
        flux = bb(rest) / bb(5500.0)
        names = list(STELLAR_ABSORPTION)
        centres = np.array([STELLAR_ABSORPTION[k] for k in names]) * (1 + z)
        # Balmer lines peak near A stars, metal lines in cool stars.
        balmer = np.clip((teff - 4000) / 5000, 0, 1)
        depth = np.array([0.5 - 0.3 * balmer if k in ("CaK", "CaH", "Mgb", "NaD") else 0.1 + 0.4 * balmer for k in names])
        sig = np.sqrt(4.0**2 + np.interp(centres, wave, lsf) ** 2)
        flux = flux * (1 - _gauss_lines(wave, centres, sig, depth).clip(0, 0.95))
        return flux * rng.uniform(5, 40)
    if kind == "GALAXY":
        age = rng.uniform(0, 1)  # 0 = star forming, 1 = passive
        slope = -1.0 + 2.5 * age  # redder with age
        cont = (rest / 5000.0) ** slope
        cont *= np.where(rest < 4000, 1 - 0.5 * age, 1.0)  # 4000 A break
        names = list(EMISSION_LINES)
        centres = np.array([EMISSION_LINES[k] for k in names]) * (1 + z)
        vdisp = rng.uniform(50, 250)
        sig = np.sqrt((centres * vdisp / C_KMS) ** 2 + np.interp(centres, wave, lsf) ** 2)
        strength = (1 - age) * rng.uniform(0.5, 3.0)
        ratios = np.array([1.5, 0.35, 0.3 * rng.uniform(0.3, 3), 0.9 * rng.uniform(0.3, 3), 1.0, 0.3 * rng.uniform(0.5, 2), 0.2])
        amps = strength * ratios * 40 / (np.sqrt(2 * np.pi) * sig)  # equivalent width ~ 40 A x strength
        return (cont + _gauss_lines(wave, centres, sig, amps)) * rng.uniform(3, 20)
    if kind == "QSO":
        alpha = rng.normal(-1.5, 0.3)  # f_lambda ~ lambda^alpha
        cont = (rest / 3000.0) ** alpha
        names = list(BROAD_LINES)
        centres = np.array([BROAD_LINES[k] for k in names]) * (1 + z)
        fwhm = rng.uniform(2500, 6000)
        sig = centres * fwhm / C_KMS / 2.3548
        amps = np.array([3.0, 1.2, 0.6, 0.8, 0.5, 1.5]) * rng.uniform(0.5, 1.5, len(names)) * np.interp(centres, wave, cont)
        flux = cont + _gauss_lines(wave, centres, sig, amps)
        forest = rest < BROAD_LINES["Lyalpha"]
        tau = 0.0025 * (1 + z) ** 3.7 * rng.exponential(1.0, forest.sum())  # Lyman-alpha forest
        flux[forest] *= np.exp(-tau)
        return flux * rng.uniform(3, 20)
    raise ValueError(f"unknown spectral kind {kind!r}")


def _galaxy_kind_and_z(rng: np.random.Generator) -> tuple[str, float]:
    kind = SPECTRAL_CLASSES[rng.integers(3)]
    z = {"STAR": rng.normal(0, 1e-4), "GALAXY": rng.uniform(0.02, 0.7), "QSO": rng.uniform(0.5, 3.5)}[kind]
    return kind, float(z)


def mock_spectrum(card: SpectrumCard, seed: int, index: int) -> Sample:
    rng = _rng(seed, index, 0)
    kind, z = _galaxy_kind_and_z(rng)
    wave = wavelength_grid(card)
    flux = noiseless_spectrum(kind, z, wave, card.resolving_power, rng)
    # Noise: sky-dominated, so sigma is flat apart from sky lines, scaled to the card's S/N.
    sigma = np.full_like(wave, np.median(flux) / card.typical_snr * rng.uniform(0.5, 2.0))
    sky_lines = np.array([5578.5, 5894.6, 6301.7, 6865.0, 7247.0, 7821.5, 8344.6, 8827.1, 9376.0])
    sigma *= 1 + 3 * _gauss_lines(wave, sky_lines, np.full(9, 3.0), np.ones(9))
    values = flux + rng.normal(0, 1, wave.size) * sigma
    ivar = 1 / sigma**2
    bad = rng.random(wave.size) < 0.002  # cosmic rays / bad columns
    ivar[bad] = 0.0
    return Sample(
        "spectrum", values, ivar, {"wavelength": wave},
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "pair_id": f"obj-{seed}-{index}", "labels": {"spectral_class": kind, "redshift": z}},
    )


def band_fluxes_njy(kind: str, z: float, band_wavelengths: np.ndarray, seed: int, index: int) -> np.ndarray:
    """Band fluxes [nJy] of object (seed, index), integrated from its noiseless spectrum.

    Bands are approximated as top hats of +-10 % around the effective wavelength.
    """
    rng = _rng(seed, index, 0)
    kind2, z2 = _galaxy_kind_and_z(rng)  # replay the spectrum's draws to get the same object
    assert (kind2, z2) == (kind, z)
    wave = np.linspace(band_wavelengths.min() * 0.85, band_wavelengths.max() * 1.15, 4000)
    f_lambda = noiseless_spectrum(kind, z, wave, 2000.0, rng) * 1e-17  # erg/s/cm^2/A
    f_nu_njy = f_lambda * wave**2 / C_ANGSTROM_S * 1e23 * 1e9
    return np.array([f_nu_njy[np.abs(wave / lam - 1) < 0.1].mean() for lam in band_wavelengths])


def mock_image(card: ImageCard, seed: int, index: int) -> Sample:
    """A stamp of the same object as `mock_spectrum(seed, index)` (bulge + disk Gaussians)."""
    rng = _rng(seed, index, 0)
    kind, z = _galaxy_kind_and_z(rng)
    bands = np.array([b.wavelength.to_value("Angstrom") for b in card.bands])
    fluxes = band_fluxes_njy(kind, z, bands, seed, index)
    shape_rng = _rng(seed, index, 1)
    n, scale = card.stamp_size, card.pixel_scale.to_value("arcsec")
    offsets = (np.arange(n) - (n - 1) / 2) * scale
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    # Point sources for stars and QSOs, extended bulge + disk for galaxies.
    size = 0.0 if kind != "GALAXY" else shape_rng.lognormal(np.log(0.8 / (1 + 2 * z)), 0.3)  # arcsec
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
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "pair_id": f"obj-{seed}-{index}", "labels": {"redshift": z}},
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
