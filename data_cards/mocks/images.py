"""Mock multi-band image stamps and blends: GalSim profiles seen through a survey's card.

An image of object (seed, index) shows the same object as `mock_spectrum(seed, index)`
(same `mock_object`, same `meta["pair_id"]`):

- **Colours** come from the object's noiseless spectrum (`mock_spectra.rest_model`)
  integrated through the survey's real filter curves shipped by speclite (lsst2023-*,
  hsc2017-*, Euclid-VIS; AB photon-counting convention, `band_fluxes`). A band without a
  known curve falls back to the +-10 % top hat of `mock_spectra.band_fluxes_njy`.
- **Morphology**: stars and QSOs are point sources. Galaxies are a Sersic bulge (n on
  the grid {2, 3, 4}: continuous n makes GalSim rebuild its tables, ~3x slower;
  truncated near 10 half-light radii) + an exponential disk + point-like star-forming
  knots placed like the disk light (as `galsim.RandomKnots`) for the star-forming
  classes (`MORPHOLOGY`).
  - sizes: Shen et al. 2003 (MNRAS 343, 978, eqs. 14-16, r band) size-luminosity
    relations with their log-normal scatter, early-type for bulge-dominated galaxies and
    late-type otherwise, applied as published; the rest-frame absolute r magnitude is
    `mock_object`'s (exact K-correction from the SED, Planck18 distances); sizes evolve
    as (1+z)^-0.75 (late) and (1+z)^-1.48 (early) from Shen's z ~ 0.1 (van der Wel et
    al. 2014, ApJ 788, 28). Half-light radii are circularised (GalSim's convention).
    Galaxies are placed by their luminosity function (mocks/luminosity.py), so an
    apparently bright galaxy is mostly a luminous one at moderate redshift and sizes
    shrink with magnitude as on the sky (lsst-like mocks: median 1.7" at r < 18, 0.9"
    at r > 19; 3 % above 2.5"). Each component's radius is kept within [MIN_HLR,
    MAX_HLR]: the floor keeps profiles drawable, the ceiling keeps a disk's 99 % radius
    inside the largest FFT box (8 stamps); it clips <1 % of galaxies, mostly the outer
    disks of bright early types (bulge radius / BULGE_TO_DISK_SIZE). Radii are not
    compressed otherwise.
  - axis ratios: oblate spheroids at random inclination, q^2 = cos^2 i + C^2 sin^2 i;
    disks have intrinsic thickness C/A ~ N(0.22, 0.06) (Ryden 2004, ApJ 601, 214),
    bulges and ellipticals C/A ~ N(0.6, 0.1) (apparent q of SDSS ellipticals peaking near
    0.75-0.8, Padilla & Strauss 2008, MNRAS 388, 1321).
  - colour gradients: the bulge has the old-population SED (the spectrum's model with
    the young population and the lines switched off), the disk (and its knots) the rest,
    so bulge + disk + knots add up to the spectrum's band fluxes in every band.
- **PSF** per band with the card's FWHM: ground = Kolmogorov atmosphere (x) Airy(lambda/D,
  obscuration of the survey's telescope), the atmosphere's width solved so the total
  FWHM is the card's; space = Airy (x) Gaussian jitter, solved the same way; cards without
  a known telescope get a Kolmogorov of the card's FWHM.
- **Noise**: Gaussian sky noise of the card's `sky_noise` per pixel plus the source's
  Poisson noise (electrons per nJy from surveycodex's zero point and exposure); `ivar`
  is estimated from the noisy image, as survey pipelines do, so it does not leak the
  noiseless profile.

Rendering is done in Fourier space on the card's own pixel grid: each component's
k-space profile (GalSim `drawKImage`) times the PSF's, the pixel's sinc and the
position phase, then one inverse FFT per band. This is what `galsim.drawImage` does
with its own larger grids, at a fraction of the cost (one morphology is shared by all
bands); tests check it against `drawImage` pixel by pixel. Undersampled PSFs (Euclid VIS)
are rendered on a finer grid and sampled at the pixel centres.

Blends of these stamps are drawn by mocks/blends.py.

Survey parameters of the shipped cards (lsst-like, hsc-like, euclid-like = Euclid VIS
only, since a stamp has one pixel grid and NISP's pixels are 0.3") come from surveycodex
(`SURVEYS`, `sky_noise_njy` in mocks/image_surveys.py); the cards' provenance says which value came from where.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosmofm.data_cards.mocks.common import ARCSEC_PER_RAD, C_ANGSTROM_S, NJY_AB_ZP, distance_tables, filter_weights, object_rng
from cosmofm.data_cards.mocks.image_surveys import SURVEYS, electrons_per_njy, filter_names, sky_noise_njy, survey_of  # noqa: F401 (re-exported)
from cosmofm.data_cards.mocks.spectra import R_BAND, ObjectParams, mock_object, rest_model
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import ImageCard

__all__ = [
    "MORPHOLOGY",
    "SURVEYS",
    "Source",
    "band_fluxes",
    "draw_source",
    "electrons_per_njy",
    "filter_names",
    "galaxy_morphology",
    "galsim_profile",
    "mock_image",
    "psf_profile",
    "render",
    "sky_noise_njy",
]

MIN_HLR, MAX_HLR = 0.03, 8.0  # arcsec: floor and ceiling of each galaxy component's half-light radius (module docstring)

# Shen et al. 2003, r band (Table 1): log10(R50/kpc) vs absolute magnitude M, with the
# log-normal scatter of their eq. 16 (the values SkyPy's size example uses); M is held
# inside the magnitude range the relations were fitted over (M_range).
SHEN03 = {"late": {"alpha": 0.21, "beta": 0.53, "gamma": -1.31}, "early": {"a": 0.60, "b": -4.63},
          "M0": -20.52, "sigma1": 0.48, "sigma2": 0.25, "M_range": (-24.0, -16.0)}
SIZE_EVOLUTION = {"late": -0.75, "early": -1.48}  # R ~ (1+z)^x, van der Wel et al. 2014
SHEN03_Z = 0.1  # median redshift of Shen's SDSS sample


@dataclass(frozen=True)
class MorphologyPrior:
    """How a galaxy class looks: bulge-to-total flux in r, bulge Sersic n, knots."""

    bulge_to_total: tuple[float, float]  # uniform range, r band
    bulge_n: tuple[float, ...]  # the Sersic grid
    bulge_n_p: tuple[float, ...]  # probabilities of bulge_n
    knot_fraction: tuple[float, float]  # uniform range, fraction of the disk light in knots
    n_knots: tuple[int, int] = (10, 40)


MORPHOLOGY = {
    "GALAXY": MorphologyPrior((0.5, 1.0), (4.0, 3.0), (0.75, 0.25), (0.0, 0.0)),  # passive: ellipticals, S0
    "GALAXY_AGN": MorphologyPrior((0.2, 0.6), (4.0, 3.0), (0.5, 0.5), (0.0, 0.1)),  # Seyfert hosts: early spirals
    "GALAXY_STARFORMING": MorphologyPrior((0.0, 0.3), (2.0, 3.0), (0.7, 0.3), (0.05, 0.3)),  # disks, pseudo-bulges
    "GALAXY_STARBURST": MorphologyPrior((0.0, 0.2), (2.0,), (1.0,), (0.2, 0.5)),  # clumpy disks
}
DISK_THICKNESS = (0.22, 0.06, 0.10, 0.40)  # mean, sigma, clip: intrinsic C/A of disks (Ryden 2004)
BULGE_THICKNESS = (0.60, 0.10, 0.30, 0.95)  # same for bulges / ellipticals
BULGE_TO_DISK_SIZE = (0.35, 0.3, 0.15, 0.8)  # log-normal median, sigma(ln), clip: bulge hlr / disk hlr
DISK_EXTENT = 4.0  # half-light radii enclosing 99 % of an exponential disk's light (sets the FFT box)


class _CardModel:
    """What the generator needs from a card, converted once (astropy conversions are slow)."""

    def __init__(self, card: ImageCard):
        self.name = card.name
        self.n = card.stamp_size
        self.p = float(card.pixel_scale.to_value("arcsec"))
        self.band_names = [b.name for b in card.bands]
        self.wavelengths = tuple(float(b.wavelength.to_value("Angstrom")) for b in card.bands)
        self.fwhm = tuple(float(b.psf_fwhm.to_value("arcsec")) for b in card.bands)
        self.sky_sigma = np.array([b.sky_noise for b in card.bands], dtype=float)
        self.survey = survey_of(card)
        self.filters = filter_names(card)
        self.gain = None  # electrons per nJy per band, for the source's Poisson noise
        self.telescope = None  # (mirror diameter [m], linear obscuration, space)
        if self.survey is not None:
            import surveycodex

            self.gain = np.array([electrons_per_njy(self.survey.codex, self.survey.bands[b][0]) for b in self.band_names])
            s = surveycodex.get_survey(self.survey.codex)
            # surveycodex's obscuration is the obscured fraction of the pupil's area; GalSim's is linear
            self.telescope = (float(s.mirror_diameter.to_value("m")), float(np.sqrt(s.obscuration.value)), self.survey.space)
        offsets = (np.arange(self.n) - (self.n - 1) / 2) * self.p
        self.coords = {"band_wavelength": np.array(self.wavelengths), "dec_offset": offsets, "ra_offset": offsets}
        model = "kolmogorov" if self.telescope is None else ("airy*gaussian" if self.telescope[2] else "kolmogorov*airy")
        self.psf_meta = {"model": model, "fwhm_arcsec": list(self.fwhm)}
        self._optics = None

    def psf(self, band: int):
        return _psf_of(self, band)

    @property
    def optics(self) -> _Optics:
        if self._optics is None:
            self._optics = _Optics(self)
        return self._optics


_MODELS: dict[tuple, _CardModel] = {}


def card_model(card: ImageCard) -> _CardModel:
    q = lambda v: (float(v.value), v.unit)  # noqa: E731 (hashable without a unit conversion)
    key = (card.name, card.stamp_size, q(card.pixel_scale), tuple((b.name, q(b.wavelength), q(b.psf_fwhm), b.sky_noise) for b in card.bands))
    model = _MODELS.get(key)
    if model is None:
        if len(_MODELS) >= 32:
            _MODELS.clear()
        model = _MODELS[key] = _CardModel(card)
    return model


# ---------------------------------------------------------------------------- band fluxes

_SED_R = 500.0  # resolving power of the SED used for band integrals (lines resolved by common.SED_DLOGLAM)


def _sed_fluxes(obj: ObjectParams, norm: float, filters: tuple[str | None, ...], wavelengths: tuple[float, ...]) -> np.ndarray:
    """Fluxes [nJy] in each band, then (last) in the +-10 % top hat around R_BAND."""
    wave, weights = filter_weights(filters + (None,), wavelengths + (R_BAND,))
    f_lambda = rest_model(obj, wave, _SED_R) * norm * 1e-17  # erg/s/cm^2/A
    return np.sum(weights * (f_lambda * wave**2 / C_ANGSTROM_S * 1e32), axis=1)  # nJy (no BLAS: see _components_k)


def band_fluxes(card: ImageCard, obj: ObjectParams, norm: float) -> np.ndarray:
    """Band fluxes [nJy] of object `obj` (normalisation `norm`, from `mock_object`) in the
    card's bands, through the real filter curves (`filter_names`)."""
    model = card_model(card)
    return _sed_fluxes(obj, norm, model.filters, model.wavelengths)[:-1]


