"""Survey-like HI cubes after SKA SDC2 (Hartley et al. 2023): a wide cube with many
galaxies, its FITS header and an SDC2 truth catalogue (issue 21). The galaxy physics
and the renderer are cubes.py's and cube_render.py's; clustering, the primary-beam noise
pattern and flagged channels are cube_sky.py's. cubes.py re-exports this API.

* `mock_survey_cube(card, n_channels, size, ...)`: the cube in memory (Sample or
  float32 array), its header and the truth Table.
* `write_survey_cube_fits(path, cube, header, truth)`: one FITS file: the cube (primary
  HDU), the truth (BinTable TRUTH) and the noise map at the central channel (image NOISE).
* `write_large_survey_cube(path, card, n_channels, size, ...)`: the same file for a cube
  far larger than memory, made and written block of channels by block of channels
  (astropy StreamingHDU); it holds the same values as mock_survey_cube's cube.

Every voxel is computed in the cube's own frame, whatever the blocking: each galaxy is
rendered once as a stamp relative to channel 0 (cube_render.galaxy_stamp) and pasted into
the blocks it overlaps; the noise of channel c comes from its own generator (seed, c);
continuum residuals are per channel. So the in-memory and the block-wise cube agree bit
for bit, and peak memory is set by the block, not the cube.

Truth: the SDC2 columns and units (id, ra, dec [deg], hi_size [arcsec],
line_flux_integral [Jy Hz], central_freq [Hz], pa, i [deg], w20 [km/s]), then the model
columns of cubes.TRUTH_UNITS, `w20_rest` and `cluster` (group id, -1 = field).

w20 convention (fixed here, issue 21): the truth's `w20` is SDC2's "observed line width
at 20 percent of its peak" (sdc2.skao.int challenge description): an observer-frame
velocity width, w20 = c dnu_20 nu_rest / nu^2 = (1 + z) x the rest-frame width, which is
what heads/sdc2_score.py assumes when it turns w20 into a frequency window
(w20 nu^2 / (c nu_rest), after ska-sdc). `w20_rest` = w20 / (1 + z) is the galaxy's
intrinsic (rest-frame) width that draw_galaxies computes and mock_cube's chunk labels use
(the chunks are unchanged, their `w20` stays rest-frame). In Hz both give the same
observed width: w20 nu^2 / (c nu_rest) = w20_rest nu / c.

Continuum residuals (optional, `continuum_residual` > 0): point sources with a power-law
flux distribution and spectral index whose continuum was subtracted imperfectly: each
leaves `continuum_residual` x S(nu) x (a random quadratic in frequency), beam-shaped.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import Table

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import C_KMS, object_rng
from cosmofm.data_cards.mocks.cube_render import _add_noise, _beam_sigma_pix, galaxy_stamp, paste_stamp
from cosmofm.data_cards.mocks.cube_sky import (
    Clustering,
    PrimaryBeam,
    channel_ranges,
    clustered_positions,
    flag_channels,
    flag_header_keys,
    noise_scale,
    survey_noise,  # noqa: F401 (re-exported)
)
from cosmofm.data_cards.mocks.cube_sky import flagged_channels as header_flagged_channels
from cosmofm.data_cards.mocks.cubes import (
    BAND_WIDTH_HZ,
    FIELD_DEC,
    FIELD_RA,
    HI_REST_HZ,
    TRUTH_UNITS,
    _check_card,
    _comoving_volume_mpc3,
    _draw_redshifts,
    _pixel_to_world,
    _positive_int,
    _wcs_keys,
    draw_galaxies,
    hi_number_density,
)
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import CubeCard

# Continuum sources: dN/dS ~ S^-1.7 from 50 uJy to 1 Jy at 1.4 GHz, 5000 per deg^2.
CONT_DENSITY_DEG2, CONT_SMIN_JY, CONT_SMAX_JY, CONT_SLOPE = 5000.0, 50e-6, 1.0, -1.7
# Survey cubes: galaxies and placement from index 0, noise from index = channel.
_SURVEY_GALAXIES, _SURVEY_NOISE, _SURVEY_CONTINUUM, _SURVEY_PLACE = 30, 31, 32, 33
_SURVEY_CLUSTER, _SURVEY_FLAGS = 34, 35
# Truth columns of a survey cube: TRUTH_UNITS with w20 in the observer frame (SDC2), then
# the rest-frame width and the group id.
SURVEY_TRUTH_UNITS = {**TRUTH_UNITS, "w20": u.km / u.s, "w20_rest": u.km / u.s, "cluster": None}
W20_FRAME = "observed"  # of the truth's w20 (see the module docstring)


def w20_width_hz(w20, central_freq, rest_frequency: float = HI_REST_HZ):
    """Observed line width [Hz] of an SDC2 (observer-frame) w20 [km/s] at central_freq
    [Hz]: w20 nu^2 / (c nu_rest), the window heads/sdc2_score.py gives a truth source."""
    nu = np.asarray(central_freq, dtype=np.float64)
    return np.asarray(w20, dtype=np.float64) * nu**2 / (C_KMS * rest_frequency)


def w20_from_width_hz(width_hz, central_freq, rest_frequency: float = HI_REST_HZ):
    """The SDC2 (observer-frame) w20 [km/s] of a line width measured in Hz at central_freq:
    c dnu nu_rest / nu^2 (a finder's measured width -> the truth's convention)."""
    nu = np.asarray(central_freq, dtype=np.float64)
    return C_KMS * np.asarray(width_hz, dtype=np.float64) * rest_frequency / nu**2


def _truth_table(cols: dict[str, np.ndarray]) -> Table:
    t = Table()
    for name, unit in SURVEY_TRUTH_UNITS.items():
        t[name] = cols[name] if unit is None else u.Quantity(cols[name], unit)
    t["id"] = np.asarray(cols["id"], dtype=np.int64)
    t["cluster"] = np.asarray(cols["cluster"], dtype=np.int64)
    return t


# ---------------------------------------------------------------------------- header, continuum


def survey_header(card: CubeCard, n_channels: int, ny: int, nx: int, ra: float, dec: float, frequency_start: float) -> fits.Header:
    """A FITS header for a (n_channels, ny, nx) cube: RA---SIN / DEC--SIN / FREQ centred on (ra, dec) [deg].

    frequency_start is the centre of channel 0 [Hz]; pixel and channel steps, beam and rest
    frequency come from the card. RA decreases with pixel x (CDELT1 < 0), as on the sky.
    """
    h = fits.Header()
    for key, value in _wcs_keys(card, n_channels, ny, nx, ra, dec, frequency_start).items():
        h[key] = value
    h["TELESCOP"] = "SKA-MID (mock)"
    h["ORIGIN"] = "cosmofm"
    h["CARD"] = (card.name, "cosmofm data card")
    return h


def _add_continuum(canvas: np.ndarray, freq: np.ndarray, card: CubeCard, rng, level: float, area_deg2: float) -> list[dict]:
    """Imperfectly subtracted continuum point sources; returns their parameters."""
    nf, ny, nx = canvas.shape
    n = rng.poisson(CONT_DENSITY_DEG2 * area_deg2)
    a = CONT_SLOPE + 1.0
    s14 = (CONT_SMIN_JY**a + rng.uniform(0, 1, n) * (CONT_SMAX_JY**a - CONT_SMIN_JY**a)) ** (1 / a)  # Jy at 1.4 GHz
    index = rng.normal(-0.7, 0.25, n)
    poly = rng.normal(0.0, 1.0, (n, 3))
    px, py = rng.uniform(-0.5, nx - 0.5, n), rng.uniform(-0.5, ny - 0.5, n)
    sb = _beam_sigma_pix(card)
    r = int(np.ceil(4 * sb))
    mid = card.frequency_start.to_value(u.Hz) + BAND_WIDTH_HZ / 2
    xf = (freq - mid) / BAND_WIDTH_HZ  # the fit residual is smooth across the whole band
    out = []
    for k in range(n):
        resid = level * s14[k] * (freq / 1.4e9) ** index[k] * (poly[k, 0] + poly[k, 1] * xf + poly[k, 2] * xf**2)  # Jy, (F,)
        y0, y1 = max(0, int(py[k]) - r), min(ny, int(py[k]) + r + 2)
        x0, x1 = max(0, int(px[k]) - r), min(nx, int(px[k]) + r + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :]
        psf = np.exp(-0.5 * ((yy - py[k]) ** 2 + (xx - px[k]) ** 2) / sb**2)  # point source: peak Jy/beam = Jy
        canvas[:, y0:y1, x0:x1] += resid[:, None, None] * psf[None]
        out.append({"x": float(px[k]), "y": float(py[k]), "flux_1400": float(s14[k]), "spectral_index": float(index[k])})
    return out



# ---------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """Everything that fixes a survey cube's values before any voxel is made."""

    card: CubeCard
    shape: tuple[int, int, int]  # (F, H, W)
    freq: np.ndarray  # (F,) channel centres [Hz]
    header: fits.Header
    cols: dict  # truth columns (one array each)
    px: np.ndarray  # (N,) pixel x, y of each galaxy
    py: np.ndarray
    span: np.ndarray  # (N, 2) channels a galaxy's stamp may touch, [lo, hi) (a safe bound)
    seed: int
    noise: bool
    continuum_residual: float
    area_deg2: float
    flagged: np.ndarray  # flagged channel indices
    primary_beam: PrimaryBeam | None


