"""3D source detection and SDC2 characterisation in HI cubes, on the backbone's cube tokens (issue 21).

`CosmoFMForDetection3D` = the CosmoFM backbone + a dense 3D head: each tile's tokens are
put back on their (C/pc, H/ph, W/pw) grid (`config.cube_patch_size`) and decoded by a
small 3D conv decoder, U-Net style (Ronneberger et al. 2015): the tokens are upsampled
(trilinear) to half resolution and joined with a skip branch reading the noise-normalised
input voxels (`noise_normalised`: the S/N cube and copies smoothed with SoFiA-like
boxcars, asinh-compressed) at full and half resolution, so the tokens give context and
the skip gives the voxel-exact position the 8-voxel tokens cannot. The objectness is
decoded at voxel level, the property maps at half resolution (`Detection3DDecoder`).
Padding to the patch grid is cropped, so any tile shape works.

Outputs, per voxel (`heads/detection3d_data.py` holds the frames and the decoding):

* objectness: CenterNet (Zhou et al. 2019, "Objects as Points") in 3D: a Gaussian target
  at each true source's voxel, sigma a fixed fraction of its line width (channels) and HI
  size (pixels), trained with CenterNet's penalty-reduced focal loss. Sources whose
  expected integrated S/N is below `target_min_snr` get no peak (the network cannot see
  them; asking for them teaches it to fire on noise) but stay in the truth for scoring.
* property regression with uncertainties, read at each true centre's cell: mean and
  log-variance (Gaussian negative log-likelihood, Nix & Weigend 1994; Kendall & Gal 2017)
  of log line flux, log HI size, log w20, inclination, the receding-side direction as a
  pixel-frame vector (so PA has no wrap at 0/360 and the tile's WCS, not the network,
  turns it into east-of-north), and the centre's offsets from its half-resolution cell.
  Regressed in the pixel frame (flux in noise units, size in pixels, width in channels):
  what the voxels show. YOLO-CIANNA's SDC2 detector (Cornu et al.) regresses the same
  properties from a detection backbone; here the uncertainties come with them.

Post-processing (`CosmoFMForDetection3D.decode`): 3D local maxima of the objectness above
`threshold` in a (channels x pixels^2) `nms_window` (~ a typical line width x the beam),
at most `max_detections` per tile (`detection3d_data.peaks`); then every detection inside a
stronger one's SDC2 match window (its regressed size and width, x `merge_factor`) is merged
into it (`detection3d_post.merge_duplicates`; `cosmofm detect` merges over the whole
catalogue instead, in the scorer's window, which also takes the duplicates that tile edges
make, `detection3d_post.merge_catalogue`), and the receding side of the
major axis (the PA) is measured on the cube from the velocity gradient around the detection
(`detection3d_post.receding_direction`, `pa_from="moment"`): the regressed direction did
not learn it. The threshold (and the merge factor) are chosen on held-out data for the
best SDC2 score at purity >= 0.9 (`Detection3DTask.calibrate` on tiles,
`calibrate_catalogues` on whole cubes), in the forward's `detections`. That purity holds
at the calibration cubes' source density only: the noise's false detections come per
volume, so on emptier sky they are a larger share. With `reliability` > 0, `cosmofm detect`
runs the head on the sign-flipped cube too (every detection there is noise: HI lines are
emission) and raises the threshold, per cube, until those are at most a (1 - reliability)
share of the catalogue (`detection3d_post.reliability_cut`, SoFiA-2's reliability idea). `Detection3DTask.find_in_tile`
(the tile-finder contract of the field-inference plumbing) turns them into an astropy Table
with CHAN, ROW, COL in the tile frame and the SDC2 property columns with units and
uncertainties, read through the tile header's WCS (FREQ, or VRAD/VOPT with RESTFRQ).

Training data: `Detection3DTask.labelled_mocks` (survey-cube tiles with their truth, see
detection3d_data.labelled_mocks); the shipped recipe is finetune/recipes/detection3d.yaml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits
from astropy.table import Table
from torch import nn
from torch.nn import functional as F

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads import detection3d_calibration as calibration
from cosmofm.heads import detection3d_data as data
from cosmofm.heads.base import CatalogueColumn, CosmoFMForTask, Task, TaskHeadConfig, TaskOutput, register_task
from cosmofm.pretrain.data import CosmoFMBatch
from cosmofm.pretrain.modeling_cosmofm import CosmoFMOutput

TASK_TYPE = "detection3d"
_SIGMA_PER_FWHM = 1.0 / math.sqrt(8 * math.log(2))


@dataclass
class Detection3DHeadConfig(TaskHeadConfig):
    """The head's settings; stored as `config.task` in config.json.

    Args:
        width (`int`, 16): channels of the decoder's token path.
        skip_channels (`int`, 4): channels of the skip branch on the input voxels (full resolution).
        sigma_fraction (`float`, 0.15): heatmap-target sigma per source as a fraction of its
            line width (channels) and HI size (pixels) ...
        sigma_min (`float`, 1.0): ... but at least this many voxels.
        target_min_snr (`float`, 4.0): sources with a lower expected integrated S/N get no
            heatmap peak and no regression target (they stay in the truth for scoring).
        regression_weight (`float`, 0.5): weight of the property NLL beside the focal loss.
        threshold (`float`, 0.05): objectness a local maximum needs to be a detection; the
            floor `Detection3DTask.calibrate` raises to the SDC2-best value on a held-out split.
        nms_window (`list[int]`, [9, 5]): (channels, pixels) of the local-maximum box.
        max_detections (`int`, 64): detections kept per tile (best first).
        beam_fwhm_pix (`float`, 0.0): beam FWHM [pixels] of the training data (`from_card`);
            `find_in_tile` refuses a cube whose beam differs by more than 25 %. 0 = unchecked.
        smoothing (`list`, [[1, 1], [7, 3], [21, 5]]): (channels, pixels) boxcars the S/N cube
            is smoothed with for the skip branch's input channels (`noise_normalised`).
        merge_factor (`float`, 1.0): detections inside a stronger one's source window
            (`factor` x the SDC2 match window of its regressed size and width) are merged
            into it: per tile in the model's decode (`detection3d_post.merge_duplicates`), over
            the whole catalogue in `cosmofm detect` (`merge_catalogue`, in place of the per-tile
            one); 0 = off (the old local-maximum box only).
        reliability (`float`, 0.0): `cosmofm detect` also runs the head on the sign-flipped
            cube and keeps the detections above the lowest threshold (>= `threshold`) at which
            the catalogue's purity, estimated from the flipped cube's detections (noise only:
            HI lines are emission), is at least this (`detection3d_post.reliability_cut`);
            0 = off. The threshold then adapts to the cube's source density.
        noise_prior (`dict`, {}): the purity cut's prior on the noise tail, learnt on the
            calibration cubes' sign-flipped detections (`finetune.detect.calibrate_noise_prior`,
            `detection3d_post.fit_noise_prior`: per_block, tail_scale, threshold, ..., and the
            prefilter and head_block it was measured with); a cube's own flipped detections are
            blended with it (`detection3d_post.noise_tail`). {} = none: the cube's own alone.
        inference (`dict`, {}): the options `cosmofm detect` runs the head with unless told
            otherwise, the ones its threshold and noise prior were calibrated with:
            "head_block" ([C, H, W]: the network on blocks of each tile; null: the whole
            tile), "block_overlap" ([C, H, W]: how far those blocks overlap), "prefilter"
            (rms: only blocks with smooth-and-clip candidates; null: all), "bf16" (bfloat16
            autocast where the device computes it natively). Fine-tuning records the training
            tile as head_block, overlapping by a quarter (`Detection3DTask.prepare`).
        pa_from (`str`, "moment"): where the PA's receding side comes from: "moment" (the
            velocity gradient in the cube around the detection, `detection3d_post.receding_direction`)
            or "regressed" (the head's ux, uy maps).
        card (`str`, ""): the data card the head was trained on (provenance only).
    """

    width: int = 16
    skip_channels: int = 4
    sigma_fraction: float = 0.15
    sigma_min: float = 1.0
    target_min_snr: float = 4.0
    regression_weight: float = 0.5
    threshold: float = 0.05
    nms_window: list = field(default_factory=lambda: [9, 5])
    max_detections: int = 64
    beam_fwhm_pix: float = 0.0
    smoothing: list = field(default_factory=lambda: [[1, 1], [7, 3], [21, 5]])
    merge_factor: float = 1.0
    reliability: float = 0.0
    noise_prior: dict = field(default_factory=dict)
    inference: dict = field(default_factory=dict)
    pa_from: str = "moment"
    card: str = ""

    TYPE: ClassVar[str] = TASK_TYPE

    def __post_init__(self):
        super().__post_init__()
        self.check_counts("width", "skip_channels", "max_detections")
        if not (self.sigma_fraction > 0 and self.sigma_min > 0):
            raise InputError("task.sigma_fraction / sigma_min", "must be > 0", "e.g. 0.15 and 1.0")
        if not 0 < self.threshold < 1:
            raise InputError("task.threshold", f"must be in (0, 1), got {self.threshold}", "e.g. 0.3")
        if not (self.regression_weight >= 0 and self.target_min_snr >= 0 and self.beam_fwhm_pix >= 0):
            raise InputError("task.regression_weight / target_min_snr / beam_fwhm_pix", "must be >= 0", "e.g. 0.5, 4.0, 2.5")
        w = list(self.nms_window) if isinstance(self.nms_window, (list, tuple)) else None
        if w is None or len(w) != 2 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in w):
            raise InputError("task.nms_window", f"is {self.nms_window!r}", "give [channels, pixels], whole numbers >= 1, e.g. [9, 5]")
        self.nms_window = w
        k = self.smoothing if isinstance(self.smoothing, (list, tuple)) else None
        if not k or any(not isinstance(p, (list, tuple)) or len(p) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in p) for p in k):
            raise InputError("task.smoothing", f"is {self.smoothing!r}", "give [[channels, pixels], ...], whole numbers >= 1, e.g. [[1, 1], [7, 3]]")
        self.smoothing = [list(p) for p in k]
        if isinstance(self.merge_factor, bool) or not (isinstance(self.merge_factor, (int, float)) and 0 <= self.merge_factor <= 10):
            raise InputError("task.merge_factor", f"is {self.merge_factor!r}", "give a number in [0, 10] (1 = the SDC2 match window, 0 = off)")
        if isinstance(self.reliability, bool) or not (isinstance(self.reliability, (int, float)) and 0 <= self.reliability < 1):
            raise InputError("task.reliability", f"is {self.reliability!r}", "give a purity in [0, 1), e.g. 0.9 (0 = off)")
        prior = self.noise_prior
        bad = not isinstance(prior, dict) or bool(prior) and (
            any(isinstance(prior.get(k), bool) or not isinstance(prior.get(k), (int, float)) or not math.isfinite(prior[k])
                for k in ("per_block", "tail_scale", "threshold"))
            or not (prior["per_block"] >= 0 and prior["tail_scale"] > 0 and 0 < prior["threshold"] < 1))
        if bad:
            raise InputError("task.noise_prior", f"is {prior!r}", "give {} or detection3d_post.fit_noise_prior's dict (per_block >= 0, "
                             "tail_scale > 0, threshold in (0, 1)); recalibrate with detect_quality --reliability")
        self.inference = _checked_inference(self.inference)
        if self.pa_from not in ("moment", "regressed"):
            raise InputError("task.pa_from", f"is {self.pa_from!r}", "give 'moment' (the cube's velocity gradient) or 'regressed'")

    @classmethod
    def from_card(cls, card, **kwargs) -> "Detection3DHeadConfig":
        """As `TaskHeadConfig.from_card`, recording the card's beam in pixels unless given."""
        if "beam_fwhm_pix" not in kwargs and getattr(card, "beam_fwhm", None) is not None:
            kwargs = {"beam_fwhm_pix": float((card.beam_fwhm / card.pixel_scale).to_value(u.dimensionless_unscaled)), **kwargs}
        return super().from_card(card, **kwargs)


def _checked_inference(options) -> dict:
    """`Detection3DHeadConfig.inference`, checked: head_block None or 3 whole numbers >= 1,
    block_overlap None or 3 whole numbers >= 0 below them, prefilter None or > 0, bf16 a bool;
    nothing else."""
    fix = ('give {"head_block": [C, H, W] or null, "block_overlap": [C, H, W] below head_block, "prefilter": rms > 0 or null, '
           '"bf16": true/false}, any of them')
    if not isinstance(options, dict) or set(options) - {"head_block", "block_overlap", "prefilter", "bf16"}:
        raise InputError("task.inference", f"is {options!r}", fix)
    block, overlap, clip, bf16 = options.get("head_block"), options.get("block_overlap"), options.get("prefilter"), options.get("bf16", False)
    for name, shape, low in (("head_block", block, 1), ("block_overlap", overlap, 0)):
        if shape is not None and (not isinstance(shape, (list, tuple)) or len(shape) != 3
                                  or any(isinstance(k, bool) or not isinstance(k, int) or k < low for k in shape)):
            raise InputError(f"task.inference.{name}", f"is {shape!r}", fix)
    if overlap is not None and (block is None or any(o >= b for o, b in zip(overlap, block))):
        raise InputError("task.inference.block_overlap", f"is {overlap!r} for head_block {block!r}", fix)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise InputError("task.inference.prefilter", f"is {clip!r}", fix)
    if not isinstance(bf16, bool):
        raise InputError("task.inference.bf16", f"is {bf16!r}", fix)
    return {**options, **{k: list(v) for k, v in (("head_block", block), ("block_overlap", overlap)) if v is not None}}


@dataclass
class Detection3DOutput(TaskOutput):
    """What the detection model returns.

    loss: focal loss of the objectness + regression_weight x the property NLL; only with `sources`.
    detections: (N, max_detections, len(DETECTION_FIELDS)) per tile, best first, padded
        with score 0 (all zero in training mode when `sources` are given: the step needs the loss only) (detection3d_data.DETECTION_FIELDS: score, chan, row, col, then the
        means and log-variances of the REGRESSED pixel-frame quantities).
    heatmap: (N, C, H, W) objectness logits, and properties: (N, 2 x 9, ceil(C/2), ceil(H/2),
        ceil(W/2)) mean and log-variance maps at half resolution; only with `return_maps=True` (and one tile shape per batch).
    backbone: the backbone's CosmoFMOutput.
    """

    loss: torch.Tensor | None = None
    detections: torch.Tensor | None = None
    heatmap: torch.Tensor | None = None
    properties: torch.Tensor | None = None
    backbone: CosmoFMOutput | None = None


def _conv(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, k, padding=k // 2, groups=groups)


class Detection3DDecoder(nn.Module):
    """Tokens on their grid (n, D, Tc, Th, Tw) + noise-normalised voxels (n, 1, C', H', W')
    (the padded tile) -> objectness logits (n, C', H', W') at voxel level and property maps
    (n, 2 x 9, ceil(C'/2), ceil(H'/2), ceil(W'/2)) at half resolution.

    The work is done at half resolution (1/8 of the voxels): the tokens, upsampled, meet
    the skip branch there. Full resolution gets only what needs it, the objectness: a
    3-voxel stem on the input beside a few upsampled half-resolution channels, mixed
    pointwise. A 64^3 tile has 262k voxels, and this runs on CPUs too; the properties vary
    slowly over a source, and the centre's sub-voxel position is regressed (offsets from
    the half-resolution cell's centre, `dc, dy, dx` in [-1, 1] voxels)."""

    def __init__(self, hidden_size: int, head: Detection3DHeadConfig):
        super().__init__()
        w, s = head.width, head.skip_channels
        self.tokens = _conv(hidden_size, w, 1)
        self.stem = _conv(len(head.smoothing), s)
        self.down = _conv(s, 2 * s)
        self.join = _conv(w + 2 * s, w)
        self.refine = _conv(w, w)
        self.properties = _conv(w, 2 * len(data.REGRESSED), 1)
        self.to_full = _conv(w, s, 1)
        self.mix = _conv(2 * s, 2 * s, 1)
        self.objectness = _conv(2 * s, 1, 1)
        with torch.no_grad():  # objectness prior ~1e-3 per voxel, so the first steps are not all false positives
            self.objectness.bias.fill_(-6.9)

    def forward(self, tokens: torch.Tensor, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = voxels.shape[2:]
        half = tuple((n + 1) // 2 for n in full)
        stem = F.gelu(self.stem(voxels))
        skip = F.gelu(self.down(F.adaptive_avg_pool3d(stem, half)))
        t = F.interpolate(self.tokens(tokens), size=half, mode="trilinear", align_corners=False)
        h = F.gelu(self.join(torch.cat([t, skip], 1)))
        h = F.gelu(self.refine(h)) + h
        up = F.interpolate(self.to_full(h), size=full, mode="trilinear", align_corners=False)
        heat = self.objectness(F.gelu(self.mix(torch.cat([up, stem], 1))))
        return heat[:, 0], self.properties(h)


def noise_normalised(values: torch.Tensor, ivar: torch.Tensor, kernels=((1, 1),)) -> torch.Tensor:
    """(n, len(kernels), C, H, W): the S/N cube values x sqrt(ivar) (0 where masked) smoothed
    by each (channels, pixels) boxcar, divided by its own robust rms (1.4826 x median |x|
    per tile, as SoFiA's noise scaling) and compressed by asinh, so bright sources and
    continuum residuals do not set the scale. The smoothed copies are SoFiA's smooth +
    clip kernels handed to the network: a faint line's S/N per voxel is ~1, its S/N
    integrated over its width and the beam is what tells it from noise, and a 3-voxel conv
    stack would need many layers to integrate 20-40 channels."""
    snr = (torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0) * ivar.clamp(min=0).sqrt()).unsqueeze(1)
    out = []
    c, h, w = values.shape[1:]
    for kc, kxy in kernels:
        kc, kxy = min(kc, c - (c + 1) % 2), min(kxy, min(h, w) - (min(h, w) + 1) % 2)  # odd, within a small tile
        x = snr
        if kc > 1:
            x = F.avg_pool3d(x, (kc, 1, 1), stride=1, padding=(kc // 2, 0, 0), count_include_pad=False)
        if kxy > 1:
            x = F.avg_pool3d(x, (1, kxy, kxy), stride=1, padding=(0, kxy // 2, kxy // 2), count_include_pad=False)
        if kc > 1 or kxy > 1:
            rms = 1.4826 * x.abs().flatten(1).median(dim=1).values.clamp(min=1e-6)
            x = x / rms.view(-1, 1, 1, 1, 1)
        out.append(x[:, :, :values.shape[1], :values.shape[2], :values.shape[3]])
    return torch.asinh(torch.cat(out, 1))


@register_task(TASK_TYPE)
class CosmoFMForDetection3D(CosmoFMForTask):
    """Backbone + the dense 3D detection head; the head's settings are `config.task`."""

    head_config_class = Detection3DHeadConfig

    def __init__(self, config):
        super().__init__(config)  # self.head_config, self.cosmofm
        self.decoder = Detection3DDecoder(config.hidden_size, self.head_config)
        self.post_init()

    def maps(self, batch: CosmoFMBatch) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], CosmoFMOutput]:
        """Per (shape) group of cube tiles: (rows, objectness logits (n, C, H, W), property maps
        (n, 18, ceil(C/2), ceil(H/2), ceil(W/2))); and the backbone output. Non-cube samples are an InputError."""
        others = [g for g in batch.groups if g.modality != "cube"]
        if others:
            raise InputError(f"samples {[batch.ids[int(r)] for r in others[0].rows[:3]]}", f"are {others[0].modality} samples",
                             "3D detection reads cube tiles (C, H, W) of an HI cube")
        out = self.cosmofm(batch)
        patch = tuple(self.config.cube_patch_size)
        groups = []
        for g in batch.groups:
            n, c, h, w = g.values.shape
            grid = [math.ceil(s / p) for s, p in zip((c, h, w), patch)]
            t = math.prod(grid)
            tokens = out.last_hidden_state[g.rows, :t].reshape(n, *grid, -1).permute(0, 4, 1, 2, 3)
            vox = noise_normalised(g.values, g.ivar, self.head_config.smoothing).to(tokens.dtype)
            pad = [x for s, p in zip(reversed((c, h, w)), reversed(patch)) for x in (0, (-s) % p)]
            heat, props = self.decoder(tokens, F.pad(vox, pad))
            groups.append((g.rows, heat[:, :c, :h, :w], props[:, :, :(c + 1) // 2, :(h + 1) // 2, :(w + 1) // 2]))
        return groups, out

    def forward(self, batch: CosmoFMBatch, sources: torch.Tensor | None = None, tile: torch.Tensor | None = None,
                return_maps: bool = False, merge: bool = True) -> Detection3DOutput:
        """`sources` (N, K, len(SOURCE_FIELDS)): the truth (Detection3DTask.targets) for the
        loss; `tile` (N, len(TILE_FIELDS)) travels with the targets for the metrics, unused here.
        `merge`: merge each tile's duplicates (`decode`); False where the caller merges a whole catalogue."""
        head = self.head_config
        groups, out = self.maps(batch)
        n = len(batch)
        ref = groups[0][1]
        detections = ref.new_zeros(n, head.max_detections, len(data.DETECTION_FIELDS), dtype=torch.float32)
        focal, n_pos, nll, n_reg = ref.new_zeros((), dtype=torch.float32), 0, ref.new_zeros((), dtype=torch.float32), 0
        decode = not (self.training and sources is not None)  # training steps need the loss only
        for g, (rows, logits, props) in zip(batch.groups, groups):
            with torch.no_grad():
                if decode:
                    detections[rows.to(detections.device)] = self.decode(g, logits.detach(), props.detach(), merge)
            if sources is None:
                continue
            src = sources[rows.to(sources.device)].to(logits.device).float()
            shape = tuple(logits.shape[1:])
            heat = torch.stack([data.heatmap_target(s, shape, head.sigma_fraction, head.sigma_min, head.target_min_snr) for s in src])
            loss, pos = data.focal_loss(logits, heat)
            focal, n_pos = focal + loss, n_pos + int(pos)
            cell, y, tile_idx = data.regression_targets(src, tuple(props.shape[2:]), head.target_min_snr)
            if len(y):
                at = props[tile_idx, :, cell[:, 0], cell[:, 1], cell[:, 2]].float()  # (M, 18)
                r = len(data.REGRESSED)
                mu, lv = at[:, :r], at[:, r:].clamp(-10.0, 6.0)
                nll = nll + (0.5 * (lv + (y - mu) ** 2 * torch.exp(-lv))).sum()
                n_reg += len(y)
        loss = None
        if sources is not None:
            loss = focal / max(n_pos, 1) + head.regression_weight * nll / max(n_reg, 1) / len(data.REGRESSED)
        heatmap = properties = None
        if return_maps:
            if len(groups) != 1:
                raise InputError("return_maps", "needs one tile shape per batch", "collate tiles of one shape")
            heatmap, properties = groups[0][1], groups[0][2]
        return Detection3DOutput(loss=loss, detections=detections, heatmap=heatmap, properties=properties, backbone=out)

    def decode(self, group, logits: torch.Tensor, props: torch.Tensor, merge: bool = True) -> torch.Tensor:
        """(n, max_detections, len(DETECTION_FIELDS)) detections of one group of tiles: the
        objectness peaks (`detection3d_data.peaks`), duplicates merged in source units (unless
        `merge` is False) and, with `pa_from="moment"`, the receding direction from the cube
        (`detection3d_post`)."""
        from cosmofm.heads import detection3d_post as post

        head = self.head_config
        det = data.peaks(logits, props, head.threshold, head.nms_window, head.max_detections)
        if merge:
            det = post.merge_duplicates(det, head.beam_fwhm_pix, head.merge_factor)
        if head.pa_from == "moment" and bool((det[..., 0] > 0).any()):
            snr = torch.nan_to_num(group.values.float(), nan=0.0, posinf=0.0, neginf=0.0) * group.ivar.float().clamp(min=0).sqrt()
            freq = group.coords.get("frequency")
            sign = torch.sign(freq[:, 1] - freq[:, 0]).float() if freq is not None and freq.shape[1] > 1 else torch.ones(len(det))
            sign = torch.where(sign == 0, torch.ones_like(sign), sign)
            uv = post.receding_direction(snr, det, sign.cpu()).to(det.dtype)
            good = torch.isfinite(uv).all(-1)
            for a, name in enumerate(("ux", "uy")):
                col = 4 + data.REGRESSED.index(name)
                det[..., col] = torch.where(good, uv[..., a], det[..., col])
        return det


_COLUMNS = (
    CatalogueColumn("CHAN", "", "0-based channel of the centre in the tile's frame"),
    CatalogueColumn("ROW", "", "0-based row (Dec axis pixel) of the centre in the tile's frame"),
    CatalogueColumn("COL", "", "0-based column (RA axis pixel) of the centre in the tile's frame"),
    CatalogueColumn("CHAN_ERR", "", "1-sigma of CHAN"),
    CatalogueColumn("ROW_ERR", "", "1-sigma of ROW"),
    CatalogueColumn("COL_ERR", "", "1-sigma of COL"),
    CatalogueColumn("line_flux_integral", "Jy Hz", "integrated HI line flux"),
    CatalogueColumn("line_flux_integral_err", "Jy Hz", "1-sigma of line_flux_integral (from the predicted log-variance)"),
    CatalogueColumn("hi_size", "arcsec", "HI major-axis diameter"),
    CatalogueColumn("hi_size_err", "arcsec", "1-sigma of hi_size"),
    CatalogueColumn("w20", "km / s", "rest-frame line width at 20% of the peak"),
    CatalogueColumn("w20_err", "km / s", "1-sigma of w20"),
    CatalogueColumn("pa", "deg", "position angle of the receding half of the major axis, east of north, [0, 360)"),
    CatalogueColumn("pa_err", "deg", "1-sigma of pa"),
    CatalogueColumn("i", "deg", "inclination, 0 = face-on"),
    CatalogueColumn("i_err", "deg", "1-sigma of i"),
    CatalogueColumn("score", "", "objectness of the detection's peak"),
)


@register_task(TASK_TYPE)
class Detection3DTask(Task):
    """Targets, metrics, catalogue columns and the tile finder of 3D detection; built per
    model: `Detection3DTask(model.head_config)`.

    Detection is per source, not per sample: `catalogue_rows` gives one row per detection
    (with TILE, the row of its tile in the batch), so the one-row-per-object `cosmofm
    predict` path does not apply; cubes go through `find_in_tile` (`cosmofm detect`)."""

    modality = "cube"
    catalogue_columns = _COLUMNS

    def __init__(self, head: Detection3DHeadConfig):
        self.head = head

    @staticmethod
    def labelled_mocks(card, n: int, seed: int = 0, *, workers: int = 1, progress: bool = False, **settings) -> list[Sample]:
        """Labelled survey-cube tiles (`detection3d_data.labelled_mocks`: tile, density, log_mhi_min,
        tiles_per_cube, continuum_residual)."""
        known = {"tile", "density", "log_mhi_min", "tiles_per_cube", "continuum_residual"}
        if set(settings) - known:
            raise InputError("recipe.mocks", f"unknown settings {sorted(set(settings) - known)}", f"use {sorted(known)}")
        if "tile" in settings:
            settings["tile"] = tuple(settings["tile"])
        return data.labelled_mocks(card, n, seed, workers=workers, progress=progress, **settings)

    def targets(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        return data.targets_from_samples(samples)

    def prepare(self, model: CosmoFMForDetection3D, samples: Sequence[Sample]) -> None:
        """Record the training tiles' shape as the head_block `cosmofm detect` runs the network
        on (`Detection3DHeadConfig.inference`, unless set): the objectness it learnt, and the
        threshold calibrated on tiles of that size, hold for inputs of that size."""
        shapes = {tuple(s.values.shape) for s in samples}
        if len(shapes) == 1 and "head_block" not in model.head_config.inference:
            block = shapes.pop()  # overlapping by a quarter, as the bench's 16 x 8 x 8 for 64 x 32 x 32
            model._set_task(inference={**model.head_config.inference, "head_block": list(block), "block_overlap": [b // 4 for b in block]})

    def metrics(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """SDC2 score, completeness, purity and median property errors on the test tiles
        (`pixel_frame_score`), against all truth sources and (`*_snr`) against those above
        `target_min_snr`; plus the mean number of detections per tile."""
        det, src, tile = outputs["detections"], targets["sources"], targets["tile"]
        full = data.pixel_frame_score(det, src, tile)
        bright = data.pixel_frame_score(det, src, tile, self.head.target_min_snr)
        out = {"sdc2_score": full["score"], "completeness": full["completeness"], "purity": full["purity"],
               "n_truth": full["n_truth"], "n_detected": full["n_candidates"], "n_matched": full["n_match"],
               "mean_source_score": full["mean_source_score"],
               "sdc2_score_snr": bright["score"], "completeness_snr": bright["completeness"], "purity_snr": bright["purity"],
               "n_truth_snr": bright["n_truth"],
               "detections_per_tile": float((det[..., 0] > 0).sum()) / max(len(det), 1)}
        out.update({f"median_error_{k}": v for k, v in full["median_errors"].items()})
        return out

    def calibrate(self, model: CosmoFMForDetection3D, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor],
                  min_purity: float = 0.9) -> dict[str, float]:
        """Choose the objectness threshold on a held-out split of tiles, stored in `model`'s head
        config (`detection3d_calibration.calibrate_tiles`: the best SDC2 score whose purity
        clears `min_purity` by its binomial error)."""
        fitted = calibration.calibrate_tiles(model, outputs, targets, min_purity)
        self.head = model.head_config
        return fitted

    def calibrate_catalogues(self, model: CosmoFMForDetection3D, pairs: Sequence[tuple[Table, Table]], beam_arcsec: float,
                             min_purity: float = 0.9, merge_factors: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0)) -> dict[str, float]:
        """As `calibrate`, on whole held-out cubes' catalogues, for the threshold and the
        `merge_factor` together (`detection3d_calibration.calibrate_catalogues`)."""
        fitted = calibration.calibrate_catalogues(model, pairs, beam_arcsec, min_purity, merge_factors)
        self.head = model.head_config
        return fitted

    def catalogue_rows(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """One row per detection of the batch, in the pixel frame's units where no tile scales
        are known (flux in noise units x channel width, size in pixels, w20 in channels x c/nu
        at a 1 Hz channel): the columns in world units come from `find_in_tile`. TILE: the
        row of the detection's tile in the batch."""
        det = outputs["detections"].detach().float().cpu().numpy()
        tile_idx, slot = np.nonzero(det[..., 0] > 0)
        unit = {"pixel_scale": 1.0, "freq0": 1.0, "dnu": 1.0, "noise": 1.0, "beam_fwhm": 1.0, "j_ex": -1.0, "j_ey": 0.0, "j_nx": 0.0, "j_ny": 1.0}
        cols = data.to_sdc2(det[tile_idx, slot], unit)
        return {"TILE": tile_idx, **{c.name: cols[c.name] for c in self.catalogue_columns}}

    def find_in_tile(self, model: CosmoFMForDetection3D, values: np.ndarray, ivar: np.ndarray | None, header: fits.Header,
                     *, bf16: bool = False, wcs=None, columns: bool = False, merge: bool = True) -> Table | dict:
        """The tile finder (field-inference contract): (C, H, W) float32 Jy/beam `values`,
        `ivar` (same shape, 0 = masked) or None (noise measured per channel: 1.4826 x the
        median |value|), the tile's 3D FITS header -> a Table with CHAN, ROW, COL (0-based,
        tile frame), the SDC2 property columns line_flux_integral [Jy Hz], hi_size [arcsec],
        w20 [km/s], pa [deg], i [deg] with their *_err columns, and score; empty (with those
        columns) when nothing is found. `bf16`: the forward under bfloat16 autocast on the
        model's device (CPUs with AVX512-BF16 / AMX, GPUs), a speed option whose catalogue
        differs from float32's within the tolerance `tests/test_detect_speed.py` states.
        For a caller that cuts a tile into blocks (`finetune.detect.HeadFinder`): `wcs`, this
        header's `sofia_baseline._frequency_wcs` (it costs ~20 ms to build from a header), and
        `columns=True`: the plain column dict instead of the Table (one Table per tile, not per
        block); `merge=False`: the tile's duplicates kept, for one merge over the whole catalogue."""
        from cosmofm.heads.sofia_baseline import _frequency_wcs
        from cosmofm.pretrain.data import collate_samples

        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 3:
            raise InputError("values", f"must be (C, H, W), got shape {values.shape}", "pass one cube tile, channels first")
        w = wcs if wcs is not None else _frequency_wcs(header)[0]  # spectral axis, RESTFRQ for velocity, BMAJ/BMIN: refused with a message
        good = np.isfinite(values)
        values = np.where(good, values, np.float32(0.0))
        if ivar is None:
            rms = 1.4826 * np.median(np.abs(values.reshape(values.shape[0], -1)), axis=1)  # (C,)
            ivar = np.where(rms > 0, 1.0 / np.where(rms > 0, rms, 1.0) ** 2, 0.0)[:, None, None] * np.ones_like(values)
        ivar = np.where(good, np.asarray(ivar, dtype=np.float32), np.float32(0.0)).astype(np.float32)
        if ivar.shape != values.shape:
            raise InputError("ivar", f"has shape {ivar.shape}, values {values.shape}", "give one inverse variance per voxel, or None")
        measured = ivar > 0
        noise = float(np.median(1.0 / np.sqrt(ivar[measured]))) if measured.any() else 1.0
        scales = data.tile_scales(header, noise, w)
        beam_pix = scales["beam_fwhm"] / scales["pixel_scale"]
        if self.head.beam_fwhm_pix and abs(beam_pix / self.head.beam_fwhm_pix - 1) > 0.25:
            raise InputError("header.BMAJ/BMIN", f"give a beam of {beam_pix:.2f} pixels; the model was trained on {self.head.beam_fwhm_pix:.2f}",
                             "convolve or regrid the cube to the training beam, or fine-tune on mocks with this beam")
        if not measured.any():  # all blank (NaN / flagged): nothing to find
            return {c.name: np.zeros(0) for c in _COLUMNS} if columns else _empty_table()
        sample = data.tile_sample(values, ivar, header, {"card": self.head.card or "cube", "id": "tile"}, scales)
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
            det = model(collate_samples([sample], model.config.survey_names).to(device), merge=merge).detections[0].float().cpu().numpy()
        det = det[det[:, 0] > 0]

        def freq_at(chan):
            return np.asarray(w.all_pix2world(np.zeros_like(chan), np.zeros_like(chan), chan, 0)[2], float)

        cols = data.to_sdc2(det, scales, freq_at)
        return cols if columns else _table(cols)


def _table(cols: dict[str, np.ndarray]) -> Table:
    t = Table()
    for c in _COLUMNS:
        v = np.asarray(cols[c.name], dtype=np.float64)
        t[c.name] = v if not c.unit else u.Quantity(v, c.unit)
    return t


def _empty_table() -> Table:
    return _table({c.name: np.zeros(0) for c in _COLUMNS})


__all__ = [
    "CosmoFMForDetection3D",
    "Detection3DDecoder",
    "Detection3DHeadConfig",
    "Detection3DOutput",
    "Detection3DTask",
    "noise_normalised",
]