def _old_population(obj: ObjectParams) -> ObjectParams:
    """The galaxy's bulge: its old stars only (no young population, no lines), same dust."""
    return ObjectParams(obj.cls, obj.z, {**obj.params, "young_fraction": 0.0, "halpha_ew": 0.0})


def _shen03_r50_kpc(abs_mag: float, early: bool, rng: np.random.Generator) -> float:
    """A draw of the half-light radius [kpc] at z ~ 0.1 from Shen et al. 2003 eqs. 14-16."""
    m = float(np.clip(abs_mag, *SHEN03["M_range"]))
    if early:
        log_r = -0.4 * SHEN03["early"]["a"] * m + SHEN03["early"]["b"]
    else:
        p = SHEN03["late"]
        log_r = -0.4 * p["alpha"] * m + (p["beta"] - p["alpha"]) * np.log10(1 + 10 ** (-0.4 * (m - SHEN03["M0"]))) + p["gamma"]
    sigma_ln = SHEN03["sigma2"] + (SHEN03["sigma1"] - SHEN03["sigma2"]) / (1 + 10 ** (-0.8 * (m - SHEN03["M0"])))
    return float(10**log_r * rng.lognormal(0.0, sigma_ln))


# ---------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One object to render, in JSON-friendly units (arcsec, nJy, degrees).

    Positions are offsets from the stamp centre along the Sample's axes (dec_offset =
    rows, ra_offset = columns). Radii are circularised half-light radii; `beta_deg` is
    the major axis's angle from +ra_offset towards +dec_offset (GalSim's `beta`).
    """

    pair_id: str
    spectral_class: str
    redshift: float
    kind: str  # "point" (stars, QSOs) or "galaxy"
    flux_njy: list[float]  # total flux per card band
    dec: float = 0.0  # arcsec
    ra: float = 0.0  # arcsec
    bulge_fraction: list[float] = field(default_factory=list)  # of flux_njy, per band
    bulge_n: float = 4.0
    bulge_hlr: float = 0.0  # arcsec
    bulge_q: float = 1.0
    disk_hlr: float = 0.0  # arcsec
    disk_q: float = 1.0
    beta_deg: float = 0.0
    knot_fraction: float = 0.0  # fraction of the disk's light in knots
    n_knots: int = 0
    knot_seed: int = 0  # knot positions are drawn from default_rng(knot_seed) (`knot_offsets`)
    abs_mag_r: float | None = None  # rest-frame SDSS r, AB
    size_relation: str = ""  # "shen03-late" / "shen03-early"
    flux_scale: float = 1.0  # factor applied to object (seed, index)'s spectrum (blend neighbours)

    def to_json(self) -> dict[str, Any]:
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Source:
        """A Source from `to_json` output, e.g. `mock_image(...).meta["truth"]` (other keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def knot_offsets(self) -> np.ndarray:
        """(n_knots, 2) knot positions [arcsec] (ra, dec) relative to the centre: radii drawn
        from the exponential disk's light profile, then sheared like the disk."""
        if self.n_knots == 0:
            return np.zeros((0, 2))
        import galsim

        rng = np.random.default_rng(self.knot_seed)
        r = rng.gamma(2.0, self.disk_hlr / 1.6783469900166605, self.n_knots)  # p(r) ~ r exp(-r / r_s)
        phi = rng.uniform(0, 2 * np.pi, self.n_knots)
        xy = np.stack([r * np.cos(phi), r * np.sin(phi)])
        return (galsim.Shear(q=self.disk_q, beta=self.beta_deg * galsim.degrees).getMatrix() @ xy).T


def _clip_hlr(hlr: float) -> float:
    return float(np.clip(hlr, MIN_HLR, MAX_HLR))


def _truncnorm(rng: np.random.Generator, mean: float, sigma: float, lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(mean, sigma), lo, hi))


