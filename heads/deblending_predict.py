"""Inference with a deblending head: stamps in, `DeblendCatalog`s and tile catalogues out.

`deblend_samples` runs a `CosmoFMForDeblending` over Samples in batches (detection, or the
known-positions mode), `deblend_stamp` over one bare (B, H, W) stamp, and `sources_in_tile`
is `DeblendingTask.find_in_tile`, the tile finder `cosmofm deblend` calls on each tile of a
mosaic (`finetune/deblend.py`): its catalogue rows with per-band fluxes, errors and FLAGS.
The model and its training live in `heads/deblending.py`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample
from cosmofm.heads import deblending_metrics as dm
from cosmofm.heads.deblend_baseline import DeblendCatalog
from cosmofm.heads.deblending import CosmoFMForDeblending, DeblendingHeadConfig, DeblendingTask, _numpy

FLAG_EDGE, FLAG_MASKED, FLAG_BLENDED = 1, 2, 4  # FLAGS bits


def sources_in_tile(model: CosmoFMForDeblending, values: np.ndarray, ivar: np.ndarray, header, *, bf16: bool = False,
                    student: bool = False):
    """The shared tile-finder contract (`DeblendingTask.find_in_tile`): float32 (B, H, W)
    values / ivar and the tile's FITS header (PIXSCALE, BAND{k}, BUNIT; PSFFWHM{k} / PSFFWHM
    for a `psf_conditioning` head) -> an astropy Table, one row per source: ROW, COL (0-based
    pixels in the tile), FLUX_<band>, FLUXERR_<band> (the header's BUNIT, else the head's
    unit), FLAGS (1 near the edge, 2 masked pixels in its segment, 4 blended). `bf16`: the
    network under bfloat16 autocast (`deblend_samples`); `student`: the head's fast path."""
    from astropy import units as u
    from astropy.table import Table

    head = model.head_config
    values = np.asarray(values, np.float32)
    ivar = np.asarray(ivar, np.float32) if ivar is not None else np.ones_like(values)
    if values.ndim != 3 or ivar.shape != values.shape:
        raise InputError("tile", f"values {values.shape} / ivar {ivar.shape}", "give (B, H, W) values and ivar of one shape")
    b = len(values)
    bands = [str(header.get(f"BAND{k}", "")) for k in range(b)] if header is not None else []
    bands = bands if all(bands) and len(bands) == b else (head.bands if len(head.bands) == b else [str(k) for k in range(b)])
    unit = u.Unit(str(header.get("BUNIT", head.flux_unit))) if header is not None else u.Unit(head.flux_unit)
    scale = float(header.get("PIXSCALE", head.pixel_scale)) if header is not None else head.pixel_scale
    psf = tile_psf_fwhm(header, b)
    good = np.isfinite(values) & np.isfinite(ivar) & (ivar > 0)
    cols = {"ROW": u.pix, "COL": u.pix, **{f"{p}_{band}": unit for band in bands for p in ("FLUX", "FLUXERR")}}
    if not good.any():
        t = Table({k: np.zeros(0) * v for k, v in cols.items()})
        t["FLAGS"] = np.zeros(0, np.int32)
        return t
    cat = deblend_stamp(model, np.where(good, values, 0), np.where(good, ivar, 0), pixel_scale=scale, bf16=bf16, psf_fwhm_arcsec=psf,
                       student=student)
    t = Table()
    t["ROW"], t["COL"] = cat.positions[:, 0] * u.pix, cat.positions[:, 1] * u.pix
    for k, band in enumerate(bands):
        t[f"FLUX_{band}"] = cat.fluxes["head"][:, k] * unit
        t[f"FLUXERR_{band}"] = cat.flux_errors["head"][:, k] * unit
    t["FLAGS"] = source_flags(cat, good, head.fwhm_pixels)
    t.meta["segmentation"] = cat.segmentation  # tile-frame labels (row k = k + 1): --write-stamps cuts each source's box from it
    return t


def source_flags(cat: DeblendCatalog, good: np.ndarray, fwhm_pixels: float, edge: float = 2.0) -> np.ndarray:
    """(K,) FLAGS: FLAG_EDGE (centre within `edge` pixels of the border), FLAG_MASKED (a masked
    pixel in its segment), FLAG_BLENDED (another source within 2 PSF FWHM)."""
    k = len(cat)
    flags = np.zeros(k, np.int32)
    if not k:
        return flags
    h, w = cat.segmentation.shape
    r, c = cat.positions[:, 0], cat.positions[:, 1]
    flags |= np.where((r < edge) | (c < edge) | (r > h - 1 - edge) | (c > w - 1 - edge), FLAG_EDGE, 0).astype(np.int32)
    bad = ~good.all(0)
    for i in range(k):
        if np.any(bad & (cat.segmentation == i + 1)):
            flags[i] |= FLAG_MASKED
    flags |= np.where(dm.nearest_neighbour_distance(cat.positions) < dm.BLENDED_FWHM * fwhm_pixels, FLAG_BLENDED, 0).astype(np.int32)
    return flags


def tile_psf_fwhm(header, n_bands: int) -> list[float] | None:
    """Each band's PSF FWHM [arcsec] from a tile header: PSFFWHM{k} per band (0-based, as
    `Mosaic.tile_header` writes them), else PSFFWHM for all; None when it gives none."""
    if header is None:
        return None
    if all(f"PSFFWHM{k}" in header for k in range(n_bands)):
        return [float(header[f"PSFFWHM{k}"]) for k in range(n_bands)]
    return [float(header["PSFFWHM"])] * n_bands if header.get("PSFFWHM") else None


