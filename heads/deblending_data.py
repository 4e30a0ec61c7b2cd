"""The deblending head's data side: the truth of a blend mock and the forward's targets.

Split from `heads/deblending.py` (the network and its `Task`), which imports from here.

* `blend_truth_arrays`: each object's isolated image, centre and total flux of a blend
  Sample (attached by the Task's mocks, else rendered from its truth objects);
* `blend_targets`: the forward's training targets of same-shaped blends (centres, in-stamp
  fluxes, per-pixel fractions as uint8, the noiseless blend);
* `psf_fwhm_pixels`: each band's PSF FWHM of a stamp in its pixels, the observing
  condition a `psf_conditioning` head is told (`DeblendingTask.inputs`);
* `seeing_card`: an image card under other seeing (every band's PSF FWHM scaled);
* `_one_blend`: one blend mock with its isolated images attached (float16 over each
  object's peak), what `DeblendingTask.labelled_mocks` makes in its workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads import deblending_metrics as dm

if TYPE_CHECKING:
    from cosmofm.heads.deblending_config import DeblendingHeadConfig


def truth_objects(sample: Sample) -> list[dict]:
    """The truth objects (JSON dicts) of a blend Sample, without rendering anything; an
    InputError naming the sample when it is not an image or has no blend truth."""
    sid = sample.meta.get("id", "?")
    if sample.modality != "image":
        raise InputError(f"{sid}: modality", f"is {sample.modality!r}, not an image", "deblend multi-band image stamps")
    objects = (sample.meta.get("truth") or {}).get("objects") if isinstance(sample.meta.get("truth"), dict) else None
    if not objects:
        raise InputError(f"{sid}: truth.objects", "is missing: the sample has no blend truth",
                         "train and evaluate deblending on blend mocks (DeblendingTask.labelled_mocks / mock_blend)")
    return objects


def blend_truth_arrays(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(isolated (K, B, H, W) float32, centres (K, 2) [row, col] pixels, total fluxes (K, B)) of a
    blend Sample: from `meta["blend_truth"]` when attached, else rendered from
    `meta["truth"]["objects"]`; an InputError naming the sample when it has no truth."""
    sid = sample.meta.get("id", "?")
    objects = truth_objects(sample)
    from cosmofm.data_cards.mocks.images import Source

    sources = [Source.from_json(o) for o in objects]
    dec, ra = sample.coords["dec_offset"], sample.coords["ra_offset"]
    step = float(dec[1] - dec[0]) if len(dec) > 1 else 1.0
    step_c = float(ra[1] - ra[0]) if len(ra) > 1 else 1.0
    centres = np.array([[(s.dec - dec[0]) / step, (s.ra - ra[0]) / step_c] for s in sources])
    flux = np.array([s.flux_njy for s in sources], np.float64)
    attached = sample.meta.get("blend_truth")
    if attached is not None:
        iso = np.asarray(attached["isolated"], np.float32) * np.asarray(attached["isolated_scale"], np.float32)[:, None, None, None]
    else:
        import dataclasses

        from cosmofm.data_cards.mocks.images import render
        from cosmofm.data_cards.schema import load_card

        card = dataclasses.replace(load_card(sample.card), stamp_size=sample.values.shape[-1])
        iso = render(card, sources).astype(np.float32)
    if iso.shape[0] != len(sources) or iso.shape[1:] != sample.values.shape:
        raise InputError(f"{sid}: blend_truth.isolated", f"has shape {iso.shape}", f"one {sample.values.shape} image per object")
    return iso, centres, flux


