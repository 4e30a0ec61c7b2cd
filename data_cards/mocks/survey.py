"""Spectrum mocks with the variety of real survey spectra (`mock_realism: survey` cards).

Same objects as the basic generator -- `mocks/spectra.mock_object(seed, index)` gives the
class, redshift and r magnitude, so spectra and images of one (seed, index) still show
one object -- with more physics drawn on a separate random stream (5):
- stars (mocks/stellar.py): log g, [Fe/H], [alpha/Fe] and rotation beside Teff;
- galaxies (mocks/galaxy_sps.py): continua from stellar populations of several ages and
  metallicities at their velocity dispersion, stellar dust 0.44 of the gas's, LINER-like
  lines in half the quiescent ones; nebular lines as the basic generator draws them;
- QSOs (mocks/qso.py): the basic model plus Fe II, Balmer continuum, BALs and intergalactic H I;
- every object: Milky-Way dust and interstellar Na D (E(B-V) drawn per sight line; `meta["ebv"]`
  holds what a dust map says of it, data_cards/dust.py), then
  the survey instrument of mocks/instrument.py (sky residuals, telluric residuals,
  flux-calibration error, bad columns, S/N 2-100) on noise stream 4.
The spectrum is renormalised to the object's r magnitude through its own observed model
(for galaxies the magnitude-redshift draw itself used the basic SED's K-correction).
Objects outside the 13 classes are drawn only by mocks/out_of_set.py. A card's `mock_shift`
(schema.py) observes the same objects under other conditions, for shift tests.
"""

from __future__ import annotations

import numpy as np

from cosmofm.data_cards.mocks import galaxy_sps, instrument, qso, stellar
from cosmofm.data_cards.mocks.common import object_rng
from cosmofm.data_cards.mocks.spectra import (
    R_TOP_HAT, Z_RANGE, ObjectParams, _f_lambda_r, calzetti, mock_object, nebular_emission, wavelength_grid,
)
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import SpectrumCard

SURVEY_STREAM = 5  # object_rng stream of the survey-only physics
DUST_MAP_STREAM = 9  # object_rng stream of the dust map's error on E(B-V)
DUST_MAP_ERROR = 0.16  # rms of ln(map / true E(B-V)): SFD98's quoted accuracy


def draw_survey_extras(obj: ObjectParams, rng: np.random.Generator) -> None:
    """Add the survey-only physics to obj.params (in place): stars get log g, [Fe/H],
    [alpha/Fe] and rotation; galaxies their star-formation history; all E(B-V)."""
    p = obj.params
    if obj.cls.startswith("STAR"):
        star = stellar.draw_star(rng, p["teff"])
        p.update(logg=star.logg, feh=star.feh, alpha_fe=star.alpha_fe, vsini_kms=star.vsini_kms)
    elif obj.cls.startswith("GALAXY"):
        p.update(galaxy_sps.draw_population(rng, obj.cls, p))
    elif obj.cls.startswith("QSO"):
        p.update(qso.draw_qso_extras(rng, p, obj.z))
    p["ebv_mw"] = stellar.draw_ebv(rng)


def survey_model(obj: ObjectParams, wave: np.ndarray, resolving_power: float) -> np.ndarray:
    """Noiseless observed-frame f_lambda (~1 at 5500 A rest) of `obj` on `wave`, Milky-Way
    dust included; fills obj.lines for galaxies and QSOs."""
    p = obj.params
    rest = wave / (1 + obj.z)
    if obj.cls.startswith("STAR") or obj.cls.startswith("OOS_"):
        star = stellar.StarParams(p["teff"], p["logg"], p["feh"], p.get("alpha_fe", 0.0), p.get("vsini_kms", 10.0))
        model = stellar.star_spectrum(rest, star, resolving_power)
    elif obj.cls.startswith("GALAXY"):
        cont = galaxy_sps.galaxy_continuum(rest, p, resolving_power)
        lsf_rest = rest / resolving_power / 2.3548
        emission, obj.lines = nebular_emission(p, rest, cont, lsf_rest)
        k = calzetti(rest) / 4.05
        model = cont * 10 ** (-0.4 * 0.44 * p["A_V"] * k) + emission * 10 ** (-0.4 * p["A_V"] * k)
    else:
        model = qso.qso_model(obj, wave, resolving_power)
    return model * stellar.galactic_extinction(wave, p["ebv_mw"])


