"""Blended stamps with their full truth, drawn from the image mocks of mocks/images.py.

Blends (`mock_blend`) put 1-15 neighbours from the same mock universe at controlled
separations and magnitude differences around object (seed, index) and return the truth
(isolated images, fluxes, positions, segmentation) as a `BlendTruth` beside the Sample;
`write_blend_fits` / `read_blend_fits` store both in one FITS file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import NJY_AB_ZP, object_rng
from cosmofm.data_cards.mocks.images import card_model, draw_source, observe_stamp, render
from cosmofm.data_cards.mocks.spectra import R_BAND
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import ImageCard

NEIGHBOUR_INDEX0 = 1 << 40  # blend neighbours of (seed, index) are objects (seed, NEIGHBOUR_INDEX0 + 16 index + k)

@dataclass
class BlendTruth:
    """Everything known about a blend; arrays stay out of `Sample.meta`.

    Positions are (dec_offset, ra_offset) [arcsec] from the stamp centre and (row,
    column) [pixels]; object 0 is the primary (seed, index).
    """

    isolated: np.ndarray  # (N, B, H, W) noiseless image of each object, card flux unit per pixel
    flux_njy: np.ndarray  # (N, B) total model flux of each object
    positions: np.ndarray  # (N, 2) arcsec
    pixel_positions: np.ndarray  # (N, 2) pixels
    segmentation: np.ndarray  # (H, W) int32: 0 background, k + 1 where object k dominates
    footprints: np.ndarray  # (N, H, W) bool: object k's noiseless S/N >= seg_nsigma
    pair_ids: list[str]
    bands: list[str]

    def __post_init__(self):
        n = len(self.pair_ids)
        for name, shape in (("isolated", (n, len(self.bands))), ("flux_njy", (n, len(self.bands))), ("positions", (n, 2)), ("pixel_positions", (n, 2))):
            got = np.shape(getattr(self, name))
            if got[: len(shape)] != shape:
                raise InputError(f"BlendTruth.{name}", f"shape {got} does not start with {shape}", "one entry per object (and band)")


def _range(name: str, value, minimum: float, integer: bool = False) -> tuple[float, float]:
    lo, hi = (value, value) if np.isscalar(value) else tuple(value)
    if integer and (int(lo) != lo or int(hi) != hi):
        raise InputError(name, f"{value!r} is not a whole number or a (min, max) pair of them", "e.g. 3 or (2, 4)")
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise InputError(name, f"{value!r} is not a (min, max) range", "give min <= max")
    if lo < minimum:
        raise InputError(name, f"must be >= {minimum}, got {value!r}", f"give values >= {minimum}")
    return lo, hi


def footprint_segmentation(images: np.ndarray, sky_sigma: np.ndarray, nsigma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(footprints (K, H, W) bool, segmentation (H, W) int32) of K noiseless (B, H, W) images: source k's
    footprint is where its S/N, the quadrature sum over bands of image / sky_sigma (B,), is >= nsigma;
    the segmentation labels each pixel k + 1 for the source of highest S/N there, 0 outside every footprint."""
    images = np.asarray(images, np.float64)
    k, (h, w) = len(images), images.shape[-2:]
    if not k:
        return np.zeros((0, h, w), bool), np.zeros((h, w), np.int32)
    snr = np.sqrt(np.sum((images / np.asarray(sky_sigma, np.float64)[None, :, None, None]) ** 2, axis=1))  # (K, H, W)
    foot = snr >= nsigma
    return foot, np.where(foot.any(0), np.argmax(snr, 0) + 1, 0).astype(np.int32)


