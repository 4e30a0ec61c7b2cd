"""The survey-grade instrument of `mock_realism: survey` cards: what a fibre spectrograph's
reduced spectrum carries beyond photon noise.

- Sky: a dark-sky continuum rising to the red plus [OI] 5577/6300/6364, Na D and the OH
  Meinel bands (band origins of Osterbrock et al. 1996, PASP 108, 277, each drawn as its
  P/Q/R branch lines). The sky adds Poisson noise, and its subtraction leaves residuals:
  a scale error of a few per cent per band and a sub-pixel wavelength-solution shift,
  which leave the familiar S-shaped residuals at 5577 A and in the red (Wild & Hewett
  2005, MNRAS 358, 1083).
- Telluric O2 A and B bands (7605, 6870 A) corrected to a few per cent.
- Flux calibration: a smooth multiplicative error of 5-10 % rms across the spectrum
  (Legendre orders 1-4), as standard-star and fibre-aperture colour terms leave in
  SDSS/BOSS (Dawson et al. 2013; Margala et al. 2016, ApJ 831, 157).
- Bad columns (a few runs of 3-30 pixels) and cosmic rays: ivar = 0 and an and_mask bit.
- Sky brightness: a dark sky of r = 20 in the fibre (SKY_R_MAG), so faint targets are
  sky-dominated and their sky residuals large.
- S/N: the median per-pixel S/N runs over SNR_RANGE (2-100) whatever the card's typical_snr:
  from the object's r magnitude (100 at r = 16.5 falling log-linearly to 2 at r = 20.5,
  0.15 dex scatter), or log-uniform when no magnitude is given.
"""

from __future__ import annotations

import numpy as np

from cosmofm.data_cards.mocks.spectra import _gauss

SNR_RANGE = (2.0, 100.0)  # median per-pixel S/N of survey mocks
CALIB_RMS = (0.05, 0.10)  # rms of the multiplicative flux-calibration error
SKY_R_MAG = 20.0  # r (AB) of a dark sky (~21.2 mag/arcsec^2) in a 2-arcsec fibre
BAD_COLUMN, COSMIC = 1, 2  # and_mask bits

# OH Meinel band origins [A, vacuum] and relative strengths (Osterbrock et al. 1996).
_OH_BANDS = ((5887.0, 0.2), (6257.0, 0.4), (6498.0, 0.7), (6872.0, 0.9), (7276.0, 1.2), (7753.0, 1.0), (7914.0, 1.6),
             (8344.0, 2.2), (8827.0, 2.2), (9375.0, 1.6), (9788.0, 2.5), (10100.0, 2.0))
_ATOMIC = ((5578.9, 6.0), (5891.6, 0.8), (5897.6, 0.8), (6302.0, 2.5), (6365.5, 0.8))


def _sky_line_list() -> tuple[np.ndarray, np.ndarray]:
    lam, amp = [c for c, _ in _ATOMIC], [a for _, a in _ATOMIC]
    for origin, strength in _OH_BANDS:
        j = np.arange(1, 7)
        for offset, share in ((-1, 0.35), (0, 0.2), (1, 0.45)):  # P, Q and R branches, spreading with J
            lam += list(origin + offset * (8.0 * j + 0.9 * j**2) * origin / 7000.0)
            amp += list(strength * share * np.exp(-((j - 2.5) ** 2) / 4.0))
    return np.array(lam), np.array(amp)


SKY_LINES, SKY_AMPS = _sky_line_list()


def sky_spectrum(wave: np.ndarray, resolving_power: float) -> tuple[np.ndarray, np.ndarray]:
    """(continuum, lines) of the night sky, observed frame, in the units of the object models
    (~1 at 5500 A rest), as mocks/spectra.observe scales its sky."""
    cont = 0.25 + 0.15 * (wave / 6000.0) ** 2
    keep = (SKY_LINES > wave[0] - 20) & (SKY_LINES < wave[-1] + 20)
    centres = SKY_LINES[keep]
    return cont, _gauss(wave, centres, centres / resolving_power / 2.3548, 2.0 * SKY_AMPS[keep])


def telluric(wave: np.ndarray, residual: float) -> np.ndarray:
    """Imperfectly corrected O2 A (7605 A) and B (6870 A) bands: depth `residual` x band shape."""
    out = np.ones(wave.size)
    for head, length, depth in ((7594.0, 90.0, 1.0), (6867.0, 60.0, 0.5)):
        x = wave - head
        out *= 1 - residual * depth * np.exp(np.where(x > 0, -np.abs(x) / length, -np.abs(x) / 1.5))
    return out