def blend_targets(samples: Sequence[Sample], head: DeblendingHeadConfig) -> dict[str, torch.Tensor]:
    """The forward's targets (see `CosmoFMForDeblending.forward`) of same-shaped blend Samples;
    K = the most objects of any sample, read from the truth metadata. Every sample's truth is
    checked before any array is made; the isolated images are then built one blend at a time
    (all at once would be ~0.4 MB a blend in float32: 2 GB for 5,000 blends)."""
    if not samples:
        raise InputError("samples", "is empty", "give blend samples")
    shapes = {tuple(s.values.shape) for s in samples}
    if len(shapes) != 1:
        raise InputError("samples", f"have several shapes {sorted(shapes)}", "deblending targets need stamps of one shape")
    k = max([len(truth_objects(s)) for s in samples])  # every sample checked (a list, not a short-circuit)
    b, h, w = samples[0].values.shape
    n = len(samples)
    centres = torch.full((n, k, 2), float("nan"))
    fluxes = torch.full((n, k, b), float("nan"))
    total = torch.full((n, k, b), float("nan"))
    fractions = torch.zeros((n, k + 1, b, h, w), dtype=torch.uint8)
    noiseless = torch.zeros((n, b, h, w))
    for i, s in enumerate(samples):
        iso, c, f = blend_truth_arrays(s)
        m = len(c)
        iso = np.clip(iso, 0, None)
        eps = head.background_level * dm.sky_sigma(s.ivar)[:, None, None]  # (B, 1, 1)
        denom = iso.sum(0) + eps
        centres[i, :m] = torch.from_numpy(c).float()
        fluxes[i, :m] = torch.from_numpy(iso.sum((2, 3))).float()
        total[i, :m] = torch.from_numpy(f).float()
        fractions[i, :m] = torch.from_numpy(np.rint(255 * iso / denom).astype(np.uint8))
        fractions[i, k] = torch.from_numpy(np.rint(255 * eps / denom).astype(np.uint8))
        noiseless[i] = torch.from_numpy(iso.sum(0)).float()
    return {"centres": centres, "fluxes": fluxes, "fractions": fractions, "total_flux": total, "noiseless": noiseless}


def psf_fwhm_pixels(sample: Sample, head: DeblendingHeadConfig) -> np.ndarray:
    """(B,) each band's PSF FWHM [pixels] of a stamp: `meta["psf_fwhm_arcsec"]` (a stamp
    cut from a mosaic that gives PSFFWHM, `stamp_sample`) or a blend mock's
    `meta["truth"]["psf"]["fwhm_arcsec"]`, over the pixel step of its `dec_offset` coords
    [arcsec]; the head's training card's (`reference_fwhm`) when the stamp gives none."""
    truth = sample.meta.get("truth") if isinstance(sample.meta.get("truth"), dict) else {}
    arcsec = sample.meta.get("psf_fwhm_arcsec", (truth.get("psf") or {}).get("fwhm_arcsec"))
    dec = np.asarray(sample.coords.get("dec_offset", []), float)
    b = sample.values.shape[0]
    if arcsec is None or len(dec) < 2:
        return np.asarray(head.reference_fwhm(), np.float32)
    arcsec = np.asarray(arcsec, float).reshape(-1)
    if arcsec.size not in (1, b) or not (np.isfinite(arcsec).all() and (arcsec > 0).all()):
        raise InputError(f"{sample.meta.get('id', '?')}: PSF FWHM", f"is {arcsec.tolist()} arcsec", "give a positive PSF FWHM per band")
    return np.broadcast_to(arcsec / abs(float(dec[1] - dec[0])), (b,)).astype(np.float32)


def seeing_card(card, psf_scale: float):
    """`card` with every band's PSF FWHM x psf_scale (other seeing); the card itself at 1."""
    import dataclasses

    if psf_scale == 1:
        return card
    if not psf_scale > 0:
        raise InputError("psf_scale", f"is {psf_scale!r}", "a positive factor on the card's PSF FWHM, e.g. 1.25")
    return dataclasses.replace(card, bands=[dataclasses.replace(b, psf_fwhm=b.psf_fwhm * psf_scale) for b in card.bands])


def _one_blend(cards: Sequence, seed: int, settings: dict, index: int) -> Sample:
    """Blend `index` of universe `seed`, drawn on cards[index % len(cards)] (one per seeing)."""
    from cosmofm.data_cards.mocks.blends import mock_blend

    sample, truth = mock_blend(cards[index % len(cards)], seed, index, **settings)
    scale = truth.isolated.reshape(len(truth.isolated), -1).max(1).clip(min=1e-30)
    sample.meta["blend_truth"] = {"isolated": (truth.isolated / scale[:, None, None, None]).astype(np.float16),
                                  "isolated_scale": scale.astype(np.float32)}
    return sample