def mock_blend(card: ImageCard, seed: int, index: int, n_objects: int | tuple[int, int] = (2, 4),
               separation: float | tuple[float, float] = (0.5, 2.5), delta_mag: float | tuple[float, float] = (0.0, 2.5),
               *, reference_band: str | None = None, noise: bool = True, seg_nsigma: float = 3.0,
               neighbours: str = "catalogue") -> tuple[Sample, BlendTruth]:
    """A stamp of object (seed, index) blended with 1-15 neighbours, and its full truth.

    Args:
        n_objects: objects in the stamp (primary included), or a (min, max) range to draw from.
        separation: each neighbour's distance from the primary [arcsec], or a range.
        delta_mag: each neighbour's magnitude minus the primary's in `reference_band`, or a range.
        reference_band: band name for `delta_mag`; default the band closest to 6231 A.
        seg_nsigma: footprint threshold, in sky sigma of each object's noiseless S/N
            (quadrature sum over bands).
        neighbours: "catalogue" (default): neighbours as described below, separations and
            magnitude differences uniform in their ranges. "field": neighbours drawn from the
            field model of mocks/field_sky.py (`blend_fields.field_neighbours`): galaxies with
            the luminosity function's redshifts, colours and sizes, and stars, as many at each
            magnitude of primary + delta_mag as the sky has (fainter ones commoner), at
            separations within `separation` distributed as neighbours of a clustered field;
            near a galaxy, part of them (the clustered share at their separation) are
            physical companions at its redshift.

    The neighbours are objects (seed, NEIGHBOUR_INDEX0 + 16 index + k) of the same mock
    universe (their `pair_id`s are in the truth), rescaled in brightness to the drawn
    magnitude difference (colours kept, sizes follow the new luminosity).
    """
    n_lo, n_hi = _range("n_objects", n_objects, 2, integer=True)
    if n_hi > 16:
        raise InputError("n_objects", f"at most 16 objects per blend, got {n_objects!r}", "ask for 16 or fewer")
    s_lo, s_hi = _range("separation", separation, 0.0)
    d_lo, d_hi = _range("delta_mag", delta_mag, -np.inf)
    if neighbours not in ("catalogue", "field"):
        raise InputError("neighbours", f"{neighbours!r} is not a neighbour model", 'use "catalogue" or "field"')
    model = card_model(card)
    p, n = model.p, model.n
    if s_hi > n * p / 2:
        raise InputError("separation", f"{s_hi} arcsec puts neighbours outside the {n * p:.2f} arcsec stamp",
                         f"keep separations <= {n * p / 2:.2f} arcsec (half the stamp)")
    names = model.band_names
    if reference_band is None:
        ref = int(np.argmin([abs(w - R_BAND) for w in model.wavelengths]))
    elif reference_band in names:
        ref = names.index(reference_band)
    else:
        raise InputError("reference_band", f"{reference_band!r} is not a band of {card.name}", f"use one of {names}")

    rng = object_rng(seed, index, 7)
    count = int(rng.integers(n_lo, n_hi + 1))
    primary = draw_source(card, seed, index)
    primary.dec, primary.ra = (float(v) for v in rng.uniform(-0.5, 0.5, 2) * p)
    m0 = NJY_AB_ZP - 2.5 * np.log10(max(primary.flux_njy[ref], 1e-30))
    sources, seps, dms = [primary], [], []
    if neighbours == "field":  # its own random stream: the primary stays the catalogue mode's
        from cosmofm.data_cards.mocks.blend_fields import field_neighbours

        others, seps = field_neighbours(card, object_rng(seed, index, 8), count - 1, (s_lo, s_hi), (m0 + d_lo, m0 + d_hi),
                                        pair_prefix=f"field-{seed}-{index}",
                                        companion_z=primary.redshift if primary.kind == "galaxy" else None)
        for src in others:
            src.dec, src.ra = float(primary.dec + src.dec), float(primary.ra + src.ra)
            dms.append(float(NJY_AB_ZP - 2.5 * np.log10(max(src.flux_njy[ref], 1e-30)) - m0))
        sources += others
        seps = [float(v) for v in seps]
    for k in range(1, count if neighbours == "catalogue" else 1):
        sep, angle, dm = rng.uniform(s_lo, s_hi), rng.uniform(0, 2 * np.pi), rng.uniform(d_lo, d_hi)
        src = draw_source(card, seed, NEIGHBOUR_INDEX0 + 16 * index + k, ref=(ref, m0 + dm))
        src.dec, src.ra = primary.dec + sep * np.sin(angle), primary.ra + sep * np.cos(angle)
        src.dec, src.ra = float(src.dec), float(src.ra)
        sources.append(src)
        seps.append(float(sep))
        dms.append(float(dm))
    isolated = render(card, sources)
    values, ivar = observe_stamp(model, isolated.sum(axis=0), object_rng(seed, index, 5), noise)

    footprints, segmentation = footprint_segmentation(isolated, model.sky_sigma, seg_nsigma)
    positions = np.array([[s.dec, s.ra] for s in sources])
    truth = BlendTruth(
        isolated=isolated.astype(np.float32), flux_njy=np.array([s.flux_njy for s in sources]), positions=positions,
        pixel_positions=positions / p + (n - 1) / 2, segmentation=segmentation, footprints=footprints,
        pair_ids=[s.pair_id for s in sources], bands=names,
    )
    meta_truth = {
        "objects": [s.to_json() for s in sources], "reference_band": names[ref], "separation_arcsec": seps,
        "delta_mag": dms, "seg_nsigma": float(seg_nsigma), "filters": list(model.filters), "psf": model.psf_meta,
    }
    if neighbours == "field":
        meta_truth["neighbours"] = "field"
    sample = Sample(
        "image", values, ivar, model.coords,
        {"card": card.name, "id": f"{card.name}-blend-{seed}-{index}", "pair_id": primary.pair_id, "blend": True,
         "labels": {"redshift": primary.redshift, "spectral_class": primary.spectral_class, "n_objects": count},
         "truth": meta_truth},
    )
    return sample, truth