def draw_source(card: ImageCard, seed: int, index: int, ref: tuple[int, float] | None = None) -> Source:
    """Object (seed, index) as seen in `card`'s bands, centred on the stamp.

    `ref = (band index, AB magnitude)` rescales the object's brightness (blend
    neighbours); its size follows the rescaled luminosity, its colours are kept.
    """
    model = card_model(card)
    obj, norm = mock_object(seed, index)
    *fluxes, ref_window = _sed_fluxes(obj, norm, model.filters, model.wavelengths)
    fluxes = np.array(fluxes)
    scale = 1.0
    if ref is not None:
        band, mag = ref
        scale = 10 ** (-0.4 * (mag - NJY_AB_ZP)) / max(float(fluxes[band]), 1e-30)
        fluxes = fluxes * scale
    src = Source(f"obj-{seed}-{index}", obj.cls, float(obj.z), "point", [float(f) for f in fluxes], flux_scale=float(scale))
    prior = MORPHOLOGY.get(obj.cls)
    if prior is None:  # stars and QSOs
        src.bulge_fraction = [0.0] * len(fluxes)
        return src
    # rest-frame SDSS r, exact K-correction (mock_object)
    bt = galaxy_morphology(src, prior, float(obj.mags["M_r"] - 2.5 * np.log10(scale)), object_rng(seed, index, 1))
    # Bulge = old population: its share grows towards red bands for star-forming galaxies.
    *old_fluxes, old_window = _sed_fluxes(_old_population(obj), norm, model.filters, model.wavelengths)
    tilt = (np.array(old_fluxes) / old_window) / np.maximum(fluxes / scale / ref_window, 1e-30)
    src.bulge_fraction = [float(v) for v in np.clip(bt * tilt, 0.0, 1.0)]
    return src


