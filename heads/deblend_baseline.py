"""Classical deblending baselines beside the deblending head, on the same multi-band stamps.

What a survey user runs without a learned model (the comparison of COIN, Boucaud et al.
2020, arXiv:1905.01324, and of BTK, Mendoza et al. 2024, arXiv:2409.06986):

- **sep** (Barbary 2016, JOSS 1, 58; SExtractor's algorithms, Bertin & Arnouts 1996):
  a global background per band (`sep.Background` with one mesh the size of the stamp),
  detection on the inverse-variance-weighted sum of the bands (its variance 1 / sum
  ivar, threshold in sigma), SExtractor's multi-threshold deblending (deblend_nthresh 32,
  deblend_cont tuned on training blends by detection F1, `tune_deblend_cont`); per band
  a circular aperture flux, the Kron ("MAG_AUTO") flux in 2.5 Kron radii and the
  isophotal flux (the sum over the object's pixels of the segmentation map), with errors.
- **photutils** (Bradley et al., photutils 3): the same detection image smoothed with a
  Gaussian of the PSF FWHM, `detect_sources` + `deblend_sources` (32 levels, exponential,
  contrast tuned the same way), and per band `SourceCatalog` segment and Kron fluxes with
  the detection image's apertures (`detection_catalog`); the global background per band
  is SExtractor's clipped mode estimate from astropy (`_clipped_background`), so this
  pipeline runs without sep.

- **scarlet2** (Sampson et al. 2024, arXiv:2405.14960; optional, extra `scarlet`: it
  brings jax): the model-fitting deblender of Rubin's lineage, run as its 0.5.1 tutorials
  run multi-band galaxy scenes (`scarlet2_deblend`): one non-parametric source per given
  centre (true centres, or sep's detections as its docs suggest, scarlet2 0.5.1 having no
  detector), the stamp's PSF per band (`mock_psf`), 1,000 Adam steps; fluxes = the sum of
  each source's model ("model") and the image split by the models' ratios ("reweighted").

All return a `DeblendCatalog` (positions in pixels, per-band fluxes and errors by
method, the segmentation map), scored by `heads.deblending_metrics`. `python -m
cosmofm.heads.deblend_baseline --n 200` tunes both on training blends and prints the
metrics and stamps per second on held-out 64 x 64 lsst-like blends.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.blends import footprint_segmentation
from cosmofm.data_cards.sample import Sample
from cosmofm.heads import deblending_metrics as dm

THRESH_SIGMA = 1.5  # detection threshold on the detection image, in its 1-sigma noise
MIN_AREA = 5  # pixels above threshold a detection needs
N_LEVELS = 32  # multi-threshold deblending levels (SExtractor's DEBLEND_NTHRESH)
APERTURE_FWHM = 1.0  # circular aperture radius, in units of the worst band's PSF FWHM
CONT_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)  # deblend_cont / contrast values tried


def _require(module: str, extra: str = "deblend"):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"the {module} deblending baseline needs `{module}`: pip install -c constraints.txt -e '.[{extra}]'") from err


@dataclass
class DeblendCatalog:
    """Detections of one stamp. positions (K, 2) [row, column] pixels; fluxes[method] and
    flux_errors[method] (K, B) in the stamp's flux unit; segmentation (H, W) int32, 0 =
    background, k + 1 = detection k."""

    positions: np.ndarray
    fluxes: dict[str, np.ndarray]
    flux_errors: dict[str, np.ndarray]
    segmentation: np.ndarray
    method: str
    bands: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.positions)

    def to_table(self):
        """An astropy Table: ROW, COL, then FLUX_<METHOD>_<band> and FLUXERR_<METHOD>_<band>."""
        from astropy.table import Table

        t = Table({"ROW": self.positions[:, 0], "COL": self.positions[:, 1]})
        bands = self.bands or [str(b) for b in range(next(iter(self.fluxes.values())).shape[1])]
        for m, f in self.fluxes.items():
            for b, name in enumerate(bands):
                t[f"FLUX_{m.upper()}_{name}"] = f[:, b]
                t[f"FLUXERR_{m.upper()}_{name}"] = self.flux_errors[m][:, b]
        return t


def _stamp(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(values, ivar, bad, band names) as float64 C arrays; bad = ivar <= 0 or not finite."""
    if sample.modality != "image":
        raise InputError(str(sample.meta.get("id", "?")), f"is a {sample.modality}, not an image", "deblend multi-band image stamps")
    values, ivar = np.asarray(sample.values, np.float64), np.asarray(sample.ivar, np.float64)
    bad = ~(np.isfinite(values) & np.isfinite(ivar) & (ivar > 0))
    if bad.all():
        raise InputError(str(sample.meta.get("id", "?")), "has no pixel with ivar > 0", "give a stamp with valid pixels")
    names = [str(b) for b in sample.meta.get("truth", {}).get("filters", []) or []]
    names = names if len(names) == len(values) else [str(b) for b in range(len(values))]
    return np.where(bad, 0.0, values), np.where(bad, 0.0, ivar), bad, names


