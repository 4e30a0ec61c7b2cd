"""`cosmofm detect`: an HI survey cube in, an SDC2 source catalogue out, tile by tile.

    detect_cube("sdc2_like.fits", "sources.fits")                            # SoFiA-style finder
    detect_cube("sdc2_like.fits", "sources.fits", model="runs/detection3d/model")
    cosmofm score sources.fits truth.fits                                     # reads it directly

The cube is read lazily (`data_cards.readers.mosaic.open_survey_cube`: FREQ or VRAD /
VOPT + RESTFRQ spectral axes through `readers.cubes.cube_info`; no spectral axis is an
InputError; blank voxels masked) and tiled over channels, rows and columns by
`finetune.tiling.run_tiled`. Finders:

* `SofiaFinder`: `heads.sofia_baseline.find_sources` on the tile, normalised by the whole
  cube's rms per channel (from the tile's ivar: `SurveyCube.noise`, SoFiA-2's default
  spectral noise scaling), so a source is found alike whatever the tiling; masked voxels
  (ivar 0) are blanked before it runs. Still per tile: the rms of each smoothed cube
  (over ~10^5+ voxels, < 1 % scatter) and the reliability density (the tile's positive
  and negative detections), which is where different tilings can still differ.
* a fine-tuned detection3d model: `load_task_model(model, expect_task="detection3d")` and
  its registered Task's `find_in_tile(model, values, ivar, header)`.

Catalogue (one row per source, in tile order): the SDC2 columns with units, id, ra, dec
[deg], hi_size [arcsec], line_flux_integral [Jy Hz], central_freq [Hz], pa, i [deg], w20
[km/s] (ra / dec / central_freq from the full cube's WCS at the centroid), then CHAN,
ROW, COL (0-based full-frame centroid [pix]) and the finder's snr / reliability when it
gives them. `cosmofm score` reads it as written.
"""

from __future__ import annotations

import time

import numpy as np
from astropy.io import fits
from astropy.table import Table

from cosmofm.data_cards.errors import InputError

DEFAULT_TILE = (256, 256, 256)  # channels, rows, columns: ~0.7 GB of SoFiA temporaries per worker
DEFAULT_OVERLAP = (64, 24, 24)  # half: 32 channels (~290 km/s at 1 GHz, 30 kHz) and 12 px (34 arcsec at 2.8"/px): a large HI disk
EXTRA_COLUMNS = ("snr", "reliability")


class SofiaFinder:
    """A tile finder (`finetune.tiling` contract) around `heads.sofia_baseline.find_sources`."""

    __name__ = "sofia finder"

    def __init__(self, config=None):
        from cosmofm.heads.sofia_baseline import SofiaConfig

        self.config = config or SofiaConfig()

    def __call__(self, values: np.ndarray, ivar: np.ndarray | None, header: fits.Header) -> Table:
        from cosmofm.heads.sofia_baseline import find_sources

        noise = None
        if ivar is not None:
            plane = ivar[:, 0, 0] if ivar.strides[1:] == (0, 0) else ivar.max(axis=(1, 2))  # (C,): a broadcast view holds one value per channel
            with np.errstate(divide="ignore"):
                noise = np.where(plane > 0, 1.0 / np.sqrt(plane), np.nan)  # the whole cube's rms per channel
            if not (ivar.strides[1:] == (0, 0)):
                values = np.where(ivar > 0, values, np.float32(np.nan))  # blanked: SoFiA zeroes NaN
        found = find_sources(values, header, self.config, noise=noise)
        return found[["CHAN", "ROW", "COL", *SDC2_PROPERTIES, *EXTRA_COLUMNS]]


SDC2_PROPERTIES = ("hi_size", "line_flux_integral", "pa", "i", "w20")