def stamp_sample(head: DeblendingHeadConfig, values: np.ndarray, ivar: np.ndarray, pixel_scale: float | None = None,
                 psf_fwhm_arcsec: Sequence[float] | None = None) -> Sample:
    """A Sample of bare (B, H, W) arrays on the head's bands (offsets from the stamp centre);
    `psf_fwhm_arcsec`, each band's PSF FWHM when known, goes to its meta (`psf_fwhm_pixels`)."""
    values, ivar = np.asarray(values, np.float32), np.asarray(ivar, np.float32)
    if values.ndim != 3 or ivar.shape != values.shape:
        raise InputError("values / ivar", f"have shapes {values.shape} / {ivar.shape}", "give (B, H, W) arrays of one shape")
    if len(head.band_wavelengths) != len(values):
        raise InputError("values", f"has {len(values)} bands, the head {len(head.band_wavelengths)}", "give the bands the head was trained on")
    p = float(pixel_scale or head.pixel_scale)
    _, h, w = values.shape
    coords = {"band_wavelength": np.asarray(head.band_wavelengths, float),
              "dec_offset": (np.arange(h) - (h - 1) / 2) * p, "ra_offset": (np.arange(w) - (w - 1) / 2) * p}
    meta = {"card": head.card, "id": "stamp"}
    if psf_fwhm_arcsec is not None:
        meta["psf_fwhm_arcsec"] = [float(x) for x in psf_fwhm_arcsec]
    return Sample("image", values, ivar, coords, meta)


def padded_positions(positions: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, K, 2) float32 [row, col] centres of N samples' (K_i, 2) arrays, NaN-padded to the
    most (at least 1): the `positions` argument of `CosmoFMForDeblending.forward`."""
    points = [np.reshape(np.asarray(p, np.float32), (-1, 2)) for p in positions]
    out = torch.full((len(points), max([1, *(len(p) for p in points)]), 2), float("nan"))
    for j, p in enumerate(points):
        out[j, : len(p)] = torch.from_numpy(p)
    return out


@torch.no_grad()
def deblend_samples(model: CosmoFMForDeblending, samples: Sequence[Sample], positions: Sequence[np.ndarray] | None = None,
                    batch_size: int = 64, bf16: bool = False, student: bool = False, channels_last: bool | None = None) -> list[DeblendCatalog]:
    """One `DeblendCatalog` (method "cosmofm", fluxes["head"]) per sample, batched by shape;
    `positions`: per sample a (K, 2) [row, col] array (known-positions mode). `bf16`: the
    backbone and the decoder's convolutions under bfloat16 autocast (~2x faster on CPUs with
    AMX / AVX512-BF16), the flux split in float32 (`CosmoFMForDeblending.forward`). A
    `psf_conditioning` head is told each stamp's PSF (`DeblendingTask.inputs`). `student`: the
    fast path (`heads/deblending_student.py`) in place of the backbone and decoder.
    `channels_last` (default: on a CPU): the model's convolution weights, and so their
    outputs, in channels-last memory (oneDNN's own layout): the same values, the student's
    path 1.05-1.3x faster on CPU (docs/benchmarks.md, deblending, session 24); the model keeps it."""
    from cosmofm.pretrain.data import collate_samples

    model.eval()
    device = next(model.parameters()).device
    if channels_last if channels_last is not None else device.type == "cpu":
        model.to(memory_format=torch.channels_last)  # a layout, not a change of the maths (tested against the default)
    else:
        model.to(memory_format=torch.contiguous_format)
    task = DeblendingTask(model.head_config)
    out: list[DeblendCatalog | None] = [None] * len(samples)
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault(tuple(s.values.shape), []).append(i)
    for idx in by_shape.values():
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            pos = None if positions is None else padded_positions([positions[i] for i in part]).to(device)
            inputs = {k: v.to(device) for k, v in task.inputs([samples[i] for i in part]).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
                o = model(collate_samples([samples[i] for i in part], model.config.survey_names).to(device), positions=pos, student=student, **inputs)
            for j, i in enumerate(part):
                ok = _numpy(o.present[j]) > 0
                names = model.head_config.bands or [str(b) for b in range(samples[i].values.shape[0])]
                where = _numpy(o.positions[j])[ok].astype(np.float64)
                if positions is not None:  # exactly the centres given (float64), in their order
                    given = np.reshape(np.asarray(positions[i], np.float64), (-1, 2))
                    where = given[np.isfinite(given).all(-1)]
                out[i] = DeblendCatalog(where, {"head": _numpy(o.fluxes[j])[ok].astype(np.float64)},
                                        {"head": _numpy(o.flux_errors[j])[ok].astype(np.float64)},
                                        _numpy(o.segmentation[j]).astype(np.int32), "cosmofm", list(names))
    return out


def deblend_stamp(model: CosmoFMForDeblending, values: np.ndarray, ivar: np.ndarray, positions: np.ndarray | None = None,
                  pixel_scale: float | None = None, bf16: bool = False, psf_fwhm_arcsec: Sequence[float] | None = None,
                  student: bool = False) -> DeblendCatalog:
    """Deblend one (B, H, W) stamp: detected sources, or exactly those at `positions` (K, 2)
    [row, col] pixels; fluxes["head"] per band with errors, the segmentation map.
    `psf_fwhm_arcsec`: each band's PSF FWHM, told to a `psf_conditioning` head. `student`:
    the fast path (`deblend_samples`)."""
    sample = stamp_sample(model.head_config, values, ivar, pixel_scale, psf_fwhm_arcsec)
    return deblend_samples(model, [sample], None if positions is None else [np.asarray(positions, float)], bf16=bf16,
                           student=student)[0]


__all__ = [
    "FLAG_BLENDED", "FLAG_EDGE", "FLAG_MASKED", "deblend_samples", "deblend_stamp", "padded_positions", "source_flags",
    "sources_in_tile", "stamp_sample", "tile_psf_fwhm",
]