def _flag_empty_bands(catalog: "DeblendCatalog", bad: np.ndarray) -> "DeblendCatalog":
    """Fluxes NaN and errors inf in bands without a single valid pixel."""
    empty = bad.all(axis=(1, 2))  # (B,)
    for m in catalog.fluxes:
        catalog.fluxes[m][:, empty] = np.nan
        catalog.flux_errors[m][:, empty] = np.inf
    return catalog


def detection_image(values: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, variance) of the inverse-variance-weighted mean of the bands, (B, H, W) -> (H, W);
    variance 1 / sum ivar (inf where no band has ivar > 0)."""
    w = ivar.sum(axis=0)  # (H, W)
    with np.errstate(divide="ignore", invalid="ignore"):
        image = np.where(w > 0, (ivar * values).sum(axis=0) / np.where(w > 0, w, 1), 0.0)
        return image, np.where(w > 0, 1 / np.where(w > 0, w, 1), np.inf)


def _variance(ivar: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(ivar > 0, 1 / np.where(ivar > 0, ivar, 1), 0.0)


def _sep_background(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """(B, H, W) values minus a global background per band: sep.Background with one mesh
    of the stamp's size (SExtractor's clipped mode estimate), so objects filling a small
    stamp do not carve holes in it."""
    sep = _require("sep")
    h, w = values.shape[1:]
    out = np.empty_like(values)
    for b in range(len(values)):
        if bad[b].all():
            out[b] = values[b]
            continue
        bkg = sep.Background(np.ascontiguousarray(values[b]), mask=bad[b], bw=w, bh=h, fw=1, fh=1)
        out[b] = values[b] - bkg.globalback
    return out


def _clipped_background(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """(B, H, W) values minus a global background per band: SExtractor's mode estimate
    2.5 median - 1.5 mean of the 3-sigma-clipped good pixels (the median when the two
    disagree by more than 30 % of the clipped sigma), as sep.Background on one mesh."""
    from astropy.stats import sigma_clipped_stats

    out = np.empty_like(values)
    for b in range(len(values)):
        if bad[b].all():
            out[b] = values[b]
            continue
        mean, median, std = sigma_clipped_stats(values[b][~bad[b]], sigma=3.0, maxiters=10)
        mode = 2.5 * median - 1.5 * mean if abs(mean - median) < 0.3 * std else median
        out[b] = values[b] - mode
    return out


def sep_deblend(sample: Sample, deblend_cont: float = 0.001, fwhm_pixels: float = 4.5, thresh: float = THRESH_SIGMA,
                subtract_background: bool = True, mask_neighbours: bool = True) -> DeblendCatalog:
    """sep detection and multi-threshold deblending on the detection image (deblend_cont's
    default tuned on 60 lsst-like training blends, `tune_contrast`); per band
    "aperture" (radius APERTURE_FWHM x fwhm_pixels), "kron" (2.5 Kron radii, at least
    1.75 FWHM) and "isophotal" (segment sum) fluxes with errors sqrt(sum 1/ivar);
    NaN fluxes (errors inf) in a band without valid pixels.
    mask_neighbours: leave the pixels of the other detections' segments out of the
    aperture and Kron sums (and of the Kron radius), as SExtractor's MASK_TYPE."""
    sep = _require("sep")
    values, ivar, bad, names = _stamp(sample)
    if subtract_background:
        values = _sep_background(values, bad)
    det, det_var = detection_image(values, ivar)
    mask = ~np.isfinite(det_var)
    objects, segmap = sep.extract(det, thresh, var=np.where(mask, 0.0, det_var), mask=mask, minarea=MIN_AREA,
                                  deblend_nthresh=N_LEVELS, deblend_cont=deblend_cont, segmentation_map=True)
    k, nb = len(objects), len(values)
    x, y = np.asarray(objects["x"], np.float64), np.asarray(objects["y"], np.float64)
    var = _variance(ivar)
    fluxes = {m: np.zeros((k, nb)) for m in ("aperture", "kron", "isophotal")}
    errors = {m: np.zeros((k, nb)) for m in fluxes}
    if k:
        a, b_, theta = (np.asarray(objects[c], np.float64) for c in ("a", "b", "theta"))
        theta = np.clip(theta, -np.pi / 2, np.pi / 2)  # sep's float32 pi/2 exceeds the float64 one: sum_ellipse refused it
        seg = {"seg_id": np.arange(1, k + 1, dtype=np.int32), "segmap": segmap.astype(np.int32)} if mask_neighbours else {}
        kron, _ = sep.kron_radius(det, x, y, a, b_, theta, 6.0, mask=mask, **seg)
        kron = np.where(np.isfinite(kron) & (kron > 0), kron, 1.0)
        r_min = 1.75 * fwhm_pixels / 2  # a circle of this radius when the Kron ellipse is smaller (sep docs' recipe, scaled to the PSF)
        small = 2.5 * kron * np.sqrt(a * b_) < r_min
        labels = segmap.ravel()
        for b in range(nb):
            data = np.ascontiguousarray(values[b])
            vb = np.ascontiguousarray(var[b])
            f, e, _ = sep.sum_circle(data, x, y, APERTURE_FWHM * fwhm_pixels, var=vb, mask=bad[b], **seg)
            fluxes["aperture"][:, b], errors["aperture"][:, b] = f, e
            f, e, _ = sep.sum_ellipse(data, x, y, a, b_, theta, 2.5 * kron, var=vb, mask=bad[b], subpix=1, **seg)
            fc, ec, _ = sep.sum_circle(data, x, y, r_min, var=vb, mask=bad[b], subpix=1, **seg)
            fluxes["kron"][:, b], errors["kron"][:, b] = np.where(small, fc, f), np.where(small, ec, e)
            fluxes["isophotal"][:, b] = np.bincount(labels, weights=data.ravel(), minlength=k + 1)[1:k + 1]
            errors["isophotal"][:, b] = np.sqrt(np.bincount(labels, weights=vb.ravel(), minlength=k + 1)[1:k + 1])
    return _flag_empty_bands(DeblendCatalog(np.stack([y, x], axis=1).reshape(k, 2), fluxes, errors, segmap.astype(np.int32), "sep", names), bad)


