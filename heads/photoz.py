"""Photometric-redshift head: a binned p(z) from multi-band image stamps, and its `Task`.

`CosmoFMForPhotoz` = the CosmoFM backbone + a small MLP on the pooled tokens (the token
mean next to attention pooling, as the classification head) giving logits over
`n_bins` bins uniform in ln(1 + z) on [0, z_max]: a free-form predictive distribution
p(z), following Pasquet et al. 2019 (A&A 621, A26), who classify into redshift bins
with a softmax and read the redshift and its error off the resulting PDF.

Why binned and not a Gaussian mixture density network (Bishop 1994; D'Isanto &
Polsterer 2018, A&A 609, A111): a softmax over bins trained with cross-entropy is as
stable as classification (no variances to clamp, no collapsed components), represents
any shape of p(z) (the multi-modal colour degeneracies of photometric redshifts), and
gives the CDF, quantiles and PIT by a cumulative sum. Its cost is the resolution of the
grid, which is why the bins are uniform in ln(1 + z): a bin is a constant dz/(1 + z)
(0.0054 at the defaults), the unit of every photo-z figure of merit.

Targets: the true ln(1 + z) spread over the bins as a Gaussian of width `target_width`
(in ln(1 + z), i.e. ~dz/(1 + z)) rather than one-hot (Pasquet et al.'s), so neighbouring
bins are near misses, not wrong classes (label-distribution learning, Gao et al. 2017,
IEEE TIP 26, 2825). Loss: cross-entropy against those soft targets. Calibration: one
temperature on the logits fitted on a held-out split (`PhotozTask.calibrate`, Guo et
al. 2017, with the true bin as the class), applied to `probs`.

Inputs: the pooled image tokens and, unless `photometry_bands` is 0, a photometry branch
on aperture colours measured from the same stamps in the forward pass (`heads/photometry.py`:
networks reading images and magnitudes together beat either alone, Henghes et al. 2022,
MNRAS 512, 1696; why the tokens alone do not reach the colours' precision is said there).
`from_card` turns it on with the card's band count; configs saved before it existed have
no such field and load as image-only heads.

Point estimate: the median of p(z); error: half the central 68 % interval. The metric
functions (NMAD, outlier fraction, bias, PIT, coverage) live in `heads/photoz_metrics.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads import photoz_metrics
from cosmofm.heads.base import CatalogueColumn, CosmoFMForTask, Task, TaskHeadConfig, TaskOutput, register_task
from cosmofm.heads.photometry import PhotometryBranch, photometry_features, reference_band_index
from cosmofm.heads.pooling import POOLINGS, PooledHead
from cosmofm.pretrain.data import CosmoFMBatch
from cosmofm.pretrain.modeling_cosmofm import CosmoFMOutput

TASK_TYPE = "photoz"
INTERVALS = (0.68, 0.95)  # central intervals reported with every prediction


@dataclass
class PhotozHeadConfig(TaskHeadConfig):
    """The head's settings; stored as `config.task` (a dict, with `type` and `schema_version`) in config.json.

    Args:
        z_max (`float`, 4.0): upper end of the p(z) grid (dimensionless redshift); the
            grid starts at z = 0. 4 covers the mocks' quasars; galaxies stop near 0.6.
        n_bins (`int`, 300): bins of p(z), uniform in ln(1 + z).
        target_width (`float`, 0.01): sigma of the Gaussian the true ln(1 + z) is spread
            with in the training targets (~dz/(1+z)); 0 = one-hot.
        hidden_size (`int`, 256): width of the head's hidden layer.
        dropout (`float`, 0.1): dropout before each head layer.
        pooling (`str`, "attention"): "attention" (learned queries over the tokens, next to
            their mean) or "mean" (the backbone's mean-pooled embedding).
        pooling_heads (`int`, 4): attention-pooling queries.
        photometry_bands (`int`, 0): bands of the stamps read by the photometry branch
            (aperture colours beside the tokens); 0 = no branch (image tokens only).
            `from_card` sets it to the card's band count unless given.
        reference_band (`int`, 0): index of the band whose magnitude and concentration the
            photometry branch reads (`from_card`: the r band, else the middle one).
        photometry_warm_start_steps (`int`, 6000): most steps of training the photometry
            branch alone before fine-tuning (`PhotozTask.prepare`; the best on a held-out
            fifth is kept); 0: only standardise its inputs.
        redshift_label (`str`, "redshift"): key of the redshift in `Sample.meta["labels"]`.
        temperature (`float`, 1.0): logit temperature fitted on a calibration split.
        card (`str`, ""): the data card the head was trained on (provenance only).
    """

    z_max: float = 4.0
    n_bins: int = 300
    target_width: float = 0.01
    hidden_size: int = 256
    dropout: float = 0.1
    pooling: str = "attention"
    pooling_heads: int = 4
    photometry_bands: int = 0
    reference_band: int = 0
    photometry_warm_start_steps: int = 6000
    redshift_label: str = "redshift"
    temperature: float = 1.0
    card: str = ""

    TYPE: ClassVar[str] = TASK_TYPE

    def __post_init__(self):
        super().__post_init__()
        if not self.z_max > 0:
            raise InputError("task.z_max", f"must be > 0, got {self.z_max}", "e.g. 4.0")
        if not (isinstance(self.n_bins, int) and self.n_bins >= 2):
            raise InputError("task.n_bins", f"must be a whole number >= 2, got {self.n_bins!r}", "e.g. 300")
        if not self.target_width >= 0:
            raise InputError("task.target_width", f"must be >= 0, got {self.target_width}", "e.g. 0.01 (0 = one-hot targets)")
        if not self.temperature > 0:
            raise InputError("task.temperature", f"must be > 0, got {self.temperature}", "refit it with PhotozTask.calibrate")
        if self.pooling not in POOLINGS:
            raise InputError("task.pooling", f"is {self.pooling!r}", f"use one of {POOLINGS}")
        if self.photometry_bands == 1 or not (isinstance(self.photometry_bands, int) and self.photometry_bands >= 0):
            raise InputError("task.photometry_bands", f"is {self.photometry_bands!r}", "colours need >= 2 bands; 0 turns the photometry branch off")
        if self.photometry_bands and not 0 <= self.reference_band < self.photometry_bands:
            raise InputError("task.reference_band", f"is {self.reference_band!r}", f"use a band index in [0, {self.photometry_bands})")
        if not (isinstance(self.photometry_warm_start_steps, int) and self.photometry_warm_start_steps >= 0):
            raise InputError("task.photometry_warm_start_steps", f"is {self.photometry_warm_start_steps!r}", "a whole number >= 0 (0 = no warm start)")

    @classmethod
    def from_card(cls, card, **kwargs) -> "PhotozHeadConfig":
        """As `TaskHeadConfig.from_card`, with the photometry branch reading the card's bands
        (its r band as the reference) unless `photometry_bands` is given."""
        bands = [b.name for b in getattr(card, "bands", [])]
        if "photometry_bands" not in kwargs and len(bands) >= 2:
            kwargs = {"photometry_bands": len(bands), "reference_band": reference_band_index(bands), **kwargs}
        return super().from_card(card, **kwargs)

    def bin_edges(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(n_bins + 1,) redshift edges, uniform in ln(1 + z) from 0 to z_max."""
        return torch.expm1(torch.linspace(0.0, math.log1p(self.z_max), self.n_bins + 1, dtype=dtype, device=device))

    def bin_index(self, redshift) -> torch.Tensor:
        """(N,) long: the p(z) bin holding each redshift (those beyond the grid in the end bins)."""
        z = torch.as_tensor(redshift).double().cpu()
        return (torch.bucketize(z, self.bin_edges(), right=True) - 1).clamp(0, self.n_bins - 1)


@dataclass
class PhotozOutput(TaskOutput):
    """What the photo-z model returns; (N,) per object unless said otherwise.

    loss: cross-entropy of the logits against the smoothed targets; only with `redshift`.
    logits: (N, n_bins) raw logits over the ln(1 + z) bins (`config.task["temperature"]` not applied).
    probs: (N, n_bins) calibrated p(z) per bin (softmax of logits / temperature).
    redshift: median of p(z); redshift_err: half the central 68 % interval.
    z_lo68, z_hi68, z_lo95, z_hi95: central 68 % and 95 % intervals of p(z).
    backbone: the backbone's CosmoFMOutput.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    redshift: torch.Tensor | None = None
    redshift_err: torch.Tensor | None = None
    z_lo68: torch.Tensor | None = None
    z_hi68: torch.Tensor | None = None
    z_lo95: torch.Tensor | None = None
    z_hi95: torch.Tensor | None = None
    backbone: CosmoFMOutput | None = None


def pdf_quantiles(probs: torch.Tensor, edges: torch.Tensor, q: Sequence[float]) -> torch.Tensor:
    """(N, Q) redshift quantiles of binned p(z), linear within a bin (the CDF is piecewise
    linear); (N, B) probs, (B + 1,) edges. Pure tensor ops (no host round trip)."""
    assert probs.shape[-1] + 1 == edges.shape[-1], f"{probs.shape[-1]} bins need {probs.shape[-1] + 1} edges, got {edges.shape[-1]}"
    p = probs.float()
    edges = edges.to(p.device, p.dtype)
    cdf = p.cumsum(-1)  # (N, B): CDF at each bin's upper edge
    qs = torch.tensor(list(q), dtype=p.dtype, device=p.device) * cdf[:, -1:]  # (N, Q): probs need not sum to 1 exactly
    idx = (cdf.unsqueeze(1) < qs.unsqueeze(-1)).sum(-1).clamp(max=p.shape[-1] - 1)  # (N, Q) bin holding the quantile
    below = torch.gather(F.pad(cdf, (1, 0)), 1, idx)  # (N, Q) CDF at the bin's lower edge
    mass = torch.gather(p, 1, idx).clamp(min=1e-12)
    frac = ((qs - below) / mass).clamp(0, 1)
    return edges[idx] + frac * (edges[idx + 1] - edges[idx])


def pdf_summary(probs: torch.Tensor, edges: torch.Tensor) -> dict[str, torch.Tensor]:
    """The point estimate and intervals of binned p(z), (N,) each: `redshift` (median),
    `redshift_err` (half the central 68 % interval), `z_lo68`, `z_hi68`, `z_lo95`, `z_hi95`."""
    q = pdf_quantiles(probs, edges, (0.5, 0.16, 0.84, 0.025, 0.975))  # (N, 5)
    return {"redshift": q[:, 0], "redshift_err": 0.5 * (q[:, 2] - q[:, 1]),
            "z_lo68": q[:, 1], "z_hi68": q[:, 2], "z_lo95": q[:, 3], "z_hi95": q[:, 4]}


def smoothed_targets(redshift: torch.Tensor, edges: torch.Tensor, width: float) -> torch.Tensor:
    """(N, B) target distribution: ln(1 + z) spread as a Gaussian of sigma `width` over the
    bins (the mass beyond the grid folded into the end bins); one-hot when width is 0."""
    log_edges = torch.log1p(edges.to(redshift.device, torch.float32))  # (B + 1,)
    x = torch.log1p(redshift.float().clamp(min=0)).unsqueeze(-1)  # (N, 1)
    if width > 0:
        cdf = torch.special.ndtr((log_edges - x) / width)  # (N, B + 1)
        cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, 1:-1], torch.ones_like(cdf[:, :1])], dim=-1)
        return cdf.diff(dim=-1)
    idx = ((x - log_edges[0]) / (log_edges[1] - log_edges[0])).long().clamp(0, edges.shape[-1] - 2).squeeze(-1)
    return F.one_hot(idx, edges.shape[-1] - 1).float()


class PhotozHead(PooledHead):
    """tokens -> pooled (`pool_tokens`) -> hidden, next to the photometry branch's hidden
    features when it has one -> logits over the p(z) bins (N, n_bins)."""

    def __init__(self, in_size: int, head: PhotozHeadConfig):
        super().__init__(in_size, head.hidden_size, head.dropout, head.pooling, head.pooling_heads)
        self.photometry = PhotometryBranch(head.photometry_bands + 1, head.hidden_size, head.dropout) if head.photometry_bands else None
        self.bins = nn.Linear(head.hidden_size * (2 if self.photometry is not None else 1), head.n_bins)

    def forward(self, pooled: torch.Tensor, photometry: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.features(pooled)  # (N, hidden_size)
        if self.photometry is not None:
            hidden = torch.cat([hidden, self.photometry(photometry).to(hidden.dtype)], dim=-1)
        return self.bins(hidden)  # (N, n_bins)


def batch_photometry(batch: CosmoFMBatch, head: PhotozHeadConfig) -> torch.Tensor:
    """(N, photometry_bands + 1) photometry features of every object's image stamp; an
    InputError naming the objects without an image of `photometry_bands` bands."""
    rows, feats = [], []
    for group in batch.groups:
        if group.modality == "image" and group.values.shape[1] == head.photometry_bands:
            c = group.coords
            feats.append(photometry_features(group.values, group.ivar, c["dec_offset"], c["ra_offset"], head.reference_band))
            rows.append(group.rows)
    covered = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
    if covered.numel() != len(batch):
        missing = sorted(set(range(len(batch))) - set(covered.tolist()))
        ids = [batch.ids[i] if i < len(batch.ids) else str(i) for i in missing[:3]]
        raise InputError(f"objects {ids}", f"have no image stamp of {head.photometry_bands} bands",
                         "photo-z with a photometry branch reads image stamps of the card it was trained on")
    out = torch.empty(len(batch), head.photometry_bands + 1, device=feats[0].device, dtype=feats[0].dtype)
    out[covered.to(out.device)] = torch.cat(feats)
    return out


@register_task(TASK_TYPE)
class CosmoFMForPhotoz(CosmoFMForTask):
    """Backbone + binned p(z) head; the head's settings are `config.task`."""

    head_config_class = PhotozHeadConfig

    def __init__(self, config):
        super().__init__(config)  # self.head_config, self.cosmofm
        self.head = PhotozHead(config.hidden_size, self.head_config)
        self.post_init()

    def set_temperature(self, temperature: float) -> None:
        """Store the fitted logit temperature (saved with the config)."""
        self._set_task(temperature=float(temperature))

    def forward(self, batch: CosmoFMBatch, redshift: torch.Tensor | None = None) -> PhotozOutput:
        out = self.cosmofm(batch)
        photometry = batch_photometry(batch, self.head_config) if self.head_config.photometry_bands else None
        logits = self.head(self.head.pool_tokens(out), photometry)  # (N, B)
        edges = self.head_config.bin_edges(logits.device, torch.float32)  # (B + 1,): from the config, not a saved tensor
        probs = (logits.float() / self.head_config.temperature).softmax(-1)  # (N, B)
        loss = None
        if redshift is not None:
            target = smoothed_targets(redshift.to(logits.device), edges, self.head_config.target_width)
            loss = F.cross_entropy(logits.float(), target)
        return PhotozOutput(loss=loss, logits=logits, probs=probs, **pdf_summary(probs, edges), backbone=out)


def redshifts_from_samples(samples: Sequence[Sample], label: str = "redshift") -> torch.Tensor:
    """(N,) float32 redshifts from `Sample.meta["labels"][label]`; an InputError naming the
    first sample without one (before any compute)."""
    zs = []
    for s in samples:
        z = (s.meta.get("labels") or {}).get(label)
        if z is None or not math.isfinite(float(z)):
            raise InputError(f"{s.meta.get('id', '?')}: labels.{label}", f"is {z!r}, not a redshift",
                             "fine-tune and evaluate photo-z on samples with known redshifts (e.g. the image mocks)")
        zs.append(float(z))
    return torch.tensor(zs, dtype=torch.float32)


@register_task(TASK_TYPE)
class PhotozTask(Task):
    """Targets, metrics, calibration and catalogue columns of photo-z; built per model: `PhotozTask(model.head_config)`."""

    modality = "image"

    catalogue_columns = (
        CatalogueColumn("Z_PHOT", "", "median of p(z)"),
        CatalogueColumn("Z_PHOT_ERR", "", "half the central 68% interval of p(z)"),
        CatalogueColumn("Z_PHOT_LO68", "", "16th percentile of p(z)"),
        CatalogueColumn("Z_PHOT_HI68", "", "84th percentile of p(z)"),
        CatalogueColumn("Z_PHOT_LO95", "", "2.5th percentile of p(z)"),
        CatalogueColumn("Z_PHOT_HI95", "", "97.5th percentile of p(z)"),
    )

    def __init__(self, head: PhotozHeadConfig):
        self.head = head

    def targets(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        return {"redshift": redshifts_from_samples(samples, self.head.redshift_label)}

    def metrics(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """`photoz_metrics.photoz_metrics` of the outputs (median, intervals, PIT of `probs`) against targets["redshift"]."""
        z = _numpy(targets["redshift"])
        pit = photoz_metrics.binned_cdf(_numpy(outputs["probs"]), self.head.bin_edges().numpy(), z)
        return photoz_metrics.photoz_metrics(z, _numpy(outputs["redshift"]), pit, {
            "68": (_numpy(outputs["z_lo68"]), _numpy(outputs["z_hi68"])), "95": (_numpy(outputs["z_lo95"]), _numpy(outputs["z_hi95"]))})

    def prepare(self, model: CosmoFMForPhotoz, samples: Sequence[Sample], batch_size: int = 256) -> None:
        """Warm-start the photometry branch on the training stamps (no-op without a branch).

        With `photometry_warm_start_steps`, the branch and its share of the output layer are
        trained first on the photometry alone (`MLPPhotoz`, steps chosen on a held-out
        fifth of these samples; seconds, no backbone pass) and the image features' share
        of the output layer starts at zero, so fine-tuning starts from the photometry
        network's p(z) and learns what the image tokens add: the head-first recipe of
        LP-FT (Kumar et al. 2022, ICLR, "Fine-tuning can distort pretrained features"),
        which also keeps a random head's gradients out of the backbone. Otherwise only the
        branch's input standardisation is set."""
        branch = model.head.photometry
        if branch is None:
            return
        from cosmofm.pretrain.data import collate_samples

        features = torch.cat([batch_photometry(collate_samples(list(samples[i:i + batch_size])), self.head)
                              for i in range(0, len(samples), batch_size)]).cpu()
        if not self.head.photometry_warm_start_steps:
            branch.set_standardisation(features)
            return
        from cosmofm.heads.photoz_baseline import MLPPhotoz

        fitted = MLPPhotoz(self.head, widths=(self.head.hidden_size,), max_steps=self.head.photometry_warm_start_steps, dropout=self.head.dropout,
                            seed=torch.initial_seed() % 2**31).fit(
            features.numpy(), self.targets(samples)["redshift"].numpy())
        trained_branch, trained_bins = fitted.net[0], fitted.net[1]
        hidden = self.head.hidden_size
        with torch.no_grad():
            branch.load_state_dict(trained_branch.state_dict())
            model.head.bins.weight[:, :hidden].zero_()  # the image features' share: learned by fine-tuning
            model.head.bins.weight[:, hidden:].copy_(trained_bins.weight)
            model.head.bins.bias.copy_(trained_bins.bias)

    def calibrate(self, model: CosmoFMForPhotoz, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Fit the logit temperature on a held-out split (NLL of the true bin) and store it in `model`."""
        from cosmofm.heads.calibration import fit_temperature

        temperature = fit_temperature(outputs["logits"], self.head.bin_index(targets["redshift"]))
        model.set_temperature(temperature)
        self.head = model.head_config
        return {"temperature": temperature}

    def catalogue_rows(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """The catalogue columns (numpy (N,) each) of one batch's outputs."""
        names = ("redshift", "redshift_err", "z_lo68", "z_hi68", "z_lo95", "z_hi95")
        return {col.name: _numpy(outputs[name]) for col, name in zip(self.catalogue_columns, names)}


def _numpy(x):
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x


__all__ = [
    "CosmoFMForPhotoz",
    "PhotozHead",
    "PhotozHeadConfig",
    "PhotozOutput",
    "PhotozTask",
    "batch_photometry",
    "pdf_quantiles",
    "pdf_summary",
    "redshifts_from_samples",
    "smoothed_targets",
]
