"""Spectra of objects outside the 13 classes, for out-of-set (OOD) test sets.

Never mixed into the class draws of `mock_spectrum`: `mock_out_of_set(card, seed, index)`
draws one of OOS_CLASSES (or the `kind` asked for), labelled `spectral_class: "OOS_..."`
and `meta["out_of_set"] = True`, observed through the survey instrument of
mocks/instrument.py whatever the card's `mock_realism`.

- OOS_MSTAR: M dwarfs (85 %, log g 4.7-5.2) and M giants (log g 0.5-1.5), 2700-3900 K:
  TiO bands, CaH and Na I 8190 in the dwarfs (Reid, Hawley & Gizis 1995; West et al.
  2011, AJ 141, 97 for the SDSS M-dwarf population).
- OOS_WD: DA white dwarfs, 7000-40000 K, log g ~ 8: pure hydrogen, Balmer lines tens of
  A wide from Stark broadening at high density, strongest near 12000 K (Koester 2010,
  Mem. S.A.It. 81, 921; Kleinman et al. 2013, ApJS 204, 5).
- OOS_CARBON: cool carbon stars (2700-3600 K): C2 Swan bands (heads at 4737, 5165, 5636 A,
  degrading to the blue), CN red-system bands, depressed blue, no TiO (Barnbaum, Stone &
  Keenan 1996, ApJS 105, 419; Green 2013, ApJ 765, 12).
- OOS_SKY: a fibre on blank sky processed as an object: sky lines, a small residual
  continuum (either sign) and noise at the sky level.
- OOS_BROKEN: a broken or mis-extracted fibre: pure noise, a step between two levels
  (a dead amplifier half), or zeros with ivar = 0 over most of the range.
"""

from __future__ import annotations

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import instrument, stellar
from cosmofm.data_cards.mocks.common import object_rng
from cosmofm.data_cards.mocks.luminosity import SURVEY_WINDOW
from cosmofm.data_cards.mocks.spectra import R_TOP_HAT, ObjectParams, _f_lambda_r, wavelength_grid
from cosmofm.data_cards.mocks.survey import dust_map_ebv, make_sample, normalisation
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import SpectrumCard

OOS_CLASSES = ("OOS_MSTAR", "OOS_WD", "OOS_CARBON", "OOS_SKY", "OOS_BROKEN")
OOS_STREAM = 6  # object_rng stream of the out-of-set draws (4 = instrument noise)


def draw_out_of_set(rng: np.random.Generator, kind: str) -> ObjectParams:
    rv = float(rng.normal(0, 40))
    ebv = stellar.draw_ebv(rng)
    if kind == "OOS_MSTAR":
        dwarf = rng.random() < 0.85
        p = {"teff": rng.uniform(2700, 3900), "logg": rng.uniform(4.7, 5.2) if dwarf else rng.uniform(0.5, 1.5),
             "feh": float(np.clip(rng.normal(-0.2, 0.3), -1.5, 0.4)), "vsini_kms": rng.uniform(3, 12)}
    elif kind == "OOS_WD":
        p = {"teff": float(np.exp(rng.uniform(np.log(7000), np.log(40000)))), "logg": float(rng.normal(8.0, 0.25)), "feh": -5.0, "vsini_kms": 10.0}
    elif kind == "OOS_CARBON":
        p = {"teff": rng.uniform(2700, 3600), "logg": rng.uniform(0.0, 1.5), "feh": float(rng.normal(-0.3, 0.3)),
             "vsini_kms": 5.0, "c2": rng.uniform(0.5, 1.5), "cn": rng.uniform(0.3, 1.0)}
    else:
        p = {}
    p = {k: float(v) for k, v in p.items()}
    p["ebv_mw"] = ebv
    return ObjectParams(kind, rv / stellar.C_KMS if kind in ("OOS_MSTAR", "OOS_WD", "OOS_CARBON") else 0.0, p)


def _wd_features(p: dict) -> list[tuple]:
    """Balmer lines of a DA white dwarf: Stark wings of tens of A, strongest near 12000 K."""
    strength = float(np.exp(-((np.log(p["teff"] / 12500.0) / 0.45) ** 2)))
    gamma = 25.0 * strength * 10 ** (0.3 * (p["logg"] - 8.0)) + 3.0
    return [("line", lam, 3.0, 1.5 * strength * k, gamma * k, 1.2 * strength * k)
            for lam, k in ((6564.6, 0.7), (4862.7, 1.0), (4341.7, 1.0), (4102.9, 0.9), (3971.2, 0.8), (3890.2, 0.6))]


def _carbon_features(p: dict) -> list[tuple]:
    """C2 Swan bands (degrading to the blue) and CN red-system bands (to the red)."""
    c2, cn = p["c2"], p["cn"]
    swan = [("band", head * stellar.AIR_TO_VAC, 0, k * c2, -1, length)
            for head, k, length in ((4737.1, 1.0, 120.0), (5165.2, 1.2, 150.0), (5635.5, 0.9, 150.0), (6191.0, 0.4, 100.0))]
    cnr = [("band", head * stellar.AIR_TO_VAC, 0, k * cn, +1, length)
           for head, k, length in ((6925.0, 0.5, 80.0), (7088.0, 0.6, 100.0), (7874.0, 0.8, 120.0), (8067.0, 0.7, 150.0), (9140.0, 0.6, 150.0))]
    return swan + cnr + [("line", 5893.0, 3.0, 1.0, 1.0, 0.3)]  # strong Na D