def photutils_deblend(sample: Sample, contrast: float = 0.01, fwhm_pixels: float = 4.5, thresh: float = THRESH_SIGMA,
                      subtract_background: bool = True) -> DeblendCatalog:
    """photutils detect_sources + deblend_sources on the smoothed detection image (contrast's
    default tuned as sep's); per band
    SourceCatalog "segment" and "kron" fluxes with errors, apertures from the detection image."""
    _require("photutils")
    from astropy.convolution import convolve
    from photutils.utils.exceptions import NoDetectionsWarning
    from photutils.segmentation import SourceCatalog, deblend_sources, detect_sources, make_2dgaussian_kernel

    values, ivar, bad, names = _stamp(sample)
    if subtract_background:
        values = _clipped_background(values, bad)
    det, det_var = detection_image(values, ivar)
    mask = ~np.isfinite(det_var)
    size = int(2 * round(1.5 * fwhm_pixels) + 1)
    kernel = make_2dgaussian_kernel(fwhm_pixels, size=size)
    smooth = convolve(det, kernel, mask=mask, normalize_kernel=True)
    # noise of the smoothed image: sigma * sqrt(sum k^2) for white noise
    threshold = thresh * np.sqrt(np.where(mask, np.inf, det_var) * np.sum(kernel.array ** 2))
    nb, (h, w) = len(values), det.shape
    with warnings.catch_warnings():  # an empty field is a valid, empty answer
        warnings.simplefilter("ignore", NoDetectionsWarning)
        segm = detect_sources(smooth, threshold, MIN_AREA, mask=mask)
    if segm is None:
        empty = {m: np.zeros((0, nb)) for m in ("segment", "kron")}
        return DeblendCatalog(np.zeros((0, 2)), empty, {m: v.copy() for m, v in empty.items()}, np.zeros((h, w), np.int32), "photutils", names)
    segm = deblend_sources(smooth, segm, MIN_AREA, n_levels=N_LEVELS, contrast=contrast, mode="exponential", progress_bar=False)
    det_cat = SourceCatalog(det, segm, convolved_data=smooth, error=np.sqrt(np.where(mask, 0.0, det_var)), mask=mask)
    k = len(det_cat)
    fluxes = {m: np.zeros((k, nb)) for m in ("segment", "kron")}
    errors = {m: np.zeros((k, nb)) for m in fluxes}
    var = _variance(ivar)
    for b in range(nb):
        cat = SourceCatalog(values[b], segm, convolved_data=smooth, error=np.sqrt(var[b]), mask=bad[b], detection_catalog=det_cat)
        for m in fluxes:
            f, e = getattr(cat, f"{m}_flux"), getattr(cat, f"{m}_flux_err")
            fluxes[m][:, b] = np.asarray(f, np.float64)  # NaN where photutils could not measure: a flag
            errors[m][:, b] = np.nan_to_num(np.asarray(e, np.float64), nan=np.inf)
    positions = np.stack([np.asarray(det_cat.y_centroid, np.float64), np.asarray(det_cat.x_centroid, np.float64)], axis=1)
    # segmentation labels follow the catalogue's order (relabelled consecutively by deblend_sources)
    lut = np.zeros(segm.max_label + 1, np.int32)
    lut[np.asarray(det_cat.label)] = np.arange(1, k + 1)
    return _flag_empty_bands(DeblendCatalog(positions, fluxes, errors, lut[segm.data].astype(np.int32), "photutils", names), bad)