def galaxy_morphology(src: Source, prior: MorphologyPrior, abs_mag_r: float, rng: np.random.Generator) -> float:
    """Draw galaxy `src`'s shape (at its `redshift`) from `prior` and the size-luminosity
    relation of its rest-frame SDSS r magnitude `abs_mag_r`; returns the r-band
    bulge-to-total flux ratio (the caller sets `bulge_fraction` per band from its SED)."""
    bt = float(rng.uniform(*prior.bulge_to_total))
    early = bt >= 0.5
    src.kind = "galaxy"
    src.bulge_n = float(rng.choice(prior.bulge_n, p=prior.bulge_n_p))
    src.abs_mag_r = float(abs_mag_r)
    r50 = _shen03_r50_kpc(src.abs_mag_r, early, rng)
    r50 *= ((1 + src.redshift) / (1 + SHEN03_Z)) ** SIZE_EVOLUTION["early" if early else "late"]
    t = distance_tables()
    hlr = r50 / float(np.interp(src.redshift, t.z, t.kpc_per_arcsec))  # arcsec
    ratio = float(np.clip(rng.lognormal(np.log(BULGE_TO_DISK_SIZE[0]), BULGE_TO_DISK_SIZE[1]), *BULGE_TO_DISK_SIZE[2:]))
    bulge_hlr, disk_hlr = (hlr, hlr / ratio) if early else (hlr * ratio, hlr)
    src.bulge_hlr, src.disk_hlr = _clip_hlr(bulge_hlr), _clip_hlr(disk_hlr)
    src.size_relation = "shen03-early" if early else "shen03-late"
    cos_i = rng.uniform(0, 1)
    src.disk_q = float(np.sqrt(cos_i**2 + _truncnorm(rng, *DISK_THICKNESS) ** 2 * (1 - cos_i**2)))
    src.bulge_q = float(np.sqrt(cos_i**2 + _truncnorm(rng, *BULGE_THICKNESS) ** 2 * (1 - cos_i**2)))
    src.beta_deg = float(rng.uniform(0, 180))
    src.knot_fraction = float(rng.uniform(*prior.knot_fraction))
    src.n_knots = int(rng.integers(prior.n_knots[0], prior.n_knots[1] + 1)) if src.knot_fraction > 0 else 0
    src.knot_seed = int(rng.integers(2**31))
    return bt