def _special_model(obj: ObjectParams, wave: np.ndarray, resolving_power: float) -> np.ndarray:
    """White dwarfs and carbon stars: a Planck continuum with their own features."""
    p = obj.params
    rest = wave / (1 + obj.z)
    sigma = float(np.hypot(p["vsini_kms"] / stellar.C_KMS, stellar.lsf_sigma_lnl(resolving_power)))
    ln = stellar.fine_grid(float(rest.min()), float(rest.max()), sigma)
    lam = np.exp(ln)
    flux = stellar.planck(lam, p["teff"]) / stellar.planck(5500.0, p["teff"])
    if obj.cls == "OOS_WD":
        tau = stellar.optical_depth(ln, _wd_features(p))
    else:
        tau = stellar.optical_depth(ln, _carbon_features(p)) + 0.8 * np.clip((4600.0 / lam) ** 3 - 1, 0, None)
    flux = stellar.broaden(flux * np.exp(-tau), ln[1] - ln[0], sigma)
    return np.interp(np.log(rest), ln, flux) * stellar.galactic_extinction(wave, p["ebv_mw"])


def _not_astrophysical(card: SpectrumCard, obj: ObjectParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(flux, ivar, and_mask bits) of a sky fibre or a broken fibre, in f_lambda units."""
    wave = wavelength_grid(card)
    level = _f_lambda_r(rng.uniform(*SURVEY_WINDOW))  # of the size of a faint target's flux
    if obj.cls == "OOS_SKY":
        cont, lines = instrument.sky_spectrum(wave, card.resolving_power)
        sub = rng.uniform(0.0, 1.0)  # how much of the sky the pipeline subtracted
        t = (wave - wave.mean()) / np.ptp(wave)
        signal = level * ((1 - sub) * (cont + lines) + rng.normal(0, 0.1) * (1 + rng.normal(0, 0.5) * t))
        sigma = level * np.sqrt(0.02 * (cont + lines) + 0.01)
        obj.params.update(sky_subtracted=float(sub))
        return signal + rng.normal(0, 1, wave.size) * sigma, 1 / sigma**2, 0
    mode = int(rng.integers(3))
    obj.params.update(broken_mode=float(mode))
    sigma = np.full(wave.size, level * rng.uniform(0.1, 1.0))
    flux = rng.normal(0, 1, wave.size) * sigma
    ivar = 1 / sigma**2
    if mode == 1:  # a step: one half of the detector dead or offset
        cut = int(rng.integers(wave.size // 5, 4 * wave.size // 5))
        flux[cut:] += level * rng.uniform(-2, 5)
    elif mode == 2:  # zeros, flagged over most of the range
        flux[:] = 0.0
        dead = rng.random() < 0.5
        ivar[:] = 0.0 if dead else ivar
        return flux, ivar, instrument.BAD_COLUMN if dead else 0
    return flux, ivar, 0


def mock_out_of_set(card: SpectrumCard, seed: int, index: int, kind: str | None = None) -> Sample:
    """Out-of-set object (seed, index) of `kind` (one of OOS_CLASSES; None draws one)."""
    if kind is not None and kind not in OOS_CLASSES:
        raise InputError("kind", f"{kind!r} is not an out-of-set class", f"use one of {list(OOS_CLASSES)} or None")
    rng = object_rng(seed, index, OOS_STREAM)
    kind = kind or OOS_CLASSES[int(rng.integers(len(OOS_CLASSES)))]
    obj = draw_out_of_set(rng, kind)
    extra = {"out_of_set": True}
    if kind in ("OOS_SKY", "OOS_BROKEN"):
        flux, ivar, bits = _not_astrophysical(card, obj, rng)
        meta = {"card": card.name, "id": f"{card.name}-oos-{seed}-{index}", "pair_id": f"oos-{seed}-{index}",
                "labels": {"spectral_class": kind, "redshift": 0.0}, "and_mask_bits": int(bits),
                "truth": {"params": {k: float(v) for k, v in obj.params.items()}}, "mock_realism": "survey",
                "ebv": dust_map_ebv(seed, index, obj.params["ebv_mw"]), **extra}
        return Sample("spectrum", flux, ivar, {"wavelength": wavelength_grid(card)}, meta)
    obj.mags = {"r": float(rng.uniform(*SURVEY_WINDOW))}
    if kind == "OOS_MSTAR":
        norm = normalisation(obj)
    else:
        ref = np.linspace(*R_TOP_HAT, 400)
        norm = _f_lambda_r(obj.mags["r"]) / max(float(np.mean(_special_model(obj, ref, 2000.0))), 1e-30)
    sample = make_sample(card, seed, index, obj, norm, extra, model_fn=None if kind == "OOS_MSTAR" else _special_model)
    sample.meta["id"], sample.meta["pair_id"] = f"{card.name}-oos-{seed}-{index}", f"oos-{seed}-{index}"
    return sample


def generate_out_of_set(card: SpectrumCard, n: int, seed: int = 0, kinds: tuple[str, ...] | None = None) -> list[Sample]:
    """n out-of-set spectra (indices 0..n-1); with `kinds`, cycled through those kinds."""
    if kinds is not None:
        bad = [k for k in kinds if k not in OOS_CLASSES]
        if bad or not kinds:
            raise InputError("kinds", f"{bad or kinds!r} are not out-of-set classes", f"use some of {list(OOS_CLASSES)}")
    return [mock_out_of_set(card, seed, i, kinds[i % len(kinds)] if kinds else None) for i in range(n)]
