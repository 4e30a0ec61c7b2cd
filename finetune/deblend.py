"""`cosmofm deblend`: a multi-band mosaic in, a deblended source catalogue out, tile by tile.

    deblend_image("field.fits", "sources.fits")                       # sep (classical)
    deblend_image("field.fits", "sources.fits", method="photutils")
    deblend_image("field.fits", "sources.fits", model="runs/deblend/model", write_stamps=True)

The mosaic is read lazily (`data_cards.readers.mosaic.open_mosaic`: bad bands, NaN /
saturated pixels, missing IVAR and WCS are masked or flagged there) and tiled by
`finetune.tiling.run_tiled`; this module supplies the tile finder and the catalogue's
last step. Finders:

* `ClassicalDeblender("sep" | "photutils")`: the baselines of `heads.deblend_baseline`
  (detection on the inverse-variance-weighted band sum, multi-threshold deblending) run
  on the tile; FLUX_<band> is their Kron ("MAG_AUTO"-like) total flux, the usual total
  flux of a survey catalogue. Background: one global level per band for the whole mosaic
  (SKY<k> of the tile header, SExtractor's clipped mode on a strided sample), not one per
  tile as the baseline does on stamps: a per-tile level moved Kron radii, and so fluxes,
  by up to 5 sigma between tilings of one image. A mosaic with a strongly varying sky
  should be sky-subtracted first.
* a fine-tuned deblending model: `load_task_model(model, expect_task="deblending")` and
  its registered Task's `find_in_tile(model, values, ivar, header)`. When the mosaic gives
  its PSF (PSFFWHM, PIXSCALE) it is compared with the seeing the head was trained on (`psf_check`):
  PSFRATIO in the header, and beyond PSF_TOLERANCE outside it a warning, the PSFDIFF keyword and the
  psf_unlike_training bit on every row (a head trained at one seeing splits worse at another).

Catalogue (one row per source, in tile order): ID, RA, DEC [deg] (NaN without a WCS),
X, Y (0-based full-frame pixel column / row, numpy / astropy convention: X = 0 is the
centre of the first column), FLUX_<band>, FLUXERR_<band> [the band's BUNIT], FLAGS (bit
mask, `FLAG_BITS`). With `write_stamps`, one ImageHDU per source (EXTNAME SRC<ID>, (B, h,
w), WCS of the cut-out): the tile's pixels in the box around the source's segment, with
every other detected source's segment set to 0 (an isolated image of the source), from
the finder's `meta["segmentation"]` (tile-frame labels, row k = label k + 1); a model
finder may instead give `meta["stamps"]`: per row (row0, col0, (B, h, w) array) in the
tile frame.
"""

from __future__ import annotations

import warnings

import numpy as np
from astropy.io import fits
from astropy.table import Table

from cosmofm.data_cards.errors import InputError

FLAG_BITS = {  # bits 1, 2, 4 as the deblending head's find_in_tile sets them
    "edge": 1,  # centroid within 1 PSF FWHM of the image edge: apertures cut by it
    "masked_pixels": 2,  # a masked pixel (ivar 0: NaN, saturated, MASK) within 1 PSF FWHM of the centroid in some band
    "blended": 4,  # shares its footprint with another source (from finders that report it: the model's)
    "no_wcs": 8,  # the mosaic has no celestial WCS: RA/DEC NaN
    "ivar_estimated": 16,  # a band's ivar is a constant from the robust sky noise (no IVAR HDU)
    "band_empty": 32,  # a band without a valid pixel for this source: its flux NaN
    "psf_unlike_training": 64,  # the mosaic's PSF FWHM lies beyond PSF_TOLERANCE outside the seeing the head was trained on
}
FINDER_BITS = 2 | 4  # kept from a finder's own FLAGS; its edge bit is the tile's edge, recomputed here on the full image
INPUT_FLAG_KEYWORDS = {"band_missing": "BANDMISS", "band_off_grid": "OFFGRID", "band_unusable": "BANDBAD", "ivar_estimated": "IVAREST",
                       "no_wcs": "NOWCS", "bunit_missing": "NOBUNIT", "psf_unlike_training": "PSFDIFF"}  # primary-header keyword (True) of each mosaic problem
