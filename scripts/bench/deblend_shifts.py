"""The settings a deblending head is tested (`--test-shift`) or trained (`--train-shifts`) under
in `deblend_quality`: other seeing, depth and sky-subtraction residuals than the card's."""

from __future__ import annotations

import dataclasses

import numpy as np

SHIFTS = ("psf_scale", "noise_scale", "sky_offset")  # keys of --test-shift and --train-shifts (`shifted_card`)


def shifted_card(card, shift: dict, option: str = "--test-shift"):
    """(the card blends are drawn from, the sky offset added to their pixels) for a shift
    (`--test-shift`, one of `--train-shifts`): every band's PSF FWHM x psf_scale (seeing),
    its sky noise x noise_scale (depth: 2 = a quarter of the exposure), and sky_offset sky
    sigmas added to every pixel of every band (a sky-subtraction residual). Under
    --test-shift the head, its threshold and the baselines' contrasts stay as trained and
    tuned on the training blends, as a survey would run them."""
    from cosmofm.data_cards.errors import InputError

    for key, value in shift.items():
        if key not in SHIFTS:
            raise InputError(f"{option} {key}", "is not a known shift", f"use some of {list(SHIFTS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if key == "sky_offset" else value > 0):
            raise InputError(f"{option} {key}", f"{value!r} is not a {'number >= 0' if key == 'sky_offset' else 'positive factor'}",
                             "e.g. psf_scale=1.25 noise_scale=2 sky_offset=0.2")
    from cosmofm.heads.deblending_data import seeing_card

    card = seeing_card(card, float(shift.get("psf_scale", 1.0)))
    noise = shift.get("noise_scale", 1.0)
    bands = [dataclasses.replace(b, sky_noise=b.sky_noise * noise) for b in card.bands]
    return dataclasses.replace(card, bands=bands), float(shift.get("sky_offset", 0.0))


def offset_sky(blends, card, offset: float) -> list:
    """The blends with `offset` x each band's sky sigma (`card`'s) added to every pixel."""
    if not offset:
        return blends
    sigma = np.array([b.sky_noise for b in card.bands])[:, None, None]
    return [(dataclasses.replace(s, values=np.asarray(s.values) + offset * sigma), t) for s, t in blends]
