"""Peak memory and time of `cosmofm deblend` (sep or a model, tiled) on a 4k x 4k mosaic (issue 20).

    python -m cosmofm.bench.deblend_memory --out docs/bench
    python -m cosmofm.bench.deblend_memory --size 1024          # a quick look
    python -m cosmofm.bench.deblend_memory --model runs/deb/model --bands u g r i z y --tile 128 --overlap 32

1. A mosaic in the agreed format (data_cards/readers/mosaic.py) is written band by band,
   so the generator holds one band: elliptical Gaussian galaxies (sigma 1-4 px, axis
   ratio 0.4-1, fluxes from a power law dN/dF ~ F^-2 between 20 and 2000 x the pixel
   noise), a fifth of them placed 3-8 px from another one (blends), white noise of 1 nJy
   per pixel and a constant IVAR. Not the rich mock of data_cards/mocks/blend_fields.py:
   that one rendered a 512 x 512 four-band field in 19 s here (under load), so ~20 min at
   4k x 4k; this benchmark is about memory, which depends on the tiling, not on the
   galaxies' realism.
2. `finetune.deblend.deblend_image` (sep, or the deblending model given by `--model`, whose
   bands the mosaic must have: `--bands`) runs in a fresh child process, measured as in
   detect_speed (`run_measured`): wall time, the largest single-process RSS and the
   sampled peak of the process tree's summed RSS.
3. Detections are matched to the injected galaxies within 2 px: completeness of those
   brighter than 50 sigma-pixel, and the number of detections.

Target (issue 20): peak RSS under 4 GB. Writes deblend_memory.json with the machine and
its load (other jobs on the cores make it slower, not bigger).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cosmofm.bench import write_report
from cosmofm.bench.detect_speed import machine, run_measured
from cosmofm.data_cards import InputError

BANDS = ("g", "r", "i", "z")
CARD = "lsst-like"  # the band wavelengths written to the mosaic's headers
CHILD = """
import json, sys
from cosmofm.finetune.deblend import deblend_image
model = sys.argv[6] or None
summary = deblend_image(sys.argv[1], sys.argv[2], model=model, method=None if model else "sep", tile=int(sys.argv[3]),
                        overlap=int(sys.argv[4]), workers=int(sys.argv[5]), progress=False)