# A head trained at one seeing splits blends at another worse: the lsst-like head's blended flux
# scatter went from 0.067 to 0.16 at 0.8x and 1.25x its card's PSF FWHM (docs/benchmarks.md,
# deblending, session 17); beyond 10 % its catalogue says so.
PSF_TOLERANCE = 0.10
MODEL_INPUT_CODES = {"psf_unlike_training": "PSF FWHM unlike the head's training seeing"}  # beside the mosaic's FLAG_CODES
DEFAULT_FWHM_PIXELS = 4.5  # the lsst-like card's worst PSF (0.9 arcsec at 0.2 arcsec/pixel), when the mosaic gives none
STAMP_MARGIN = 3  # pixels around a segment's bounding box in its stamp


class ClassicalDeblender:
    """A tile finder (`finetune.tiling` contract) around `heads.deblend_baseline`'s sep or
    photutils pipeline: ROW, COL, FLUX_<band>, FLUXERR_<band> (Kron), FLAGS, and the
    tile's segmentation map in `meta["segmentation"]`."""

    def __init__(self, method: str = "sep", fwhm_pixels: float | None = None, contrast: float | None = None, thresh: float | None = None):
        from cosmofm.heads.deblend_baseline import PIPELINES, THRESH_SIGMA

        if method not in PIPELINES:
            raise InputError("method", f"unknown deblending method {method!r}", f"use one of {sorted(PIPELINES)} (or --model)")
        self.method, self.fwhm_pixels, self.contrast = method, fwhm_pixels, contrast
        self.thresh = THRESH_SIGMA if thresh is None else float(thresh)
        self.__name__ = f"{method} deblender"

    def fwhm(self, header: fits.Header) -> float:
        """PSF FWHM [pixels]: given, else the header's PSFFWHM / PIXSCALE, else DEFAULT_FWHM_PIXELS."""
        if self.fwhm_pixels is not None:
            return float(self.fwhm_pixels)
        if header.get("PSFFWHM") and header.get("PIXSCALE"):
            return float(header["PSFFWHM"]) / float(header["PIXSCALE"])
        return DEFAULT_FWHM_PIXELS

    def __call__(self, values: np.ndarray, ivar: np.ndarray, header: fits.Header) -> Table:
        from cosmofm.data_cards.sample import Sample
        from cosmofm.heads.deblend_baseline import PIPELINES

        bands = band_names(header, len(values))
        fn, arg = PIPELINES[self.method]
        if self.method == "sep":
            import sep

            sep.set_extract_pixstack(max(300_000, 2 * values.shape[1] * values.shape[2]))  # a crowded tile needs more than sep's default
            sep.set_sub_object_limit(4096)
        sky = np.array([float(header.get(f"SKY{k}", 0.0)) for k in range(len(values))], np.float32)
        values = np.where(ivar > 0, values - sky[:, None, None], np.float32(0.0))  # the mosaic's one sky level, not the tile's
        sample = Sample.validated("image", values, ivar, {}, {"id": "tile", "truth": {"filters": bands}})
        kwargs = {arg: self.contrast} if self.contrast is not None else {}
        cat = fn(sample, fwhm_pixels=self.fwhm(header), thresh=self.thresh, subtract_background=False, **kwargs)
        t = Table({"ROW": cat.positions[:, 0].astype(np.float64), "COL": cat.positions[:, 1].astype(np.float64)})
        for b, name in enumerate(bands):
            unit = header.get(f"BUNIT{b}", header.get("BUNIT", "")) or None
            t[f"FLUX_{name}"] = _quantity(cat.fluxes["kron"][:, b], unit)
            t[f"FLUXERR_{name}"] = _quantity(cat.flux_errors["kron"][:, b], unit)
        t["FLAGS"] = np.zeros(len(t), np.int64)
        t.meta["segmentation"] = cat.segmentation
        return t


def _quantity(values, unit):
    import astropy.units as u

    return u.Quantity(values, unit) if unit else np.asarray(values, np.float64)


def band_names(header: fits.Header, n: int) -> list[str]:
    """BAND0..BAND{n-1} of a tile header, else "0".."n-1"."""
    return [str(header.get(f"BAND{k}", k)) for k in range(n)]


def model_finder(model, expect_task: str, device=None, **options):
    """(finder, device) of a fine-tuned task model: its registered Task's `find_in_tile`, given
    `options` (e.g. bf16=True); `device`: move the model there first (None: where it is)."""
    from cosmofm.finetune.task_predict import load_task_model
    from cosmofm.heads.base import task_class

    model = load_task_model(model, expect_task=expect_task).eval()
    if device is not None:
        model.to(device)
    task = task_class(model.task_type)(model.head_config)
    if not hasattr(task, "find_in_tile"):
        raise InputError(f"task {model.task_type!r}", "has no find_in_tile", "this task's head cannot run on tiles yet")

    def finder(values, ivar, header):
        import torch

        with torch.no_grad():
            return task.find_in_tile(model, values, ivar, header, **options)

    finder.__name__ = f"{model.task_type} model"
    finder.head_config = model.head_config  # what it was trained on, for checks against the input
    return finder, next(model.parameters()).device


