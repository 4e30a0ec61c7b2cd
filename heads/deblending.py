"""Deblending head: detect the sources of a multi-band stamp and split its flux among them.

`CosmoFMForDeblending` (its settings: `DeblendingHeadConfig`, `heads/deblending_config.py`)
= the CosmoFM backbone + a dense head on its image tokens
(`heads/deblending_net.py`: band tokens back on their 8 x 8-patch grid, an upsampling
decoder with a skip connection to the pixels, a CenterNet heatmap for detection and
per-band flux fractions over sources + background). For up to `max_sources` sources per
64 x 64 pixels it returns per source: its centre, per-band fluxes (fraction x observed
image x a learned per-source outskirts correction, `deblending_net.flux_correction`; the
background keeps the rest, so sources + background add up to the image in every band) with
the propagated pixel-noise errors, a per-band isolated image (the fraction map x the image) and a
segmentation map. With `positions` (known-positions mode) detection is skipped. A head may
carry a distilled student (`heads/deblending_student.py`, `forward(student=True)`): a small
U-Net that computes the decoder's per-pixel outputs from the pixels alone, 2.2x faster. A head with
`psf_conditioning` is also told each band's PSF FWHM (`DeblendingTask.inputs`: from the
mock's truth, or the mosaic's PSFFWHM), so that one head serves several seeings
(`labelled_mocks(psf_scales=...)` trains it across them).

Training targets (`heads/deblending_data.py`) come from blend Samples (`data_cards/mocks/blends.mock_blend`): the true
centres and fluxes from `meta["truth"]["objects"]`, the noiseless blend, and the true
fractions iso_k / (sum_j iso_j + eps_b) (background: eps_b / (...), eps_b =
`background_level` sky sigma). The isolated images are `meta["blend_truth"]["isolated"]`, attached by
`DeblendingTask.labelled_mocks` (numpy float16, each object scaled by its peak in
`"isolated_scale"`: numpy arrays in memory; `write_fits` would store them in META as
JSON lists, which read back the same but are large, so drop the key before writing), or,
when absent, rendered again from `meta["truth"]["objects"]` (`mocks.images.render`: ~0.1 s a blend).

Losses: CenterNet focal loss on the heatmap + L1 of the sub-pixel offset, a soft
cross-entropy of the fractions weighted by 1 + each pixel's S/N (capped at 20), the
flux-weighted L1 fraction error (`deblending_net.fraction_flux_loss`, a bound on each
source's relative flux error: the cross-entropy alone let faint sources take a few per cent
of bright neighbours' light; docs/benchmarks.md, issue 20), and a Huber
loss of the relative per-band corrected flux of the noiseless blend against the true in-stamp
flux. Metrics (`DeblendingTask.metrics`) are BTK's (`heads/deblending_metrics.py`), against the true total fluxes as for the
classical baselines (`heads/deblend_baseline.py`), whose `DeblendCatalog` the inference
helpers (`heads/deblending_predict.py`: `deblend_samples`, `deblend_stamp`, the tile finder)
return, so one scorer scores the head and the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.workers import in_parallel
from cosmofm.heads import deblending_metrics as dm
from cosmofm.heads import deblending_net as net
from cosmofm.heads.base import CatalogueColumn, CosmoFMForTask, Task, TaskOutput, register_task
from cosmofm.heads.deblending_config import TASK_TYPE, DeblendingHeadConfig
from cosmofm.heads.deblending_data import _one_blend, blend_targets, psf_fwhm_pixels, seeing_card
from cosmofm.heads.deblending_student import PixelStudent, distillation_loss
from cosmofm.pretrain.data import CosmoFMBatch
from cosmofm.pretrain.modeling_cosmofm import CosmoFMOutput
from cosmofm.pretrain.tokenizers import sample_scale

PEAK_THRESHOLDS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5)  # the heatmap thresholds a calibration chooses from


@dataclass
class DeblendingOutput(TaskOutput):
    """What the deblending model returns; S = the stamp's source slots (`slots`), NaN / 0 padded.

    loss: heatmap focal + offset + fraction + flux losses; only with targets.
    positions: (N, S, 2) [row, col] pixel centres; present: (N, S) 1 for a source, 0 padding.
    scores: (N, S) heatmap probability at each centre; n_sources: (N,).
    fluxes, flux_errors: (N, S, B) per band, the image's flux unit.
    background_flux: (N, B) the background channel's share (sources + background = image).
    segmentation: (N, H, W) 0 background, k + 1 where source k has the largest band-mean fraction.
    heatmap: (N, H, W) detection probabilities.
    fractions: per sample a (K + 1, B, H, W) tensor, sources then background (a list).
    offsets: (N, 2, H, W) the heatmap's sub-pixel offsets: with it, peaks can be found again
    at another threshold (`DeblendingTask.calibrate`).
    """

    loss: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    present: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    n_sources: torch.Tensor | None = None
    fluxes: torch.Tensor | None = None
    flux_errors: torch.Tensor | None = None
    background_flux: torch.Tensor | None = None
    segmentation: torch.Tensor | None = None
    heatmap: torch.Tensor | None = None
    fractions: list | None = None
    backbone: CosmoFMOutput | None = None
    offsets: torch.Tensor | None = None


def _image_group(batch: CosmoFMBatch, head: DeblendingHeadConfig) -> int:
    images = [i for i, g in enumerate(batch.groups) if g.modality == "image"]
    ids = batch.ids[:3] if batch.ids else []
    if len(images) != 1 or len(batch.groups[images[0]].rows) != len(batch):
        raise InputError(f"batch {ids}", "is not one group of same-shaped image stamps",
                         "deblend image stamps, batched by size (collate_samples of one shape)")
    g = batch.groups[images[0]]
    if head.n_bands and g.values.shape[1] != head.n_bands:
        raise InputError(f"batch {ids}", f"stamps have {g.values.shape[1]} bands, the head {head.n_bands}",
                         "give stamps of the bands the head was trained on")
    return images[0]


def _pad_slots(x: torch.Tensor, slots: int, fill: float) -> torch.Tensor:
    k = x.shape[1]
    if k >= slots:
        return x[:, :slots]
    return torch.cat([x, x.new_full((x.shape[0], slots - k, *x.shape[2:]), fill)], dim=1)


@register_task(TASK_TYPE)
class CosmoFMForDeblending(CosmoFMForTask):
    """Backbone + dense deblending head; the head's settings are `config.task`."""

    head_config_class = DeblendingHeadConfig

    def __init__(self, config):
        super().__init__(config)  # self.head_config, self.cosmofm
        h = self.head_config
        if not h.n_bands:
            raise InputError("task.n_bands", "is not set", "build the head config with DeblendingHeadConfig.from_card(card) or n_bands=")
        self.grid = net.BandTokenGrid(config.hidden_size, h.hidden_size)
        planes = h.n_bands if h.psf_conditioning else 0  # log PSF FWHM over the card's, per band
        self.decoder = net.PixelDecoder(h.hidden_size, h.n_bands, h.embed_size, planes)
        self.refiner = net.SplitRefiner(h.n_bands, h.refine_channels, h.refine_window, h.refine_dilations, planes) if h.refine_steps else None
        self.student = PixelStudent.from_head(h) if h.student_widths else None
        self.post_init()

    def forward(self, batch: CosmoFMBatch, centres: torch.Tensor | None = None, fluxes: torch.Tensor | None = None,
                fractions: torch.Tensor | None = None, total_flux: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, noiseless: torch.Tensor | None = None,
                psf_fwhm: torch.Tensor | None = None, student: bool = False) -> DeblendingOutput:
        """Targets (from `DeblendingTask.targets`): centres (N, K, 2) true [row, col] pixels
        (NaN padding), fluxes (N, K, B) true in-stamp fluxes, fractions (N, K + 1, B, H, W)
        uint8 true fractions x 255, noiseless (N, B, H, W) the noiseless blend (for the flux loss);
        total_flux is for the metrics only. With centres the flux split uses the true centres;
        else `positions` (N, K, 2) (known-positions mode, NaN padding); else the heatmap's peaks.
        psf_fwhm (N, B): each band's PSF FWHM [pixels] (`DeblendingTask.inputs`), read by a
        `psf_conditioning` head only; None there means the training card's. student: the fast
        path (`heads/deblending_student.py`), the student's per-pixel outputs in place of the
        backbone + decoder's and its own peak threshold; in training (targets given) the loss
        adds distill_weight x `distillation_loss` against the frozen head's outputs."""
        h = self.head_config
        gi = _image_group(batch, h)
        g = batch.groups[gi]
        values, ivar = g.values.float(), g.ivar.float()
        n, b, hh, ww = values.shape
        rows = g.rows  # the group's samples in batch rows: targets and positions follow them
        centres, fluxes, fractions, noiseless, psf_fwhm = (None if x is None else x[rows] for x in (centres, fluxes, fractions, noiseless, psf_fwhm))
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.float32, device=values.device)
            positions = positions[rows] if positions.ndim == 3 and positions.shape[0] == n else positions
        if student and self.student is None:
            raise InputError("student", "this head has no student", "distil one (scripts/bench/deblend_student.py) or deblend without --student")
        training = centres is not None and fractions is not None and fluxes is not None
        out = None  # the student's path needs the backbone only for its teacher's outputs, in training
        if not student or (training and h.distill_weight):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not student):
                out = self.cosmofm(batch)
        # the tokenizer's per-sample scale (`TokenGroup.scale`), computed the same way without it
        scale = out.token_groups[gi].scale.float() if out is not None else sample_scale(values, (ivar > 0).float())
        # under a bfloat16 autocast (`deblend_samples(bf16=True)`) only the backbone and the decoder's
        # hidden convolutions run in bf16: its outputs, the fractions and the flux sums stay float32
        pixels = net.normalised_pixels(values, ivar, scale)  # padded to a multiple of 8
        condition = None
        if h.psf_conditioning:
            ref = torch.tensor(h.reference_fwhm(), device=values.device)
            condition = torch.zeros(n, b, device=values.device) if psf_fwhm is None else torch.log(psf_fwhm.float() / ref)
            pixels = torch.cat([pixels, net.condition_planes(condition, pixels)], dim=1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not student):  # a teacher is frozen
            teacher = None if out is None else self._decode(out, gi, pixels, (hh, ww))
        if student:
            dense = self.student(pixels, (hh, ww))
        else:
            dense = teacher
        slots = h.slots((hh, ww))
        if centres is not None:
            use = centres.float()
        elif positions is not None:
            use = positions
            if use.ndim != 3 or use.shape[0] != n or use.shape[2] != 2:
                raise InputError("positions", f"has shape {tuple(use.shape)}", f"give ({n}, K, 2) [row, col] pixel centres, NaN-padded")
            if use.shape[1] > slots:
                raise InputError("positions", f"{use.shape[1]} sources for {slots} slots of a {hh} x {ww} stamp", "raise max_sources")
        else:
            threshold = h.student_peak_threshold if student and h.student_peak_threshold else h.peak_threshold
            use, _, _ = net.find_peaks(dense.heat, dense.offset, threshold, slots)
        present = torch.isfinite(use).all(-1)
        keep = present.any(0).nonzero().flatten()  # the slots some sample uses (detections come sorted, present first)
        use, present = use[:, keep], present[:, keep]
        refiner = self.student.refiner if student and self.student.refiner is not None else self.refiner
        split = lambda d, r: self._split(d, use, present, pixels[:, :b, :hh, :ww], condition, r)  # noqa: E731
        fr = split(dense, refiner)
        flux, err = net.source_fluxes(fr, values, ivar)
        # detected (and, in training, true) sources' fluxes corrected for the outskirts their fractions
        # miss, given positions' not (see `flux_correction`); the background keeps the rest
        corr = net.flux_correction(dense, use).masked_fill(~present.unsqueeze(-1), 1.0)  # (n, K, B)
        if not h.flux_correction or (centres is None and positions is not None):
            corr = torch.ones_like(corr)
        image_flux = flux.sum(1)
        src = flux[:, :-1] * corr
        flux = torch.cat([src, (image_flux - src.sum(1)).unsqueeze(1)], dim=1)
        err = torch.cat([err[:, :-1] * corr, err[:, -1:]], dim=1)
        loss = None
        if training:
            target_heat, pos = net.heatmap_targets(centres.float(), (hh, ww), h.heatmap_sigma)
            target = fractions.float() / 255.0
            target = torch.cat([target[:, keep], target[:, -1:]], dim=1)
            target = target / target.sum(1, keepdim=True).clamp(min=1e-6)  # rounding to 1/255 undone
            weight = 1 + (values.abs() * ivar.clamp(min=0).sqrt()).clamp(max=20)  # 1 + the pixel's observed S/N, capped
            fit, fit_err = flux[:, :-1], err[:, :-1]  # the flux loss on the noiseless blend when given (see net.flux_correction)
            image = values * (ivar > 0)
            if noiseless is not None:
                image = torch.where(ivar > 0, noiseless.float(), 0)
                fit = (fr[:, :-1] * image.unsqueeze(1)).sum((-2, -1)) * corr
                fit_err = torch.zeros_like(fit)
            loss = (net.focal_loss(dense.heat, target_heat, pos) + h.offset_weight * net.offset_loss(dense.offset, centres)
                    + h.fraction_weight * net.fraction_loss(fr, target, weight)
                    + h.flux_weight * net.flux_loss(fit, fit_err, fluxes.float()[:, keep]))
            if h.fraction_flux_weight:
                loss = loss + h.fraction_flux_weight * net.fraction_flux_loss(fr[:, :-1], target[:, :-1], image, fluxes.float()[:, keep], err[:, :-1])
            if student and h.distill_weight:
                loss = loss + h.distill_weight * distillation_loss(dense, teacher)
                if refiner is not self.refiner:  # the student's own refiner also learns the head's refined split
                    with torch.no_grad():
                        teacher_fr = split(teacher, self.refiner)
                    loss = loss + h.distill_weight * net.fraction_loss(fr, teacher_fr, weight)
        heat = torch.sigmoid(dense.heat)
        scores = net.read_at(heat.unsqueeze(1), use)[..., 0] * present
        seg = fr.mean(2)  # (n, K + 1, H, W)
        label = seg.max(1).indices  # the first largest, as argmax, at a quarter of its time on CPU
        segmentation = torch.where(label == seg.shape[1] - 1, torch.zeros_like(label), label + 1)
        nan = float("nan")
        order = torch.argsort(rows)  # back to batch order
        pick = lambda x: x[order]  # noqa: E731
        return DeblendingOutput(
            loss=loss, positions=pick(_pad_slots(torch.where(present.unsqueeze(-1), use, torch.full_like(use, nan)), slots, nan)),
            present=pick(_pad_slots(present.float(), slots, 0.0)), scores=pick(_pad_slots(scores, slots, 0.0)),
            n_sources=pick(present.sum(1)), fluxes=pick(_pad_slots(flux[:, :-1].masked_fill(~present.unsqueeze(-1), nan), slots, nan)),
            flux_errors=pick(_pad_slots(err[:, :-1].masked_fill(~present.unsqueeze(-1), nan), slots, nan)),
            background_flux=pick(flux[:, -1]), segmentation=pick(segmentation), heatmap=pick(heat),
            fractions=[fr[i] for i in order.tolist()], backbone=out, offsets=pick(dense.offset))

    def _split(self, dense: net.DenseOutputs, use: torch.Tensor, present: torch.Tensor, image: torch.Tensor,
               condition: torch.Tensor | None, refiner: torch.nn.Module | None) -> torch.Tensor:
        """The flux fractions (n, K + 1, B, H, W) of the sources at `use` (`present`): the first
        split of `dense` (`split_logits`), refine_steps of `refiner` (it sees `image`, the
        decoder's asinh(values / scale)), softmax; in float32 under any autocast."""
        with torch.autocast(image.device.type, enabled=False):
            logits = net.split_logits(dense, use, present, self.head_config.min_size)
            for _ in range(self.head_config.refine_steps):
                logits = refiner(logits, image, use, present, condition)
            return logits.softmax(dim=1)

    def _decode(self, out: CosmoFMOutput, gi: int, pixels: torch.Tensor, shape: tuple[int, int]) -> net.DenseOutputs:
        """The readable path's per-pixel outputs: the image group `gi`'s band tokens on their
        grid (`BandTokenGrid`), decoded with the normalised `pixels` (`PixelDecoder`)."""
        tg, patch = out.token_groups[gi], self.config.image_patch_size
        b = self.head_config.n_bands
        feats = self.grid(out.last_hidden_state[tg.rows], tg.valid, net.group_grid((b, *shape), patch))
        if patch != 8:
            feats = torch.nn.functional.interpolate(feats, size=(-(-shape[0] // 8), -(-shape[1] // 8)), mode="bilinear", align_corners=False)
        return self.decoder(feats, pixels, shape)


def _numpy(x):
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@register_task(TASK_TYPE)
class DeblendingTask(Task):
    """Targets, metrics, catalogue columns, mocks and the tile finder of deblending;
    built per model: `DeblendingTask(model.head_config)`.

    The catalogue of `cosmofm predict` has one row per stamp (the reader's objects): the
    deblended photometry of the stamp's own object, the source nearest the stamp centre
    (ROW, COL, FLUX_<band>, FLUXERR_<band>; NaN when nothing was detected), and N_SOURCES,
    the sources found in the stamp. `find_in_tile` (`cosmofm deblend`) gives one row per source."""

    modality = "image"

    def __init__(self, head: DeblendingHeadConfig):
        self.head = head
        bands = head.bands or [str(i) for i in range(head.n_bands)]
        unit = head.flux_unit
        self.catalogue_columns = (
            CatalogueColumn("N_SOURCES", "", "sources detected in the stamp"),
            CatalogueColumn("ROW", "pix", "0-based row of the centre of the source nearest the stamp centre"),
            CatalogueColumn("COL", "pix", "0-based column of the centre of that source"),
            *[c for band in bands for c in (CatalogueColumn(f"FLUX_{band}", unit, f"{band} flux of that source (fraction x image)"),
                                            CatalogueColumn(f"FLUXERR_{band}", unit, f"{band} flux error (propagated pixel noise)"))],
        )

    def targets(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        return {**blend_targets(samples, self.head), **self.inputs(samples)}

    def inputs(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """psf_fwhm (N, B): each band's PSF FWHM [pixels] of the stamps (`psf_fwhm_pixels`),
        for a `psf_conditioning` head; nothing for the others."""
        if not self.head.psf_conditioning:
            return {}
        return {"psf_fwhm": torch.from_numpy(np.stack([psf_fwhm_pixels(s, self.head) for s in samples]))}

    def prepare(self, model: CosmoFMForDeblending, samples: Sequence[Sample]) -> None:
        """Record the seeing the head is trained on: `trained_psf_range`, the smallest and
        largest PSF FWHM of the training stamps over the card's (any band)."""
        ref = np.asarray(self.head.reference_fwhm())
        ratios = np.concatenate([psf_fwhm_pixels(s, self.head) / ref for s in samples]) if samples else np.ones(1)
        model._set_task(trained_psf_range=[round(float(ratios.min()), 4), round(float(ratios.max()), 4)])

    def metrics(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """BTK metrics (`deblending_metrics.deblending_metrics`) of the detected sources against
        the true centres and total fluxes, plus the mean segmentation IoU of matched sources
        against the true dominant-source map (argmax of the true fractions)."""
        pos, flux = _numpy(outputs["positions"]), _numpy(outputs["fluxes"])
        seg = _numpy(outputs["segmentation"]).astype(int)
        tc, tf = _numpy(targets["centres"]), _numpy(targets["total_flux"])
        frac = targets["fractions"]
        stamps, ious = [], []
        for i in range(len(pos)):
            ok_p, ok_t = np.isfinite(pos[i]).all(-1), np.isfinite(tc[i]).all(-1)
            st = dm.score_stamp(tc[i][ok_t], tf[i][ok_t], pos[i][ok_p], flux[i][ok_p], self.head.fwhm_pixels)
            stamps.append(st)
            if frac.ndim == 5:
                lab = _dominant(frac[i])
                masks = np.stack([lab == k for k in range(int(ok_t.sum()))]) if ok_t.any() else np.zeros((0, *seg.shape[1:]), bool)
                ious.append(dm.matched_iou(masks, seg[i], st["true_index"], st["pred_index"]))
        bands = self.head.bands or [str(b) for b in range(flux.shape[-1])]
        ref = _reference_band(self.head)
        met = dm.deblending_metrics(stamps, bands, ref)
        blended = met["flux_blended"][bands[ref]]
        out = {"f1": met["detection"]["f1"], "precision": met["detection"]["precision"], "recall": met["detection"]["recall"],
               "flux_blended_bias": blended["bias"], "flux_blended_nmad": blended["scatter"], "flux_blended_mape": blended["mape"],
               "reference_band": bands[ref], **met}
        if ious:
            iou = np.concatenate(ious)
            out["segmentation_iou_mean"] = float(iou.mean()) if iou.size else float("nan")
        return out

    def calibrate(self, model: CosmoFMForDeblending, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor],
                  student: bool = False) -> dict[str, float]:
        """The peak threshold of the best detection F1 on the calibration block (the larger on
        ties), its peaks found again from the collected heatmaps and offsets at each of
        PEAK_THRESHOLDS (as the bench tunes it on training blends); stored as the head's
        peak_threshold, or, when the student's path made `outputs` (`student`, the fine-tune's
        forward options), as student_peak_threshold."""
        heat = torch.logit(outputs["heatmap"].float().clamp(1e-7, 1 - 1e-7))
        true = [c[np.isfinite(c).all(-1)] for c in _numpy(targets["centres"])]
        slots = self.head.slots(tuple(heat.shape[-2:]))
        best, best_f1 = PEAK_THRESHOLDS[0], -1.0
        for threshold in PEAK_THRESHOLDS:
            found, _, present = net.find_peaks(heat, outputs["offsets"].float(), threshold, slots)
            found, present = _numpy(found), _numpy(present).astype(bool)
            tp = sum(len(dm.match_detections(t, p[ok], self.head.fwhm_pixels)[0]) for t, p, ok in zip(true, found, present))
            f1 = dm.detection_scores(tp, sum(len(t) for t in true), int(present.sum()))["f1"]
            if f1 >= best_f1:  # NaN (nothing true or found) never wins
                best, best_f1 = threshold, f1
        model._set_task(**{"student_peak_threshold" if student else "peak_threshold": best})
        return {"peak_threshold": best, "f1": best_f1}

    def catalogue_rows(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """The catalogue columns of one batch's outputs: per stamp, its central source."""
        pos, flux, err = _numpy(outputs["positions"]), _numpy(outputs["fluxes"]), _numpy(outputs["flux_errors"])
        h, w = outputs["heatmap"].shape[-2:]
        centre = np.array([(h - 1) / 2, (w - 1) / 2])
        dist = np.where(np.isfinite(pos).all(-1), np.hypot(*(pos - centre).transpose(2, 0, 1)), np.inf)  # (N, S)
        k = dist.argmin(1)
        found = np.isfinite(dist.min(1))
        pick = lambda x: np.where(found.reshape(-1, *[1] * (x.ndim - 2)), x[np.arange(len(x)), k], np.nan)  # noqa: E731
        p, f, e = pick(pos), pick(flux), pick(err)
        rows = {"N_SOURCES": _numpy(outputs["n_sources"]).astype(np.int64), "ROW": p[:, 0], "COL": p[:, 1]}
        for b, band in enumerate(self.head.bands or [str(i) for i in range(flux.shape[-1])]):
            rows[f"FLUX_{band}"], rows[f"FLUXERR_{band}"] = f[:, b], e[:, b]
        return rows

    @staticmethod
    def labelled_mocks(card, n: int, seed: int = 0, *, workers: int = 1, progress: bool = False, n_objects=(2, 6),
                       separation=(0.5, 3.0), delta_mag=(0.0, 2.5), stamp_size: int | None = 64,
                       psf_scales: Sequence[float] = (1.0,)) -> list[Sample]:
        """Blends 0..n-1 of universe `seed` (`mock_blend`) on `card` with stamps of `stamp_size`
        pixels (None: the card's), each with its isolated images in `meta["blend_truth"]`.
        psf_scales: blend i is observed with every band's PSF FWHM x psf_scales[i % len]
        (`seeing_card`): a head trained across seeing (see `psf_conditioning`)."""
        from tqdm.auto import tqdm

        if stamp_size is not None:
            card = replace(card, stamp_size=int(stamp_size))
        scales = list(psf_scales) if isinstance(psf_scales, (list, tuple)) else [psf_scales]
        if not scales or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in scales):
            raise InputError("mocks.psf_scales", f"is {psf_scales!r}", "positive factors on the card's PSF FWHM, e.g. [0.85, 1.0, 1.15, 1.35]")
        settings = {"n_objects": _pair(n_objects), "separation": _pair(separation), "delta_mag": _pair(delta_mag)}
        make = partial(_one_blend, [seeing_card(card, float(x)) for x in scales], seed, settings)
        if n < 1:
            return []
        bar = tqdm(total=n, desc=f"blends {card.name}", unit="blend", disable=not progress)
        out = [make(0)]  # the settings checked (InputError) here, before any worker starts
        bar.update()
        for s in in_parallel(make, range(1, n), workers, processes=True, picklable=True, chunksize=max(1, min(16, n // (4 * max(workers, 1))))):
            out.append(s)
            bar.update()
        bar.close()
        return out

    def find_in_tile(self, model: CosmoFMForDeblending, values: np.ndarray, ivar: np.ndarray, header, *, bf16: bool = False,
                     student: bool = False) -> Any:
        """The shared tile-finder contract (`deblending_predict.sources_in_tile`): float32
        (B, H, W) values / ivar and the tile's FITS header -> an astropy Table, one row per source."""
        from cosmofm.heads.deblending_predict import sources_in_tile  # it imports this module

        return sources_in_tile(model, values, ivar, header, bf16=bf16, student=student)


def _dominant(frac: torch.Tensor) -> np.ndarray:
    """(H, W) dominant true source of (K + 1, B, H, W) fractions: k, or -1 for background."""
    f = frac.float().mean(1)  # (K + 1, H, W)
    lab = f.argmax(0).numpy()
    return np.where(lab == f.shape[0] - 1, -1, lab)


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _reference_band(head: DeblendingHeadConfig) -> int:
    """The band closest to 6231 A (r), else the middle one."""
    if head.band_wavelengths:
        return int(np.argmin([abs(w - 6231.0) for w in head.band_wavelengths]))
    return head.n_bands // 2


__all__ = ["CosmoFMForDeblending", "DeblendingHeadConfig", "DeblendingOutput", "DeblendingTask"]