def calibration_error(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1 + a smooth error of rms U(CALIB_RMS) made of Legendre orders 1-4."""
    t = 2 * (wave - wave[0]) / (wave[-1] - wave[0]) - 1
    shape = np.polynomial.legendre.legval(t, np.concatenate([[0.0], rng.normal(0, 1, 4) / np.arange(1, 5)]))
    return 1 + shape / max(float(np.std(shape)), 1e-9) * rng.uniform(*CALIB_RMS)


def observe_survey(model: np.ndarray, wave: np.ndarray, resolving_power: float, rng: np.random.Generator,
                   r_mag: float | None = None, shift: dict | None = None):
    """The instrument applied to a noiseless observed-frame model: (flux, ivar, and_mask, info),
    flux and ivar in the model's units. With the object's r magnitude the sky is as bright
    relative to it as a dark sky in a fibre (SKY_R_MAG): faint targets are sky-dominated.
    `shift` (a card's `mock_shift`) scales the S/N, the sky-subtraction residuals and the
    flux-calibration error after the same random draws as without it."""
    shift = shift or {}
    throughput = np.exp(-0.5 * ((np.log(wave) - np.log(6000.0)) / 0.35) ** 2)
    sky_cont, sky_lines = sky_spectrum(wave, resolving_power)
    if r_mag is not None:
        r_band = np.abs(wave - 6231.0) < 436.0
        ref = float(np.median(model[r_band])) if r_band.any() else float(np.median(model))
        boost = 10 ** (0.4 * (r_mag - SKY_R_MAG)) * max(ref, 1e-30) / float(np.median(sky_cont[r_band] if r_band.any() else sky_cont))
        sky_cont, sky_lines = sky_cont * boost, sky_lines * boost
    sky = sky_cont + sky_lines
    if r_mag is None:
        snr = float(np.exp(rng.uniform(*np.log(SNR_RANGE))))
    else:  # sky-limited: S/N falls ~ x 50 over the 16.5-20.5 window, with exposure-to-exposure scatter
        log_snr = np.log10(SNR_RANGE[1]) - (r_mag - 16.5) / 4.0 * np.log10(SNR_RANGE[1] / SNR_RANGE[0])
        snr = float(np.clip(10 ** (log_snr + rng.normal(0, 0.15)), *SNR_RANGE))
    snr *= shift.get("snr_scale", 1.0)
    read = 1.0
    obj_counts = np.clip(model * telluric(wave, rng.uniform(0.0, 0.05)), 0, None) * throughput
    # object and sky in the same (model) units, both scaled to counts by `scale`, chosen so that
    # the median S/N is snr: scale^2 o^2 = snr^2 (scale (o + s) + read^2) for median object o, sky s
    o = max(float(np.median(obj_counts)), 1e-30)
    s = float(np.median(sky * throughput))
    scale = (snr**2 * (o + s) + np.sqrt(snr**4 * (o + s) ** 2 + 4 * o**2 * snr**2 * read**2)) / (2 * o**2)
    obj_counts = obj_counts * scale
    var = obj_counts + scale * sky * throughput + read**2
    counts = obj_counts + rng.normal(0.0, 1.0, wave.size) * np.sqrt(var)
    # sky-subtraction residual: scale error (5577 on its own) and a wavelength-solution shift
    shift_a = rng.normal(0, 0.08) * float(np.median(np.diff(wave)))  # wavelength-solution error [A]
    is_5577 = np.abs(wave - 5578.9) < 10
    eps = np.where(is_5577, rng.normal(0, 0.06), rng.normal(0, 0.05))
    residual = (eps * sky_lines + shift_a * np.gradient(sky_lines, wave)) * shift.get("sky_residual_scale", 1.0)
    counts += scale * residual * throughput
    calib = calibration_error(wave, rng)
    if "calibration_scale" in shift:  # (calib - 1) * 1 + 1 would not round-trip bit for bit
        calib = 1 + (calib - 1) * shift["calibration_scale"]
    flux = counts / throughput * calib / scale
    sigma = np.sqrt(var) / throughput * calib / scale
    ivar = 1.0 / sigma**2
    and_mask = np.zeros(wave.size, dtype=np.int32)
    for _ in range(rng.poisson(1.5)):
        start, length = int(rng.integers(wave.size)), int(rng.integers(3, 31))
        and_mask[start:start + length] |= BAD_COLUMN
    and_mask[rng.random(wave.size) < 0.002] |= COSMIC
    ivar[and_mask > 0] = 0.0
    return flux, ivar, and_mask, {"snr_target": snr, "calib_rms": float(np.std(calib)), "sky_shift_A": float(shift_a)}