def psf_check(head_config, mosaic) -> tuple[float | None, str | None]:
    """(the mosaic's PSF FWHM over the head's training card's, both in pixels, the worst band's; a
    problem message when it lies more than PSF_TOLERANCE outside the seeing the head was trained
    on, `trained_psf_range`: [1, 1], the card's own, unless trained across seeing). (None, None)
    when the mosaic gives no PSFFWHM / PIXSCALE: nothing to compare, unless the head is
    told the seeing (`psf_conditioning`): then it is told the card's, which is said."""
    if not (mosaic.psf_fwhm and mosaic.pixscale):
        if head_config.psf_conditioning:
            return None, ("the mosaic gives no PSFFWHM / PIXSCALE, and the head reads each band's seeing (psf_conditioning): it is "
                          f"told its card's ({head_config.card or '?'}); add PSFFWHM [arcsec] to each band's header")
        return None, None
    measured, trained = mosaic.psf_fwhm / mosaic.pixscale, float(head_config.fwhm_pixels)
    ratio = measured / trained
    low, high = head_config.trained_psf_range
    if low / (1 + PSF_TOLERANCE) <= ratio <= high * (1 + PSF_TOLERANCE):
        return ratio, None
    seen = f"{trained:.2f} px" if low == high == 1 else f"{low:.2f}-{high:.2f}x its {trained:.2f} px"
    return ratio, (f"the mosaic's PSF FWHM ({measured:.2f} px) is {ratio:.2f}x the card's, outside the seeing the head was trained "
                   f"on ({seen}, card {head_config.card or '?'}): expect its fluxes' scatter to be ~2x larger; fine-tune "
                   "it on blends at this seeing (mocks: psf_scales), or use --method sep")


def catalogue_template(bands: list[str], units: list[str]) -> Table:
    """The deblend catalogue's columns, in order, with units and no rows."""
    import astropy.units as u

    t = Table()
    t["ID"] = np.zeros(0, np.int64)
    t["RA"], t["DEC"] = u.Quantity(np.zeros(0), u.deg), u.Quantity(np.zeros(0), u.deg)
    t["X"], t["Y"] = u.Quantity(np.zeros(0), u.pix), u.Quantity(np.zeros(0), u.pix)
    for name, unit in zip(bands, units):
        t[f"FLUX_{name}"] = _quantity(np.zeros(0), unit or None)
        t[f"FLUXERR_{name}"] = _quantity(np.zeros(0), unit or None)
    t["FLAGS"] = np.zeros(0, np.int64)
    return t


CLASSICAL_TILE, MODEL_TILE = (512, 64), (128, 32)  # default (tile, overlap) [pixels]; see deblend_image