PIPELINES: dict[str, tuple[Callable[..., DeblendCatalog], str]] = {"sep": (sep_deblend, "deblend_cont"), "photutils": (photutils_deblend, "contrast")}


def fwhm_in_pixels(card) -> float:
    """The worst (largest) PSF FWHM of an image card's bands, in pixels."""
    return max(float((b.psf_fwhm / card.pixel_scale).decompose().value) for b in card.bands)


def reference_band(card) -> int:
    """The index of an image card's band nearest 6231 A (r), where headline fluxes are measured."""
    return int(np.argmin([abs(b.wavelength.to_value("Angstrom") - 6231) for b in card.bands]))


def score(catalog: DeblendCatalog, truth, fwhm_pixels: float, method: str) -> dict:
    """`deblending_metrics.score_stamp` of one catalogue's `method` fluxes against a BlendTruth."""
    return dm.score_stamp(truth.pixel_positions, truth.flux_njy, catalog.positions, catalog.fluxes[method], fwhm_pixels)


def tune_contrast(pipeline: str, blends: Sequence[tuple[Sample, object]], fwhm_pixels: float, grid: Sequence[float] = CONT_GRID) -> float:
    """The deblending contrast of `grid` with the best detection F1 on training blends (the
    larger value on ties: less over-splitting)."""
    fn, arg = PIPELINES[pipeline]
    best, best_f1 = grid[0], -1.0
    for c in grid:
        tp = n_true = n_pred = 0
        for sample, truth in blends:
            cat = fn(sample, **{arg: c}, fwhm_pixels=fwhm_pixels)
            tp += len(dm.match_detections(truth.pixel_positions, cat.positions, fwhm_pixels)[0])
            n_true, n_pred = n_true + len(truth.pixel_positions), n_pred + len(cat)
        f1 = dm.detection_scores(tp, n_true, n_pred)["f1"]
        if f1 >= best_f1:
            best, best_f1 = c, f1
    return best