def write_blend_fits(path: str | os.PathLike, sample: Sample, truth: BlendTruth, card: ImageCard) -> Path:
    """Write a blend and its truth to one FITS file.

    HDUs: PRIMARY (values, B x H x W, BUNIT = card flux unit), IVAR, ISOLATED
    (N x B x H x W), SEGMAP (H x W), FOOTPRNT (N x H x W, 0/1), OBJECTS (a table: pair_id,
    positions, fluxes per band), BANDS (name, wavelength [A]) and META (sample.meta as JSON).
    """
    from astropy.io import fits

    path = Path(path)
    primary = fits.PrimaryHDU(sample.values)
    h = primary.header
    h["BUNIT"] = card.flux_unit
    h["CARD"], h["SAMPLEID"], h["PAIRID"] = card.name, sample.id, str(sample.meta.get("pair_id", ""))
    h["PIXSCALE"] = (float(card.pixel_scale.to_value("arcsec")), "arcsec per pixel")
    h["NOBJ"] = len(truth.pair_ids)
    width = max(len(b) for b in truth.bands)
    objects = fits.BinTableHDU.from_columns([
        fits.Column("PAIR_ID", f"{max(len(i) for i in truth.pair_ids)}A", array=np.array(truth.pair_ids)),
        fits.Column("DEC_OFF", "D", unit="arcsec", array=truth.positions[:, 0]),
        fits.Column("RA_OFF", "D", unit="arcsec", array=truth.positions[:, 1]),
        fits.Column("ROW", "D", unit="pix", array=truth.pixel_positions[:, 0]),
        fits.Column("COL", "D", unit="pix", array=truth.pixel_positions[:, 1]),
        fits.Column("FLUX", f"{len(truth.bands)}D", unit=card.flux_unit, array=truth.flux_njy),
    ], name="OBJECTS")
    bands = fits.BinTableHDU.from_columns([
        fits.Column("NAME", f"{width}A", array=np.array(truth.bands)),
        fits.Column("WAVELENGTH", "D", unit="Angstrom", array=sample.coords["band_wavelength"]),
    ], name="BANDS")
    meta = json.dumps(sample.meta)
    meta_hdu = fits.BinTableHDU.from_columns([fits.Column("JSON", f"{len(meta)}A", array=np.array([meta]))], name="META")
    fits.HDUList([
        primary, fits.ImageHDU(sample.ivar, name="IVAR"), fits.ImageHDU(truth.isolated, name="ISOLATED"),
        fits.ImageHDU(truth.segmentation, name="SEGMAP"), fits.ImageHDU(truth.footprints.astype(np.uint8), name="FOOTPRNT"),
        objects, bands, meta_hdu,
    ]).writeto(path, overwrite=True)
    return path


def read_blend_fits(path: str | os.PathLike) -> tuple[Sample, BlendTruth]:
    """Read back what `write_blend_fits` wrote."""
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "does not exist", "give the path of a file written by write_blend_fits")
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        missing = [e for e in ("IVAR", "ISOLATED", "SEGMAP", "FOOTPRNT", "OBJECTS", "BANDS", "META") if e not in names]
        if missing:
            raise InputError(str(path), f"has no {missing} extension(s)", "write it with write_blend_fits")
        values = np.asarray(hdul[0].data, dtype=np.float32)
        p = float(hdul[0].header["PIXSCALE"])
        offsets = (np.arange(values.shape[-1]) - (values.shape[-1] - 1) / 2) * p
        bands = hdul["BANDS"].data
        meta = json.loads(hdul["META"].data["JSON"][0])
        objects = hdul["OBJECTS"].data
        sample = Sample("image", values, np.asarray(hdul["IVAR"].data, np.float32),
                        {"band_wavelength": np.asarray(bands["WAVELENGTH"], float), "dec_offset": offsets, "ra_offset": offsets}, meta)
        truth = BlendTruth(
            isolated=np.asarray(hdul["ISOLATED"].data, np.float32), flux_njy=np.asarray(objects["FLUX"], float).reshape(len(objects), -1),
            positions=np.stack([objects["DEC_OFF"], objects["RA_OFF"]], axis=1).astype(float),
            pixel_positions=np.stack([objects["ROW"], objects["COL"]], axis=1).astype(float),
            segmentation=np.asarray(hdul["SEGMAP"].data, np.int32), footprints=np.asarray(hdul["FOOTPRNT"].data).astype(bool),
            pair_ids=[str(x) for x in objects["PAIR_ID"]], bands=[str(x) for x in bands["NAME"]],
        )
    return sample, truth
