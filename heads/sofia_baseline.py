"""A classical HI source finder after SoFiA-2 (Westmeier et al. 2021, MNRAS 506, 3962;
Serra et al. 2015, MNRAS 448, 1922; reliability: Serra, Jurek & Floeer 2012, PASA 29, 296).

The baseline of issue 21's 3D detection benchmark, numpy/scipy only:

1. Noise normalisation: the cube is divided by a per-channel robust rms,
   1.4826 x median |x| (MAD about zero, as SoFiA's `scaleNoise` with `statistic=mad`),
   measured on a spatial subsample; NaN (flagged) voxels become 0.
2. Smooth + clip (S+C): for each spatial Gaussian (FWHM 0, 3, 6 px) and spectral boxcar
   (0, 3, 7, 15 channels; 0 = no smoothing) the normalised cube is smoothed, and voxels
   with |S| > threshold x rms join the positive or negative mask by the sign of S. The rms
   of each kernel is the cube's (`kernel_noise`: MAD of the smoothed noise-normalised cube
   on blocks spread over it, `noise_blocks`, away from their edges), measured once; a tiled
   run measures it in the parent and hands it to every tile (`kernel_rms`), so the clip
   levels do not depend on the tiling. As in SoFiA, voxels already detected are replaced
   by sign x `replacement` (x rms) before the next smoothing, so bright sources do not
   bleed. Simplified: the replacement is applied once per spatial kernel (not per kernel
   pair). Speed: float32 throughout, separable Gaussians, boxcars as running sums built
   from the previous width (3 -> 7 -> 15 -> 31, two adds each), masks OR-ed in place.
3. Linking: positive and negative masks are linked separately; voxels closer than the
   merge radii (`merge_xy` px, `merge_z` channels; a box, not SoFiA's ellipsoid) join one
   source (mask dilated by half the radius, `scipy.ndimage.label`, labels cut back to the
   mask). Sources smaller than `min_size_xy` / `min_size_z` / `min_voxels` are dropped.
4. Reliability: each source's (log peak, log sum, log mean) of |flux| in noise units; a
   Gaussian kernel density of positive (P) and negative (N) sources with covariance
   `kernel_scale` x the negatives' covariance; R = (P - N) / P. Kept: R >= `reliability`
   and integrated S/N >= `min_snr`, applied after the density estimate (as SoFiA-2); the
   S/N is sum / sqrt(n_vox x beam area in px) (channels independent, pixels correlated
   over a beam; SoFiA's minSNR has no beam term). Simplified: with fewer than
   `min_negatives` negatives the covariance of all sources is used; with none, R = 1.
   `find_sources(candidates=True)` defers the density and the cuts: it returns every
   positive and negative candidate, and `apply_reliability` makes one density over the
   candidates of all tiles of a cube (as SoFiA-2 over the whole cube), then cuts.
5. Parameterisation on the original cube (Jy/beam) inside each source mask (no mask
   dilation): position = centroid weighted by the positive voxels -> RA/Dec/frequency by
   the WCS (FREQ, or VRAD/VOPT/... turned into FREQ by wcslib with RESTFRQ);
   line_flux_integral = sum of the mask x channel width [Hz] / beam area [px]; w20 = width
   at 20 % of the peak of the mask's integrated spectrum (outermost crossings, linear
   interpolation), as an observed-frame velocity c dnu nu_rest / nu^2 (SDC2's "observed line
   width", the survey mocks' truth and the scorer's convention: `cube_survey.w20_from_width_hz`;
   no instrumental-broadening correction); hi_size = `size_per_sigma` x the beam-deconvolved
   major-axis sigma of the moment-0 map (positive voxels, second moments, arcsec);
   inclination: cos i = b / a of the deconvolved axes (thin disk, no q0); PA: major axis
   east of north, turned by 180 deg when its + half has the higher mean frequency, so it
   points to the receding (redshifted) half, in [0, 360) like the SDC2 truth.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS
from scipy import ndimage

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cube_survey import w20_from_width_hz
from cosmofm.data_cards.mocks.cubes import HI_REST_HZ

MAD_SCALE = 1.4826
_SIGMA_PER_FWHM = 1.0 / math.sqrt(8 * math.log(2))


@dataclass
class SofiaConfig:
    """Knobs of the finder. SoFiA-2's defaults where we follow them (kernels, replacement,
    reliability threshold, kernel scale); clip, merge and size limits chosen for a 2.5 px
    beam (7 arcsec at 2.8 arcsec pixels, the ska-hi-like card)."""

    spatial_fwhm: tuple = (0.0, 3.0, 6.0)  # Gaussian kernels [pixels FWHM]; 0 = none
    spectral_width: tuple = (0, 3, 7, 15)  # boxcar kernels [channels]; 0 = none
    threshold: float = 4.0  # S+C clip [rms of each smoothed cube]
    replacement: float = 2.0  # detected voxels set to +-replacement rms before smoothing
    merge_xy: int = 2  # linker merge radius [pixels]
    merge_z: int = 2  # [channels]
    min_size_xy: int = 3  # [pixels]
    min_size_z: int = 3  # [channels]
    min_voxels: int = 8
    reliability: float = 0.9  # keep sources with R >= this
    min_snr: float = 4.0  # integrated S/N cut after the reliability (beam-corrected)
    kernel_scale: float = 0.4  # KDE covariance = kernel_scale x cov(negatives) (SoFiA's scaleKernel)
    min_negatives: int = 10
    size_per_sigma: float = 2.8  # hi_size / deconvolved major-axis sigma (mock calibration: 2.6-4.0, median 2.8)
    noise_step: int = 4  # spatial subsampling for the rms measurements


# Tuned on training survey cubes by SDC2 score (scripts/bench/sofia_tuning.py,
# `python -m cosmofm.bench.sofia_tuning --out docs/bench`, 2026-12-05; values and held-out
# scores in docs/bench/sofia_tuning.json). `cosmofm detect --method sofia` uses it;
# `--sofia-defaults` gives SofiaConfig() (SoFiA-2's defaults where we follow them).
# Held out (2 cubes, 767 truth sources): score 4.33 (9 matched, 2 false) vs 2.50 (3, 0) at the
# defaults; most truth sources (log M_HI >= 8) lie below any detection limit.
SOFIA_TUNED = SofiaConfig(spectral_width=(0, 3, 7, 15, 31), threshold=4.5, merge_xy=6, merge_z=6, min_size_z=5, reliability=0.5, min_snr=2.5)

def _robust_rms(x: np.ndarray, axis=None) -> np.ndarray:
    return MAD_SCALE * np.median(np.abs(x), axis=axis)


def _frequency_wcs(header) -> tuple[WCS, float]:
    """(3-D WCS with a FREQ spectral axis, beam area [pixels]) from a Header (or a WCS)."""
    if isinstance(header, WCS):
        raise InputError("header", "a bare WCS has no beam (BMAJ/BMIN)", "pass the FITS header (fits.Header) of the cube")
    if not isinstance(header, fits.Header):
        raise InputError("header", f"is a {type(header).__name__}", "pass the cube's astropy.io.fits.Header")
    w = WCS(header)
    if w.naxis < 3 or w.wcs.spec < 0:
        raise InputError("header", "has no spectral WCS axis", "give a cube header with CTYPE3 = FREQ (or VRAD/VOPT with RESTFRQ)")
    if w.naxis > 3:
        w = w.sub(3)
    if not w.wcs.ctype[w.wcs.spec].startswith("FREQ"):
        try:
            w.wcs.sptr("FREQ-???")
        except Exception as err:  # wcslib's message says what is missing (usually RESTFRQ)
            raise InputError("header.CTYPE3", f"cannot convert {w.wcs.ctype[w.wcs.spec]} to frequency: {err}", "give RESTFRQ with a velocity axis") from None
    w.wcs.set()
    if not all(k in header for k in ("BMAJ", "BMIN")):
        raise InputError("header", "has no BMAJ/BMIN", "give the beam FWHM in degrees as BMAJ/BMIN")
    scale = np.abs(np.linalg.det(w.celestial.pixel_scale_matrix))  # deg^2 per pixel
    beam_area = math.pi / (4 * math.log(2)) * header["BMAJ"] * header["BMIN"] / scale
    return w, float(beam_area)


def _smooth_spatial(cube: np.ndarray, fwhm: float) -> np.ndarray:
    """Separable Gaussian of `fwhm` pixels over (H, W); 0 = none (the input itself)."""
    if fwhm <= 0:
        return cube
    s = fwhm * _SIGMA_PER_FWHM
    out = ndimage.gaussian_filter1d(cube, s, axis=1, mode="constant", truncate=3.0)
    return ndimage.gaussian_filter1d(out, s, axis=2, mode="constant", truncate=3.0, output=out)


def _boxcars(spatial: np.ndarray, widths) -> "list[tuple[int, np.ndarray]]":
    """(width, boxcar *sum* over `width` channels) for each width, zero-padded like
    `uniform_filter1d(mode="constant")` x width (the clip is relative to each smoothed
    cube's rms, so the 1 / width scale does not matter). A width 2m+1 following a width m
    (SoFiA's 3, 7, 15, 31) is built from it with two adds: S_2m+1[k] = S_m[k-(m+1)/2] + x[k]
    + S_m[k+(m+1)/2] (left part k-m..k-1, right part k+1..k+m), a few times faster than
    scipy's line-by-line filter along the strided channel axis; other widths go through scipy."""
    out = []
    prev_w, prev = 1, spatial
    for width in widths:
        width = int(width)
        if width <= 1:
            out.append((width, spatial))
            continue
        if width == 2 * prev_w + 1 and prev_w % 2 == 1:
            h = (prev_w + 1) // 2
            sm = spatial.copy()
            sm[h:] += prev[:-h]  # S_m centred h channels earlier
            sm[:-h] += prev[h:]  # ... and h channels later
            n = len(sm)
            acc = np.zeros(sm.shape[1:], sm.dtype)  # S_m centred off the cube: its part inside
            for k in range(1, min(h, n)):
                acc += spatial[k - 1]
                sm[k] += acc
            acc[:] = 0
            for k in range(n - 1, max(n - h, 0) - 1, -1):
                sm[k] += acc
                acc += spatial[k]
        else:
            sm = ndimage.uniform_filter1d(spatial, width, axis=0, mode="constant")
            sm *= np.float32(width)
        out.append((width, sm))
        prev_w, prev = width, sm
    return out


def noise_blocks(shape, cfg: SofiaConfig, max_voxels: int = 2**23) -> list[tuple[slice, slice, slice]]:
    """Regions of a (F, H, W) cube on which `kernel_noise` measures each kernel's rms: the
    whole cube when it is small, else one block at the centre of each cell of a 2 x 3 x 3
    grid (channels, rows, columns), so a primary-beam noise pattern is sampled across the
    field, sized to ~`max_voxels` in all. The parent of a tiled run and `find_sources` on a
    whole cube use the same regions."""
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) <= max_voxels:
        return [tuple(slice(0, n) for n in shape)]
    pad = (max(int(w) for w in cfg.spectral_width) + 1, 2 * int(math.ceil(3 * max(cfg.spatial_fwhm) * _SIGMA_PER_FWHM)) + 2)
    side = (max_voxels / 18) ** (1 / 3)
    size = [min(n // g, max(int(side), 2 * p + 8)) for n, g, p in zip(shape, (2, 3, 3), (pad[0], pad[1], pad[1]))]
    out = []
    for cells in np.ndindex(2, 3, 3):
        region = []
        for n, g, c, s in zip(shape, (2, 3, 3), cells, size):
            lo = int((c + 0.5) * n / g - s / 2)
            region.append(slice(max(lo, 0), min(max(lo, 0) + s, n)))
        out.append(tuple(region))
    return out


def kernel_noise(blocks, cfg: SofiaConfig) -> np.ndarray:
    """Robust rms (MAD) of the noise-normalised cube under each smoothing kernel,
    (len(spatial_fwhm), len(spectral_width)), in the units `smooth_and_clip` compares with.

    blocks: iterable of (norm, valid) — noise-normalised (F, H, W) pieces (blank voxels 0)
    and their non-blank mask or None. Each piece is smoothed whole and measured away from
    its edges (the kernel's reach), on a spatial subsample (`noise_step`), all pieces
    pooled. As SoFiA-2 the rms is the cube's, not the tile's: a tiled run measures it once
    in the parent (`finetune.detect`) and hands it to every tile, so a source's clip levels
    do not depend on the tiling. Measured without replacement (the MAD ignores the few
    source voxels replacement would change)."""
    st = cfg.noise_step
    nz = max(int(w) for w in cfg.spectral_width) // 2 + 1
    pooled = {k: [] for k in range(len(cfg.spatial_fwhm) * len(cfg.spectral_width))}
    for norm, valid in blocks:
        k = 0
        for fwhm in cfg.spatial_fwhm:
            nxy = int(math.ceil(3 * fwhm * _SIGMA_PER_FWHM)) + 1 if fwhm > 0 else 0
            interior = tuple(slice(m, n - m) if n > 2 * m + 2 else slice(0, n) for n, m in zip(norm.shape, (nz, nxy, nxy)))
            interior = (interior[0], slice(interior[1].start, interior[1].stop, st), slice(interior[2].start, interior[2].stop, st))
            ok = valid[interior] if valid is not None else None
            for _, sm in _boxcars(_smooth_spatial(norm, fwhm), cfg.spectral_width):
                sample = np.abs(sm[interior])
                pooled[k].append(sample[ok] if ok is not None else sample.ravel())
                k += 1
    rms = np.array([float(MAD_SCALE * np.median(np.concatenate(v))) if v and sum(map(len, v)) else 1.0 for v in pooled.values()])
    return np.where(rms > 0, rms, 1.0).reshape(len(cfg.spatial_fwhm), len(cfg.spectral_width))


def smooth_and_clip(norm: np.ndarray, cfg: SofiaConfig, valid: np.ndarray | None = None, kernel_rms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative S+C masks (bool, (F, H, W)) of a noise-normalised cube.
    `valid` (bool, (F, H, W)) or None: voxels that are not blank; blank ones (zeros in
    `norm`) are left out of each rms and of the masks, as SoFiA-2 ignores blanked voxels
    (their zeros would shrink the MAD and lower every clip level). `kernel_rms`: each
    kernel's rms (`kernel_noise`), None to measure it on `norm` (`noise_blocks`)."""
    if kernel_rms is None:
        kernel_rms = kernel_noise(((norm[r], valid[r] if valid is not None else None) for r in noise_blocks(norm.shape, cfg)), cfg)
    kernel_rms = np.asarray(kernel_rms, dtype=np.float64).reshape(len(cfg.spatial_fwhm), len(cfg.spectral_width))
    pos = np.zeros(norm.shape, bool)
    neg = np.zeros(norm.shape, bool)
    for i, fwhm in enumerate(cfg.spatial_fwhm):
        base = norm
        if pos.any() or neg.any():  # replace what is already found (SoFiA's scfind.replacement)
            base = norm.copy()
            base[pos] = np.float32(cfg.replacement)
            base[neg] = np.float32(-cfg.replacement)
        spatial = _smooth_spatial(base, fwhm)  # once per spatial kernel, then each boxcar
        for j, (width, sm) in enumerate(_boxcars(spatial, cfg.spectral_width)):
            if fwhm <= 0 and width <= 1:
                sm = norm  # the unsmoothed cube, without replacement
            cut = np.float32(cfg.threshold * kernel_rms[i, j])
            np.logical_or(pos, sm > cut, out=pos)
            np.logical_or(neg, sm < -cut, out=neg)
        del spatial
    if valid is not None:
        pos &= valid
        neg &= valid
    return pos, neg


def _grow(mask: np.ndarray, radii) -> np.ndarray:
    """Binary dilation by a box of half-sizes `radii` (per axis): shifted ORs, separable
    (the same as `ndimage.maximum_filter` with that box, a few times faster on bool)."""
    out = mask
    for axis, r in enumerate(radii):
        if r <= 0:
            continue
        src = out
        out = src.copy()
        for s in range(1, r + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(s, None), slice(None, -s)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _link(mask: np.ndarray, cfg: SofiaConfig) -> tuple[np.ndarray, int]:
    hz, hxy = cfg.merge_z // 2, cfg.merge_xy // 2
    grown = _grow(mask, (hz, hxy, hxy))
    labels, n = ndimage.label(grown)
    labels[~mask] = 0
    return labels, n


def _source_stats(labels: np.ndarray, n: int, norm: np.ndarray, sign: float, cfg: SofiaConfig, beam_area: float) -> dict:
    """Per-label voxel count, peak / sum / mean of sign x flux [noise units], extents, slices."""
    objs = ndimage.find_objects(labels)
    idx = np.nonzero(labels)
    lab = labels[idx]
    vals = sign * norm[idx].astype(np.float64)
    nvox = np.bincount(lab, minlength=n + 1)[1:]
    tot = np.bincount(lab, weights=vals, minlength=n + 1)[1:]
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, lab, vals)
    ext = np.array([[s[0].stop - s[0].start, max(s[1].stop - s[1].start, s[2].stop - s[2].start)] if s else [0, 0] for s in objs]).reshape(-1, 2)
    keep = (nvox >= cfg.min_voxels) & (ext[:, 0] >= cfg.min_size_z) & (ext[:, 1] >= cfg.min_size_xy) & (tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = tot / np.sqrt(np.maximum(nvox, 1) * max(beam_area, 1.0))  # noise correlated over a beam
    k = np.nonzero(keep)[0]
    return {"label": k + 1, "nvox": nvox[k], "sum": tot[k], "peak": peak[1:][k], "mean": tot[k] / nvox[k], "snr": snr[k], "slices": [objs[j] for j in k]}


def reliability(pos: dict, neg: dict, cfg: SofiaConfig) -> np.ndarray:
    """R = (P - N) / P at each positive source (Serra et al. 2012, as SoFiA-2)."""
    def params(d):
        return np.column_stack([np.log10(d["peak"]), np.log10(d["sum"]), np.log10(d["mean"])]) if len(d["sum"]) else np.zeros((0, 3))

    xp, xn = params(pos), params(neg)
    if not len(xp):
        return np.zeros(0)
    if not len(xn):
        return np.ones(len(xp))
    ref = xn if len(xn) >= cfg.min_negatives else np.vstack([xp, xn])
    cov = np.cov(ref.T) * cfg.kernel_scale + np.eye(3) * 1e-6
    icov = np.linalg.inv(cov)

    def density(x, pts):
        out = np.zeros(len(x))
        for a in range(0, len(x), 1024):  # (1024, M, 3) at a time
            d = x[a : a + 1024, None, :] - pts[None]
            out[a : a + 1024] = np.exp(-0.5 * np.einsum("ijk,kl,ijl->ij", d, icov, d)).sum(axis=1)
        return out

    p, q = density(xp, xp), density(xp, xn)
    return np.clip((p - q) / p, 0.0, 1.0)


def _w20_channels(spec: np.ndarray) -> float:
    """Width [channels] at 20 % of the peak: outermost crossings, linear interpolation."""
    thresh = 0.2 * spec.max()
    above = np.nonzero(spec >= thresh)[0]
    lo, hi = above[0], above[-1]
    left = lo - (spec[lo] - thresh) / (spec[lo] - spec[lo - 1]) if lo > 0 else lo - 0.5
    right = hi + (spec[hi] - thresh) / (spec[hi] - spec[hi + 1]) if hi < len(spec) - 1 else hi + 0.5
    return float(right - left)


def _parameterise(cube, labels, src: dict, w: WCS, beam_area: float, beam_sigma_arcsec: float, cfg: SofiaConfig) -> dict:
    """SDC2 columns of each source from the masked original cube."""
    cols = {k: [] for k in ("x", "y", "z", "flux_sum", "w20_ch", "sig_maj", "sig_min", "theta", "flip")}
    j = w.celestial.pixel_scale_matrix * 3600.0  # arcsec per pixel, (east, north) from (x, y)
    for lab, sl in zip(src["label"], src["slices"]):
        sub = np.where(labels[sl] == lab, cube[sl], 0.0).astype(np.float64)  # (f, h, w)
        wpos = np.clip(sub, 0, None)
        tot = wpos.sum()
        zz, yy, xx = np.indices(sub.shape)
        cz, cy, cx = (wpos * zz).sum() / tot, (wpos * yy).sum() / tot, (wpos * xx).sum() / tot
        mom0 = wpos.sum(axis=0)
        yg, xg = np.indices(mom0.shape)
        en = np.tensordot(j, np.stack([xg - cx, yg - cy]), axes=1)  # (2, h, w) east, north [arcsec]
        m = mom0 / mom0.sum()
        cov = np.array([[np.sum(m * en[a] * en[b]) for b in range(2)] for a in range(2)])
        evals, evecs = np.linalg.eigh(cov)
        major = evecs[:, 1]  # (east, north)
        theta = math.degrees(math.atan2(major[0], major[1])) % 360.0  # PA of the + half
        # receding half: lower frequency; compare flux-weighted channel on the two sides
        side = np.tensordot(major, en, axes=1)  # (h, w) offset along the major axis
        spec_side = wpos * (side > 0)[None]
        spec_other = wpos * (side < 0)[None]
        zp = (spec_side * zz).sum() / max(spec_side.sum(), 1e-30)
        zm = (spec_other * zz).sum() / max(spec_other.sum(), 1e-30)
        fz = w.all_pix2world(cx + sl[2].start, cy + sl[1].start, np.array([0.0, 1.0]), 0)[2]
        up = fz[1] > fz[0]  # frequency grows with channel
        cols["flip"].append((zp > zm) == up)  # + side at higher frequency -> approaching
        cols["x"].append(cx + sl[2].start)
        cols["y"].append(cy + sl[1].start)
        cols["z"].append(cz + sl[0].start)
        cols["flux_sum"].append(sub.sum())
        cols["w20_ch"].append(_w20_channels(sub.sum(axis=(1, 2))))
        cols["sig_maj"].append(math.sqrt(max(evals[1], 0.0)))
        cols["sig_min"].append(math.sqrt(max(evals[0], 0.0)))
        cols["theta"].append(theta)
    c = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    ra, dec, freq = w.all_pix2world(c["x"], c["y"], c["z"], 0)
    f_lo = w.all_pix2world(c["x"], c["y"], c["z"] - 0.5, 0)[2]
    f_hi = w.all_pix2world(c["x"], c["y"], c["z"] + 0.5, 0)[2]
    dnu = np.abs(f_hi - f_lo)  # channel width [Hz]
    floor = 0.1 * beam_sigma_arcsec
    a = np.sqrt(np.maximum(c["sig_maj"] ** 2 - beam_sigma_arcsec**2, floor**2))
    b = np.sqrt(np.maximum(c["sig_min"] ** 2 - beam_sigma_arcsec**2, floor**2))
    return {
        "ra": np.asarray(ra) % 360.0, "dec": np.asarray(dec), "central_freq": np.asarray(freq),
        "line_flux_integral": c["flux_sum"] * dnu / beam_area,
        "hi_size": cfg.size_per_sigma * a,
        "w20": w20_from_width_hz(c["w20_ch"] * dnu, np.asarray(freq), w.wcs.restfrq or HI_REST_HZ),
        "pa": (c["theta"] + 180.0 * c["flip"]) % 360.0,
        "i": np.degrees(np.arccos(np.clip(b / a, 0.0, 1.0))),
        "x": c["x"], "y": c["y"], "z": c["z"],
    }


SDC2_UNITS = {"ra": u.deg, "dec": u.deg, "hi_size": u.arcsec, "line_flux_integral": u.Jy * u.Hz, "central_freq": u.Hz, "pa": u.deg, "i": u.deg, "w20": u.km / u.s}


def find_sources(cube, header, config: SofiaConfig | None = None, noise=None, *, kernel_rms=None, candidates: bool = False) -> Table:
    """Run the SoFiA-style finder on a (F, H, W) cube in Jy/beam with its FITS header.

    `noise`: the (F,) rms per channel [Jy/beam] to normalise by, e.g. measured once over a
    whole cube that is searched tile by tile (SoFiA-2's default noise scaling is per
    channel over the whole cube); None measures it on `cube` (step 1 of the docstring).
    `kernel_rms`: each smoothing kernel's clip rms, (len(spatial_fwhm),
    len(spectral_width)) from `kernel_noise`, likewise the whole cube's in a tiled run;
    None measures it on `cube` (`noise_blocks`).
    `candidates`: skip the reliability cut and return every candidate instead: positives
    with integrated S/N >= min_snr measured, plus rows for the other positives and the
    negatives (bounding-box centre, NaN properties) with `CANDIDATE_COLUMNS` (sign,
    rel_peak, rel_sum, rel_mean), for `apply_reliability` over all tiles at once.

    Returns an astropy Table with the SDC2 columns (id, ra, dec, hi_size,
    line_flux_integral, central_freq, pa, i, w20) in units, plus x, y, z (0-based
    pixels), CHAN, ROW, COL (the same centroid in array order: z, y, x, as the tile-finder
    contract of `finetune.tiling` names them), n_vox, snr and reliability;
    `meta["timing_s"]` holds the stage times. An empty table is a valid answer.
    """
    cfg = config or SofiaConfig()
    data = np.asarray(cube)
    if data.ndim != 3:
        raise InputError("cube", f"must be 3-D (F, H, W), got shape {data.shape}", "pass one spectral cube")
    w, beam_area = _frequency_wcs(header)
    if tuple(header.get(f"NAXIS{k}", n) for k, n in ((3, data.shape[0]), (2, data.shape[1]), (1, data.shape[2]))) != data.shape:
        raise InputError("header", f"NAXIS3, NAXIS2, NAXIS1 do not match the cube shape {data.shape}", "pass the header of this cube")
    beam_sigma = math.sqrt(header["BMAJ"] * header["BMIN"]) * 3600.0 * _SIGMA_PER_FWHM
    times = {}
    t0 = time.perf_counter()
    data = data.astype(np.float32, copy=False)
    valid = np.isfinite(data)
    valid = None if valid.all() else valid  # blanked (NaN) voxels: left out of the noise and the masks
    if noise is None:
        sample = data[:, :: cfg.noise_step, :: cfg.noise_step].reshape(data.shape[0], -1)
        if valid is None:
            rms = _robust_rms(sample, axis=1)  # (F,)
        else:
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-blank channel: NaN, then 0 below
                rms = MAD_SCALE * np.nanmedian(np.abs(np.where(np.isfinite(sample), sample, np.nan)), axis=1)
            rms = np.where(np.isfinite(rms), rms, 0.0)
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if noise is not None:
        rms = np.asarray(noise, dtype=np.float64).reshape(-1)
        if rms.shape != (data.shape[0],):
            raise InputError("noise", f"has {rms.size} values for {data.shape[0]} channels", "give one rms per channel")
        rms = np.where(np.isfinite(rms), rms, 0.0)
    inv = np.where(rms > 0, 1.0 / np.where(rms > 0, rms, 1.0), 0.0).astype(np.float32)
    norm = data * inv[:, None, None]
    times["noise"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pmask, nmask = smooth_and_clip(norm, cfg, valid, kernel_rms)
    del valid
    times["smooth_clip"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plab, npos = _link(pmask, cfg)
    del pmask
    nlab, nneg = _link(nmask, cfg)
    del nmask
    pos = _source_stats(plab, npos, norm, 1.0, cfg, beam_area)
    neg = _source_stats(nlab, nneg, norm, -1.0, cfg, beam_area)
    del nlab
    times["link"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if candidates:
        rel = np.full(len(pos["sum"]), np.nan)  # the caller's, over every tile's candidates (`apply_reliability`)
        keep = np.nonzero(pos["snr"] >= cfg.min_snr)[0]
    else:
        rel = reliability(pos, neg, cfg)
        keep = np.nonzero((rel >= cfg.reliability) & (pos["snr"] >= cfg.min_snr))[0]
    src = {k: ([v[i] for i in keep] if k == "slices" else v[keep]) for k, v in pos.items()}
    times["reliability"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cols = _parameterise(data, plab, src, w, beam_area, beam_sigma, cfg) if len(keep) else {k: np.zeros(0) for k in (*SDC2_UNITS, "x", "y", "z")}
    times["parameterise"] = time.perf_counter() - t0
    out = _table(cols, src, rel[keep])
    if candidates:
        out["sign"] = np.ones(len(out), np.int64)
        for name in ("peak", "sum", "mean"):
            out[f"rel_{name}"] = src[name]
        rest = np.setdiff1d(np.arange(len(pos["sum"])), keep)
        others = [_stub(pos, rest, 1, w), _stub(neg, np.arange(len(neg["sum"])), -1, w)]
        out = vstack([out, *others], metadata_conflicts="silent") if any(len(o) for o in others) else out
        out["id"] = np.arange(len(out), dtype=np.int64)
    out.meta.update({"n_positive": len(pos["sum"]), "n_negative": len(neg["sum"]), "timing_s": times})
    return out


def _table(cols: dict, src: dict, rel: np.ndarray) -> Table:
    out = Table()
    out["id"] = np.arange(len(rel), dtype=np.int64)
    for name, unit in SDC2_UNITS.items():
        out[name] = u.Quantity(cols[name], unit)
    for name in ("x", "y", "z"):
        out[name] = cols[name]
    # the tile-finder contract's centroid columns (finetune/tiling.py): 0-based, array order
    out["CHAN"], out["ROW"], out["COL"] = cols["z"], cols["y"], cols["x"]
    out["n_vox"] = src["nvox"].astype(np.int64)
    out["snr"] = src["snr"]
    out["reliability"] = rel
    return out


def _stub(stats: dict, idx: np.ndarray, sign: int, w: WCS) -> Table:
    """Candidate rows that only feed the reliability density (negatives, and positives
    below min_snr): centre of the bounding box, no properties."""
    n = len(idx)
    centre = np.array([[(s.start + s.stop - 1) / 2 for s in stats["slices"][i]] for i in idx]).reshape(n, 3)
    nan = np.full(n, np.nan)
    cols = {k: nan for k in SDC2_UNITS}
    cols["x"], cols["y"], cols["z"] = centre[:, 2], centre[:, 1], centre[:, 0]
    out = _table(cols, {"nvox": stats["nvox"][idx], "snr": stats["snr"][idx]}, nan)
    out["sign"] = np.full(n, sign, np.int64)
    for name in ("peak", "sum", "mean"):
        out[f"rel_{name}"] = stats[name][idx]
    return out


CANDIDATE_COLUMNS = ("sign", "rel_peak", "rel_sum", "rel_mean")


def apply_reliability(candidates: Table, config: SofiaConfig | None = None) -> Table:
    """The catalogue from `find_sources(..., candidates=True)` rows (of one cube, or of all
    its tiles stacked): one reliability density over all positive and negative candidates
    (step 4), then the R and min_snr cuts; the helper columns dropped, ids renumbered.
    Tiled, this makes the reliability the whole cube's, as SoFiA-2's, not the tile's."""
    cfg = config or SofiaConfig()
    missing = [c for c in (*CANDIDATE_COLUMNS, "snr") if c not in candidates.colnames]
    if missing:
        raise InputError("candidates", f"has no column(s) {missing}", "pass find_sources(..., candidates=True) output")
    sign = np.asarray(candidates["sign"])

    def stats(rows):
        return {k: np.asarray(candidates[f"rel_{k}"], np.float64)[rows] for k in ("peak", "sum", "mean")}

    ipos, ineg = np.nonzero(sign > 0)[0], np.nonzero(sign < 0)[0]
    rel = reliability(stats(ipos), stats(ineg), cfg)
    snr = np.asarray(candidates["snr"], np.float64)[ipos]
    measured = np.isfinite(np.asarray(candidates["ra"], np.float64)[ipos])
    keep = (rel >= cfg.reliability) & (snr >= cfg.min_snr) & measured
    out = candidates[ipos[keep]]
    out["reliability"] = rel[keep]
    out.remove_columns(list(CANDIDATE_COLUMNS))
    if "id" in out.colnames:
        out["id"] = np.arange(len(out), dtype=np.int64)
    return out


__all__ = ["CANDIDATE_COLUMNS", "SOFIA_TUNED", "SofiaConfig", "apply_reliability", "find_sources", "kernel_noise", "noise_blocks", "reliability", "smooth_and_clip"]