def flux_methods(pipeline: str) -> tuple[str, ...]:
    """The flux estimators a classical pipeline's catalogue carries (sep or photutils)."""
    return ("aperture", "kron", "isophotal") if pipeline == "sep" else ("segment", "kron")


# ---------------------------------------------------------------------------- scarlet2

SCARLET_STEPS = 1000  # Adam steps: the max_iter of every scarlet2 0.5.1 tutorial (its e_rel 1e-4 stops few of these fits earlier)
SCARLET_E_REL = 1e-4
PSF_SIZE = 41  # pixels of the PSF images handed to scarlet2 (odd: centred on a pixel; 9 FWHM of the worst lsst-like band)


def mock_psf(card, size: int = PSF_SIZE) -> np.ndarray:
    """(B, size, size) float32 images of an image card's PSF per band as its mocks draw it
    (`psf_profile` with the pixel response, GalSim's drawImage), centred on the central pixel
    and normalised to sum 1 in each band: scarlet2's `Observation(psf=...)`."""
    if size < 3 or size % 2 == 0:
        raise InputError("PSF size", f"is {size}", "give an odd number of pixels >= 3 (scarlet2 centres a PSF on a pixel)")
    from cosmofm.data_cards.mocks.images import psf_profile

    p = float(card.pixel_scale.to_value("arcsec"))
    img = np.stack([psf_profile(card, b).drawImage(nx=size, ny=size, scale=p).array for b in range(len(card.bands))])
    return (img / img.sum(axis=(1, 2), keepdims=True)).astype(np.float32)


def _sample_psf(sample: Sample) -> np.ndarray:
    """`mock_psf` of the card a mock Sample names (cached per card): an InputError when it names none."""
    from cosmofm.data_cards.schema import load_card

    name = getattr(sample, "card", None)
    if not name:
        raise InputError(f"{sample.meta.get('id', '?')}: card", "is missing, so its PSF is unknown", "pass psf=(B, h, w) images")
    if name not in _PSF_CACHE:
        _PSF_CACHE[name] = mock_psf(load_card(name))
    return _PSF_CACHE[name]


_PSF_CACHE: dict[str, np.ndarray] = {}


def model_catalogue(models: np.ndarray, model_fluxes: np.ndarray, values: np.ndarray, ivar: np.ndarray, positions: np.ndarray,
                    bands: list[str], method: str = "scarlet2", seg_nsigma: float = 3.0) -> DeblendCatalog:
    """A `DeblendCatalog` from a model-fitting deblender's per-source models of one stamp.

    models (K, B, H, W): each source's model as observed (PSF-convolved, on the stamp's pixels);
    model_fluxes (K, B): each model's total flux. Fluxes "model" = model_fluxes; "reweighted"
    = the image split by the models' ratios model_k / sum_j model_j (scarlet's flux-conserving
    measurement; `deblending_metrics.fraction_fluxes`); the errors of both = the pixel noise of
    the source's share, sqrt(sum ratio^2 / ivar). Segmentation: the source whose model has the
    highest S/N where that S/N (quadrature over bands, in sky sigma) >= seg_nsigma, as the mocks'
    truth footprints."""
    models = np.asarray(models, np.float64)
    k, nb = len(models), values.shape[0]
    if models.shape[1:] != values.shape or np.shape(model_fluxes) != (k, nb) or np.shape(positions) != (k, 2):
        raise InputError("models", f"have shape {models.shape}, fluxes {np.shape(model_fluxes)}, positions {np.shape(positions)}",
                         f"one {values.shape} model, one flux per band and one [row, col] per source")
    sigma = dm.sky_sigma(ivar)
    fraction_flux, error = dm.fraction_fluxes(values, ivar, models, 1e-6 * sigma)  # eps only against 0 / 0
    seg = footprint_segmentation(np.clip(models, 0, None), sigma, seg_nsigma)[1]
    fluxes = {"model": np.asarray(model_fluxes, np.float64), "reweighted": fraction_flux}
    return DeblendCatalog(np.asarray(positions, np.float64), fluxes, {m: error.copy() for m in fluxes}, seg, method, list(bands))