print("SUMMARY " + json.dumps(summary, default=str))
"""


def galaxies(size: int, density_per_kpix: float, seed: int, n_bands: int = len(BANDS)) -> dict:
    """Positions, shapes and r-band fluxes [nJy] of the injected galaxies, and band colours."""
    rng = np.random.default_rng(seed)
    n = int(density_per_kpix * size * size / 1000)
    row, col = rng.uniform(8, size - 8, n), rng.uniform(8, size - 8, n)
    pair = rng.random(n) < 0.2  # a companion 3-8 px away from the previous galaxy
    sep, ang = rng.uniform(3, 8, n), rng.uniform(0, 2 * np.pi, n)
    row[1:][pair[1:]] = np.clip(row[:-1][pair[1:]] + sep[1:][pair[1:]] * np.sin(ang[1:][pair[1:]]), 8, size - 8)
    col[1:][pair[1:]] = np.clip(col[:-1][pair[1:]] + sep[1:][pair[1:]] * np.cos(ang[1:][pair[1:]]), 8, size - 8)
    flux = 20.0 / (1 - rng.random(n) * (1 - 20.0 / 2000.0))  # dN/dF ~ F^-2 on [20, 2000]
    return {"row": row, "col": col, "flux": flux, "sigma": rng.uniform(1.0, 4.0, n), "q": rng.uniform(0.4, 1.0, n),
            "theta": rng.uniform(0, np.pi, n), "colour": rng.normal(0.0, 0.3, (n, n_bands))}


def write_mosaic(path: Path, size: int, gal: dict, seed: int, bands: tuple = BANDS) -> None:
    """The mosaic file, one band (and its IVAR) at a time; `bands` are names of CARD's bands."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from cosmofm.data_cards import load_card

    wavelength = {b.name: float(b.wavelength.to_value("Angstrom")) for b in load_card(CARD).bands}
    unknown = [b for b in bands if b not in wavelength]
    if unknown:
        raise InputError("--bands", f"{unknown} are not bands of {CARD}", f"use some of {sorted(wavelength)}")

    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---TAN", "DEC--TAN"], [150.1, 2.2]
    w.wcs.crpix, w.wcs.cdelt = [size / 2 + 0.5, size / 2 + 0.5], [-0.2 / 3600, 0.2 / 3600]
    primary = fits.PrimaryHDU()
    primary.header["BANDS"], primary.header["CARD"] = ",".join(bands), CARD
    primary.writeto(path)
    rng = np.random.default_rng(seed + 1)
    r = 12  # stamp half-size: 3 sigma of the largest galaxy
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    for b, band in enumerate(bands):
        img = rng.standard_normal((size, size), dtype=np.float32)  # 1 nJy per pixel
        for k in range(len(gal["row"])):
            r0, c0 = int(gal["row"][k]), int(gal["col"][k])
            dy, dx = yy - (gal["row"][k] - r0), xx - (gal["col"][k] - c0)
            ct, st = np.cos(gal["theta"][k]), np.sin(gal["theta"][k])
            u, v = ct * dx + st * dy, -st * dx + ct * dy
            s, q = gal["sigma"][k], gal["q"][k]
            f = gal["flux"][k] * 10 ** (-0.4 * gal["colour"][k, b])
            y0, y1, x0, x1 = max(0, r0 - r), min(size, r0 + r + 1), max(0, c0 - r), min(size, c0 + r + 1)
            prof = f / (2 * np.pi * s * s * q) * np.exp(-0.5 * (u**2 + (v / q) ** 2) / s**2)
            img[y0:y1, x0:x1] += prof[y0 - (r0 - r) : y1 - (r0 - r), x0 - (c0 - r) : x1 - (c0 - r)]
        h = w.to_header()
        h.update({"EXTNAME": band, "BUNIT": "nJy", "FILTER": band, "PIXSCALE": 0.2, "WAVELEN": wavelength[band], "PSFFWHM": 0.9})
        fits.append(path, img, h)
        hi = fits.Header()
        hi["EXTNAME"] = f"IVAR_{band}"
        fits.append(path, np.ones((size, size), np.float32), hi)
        del img


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--density", type=float, default=1.0, help="galaxies per 1000 pixels")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="", help="a fine-tuned deblending model (folder) instead of sep")
    ap.add_argument("--bands", nargs="+", default=list(BANDS), help=f"the mosaic's bands ({CARD}'s names; a model's own)")
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--name", default="deblend_memory.json", help="the report's file name in --out")
    args = ap.parse_args(argv)

    from astropy.table import Table
    from scipy.spatial import cKDTree

    report: dict = {"machine_before": machine(), "shape": [len(args.bands), args.size, args.size], "tile": args.tile, "overlap": args.overlap,
                    "workers": args.workers, "method": "model" if args.model else "sep", "model": args.model or None, "bands": args.bands}
    gal = galaxies(args.size, args.density, args.seed, len(args.bands))
    with tempfile.TemporaryDirectory(prefix="deblend_memory.") as tmp:
        mosaic = Path(tmp) / "mosaic.fits"
        t0 = time.perf_counter()
        write_mosaic(mosaic, args.size, gal, args.seed, tuple(args.bands))
        report["make_mosaic_s"] = time.perf_counter() - t0
        report["mosaic_bytes"] = mosaic.stat().st_size
        catalogue = Path(tmp) / "sources.fits"
        run = run_measured(CHILD, [str(mosaic), str(catalogue), str(args.tile), str(args.overlap), str(args.workers), args.model])
        summary = json.loads(next(line for line in run.pop("stdout").splitlines() if line.startswith("SUMMARY "))[8:])
        cat = Table.read(catalogue)
    found = np.column_stack([np.asarray(cat["Y"]), np.asarray(cat["X"])]) if len(cat) else np.zeros((0, 2))
    bright = gal["flux"] > 50
    d = cKDTree(found).query(np.column_stack([gal["row"], gal["col"]]))[0] if len(found) else np.full(len(gal["row"]), np.inf)
    report.update({"deblend_s": summary["seconds"], "child_wall_s": run["wall_s"], "n_tiles": summary["n_tiles"], "n_sources": summary["n_sources"],
                   "n_injected": len(gal["row"]), "completeness_flux_gt_50": float(np.mean(d[bright] < 2)), **run,
                   "pixels_per_s": args.size**2 / summary["seconds"]})
    report["machine_after"] = {"loadavg": list(os.getloadavg())}
    report["targets"] = {"peak_rss_gb": 4}
    report = write_report(args.out, args.name, report)
    print(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
