"""Large multi-band mock fields (mosaics) with full truth, and their one-file FITS format.

`mock_field(card, size, seed)` draws a whole sky to a magnitude limit (mocks/field_sky.py:
galaxies from an evolving luminosity function, clustered; Galactic stars) and renders it
on the card's pixel grid with the stamp renderer of mocks/images.py: each source is
drawn into its own stamp, just large enough to hold >= 99.5 % of its light (its 99 %
radius and the PSF's 99.5 % radius, in quadrature), and added to the field, so a 4k x 4k
field never holds per-source full-frame arrays. Sources are also drawn in a margin around
the field, so light spills in across the edges as on the sky. Noise is added in row blocks
as `images.observe_stamp` does for stamps (sky + source Poisson noise, ivar from the noisy
image).

The truth table lists every rendered source, inside the field or in the margin
(`IN_FIELD`), with its nearest-neighbour distance and blendedness: the fraction of the
noiseless reference-band flux inside its footprint (pixels where its own noiseless S/N,
quadrature over bands, reaches `seg_nsigma`; its central pixel when none does) that comes
from other sources.

`write_field_fits` writes the mosaic format `cosmofm deblend` and data_cards/readers/mosaic.py
read: a header-only primary HDU (CARD, BANDS = comma-separated band names); per band an
image HDU named after the band (float32, 2D celestial WCS, BUNIT, FILTER, PIXSCALE
[arcsec], WAVELEN [A], PSFFWHM [arcsec], optional SATURATE) and one named IVAR_<band>; a
TRUTH table (units in the column headers). EXTNAMEs keep the bands' case (astropy looks
them up ignoring case).
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.io.atomic import fsync_dir, fsync_file, honour_umask
from cosmofm.data_cards.mocks.common import NJY_AB_ZP
from cosmofm.data_cards.mocks.field_sky import GALAXY_Z, STAR_BRIGHT, Clustering, clustered_positions, field_sky, neighbour_separations
from cosmofm.data_cards.mocks.images import Source, _extent, card_model, observe_stamp, render
from cosmofm.data_cards.schema import ImageCard

__all__ = ["Clustering", "MockField", "field_card", "field_neighbours", "mock_field", "read_field_truth", "write_field_fits"]

STAMP_SIZES = (24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # pixels: few sizes, so the renderer's PSF grids are reused
MAX_SIZE = 16384  # pixels on a side
DEFAULT_CENTRE = (150.1, 2.2)  # deg: a high-latitude field (COSMOS)
ROW_BLOCK = 256  # rows of noise drawn at a time
_BATCH = 32  # sources per render call
_BATCH_VALUES = 4_000_000  # at most this many float64 values per render call (32 MB)


@dataclass
class MockField:
    """A rendered field: values and ivar (B, H, W) float32 in the card's flux unit, its 2D
    celestial WCS header, and the truth table (mocks/blend_fields.py module docstring)."""

    values: np.ndarray
    ivar: np.ndarray
    header: object  # astropy.io.fits.Header with the 2D celestial WCS
    truth: object  # astropy.table.Table
    bands: list[str]
    wavelengths: list[float]  # Angstrom
    card: str
    flux_unit: str
    pixel_scale: float  # arcsec
    meta: dict = field(default_factory=dict)

    @property
    def wcs(self):
        from astropy.wcs import WCS

        return WCS(self.header)


def field_card(card: ImageCard, bands: Sequence[str] | None = None) -> ImageCard:
    """The card restricted to `bands` (in the card's order), e.g. the four bands of a benchmark."""
    if bands is None:
        return card
    names = [b.name for b in card.bands]
    unknown = [b for b in bands if b not in names]
    if unknown or not bands:
        raise InputError("bands", f"{list(bands)!r} are not bands of {card.name}" if unknown else "is empty", f"choose among {names}")
    return dataclasses.replace(card, bands=[b for b in card.bands if b.name in set(bands)])


def _size(size) -> tuple[int, int]:
    hw = (size, size) if np.isscalar(size) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in hw):
        raise InputError("size", f"{size!r} is not a whole number of pixels or an (H, W) pair", "e.g. 1024 or (512, 768)")
    if not all(8 <= v <= MAX_SIZE for v in hw):
        raise InputError("size", f"{hw} is outside 8 to {MAX_SIZE} pixels a side", f"give sizes from 8 to {MAX_SIZE}")
    return int(hw[0]), int(hw[1])


