"""Augmentation of a classifier's training spectra, redrawn every time the loop reads one
(FinetuneConfig.tilt_rms / tilt_ivar_rms / redshift_stretch, issue 17).

- Smooth tilts (`smooth_tilt`): a continuum slope as dust and flux calibration set it,
  randomised so the class cannot rest on it; optionally an independent tilt of ivar, which
  in mocks and in source-noise-limited data follows the spectrum's own shape.
- Extra noise: the same object at a lower S/N, a fresh noise draw each read, so the network
  cannot learn one noise realisation of a training spectrum (it memorises them otherwise:
  training loss ~0.03 against ~12 % of test stars wrong, issue 17).
- Redshift stretch: a galaxy or QSO spectrum moved along a log-sampled grid by a whole
  number of pixels, (1 + z) -> (1 + z) exp(u), its redshift label moved with it; the pixels
  that come in from beyond the grid's edge are masked (ivar 0). It widens the redshift
  range each class is seen at, so the class cannot rest on where on the detector its
  lines fall. Stars are never stretched: their class is a temperature at z ~ 0.

    seen = AugmentedSpectra(train, seed=0, tilt_rms=0.3, redshift_stretch=0.1, stretch_classes=["QSO", "GALAXY"], extra_noise=1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample


def smooth_tilt(wavelength: np.ndarray, rng: np.random.Generator, rms: float, order: int = 3) -> np.ndarray:
    """A smooth multiplicative factor exp(s) on `wavelength`: s is a sum of Legendre orders
    1..`order` of ln(wavelength) mapped onto [-1, 1] (coefficients N(0, 1/k) at order k, so
    the shape is mostly a slope with some curvature), scaled to an rms drawn uniformly in
    [0, rms]. Order 0 is left out: the tokenizer normalises each spectrum's scale anyway."""
    x = np.log(np.asarray(wavelength, dtype=np.float64))
    t = 2 * (x - x[0]) / max(float(x[-1] - x[0]), 1e-12) - 1
    shape = np.polynomial.legendre.legval(t, np.concatenate([[0.0], rng.normal(0, 1, order) / np.arange(1, order + 1)]))
    return np.exp(shape / max(float(np.std(shape)), 1e-12) * rng.uniform(0, rms))


def log_pixel_step(wavelength: np.ndarray, where: str) -> float:
    """The constant step in ln(wavelength) of a log-sampled grid; an InputError naming `where`
    for any other grid (a linear or multi-window one cannot be shifted by whole pixels)."""
    steps = np.diff(np.log(np.asarray(wavelength, dtype=np.float64)))
    if steps.size == 0 or np.ptp(steps) > 1e-3 * abs(float(np.mean(steps))):
        raise InputError(where, "needs a log-sampled wavelength grid (constant step in ln wavelength)", "fine-tune with redshift_stretch 0 on this card")
    return float(np.mean(steps))


