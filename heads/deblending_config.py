"""The deblending head's settings (`DeblendingHeadConfig`, stored as `config.task`), apart from
the model and the task that read them (`heads/deblending.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from cosmofm.data_cards.errors import InputError
from cosmofm.heads.base import TaskHeadConfig

TASK_TYPE = "deblending"
SLOT_AREA = 64 * 64  # max_sources counts per this many pixels


@dataclass
class DeblendingHeadConfig(TaskHeadConfig):
    """The head's settings; stored as `config.task` in config.json.

    Args:
        n_bands (`int`, 0): bands of the stamps (`from_card`: the card's); 0 = not set yet.
        bands (`list[str]`): band names, for catalogue columns (`from_card`).
        band_wavelengths (`list[float]`): effective wavelengths [Angstrom], for stamps given
            as bare arrays (`deblend_stamp`, `find_in_tile`).
        pixel_scale (`float`, 0.2): arcsec per pixel of such stamps.
        fwhm_pixels (`float`, 4.5): the worst band's PSF FWHM [pixels] (matching radius
            and blendedness in the metrics).
        flux_unit (`str`, "nJy"): the card's flux unit (catalogue units).
        hidden_size (`int`, 64): channels of the token features and the decoder.
        embed_size (`int`, 8): per-band pixel / source embedding size.
        max_sources (`int`, 16): most sources per 64 x 64 pixels (slots in the outputs scale
            with the stamp area).
        heatmap_sigma (`float`, 1.5): sigma [pixels] of the Gaussian heatmap targets.
        peak_threshold (`float`, 0.2): heatmap probability a peak needs to be a detection.
        min_size (`float`, 1.0): smallest source scale [pixels] of the distance term.
        background_level (`float`, 0.01): eps_b of the background target, in sky sigma (0.05
            cost isolated sources ~7 % of their flux, their faint wings going to the background).
        fraction_weight, flux_weight, offset_weight (`float`, 1.0 / 2.0 / 1.0): loss weights.
        fraction_flux_weight (`float`, 1.0): weight of `deblending_net.fraction_flux_loss`
            (the flux-weighted L1 fraction error; 0 = the cross-entropy alone, as before).
        refine_steps (`int`, 1): steps of `deblending_net.SplitRefiner` after the first split
            (one refiner, its weights shared by the steps; 0: none, the split of heads saved
            before schema version 2). One step cut the blended flux scatter by a quarter
            (docs/benchmarks.md, deblending, session 15).
        refine_window (`int`, 32): side [pixels] of the window around each source that
            the refiner corrects (7 FWHM of the lsst-like card's 4.5 px; its corrections stop
            at the window's edge, so a card with larger galaxies in pixels wants a larger one).
        refine_channels (`int`, 24) and refine_dilations (`list[int]`, [1, 2, 4, 1]): the
            refiner's width and its 3 x 3 convolutions' dilations (one layer each; receptive
            field 1 + 2 x their sum pixels: 17 by default, about half the window).
        flux_correction (`bool`, True): apply the learned outskirts correction
            (`deblending_net.flux_correction`) to detected sources; False: plain fraction x
            image (an ablation). Sources at given `positions` (known-positions mode) always
            get the plain fractions: there the correction lowered the blended fluxes' median
            by 0.9 % and raised the isolated scatter by a fifth, while for detected sources it
            lowers the blended MAPE by 0.4 points (three 6,000-step heads, docs/benchmarks.md,
            deblending, session 19).
        band_fwhm_pixels (`list[float]`): each band's PSF FWHM [pixels] on the training card
            (`from_card`); empty in heads saved before it: `fwhm_pixels` for every band.
        psf_conditioning (`bool`, False): give the decoder and the refiner each band's PSF FWHM
            over the card's (log, `DeblendingTask.inputs`) as constant input planes, so one head
            can be trained across seeing and told the seeing of what it deblends. A head trained
            at one seeing lost 2.4x in blended flux scatter at 0.8x / 1.25x it, and one trained
            across seeing without being told it lost ~20 % at the card's own (docs/benchmarks.md,
            deblending, session 17).
        trained_psf_range (`list[float]`, [1, 1]): the smallest and largest PSF FWHM over the
            card's of the training blends (`DeblendingTask.prepare` measures it);
            `cosmofm deblend` flags mosaics outside it (`finetune.deblend.psf_check`).
        student_widths (`list[int]`, []): channels per level of the fast path's
            `deblending_student.PixelStudent`, which computes the decoder's outputs from the
            pixels alone (no backbone); [] = no student. `forward(student=True)` uses it.
        distill_weight (`float`, 1.0): weight of `deblending_student.distillation_loss` (the
            student's outputs against the head's) beside the task loss when a student trains.
        student_peak_threshold (`float`, 0): the student's own `peak_threshold` (tuned as the
            head's); 0 = the head's.
        student_refine_channels (`int`, 0): width of the student's own `SplitRefiner` (the
            head's window and dilations), trained with the student on the task loss and, with
            distill_weight, the head's refined fractions; 0 = the student path uses the head's.
        card (`str`, ""): the data card the head was trained on (provenance).
    """

    n_bands: int = 0
    bands: list = field(default_factory=list)
    band_wavelengths: list = field(default_factory=list)
    pixel_scale: float = 0.2
    fwhm_pixels: float = 4.5
    flux_unit: str = "nJy"
    hidden_size: int = 64
    embed_size: int = 8
    max_sources: int = 16
    heatmap_sigma: float = 1.5
    peak_threshold: float = 0.2
    min_size: float = 1.0
    background_level: float = 0.01
    fraction_weight: float = 1.0
    flux_weight: float = 2.0
    offset_weight: float = 1.0
    fraction_flux_weight: float = 1.0
    refine_steps: int = 1
    refine_window: int = 32
    refine_channels: int = 24
    refine_dilations: list = field(default_factory=lambda: [1, 2, 4, 1])
    flux_correction: bool = True
    band_fwhm_pixels: list = field(default_factory=list)
    psf_conditioning: bool = False
    trained_psf_range: list = field(default_factory=lambda: [1.0, 1.0])
    student_widths: list = field(default_factory=list)
    distill_weight: float = 1.0
    student_peak_threshold: float = 0.0
    student_refine_channels: int = 0
    card: str = ""

    TYPE: ClassVar[str] = TASK_TYPE
    SCHEMA_VERSION: ClassVar[int] = 2  # 2 added refine_steps

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DeblendingHeadConfig":
        """As `TaskHeadConfig.from_dict`; a version-1 head without refine_steps (saved before
        the split refiner) gets 0, the split it was trained with."""
        if isinstance(d, Mapping) and d.get("schema_version", 1) == 1:
            d = {"refine_steps": 0, **d}
        return super().from_dict(d)

    def __post_init__(self):
        super().__post_init__()
        self.check_counts("hidden_size", "embed_size", "max_sources", "refine_window", "refine_channels")
        d = self.refine_dilations
        if not isinstance(d, (list, tuple)) or not d or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in d):
            raise InputError("task.refine_dilations", f"is {d!r}, not a list of whole numbers >= 1", "e.g. [1, 2, 4, 1]")
        if isinstance(self.n_bands, bool) or not isinstance(self.n_bands, int) or self.n_bands < 0:
            raise InputError("task.n_bands", f"is {self.n_bands!r}", "the stamps' band count (from_card sets it)")
        for name in ("pixel_scale", "fwhm_pixels", "heatmap_sigma", "min_size", "background_level"):
            if not getattr(self, name) > 0:
                raise InputError(f"task.{name}", f"must be > 0, got {getattr(self, name)!r}", "e.g. the default")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise InputError("task.refine_steps", f"is {self.refine_steps!r}, not a whole number >= 0", "0 (no refinement) or e.g. 1")
        for name in ("flux_correction", "psf_conditioning"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"task.{name}", f"is {getattr(self, name)!r}, not true / false", "true or false")
        f = self.band_fwhm_pixels
        if not isinstance(f, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in f) \
                or (f and self.n_bands and len(f) != self.n_bands):
            raise InputError("task.band_fwhm_pixels", f"is {f!r}", "one PSF FWHM [pixels] > 0 per band (from_card sets it)")
        r = self.trained_psf_range
        if not isinstance(r, (list, tuple)) or len(r) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in r) \
                or not 0 < r[0] <= r[1]:
            raise InputError("task.trained_psf_range", f"is {r!r}", "[smallest, largest] PSF FWHM over the card's, e.g. [0.85, 1.35]")
        if not 0 < self.peak_threshold < 1:
            raise InputError("task.peak_threshold", f"must be in (0, 1), got {self.peak_threshold!r}", "e.g. 0.3")
        if self.bands and self.n_bands and len(self.bands) != self.n_bands:
            raise InputError("task.bands", f"{len(self.bands)} names for {self.n_bands} bands", "one name per band")
        w = self.student_widths
        if not isinstance(w, (list, tuple)) or len(w) == 1 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in w):
            raise InputError("task.student_widths", f"is {w!r}", "[] (no student) or two or more channel counts, e.g. [16, 32, 48, 64]")
        if not (self.student_peak_threshold == 0 or 0 < self.student_peak_threshold < 1):
            raise InputError("task.student_peak_threshold", f"is {self.student_peak_threshold!r}", "0 (the head's peak_threshold) or in (0, 1)")
        c = self.student_refine_channels
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise InputError("task.student_refine_channels", f"is {c!r}", "0 (the head's refiner) or a width, e.g. 12")
        if not self.distill_weight >= 0:
            raise InputError("task.distill_weight", f"must be >= 0, got {self.distill_weight!r}", "e.g. 1.0")

    @classmethod
    def from_card(cls, card, **kwargs) -> "DeblendingHeadConfig":
        """As `TaskHeadConfig.from_card`, with the bands, wavelengths, pixel scale, PSF FWHM
        and flux unit of the image card unless given."""
        from cosmofm.heads.deblend_baseline import fwhm_in_pixels

        bands = getattr(card, "bands", [])
        if bands:
            kwargs = {"n_bands": len(bands), "bands": [b.name for b in bands],
                      "band_wavelengths": [float(b.wavelength.to_value("Angstrom")) for b in bands],
                      "pixel_scale": float(card.pixel_scale.to_value("arcsec")), "fwhm_pixels": fwhm_in_pixels(card),
                      "band_fwhm_pixels": [float((b.psf_fwhm / card.pixel_scale).decompose().value) for b in bands],
                      "flux_unit": str(card.flux_unit), **kwargs}
        return super().from_card(card, **kwargs)

    def reference_fwhm(self) -> list[float]:
        """Each band's PSF FWHM [pixels] on the training card (`band_fwhm_pixels`, else `fwhm_pixels`)."""
        return [float(x) for x in self.band_fwhm_pixels] or [float(self.fwhm_pixels)] * self.n_bands

    def slots(self, shape: tuple[int, int]) -> int:
        """Source slots of a stamp of (H, W) pixels: max_sources per 64 x 64 pixels."""
        return self.max_sources * max(1, math.ceil(shape[0] * shape[1] / SLOT_AREA))


__all__ = ["SLOT_AREA", "TASK_TYPE", "DeblendingHeadConfig"]