def catalogue_template() -> Table:
    """The detect catalogue's columns, in order, with units and no rows."""
    import astropy.units as u

    from cosmofm.heads.sdc2_score import SDC2_UNITS

    t = Table()
    t["id"] = np.zeros(0, np.int64)
    for name in ("ra", "dec", "hi_size", "line_flux_integral", "central_freq", "pa", "i", "w20"):
        t[name] = u.Quantity(np.zeros(0), SDC2_UNITS[name])
    for name in ("CHAN", "ROW", "COL"):
        t[name] = u.Quantity(np.zeros(0), u.pix)
    for name in EXTRA_COLUMNS:
        t[name] = np.zeros(0)
    return t


def _finish(table: Table, tile, values, ivar):
    """Pixel columns in pix; the tile frame's leftovers dropped."""
    for name in ("CHAN", "ROW", "COL"):
        table[name].unit = "pix"
    return table, None


def detect_cube(path, output, model=None, method: str | None = None, tile=DEFAULT_TILE, overlap=DEFAULT_OVERLAP, workers: int | None = None,
                progress: bool = True, overwrite: bool = False, card=None, rest_frequency=None, config=None) -> dict:
    """Find the HI sources of a spectral cube; write their SDC2 catalogue to `output`.

    model: a fine-tuned detection3d model, or None for a classical `method` ("sofia",
        default); both together are refused. tile, overlap: (channels, rows, columns) or
        one number for all; overlap / 2 should exceed the largest source's half-extent.
    card / rest_frequency: the cube's data card (default from the header: ska-hi-like)
        and the rest frequency for a velocity axis without RESTFRQ. config: SofiaConfig.

    Returns the tiler's summary plus "method", "notes" (the header conversions applied)
    and "noise_s" (the pass over the cube measuring its noise per channel, before the tiles).
    """
    from pathlib import Path

    from cosmofm.data_cards.readers.mosaic import open_survey_cube
    from cosmofm.finetune.deblend import model_finder
    from cosmofm.finetune.tiling import TilePlan, run_tiled

    if model is not None and method not in (None, "model"):
        raise InputError("method", f"{method!r} given with a model", "give either --model or --method")
    method = "model" if model is not None else (method or "sofia")
    if method == "model" and model is None:
        raise InputError("method", "'model' needs a model", "give --model PATH, or --method sofia")
    if method not in ("model", "sofia"):
        raise InputError("method", f"unknown detection method {method!r}", "use sofia (or --model)")
    cube = open_survey_cube(path, card, rest_frequency)
    if method == "model":
        finder, device = model_finder(model, "detection3d")
        processes = device.type == "cpu"
    else:
        finder, processes = SofiaFinder(config), True
    if "BMAJ" not in cube.tile_header((slice(0, 1),) * 3):
        raise InputError(str(path), "has no beam (BMAJ/BMIN)", "add the beam FWHM in degrees as BMAJ / BMIN to the header")
    plan = TilePlan(cube.shape, tile, overlap)
    t0 = time.perf_counter()
    noise = cube.noise  # one pass over the cube, here: forked workers inherit it instead of each measuring it again
    noise_s = time.perf_counter() - t0
    if not np.any(np.isfinite(noise) & (noise > 0)):
        raise InputError(str(path), "has no channel with a finite, non-zero noise (all blank or constant)", "give a cube with data")
    keywords = {"METHOD": (method, "source finder"), "INPUT": Path(path).name[:68]}
    if cube.rest_frequency:
        keywords["RESTFRQ"] = (cube.rest_frequency, "Hz, used for a velocity axis")
    for k, note in enumerate(cube.notes[:9]):
        keywords[f"NOTE{k}"] = note[:68]
    summary = run_tiled(cube, finder, output, plan, template=catalogue_template(), id_column="id", finish=_finish, keywords=keywords,
                        workers=workers, processes=processes, progress=progress, verb="detect", overwrite=overwrite, inputs=[path])
    return {**summary, "method": method, "notes": list(cube.notes), "noise_s": noise_s}


__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE", "SofiaFinder", "catalogue_template", "detect_cube"]