def scarlet2_deblend(sample: Sample, positions: np.ndarray | None = None, psf: np.ndarray | None = None, fwhm_pixels: float = 4.5,
                     deblend_cont: float = 0.001, max_iter: int = SCARLET_STEPS, e_rel: float = SCARLET_E_REL) -> DeblendCatalog:
    """scarlet2 (0.5.1) on one multi-band stamp, as its tutorials model multi-band galaxy scenes.

    One `Source` per centre: `positions` (K, 2) [row, col] pixels (known-positions mode), or
    None: sep's detections (`sep_deblend` with `deblend_cont`; scarlet2 0.5.1 has no detector and
    its docs point to SEP or photutils). Observation: the stamp, weights = ivar (0 where bad), the
    PSF per band (`psf` (B, h, w), default the mock card's, `mock_psf`); model frame
    `Frame.from_observations` (a Gaussian model PSF of 0.7 pixels). Each source starts from
    `init.from_gaussian_moments` (else, when the moments fail, `pixel_spectrum` +
    `compact_morphology`), spectrum clipped positive; its spectrum (positive, step 0.05 x |x|) and
    non-parametric morphology (unit interval, step 1e-3 x |x|) are fitted by `Scene.fit`'s Adam for
    `max_iter` steps (stopping earlier when every parameter changes by < e_rel). Fluxes: `model_catalogue`."""
    sc2 = _require("scarlet2", extra="scarlet")
    import contextlib
    import functools
    import io

    import jax.numpy as jnp
    from numpyro.distributions import constraints

    values, ivar, bad, names = _stamp(sample)
    if positions is None:
        positions = sep_deblend(sample, deblend_cont=deblend_cont, fwhm_pixels=fwhm_pixels).positions
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    nb, h, w = values.shape
    outside = ~((positions >= -0.5) & (positions < np.array([h, w]) - 0.5)).all(axis=1)
    if outside.any():
        raise InputError("positions", f"{positions[outside].tolist()} lie outside the {h} x {w} stamp", "give [row, col] pixels inside it")
    psf = _sample_psf(sample) if psf is None else np.asarray(psf, np.float32)
    if psf.ndim != 3 or len(psf) != nb or psf.shape[1] % 2 == 0 or psf.shape[2] % 2 == 0:
        raise InputError("psf", f"has shape {psf.shape}", f"give ({nb}, h, w) images with h and w odd, one per band")
    if not len(positions):
        return model_catalogue(np.zeros((0, nb, h, w)), np.zeros((0, nb)), values, ivar, positions, names)
    sc2.set_validation(False)  # its automatic checks print a report per call
    obs = sc2.Observation(values.astype(np.float32), weights=ivar.astype(np.float32), psf=psf, channels=names)
    frame = sc2.Frame.from_observations(obs)
    obs.match(frame)
    with contextlib.redirect_stdout(io.StringIO()), sc2.Scene(frame) as scene:  # the init fallbacks print
        for centre in jnp.asarray(positions, jnp.float32):
            try:
                spectrum, morph = sc2.init.from_gaussian_moments(obs, centre)
            except ValueError:
                spectrum, morph = sc2.init.pixel_spectrum(obs, centre), sc2.init.compact_morphology()
            sc2.Source(centre, jnp.maximum(spectrum, 1e-6), morph)
    spec_step = functools.partial(sc2.relative_step, factor=0.05)
    morph_step = functools.partial(sc2.relative_step, factor=1e-3)
    with sc2.Parameters(scene):
        for i, src in enumerate(scene.sources):
            sc2.Parameter(src.spectrum, name=f"spectrum:{i}", constraint=constraints.positive, stepsize=spec_step)
            sc2.Parameter(src.morphology, name=f"morph:{i}", constraint=constraints.unit_interval, stepsize=morph_step)
    fitted = scene.fit(obs, max_iter=max_iter, e_rel=e_rel, progress_bar=False)
    flux = np.array([np.asarray(sc2.measure.flux(src), np.float64) for src in fitted.sources])
    models = np.stack([np.asarray(obs.render(fitted.evaluate_source(src)), np.float64) for src in fitted.sources])
    return _flag_empty_bands(model_catalogue(models, flux, values, ivar, positions, names), bad)


