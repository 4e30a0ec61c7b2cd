"""`cosmofm detect`: an HI survey cube in, an SDC2 source catalogue out, tile by tile.

    detect_cube("sdc2_like.fits", "sources.fits")                            # SoFiA-style finder
    detect_cube("sdc2_like.fits", "sources.fits", model="runs/detection3d/model")
    cosmofm score sources.fits truth.fits                                     # reads it directly

The cube is read lazily (`data_cards.readers.mosaic.open_survey_cube`: FREQ or VRAD /
VOPT + RESTFRQ spectral axes through `readers.cubes.cube_info`; no spectral axis is an
InputError; blank voxels masked) and tiled over channels, rows and columns by
`finetune.tiling.run_tiled`. Finders:

* `SofiaFinder`: `heads.sofia_baseline.find_sources` on the tile with `SOFIA_TUNED` (the
  config tuned on training survey cubes by SDC2 score, `bench/sofia_tuning.py`; pass
  `config=SofiaConfig()` / `cosmofm detect --sofia-defaults` for SoFiA's defaults). Tiling
  invariant like SoFiA-2 on the whole cube: every tile is normalised by the whole cube's
  rms per channel (from the tile's ivar: `SurveyCube.noise`), clips each smoothed cube at
  the whole cube's rms of that kernel (`cube_kernel_rms`, measured once in the parent on
  blocks spread over the cube), and returns all its candidates (positive and negative);
  after the tiles, one reliability density over every tile's candidates and the R /
  S/N cuts (`_reliability_pass`: `apply_reliability`). A source lying whole (with its
  kernels' reach) inside the tiles that hold it is thus measured identically, whatever the
  tiling. Masked voxels (ivar 0) are blanked before it runs.
* a fine-tuned detection3d model: `load_task_model(model, expect_task="detection3d")` and
  its registered Task's `find_in_tile(model, values, ivar, header)`, through `HeadFinder`,
  which holds the speed options (`head_block`: the network on training-size blocks of a
  large tile; `prefilter`: only blocks with smooth-and-clip candidates; `bf16`), each
  tested against the plain call (tests/test_detect_speed.py). With a purity cut
  (`reliability`, the model's or given) the head also runs on the sign-flipped blocks
  and, after the tiles, one cut over the whole cube keeps the detections above the lowest
  threshold at which the flipped cube's (noise) detections are at most a (1 - reliability)
  share (`detection3d_post.reliability_cut`), as the sofia finder's reliability pass.

Catalogue (one row per source, in tile order): the SDC2 columns with units, id, ra, dec
[deg], hi_size [arcsec], line_flux_integral [Jy Hz], central_freq [Hz], pa, i [deg], w20
[km/s] (ra / dec / central_freq from the full cube's WCS at the centroid), then CHAN,
ROW, COL (0-based full-frame centroid [pix]) and the finder's snr / reliability when it
gives them. `cosmofm score` reads it as written.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from cosmofm.data_cards.errors import InputError

DEFAULT_TILE = (256, 256, 256)  # channels, rows, columns: ~0.7 GB of SoFiA temporaries per worker
DEFAULT_OVERLAP = (64, 24, 24)  # half: 32 channels (~290 km/s at 1 GHz, 30 kHz) and 12 px (34 arcsec at 2.8"/px): a large HI disk


class _ModelDefault:
    """The sentinel of detect_cube's head_block / prefilter / bf16: the model's recorded option
    (its own type, so no value a caller passes, None included, can be taken for it)."""

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


MODEL_DEFAULT = _ModelDefault()
EXTRA_COLUMNS = ("snr", "reliability")


class SofiaFinder:
    """A tile finder (`finetune.tiling` contract) around `heads.sofia_baseline.find_sources`.

    config: SofiaConfig (default `SOFIA_TUNED`). kernel_rms: each smoothing kernel's clip
    rms measured once over the cube (`cube_kernel_rms`), None = the tile's own.
    candidates: return every candidate with the reliability inputs
    (`find_sources(candidates=True)`), for one reliability cut over all tiles
    (`apply_reliability`, done by `detect_cube`); False cuts per tile."""

    __name__ = "sofia finder"

    def __init__(self, config=None, kernel_rms=None, candidates: bool = False):
        from cosmofm.heads.sofia_baseline import SOFIA_TUNED

        self.config = config or SOFIA_TUNED
        self.kernel_rms = kernel_rms
        self.candidates = candidates

    def __call__(self, values: np.ndarray, ivar: np.ndarray | None, header: fits.Header) -> Table:
        from cosmofm.heads.sofia_baseline import CANDIDATE_COLUMNS, find_sources

        values, noise = _blanked(values, ivar)
        found = find_sources(values, header, self.config, noise=noise, kernel_rms=self.kernel_rms, candidates=self.candidates)
        return found[["CHAN", "ROW", "COL", *SDC2_PROPERTIES, *EXTRA_COLUMNS, *(CANDIDATE_COLUMNS if self.candidates else ())]]


# The head's speed path (issue 21). The network runs on blocks of the shape it was trained on
# (`HeadFinder.block`: 64 x 32 x 32 voxels, 16 x 8 x 8 overlap) inside tiles read large (a
# FITS section costs ~one read per (channel, row): 64 x 32 x 32 tiles spent 44 % of the run
# reading), and a block goes through the network only when a cheap smooth-and-clip
# (`prefilter_config`: SoFiA's kernels without its linking, reliability and parameters) finds
# a voxel of candidate emission in its core grown by half the overlap: empty sky, most of a
# survey cube, is skipped. The clip is a trade: on noise the fraction of blocks that fire
# falls steeply between 4.75 and 5 rms (24 % -> 6 %: many correlated kernels, many voxels),
# while the head's faintest true detections (expected S/N ~4) lie near it.
# Kernels: none and the beam (3 px FWHM) spatially, SOFIA_TUNED's boxcars spectrally, so every
# line width the head sees has its kernel. Clip 5 (docs/benchmarks.md, 3D detection head): on
# three held-out 256 x 128^2 cubes the blocks of 4 of the head's 104 true detections went unrun
# (clip 4.75: 3, with 24 % of a sparse cube's blocks run on noise instead of 6 %).
PREFILTER_SPATIAL = (0.0, 3.0)  # Gaussian FWHM [pixels]; 0 = none
PREFILTER_WIDTHS = (0, 3, 7, 15, 31)  # boxcars [channels]
PREFILTER_CLIP = 5.0  # [rms of each smoothed cube], the benchmarks' `--prefilter 5` (off unless asked for)
HEAD_BLOCK = (64, 32, 32)  # the bench's training tile (scripts/bench/detect_quality.py --tile)
HEAD_BLOCK_OVERLAP = (16, 8, 8)


def prefilter_config(clip: float):
    """The prefilter's SofiaConfig: `PREFILTER_SPATIAL` x `PREFILTER_WIDTHS` kernels, clip at `clip` rms."""
    from cosmofm.heads.sofia_baseline import SofiaConfig

    if not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and 0 < clip < 50):
        raise InputError("prefilter", f"is {clip!r}", "give a clip level in rms of each smoothed cube, e.g. 5 (or leave it out)")
    return SofiaConfig(spatial_fwhm=PREFILTER_SPATIAL, spectral_width=PREFILTER_WIDTHS, threshold=float(clip))