def dust_map_ebv(seed: int, index: int, ebv: float) -> float:
    """What a dust map says of the E(B-V) of object (seed, index)'s sight line, whose dust is
    `ebv` [mag]: off by DUST_MAP_ERROR (log-normal). Written as `meta["ebv"]`, as DESI's
    FIBERMAP carries EBV (data_cards/dust.py); its own stream, so no other draw moves."""
    return float(ebv * np.exp(DUST_MAP_ERROR * object_rng(seed, index, DUST_MAP_STREAM).standard_normal()))


def survey_object(seed: int, index: int, shift: dict | None = None) -> tuple[ObjectParams, float]:
    """Object (seed, index) of a survey card and the factor to f_lambda [1e-17 erg/s/cm^2/A]
    that gives its observed model the r magnitude mock_object drew. `shift` (a card's
    validated `mock_shift`) maps the redshift onto another range and scales E(B-V) after
    the draws, so a shifted card shows the same objects under other conditions."""
    shift = shift or {}
    obj, _ = mock_object(seed, index)
    family = "galaxy" if obj.cls.startswith("GALAXY") else "qso" if obj.cls.startswith("QSO") else None
    if family and f"{family}_z_range" in shift:  # before the extras: QSO absorbers depend on z
        (a, b), (lo, hi) = Z_RANGE[obj.cls], shift[f"{family}_z_range"]
        obj.z = float(lo + (obj.z - a) / (b - a) * (hi - lo))
    draw_survey_extras(obj, object_rng(seed, index, SURVEY_STREAM))
    obj.params["ebv_mw"] *= shift.get("ebv_scale", 1.0)
    return obj, normalisation(obj)


def normalisation(obj: ObjectParams) -> float:
    ref = np.linspace(*R_TOP_HAT, 400)
    lines = dict(obj.lines)
    norm = _f_lambda_r(obj.mags["r"]) / max(float(np.mean(survey_model(obj, ref, 2000.0))), 1e-30)
    obj.lines = lines  # the line fluxes of the full spectrum, not of the top hat's piece
    return norm


def make_sample(card: SpectrumCard, seed: int, index: int, obj: ObjectParams, norm: float, extra_meta: dict | None = None,
                model_fn=None) -> Sample:
    """Observe `obj` (model from `model_fn`, default survey_model) through the survey
    instrument of `card` and wrap it as a Sample."""
    wave = wavelength_grid(card)
    model = (model_fn or survey_model)(obj, wave, card.resolving_power)
    flux, ivar, and_mask, info = instrument.observe_survey(model, wave, card.resolving_power, object_rng(seed, index, 4), obj.mags.get("r"),
                                                           shift=card.mock_shift)
    truth = {"params": _plain(obj.params), "line_fluxes": {k: v * norm for k, v in obj.lines.items()},
             "mags": {k: float(v) for k, v in obj.mags.items()}, "instrument": info}
    meta = {
        "card": card.name, "id": f"{card.name}-{seed}-{index}", "pair_id": f"obj-{seed}-{index}",
        "labels": {"spectral_class": obj.cls, "redshift": obj.z}, "and_mask_bits": int(np.bitwise_or.reduce(and_mask)),
        "truth": truth, "mock_realism": "survey", "ebv": dust_map_ebv(seed, index, obj.params["ebv_mw"]), **(extra_meta or {}),
    }
    return Sample("spectrum", flux * norm, ivar / norm**2, {"wavelength": wave}, meta)


def mock_spectrum_survey(card: SpectrumCard, seed: int, index: int) -> Sample:
    """A spectrum of object (seed, index) as a real survey records it (module docstring)."""
    obj, norm = survey_object(seed, index, card.mock_shift)
    return make_sample(card, seed, index, obj, norm)


def _plain(params: dict) -> dict:
    return {k: [float(x) for x in v] if isinstance(v, (list, tuple)) else v if isinstance(v, str) else float(v) for k, v in params.items()}
