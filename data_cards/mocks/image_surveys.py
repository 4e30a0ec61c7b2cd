"""The surveys behind the shipped image cards: which surveycodex survey and speclite filter
curve each band is, and the depth (electrons per nJy, sky noise) surveycodex gives them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import NJY_AB_ZP
from cosmofm.data_cards.schema import ImageCard


@dataclass(frozen=True)
class SurveyBands:
    """Which surveycodex survey and which speclite filter curve each band of a card is."""

    codex: str  # surveycodex survey name
    bands: dict[str, tuple[str, str]]  # card band name -> (surveycodex filter, speclite filter)
    space: bool = False  # PSF: Airy (x) jitter instead of Kolmogorov (x) Airy


SURVEYS: dict[str, SurveyBands] = {
    "lsst-like": SurveyBands("LSST", {b: (b, f"lsst2023-{b}") for b in "ugrizy"}),
    "hsc-like": SurveyBands("HSC", {b: (b, f"hsc2017-{b}") for b in "grizy"}),
    "euclid-like": SurveyBands("Euclid_VIS", {"VIS": ("IE", "Euclid-VIS")}, space=True),
}


def _codex_filter(survey: str, filter_name: str):
    import surveycodex

    if survey not in surveycodex.available_surveys:
        raise InputError("survey", f"{survey!r} is not a surveycodex survey", f"use one of {surveycodex.available_surveys}")
    s = surveycodex.get_survey(survey)
    if filter_name not in s.available_filters:
        raise InputError("band", f"{filter_name!r} is not a {survey} filter", f"use one of {s.available_filters}")
    return s, s.get_filter(filter_name)


def electrons_per_njy(survey: str, filter_name: str) -> float:
    """Photo-electrons collected from a 1 nJy source over the survey's full exposure.

    c = t * 10^(-0.4 (31.4 - zp)), with zp the surveycodex zero point (AB mag giving
    1 e-/s, computed by surveycodex with speclite) and t its `full_exposure_time`.
    """
    _, f = _codex_filter(survey, filter_name)
    return float(f.full_exposure_time.to_value("s") * 10 ** (-0.4 * (NJY_AB_ZP - f.zeropoint.value)))


def sky_noise_njy(survey: str, filter_name: str, pixel_scale: float | None = None) -> float:
    """Per-pixel sky noise [nJy] of a full-depth survey image, from surveycodex.

    N_sky = 10^(-0.4 (mu_sky - zp)) * t * p^2 electrons per pixel (surveycodex's
    `mean_sky_level`: sky brightness mu_sky [mag/arcsec^2], zero point zp [AB mag for
    1 e-/s], exposure t [s], pixel scale p [arcsec]); its Poisson noise sqrt(N_sky) in
    electrons is divided by `electrons_per_njy`. Read noise and dark current are ignored
    (sky-dominated full-depth images).
    """
    s, f = _codex_filter(survey, filter_name)
    p = s.pixel_scale.to_value("arcsec") if pixel_scale is None else float(pixel_scale)
    n_sky = 10 ** (-0.4 * (f.sky_brightness.value - f.zeropoint.value)) * f.full_exposure_time.to_value("s") * p**2
    return float(np.sqrt(n_sky) / electrons_per_njy(survey, filter_name))


def survey_of(card: ImageCard) -> SurveyBands | None:
    survey = SURVEYS.get(card.name)
    if survey is not None:
        unknown = [b.name for b in card.bands if b.name not in survey.bands]
        if unknown:
            raise InputError(f"{card.name}.image.bands", f"band(s) {unknown} are not {survey.codex} bands",
                             f"use bands {sorted(survey.bands)}, or rename the card to get top-hat bands")
    return survey


def filter_names(card: ImageCard) -> tuple[str | None, ...]:
    """The speclite filter curve of each band (None: +-10 % top hat).

    Shipped survey cards map their bands through `SURVEYS`; in any other card a band
    named like a speclite filter ("decam2014-g") uses that curve.
    """
    survey = survey_of(card)
    if survey is not None:
        return tuple(survey.bands[b.name][1] for b in card.bands)
    return tuple(b.name if _is_speclite_filter(b.name) else None for b in card.bands)


@functools.lru_cache(maxsize=None)
def _is_speclite_filter(name: str) -> bool:
    import speclite.filters

    try:
        speclite.filters.load_filter(name)
    except (ValueError, OSError):
        return False
    return True