def _option(value, cls, name):
    """None / False -> None, True -> cls(), an instance -> itself."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if not isinstance(value, cls):
        raise InputError(name, f"is a {type(value).__name__}, not a {cls.__name__}", f"pass True (defaults), None, or {cls.__name__}(...)")
    return value


def _plan(card, n_channels, size, n_sources, density, seed, log_mhi_min, frequency_start, ra, dec, noise,
          continuum_residual, clustering, primary_beam, flagged_channels) -> _Plan:
    _check_card(card)
    nf = _positive_int(n_channels, "n_channels")
    ny, nx = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    ny, nx = _positive_int(ny, "size"), _positive_int(nx, "size")
    if n_sources is not None and density is not None:
        raise InputError("n_sources", "given together with density", "give either n_sources or density (or neither for the HIMF's number)")
    if n_sources is not None and (isinstance(n_sources, bool) or not isinstance(n_sources, (int, np.integer)) or n_sources < 0):
        raise InputError("n_sources", f"must be an integer >= 0, got {n_sources!r}", "give a number of galaxies")
    if density is not None and not (np.isfinite(density) and density >= 0):
        raise InputError("density", f"must be >= 0 galaxies per deg^2, got {density!r}", "give a surface density in deg^-2")
    if not (np.isfinite(continuum_residual) and continuum_residual >= 0):
        raise InputError("continuum_residual", f"must be >= 0, got {continuum_residual!r}", "give a residual fraction such as 1e-3 (0 = off)")
    if isinstance(log_mhi_min, bool) or not isinstance(log_mhi_min, (int, float, np.integer, np.floating)) or not 6.0 <= log_mhi_min < 12.0:
        raise InputError("log_mhi_min", f"must be in [6, 12) (log10 Msun), got {log_mhi_min!r}", "give e.g. 8 (below the detection limit) or 9")
    clustering = _option(clustering, Clustering, "clustering")
    primary_beam = _option(primary_beam, PrimaryBeam, "primary_beam")
    dnu = card.channel_width.to_value(u.Hz)
    rest = card.rest_frequency.to_value(u.Hz)
    f0 = card.frequency_start.to_value(u.Hz) if frequency_start is None else float(frequency_start)
    freq = f0 + np.arange(nf) * dnu
    if not (f0 > 0 and freq[-1] + dnu / 2 < rest):
        raise InputError("frequency_start", f"the cube spans {f0:.6g}-{freq[-1]:.6g} Hz; it must lie between 0 and the rest frequency {rest:.6g} Hz", "choose frequencies of redshifted HI (z > 0)")
    flagged = flag_channels(object_rng(seed, 0, _SURVEY_FLAGS), nf, flagged_channels)

    header = survey_header(card, nf, ny, nx, ra, dec, f0)
    rng = object_rng(seed, 0, _SURVEY_GALAXIES)
    place = object_rng(seed, 0, _SURVEY_PLACE)
    scale_deg = card.pixel_scale.to_value(u.deg)
    area_deg2 = ny * nx * scale_deg**2
    z_lo, z_hi = rest / (freq[-1] + dnu / 2) - 1, rest / (freq[0] - dnu / 2) - 1
    if n_sources is None:
        mean = density * area_deg2 if density is not None else (
            hi_number_density(log_mhi_min) * _comoving_volume_mpc3(z_lo, z_hi, area_deg2 * (math.pi / 180) ** 2))
        n_sources = int(place.poisson(mean))
    n_src = int(n_sources)
    if clustering is None:
        px = place.uniform(-0.5, nx - 0.5, n_src)
        py = place.uniform(-0.5, ny - 0.5, n_src)
        nus = rest / (1 + _draw_redshifts(place, n_src, z_lo, z_hi))
        group = np.full(n_src, -1, dtype=np.int64)
    else:
        band = (freq[0] - dnu / 2, freq[-1] + dnu / 2)
        px, py, nus, group = clustered_positions(object_rng(seed, 0, _SURVEY_CLUSTER), n_src, nx, ny, scale_deg, rest, band, clustering)
    cols = draw_galaxies(rng, n_src, nus, card, log_mhi_min)
    cols["w20_rest"] = cols["w20"]
    cols["w20"] = cols["w20_rest"] * (1.0 + cols["z"])  # observer frame (SDC2)
    cols["id"] = np.arange(n_src)
    cols["cluster"] = group
    cols["ra"], cols["dec"] = _pixel_to_world(header, px, py)

    # Channels a stamp may touch: the line (v_flat, 5 % margin) plus galaxy_stamp's padding
    # (5 sigma_v + 2) and its FFT-size rounding (< 25 %); only used to pick the galaxies of
    # a block, so it only has to be safe.
    chan = (nus - f0) / dnu
    half = 1.05 * cols["v_flat"] / C_KMS * nus / dnu + 6 * cols["sigma_v"] / C_KMS * nus / dnu + 4
    lo = np.floor(chan - half) - 1
    span = np.stack([lo, lo + np.ceil(1.25 * (2 * half + 2)) + 4], axis=1)

    header["NSOURCES"] = (n_src, "HI galaxies in the truth catalogue")
    header["NOISE"] = (float(card.noise_per_channel) if noise else 0.0, "[Jy/beam] noise per channel at the centre")
    header["W20FRAME"] = (W20_FRAME, "truth w20: observer-frame width (SDC2)")
    for key, value in (primary_beam.header_keys() if primary_beam is not None else {}).items():
        header[key] = value
    if flagged.size:
        for key, value in flag_header_keys(flagged).items():
            header[key] = value
    return _Plan(card, (nf, ny, nx), freq, header, cols, px, py, span, seed, bool(noise), float(continuum_residual),
                 area_deg2, flagged, primary_beam)


def _render_block(plan: _Plan, b0: int, b1: int, stamps: dict) -> np.ndarray:
    """Channels [b0, b1) of the cube, float32 (b1 - b0, H, W). `stamps` caches the galaxy
    stamps across consecutive blocks (pass the same dict, blocks in order): each galaxy is
    rendered once, kept while later blocks may need it, then marked finished (False)."""
    nf, ny, nx = plan.shape
    card, cols = plan.card, plan.cols
    canvas = np.zeros((b1 - b0, ny, nx))
    for k in np.nonzero((plan.span[:, 1] > b0) & (plan.span[:, 0] < b1))[0]:
        if k not in stamps:  # None (wholly outside the cube) -> False: finished
            stamps[k] = galaxy_stamp(plan.shape, plan.freq[0], card, plan.px[k], plan.py[k], {name: cols[name][k] for name in cols}) or False
        if stamps[k] is not False:
            paste_stamp(canvas, *stamps[k], channel_offset=b0)
    for k, st in stamps.items():
        if st is not False and st[0][0] + st[1].shape[0] <= b1:
            stamps[k] = False  # finished: free the stamp, never render it again
    out = canvas.astype(np.float32)
    del canvas
    if plan.noise and card.noise_per_channel > 0:
        sub = out.astype(np.float64)
        # One generator per channel: deterministic whatever the blocking.
        planes = [(slice(c - b0, c - b0 + 1), object_rng(plan.seed, c, _SURVEY_NOISE)) for c in range(b0, b1)]
        scale = None if plan.primary_beam is None else (lambda s: noise_scale(plan.header, np.arange(s.start, s.stop) + b0))
        _add_noise(sub, card, planes, scale=scale)
        out = sub.astype(np.float32)
        del sub
    if plan.continuum_residual > 0:
        sub = np.zeros((b1 - b0, ny, nx))
        _add_continuum(sub, plan.freq[b0:b1], card, object_rng(plan.seed, 0, _SURVEY_CONTINUUM), plan.continuum_residual, plan.area_deg2)
        out += sub.astype(np.float32)
    flagged = plan.flagged[(plan.flagged >= b0) & (plan.flagged < b1)]
    out[flagged - b0] = np.nan
    return out


# ---------------------------------------------------------------------------- products


def mock_survey_cube(
    card: CubeCard,
    n_channels: int,
    size: int | tuple[int, int],
    n_sources: int | None = None,
    density: float | None = None,
    seed: int = 0,
    *,
    log_mhi_min: float = 9.0,
    frequency_start: float | None = None,
    ra: float = FIELD_RA,
    dec: float = FIELD_DEC,
    noise: bool = True,
    continuum_residual: float = 0.0,
    clustering: Clustering | bool | None = None,
    primary_beam: PrimaryBeam | bool | None = None,
    flagged_channels: float | list[int] | None = None,
    as_sample: bool = True,
):
    """A survey-like HI cube, its FITS header and its SDC2-style truth catalogue.

    Args:
        card: a CubeCard (pixel scale, beam, channel width, noise per channel, rest frequency).
        n_channels: channels of the cube.
        size: pixels on a side (int) or (ny, nx).
        n_sources: exactly this many galaxies; or
        density: galaxies per square degree (Poisson); with neither, the physical number:
            Poisson with mean n(M_HI >= 10^log_mhi_min) from the HIMF x the comoving volume.
        seed: everything is deterministic given the seed (noise per channel from its own
            stream, so a cube's noise does not depend on how it is blocked).
        log_mhi_min: lower HI mass limit [log10 Msun] of the galaxies drawn; 8 reaches
            well below SDC2-like detection limits (completeness then falls off with flux
            by itself), 9 (the default) keeps the cubes light.
        frequency_start: centre of channel 0 [Hz]; default the card's frequency_start.
        ra, dec: centre of the cube [deg] (default: an SDC2-like field at Dec -30).
        noise: add correlated noise at the card's noise_per_channel (False: noiseless).
        continuum_residual: fraction of each continuum source's flux left after
            continuum subtraction (0 = none; 1e-3 to 1e-2 are realistic).
        clustering: None (uniform positions), True (cube_sky.Clustering defaults) or a
            Clustering: grouped galaxies overlapping on the sky and in frequency.
        primary_beam: None (uniform noise), True (one SKA-MID pointing at the centre) or
            a cube_sky.PrimaryBeam: the noise rises as 1/PB away from the pointing(s).
        flagged_channels: None, a fraction of channels blanked in RFI runs, or a list of
            channel indices; those channels are NaN (and ivar 0).
        as_sample: return a Sample (values + ivar = 1/sigma^2 of the noise pattern, 0 in
            flagged channels, where the Sample holds 0, not NaN); False returns the
            float32 numpy cube (F, H, W) with NaN in flagged channels and saves the
            memory of the ivar array (`cube_sky.survey_noise(header)` gives sigma).

    Returns:
        (cube, header, truth): Sample or ndarray in Jy/beam; astropy.io.fits.Header with
        the WCS (RA---SIN, DEC--SIN, FREQ), BUNIT, BMAJ/BMIN/BPA, RESTFRQ, NSOURCES,
        NOISE, W20FRAME, the PB* keywords of the noise pattern and NFLAG/FLAGCHAN; truth
        Table with the SDC2 columns (id, ra, dec, hi_size, line_flux_integral,
        central_freq, pa, i, w20 [observer frame]) in units, then the model columns,
        w20_rest and cluster; truth.meta holds card, W20FRAME and FLAGCHAN (as the header).
    """
    plan = _plan(card, n_channels, size, n_sources, density, seed, log_mhi_min, frequency_start, ra, dec, noise,
                 continuum_residual, clustering, primary_beam, flagged_channels)
    nf, ny, nx = plan.shape
    cube = np.empty(plan.shape, dtype=np.float32)
    block = max(1, min(nf, int(2**22 // (ny * nx))))  # ~32 MB of float64 per block
    stamps: dict = {}
    for b0 in range(0, nf, block):
        cube[b0 : b0 + block] = _render_block(plan, b0, min(nf, b0 + block), stamps)
    truth = _truth(plan)
    if not as_sample:
        return cube, plan.header, truth
    scale = card.pixel_scale.to_value(u.arcsec)
    sigma = card.noise_per_channel
    if plan.primary_beam is None:
        ivar = np.full(cube.shape, 1 / sigma**2 if sigma > 0 else 1.0, dtype=np.float32)
    else:
        ivar = (1.0 / (sigma * noise_scale(plan.header, np.arange(nf))) ** 2).astype(np.float32) if sigma > 0 else np.ones(cube.shape, np.float32)
    ivar[plan.flagged] = 0.0
    sample = Sample(
        "cube", cube, ivar,
        {"frequency": plan.freq, "dec_offset": (np.arange(ny) - (ny - 1) / 2) * scale, "ra_offset": -(np.arange(nx) - (nx - 1) / 2) * scale},
        {"card": card.name, "id": f"{card.name}-survey-{seed}", "labels": {"n_sources": len(truth)},
         "wcs": _wcs_keys(card, nf, ny, nx, ra, dec, plan.freq[0]), "flagged_channels": [int(c) for c in plan.flagged]},
    )
    return sample, plan.header, truth


def _truth(plan: _Plan) -> Table:
    truth = _truth_table(plan.cols)
    truth.meta["card"] = plan.card.name
    truth.meta["W20FRAME"] = W20_FRAME  # FITS-safe keys: they become TRUTH header cards
    truth.meta["FLAGCHAN"] = channel_ranges(plan.flagged)  # cube_sky.flagged_channels(truth.meta) lists them
    return truth


def _extensions(header: fits.Header, truth: Table) -> list:
    """The TRUTH table and the NOISE image (sigma [Jy/beam] at the central channel)."""
    table = fits.table_to_hdu(truth)
    table.name = "TRUTH"
    out = [table]
    if "NOISE" in header:
        mid = int(header["NAXIS3"]) // 2
        noise = fits.ImageHDU(np.asarray(float(header["NOISE"]) * noise_scale(header, [mid])[0], dtype=np.float32), name="NOISE")
        noise.header["NOISECH"] = (mid, "channel of this map; all: cube_sky.survey_noise")
        noise.header["BUNIT"] = "Jy/beam"
        out.append(noise)
    return out


def _temp_for(path: Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(str(path), f"folder {path.parent} does not exist", "create the folder first")
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


def write_survey_cube_fits(path: str | os.PathLike, cube, header: fits.Header, truth: Table) -> Path:
    """Write a survey cube (Sample or (F, H, W) array) with its WCS header, the truth
    catalogue as a BinTable extension named TRUTH and (for mock_survey_cube headers) the
    noise map of the central channel as an image extension NOISE, to `path` atomically;
    returns the path.

    Usage: `write_survey_cube_fits("sdc2_like.fits", *mock_survey_cube(card, 256, 128))`.
    A Sample holds 0 in flagged channels; they are written as NaN again (header FLAGCHAN).
    """
    path = Path(path)
    tmp = _temp_for(path)
    values = cube.values if isinstance(cube, Sample) else np.asarray(cube, dtype=np.float32)
    expected = (header.get("NAXIS3"), header.get("NAXIS2"), header.get("NAXIS1"))
    if values.shape != expected:
        raise InputError(str(path), f"cube shape {values.shape} does not match the header's (NAXIS3, NAXIS2, NAXIS1) = {expected}", "pass the header made with this cube")
    data = np.array(values, dtype=np.float32)  # a copy: flagged channels are set below
    data[header_flagged_channels(header)] = np.nan
    primary = fits.PrimaryHDU(data=data, header=header.copy())
    try:
        fits.HDUList([primary, *_extensions(header, truth)]).writeto(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_large_survey_cube(
    path: str | os.PathLike,
    card: CubeCard,
    n_channels: int,
    size: int | tuple[int, int],
    *,
    n_sources: int | None = None,
    density: float | None = None,
    seed: int = 0,
    block_channels: int = 64,
    progress: bool = False,
    **options,
) -> Path:
    """Make a survey cube block of `block_channels` channels at a time and stream it into
    a FITS file (primary HDU, then TRUTH and NOISE as write_survey_cube_fits), atomically;
    returns the path. The values equal mock_survey_cube(card, n_channels, size, n_sources,
    density, seed, **options) exactly; peak memory is ~ block_channels x H x W x 24 bytes
    plus the catalogue, whatever n_channels.

    options: the keywords of mock_survey_cube (log_mhi_min, frequency_start, ra, dec,
    noise, continuum_residual, clustering, primary_beam, flagged_channels).
    """
    allowed = {"log_mhi_min", "frequency_start", "ra", "dec", "noise", "continuum_residual", "clustering", "primary_beam", "flagged_channels"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(unknown[0], "is not an option of survey cubes", f"use one of {sorted(allowed)}")
    kw = {"log_mhi_min": 9.0, "frequency_start": None, "ra": FIELD_RA, "dec": FIELD_DEC, "noise": True, "continuum_residual": 0.0,
          "clustering": None, "primary_beam": None, "flagged_channels": None, **options}
    block = _positive_int(block_channels, "block_channels")
    plan = _plan(card, n_channels, size, n_sources, density, seed, **kw)
    tmp = _temp_for(Path(path))
    nf = plan.shape[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=nf, unit="ch", desc=f"survey cube {plan.shape}")
    try:
        nf, ny, nx = plan.shape
        primary = fits.Header([("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 3), ("NAXIS1", nx), ("NAXIS2", ny), ("NAXIS3", nf)])
        primary.extend(plan.header, update=True)
        stream = fits.StreamingHDU(tmp, primary)
        try:
            stamps: dict = {}
            for b0 in range(0, nf, block):
                b1 = min(nf, b0 + block)
                stream.write(_render_block(plan, b0, b1, stamps))
                if bar is not None:
                    bar.update(b1 - b0)
        finally:
            stream.close()
        with fits.open(tmp, mode="append", memmap=True) as hdul:
            for hdu in _extensions(plan.header, _truth(plan)):
                hdul.append(hdu)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return Path(path)