def shift_pixels(values: np.ndarray, ivar: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`values` and `ivar` moved by k pixels toward longer wavelengths (k < 0: shorter); the k
    pixels that enter from beyond the edge are 0 with ivar 0 (masked)."""
    out_v, out_i = np.zeros_like(values), np.zeros_like(ivar)
    if k >= 0:
        out_v[k:], out_i[k:] = values[: values.size - k], ivar[: ivar.size - k]
    else:
        out_v[:k], out_i[:k] = values[-k:], ivar[-k:]
    return out_v, out_i


class AugmentedSpectra(Sequence):
    """`samples` (spectra) whose item i is augmented anew each time it is read, the n-th read of
    item i by the draw of default_rng([seed, i, n]): the loop reads each training sample once
    for its targets and then once per epoch, so every epoch sees a new draw, and a rerun the
    same ones. In that order:

    - `tilt_rms` > 0: values multiplied by a `smooth_tilt` f and ivar divided by f^2 (S/N kept);
    - `tilt_ivar_rms` > 0: ivar also multiplied by an independent tilt (drawn after f);
    - `extra_noise` > 0: Gaussian noise of k times each pixel's own sigma added, k uniform in
      [0, extra_noise], ivar divided by 1 + k^2 (S/N down to 1 / sqrt(1 + extra_noise^2) of
      the spectrum's own; masked pixels stay as they are);
    - `redshift_stretch` > 0: a sample whose `class_label` is in `stretch_classes` is moved by
      k = round(u / step) pixels, u uniform in [max(-redshift_stretch, -ln(1 + z)), redshift_stretch]
      (so z stays >= 0), and its `redshift_label` becomes (1 + z) exp(k step) - 1.

    `relabels` tells the loop that labels change with the read (the redshift), so each
    batch's targets come from the samples as read."""

    def __init__(self, samples: Sequence[Sample], seed: int, tilt_rms: float = 0.0, tilt_order: int = 3, tilt_ivar_rms: float = 0.0,
                 redshift_stretch: float = 0.0, stretch_classes: Sequence[str] = (), class_label: str = "spectral_class",
                 redshift_label: str = "redshift", extra_noise: float = 0.0):
        self.samples, self.seed = samples, int(seed)
        self.tilt_rms, self.tilt_order, self.tilt_ivar_rms = float(tilt_rms), int(tilt_order), float(tilt_ivar_rms)
        self.redshift_stretch, self.stretch_classes = float(redshift_stretch), frozenset(stretch_classes)
        self.class_label, self.redshift_label = class_label, redshift_label
        self.extra_noise = float(extra_noise)
        self.relabels = self.redshift_stretch > 0
        self.reads = np.zeros(len(samples), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        s = self.samples[i]
        if s.modality != "spectrum":
            raise InputError(f"sample {s.id}", f"is a {s.modality}, and these augmentations apply to spectra",
                             "fine-tune with tilt_rms, tilt_ivar_rms, extra_noise and redshift_stretch 0")
        rng = np.random.default_rng([self.seed, int(i), int(self.reads[i])])
        self.reads[i] += 1
        wave, values, ivar, meta = s.coords["wavelength"], s.values, s.ivar, s.meta
        if self.tilt_rms > 0 or self.tilt_ivar_rms > 0:  # f is drawn whenever either tilt is on, so g's draw does not depend on tilt_rms
            f = smooth_tilt(wave, rng, self.tilt_rms, self.tilt_order)
            g = smooth_tilt(wave, rng, self.tilt_ivar_rms, self.tilt_order) if self.tilt_ivar_rms > 0 else 1.0
            values, ivar = values * f, ivar * g / f**2
        if self.extra_noise > 0:
            k = rng.uniform(0, self.extra_noise)
            sigma = np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), 0.0)
            values, ivar = values + k * sigma * rng.standard_normal(values.shape), ivar / (1 + k * k)
        labels = meta.get("labels") or {}
        if self.redshift_stretch > 0 and labels.get(self.class_label) in self.stretch_classes:
            values, ivar, meta = self._stretch(s, values, ivar, labels, rng)
        return Sample.validated(s.modality, values.astype(s.values.dtype), ivar.astype(s.ivar.dtype), s.coords, meta)

    def _stretch(self, s: Sample, values, ivar, labels: dict, rng: np.random.Generator):
        z = labels.get(self.redshift_label)
        if z is None:
            raise InputError(f"{s.id}: labels.{self.redshift_label}", "is missing, and the redshift stretch moves it", "label the sample's redshift, or set redshift_stretch 0")
        step = log_pixel_step(s.coords["wavelength"], f"{s.id}: coords.wavelength")
        k = int(np.round(rng.uniform(max(-self.redshift_stretch, -np.log1p(z)), self.redshift_stretch) / step))
        k = max(k, -int(np.floor(np.log1p(z) / step)))  # the rounding must not take z below 0
        values, ivar = shift_pixels(values, ivar, k)
        meta = {**s.meta, "labels": {**labels, self.redshift_label: float((1 + z) * np.exp(k * step) - 1)}}
        return values, ivar, meta
