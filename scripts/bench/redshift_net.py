"""Redshift network (heads/redshift_net.py) against the redshift scan (heads/redshift_scan.py), issue 17.

On 2,000 test mocks of the `sdss-like-survey` card (seed 112), per family (STAR, GALAXY,
QSO) and overall: catastrophic fraction (|dz|/(1+z) > 0.0033) and NMAD of the network and
of the scan given the TRUE class as its only candidate (the scan's best case); the
network's PIT (KS distance from uniform, 10-bin histogram, a PNG) with one error scale and
temperature for every spectrum and with those fitted per family on validation (given the
true family here; `cosmofm classify` gives the predicted class); spectra/s of both with 1 and
2 threads (the network with and without its CPU kernels, heads/redshift_net_cpu.py); the same
spectra with 2x the noise (ivar / 4 and the extra noise added).

Data are generated once and cached in --work as seed<S>.npz (flux, ivar, z, cls, wave):
seeds 100-109 train, 111 validation, 112 test. One network per --seeds value is trained
into work/net-seed<K> (`train_redshift_net`; reused when present) with its training
history, and calibrated again on validation with the classes (per family) before testing;
the report gives each seed's figures and their mean and spread.
Run: `python -m cosmofm.bench.redshift_net --out DIR --work /tmp/znet`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN_SEEDS, VAL_SEED, TEST_SEED = tuple(range(100, 110)), 111, 112
FAMILIES = ("STAR", "GALAXY", "QSO")


def cached_set(work: Path, seed: int, n: int) -> dict:
    """{flux, ivar, z, cls, wave} of n sdss-like-survey mocks of `seed`, generated once into work/seed<S>.npz."""
    path = work / f"seed{seed}.npz"
    if not path.is_file():
        from cosmofm.data_cards.mocks.generators import generate
        from cosmofm.data_cards.schema import load_card

        samples = list(generate(load_card("sdss-like-survey"), n, seed=seed, workers=1))
        np.savez(path, flux=np.stack([s.values for s in samples]).astype(np.float32), ivar=np.stack([s.ivar for s in samples]).astype(np.float32),
                 z=np.array([s.meta["labels"]["redshift"] for s in samples]), cls=np.array([s.meta["labels"]["spectral_class"] for s in samples]),
                 wave=np.asarray(samples[0].coords["wavelength"]))
    with np.load(path) as d:
        data = {k: d[k] for k in d.files}
    return {k: v[:n] if k != "wave" else v for k, v in data.items()}


def noisier(data: dict, factor: float = 2.0, seed: int = 0) -> dict:
    """The same spectra with `factor` x the noise: ivar / factor^2 and Gaussian noise of the
    missing variance ((factor^2 - 1) / ivar) added to the flux."""
    rng = np.random.default_rng(seed)
    ivar = data["ivar"]
    extra = np.where(ivar > 0, np.sqrt((factor**2 - 1) / np.where(ivar > 0, ivar, 1)), 0).astype(np.float32)
    return {**data, "flux": (data["flux"] + extra * rng.standard_normal(ivar.shape).astype(np.float32)).astype(np.float32),
            "ivar": (ivar / factor**2).astype(np.float32)}


def train(work: Path, steps: int, n_per_seed: int, seed: int = 0, config: dict | None = None, checkpoint: Path | None = None) -> None:
    """Train on the cached training seeds into `checkpoint` (default: work itself)."""
    from cosmofm.heads.redshift_net import RedshiftNetConfig, train_redshift_net

    sets = [cached_set(work, s, n_per_seed) for s in TRAIN_SEEDS]
    train_arrays = {k: np.concatenate([s[k] for s in sets]) for k in ("flux", "ivar", "z")}
    val = cached_set(work, VAL_SEED, 1000)
    checkpoint = checkpoint or work
    checkpoint.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(checkpoint / "train_log.jsonl", "w") as log:
        _, history = train_redshift_net(train_arrays, val, RedshiftNetConfig(**(config or {})), steps, seed, checkpoint_dir=checkpoint,
                                        log=lambda line: (print(line, flush=True), log.write(line + "\n"), log.flush()))
    (checkpoint / "train_history.json").write_text(json.dumps({"steps": steps, "seed": seed, "train_spectra": len(train_arrays["z"]), "seconds": time.perf_counter() - t0,
                                                         "threads": int(os.environ.get("OMP_NUM_THREADS", 0)), "history": history}, indent=1))


def per_family(z_true: np.ndarray, z: np.ndarray, families: np.ndarray) -> dict:
    from cosmofm.heads.metrics import redshift_metrics

    out = {"ALL": {"n": len(z_true), **redshift_metrics(z_true, z)}}
    for f in FAMILIES:
        rows = families == f
        out[f] = {"n": int(rows.sum()), **redshift_metrics(z_true[rows], z[rows])}
    return out


def evaluate(checkpoint: Path, data: dict, val: dict) -> dict:
    """Network (from `checkpoint`, calibrated on `val` per family) and scan metrics on one set of spectra."""
    import torch

    from cosmofm.heads.photoz_metrics import pit_histogram, pit_ks
    from cosmofm.heads.redshift_net import calibrate, load_redshift_net
    from cosmofm.heads.redshift_scan import RedshiftScanner
    from cosmofm.heads.template_fit import class_family

    families = np.array([class_family(c) for c in data["cls"]])
    model = calibrate(load_redshift_net(checkpoint), val)
    one_scale = model.predict(data["flux"], data["ivar"])  # one temperature and error scale
    pred = model.predict(data["flux"], data["ivar"], classes=data["cls"])  # per family (the same z)
    pit, pit_one = model.pit(pred, data["z"]), model.pit(one_scale, data["z"])
    scanner = RedshiftScanner()
    fits = [scanner.fit(data["wave"], data["flux"][i:i + 256], data["ivar"][i:i + 256], list(data["cls"][i:i + 256])) for i in range(0, len(data["z"]), 256)]
    z_scan, z_err_scan = (np.concatenate(parts) for parts in zip(*fits))
    # the scan's PIT, for comparison: a Gaussian of its (uncalibrated) z_err around its z
    pit_scan = torch.special.ndtr(torch.as_tensor((data["z"] - z_scan) / z_err_scan)).numpy()
    net, scan = per_family(data["z"], pred.z, families), per_family(data["z"], z_scan, families)
    for f in ("ALL",) + FAMILIES:
        rows = np.ones(len(pit), bool) if f == "ALL" else families == f
        net[f].update(pit_ks=pit_ks(pit[rows]), pit_histogram=pit_histogram(pit[rows]), median_z_err=float(np.median(pred.z_err[rows])),
                      pit_ks_one_scale=pit_ks(pit_one[rows]), pit_histogram_one_scale=pit_histogram(pit_one[rows]))
        scan[f].update(pit_ks_gaussian=pit_ks(np.nan_to_num(pit_scan[rows], nan=0.5)), median_z_err=float(np.nanmedian(z_err_scan[rows])))
    net["calibration"] = {k: getattr(model.cfg, k) for k in ("temperature", "error_scale", "peak_offset_bins", "family_calibration")}
    return {"network": net, "scan_true_class": scan, "_pit": pit}


def throughput(work: Path, threads: int, n: int = 2000) -> dict:
    """spectra/s of network (with and without its CPU kernels) and scan in a fresh process with
    `threads` threads (OMP_NUM_THREADS and torch's), and the CPU seconds each took."""
    code = f"""
import json, time, numpy as np, torch
torch.set_num_threads({threads})
from cosmofm.bench.redshift_net import cached_set
from cosmofm.heads.redshift_net import load_redshift_net
from cosmofm.heads.redshift_scan import RedshiftScanner
d = cached_set(__import__('pathlib').Path({str(work)!r}), {TEST_SEED}, {n})
model, scanner = load_redshift_net({str(work)!r}), RedshiftScanner()
model.predict(d["flux"][:256], d["ivar"][:256]); scanner.fit(d["wave"], d["flux"][:256], d["ivar"][:256], list(d["cls"][:256]))
def reference(i):  # the FFT path without the CPU kernels
    model.cpu_kernels = False
    try:
        return model.predict(d["flux"][i:i + 256], d["ivar"][i:i + 256])
    finally:
        model.cpu_kernels = True
out, cpu = {{}}, {{}}
for _ in range(2):  # interleaved, best of two
    for name, fn in [("network", lambda i: model.predict(d["flux"][i:i + 256], d["ivar"][i:i + 256])), ("network_without_cpu_kernels", reference),
                     ("scan_true_class", lambda i: scanner.fit(d["wave"], d["flux"][i:i + 256], d["ivar"][i:i + 256], list(d["cls"][i:i + 256])))]:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(d["z"]), 256):
            fn(i)
        out[name] = max(out.get(name, 0), len(d["z"]) / (time.perf_counter() - t0))
        cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - c0)
print(json.dumps({{"spectra_per_s": out, "cpu_seconds": cpu}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return {"threads": threads, "batch": 256, "spectra": n, "load_average": os.getloadavg(), **json.loads(result.stdout.strip().splitlines()[-1])}


def pit_png(pit: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.hist(np.clip(pit, 0, 1), bins=20, range=(0, 1), density=True, color="0.4")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set(xlabel="PIT = CDF(z_true)", ylabel="density", title="redshift net, test mocks (seed 112)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out: Path, work: Path, n_test: int = 2000, steps: int = 3000, n_per_seed: int = 2000, seeds: tuple[int, ...] = (0,),
        config: dict | None = None) -> dict:
    """Train one network per seed (work/net-seed<K>, reused when present) on the same cached
    mocks; evaluate each on the test set, clean and with 2x noise; spread over seeds."""
    from cosmofm.bench.pretrain_throughput import machine_info

    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    test, val = cached_set(work, TEST_SEED, n_test), cached_set(work, VAL_SEED, 1000)
    result = {"machine": machine_info(), "test": {"card": "sdss-like-survey", "seed": TEST_SEED, "n": len(test["z"])}, "seeds": {}}
    for seed in seeds:
        checkpoint = work / f"net-seed{seed}"
        if not (checkpoint / "redshift_net.safetensors").is_file():
            train(work, steps, n_per_seed, seed, config, checkpoint)
        clean, shifted = evaluate(checkpoint, test, val), evaluate(checkpoint, noisier(test), val)
        pit = clean.pop("_pit")
        shifted.pop("_pit")
        if seed == seeds[0]:
            pit_png(pit, out / "redshift_net_pit.png")
        result["seeds"][seed] = {"clean": clean, "noise_x2": shifted, "training": json.loads((checkpoint / "train_history.json").read_text())}
        result["seeds"][seed]["training"].pop("history", None)
    result["summary"] = seed_summary(result["seeds"])
    result["throughput"] = [throughput(work / f"net-seed{seeds[0]}", t, n_test) for t in (1, 2)]
    (out / "redshift_net.json").write_text(json.dumps(result, indent=1))
    return result


def seed_summary(per_seed: dict) -> dict:
    """[mean, std] over seeds of the network's catastrophic fraction, NMAD and PIT KS per family
    and set, beside the scan's (the same for every seed)."""
    out = {}
    for cond in ("clean", "noise_x2"):
        runs = [r[cond] for r in per_seed.values()]
        out[cond] = {}
        for f in ("ALL",) + FAMILIES:
            row = {k: [float(np.mean([r["network"][f][k] for r in runs])), float(np.std([r["network"][f][k] for r in runs]))]
                   for k in ("redshift_catastrophic_fraction", "redshift_nmad", "pit_ks", "pit_ks_one_scale")}
            row.update({f"scan_{k}": runs[0]["scan_true_class"][f][k] for k in ("redshift_catastrophic_fraction", "redshift_nmad")})
            out[cond][f] = row
    return out


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results")
    p.add_argument("--work", default="/tmp/znet", help="cached mocks and the checkpoint (trained here if absent)")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--steps", type=int, default=3000, help="training steps when no checkpoint is found")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one network trained per seed (work/net-seed<K>)")
    p.add_argument("--config", default="{}", help='RedshiftNetConfig fields to train with, JSON (e.g. \'{"channels": 4}\')')
    args = p.parse_args(argv)
    result = run(Path(args.out), Path(args.work), args.n_test, args.steps, seeds=tuple(args.seeds), config=json.loads(args.config))
    for name, rows in result["summary"].items():
        for f, r in rows.items():
            print(f"{name:9s} {f:6s} net cat {r['redshift_catastrophic_fraction'][0]:.4f}+-{r['redshift_catastrophic_fraction'][1]:.4f}"
                  f" nmad {r['redshift_nmad'][0]:.2e}+-{r['redshift_nmad'][1]:.1e} | scan cat {r['scan_redshift_catastrophic_fraction']:.4f}"
                  f" nmad {r['scan_redshift_nmad']:.2e} | PIT KS {r['pit_ks'][0]:.3f} (one scale {r['pit_ks_one_scale'][0]:.3f})")
    print(json.dumps(result["throughput"]))


if __name__ == "__main__":
    main()