# ---------------------------------------------------------------------------- PSF


def _fwhm(obj, guess: float) -> float:
    """FWHM [arcsec] of a round profile, from a row through its peak sampled at ~guess / 24."""
    scale = guess / 24
    for _ in range(6):
        row = obj.drawImage(nx=129, ny=129, scale=scale, method="no_pixel").array[64, 64:]
        half = row[0] / 2
        if row[-1] < half:
            i = int(np.argmax(row < half))
            return float(2 * scale * (i - 1 + (row[i - 1] - half) / (row[i - 1] - row[i])))
        scale *= 2
    raise RuntimeError("PSF FWHM not found: the profile is far wider than its guess")


@functools.lru_cache(maxsize=256)
def _solved_psf(fwhm: float, lam_over_diam: float, obscuration: float, space: bool):
    """A PSF of total FWHM `fwhm` [arcsec]; lam_over_diam = 0: no telescope known."""
    import galsim

    if lam_over_diam <= 0:
        return galsim.Kolmogorov(fwhm=fwhm)
    airy = galsim.Airy(lam_over_diam=lam_over_diam, obscuration=obscuration)

    def build(width):
        other = galsim.Gaussian(fwhm=width) if space else galsim.Kolmogorov(fwhm=width)
        return galsim.Convolve(other, airy)

    diffraction = _fwhm(airy, lam_over_diam)
    if diffraction >= fwhm:  # diffraction alone is already as wide as the card says
        return airy
    # secant iteration on the blur's width, from the quadrature guess
    x0 = float(np.sqrt(fwhm**2 - diffraction**2))
    f0 = _fwhm(build(x0), fwhm) - fwhm
    x1 = x0 * fwhm / (f0 + fwhm)
    for _ in range(20):
        f1 = _fwhm(build(x1), fwhm) - fwhm
        if abs(f1) < 2e-4 * fwhm or f1 == f0:
            break
        x0, x1, f0 = x1, max(x1 - f1 * (x1 - x0) / (f1 - f0), 0.05 * fwhm), f1
    return build(x1)


