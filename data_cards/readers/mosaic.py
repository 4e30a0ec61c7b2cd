"""Large multi-band mosaics and survey cubes, read lazily one region at a time (memory-mapped).

    mosaic = open_mosaic("field.fits")            # headers only; no pixel is read
    values, ivar = mosaic.read((slice(0, 512), slice(0, 512)))   # (B, 512, 512) float32 each
    header = mosaic.tile_header((slice(0, 512), slice(0, 512)))  # WCS shifted to the region
    cube = open_survey_cube("sdc2_like.fits")     # (C, H, W) in Jy/beam, spectral axis checked

What `finetune/tiling.py` tiles: the source of tiles for `cosmofm deblend` and `cosmofm
detect`. Each region is read with `hdu.section` (a seek and a read of its bytes, not a
memory map: see `_LazyFile`), so an image or cube far larger than memory costs one region
at a time. Headers are parsed from a memory-mapped open (`open_fits`); the file is opened
for regions once per process (worker processes forked by the tiler open their own handle:
a file position shared over fork would interleave reads).

The mosaic format (written by `data_cards/mocks/blend_fields.py`): an empty primary HDU
(BANDS = comma-separated band names, CARD); per band an ImageHDU EXTNAME = the band, float
(H, W), a 2-D celestial WCS, BUNIT, FILTER, PIXSCALE [arcsec], WAVELEN [Angstrom], optional
SATURATE; optionally `IVAR_<band>` (same shape) and `MASK_<band>` (non-zero = bad); an
optional TRUTH table (ignored here). Checks, all flagged rather than fatal while one band
is usable (issue 20's bad inputs):

* a band listed in BANDS without its HDU: skipped, `band_missing`;
* a band on another pixel grid than the first usable band (shape, or WCS differing by more
  than 0.01 pixel anywhere on the image): skipped, `band_off_grid`;
* NaN / inf pixels, pixels >= SATURATE, MASK != 0, IVAR <= 0 or not finite: ivar 0;
* no IVAR_<band>: a constant ivar from the band's robust sky noise (sigma-clipped MAD of
  a strided subsample of at most ~1e6 pixels), `ivar_estimated`;
* every band's global sky level (`sky_level`, from the same sample) goes to the tile
  headers as SKY<k>: finders subtract one level for the whole mosaic, not one per tile;
* no celestial WCS: a pixel-only catalogue (RA/DEC NaN), `no_wcs`, and a warning;
* no usable band at all: InputError.

Survey cubes: `open_survey_cube` parses the header with `readers.cubes.cube_info` (the
one place that knows FREQ / VRAD / VOPT axes, RESTFRQ, STOKES and BUNIT), so a cube
without a spectral axis is the same InputError as everywhere; a velocity axis keeps its
type in the tile header, with RESTFRQ (the card's when the file has none, noted), and the
tile finder's channels become frequencies through wcslib (`spectral_wcs`). The noise per
channel is measured once over the whole cube (`SurveyCube.noise`) and handed to every
tile as its ivar, so each tile is normalised alike, as SoFiA-2 scales noise per channel
over the whole cube by default; noise that also varies across the field (a primary-beam
corrected cube) is divided out by a `noise_pattern` (readers/cube_noise.py).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.readers.common import open_fits, robust_sigma, scaled

GRID_TOLERANCE_PX = 0.01  # bands whose WCS differ by more than this anywhere are on another grid
SKY_SAMPLE = 1_000_000  # pixels of a band sampled (strided) for its robust sky noise

# codes of the problems a mosaic or cube can have (catalogue keywords and the verbs' summaries)
FLAG_CODES = {
    "band_missing": "a band listed in BANDS has no HDU: skipped",
    "band_off_grid": "a band on another pixel grid than the first: skipped",
    "band_unusable": "a band with no finite pixel (or no noise estimate): skipped",
    "ivar_estimated": "no IVAR HDU: constant ivar from the robust sky noise",
    "no_wcs": "no celestial WCS: pixel positions only (RA/DEC NaN)",
    "bunit_missing": "no BUNIT: fluxes without a unit",
}


class _LazyFile:
    """The HDUList of a path for region reads, opened once per process (fork-safe).

    Opened without a memory map: `hdu.section` then seeks and reads just the region's
    bytes. Through a map (astropy's memmap=True) every page a tile touched stays mapped,
    and counted in the worker's resident memory, until the file is closed: reading a
    200 MB cube tile by tile grew RSS by 236 MB with the map and by 39 MB without."""

    def __init__(self, path: Path):
        self.path, self._pid, self._hdul = path, None, None

    def hdul(self) -> fits.HDUList:
        if self._hdul is None or self._pid != os.getpid():
            try:
                self._hdul = fits.open(self.path, memmap=False, lazy_load_hdus=True, do_not_scale_image_data=True)
            except (OSError, ValueError, TypeError, EOFError) as e:
                raise InputError(str(self.path), f"is not a readable FITS file ({type(e).__name__}: {e})", "check that it is a complete FITS file") from None
            self._pid = os.getpid()
        return self._hdul

    def __getstate__(self):  # never ship an open file to another process
        return {"path": self.path, "_pid": None, "_hdul": None}


def _celestial_wcs(header: fits.Header) -> WCS | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            w = WCS(header, naxis=2)
        except Exception:  # a broken WCS is no WCS: pixel-only, flagged
            return None
    return w if w.has_celestial and w.wcs.lng >= 0 else None


# ---------------------------------------------------------------------------- mosaics


@dataclass
class MosaicBand:
    """One usable band of a mosaic: its HDUs (indices) and how its ivar is made."""

    name: str
    hdu: int
    unit: str  # BUNIT ("" when missing)
    wavelength: float | None  # WAVELEN [Angstrom]
    ivar_hdu: int | None = None
    mask_hdu: int | None = None
    saturate: float | None = None
    ivar_constant: float | None = None  # 1 / sky sigma^2 when there is no IVAR HDU
    sky: float = 0.0  # the band's global sky level (`sky_level`), in BUNIT
    psf_fwhm: float | None = None  # arcsec, the band's PSFFWHM / SEEING / FWHM when given


@dataclass
class Mosaic:
    """A multi-band mosaic read region by region. `shape` (H, W); `axes` names the tiled
    axes as the tile finders' pixel columns do; `flags` code -> detail (see FLAG_CODES)."""

    path: Path
    shape: tuple[int, int]
    bands: list[MosaicBand]
    wcs: WCS | None
    pixscale: float | None  # arcsec / pixel
    psf_fwhm: float | None = None  # arcsec, the worst band's PSFFWHM / SEEING when given
    flags: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    axes: tuple[str, ...] = ("ROW", "COL")

    def __post_init__(self):
        self._file = _LazyFile(self.path)

    def read(self, region: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """(values, ivar), float32 (B, h, w) of `region`; bad pixels: value 0, ivar 0."""
        hdul = self._file.hdul()
        rows, cols = region
        h, w = rows.stop - rows.start, cols.stop - cols.start
        values = np.empty((len(self.bands), h, w), np.float32)
        ivar = np.empty((len(self.bands), h, w), np.float32)
        for k, b in enumerate(self.bands):
            hdu = hdul[b.hdu]
            v = np.asarray(scaled(hdu.header, hdu.section[rows, cols]), dtype=np.float32)
            if b.ivar_hdu is not None:
                iv_hdu = hdul[b.ivar_hdu]
                iv = np.asarray(scaled(iv_hdu.header, iv_hdu.section[rows, cols]), dtype=np.float32)
            else:
                iv = np.full((h, w), b.ivar_constant, np.float32)
            bad = ~(np.isfinite(v) & np.isfinite(iv) & (iv > 0))
            if b.saturate is not None:
                bad |= v >= b.saturate  # saturated: the flux there is a lower limit
            if b.mask_hdu is not None:
                m_hdu = hdul[b.mask_hdu]
                bad |= np.asarray(m_hdu.section[rows, cols]) != 0
            values[k] = np.where(bad, 0.0, v)
            ivar[k] = np.where(bad, 0.0, iv)
        return values, ivar

    def tile_header(self, region: tuple[slice, slice]) -> fits.Header:
        """The region's header: its 2-D WCS (CRPIX shifted) when the mosaic has one, NAXISn,
        PIXSCALE [arcsec], PSFFWHM [arcsec] when known, and per band k = 0..B-1: BAND{k},
        BUNIT{k}, WAVELEN{k} [Angstrom], SKY{k} (the band's global sky level, `sky_level`,
        left in the values), PSFFWHM{k} [arcsec] when known; BUNIT = the first band's unit; NBANDS = B."""
        rows, cols = region
        h = fits.Header()
        if self.wcs is not None:
            h.update(self.wcs.slice((rows, cols)).to_header())
        h["NAXIS"] = 2
        h["NAXIS1"], h["NAXIS2"] = cols.stop - cols.start, rows.stop - rows.start
        h["NBANDS"] = len(self.bands)
        if self.pixscale is not None:
            h["PIXSCALE"] = (self.pixscale, "arcsec / pixel")
        if self.psf_fwhm is not None:
            h["PSFFWHM"] = (self.psf_fwhm, "arcsec, the worst band's")
        h["BUNIT"] = self.bands[0].unit
        for k, b in enumerate(self.bands):  # 0-based, as the tile finders index the bands axis
            h[f"BAND{k}"], h[f"BUNIT{k}"] = b.name, b.unit
            h[f"SKY{k}"] = (b.sky, "band sky level [BUNIT], not subtracted")
            if b.wavelength is not None:
                h[f"WAVELEN{k}"] = (b.wavelength, "Angstrom")
            if b.psf_fwhm is not None:
                h[f"PSFFWHM{k}"] = (b.psf_fwhm, "arcsec, this band's PSF FWHM")
        h["NOWCS"] = (self.wcs is None, "no celestial WCS: pixel positions only")
        return h

    def add_world(self, table) -> None:
        """RA, DEC [deg] of the full-frame pixel columns COL (x) and ROW (y); NaN without a WCS."""
        import astropy.units as u

        x, y = np.asarray(table["COL"], np.float64), np.asarray(table["ROW"], np.float64)
        if self.wcs is None or len(x) == 0:
            ra = dec = np.full(len(x), np.nan)
        else:
            ra, dec = self.wcs.all_pix2world(x, y, 0)
        table["RA"], table["DEC"] = u.Quantity(np.asarray(ra) % 360.0, u.deg), u.Quantity(np.asarray(dec), u.deg)


def _strided(hdu, shape: tuple[int, int]) -> np.ndarray:
    """A strided subsample of at most ~SKY_SAMPLE pixels of an image HDU, as float64."""
    step = max(1, math.ceil(math.sqrt(shape[0] * shape[1] / SKY_SAMPLE)))
    # through the memory map (closed after the headers are parsed): astropy's strided
    # `section` reads element by element: 26 s for four 4k x 4k bands, against 1.5 s
    return np.asarray(scaled(hdu.header, hdu.data[::step, ::step]), dtype=np.float64)


def sky_level(pixels: np.ndarray) -> float:
    """A band's global sky: SExtractor's mode estimate 2.5 median - 1.5 mean of the
    3-sigma-clipped pixels (the median when they disagree by more than 0.3 sigma), as
    sep.Background with one mesh. One level for the whole mosaic, so every tile sees the
    same pixel values and a source is measured alike whatever the tiling."""
    from astropy.stats import sigma_clipped_stats

    mean, median, std = sigma_clipped_stats(pixels, sigma=3.0, maxiters=10)
    return float(2.5 * median - 1.5 * mean if abs(mean - median) < 0.3 * std else median)


def _same_grid(ref: WCS | None, other: WCS | None, shape: tuple[int, int]) -> bool:
    """Whether two WCS put the corners and centre of an image of `shape` on the same pixels
    (True when either has none: same shape is all that can be checked)."""
    if ref is None or other is None:
        return True
    ny, nx = shape
    x = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2])
    y = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
    with np.errstate(invalid="ignore"):
        xx, yy = ref.all_world2pix(*other.all_pix2world(x, y, 0), 0)
    return bool(np.all(np.isfinite(xx)) and np.max(np.hypot(xx - x, yy - y)) <= GRID_TOLERANCE_PX)