class HeadFinder:
    """A tile finder (`finetune.tiling` contract) for a detection3d model: the tile is cut
    into `block`s overlapping by `block_overlap` (`TilePlan`, as the tiler cuts the cube)
    and each block that passes the prefilter goes through the registered Task's
    `find_in_tile`; a detection is kept by the block whose core holds it (`Tile.holds`).
    The duplicates blocks leave at their edges go where the tiles' do: `merge_catalogue`
    over the whole cube in `detect_cube`.

    block: None = the whole tile, one `find_in_tile` (the readable path the options are
        tested against). prefilter: a SofiaConfig (`prefilter_config`) or None (every block
        runs); kernel_rms: its kernels' clip rms over the whole cube (`cube_kernel_rms`).
    bf16: bfloat16 autocast in the forward (`find_in_tile(bf16=True)`).
    negatives: also run the network on the sign-flipped block (HI lines are emission only,
        so every detection there is noise or an artefact), where the prefilter's negative
        mask fires (the positive one's mirror, so both signs see the same noise); rows get
        a `sign` column (+1, -1) for the purity cut over the whole cube
        (`detection3d_post.reliability_cut`, done by `detect_cube`).
    Counts in `stats` (blocks, blocks_run, blocks_run_negative, seconds_prefilter,
    seconds_network): this process's only (forked workers keep theirs; launched, `detect_cube`
    sums them over the ranks); the flipped blocks run over every worker, which the purity
    cut's noise prior scales by: `negative_blocks_run()` (launched: summed over the ranks too)."""

    __name__ = "detection3d model"

    def __init__(self, model, block=HEAD_BLOCK, block_overlap=HEAD_BLOCK_OVERLAP, prefilter=None, kernel_rms=None, bf16: bool = False,
                 negatives: bool = False, merge: bool = True):
        from cosmofm.heads.base import task_class

        self.model = model.eval()
        self.task = task_class(model.task_type)(model.head_config)
        self.block = None if block is None else tuple(int(b) for b in block)
        self.block_overlap = tuple(int(b) for b in block_overlap) if isinstance(block_overlap, (tuple, list)) else (int(block_overlap),) * 3
        self.prefilter, self.kernel_rms, self.bf16, self.negatives, self.merge = prefilter, kernel_rms, bool(bf16), bool(negatives), bool(merge)
        self.stats = {"blocks": 0, "blocks_run": 0, "blocks_run_negative": 0, "seconds_prefilter": 0.0, "seconds_network": 0.0}
        self.threads = None  # torch threads to use where it runs (set by detect_cube for worker processes)
        self._negative_blocks = multiprocessing.Value("q", 0)  # shared memory: forked workers add to it too

    def negative_blocks_run(self) -> int:
        """The sign-flipped blocks the network ran on, summed over this process and its forked workers."""
        return int(self._negative_blocks.value)

    def candidates(self, values: np.ndarray, ivar: np.ndarray | None) -> np.ndarray:
        """(C, H, W) bool: voxels of the prefilter's positive smooth-and-clip mask."""
        return self.masks(values, ivar)[0]

    def masks(self, values: np.ndarray, ivar: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) bool each: the prefilter's positive and negative smooth-and-clip masks
        (`sofia_baseline.smooth_and_clip`; the S/N from the whole cube's noise per channel,
        or the tile's own rms per channel without ivar)."""
        from cosmofm.heads.sofia_baseline import _robust_rms, smooth_and_clip

        blanked, noise = _blanked(values, ivar)
        valid = np.isfinite(blanked)
        clean = np.where(valid, blanked, np.float32(0.0))
        if noise is None:
            noise = _robust_rms(clean.reshape(len(clean), -1), axis=1)
        inv = np.where(np.isfinite(noise) & (noise > 0), 1.0 / np.where(noise > 0, noise, 1.0), 0.0).astype(np.float32)
        return smooth_and_clip(clean * inv[:, None, None], self.prefilter, None if valid.all() else valid, self.kernel_rms)

    def __call__(self, values: np.ndarray, ivar: np.ndarray | None, header: fits.Header) -> Table:
        import torch

        from cosmofm.finetune.tiling import TilePlan
        from cosmofm.heads.detection3d import _COLUMNS, _table
        from cosmofm.heads.detection3d_data import tile_header
        from cosmofm.heads.sofia_baseline import _frequency_wcs

        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if self.block is None and self.prefilter is None and not self.negatives:
            return self.task.find_in_tile(self.model, values, ivar, header, bf16=self.bf16, merge=self.merge)
        t0 = time.perf_counter()
        signs = (1, -1) if self.negatives else (1,)
        masks = self.masks(values, ivar) if self.prefilter is not None else (None, None)
        self.stats["seconds_prefilter"] += time.perf_counter() - t0
        shape = values.shape
        plan = TilePlan(shape, self.block or shape, self.block_overlap if self.block else 0)
        tile_wcs = _frequency_wcs(header)[0]  # once per tile; each block's is it shifted (as `tile_header` shifts CRPIX)
        parts = []
        for b in plan:
            self.stats["blocks"] += 1
            grown = tuple(slice(max(0, int(lo) - o // 2) if np.isfinite(lo) else 0, min(n, int(hi) + o // 2) if np.isfinite(hi) else n)
                          for (lo, hi), o, n in zip(b.core, self.block_overlap if self.block else (0, 0, 0), shape))
            for sign, mask in zip(signs, masks):
                if mask is not None and not mask[grown].any():
                    continue
                self.stats["blocks_run" if sign > 0 else "blocks_run_negative"] += 1
                if sign < 0:
                    with self._negative_blocks.get_lock():
                        self._negative_blocks.value += 1
                t0 = time.perf_counter()
                w = tile_wcs.deepcopy()
                w.wcs.crpix = np.asarray(w.wcs.crpix) - np.array(b.origin[::-1], float)  # (x, y, spectral) = (col, row, chan)
                w.wcs.set()
                block = values[b.read] if sign > 0 else -values[b.read]
                found = self.task.find_in_tile(self.model, block, None if ivar is None else ivar[b.read], tile_header(header, *b.origin, b.shape),
                                               bf16=self.bf16, wcs=w, columns=True, merge=self.merge)
                self.stats["seconds_network"] += time.perf_counter() - t0
                for ax, name in enumerate(("CHAN", "ROW", "COL")):
                    found[name] = np.asarray(found[name], np.float64) + b.origin[ax]
                keep = b.holds(np.column_stack([found[n] for n in ("CHAN", "ROW", "COL")]))
                parts.append({**{k: np.asarray(v)[keep] for k, v in found.items()}, "sign": np.full(int(keep.sum()), sign, np.int64)})
        # one Table per tile; every block skipped: the empty catalogue with the head's columns
        table = _table({c.name: np.concatenate([p[c.name] for p in parts]) if parts else np.zeros(0) for c in _COLUMNS})
        if self.negatives:
            table["sign"] = np.concatenate([p["sign"] for p in parts]) if parts else np.zeros(0, np.int64)
        return table


def _blanked(values: np.ndarray, ivar: np.ndarray | None):
    """(values with masked voxels NaN, the whole cube's rms per channel from ivar or None)."""
    if ivar is None:
        return values, None
    broadcast = ivar.strides[1:] == (0, 0)  # a broadcast view holds one value per channel
    plane = ivar[:, 0, 0] if broadcast else ivar.max(axis=(1, 2))  # (C,)
    with np.errstate(divide="ignore"):
        noise = np.where(plane > 0, 1.0 / np.sqrt(plane), np.nan)  # the whole cube's rms per channel
    if not broadcast:
        values = np.where(ivar > 0, values, np.float32(np.nan))  # blanked: SoFiA zeroes NaN
    return values, noise


def cube_kernel_rms(cube, config) -> np.ndarray:
    """Each smoothing kernel's clip rms over the whole cube (`sofia_baseline.kernel_noise`
    on the `noise_blocks` regions, read from the file and normalised by the cube's noise
    per channel), measured once in the parent so that every tile clips alike."""
    from cosmofm.heads.sofia_baseline import kernel_noise, noise_blocks

    def blocks():
        for region in noise_blocks(cube.shape, config):
            values, noise = _blanked(*cube.read(region))
            values = np.asarray(values, np.float32)
            valid = np.isfinite(values)
            inv = np.where(np.isfinite(noise) & (noise > 0), 1.0 / np.where(noise > 0, noise, 1.0), 0.0).astype(np.float32) if noise is not None else np.float32(1.0)
            norm = np.where(valid, values, np.float32(0.0)) * (inv[:, None, None] if noise is not None else inv)
            yield norm, (None if valid.all() else valid)

    return kernel_noise(blocks(), config)


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


NOISE_MODES = ("auto", "channel", "local")


def field_noise(cube, mode: str, ranks=None) -> dict:
    """Measure the noise pattern across the field of `cube` (`readers.cube_noise`) and, for
    mode "local" or "auto" with a spread above SPREAD_TO_APPLY, set it on the cube (its reads
    are then divided by it). Returns {"mode", "spread", "applied"}."""
    from cosmofm.data_cards.readers.cube_noise import SPREAD_TO_APPLY, NoisePattern, measure_noise_pattern
    from cosmofm.finetune.tiling_dist import from_main

    if mode not in NOISE_MODES:
        raise InputError("noise", f"is {mode!r}", f"use one of {', '.join(NOISE_MODES)}")
    if mode == "channel":
        return {"mode": mode, "spread": None, "applied": False}
    pattern = NoisePattern(from_main(ranks, lambda: measure_noise_pattern(cube).cells), tuple(cube.shape[1:]))
    applied = mode == "local" or pattern.spread > SPREAD_TO_APPLY
    cube.noise_pattern = pattern if applied else None
    return {"mode": mode, "spread": pattern.spread, "applied": applied}


def _rescaled_fluxes(finish, pattern):
    """`finish`, then the fluxes measured on the pattern-divided cube multiplied back by the pattern at each source."""
    def run(table: Table, tile, values, ivar):
        table, cut = finish(table, tile, values, ivar)
        if len(table):
            table["line_flux_integral"] = table["line_flux_integral"] * pattern.at(np.asarray(table["ROW"]), np.asarray(table["COL"]))
        return table, cut
    return run


def detect_cube(path, output, model=None, method: str | None = None, tile=DEFAULT_TILE, overlap=DEFAULT_OVERLAP, workers: int | None = None,
                progress: bool = True, overwrite: bool = False, card=None, rest_frequency=None, config=None,
                head_block=MODEL_DEFAULT, prefilter=MODEL_DEFAULT, bf16=MODEL_DEFAULT, head_threads: int | None = None,
                reliability: float | None = None, noise: str = "auto") -> dict:
    """Find the HI sources of a spectral cube; write their SDC2 catalogue to `output`.

    model: a fine-tuned detection3d model, or None for a classical `method` ("sofia",
        default); both together are refused. tile, overlap: (channels, rows, columns) or
        one number for all; overlap / 2 should exceed the largest source's half-extent.
    card / rest_frequency: the cube's data card (default from the header: ska-hi-like)
        and the rest frequency for a velocity axis without RESTFRQ. config: SofiaConfig
        (default `SOFIA_TUNED`; `SofiaConfig()` for SoFiA's defaults).
    head_block, prefilter, bf16: how the network runs (`HeadFinder`): on blocks of
        `head_block` (C, H, W) voxels overlapping by `overlap` inside each tile (None: on the
        whole tile; `HEAD_BLOCK` is the bench's training tile), only those with candidate
        emission at the `prefilter` clip level (rms; None: all), under bfloat16 autocast.
        `MODEL_DEFAULT` (the default): the model's recorded option (`model_inference`).
        head_threads: torch threads in each worker (None: the cores over the workers).
    reliability: the model's purity cut (`Detection3DHeadConfig.reliability`; None: the
        model's own, 0: off): the head runs on the sign-flipped cube too (`HeadFinder(negatives=True)`)
        and the catalogue keeps the detections above the lowest threshold whose purity,
        estimated from the flipped cube's detections, reaches it (`detection3d_post.reliability_cut`),
        with the model's `noise_prior` (its count part only where this run's prefilter and
        head_block are the ones it was measured with).
    noise: "channel" (the noise per channel over the whole cube, as SoFiA-2's default),
        "local" (also its pattern across the field divided out, `readers.cube_noise`: a
        primary-beam corrected cube; fluxes are scaled back at each source) or "auto"
        (local where the measured pattern's p90 / p10 exceeds `SPREAD_TO_APPLY`).

    Returns the tiler's summary plus "method", "notes" (the header conversions applied),
    "noise_pattern" (its spread and whether it was divided out) and "noise_s" (the passes
    over the cube before the tiles: its noise per channel and pattern and, for sofia, each
    kernel's clip rms); for sofia also "n_candidates" (the tiles' S+C
    candidates, positive and negative) and "reliability_s" (the cut over all of them);
    for a model with a reliability cut "reliability" (`reliability_cut`'s summary).

    Launched (accelerate launch / torchrun: `finetune.tiling_dist`) every rank runs its share
    of the tiles (the network on the rank's device); the passes over the whole cube (noise,
    clip rms) run on rank 0 and go to every rank, the flipped blocks and `head_stats` are
    summed over the ranks, the cut / merge over the catalogue runs on rank 0, and every rank
    returns the same summary: the one-process catalogue, written once.
    """

    from cosmofm.data_cards.readers.mosaic import open_survey_cube
    from cosmofm.finetune.predict import check_output
    from cosmofm.finetune.tiling import TilePlan, run_tiled
    from cosmofm.finetune.tiling_dist import from_main, launched_ranks, on_main

    if model is not None and method not in (None, "model"):
        raise InputError("method", f"{method!r} given with a model", "give either --model or --method")
    if model is not None and config is not None:
        raise InputError("config", "a SoFiA config given with a model", "leave out --sofia-defaults (config) with --model")
    if model is None and reliability is not None:
        raise InputError("reliability", "given without a model", "give --model (the sofia finder's reliability cut is part of its config)")
    method = "model" if model is not None else (method or "sofia")
    if method == "model" and model is None:
        raise InputError("method", "'model' needs a model", "give --model PATH, or --method sofia")
    if method not in ("model", "sofia"):
        raise InputError("method", f"unknown detection method {method!r}", "use sofia (or --model)")
    cube = open_survey_cube(path, card, rest_frequency)
    if "BMAJ" not in cube.tile_header((slice(0, 1),) * 3):
        raise InputError(str(path), "has no beam (BMAJ/BMIN)", "add the beam FWHM in degrees as BMAJ / BMIN to the header")
    plan = TilePlan(cube.shape, tile, overlap)
    check_output(Path(output), [Path(path)], [Path(path)], overwrite)
    ranks = launched_ranks()  # None: one process; launched: the passes over the whole cube run on rank 0 (finetune.tiling_dist)
    t0 = time.perf_counter()
    if ranks is not None:
        cube._noise = from_main(ranks, lambda: cube.noise)  # rank 0's pass, sent to every rank (SurveyCube.noise keeps it)
    channel_noise = cube.noise  # one pass over the cube, here: forked workers inherit it instead of each measuring it again
    if not np.any(np.isfinite(channel_noise) & (channel_noise > 0)):
        raise InputError(str(path), "has no channel with a finite, non-zero noise (all blank or constant)", "give a cube with data")
    pattern_info = field_noise(cube, noise, ranks)
    noise_s = time.perf_counter() - t0
    template = catalogue_template()
    merge = rel = 0.0
    if method == "model":
        from cosmofm.finetune.task_predict import load_task_model

        model = load_task_model(model, expect_task="detection3d")
        if ranks is not None:
            model.to(ranks.device)  # the rank's GPU (cuda:LOCAL_RANK with nccl), or the CPU (gloo)
        head_block, block_overlap, prefilter, bf16 = model_inference(model, head_block, prefilter, bf16)
        pre = None
        if prefilter is not None:
            pre = prefilter_config(prefilter)
            t0 = time.perf_counter()
            kernel_rms = from_main(ranks, lambda: cube_kernel_rms(cube, pre))  # the whole cube's clip levels, as sofia's
            noise_s += time.perf_counter() - t0
        rel = float(getattr(model.head_config, "reliability", 0.0)) if reliability is None else float(reliability)
        if not 0 <= rel < 1:
            raise InputError("reliability", f"is {reliability!r}", "give a purity in [0, 1), e.g. 0.9 (0 = off)")
        merge = float(getattr(model.head_config, "merge_factor", 0.0))  # the head's duplicates across tiles: one merge over the cube
        # The merge over the whole catalogue (the scorer's window in world units) replaces the
        # per-tile one (pixel units, a little wider): a catalogue is then the floor catalogue
        # thresholded and merged, which is what `calibrate_catalogues` chose the threshold on.
        finder = HeadFinder(model, head_block, block_overlap or plan.overlap, prefilter=pre, kernel_rms=kernel_rms if pre is not None else None, bf16=bf16,
                            negatives=rel > 0, merge=False)
        if rel > 0:
            template["sign"] = np.zeros(0, np.int64)
        device = next(model.parameters()).device
        processes = device.type == "cpu"
        if processes:  # forked workers share the cores (a launched rank's: its share of the node's): each gets its part
            from cosmofm.data_cards.workers import cores, n_workers

            budget, n = (cores(), min(n_workers(workers), len(plan))) if ranks is None else (ranks.cores, ranks.workers(workers, len(ranks.tiles(plan))))
            finder.threads = head_threads or max(1, budget // max(1, n))
        target = Path(output)
        if merge > 0 or rel > 0:
            target = Path(output).parent / f".{Path(output).name}.candidates{Path(output).suffix}"
    else:
        from cosmofm.heads.sofia_baseline import CANDIDATE_COLUMNS, SOFIA_TUNED

        config = config or SOFIA_TUNED
        t0 = time.perf_counter()
        kernel_rms = from_main(ranks, lambda: cube_kernel_rms(cube, config))  # the whole cube's clip levels, as the noise
        noise_s += time.perf_counter() - t0
        finder, processes = SofiaFinder(config, kernel_rms=kernel_rms, candidates=True), True
        for name in CANDIDATE_COLUMNS:
            template[name] = np.zeros(0, np.int64 if name == "sign" else np.float64)
        target = Path(output).parent / f".{Path(output).name}.candidates{Path(output).suffix}"  # then one reliability cut
    keywords = {"METHOD": (method, "source finder"), "INPUT": Path(path).name[:68]}
    if cube.rest_frequency:
        keywords["RESTFRQ"] = (cube.rest_frequency, "Hz, used for a velocity axis")
    for k, note in enumerate(cube.notes[:9]):
        keywords[f"NOTE{k}"] = note[:68]
    try:
        finish = _finish if cube.noise_pattern is None else _rescaled_fluxes(_finish, cube.noise_pattern)
        summary = run_tiled(cube, finder, target, plan, template=template, id_column="id", finish=finish, keywords=keywords,
                            workers=workers, processes=processes, progress=progress, verb="detect", overwrite=True if target != Path(output) else overwrite,
                            inputs=[path])
        negatives = finder.negative_blocks_run() if isinstance(finder, HeadFinder) else 0
        if ranks is not None and isinstance(finder, HeadFinder):  # each rank counted its own blocks
            finder.stats, negatives = ranks.sum(finder.stats), ranks.sum(negatives)
        blocks = None if head_block is None or not isinstance(finder, HeadFinder) else (head_block, finder.block_overlap)
        summary = on_main(ranks, _whole_cube_pass, summary, method, cube, model, merge, rel, prefilter, blocks, negatives, config, target, Path(output))
        if ranks is not None:
            summary["rank"] = ranks.rank  # rank 0's summary, this rank's place in the launch
    finally:
        if target != Path(output) and (ranks is None or ranks.main):
            target.unlink(missing_ok=True)
    extra = {"head_stats": dict(finder.stats), "head_options": {"head_block": None if head_block is None else list(head_block),
                                                                "block_overlap": list(finder.block_overlap) if head_block is not None else None,
                                                                "prefilter": prefilter, "bf16": bool(bf16)}} if isinstance(finder, HeadFinder) else {}
    return {**summary, "method": method, "notes": list(cube.notes), "noise_pattern": pattern_info, "noise_s": noise_s, **extra}


def model_inference(model, head_block=MODEL_DEFAULT, prefilter=MODEL_DEFAULT, bf16=MODEL_DEFAULT) -> tuple:
    """(head_block, block_overlap, prefilter, bf16) for a run: each given option as given, each
    left at `MODEL_DEFAULT` from the model's `Detection3DHeadConfig.inference` (absent: whole
    tile, every block, float32). block_overlap: the recorded one with the recorded head_block,
    else None (the blocks overlap as the tiles do). A recorded bf16 applies only where the model's device computes
    bfloat16 natively (CUDA, or a CPU with AVX512-BF16 / AMX): elsewhere autocast emulates it
    at several times float32's cost, for a catalogue that float32 gives within a tolerance."""
    from cosmofm.heads.redshift_net_cpu import native_bf16_on

    recorded = getattr(model.head_config, "inference", {}) or {}
    block_overlap = None
    if head_block is MODEL_DEFAULT:
        head_block, block_overlap = recorded.get("head_block"), recorded.get("block_overlap")
    if prefilter is MODEL_DEFAULT:
        prefilter = recorded.get("prefilter")
    if bf16 is MODEL_DEFAULT:
        bf16 = bool(recorded.get("bf16", False)) and native_bf16_on(next(model.parameters()).device)
    return (None if head_block is None else tuple(head_block)), (None if block_overlap is None else tuple(block_overlap)), prefilter, bool(bf16)


def _whole_cube_pass(summary: dict, method, cube, model, merge, rel, prefilter, blocks, negatives: int, config, target: Path, output: Path) -> dict:
    """After the tiles: the head's merge / purity cut, or sofia's reliability cut, over the whole
    catalogue (`_reliability_pass`) from the tiles' `target` into `output`; the summary updated.
    blocks: the head's (head_block, block_overlap) this run, None for whole tiles."""
    if method == "model" and (merge > 0 or rel > 0):
        from cosmofm.heads.detection3d_post import merge_catalogue, reliability_cut

        hdr = cube.tile_header((slice(0, 1),) * 3)
        beam = float(np.sqrt(hdr["BMAJ"] * hdr["BMIN"]) * 3600.0)
        t0 = time.perf_counter()
        summary["n_candidates"] = summary["n_sources"]
        if rel > 0:
            prior = dict(getattr(model.head_config, "noise_prior", {}) or {})
            head_block, block_overlap = blocks or (None, None)
            # the count prior holds for the blocks it was measured on: the same prefilter, size and
            # overlap (a prior saved before the overlap was recorded is taken to share it)
            same = prior and prior.get("prefilter") == (None if prefilter is None else float(prefilter)) \
                and list(prior.get("head_block") or []) == list(head_block or []) \
                and ("block_overlap" not in prior or list(prior["block_overlap"] or []) == list(block_overlap or []))
            n_blocks = negatives if same else None

            def cut(table):
                out, summary["reliability"] = reliability_cut(table, beam, merge, rel, model.head_config.threshold, prior or None, n_blocks)
                return out
        else:
            def cut(table):
                return merge_catalogue(table, beam, merge)
        summary["n_sources"] = _reliability_pass(target, output, None, cut=cut)
        summary["output"] = str(output)
        summary["merge_s"] = time.perf_counter() - t0
    elif method != "model":
        t0 = time.perf_counter()
        summary["n_candidates"] = summary["n_sources"]
        summary["n_sources"] = _reliability_pass(target, output, config)
        summary["output"] = str(output)
        summary["reliability_s"] = time.perf_counter() - t0
    return summary


def calibrate_noise_prior(model, cubes, *, tile, overlap, head_block=HEAD_BLOCK, prefilter: float | None = PREFILTER_CLIP,
                          bf16: bool = False, floor: float = 0.05) -> dict:
    """The purity cut's noise prior (`Detection3DHeadConfig.noise_prior`) from held-out cube
    files `cubes` (the calibration cubes): each run as `detect_cube` runs it with the cut
    (the model's merge factor, these speed options) but decoded at `floor`, their
    sign-flipped detections and flipped blocks run pooled into `detection3d_post.fit_noise_prior`
    at the model's (calibrated) threshold; stored in `model`'s head config with the prefilter,
    head_block and block overlap (a run with others uses the prior's tail scale only) and returned."""
    import tempfile

    from cosmofm.heads.detection3d_post import fit_noise_prior

    head = model.head_config
    saved = {"threshold": head.threshold, "reliability": head.reliability, "noise_prior": dict(head.noise_prior)}
    if not 0 < floor <= head.threshold:
        raise InputError("floor", f"is {floor!r}, the threshold {head.threshold}", "decode the negatives at a floor in (0, threshold]")
    scores, blocks, block_overlap = [], 0, None
    try:
        model._set_task(threshold=floor, reliability=0.5, noise_prior={})
        with tempfile.TemporaryDirectory(prefix="noise_prior_") as work:
            for path in cubes:
                run = detect_cube(path, Path(work) / "flipped.fits", model=model, tile=tile, overlap=overlap, head_block=head_block,
                                  prefilter=prefilter, bf16=bf16, workers=1, progress=False, overwrite=True)
                scores += run["reliability"]["negative_scores"]
                block_overlap = run["head_options"]["block_overlap"]  # as the finder cut the blocks
                blocks += run["head_stats"]["blocks_run_negative"]
    finally:
        model._set_task(**saved)
    prior = fit_noise_prior(scores, max(blocks, 1), head.threshold, floor)
    if prior:
        prior.update({"prefilter": None if prefilter is None else float(prefilter), "head_block": None if head_block is None else list(head_block),
                      "block_overlap": block_overlap,
                      "floor": float(floor), "n_negatives": len(scores)})
    model._set_task(noise_prior=prior)
    return prior


def _reliability_pass(candidates: Path, output: Path, config, cut=None) -> int:
    """The tiles' candidates (de-duplicated at the core edges like sources) -> one
    reliability density and cut over the whole cube (`apply_reliability`), or `cut(table)`
    (the head's merge), written atomically to `output` (FITS: the run's primary keywords
    kept, NSOURCES updated, ids renumbered). Returns the number of sources."""
    import io
    import os

    from cosmofm.data_cards.io.atomic import atomic_write_bytes
    from cosmofm.data_cards.io.catalogue import catalogue_format
    from cosmofm.heads.sofia_baseline import apply_reliability

    def cut_(table):
        out = apply_reliability(table, config) if cut is None else cut(table)
        if "id" in out.colnames:
            out["id"] = np.arange(len(out), dtype=np.int64)
        return out

    if catalogue_format(output) != "fits":
        table = cut_(Table.read(candidates))
        tmp = output.parent / f".{output.name}.part{output.suffix}"
        table.write(tmp, overwrite=True)
        os.replace(tmp, output)
        return len(table)
    with fits.open(candidates) as hdul:
        primary = hdul[0].header.copy()
        table = cut_(Table.read(hdul[1]))
    primary["NCANDID"] = (int(primary.get("NSOURCES", 0)), "candidates before the reliability cut / merge")
    primary["NSOURCES"] = len(table)
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(header=primary), fits.table_to_hdu(table)]).writeto(buf)
    atomic_write_bytes(output, buf.getvalue())
    return len(table)


__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE", "HEAD_BLOCK", "HEAD_BLOCK_OVERLAP", "NOISE_MODES", "PREFILTER_CLIP", "HeadFinder", "field_noise", "SofiaFinder", "prefilter_config", "calibrate_noise_prior", "catalogue_template", "cube_kernel_rms", "detect_cube"]