def main(argv: Sequence[str] | None = None) -> dict:
    import dataclasses

    from cosmofm.data_cards.mocks.blends import mock_blend
    from cosmofm.data_cards.schema import load_card

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--card", default="lsst-like")
    ap.add_argument("--stamp-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=200, help="held-out blends")
    ap.add_argument("--n-train", type=int, default=40, help="training blends for the contrast")
    ap.add_argument("--n-objects", type=int, nargs=2, default=(2, 6))
    ap.add_argument("--separation", type=float, nargs=2, default=(0.5, 4.0), help="arcsec from the primary")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    card = dataclasses.replace(load_card(args.card), stamp_size=args.stamp_size)
    fwhm = fwhm_in_pixels(card)
    kw = dict(n_objects=tuple(args.n_objects), separation=tuple(args.separation), delta_mag=(0.0, 3.0))
    t0 = time.perf_counter()
    train = [mock_blend(card, args.seed + 1000, i, **kw) for i in range(args.n_train)]
    test = [mock_blend(card, args.seed, i, **kw) for i in range(args.n)]
    bands = [b.name for b in card.bands]
    ref = reference_band(card)
    report: dict = {"card": card.name, "stamp_size": args.stamp_size, "fwhm_pixels": fwhm, "n": args.n, "mock_s": time.perf_counter() - t0}
    for name, (fn, arg) in PIPELINES.items():
        c = tune_contrast(name, train, fwhm)
        t0 = time.perf_counter()
        cats = [fn(s, **{arg: c}, fwhm_pixels=fwhm) for s, _ in test]
        rate = len(test) / (time.perf_counter() - t0)
        out = {arg: c, "stamps_per_s": rate}
        scores = [score(k, t, fwhm, flux_methods(name)[0]) for k, (_, t) in zip(cats, test)]
        ious = np.concatenate([dm.matched_iou(t.footprints, k.segmentation, sc["true_index"], sc["pred_index"])[sc["matched"]]
                               for k, (_, t), sc in zip(cats, test, scores)])
        out["segmentation_iou_matched_mean"] = float(np.mean(ious)) if ious.size else float("nan")
        for m in flux_methods(name):
            met = dm.deblending_metrics([score(k, t, fwhm, m) for k, (_, t) in zip(cats, test)], bands, ref)
            out[m] = {"detection": met["detection"], "flux_blended": met["flux_blended"], "flux_all": met["flux_all"][bands[ref]],
                      "flux_blended_vs_mag": met["flux_blended_vs_mag"], "flux_vs_separation": met["flux_vs_separation"],
                      "colour_blended": met["colour_blended"], "detection_vs_separation": met["detection_vs_separation"]}
        report[name] = out
    print(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    main()


__all__ = ["CONT_GRID", "DeblendCatalog", "PIPELINES", "detection_image", "fwhm_in_pixels", "mock_psf", "model_catalogue", "photutils_deblend",
           "scarlet2_deblend", "score", "sep_deblend", "tune_contrast"]
