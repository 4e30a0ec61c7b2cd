"""Validate cosmofm's 21cm model (`cosmofm.data_cards.mocks.sim21cm`) against 21cmFAST.

Runs both simulators on the same parameters and box (default 128 Mpc, 64^3 cells) and
compares, per parameter set:
  (a) the density power spectrum at z = 8 (ours: linear theory; 21cmFAST: 2LPT) and the
      21cm power spectrum Delta^2_21(k) at a few redshifts;
  (b) the global neutral-fraction history x_HI(z), its midpoint z(x_HI = 0.5) and
      duration z(0.75) - z(0.25).
21cmFAST runs twice per set: with PERTURB_ALGORITHM = "LINEAR" (linear density, the
like-for-like test of our excursion set) and with its default "2LPT" (what 21cmFAST
users get; the evolved density is the one physical ingredient ours lacks).
21cmFAST 4.x runs with its `const-zeta` template (SOURCE_MODEL = CONST-ION-EFF, no
spin-temperature fluctuations, no recombinations) and the real-space top-hat filter,
M_min from ION_Tvir_MIN (M_MIN_in_Mass = False) -- the model ours implements.
Needs the `[21cmfast]` extra (`apt-get install libfftw3-dev libgsl-dev`, then
`pip install -c constraints.txt -e '.[21cmfast]'`).

It also times the mock chunks of the shipped `lightcone-21cm` card (chunks per minute).
Run: python -m cosmofm.bench.validate_21cm --out bench_results   (about 8 minutes on 2 cores;
--speed-only times the mocks alone, without 21cmFAST)
Writes validate_21cm.json and validate_21cm.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from cosmofm.data_cards.mocks.sim21cm import SimParams, coeval_box, cosmology, crossing_redshift, power_spectrum

PARAM_SETS = {
    "fiducial": {"HII_EFF_FACTOR": 30.0, "ION_Tvir_MIN": 4.69897},
    "efficient_small_haloes": {"HII_EFF_FACTOR": 60.0, "ION_Tvir_MIN": 4.4},
    "inefficient_big_haloes": {"HII_EFF_FACTOR": 20.0, "ION_Tvir_MIN": 5.0},
}
REDSHIFTS = [5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0, 11.0, 12.0, 13.0]
PS_REDSHIFTS = [7.0, 8.0, 9.0]  # where the 21cm power spectra are compared
K_EDGES = np.geomspace(0.05, 1.6, 11)  # 1/Mpc


def run_21cmfast(params: dict, box: float, n: int, seed: int, perturb: str) -> dict:
    import py21cmfast as p21c

    p21c.config["ignore_R_BUBBLE_MAX_error"] = True
    warnings.simplefilter("ignore")
    inputs = p21c.InputParameters.from_template(
        "const-zeta", random_seed=seed, HII_DIM=n, DIM=3 * n, BOX_LEN=box, HII_FILTER="spherical-tophat",
        M_MIN_in_Mass=False, PERTURB_ALGORITHM=perturb, N_THREADS=os.cpu_count() or 1, **params,
    )
    t0 = time.perf_counter()
    coevals = p21c.run_coeval(inputs=inputs, out_redshifts=REDSHIFTS, write=False)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "z": [], "xHI": [], "Tb_mean": [], "ps21": {}, "ps_density": None}
    cell = box / n
    for c in sorted(coevals, key=lambda c: c.redshift):
        z = round(float(c.redshift), 3)
        # 21cmFAST boxes are (x, y, z-LOS); move the LOS to axis 0 as ours
        tb, dens = np.moveaxis(np.asarray(c.brightness_temp), -1, 0), np.moveaxis(np.asarray(c.density), -1, 0)
        out["z"].append(z)
        out["xHI"].append(float(np.mean(c.neutral_fraction)))
        out["Tb_mean"].append(float(tb.mean()))
        if z in PS_REDSHIFTS:
            out["ps21"][str(z)] = power_spectrum(tb, cell, K_EDGES, dimensionless=True)[1].tolist()
        if z == 8.0:
            out["ps_density"] = power_spectrum(dens, cell, K_EDGES)[1].tolist()
    return out


def run_ours(params: dict, box: float, n: int, seeds: list[int]) -> dict:
    p = SimParams.from_dict(params)
    cell = box / n
    t0 = time.perf_counter()
    xhi, tbm = np.zeros((len(seeds), len(REDSHIFTS))), np.zeros((len(seeds), len(REDSHIFTS)))
    ps21 = {str(z): [] for z in PS_REDSHIFTS}
    ps_density = []
    for i, seed in enumerate(seeds):
        for j, z in enumerate(REDSHIFTS):
            c = coeval_box(p, z, box, n, seed)
            xhi[i, j], tbm[i, j] = c.global_xHI, float(c.brightness_temp.mean())
            if z in PS_REDSHIFTS:
                ps21[str(z)].append(power_spectrum(c.brightness_temp, cell, K_EDGES, dimensionless=True)[1])
            if z == 8.0:
                ps_density.append(power_spectrum(c.density, cell, K_EDGES)[1])
    seconds = (time.perf_counter() - t0) / len(seeds)
    return {"seconds": seconds, "z": REDSHIFTS, "xHI": xhi.mean(0).tolist(), "xHI_seed_std": xhi.std(0).tolist(),
            "Tb_mean": tbm.mean(0).tolist(), "ps21": {z: np.mean(v, axis=0).tolist() for z, v in ps21.items()},
            "ps_density": np.mean(ps_density, axis=0).tolist()}


def history_numbers(z, xhi) -> dict:
    z, xhi = np.asarray(z), np.asarray(xhi)
    mid, lo, hi = (crossing_redshift(z, xhi, level) for level in (0.5, 0.25, 0.75))
    return {"z_mid": mid, "z_25": lo, "z_75": hi, "duration": hi - lo}


def compare(ours: dict, ref: dict, box: float, n: int) -> dict:
    k_mid = np.sqrt(K_EDGES[1:] * K_EDGES[:-1])
    out = {"ours": history_numbers(ours["z"], ours["xHI"]), "21cmfast": history_numbers(ref["z"], ref["xHI"])}
    out["delta_z_mid"] = out["ours"]["z_mid"] - out["21cmfast"]["z_mid"]
    out["max_abs_delta_xHI"] = float(np.max(np.abs(np.array(ours["xHI"]) - np.array(ref["xHI"]))))
    ratios = {}
    for z in ours["ps21"]:
        r = np.array(ours["ps21"][z]) / np.array(ref["ps21"][z])
        ratios[z] = {"k": k_mid.tolist(), "ratio": r.tolist(), "median_ratio_k_0.1_1": float(np.nanmedian(r[(k_mid > 0.1) & (k_mid < 1.0)]))}
    out["ps21_ratio"] = ratios
    rd = np.array(ours["ps_density"]) / np.array(ref["ps_density"])
    out["density_ps_ratio_z8"] = {"k": k_mid.tolist(), "ratio": rd.tolist(), "median_ratio_k_lt_0.3": float(np.nanmedian(rd[k_mid < 0.3]))}
    # each against linear theory averaged over the box's own modes (k < 0.3/Mpc: large scales)
    theory = _linear_theory_in_bins(box, n, 8.0)
    out["density_ps_over_linear_theory_z8"] = {
        name: float(np.nanmedian((np.array(run["ps_density"]) / theory)[k_mid < 0.3])) for name, run in (("ours", ours), ("21cmfast", ref))
    }
    return out


def _linear_theory_in_bins(box: float, n: int, z: float) -> np.ndarray:
    """EH98 linear P(k, z) averaged over the grid modes of each K_EDGES bin."""
    from cosmofm.data_cards.mocks.sim21cm.density import k_magnitude

    k = k_magnitude((n, n, n), box / n, real=False).ravel()
    which = np.digitize(k, K_EDGES) - 1
    ok = (which >= 0) & (which < len(K_EDGES) - 1) & (k > 0)
    counts = np.bincount(which[ok], minlength=len(K_EDGES) - 1)
    power = cosmology(SimParams()).power(k[ok], z)
    return np.bincount(which[ok], weights=power, minlength=len(K_EDGES) - 1) / np.maximum(counts, 1)


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["runs"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for i, name in enumerate(sets):
        run = results["runs"][name]
        col = f"C{i}"
        axes[0].plot(run["ours"]["z"], run["ours"]["xHI"], "-", color=col, label=f"{name}: cosmofm")
        axes[0].plot(run["21cmfast_linear"]["z"], run["21cmfast_linear"]["xHI"], "o", ms=4, color=col, label="21cmFAST LINEAR")
        axes[0].plot(run["21cmfast_2lpt"]["z"], run["21cmfast_2lpt"]["xHI"], "x:", ms=5, color=col, label="21cmFAST 2LPT")
    axes[0].set(xlabel="z", ylabel="global x_HI", title="neutral-fraction history")
    axes[0].legend(fontsize=6)
    k_mid = np.sqrt(K_EDGES[1:] * K_EDGES[:-1])
    fid = results["runs"][sets[0]]
    for j, z in enumerate(PS_REDSHIFTS):
        axes[1].loglog(k_mid, fid["ours"]["ps21"][str(z)], "-", color=f"C{j}", label=f"z={z} cosmofm")
        axes[1].loglog(k_mid, fid["21cmfast_linear"]["ps21"][str(z)], "o", ms=4, color=f"C{j}", label=f"z={z} 21cmFAST LINEAR")
        axes[1].loglog(k_mid, fid["21cmfast_2lpt"]["ps21"][str(z)], "x:", ms=5, color=f"C{j}", label=f"z={z} 21cmFAST 2LPT")
    axes[1].set(xlabel="k [1/Mpc]", ylabel="Delta^2_21 [mK^2]", title=f"21cm power spectrum ({sets[0]})")
    axes[1].legend(fontsize=6)
    cosmo = cosmology(SimParams())
    axes[2].loglog(k_mid, fid["ours"]["ps_density"], "-", label="cosmofm (linear, cell-averaged)")
    axes[2].loglog(k_mid, fid["21cmfast_linear"]["ps_density"], "o", ms=4, label="21cmFAST LINEAR")
    axes[2].loglog(k_mid, fid["21cmfast_2lpt"]["ps_density"], "x:", ms=5, label="21cmFAST 2LPT")
    kk = np.geomspace(K_EDGES[0], K_EDGES[-1], 100)
    axes[2].loglog(kk, cosmo.power(kk, 8.0), ":", color="k", label="linear P(k), EH98")
    axes[2].set(xlabel="k [1/Mpc]", ylabel="P(k) [Mpc^3]", title="density power spectrum, z = 8")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_speed(n_lightcones: int = 3) -> dict:
    """Mock chunks of the shipped lightcone-21cm card per minute, one process (as the corpus makes them)."""
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.mocks.generators import mock_samples
    from cosmofm.data_cards.mocks.fields import _layout

    card = load_card("lightcone-21cm")
    n_los, per = _layout(card)
    mock_samples(card, 1, seed=99)  # warm the cosmology tables
    t0 = time.perf_counter()
    mock_samples(card, n_lightcones * per, seed=0)
    seconds = time.perf_counter() - t0
    chunks_per_min = 60 * n_lightcones * per / seconds
    return {"card": card.name, "slices_per_lightcone": n_los, "chunks_per_lightcone": per,
            "chunk_shape": [card.los_cells, card.n_cells, card.n_cells], "seconds_per_lightcone": seconds / n_lightcones,
            "lightcones_per_minute": 60 * n_lightcones / seconds, "chunks_per_minute": chunks_per_min,
            "minutes_for_10k_chunks_one_process": 1e4 / chunks_per_min, "load_average": os.getloadavg()[0]}


def _finite(obj):
    """nan / inf -> None, so the JSON is strict."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--box", type=float, default=128.0, help="box side in comoving Mpc")
    ap.add_argument("--n", type=int, default=64, help="cells per side")
    ap.add_argument("--seeds", type=int, default=2, help="seeds averaged for our model (21cmFAST runs once)")
    ap.add_argument("--sets", nargs="*", default=list(PARAM_SETS), help=f"parameter sets from {list(PARAM_SETS)}")
    ap.add_argument("--speed-only", action="store_true", help="only time the mock chunks (no 21cmFAST needed)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    speed = measure_speed()
    print(f"speed: {speed['chunks_per_minute']:.0f} chunks/min ({speed['lightcones_per_minute']:.1f} lightcones/min of "
          f"{speed['chunks_per_lightcone']} chunks), 10k chunks in {speed['minutes_for_10k_chunks_one_process']:.1f} min "
          f"on one process (load average {speed['load_average']:.1f})", flush=True)
    if args.speed_only:
        path = out / "validate_21cm.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results["speed"] = speed
        path.write_text(json.dumps(_finite(results), indent=2))
        return
    import py21cmfast

    results = {"box_mpc": args.box, "n_cells": args.n, "redshifts": REDSHIFTS, "k_edges": K_EDGES.tolist(),
               "21cmfast_version": py21cmfast.__version__, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "speed": speed, "runs": {}}
    for name in args.sets:
        params = PARAM_SETS[name]
        ours = run_ours(params, args.box, args.n, seeds=list(range(args.seeds)))
        run = results["runs"][name] = {"params": params, "ours": ours, "comparison": {}}
        for perturb in ("LINEAR", "2LPT"):
            ref = run[f"21cmfast_{perturb.lower()}"] = run_21cmfast(params, args.box, args.n, seed=12345, perturb=perturb)
            c = run["comparison"][perturb.lower()] = compare(ours, ref, args.box, args.n)
            ps = {z: round(v["median_ratio_k_0.1_1"], 2) for z, v in c["ps21_ratio"].items()}
            print(f"{name} vs 21cmFAST {perturb}: z_mid {c['ours']['z_mid']:.3f} vs {c['21cmfast']['z_mid']:.3f} "
                  f"(dz {c['delta_z_mid']:+.3f}), duration {c['ours']['duration']:.2f} vs {c['21cmfast']['duration']:.2f}, "
                  f"max |dxHI| {c['max_abs_delta_xHI']:.3f}, median Delta^2_21 ratio (0.1<k<1) {ps}, "
                  f"density P ratio (k<0.3) {c['density_ps_ratio_z8']['median_ratio_k_lt_0.3']:.2f}; "
                  f"s/coeval {ours['seconds'] / len(REDSHIFTS):.2f} vs {ref['seconds'] / len(REDSHIFTS):.2f}", flush=True)
    (out / "validate_21cm.json").write_text(json.dumps(_finite(results), indent=2))
    plot(results, out / "validate_21cm.png")
    print(f"wrote {out / 'validate_21cm.json'} and {out / 'validate_21cm.png'}")


if __name__ == "__main__":
    main()