def psf_profile(card: ImageCard, band: int):
    """The GalSim PSF of band number `band` (no pixel response): FWHM = the card's."""
    return card_model(card).psf(band)


def _psf_of(model: _CardModel, band: int):
    if model.telescope is None:
        return _solved_psf(model.fwhm[band], 0.0, 0.0, False)
    diameter, obscuration, space = model.telescope
    lam_over_diam = model.wavelengths[band] * 1e-10 / diameter * ARCSEC_PER_RAD
    return _solved_psf(model.fwhm[band], float(lam_over_diam), obscuration, space)


class _Optics:
    """A card's PSFs in Fourier space on the FFT grids the renderer uses (cached)."""

    def __init__(self, model: _CardModel):
        self.n, self.p = model.n, model.p
        self.psfs = [model.psf(b) for b in range(len(model.band_names))]
        # oversample the FFT grid until every PSF's MTF vanishes at its edge (no aliasing)
        self.os = 1
        while self.os < 4 and max(abs(psf.kValue(np.pi * self.os / self.p, 0.0)) for psf in self.psfs) > 1e-4:
            self.os += 1
        self.psf_radius = max(np.pi / psf.stepk for psf in self.psfs)
        self._grids: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def grid(self, n_fft: int) -> tuple[np.ndarray, np.ndarray]:
        """(k [rad/arcsec] in FFT order, (B, Nf, Nf) PSF x pixel x centring transfer function)."""
        if n_fft not in self._grids:
            nf = self.os * n_fft
            k = np.fft.fftfreq(nf, d=self.p / self.os) * 2 * np.pi
            pixel = np.sinc(k * self.p / (2 * np.pi))
            # stamp pixel centres sit at (i - (n-1)/2) p: half a pixel off the FFT grid for even n
            shift = self.p / 2 if self.n % 2 == 0 else 0.0
            axis = pixel * np.exp(1j * k * shift)
            tf = np.stack([_kimage(psf, nf, 2 * np.pi / (n_fft * self.p)) for psf in self.psfs]) * np.outer(axis, axis)
            self._grids[n_fft] = (k, tf)
        return self._grids[n_fft]


