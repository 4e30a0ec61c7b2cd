"""Write Samples in the formats surveys publish: test fixtures and demos for the readers.

Each writer follows the published data model closely enough that the survey's own tools
would find the HDUs, columns, units and keywords where they expect them (see the reader
modules in `data_cards/readers/` for the models and links). They are not archival-grade:
checksums, provenance keywords and columns no reader here uses are left out.

* `write_sdss_spec` - SDSS/BOSS spec-lite: COADD (flux, loglam, ivar, and_mask, or_mask,
  wdisp, sky, model), SPECOBJ, SPZLINE; primary with TELESCOP, PLATEID, MJD, FIBERID,
  BUNIT, VACUUM, HELIO_RV.
* `write_desi_coadd` - DESI coadd: FIBERMAP, EXP_FIBERMAP, per camera X_WAVELENGTH / X_FLUX /
  X_IVAR / X_MASK / X_RESOLUTION, SCORES; samples on the 0.8 A DESI lattice are split
  into the b, r, z cameras, overlap pixels going to both cameras with half the ivar each
  (so the inverse-variance join gives back the sample).
* `write_eso_sdp` - ESO Phase 3 SCIENCE.SPECTRUM: one row per sample in SPECTRUM (WAVE,
  FLUX, ERR, QUAL with TUNIT/TUTYP/TUCD), wavelength in nm or A, air or vacuum.
* `write_fits_image` - one band per HDU (with <band>_IVAR HDUs) or a cube of bands; TAN WCS;
  BUNIT or an AB zero point (MAGZP).
* `write_fits_cube` - RA/Dec/FREQ or VRAD (+ degenerate STOKES) cube in Jy/beam with the beam.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import astropy.units as u
import numpy as np
from astropy import constants as const
from astropy.io import fits

from cosmofm.data_cards.dust import EBV_KEY, SF11_SCALE
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.readers.common import vacuum_to_air
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard, ImageCard

DESI_CAMERAS = {"B": (3600.0, 5800.0), "R": (5760.0, 7620.0), "Z": (7520.0, 9824.0)}  # Angstrom, on the 0.8 A lattice
SDSS_BUNIT = "1E-17 erg/cm^2/s/Ang"
DESI_FLUX_BUNIT = "10**-17 erg/(s cm2 Angstrom)"
DESI_IVAR_BUNIT = "10**+34 (s2 cm4 Angstrom2) / erg2"
ESO_FLUX_UNIT = "erg cm**(-2) s**(-1) angstrom**(-1)"


def _classes(s: Sample) -> tuple[str, float]:
    labels = s.meta.get("labels", {})
    return str(labels.get("spectral_class", "GALAXY")), float(labels.get("redshift", 0.0))


def write_sdss_spec(sample: Sample, path: str | os.PathLike, plate: int = 4055, mjd: int = 55359, fiber: int = 1, ra: float = 150.1, dec: float = 2.2, and_mask: np.ndarray | None = None, vacuum: bool = True) -> Path:
    """An SDSS/BOSS spec-lite file for one spectrum Sample (flux in 1e-17 erg/s/cm^2/A)."""
    wave = sample.coords["wavelength"]
    if not vacuum:
        wave = vacuum_to_air(wave)
    n = wave.size
    if and_mask is None:
        and_mask = np.where(sample.ivar == 0, 1 << 24, 0).astype(np.int32)  # NODATA where masked
    primary = fits.PrimaryHDU()
    h = primary.header
    h["TELESCOP"] = ("SDSS 2.5-M", "Sloan Digital Sky Survey")
    h["PLATEID"], h["MJD"], h["FIBERID"] = plate, mjd, fiber
    h["RA"], h["DEC"] = ra, dec
    h["VERS2D"], h["RUN2D"] = "v5_13_0", "v5_13_0"
    h["BUNIT"] = SDSS_BUNIT
    h["VACUUM"] = ("T" if vacuum else "F", "Wavelengths are in vacuum")
    h["HELIO_RV"] = (12.34, "Heliocentric correction (added to velocities)")
    coadd = fits.BinTableHDU.from_columns([
        fits.Column("flux", "E", array=sample.values.astype(np.float32)),
        fits.Column("loglam", "E", array=np.log10(wave).astype(np.float32)),
        fits.Column("ivar", "E", array=sample.ivar.astype(np.float32)),
        fits.Column("and_mask", "J", array=np.asarray(and_mask, np.int32)),
        fits.Column("or_mask", "J", array=np.asarray(and_mask, np.int32)),
        fits.Column("wdisp", "E", array=np.full(n, 1.1, np.float32)),  # LSF sigma in 1e-4 dex pixels
        fits.Column("sky", "E", array=np.full(n, 3.0, np.float32)),
        fits.Column("model", "E", array=sample.values.astype(np.float32)),
    ], name="COADD")
    cls, z = _classes(sample)
    specobj = fits.BinTableHDU.from_columns([
        fits.Column("PLATE", "J", array=[plate]), fits.Column("MJD", "J", array=[mjd]), fits.Column("FIBERID", "J", array=[fiber]),
        fits.Column("CLASS", "6A", array=[cls.split("_")[0][:6]]), fits.Column("SUBCLASS", "21A", array=[cls]),
        fits.Column("Z", "E", array=[z]), fits.Column("Z_ERR", "E", array=[1e-4]), fits.Column("ZWARNING", "J", array=[0]),
        fits.Column("PLUG_RA", "D", array=[ra]), fits.Column("PLUG_DEC", "D", array=[dec]),
        fits.Column("SPECOBJID", "19A", array=[str((plate << 50) + (fiber << 38))]),
    ], name="SPECOBJ")
    spzline = fits.BinTableHDU.from_columns([
        fits.Column("PLATE", "J", array=[plate] * 2), fits.Column("LINENAME", "13A", array=["H_alpha", "[O_III] 5007"]),
        fits.Column("LINEWAVE", "D", array=[6564.61, 5008.24]), fits.Column("LINEZ", "E", array=[z, z]),
    ], name="SPZLINE")
    path = Path(path)
    fits.HDUList([primary, coadd, specobj, spzline]).writeto(path, overwrite=True)
    return path


def write_desi_coadd(samples: Sequence[Sample], path: str | os.PathLike, targetids: Sequence[int] | None = None, ra: Sequence[float] | None = None, dec: Sequence[float] | None = None, cameras: dict[str, tuple[float, float]] | None = None) -> Path:
    """A DESI coadd file from spectrum Samples on the DESI 0.8 A lattice (desi-like card).

    Each camera gets the sample's pixels inside its range; pixels in two cameras get half
    the ivar in each, so the inverse-variance join returns the sample's values and ivar.
    """
    cameras = cameras or DESI_CAMERAS
    n = len(samples)
    wave = samples[0].coords["wavelength"]
    if any(not np.array_equal(s.coords["wavelength"], wave) for s in samples):
        raise InputError("samples", "have different wavelength grids", "DESI coadds share one grid per camera; use samples of one card")
    targetids = list(targetids) if targetids is not None else [39627000000000000 + i for i in range(n)]
    ra = list(ra) if ra is not None else [150.0 + 0.01 * i for i in range(n)]
    dec = list(dec) if dec is not None else [2.0 + 0.01 * i for i in range(n)]
    primary = fits.PrimaryHDU()
    primary.header["SURVEY"], primary.header["PROGRAM"], primary.header["SPGRP"], primary.header["HPXPIXEL"] = "main", "dark", "healpix", 10016
    fibermap = fits.BinTableHDU.from_columns([
        fits.Column("TARGETID", "K", array=np.asarray(targetids, np.int64)),
        fits.Column("COADD_FIBERSTATUS", "J", array=np.zeros(n, np.int32)),
        fits.Column("TARGET_RA", "D", array=ra), fits.Column("TARGET_DEC", "D", array=dec),
        fits.Column("OBJTYPE", "3A", array=["TGT"] * n),
        # SFD98's scale, as DESI writes it (meta holds SF11's, data_cards/dust.py); NaN: the sample has none
        fits.Column("EBV", "E", array=[float(s.meta.get(EBV_KEY, np.nan)) / SF11_SCALE for s in samples]),
    ], name="FIBERMAP")
    exp = fits.BinTableHDU.from_columns([fits.Column("TARGETID", "K", array=np.asarray(targetids, np.int64)), fits.Column("EXPID", "J", array=np.full(n, 120000, np.int32))], name="EXP_FIBERMAP")
    hdus = [primary, fibermap, exp]
    flux = np.stack([s.values for s in samples]).astype(np.float64)
    ivar = np.stack([s.ivar for s in samples]).astype(np.float64)
    seen = np.zeros(wave.size, int)
    for lo, hi in cameras.values():
        seen += (wave >= lo - 1e-6) & (wave <= hi + 1e-6)
    for name, (lo, hi) in cameras.items():
        sel = (wave >= lo - 1e-6) & (wave <= hi + 1e-6)
        w = wave[sel]
        iv = ivar[:, sel] / seen[sel]
        hdus.append(fits.ImageHDU(w, name=f"{name}_WAVELENGTH"))
        hdus[-1].header["BUNIT"] = "Angstrom"
        hdus.append(fits.ImageHDU(flux[:, sel].astype(np.float32), name=f"{name}_FLUX"))
        hdus[-1].header["BUNIT"] = DESI_FLUX_BUNIT
        hdus.append(fits.ImageHDU(iv.astype(np.float32), name=f"{name}_IVAR"))
        hdus[-1].header["BUNIT"] = DESI_IVAR_BUNIT
        hdus.append(fits.ImageHDU(np.where(iv > 0, 0, 1).astype(np.uint32), name=f"{name}_MASK"))  # uint32: BZERO 2**31 as in the data model
        hdus.append(fits.ImageHDU(_resolution(w, 2000.0 if name == "B" else 4000.0, n), name=f"{name}_RESOLUTION"))
    hdus.append(fits.BinTableHDU.from_columns([fits.Column("TARGETID", "K", array=np.asarray(targetids, np.int64)), fits.Column("TSNR2_LRG", "E", array=np.ones(n, np.float32))], name="SCORES"))
    path = Path(path)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def _resolution(wave: np.ndarray, r: float, nspec: int, ndiag: int = 11) -> np.ndarray:
    """Gaussian resolution-matrix diagonals [nspec, ndiag, nwave] for resolving power r."""
    sigma_pix = wave / r / 2.3548 / np.gradient(wave)
    offsets = ndiag // 2 - np.arange(ndiag)
    kern = np.exp(-0.5 * (offsets[:, None] / sigma_pix[None, :]) ** 2)
    kern /= kern.sum(axis=0, keepdims=True)
    return np.broadcast_to(kern.astype(np.float32), (nspec, ndiag, wave.size)).copy()


def write_eso_sdp(samples: Sequence[Sample], path: str | os.PathLike, wave_unit: str = "nm", medium: str = "vacuum", specsys: str = "BARYCENT", instrume: str = "4MOST", objects: Sequence[str] | None = None, ra: float = 53.1, dec: float = -27.8, extra_primary: dict | None = None) -> Path:
    """An ESO Phase 3 SCIENCE.SPECTRUM file: one SPECTRUM row per sample (same length)."""
    n = len(samples)
    nelem = samples[0].shape[0]
    if any(s.shape[0] != nelem for s in samples):
        raise InputError("samples", "have different lengths", "one SDP table holds spectra with the same NELEM")
    waves = []
    for s in samples:
        w = s.coords["wavelength"]
        if medium == "air":
            w = vacuum_to_air(w)
        waves.append((w * u.AA).to_value(wave_unit))
    flux = np.stack([s.values for s in samples]).astype(np.float64) * 1e-17
    ivar = np.stack([s.ivar for s in samples]).astype(np.float64)
    err = np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), 0.0) * 1e-17
    qual = np.where(ivar > 0, 0, 1).astype(np.int32)
    primary = fits.PrimaryHDU()
    h = primary.header
    h["PRODCATG"], h["ORIGIN"], h["TELESCOP"], h["INSTRUME"] = "SCIENCE.SPECTRUM", "ESO", "ESO-VISTA", instrume
    h["OBJECT"] = objects[0] if objects else "J033224.0-274800"
    h["RA"], h["DEC"], h["SPECSYS"] = ra, dec, specsys
    h["SPEC_RES"], h["SNR"], h["FLUXCAL"] = 6000.0, 10.0, "ABSOLUTE"
    h["WAVELMIN"], h["WAVELMAX"] = float((waves[0].min() * u.Unit(wave_unit)).to_value("nm")), float((waves[0].max() * u.Unit(wave_unit)).to_value("nm"))
    for k, v in (extra_primary or {}).items():
        h[k] = v
    cols = [
        fits.Column("WAVE", f"{nelem}D", unit=wave_unit, array=np.stack(waves)),
        fits.Column("FLUX", f"{nelem}E", unit=ESO_FLUX_UNIT, array=flux.astype(np.float32)),
        fits.Column("ERR", f"{nelem}E", unit=ESO_FLUX_UNIT, array=err.astype(np.float32)),
        fits.Column("QUAL", f"{nelem}J", array=qual),
    ]
    if objects is not None and n > 1:
        cols.append(fits.Column("OBJECT", "32A", array=list(objects)))
    spec = fits.BinTableHDU.from_columns(cols, name="SPECTRUM")
    e = spec.header
    e["VOCLASS"], e["NELEM"] = "SPECTRUM v2.0", nelem
    for i, (utype, ucd) in enumerate((("spec:Data.SpectralAxis.Value", "em.wl;obs.atmos" if medium == "air" else "em.wl"), ("spec:Data.FluxAxis.Value", "phot.flux.density;em.wl"), ("spec:Data.FluxAxis.Accuracy.StatError", "stat.error;phot.flux.density;em.wl"), ("spec:Data.FluxAxis.Accuracy.QualityStatus", "meta.code.qual")), start=1):
        e[f"TUTYP{i}"], e[f"TUCD{i}"] = utype, ucd
    path = Path(path)
    fits.HDUList([primary, spec]).writeto(path, overwrite=True)
    return path


def _celestial_header(h: fits.Header, nx: int, ny: int, scale_arcsec: float, ra: float, dec: float) -> None:
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CRPIX1"], h["CRPIX2"] = (nx + 1) / 2, (ny + 1) / 2  # FITS pixels are 1-based: the centre
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -scale_arcsec / 3600, 0.0, 0.0, scale_arcsec / 3600
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["RADESYS"] = "ICRS"


def write_fits_image(sample: Sample, path: str | os.PathLike, card: ImageCard, layout: str = "mef", bunit: str | None = "nJy", zero_point: float | None = None, ra: float = 150.0, dec: float = 2.0, ivar: bool = True) -> Path:
    """An image Sample as FITS: one band per HDU ("mef", with <band>_IVAR HDUs) or a band cube.

    With `zero_point` the pixels are counts (flux / 10^(-0.4 (ZP - ZP_card_unit))) and the
    header has MAGZP instead of BUNIT.
    """
    nb, ny, nx = sample.shape
    scale = float(abs(sample.coords["ra_offset"][1] - sample.coords["ra_offset"][0]))
    names = [next(b.name for b in card.bands if abs(b.wavelength.to_value("AA") - lam) < 1e-6) for lam in sample.coords["band_wavelength"]]
    per_count = 1.0 if zero_point is None else float((zero_point * u.ABmag).to_value(card.flux_unit))
    values = sample.values.astype(np.float64) / per_count
    ivars = sample.ivar.astype(np.float64) * per_count**2
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"], primary.header["INSTRUME"] = "Rubin", "LSSTCam-like"

    def units(h):
        if zero_point is not None:
            h["MAGZP"] = (zero_point, "AB magnitude of one count")
        elif bunit:
            h["BUNIT"] = bunit

    hdus = [primary]
    if layout == "cube":
        hdu = fits.ImageHDU(values.astype(np.float32), name="IMAGE")
        _celestial_header(hdu.header, nx, ny, scale, ra, dec)
        hdu.header["WCSAXES"] = 2
        for k, name in enumerate(names):
            hdu.header[f"BAND{k + 1}"] = name
        units(hdu.header)
        hdus.append(hdu)
        if ivar:
            hdus.append(fits.ImageHDU(ivars.astype(np.float32), name="IVAR"))
    else:
        for k, name in enumerate(names):
            hdu = fits.ImageHDU(values[k].astype(np.float32), name=name.upper())
            _celestial_header(hdu.header, nx, ny, scale, ra, dec)
            hdu.header["FILTER"] = name
            units(hdu.header)
            hdus.append(hdu)
            if ivar:
                hdus.append(fits.ImageHDU(ivars[k].astype(np.float32), name=f"{name.upper()}_IVAR"))
    path = Path(path)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def write_fits_cube(sample: Sample, path: str | os.PathLike, card: CubeCard, spectral: str = "FREQ", bunit: str = "JY/BEAM", stokes: bool = True, beam: bool = True, ra: float = 60.0, dec: float = -30.0, restfrq: bool = True) -> Path:
    """A cube Sample (F, H, W) as a radio FITS cube: RA---SIN, DEC--SIN, FREQ or VRAD (+ STOKES)."""
    nf, ny, nx = sample.shape
    freq = sample.coords["frequency"]
    scale = float(abs(sample.coords["ra_offset"][1] - sample.coords["ra_offset"][0]))
    data = sample.values.astype(np.float32)
    if stokes:
        data = data[None]
    hdu = fits.PrimaryHDU(data)
    h = hdu.header
    _celestial_header(h, nx, ny, scale, ra, dec)
    h["CTYPE1"], h["CTYPE2"] = "RA---SIN", "DEC--SIN"
    h["CDELT1"], h["CDELT2"] = -scale / 3600, scale / 3600
    for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        del h[k]
    rest = card.rest_frequency.to_value("Hz")
    if spectral == "FREQ":
        h["CTYPE3"], h["CRVAL3"], h["CDELT3"], h["CRPIX3"], h["CUNIT3"] = "FREQ", float(freq[0]), float(freq[1] - freq[0]), 1.0, "Hz"
    elif spectral == "VRAD":
        c = const.c.to_value("m/s")
        v = c * (1 - freq / rest)  # radio convention: linear in frequency
        h["CTYPE3"], h["CRVAL3"], h["CDELT3"], h["CRPIX3"], h["CUNIT3"] = "VRAD", float(v[0]), float(v[1] - v[0]), 1.0, "m/s"
    else:
        raise InputError("spectral", f"{spectral!r} is not FREQ or VRAD", "use FREQ or VRAD")
    if restfrq:
        h["RESTFRQ"] = rest
    if stokes:
        h["CTYPE4"], h["CRVAL4"], h["CDELT4"], h["CRPIX4"] = "STOKES", 1.0, 1.0, 1.0
    h["SPECSYS"] = "LSRK"
    h["BUNIT"] = bunit
    if beam:
        h["BMAJ"], h["BMIN"], h["BPA"] = card.beam_fwhm.to_value("deg"), card.beam_fwhm.to_value("deg") * 0.8, 30.0
    h["TELESCOP"] = "SKA-MID"
    path = Path(path)
    hdu.writeto(path, overwrite=True)
    return path