def deblend_image(path, output, model=None, method: str | None = None, tile: int | tuple | None = None, overlap: int | tuple | None = None,
                  workers: int | None = None, write_stamps: bool = False, progress: bool = True, overwrite: bool = False,
                  bands=None, fwhm_pixels: float | None = None, contrast: float | None = None, thresh: float | None = None,
                  bf16: bool | None = None, student: bool = False) -> dict:
    """Detect and deblend the sources of a multi-band FITS mosaic; write their catalogue.

    path: the mosaic (format: `data_cards.readers.mosaic`). output: .fits or .parquet.
    model: a fine-tuned deblending model (folder / repo id / module), or None for a
        classical `method` ("sep", default, or "photutils"); both together are refused.
    tile, overlap: pixels (one number, or (rows, cols)); overlap / 2 should exceed the
        largest source's radius, apertures included (64 px = 12.8 arcsec at 0.2"/px).
        Default 512 / 64 for sep and photutils, 128 / 32 for a model, whose flux split holds
        (sources + 1) x bands x tile pixels several times (4k x 4k x 6 bands in 128 px tiles:
        851 MB peak, docs/benchmarks.md "Tiled inference").
    workers: processes (None: one per core). write_stamps: one isolated cut-out per source.
    bands: the bands to use (default all). fwhm_pixels: the PSF FWHM for the classical
    apertures (default the mosaic's PSFFWHM, else 4.5). contrast: sep deblend_cont /
    photutils contrast (default the baseline's tuned value). thresh: detection threshold
    in sigma of the detection image (default the baseline's 1.5, tuned on stamps).
    bf16: a model's backbone and decoder under bfloat16 autocast (`deblend_samples`; fluxes
        within ~0.1 % of float32's, 1.2-1.3x faster per core with AVX512-BF16, ~1.6x with AMX,
        docs/benchmarks.md); None (default):
        on where the model's device computes bfloat16 natively (`native_bf16_on`: CUDA, or a
        CPU with AVX512-BF16 / AMX), off elsewhere and for sep / photutils.
    student: a model's fast path, its distilled convolutional student in place of the
        backbone and decoder (`heads/deblending_student.py`; speed and flux figures beside the
        head's in docs/benchmarks.md, deblending); the model must carry one.

    Returns the tiler's summary plus "method", "bands" and "flags" (the mosaic's problems).
    Launched (accelerate launch / torchrun) the tiles are shared by the processes and rank 0
    writes the one catalogue (`finetune.tiling_dist`); each rank measures the mosaic's sky
    levels itself (a strided sample, the same numbers on every rank).
    """
    from pathlib import Path

    from cosmofm.data_cards.readers.mosaic import FLAG_CODES, open_mosaic
    from cosmofm.finetune.tiling import TilePlan, run_tiled
    from cosmofm.finetune.tiling_dist import launched_ranks

    if model is not None and method not in (None, "model"):
        raise InputError("method", f"{method!r} given with a model", "give either --model or --method")
    method = "model" if model is not None else (method or "sep")
    if method == "model" and model is None:
        raise InputError("method", "'model' needs a model", "give --model PATH, or --method sep / photutils")
    if bf16 and method != "model":
        raise InputError("bf16", f"runs a model's network in bfloat16, but the deblender is {method}", "give --model, or drop --bf16")
    if student and method != "model":
        raise InputError("student", f"runs a model's distilled student, but the deblender is {method}", "give --model, or drop --student")
    ranks = launched_ranks()  # None: one process; launched: the rank's device (cuda:LOCAL_RANK, or cpu) runs the model
    if method == "model":
        if bf16 is None:
            import torch

            from cosmofm.heads.redshift_net_cpu import native_bf16_on

            bf16 = native_bf16_on(torch.device("cpu") if ranks is None else ranks.device)
        finder, device = model_finder(model, "deblending", None if ranks is None else ranks.device, bf16=bf16, student=student)
        if student and not finder.head_config.student_widths:
            raise InputError("student", "the model has no distilled student", "drop --student, or distil one (scripts/bench/deblend_student.py)")
        processes = device.type == "cpu"
    else:
        finder, processes = ClassicalDeblender(method, fwhm_pixels, contrast, thresh), True
    default_tile, default_overlap = MODEL_TILE if method == "model" else CLASSICAL_TILE
    tile = default_tile if tile is None else tile
    overlap = default_overlap if overlap is None else overlap
    mosaic = open_mosaic(path, bands)
    plan = TilePlan(mosaic.shape, tile, overlap)
    names = [b.name for b in mosaic.bands]
    psf = fwhm_pixels if fwhm_pixels is not None else (mosaic.psf_fwhm / mosaic.pixscale if mosaic.psf_fwhm and mosaic.pixscale else DEFAULT_FWHM_PIXELS)
    always = (FLAG_BITS["no_wcs"] if mosaic.wcs is None else 0) | (FLAG_BITS["ivar_estimated"] if any(b.ivar_hdu is None for b in mosaic.bands) else 0)
    problems = dict(mosaic.flags)
    keywords = {"METHOD": (method, "deblender"), **({"BF16": (bool(bf16), "network under bfloat16 autocast"), "STUDENT": (bool(student), "distilled fast path")} if method == "model" else {}), "BANDS": ",".join(names), "PSFPIX": (float(psf), "PSF FWHM [pixels] of the apertures and flags"),
                "NOWCS": (mosaic.wcs is None, "no celestial WCS: RA/DEC NaN"), "INPUT": Path(path).name[:68]}
    if method == "model":
        ratio, problem = psf_check(finder.head_config, mosaic)
        if ratio is not None:
            keywords["PSFRATIO"] = (round(float(ratio), 4), "mosaic / training PSF FWHM [pixels]")
        if problem:
            warnings.warn(problem, stacklevel=2)
            problems["psf_unlike_training"] = problem
            always |= FLAG_BITS["psf_unlike_training"]
    finish = _Finish(mosaic, names, psf, always, write_stamps)
    for code in problems:
        keywords[INPUT_FLAG_KEYWORDS[code]] = (True, {**FLAG_CODES, **MODEL_INPUT_CODES}[code][:47])
    for name, bit in FLAG_BITS.items():
        keywords[f"FLAGBIT{bit.bit_length() - 1}"] = (name, f"FLAGS bit value {bit}")
    summary = run_tiled(mosaic, finder, output, plan, template=catalogue_template(names, [b.unit for b in mosaic.bands]), id_column="ID",
                        finish=finish, keywords=keywords, stamps=write_stamps, workers=workers, processes=processes, progress=progress,
                        verb="deblend", overwrite=overwrite, inputs=[path])
    return {**summary, "method": method, "bands": names, "flags": problems}