def _nonneg(name: str, value, fix: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value) or value < 0:
        raise InputError(name, f"must be a finite number >= 0, got {value!r}", fix)
    return float(value)


def _psf_radius(card: ImageCard, fraction: float = 0.995) -> float:
    """Radius [arcsec] of the square stamp half-width holding `fraction` of the widest PSF's light."""
    from cosmofm.data_cards.mocks.images import psf_profile

    model = card_model(card)
    best = 0.0
    for b in range(len(model.band_names)):
        img = psf_profile(card, b).drawImage(nx=256, ny=256, scale=model.p / 2, method="no_pixel").array
        c = img.shape[0] // 2
        enclosed = [img[c - r:c + r, c - r:c + r].sum() for r in range(1, c)]
        best = max(best, (int(np.argmax(np.array(enclosed) >= fraction * img.sum())) + 1) * model.p / 2)
    return best


def mock_field(card: ImageCard, size: int | tuple[int, int] = 512, seed: int = 0, *, density: float | None = None,
               star_density: float | None = None, star_fraction: float | None = None, clustering: Clustering | None = Clustering(),
               mag_limit: float | None = None, noise: bool = True, centre: tuple[float, float] = DEFAULT_CENTRE,
               margin: float = 5.0, seg_nsigma: float = 3.0, bands: Sequence[str] | None = None) -> MockField:
    """A field of `size` = H x W pixels (or H = W = size) on the card's pixel grid.

    Args:
        density: galaxies per arcmin^2 brighter than mag_limit (default: the luminosity
            function's, ~160 at r < 28.2 for lsst-like); the LF's shape is kept.
        star_density: stars per arcmin^2 brighter than mag_limit (default: the star counts of
            mocks/field_sky.py); or star_fraction: stars / all sources (not both).
        clustering: galaxy clustering (`Clustering`), or None for Poisson positions.
        mag_limit: faintest reference-band (band nearest 6231 A) AB magnitude drawn; default
            the band's 5 sigma point-source depth + 1.
        centre: (RA, Dec) [deg] of the field centre (the WCS's reference point).
        margin: arcsec around the field where sources are drawn too (their light spills in).
        seg_nsigma: footprint threshold of the blendedness (noiseless S/N, quadrature over bands).
        bands: a subset of the card's band names (default all).
    """
    from astropy.table import Table
    from astropy.wcs import WCS
    from scipy.spatial import cKDTree

    card = field_card(card, bands)
    h, w = _size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"must be a whole number >= 0, got {seed!r}", "e.g. 0")
    density = _nonneg("density", density, "give galaxies per arcmin^2, or None for the luminosity function's")
    star_density = _nonneg("star_density", star_density, "give stars per arcmin^2, or None")
    star_fraction = _nonneg("star_fraction", star_fraction, "give a fraction in [0, 1), or None")
    if star_density is not None and star_fraction is not None:
        raise InputError("star_fraction", "given together with star_density", "give one of them")
    if star_fraction is not None and star_fraction >= 1:
        raise InputError("star_fraction", f"must be below 1, got {star_fraction}", "e.g. 0.05")
    margin = _nonneg("margin", margin, "give arcsec, e.g. 5")
    if clustering is not None and not isinstance(clustering, Clustering):
        raise InputError("clustering", f"{clustering!r} is not a Clustering or None", "use Clustering(...) or None for Poisson positions")
    try:
        ra0, dec0 = (float(v) for v in centre)
    except (TypeError, ValueError):
        ra0, dec0 = np.nan, np.nan
    if not (np.isfinite(ra0) and np.isfinite(dec0) and -90 < dec0 < 90):
        raise InputError("centre", f"{centre!r} is not an (RA, Dec) in degrees", "e.g. (150.1, 2.2)")
    sky = field_sky(card)
    model = card_model(card)
    p, ref = model.p, sky.ref
    if mag_limit is None:
        mag_limit = float(sky.depth[ref] + 1.0)
    elif isinstance(mag_limit, bool) or not isinstance(mag_limit, (int, float, np.number)) or not 15 < mag_limit < 35:
        raise InputError("mag_limit", f"{mag_limit!r} is not an AB magnitude in (15, 35)", "e.g. 27")

    rng = np.random.default_rng([seed, 21])
    width, height = w * p + 2 * margin, h * p + 2 * margin  # arcsec, the margin included
    area = width * height / 3600.0
    lf_density = sky.galaxy_density(mag_limit)
    gal = sky.draw_galaxies(rng, area, (-np.inf, mag_limit), scale=1.0 if density is None else density / max(lf_density, 1e-30))
    n_gal = len(gal["z"])
    if star_fraction is not None:
        n_star = int(rng.poisson(star_fraction / (1 - star_fraction) * n_gal))
    else:
        n_star = int(rng.poisson((sky.star_counts(mag_limit) if star_density is None else star_density) * area))
    stars = sky.draw_stars(rng, n_star, (min(STAR_BRIGHT, mag_limit - 1.0), mag_limit))
    xy = np.concatenate([clustered_positions(rng, n_gal, width, height, clustering, gal["z"]), rng.random((n_star, 2)) * [width, height]])
    x = (xy[:, 0] - margin) / p - 0.5  # 0-based pixel coordinates: pixel centres at integers
    y = (xy[:, 1] - margin) / p - 0.5

    # build the sources, then render them in groups of equal stamp size
    src_rng = np.random.SeedSequence([seed, 22]).spawn(n_gal)
    sources = [sky.galaxy_source(gal, i, np.random.default_rng(src_rng[i]), f"field-{seed}-{i + 1}") for i in range(n_gal)]
    sources += [sky.star_source(stars, i, f"field-{seed}-{n_gal + i + 1}") for i in range(n_star)]
    psf_r = _psf_radius(card)
    stamp = np.array([next((n for n in STAMP_SIZES if n * p >= 2 * math.hypot(_extent(s), psf_r) + 2 * p), STAMP_SIZES[-1]) for s in sources])
    clean = np.zeros((len(model.band_names), h, w), dtype=np.float32)
    sigma = model.sky_sigma[:, None, None]
    footprint_pix: list[np.ndarray] = [np.zeros(0, np.int64)] * len(sources)
    own_fp = np.zeros(len(sources))
    frac_in = np.zeros(len(sources))
    for n in sorted(set(stamp.tolist())):
        sub = dataclasses.replace(card, stamp_size=int(n))
        idx = np.flatnonzero(stamp == n)
        batch = max(1, min(_BATCH, _BATCH_VALUES // (len(model.band_names) * n * n)))  # bounded memory for big stamps
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            x0 = np.floor(x[chunk] + 0.5).astype(int) - n // 2  # field pixel of the stamp's pixel 0
            y0 = np.floor(y[chunk] + 0.5).astype(int) - n // 2
            for k, i in enumerate(chunk):
                s = sources[i]
                s.ra, s.dec = float((x[i] - x0[k] - (n - 1) / 2) * p), float((y[i] - y0[k] - (n - 1) / 2) * p)
            images = render(sub, [sources[i] for i in chunk]).astype(np.float32)  # (k, B, n, n)
            for k, i in enumerate(chunk):
                r0, r1, c0, c1 = max(y0[k], 0), min(y0[k] + n, h), max(x0[k], 0), min(x0[k] + n, w)
                total = float(images[k, ref].sum())
                if r0 >= r1 or c0 >= c1:
                    continue
                cut = images[k][:, r0 - y0[k]:r1 - y0[k], c0 - x0[k]:c1 - x0[k]]
                clean[:, r0:r1, c0:c1] += cut
                frac_in[i] = float(cut[ref].sum()) / total if total > 0 else 0.0
                rows, cols = np.nonzero(np.sqrt(np.sum((cut / sigma) ** 2, axis=0)) >= seg_nsigma)
                if rows.size == 0:  # no pixel above the threshold: its central pixel, if in the field
                    cy, cx = int(np.floor(y[i] + 0.5)), int(np.floor(x[i] + 0.5))
                    if not (r0 <= cy < r1 and c0 <= cx < c1):
                        continue
                    rows, cols = np.array([cy - r0]), np.array([cx - c0])
                own_fp[i] = float(cut[ref][rows, cols].sum())
                footprint_pix[i] = (rows + r0) * w + (cols + c0)
    ref_plane = clean[ref].ravel()
    blend = np.array([1 - own_fp[i] / ref_plane[fp].sum() if fp.size and ref_plane[fp].sum() > 0 else np.nan
                      for i, fp in enumerate(footprint_pix)])

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = [ra0, dec0]
    wcs.wcs.crpix = [(w + 1) / 2, (h + 1) / 2]
    wcs.wcs.cdelt = [-p / 3600.0, p / 3600.0]  # east to the left
    ra, dec = wcs.all_pix2world(x, y, 0)
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1] if len(xy) > 1 else np.full(len(xy), np.inf)

    if noise:
        values, ivar = clean, np.empty_like(clean)
        noise_rng = np.random.default_rng([seed, 23])
        for r in range(0, h, ROW_BLOCK):
            v, iv = observe_stamp(model, clean[:, r:r + ROW_BLOCK].astype(np.float64), noise_rng, True)
            values[:, r:r + ROW_BLOCK], ivar[:, r:r + ROW_BLOCK] = v, iv
    else:
        values = clean
        ivar = np.broadcast_to((1 / sigma**2).astype(np.float32), clean.shape).copy()

    is_gal = np.arange(len(sources)) < n_gal
    dominant_bulge = np.array([s.kind == "galaxy" and s.bulge_fraction[ref] >= 0.5 for s in sources])
    q = np.array([(s.bulge_q if b else s.disk_q) if s.kind == "galaxy" else 1.0 for s, b in zip(sources, dominant_bulge)])
    fluxes = np.array([s.flux_njy for s in sources]).reshape(len(sources), len(model.band_names))
    truth = Table()
    truth["ID"] = np.arange(1, len(sources) + 1, dtype=np.int64)
    truth["RA"], truth["DEC"] = np.asarray(ra, float), np.asarray(dec, float)
    truth["X"], truth["Y"] = x, y
    truth["KIND"] = np.where(is_gal, "galaxy", "star")
    truth["CLASS"] = np.array([s.spectral_class for s in sources], dtype="U20")
    truth["REDSHIFT"] = np.array([s.redshift for s in sources])
    truth[f"MAG_{model.band_names[ref]}"] = NJY_AB_ZP - 2.5 * np.log10(np.maximum(fluxes[:, ref], 1e-30))
    for b, name in enumerate(model.band_names):
        truth[f"FLUX_{name}"] = fluxes[:, b]
    truth["ABS_MAG_R"] = np.array([s.abs_mag_r if s.abs_mag_r is not None else np.nan for s in sources])
    truth["SIZE"] = np.array([(s.bulge_hlr if b else s.disk_hlr) if s.kind == "galaxy" else 0.0 for s, b in zip(sources, dominant_bulge)])
    truth["BULGE_HLR"] = np.array([s.bulge_hlr for s in sources])
    truth["DISK_HLR"] = np.array([s.disk_hlr for s in sources])
    truth["BULGE_FRAC"] = np.array([s.bulge_fraction[ref] for s in sources])
    truth["ELLIPTICITY"] = (1 - q) / (1 + q)
    truth["PA"] = np.array([s.beta_deg for s in sources])
    truth["NN_DIST"] = nn
    truth["BLENDEDNESS"] = blend
    truth["IN_FIELD"] = (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
    truth["FRAC_IN"] = frac_in
    units = {"RA": "deg", "DEC": "deg", "X": "pix", "Y": "pix", "SIZE": "arcsec", "BULGE_HLR": "arcsec", "DISK_HLR": "arcsec",
             "PA": "deg", "NN_DIST": "arcsec", f"MAG_{model.band_names[ref]}": "mag", "ABS_MAG_R": "mag",
             **{f"FLUX_{name}": card.flux_unit for name in model.band_names}}
    for name, unit in units.items():
        truth[name].unit = unit
    truth.meta.update({"REFBAND": model.band_names[ref], "MAGLIM": float(mag_limit), "SEED": int(seed), "SEGNSIG": float(seg_nsigma)})
    meta = {"seed": int(seed), "mag_limit": float(mag_limit), "reference_band": model.band_names[ref], "margin_arcsec": margin,
            "galaxy_density_lf": float(lf_density), "n_galaxies": n_gal, "n_stars": n_star, "noise": bool(noise),
            "clustering": None if clustering is None else dataclasses.asdict(clustering), "psf": model.psf_meta,
            "filters": list(model.filters)}
    return MockField(values, ivar, wcs.to_header(), truth, list(model.band_names), list(model.wavelengths), card.name,
                     card.flux_unit, p, meta)


COMPANION_DZ = 0.01  # half-width of the redshift slice physical companions are drawn from


def _pool(sky, rng: np.random.Generator, count: int, lo: float, hi: float, z_slice: tuple[float, float] | None = None):
    """(galaxies, stars) of the field model with lo <= m_ref < hi, at least `count` of them
    (galaxies of a redshift slice only, with `z_slice`); None when the sky has none."""
    n_gal = max(sky.galaxy_density(hi) - sky.galaxy_density(lo), 1e-6)
    n_star = sky.star_counts(hi, lo) if z_slice is None else 0.0
    area = 4.0 * count / (n_gal + n_star)  # arcmin^2 holding ~4 count sources of the window (more for a slice)
    for _ in range(40):
        gal = sky.draw_galaxies(rng, area, (lo, hi), z_slice=z_slice)
        stars = sky.draw_stars(rng, int(rng.poisson(n_star * area)), (max(lo, STAR_BRIGHT), hi)) if n_star > 0 else {"mag": np.zeros(0)}
        if len(gal["z"]) + len(stars["mag"]) >= count:
            return gal, stars
        area *= 2
    return None


def field_neighbours(card: ImageCard, rng: np.random.Generator, count: int, separation: tuple[float, float],
                     magnitudes: tuple[float, float], clustering: Clustering | None = Clustering(),
                     pair_prefix: str = "field", companion_z: float | None = None) -> tuple[list[Source], np.ndarray]:
    """`count` neighbours drawn from the field model: galaxies and stars as the sky has them
    with magnitudes[0] <= m_ref < magnitudes[1] (so fainter ones are commoner, as the
    counts say), at separations [arcsec] in `separation` distributed as around a galaxy
    of a clustered field (`field_sky.neighbour_separations`), at random angles.

    With `companion_z` (the primary galaxy's redshift) and clustering, a neighbour at
    separation theta is a physical companion with probability w(theta) / (1 + w(theta)),
    the clustered share of the pairs there: a galaxy of the luminosity function within
    COMPANION_DZ of companion_z (so with similar colours); the others are field sources.

    Returns the Sources (positions = offsets [arcsec] from the primary, in `dec` / `ra`)
    and their separations. Used by `mock_blend(..., neighbours="field")`.
    """
    sky = field_sky(card)
    lo, hi = magnitudes
    seps = neighbour_separations(rng, count, *separation, clustering)
    angles = rng.uniform(0, 2 * np.pi, count)
    companion = np.zeros(count, dtype=bool)
    if companion_z is not None and clustering is not None and sky_z_ok(companion_z):
        w = clustering.w(np.maximum(seps, 0.1))
        companion = rng.random(count) < w / (1 + w)
    pools = {}
    for is_companion in (False, True):
        k = int(np.sum(companion == is_companion))
        if k:
            pool = _pool(sky, rng, k, lo, hi, (companion_z, COMPANION_DZ) if is_companion else None)
            if pool is None:
                raise InputError("delta_mag", f"the field has too few sources with {lo:.2f} <= m < {hi:.2f}", "widen the magnitude range")
            gal, stars = pool
            picks = iter(rng.choice(len(gal["z"]) + len(stars["mag"]), size=k, replace=False))
            pools[is_companion] = (gal, stars, picks)
    out = []
    for k in range(count):
        gal, stars, picks = pools[bool(companion[k])]
        i, name = int(next(picks)), f"{pair_prefix}-{k + 1}"
        n_g = len(gal["z"])
        s = sky.galaxy_source(gal, i, rng, name) if i < n_g else sky.star_source(stars, i - n_g, name)
        s.dec, s.ra = float(seps[k] * np.sin(angles[k])), float(seps[k] * np.cos(angles[k]))
        out.append(s)
    return out, seps


def sky_z_ok(z: float) -> bool:
    """Whether the field's galaxies reach redshift z (companions need a slice of them)."""
    return GALAXY_Z[0] + COMPANION_DZ <= z <= GALAXY_Z[1] - COMPANION_DZ


def write_field_fits(path: str | os.PathLike, field: MockField, card: ImageCard, *, saturate: float | None = None) -> Path:
    """Write `field` as one mosaic FITS file (module docstring), atomically (temp + rename)."""
    from astropy.io import fits

    if not isinstance(field, MockField):
        raise InputError("field", f"is a {type(field).__name__}, not a MockField", "pass what mock_field returns")
    names = [b.name for b in card.bands]
    if [b for b in field.bands if b not in names]:
        raise InputError("card", f"{card.name} has bands {names}, the field {field.bands}", "pass the card the field was made from")
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(str(path), "is in a folder that does not exist", "create the folder first")
    primary = fits.PrimaryHDU()
    primary.header["CARD"] = (card.name, "data card of the mock")
    primary.header["BANDS"] = (",".join(field.bands), "band names, one image HDU each")
    hdus = [primary]
    for b, name in enumerate(field.bands):
        h = fits.Header(field.header, copy=True)
        h["BUNIT"] = card.flux_unit
        h["FILTER"] = name
        h["PIXSCALE"] = (field.pixel_scale, "arcsec per pixel")
        h["WAVELEN"] = (field.wavelengths[b], "effective wavelength [Angstrom]")
        h["PSFFWHM"] = (float(field.meta["psf"]["fwhm_arcsec"][b]), "PSF FWHM [arcsec]")
        if saturate is not None:
            h["SATURATE"] = (float(saturate), f"saturation level [{field.flux_unit}]")
        h["EXTNAME"] = name  # through the header: astropy's name= would upper-case it (lookups ignore case)
        hdus.append(fits.ImageHDU(np.asarray(field.values[b], np.float32), header=h))
    for b, name in enumerate(field.bands):
        h = fits.Header(field.header, copy=True)
        h["BUNIT"] = f"{field.flux_unit}**-2"
        h["FILTER"] = name
        h["EXTNAME"] = f"IVAR_{name}"
        hdus.append(fits.ImageHDU(np.asarray(field.ivar[b], np.float32), header=h))
    hdus.append(fits.BinTableHDU(field.truth, name="TRUTH"))
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fits.HDUList(hdus).writeto(tmp)
        honour_umask(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def read_field_truth(path: str | os.PathLike):
    """The TRUTH table of a mosaic written by `write_field_fits` (astropy Table, with units)."""
    from astropy.io import fits
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "does not exist", "give the path of a mosaic written by write_field_fits")
    try:
        with fits.open(path) as hdul:
            if "TRUTH" not in hdul:
                raise InputError(str(path), "has no TRUTH extension", "write it with write_field_fits (cosmofm mock mosaic)")
            return Table.read(hdul["TRUTH"])
    except OSError as exc:
        raise InputError(str(path), f"is not a readable FITS file ({exc})", "give a mosaic written by write_field_fits") from None