def open_mosaic(path, bands=None) -> Mosaic:
    """Parse a mosaic's headers (and a strided sky sample of bands without IVAR) into a Mosaic.

    `bands`: names to use (default: the primary's BANDS, else every 2-D image HDU that is not
    IVAR_ / MASK_). Problems are flagged and warned (module docstring); InputError only
    when no band is usable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "does not exist", "check the path")
    hdul = open_fits(path)
    try:
        return _parse_mosaic(path, hdul, bands)
    finally:
        hdul.close()


def _parse_mosaic(path: Path, hdul: fits.HDUList, bands) -> Mosaic:
    names = {str(h.header.get("EXTNAME", "")).strip().upper(): i for i, h in enumerate(hdul) if i > 0}
    primary = hdul[0].header
    flags: dict[str, str] = {}
    notes: list[str] = []

    def flag(code: str, detail: str) -> None:
        flags[code] = f"{flags[code]}; {detail}" if code in flags else detail
        warnings.warn(f"{path.name}: {detail}", stacklevel=3)

    if bands is None and str(primary.get("BANDS", "")).strip():
        bands = [b.strip() for b in str(primary["BANDS"]).split(",") if b.strip()]
    if bands is None:
        bands = [str(h.header.get("EXTNAME", f"HDU{i}")).strip() for i, h in enumerate(hdul) if i > 0 and h.is_image
                 and h.header.get("NAXIS", 0) == 2 and not str(h.header.get("EXTNAME", "")).upper().startswith(("IVAR_", "MASK_"))]
    if not bands:
        raise InputError(str(path), "holds no 2-D image HDU (band)", "give a mosaic with one ImageHDU per band (EXTNAME = band name)")
    used: list[MosaicBand] = []
    shape = ref_wcs = None
    pixscale = fwhm = None
    for name in bands:
        i = names.get(name.upper())
        if i is None or not hdul[i].is_image or hdul[i].header.get("NAXIS", 0) != 2:
            flag("band_missing", f"band {name!r} has no 2-D image HDU")
            continue
        hdr = hdul[i].header
        b_shape = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
        b_wcs = _celestial_wcs(hdr)
        if shape is None:
            shape, ref_wcs = b_shape, b_wcs
        elif b_shape != shape or not _same_grid(ref_wcs, b_wcs, shape):
            flag("band_off_grid", f"band {name!r} is on another pixel grid ({b_shape[0]} x {b_shape[1]}) than band {used[0].name!r} "
                 f"({shape[0]} x {shape[1]}); skipped (resample it onto one grid to use it)")
            continue
        unit = str(hdr.get("BUNIT", "")).strip()
        if not unit:
            flag("bunit_missing", f"band {name!r} has no BUNIT")
        band = MosaicBand(name, i, unit, float(hdr["WAVELEN"]) if "WAVELEN" in hdr else None, saturate=float(hdr["SATURATE"]) if "SATURATE" in hdr else None)
        for prefix, attr in (("IVAR_", "ivar_hdu"), ("MASK_", "mask_hdu")):
            j = names.get(prefix + name.upper())
            if j is not None and (int(hdul[j].header.get("NAXIS2", -1)), int(hdul[j].header.get("NAXIS1", -1))) == shape:
                setattr(band, attr, j)
            elif j is not None:
                notes.append(f"{prefix}{name} has another shape than band {name!r}: ignored")
        sky = _strided(hdul[i], shape)
        sky = sky[np.isfinite(sky) & ((sky < band.saturate) if band.saturate is not None else True)]
        sigma = float(robust_sigma(sky)) if sky.size else float("nan")
        if not (np.isfinite(sigma) and sigma > 0):
            flag("band_unusable", f"band {name!r} has no finite pixel to measure its noise; skipped")
            if len(used) == 0:
                shape = ref_wcs = None
            continue
        band.sky = sky_level(sky)
        if band.ivar_hdu is None:
            band.ivar_constant = 1.0 / sigma**2
            flag("ivar_estimated", f"band {name!r} has no IVAR_{name}: constant ivar from its robust sky noise ({sigma:.4g} {unit})")
        pixscale = pixscale if pixscale is not None else (float(hdr["PIXSCALE"]) if "PIXSCALE" in hdr else None)
        for key in ("PSFFWHM", "SEEING", "FWHM"):
            if key in hdr:
                band.psf_fwhm = float(hdr[key])
                fwhm = max(fwhm or 0.0, band.psf_fwhm)
                break
        used.append(band)
    if not used:
        raise InputError(str(path), f"no usable band ({'; '.join(flags.values()) or 'none found'})",
                         "give at least one band with finite pixels, on the first band's pixel grid")
    if ref_wcs is None:
        flag("no_wcs", "no celestial WCS: the catalogue has pixel positions only (RA/DEC NaN)")
    elif pixscale is None:
        pixscale = float(np.sqrt(abs(np.linalg.det(ref_wcs.pixel_scale_matrix))) * 3600.0)
    return Mosaic(path, shape, used, ref_wcs, pixscale, fwhm, flags, notes)


# ---------------------------------------------------------------------------- survey cubes


@dataclass
class SurveyCube:
    """A spectral cube read region by region, in the card's brightness unit (Jy/beam):
    `shape` (C, H, W) in (spectral, dec, ra) order whatever the file's axis order."""

    path: Path
    info: object  # readers.cubes.CubeInfo
    shape: tuple[int, int, int]
    rest_frequency: float | None  # Hz (the file's RESTFRQ, or the card's for a velocity axis)
    flags: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    axes: tuple[str, ...] = ("CHAN", "ROW", "COL")
    # the field's relative noise (readers.cube_noise.NoisePattern), when set: read() divides by it
    noise_pattern: object = None

    def __post_init__(self):
        self._file = _LazyFile(self.path)
        spec, lat, lon, _ = self.info.axes
        naxis = self.info.wcs.naxis
        fits_axis = lambda a: naxis - a  # noqa: E731 - numpy axis -> 1-based FITS axis
        self._wcs = self.info.wcs.sub([fits_axis(lon), fits_axis(lat), fits_axis(spec)])  # (RA, Dec, spectral) as x, y, z
        if self.rest_frequency:
            self._wcs.wcs.restfrq = self.rest_frequency

    def _raw(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        """float32 (c, h, w) of `region` in Jy/beam, blanks NaN."""
        hdu = self._file.hdul()[self.info.hdu_index]
        spec, lat, lon, stokes = self.info.axes
        slicer = [slice(None)] * len(hdu.shape)
        slicer[spec], slicer[lat], slicer[lon] = region
        if stokes is not None:
            slicer[stokes] = 0
        block = np.asarray(scaled(hdu.header, hdu.section[tuple(slicer)]), dtype=np.float32)
        remaining = [a for a in range(len(hdu.shape)) if a != stokes]
        block = np.transpose(block, [remaining.index(a) for a in (spec, lat, lon)])
        factor = self.info.factor[region[0]].astype(np.float32)
        return np.ascontiguousarray(block * factor[:, None, None] if not np.all(factor == 1) else block)

    @property
    def noise(self) -> np.ndarray:
        """(C,) rms per channel [Jy/beam] over the whole cube: 1.4826 x median |x| (MAD
        about zero, SoFiA-2's noise statistic) of a strided spatial sample of at most
        ~65,000 pixels per channel, read in blocks of channels (NaN: a blank channel).
        Measured once (in the process that opened the cube, before workers fork)."""
        if getattr(self, "_noise", None) is None:
            c, h, w = self.shape
            step = max(1, math.ceil(math.sqrt(h * w / 65536)))
            block = max(1, (1 << 23) // (h * w))  # channels per read: ~32 MB of float32
            out = np.empty(c)
            for c0 in range(0, c, block):
                sample = self._raw((slice(c0, min(c, c0 + block)), slice(0, h), slice(0, w)))[:, ::step, ::step]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channel: NaN
                    out[c0: c0 + len(sample)] = 1.4826 * np.nanmedian(np.abs(sample.reshape(len(sample), -1)), axis=1)
            self._noise = out
        return self._noise

    def read(self, region: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """(values float32 (c, h, w) in Jy/beam, ivar): 1 / noise^2 of each channel (the
        whole cube's, `noise`; a zero-copy broadcast view when the region has no blank),
        0 at blank (NaN) voxels, whose values are 0. With a `noise_pattern` the values are
        divided by it (local noise scaling: uniform noise per channel over the field)."""
        block = self._raw(region)
        if self.noise_pattern is not None:
            block = block / self.noise_pattern.region(region[1], region[2])[None]
        noise = self.noise[region[0]]
        ivar_c = np.where(np.isfinite(noise) & (noise > 0), 1.0 / np.where(noise > 0, noise, 1.0) ** 2, 0.0).astype(np.float32)
        finite = np.isfinite(block)
        if finite.all():
            return block, np.broadcast_to(ivar_c[:, None, None], block.shape)
        return np.where(finite, block, np.float32(0.0)), np.where(finite, ivar_c[:, None, None], np.float32(0.0))

    def tile_header(self, region: tuple[slice, slice, slice]) -> fits.Header:
        """The region's 3-D header: RA, Dec, spectral axis (FREQ, or VRAD/VOPT with RESTFRQ)
        with CRPIX shifted, NAXISn, BUNIT (Jy/beam), BMAJ/BMIN/BPA [deg] when known."""
        chans, rows, cols = region
        w = self._wcs.slice((chans, rows, cols))
        h = fits.Header()
        h["NAXIS"] = 3
        h["NAXIS1"], h["NAXIS2"], h["NAXIS3"] = cols.stop - cols.start, rows.stop - rows.start, chans.stop - chans.start
        h.update(w.to_header())
        if self.rest_frequency:
            h["RESTFRQ"] = self.rest_frequency
        h["BUNIT"] = "Jy/beam"
        beam = self.info.beam
        if beam:
            h["BMAJ"], h["BMIN"], h["BPA"] = beam["beam_major_arcsec"] / 3600, beam["beam_minor_arcsec"] / 3600, beam["beam_pa_deg"]
        return h

    def spectral_wcs(self) -> WCS:
        """The cube's 3-D WCS (x = RA, y = Dec, z) with the spectral axis as frequency [Hz]."""
        w = self._wcs.deepcopy()
        if not w.wcs.ctype[2].upper().startswith("FREQ"):
            w.wcs.sptr("FREQ-???")
        w.wcs.set()
        return w

    def add_world(self, table) -> None:
        """ra, dec [deg] and central_freq [Hz] of the full-frame pixel columns COL, ROW, CHAN."""
        import astropy.units as u

        n = len(table)
        if n == 0:
            ra = dec = freq = np.zeros(0)
        else:
            ra, dec, freq = self.spectral_wcs().all_pix2world(*(np.asarray(table[c], np.float64) for c in ("COL", "ROW", "CHAN")), 0)
        table["ra"], table["dec"] = u.Quantity(np.asarray(ra) % 360.0, u.deg), u.Quantity(np.asarray(dec), u.deg)
        table["central_freq"] = u.Quantity(np.asarray(freq), u.Hz)


def open_survey_cube(path, card=None, rest_frequency=None) -> SurveyCube:
    """Parse a spectral cube's header (`readers.cubes.cube_info`): InputError for a cube
    without a spectral or celestial axis, a BUNIT that is not a brightness, extra axes."""
    from cosmofm.data_cards.readers.cubes import _card, cube_info

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "does not exist", "check the path")
    chosen, _ = _card(path, card)
    info = cube_info(path, chosen, rest_frequency)
    if len(info.shape) != 3 or min(info.shape) < 1:
        raise InputError(str(path), f"has shape {info.shape}", "give a (spectral, dec, ra) cube")
    rest = info.meta.get("rest_frequency_hz")
    spec_type = info.wcs.wcs.ctype[info.wcs.naxis - 1 - info.axes[0]].upper()
    if rest is None and not spec_type.startswith("FREQ"):
        rest = chosen.rest_frequency.to("Hz").value
    return SurveyCube(path, info, tuple(int(n) for n in info.shape), float(rest) if rest else None, {}, list(info.notes))


__all__ = ["FLAG_CODES", "Mosaic", "MosaicBand", "SurveyCube", "open_mosaic", "open_survey_cube", "sky_level"]