class _Finish:
    """The deblend catalogue's last step in the worker: FLAGS, X/Y, optional stamps."""

    def __init__(self, mosaic, bands: list[str], fwhm_pixels: float, always: int, stamps: bool):
        self.mosaic, self.bands, self.fwhm, self.always, self.stamps = mosaic, bands, fwhm_pixels, always, stamps

    def __call__(self, table: Table, tile, values: np.ndarray, ivar: np.ndarray):
        n = len(table)
        row0, col0 = tile.origin
        y, x = np.asarray(table["ROW"], np.float64), np.asarray(table["COL"], np.float64)
        flags = ((np.asarray(table["FLAGS"], np.int64) & FINDER_BITS) if "FLAGS" in table.colnames else np.zeros(n, np.int64)) | self.always
        r = max(1, int(np.ceil(self.fwhm)))
        bad = ~(ivar > 0).all(axis=0)  # (h, w): masked in some band
        for k in range(n):
            iy, ix = int(round(y[k])) - row0, int(round(x[k])) - col0
            if bad[max(0, iy - r): iy + r + 1, max(0, ix - r): ix + r + 1].any():
                flags[k] |= FLAG_BITS["masked_pixels"]
        h, w = self.mosaic.shape
        flags[(y < self.fwhm - 0.5) | (x < self.fwhm - 0.5) | (y > h - 0.5 - self.fwhm) | (x > w - 0.5 - self.fwhm)] |= FLAG_BITS["edge"]
        for name in self.bands:
            if f"FLUX_{name}" in table.colnames:
                flags[~np.isfinite(np.asarray(table[f"FLUX_{name}"], np.float64))] |= FLAG_BITS["band_empty"]
        table["FLAGS"] = flags
        table["X"], table["Y"] = x, y
        table["X"].unit = table["Y"].unit = "pix"
        stamps = self._stamps(table, tile, values) if self.stamps else None
        del table["ROW"], table["COL"]
        return table, stamps

    def _stamps(self, table: Table, tile, values: np.ndarray) -> list:
        """(data, header) per row: the source's segment box with the other segments zeroed."""
        from cosmofm.finetune.tiling import TILE_ROW

        seg = table.meta.get("segmentation")
        given = table.meta.get("stamps")
        row0, col0 = tile.origin
        out = []
        for k in np.asarray(table[TILE_ROW]):
            if given is not None:
                r, c, data = given[k]
                region = (slice(row0 + r, row0 + r + data.shape[1]), slice(col0 + c, col0 + c + data.shape[2]))
            elif seg is not None:
                rows, cols = np.nonzero(seg == k + 1)
                if rows.size == 0:
                    out.append(None)
                    continue
                r0, r1 = max(0, rows.min() - STAMP_MARGIN), min(seg.shape[0], rows.max() + STAMP_MARGIN + 1)
                c0, c1 = max(0, cols.min() - STAMP_MARGIN), min(seg.shape[1], cols.max() + STAMP_MARGIN + 1)
                box = seg[r0:r1, c0:c1]
                data = np.where(((box == 0) | (box == k + 1))[None], values[:, r0:r1, c0:c1], 0.0).astype(np.float32)
                region = (slice(row0 + r0, row0 + r1), slice(col0 + c0, col0 + c1))
            else:
                out.append(None)
                continue
            header = self.mosaic.tile_header(region)
            for key in ("NAXIS", "NAXIS1", "NAXIS2"):
                header.remove(key, ignore_missing=True)
            header["ROW0"], header["COL0"] = (region[0].start, "full-frame row of the stamp's first pixel"), (region[1].start, "full-frame column")
            out.append((data, header))
        return out


__all__ = ["CLASSICAL_TILE", "ClassicalDeblender", "DEFAULT_FWHM_PIXELS", "MODEL_TILE", "FLAG_BITS", "PSF_TOLERANCE", "band_names", "catalogue_template", "deblend_image", "model_finder", "psf_check"]