def _kimage(profile, nf: int, dk: float) -> np.ndarray:
    """The profile's Fourier transform on an nf x nf grid of step dk, in FFT order."""
    import galsim

    image = galsim.ImageCD(galsim.BoundsI(-nf // 2, nf - nf // 2 - 1, -nf // 2, nf - nf // 2 - 1), scale=dk)
    profile._drawKImage(image)  # drawKImage without its checks (which recompute maxk every call)
    return np.fft.ifftshift(image.array)


# ---------------------------------------------------------------------------- rendering


def galsim_profile(source: Source, band: int):
    """The source's intrinsic (pre-PSF) GalSim profile in band number `band`, at its position."""
    import galsim

    flux = source.flux_njy[band]
    if source.kind == "point":
        return galsim.DeltaFunction(flux=flux).shift(source.ra, source.dec)
    fb = source.bulge_fraction[band]
    beta = source.beta_deg * galsim.degrees
    parts = []
    if fb > 0:
        parts.append(_bulge(source.bulge_n, source.bulge_hlr, flux * fb).shear(q=source.bulge_q, beta=beta))
    disk = flux * (1 - fb)
    if disk > 0:
        parts.append(galsim.Exponential(half_light_radius=source.disk_hlr, flux=disk * (1 - source.knot_fraction)).shear(q=source.disk_q, beta=beta))
        for x, y in source.knot_offsets():
            parts.append(galsim.DeltaFunction(flux=disk * source.knot_fraction / source.n_knots).shift(x, y))
    return galsim.Add(parts).shift(source.ra, source.dec)


@functools.lru_cache(maxsize=None)
def _bulge_truncation(n: float) -> tuple[float, float]:
    """(truncation radius in scale radii, in half-light radii) of a bulge of Sersic index n.

    Bulges are truncated near 10 half-light radii (SDSS truncates its de Vaucouleurs
    models at 7-8), so they fit a finite FFT box. The truncation is a power of two in
    scale radii: GalSim keys its Hankel tables by truncation / scale radius, and only a
    power of two survives (r0 * T) / r0 exactly, so the tables are built once per n.
    """
    import galsim

    hlr_per_r0 = galsim.Sersic(n, scale_radius=1.0).half_light_radius
    t = 2.0 ** round(math.log2(10 * hlr_per_r0))
    return t, t / galsim.Sersic(n, scale_radius=1.0, trunc=t).half_light_radius


def _bulge(n: float, hlr: float, flux: float = 1.0):
    """A truncated Sersic bulge with half-light radius `hlr` [arcsec] (of the truncated profile)."""
    import galsim

    t_r0, t_hlr = _bulge_truncation(n)
    r0 = hlr * t_hlr / t_r0
    return galsim.Sersic(n, scale_radius=r0, trunc=r0 * t_r0, flux=flux)


def _extent(source: Source) -> float:
    """Radius [arcsec] holding (>= 99 % of) the source's intrinsic light."""
    if source.kind == "point":
        return 0.0
    # along the major axis: a circularised radius r becomes r / sqrt(q)
    return max(_bulge_truncation(source.bulge_n)[1] * source.bulge_hlr / np.sqrt(source.bulge_q),
               DISK_EXTENT * source.disk_hlr / np.sqrt(source.disk_q))


def _knots_k(xy: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Unit-flux k-space image (Nf, Nf) of equal point sources at xy (K, 2) [ra, dec arcsec]:
    sum_j exp(-i (k_y y_j + k_x x_j)) / K.

    A sum of K outer products rather than one (Nf x K) @ (K x Nf) BLAS product: OpenBLAS
    threads stall on a busy machine (measured on 2 shared cores: 16-400 ms for a product
    that a loop of outer products does in 1-5 ms, with no dependence on the load).
    """
    ey = np.exp(-1j * np.outer(xy[:, 1], k))  # (K, Nf)
    ex = np.exp(-1j * np.outer(xy[:, 0], k)) / len(xy)
    out = np.zeros((k.size, k.size), dtype=np.complex128)
    for a, b in zip(ey, ex):
        out += np.multiply.outer(a, b)
    return out


def _components_k(source: Source, nf: int, dk: float, k: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Unit-flux k-space components [(Nf, Nf)] in FFT order and their weights (C, B) in nJy."""
    import galsim

    flux = np.asarray(source.flux_njy, dtype=float)
    fb = np.asarray(source.bulge_fraction, dtype=float)
    beta = source.beta_deg * galsim.degrees
    comps, weights = [], []
    if np.any(fb > 0):
        bulge = _bulge(source.bulge_n, source.bulge_hlr).shear(q=source.bulge_q, beta=beta)
        comps.append(_kimage(bulge, nf, dk))
        weights.append(flux * fb)
    if np.any(fb < 1):
        disk = galsim.Exponential(half_light_radius=source.disk_hlr).shear(q=source.disk_q, beta=beta)
        comps.append(_kimage(disk, nf, dk))
        weights.append(flux * (1 - fb) * (1 - source.knot_fraction))
        if source.n_knots:
            comps.append(_knots_k(source.knot_offsets(), k))
            weights.append(flux * (1 - fb) * source.knot_fraction)
    return comps, np.array(weights)


def render(card: ImageCard, sources: list[Source]) -> np.ndarray:
    """Noiseless images of each source, (N, B, H, W) in the card's flux unit per pixel."""
    model = card_model(card)
    optics = model.optics
    n, p = model.n, model.p
    # FFT box: light beyond the box folds back onto the stamp, so the box reaches past the
    # stamp by the sources' 99 % radius (with the PSF's, in quadrature) plus their offsets
    reach = max(np.hypot(_extent(s), optics.psf_radius) + np.hypot(s.dec, s.ra) for s in sources)
    need = (reach + n * p / 2) / p
    n_fft = next((m * n for m in (2, 3, 4, 6) if m * n >= need), 8 * n)  # few sizes: their PSF grids are cached
    k, tf = optics.grid(n_fft)
    nf, dk = k.size, 2 * np.pi / (n_fft * p)
    pix = (optics.os * (np.arange(n) - n // 2)) % nf  # FFT-grid index of each stamp pixel
    out = np.empty((len(sources), len(model.band_names), n, n))
    for i, s in enumerate(sources):
        phase = np.outer(np.exp(-1j * k * s.dec), np.exp(-1j * k * s.ra))  # (Nf, Nf)
        if s.kind == "point":
            kimg = np.asarray(s.flux_njy)[:, None, None] * phase
        else:
            comps, weights = _components_k(s, nf, dk, k)
            kimg = sum(w[:, None, None] * (c * phase) for c, w in zip(comps, weights))  # (B, Nf, Nf)
        out[i] = np.fft.ifft2(kimg * tf).real[:, pix][:, :, pix] * optics.os**2  # ifft2 divides by (os N)^2, pixels need N^2
    return out


def observe_stamp(model: _CardModel, clean: np.ndarray, rng: np.random.Generator, noise: bool) -> tuple[np.ndarray, np.ndarray]:
    """(values, ivar): sky noise + the source's Poisson noise; ivar estimated from the noisy image."""
    sky_var = model.sky_sigma[:, None, None] ** 2
    if not noise:
        return clean, np.broadcast_to(1 / sky_var, clean.shape).copy()
    if model.gain is None:
        return clean + rng.standard_normal(clean.shape) * np.sqrt(sky_var), np.broadcast_to(1 / sky_var, clean.shape).copy()
    gain = model.gain[:, None, None]
    values = clean + rng.standard_normal(clean.shape) * np.sqrt(sky_var + np.clip(clean, 0, None) / gain)
    return values, 1 / (sky_var + np.clip(values, 0, None) / gain)


def mock_image(card: ImageCard, seed: int, index: int, *, noise: bool = True) -> Sample:
    """A stamp of the same object as `mock_spectrum(seed, index)`, centred within half a pixel.

    `meta["truth"]` holds the `Source` (fluxes per band, morphology, position) plus the
    filters and PSF used; `noise=False` gives the noiseless image (ivar = 1 / sky_noise^2).
    """
    src = draw_source(card, seed, index)
    src.dec, src.ra = (float(v) for v in object_rng(seed, index, 6).uniform(-0.5, 0.5, 2) * card_model(card).p)
    clean = render(card, [src])[0]
    model = card_model(card)
    values, ivar = observe_stamp(model, clean, object_rng(seed, index, 5), noise)
    truth = {**src.to_json(), "filters": list(model.filters), "psf": model.psf_meta}
    return Sample(
        "image", values, ivar, model.coords,
        {"card": card.name, "id": f"{card.name}-{seed}-{index}", "pair_id": src.pair_id,
         "labels": {"redshift": src.redshift, "spectral_class": src.spectral_class}, "truth": truth},
    )
