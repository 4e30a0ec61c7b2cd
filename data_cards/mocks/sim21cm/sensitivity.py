"""Does every parameter a card draws act on the simulated lightcone? (issue 18: labels only for parameters that act)

    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.mocks.sim21cm.sensitivity import check_sensitivity
    check_sensitivity(load_card("lightcone-21cm"))  # {"HII_EFF_FACTOR": 1.5, "ION_Tvir_MIN": 15.2, "L_X": 13.3, "M_WDM": 11.1, "NU_X_THRESH": 2.7, "OMm": 11.7}
    python -m cosmofm.data_cards.mocks.sim21cm.sensitivity lightcone-21cm [--plot docs/bench/sim21cm_sensitivity.png]

For each parameter the card draws ([low, high] in `field.parameters`), noise-free lightcones
of the card's size on its fixed slice grid (`fields.lightcone_grid`) are simulated at the low and at the high end of its
range, every other parameter at its fixed value or the middle of its range, with the same
density seeds at both ends (2 by default). Two summaries are compared:

- the global signal, the mean dT_b of each slice (mK): reionisation's emission and, where
  the card's redshifts reach cosmic dawn (z > ~11), the absorption trough, whose depth and
  redshift L_X, NU_X_THRESH and X_RAY_SPEC_INDEX move through the spin temperature, and
- the spherically averaged power spectrum Delta^2(k) (mK^2, `density.power_spectrum`, 6
  log bins) of each consecutive `los_cells`-long chunk, all chunks concatenated.

For one summary with elements i, the effect ratio is

    ratio = rms_i(mean_high_i - mean_low_i) / (rms_i(scatter_i) + tiny),
    scatter_i^2 = (var_low_i + var_high_i) / 2   (seed-to-seed variance, ddof = 1),

the typical change across the whole prior against the typical realisation-to-realisation
scatter (root-mean-squares pool the slices and bins, so two seeds suffice for a stable
scatter). A parameter's ratio is the larger of the two summaries' (it acts if it moves
either). Because both ends share their seeds, a parameter the model ignores gives exactly 0.
The lightcones are simulated as the mocks make them: spin temperature and redshift-space
distortions on (`reionization.lightcone_at_redshifts` defaults), so the X-ray parameters act
on any card whose redshifts are not yet fully heated; on a card that sits entirely in the
heated era (T_S >> T_CMB) they are measured, and refused, as the inert parameters they are there.

THRESHOLD = 1.0 is issue 18's criterion: moving the parameter across its prior must change
the power spectrum or the global signal by more than the seed scatter. Below it, one
lightcone pins the parameter no better than its prior does, per slice or per k bin, so an
inference head trained on it as a label learns mostly its prior. Card noise is not added:
it does not depend on the parameters and would only inflate the scatter.

`--plot PATH` (`plot_sensitivity`) draws, per drawn parameter, the global signal dT_b(z) and
Delta^2_21(k) of two chunks (at the card's reionisation and cosmic-dawn redshifts) at the low,
middle and high end of its range, the seed-to-seed range shaded: the check's numbers as a figure.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.sim21cm.density import power_spectrum
from cosmofm.data_cards.mocks.sim21cm.params import SimParams
from cosmofm.data_cards.mocks.sim21cm.reionization import lightcone_at_redshifts

THRESHOLD = 1.0  # effect / seed scatter, see the module docstring
TINY = 1e-12  # mK (or mK^2): keeps the ratio finite when both ends are identical
N_K_BINS = 6


def _simulate(params: SimParams, box_size: float, n_cells: int, redshifts: np.ndarray, seed: int, quantity: str):
    """(D, H, W) noise-free field of one lightcone on the card's slice redshifts (a module function so tests can swap the model)."""
    lc = lightcone_at_redshifts(params, box_size, n_cells, redshifts, seed, ionize=quantity == "brightness_temperature")
    return lc.brightness_temp if quantity == "brightness_temperature" else lc.density


def summaries(field: np.ndarray, cell: float, chunk: int) -> dict[str, np.ndarray]:
    """The compared summaries of one lightcone: per-slice mean, and Delta^2(k) of each `chunk`-slice chunk."""
    f = np.asarray(field, dtype=np.float64)
    n_chunks = max(1, f.shape[0] // chunk)
    ps = [power_spectrum(f[c * chunk:(c + 1) * chunk], cell, N_K_BINS, dimensionless=True)[1] for c in range(n_chunks)]
    return {"global_signal": f.mean(axis=(1, 2)), "power_spectrum": np.nan_to_num(np.concatenate(ps))}


def effect_ratio(low: list[np.ndarray], high: list[np.ndarray]) -> float:
    """rms(mean_high - mean_low) / (rms(seed scatter) + tiny) of one summary, seeds along the lists (>= 2 each)."""
    lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if lo.shape != hi.shape or lo.ndim != 2 or lo.shape[0] < 2:
        raise InputError("seeds", f"need the same >= 2 seeds at both ends, got summaries of shape {lo.shape} and {hi.shape}", "pass seeds=(0, 1) or more")
    effect = np.sqrt(np.mean((hi.mean(axis=0) - lo.mean(axis=0)) ** 2))
    scatter = np.sqrt(np.mean(0.5 * (lo.var(axis=0, ddof=1) + hi.var(axis=0, ddof=1))))
    return float(effect / (scatter + TINY))


def _runs(card, values: dict, redshifts: np.ndarray, seeds) -> list[dict[str, np.ndarray]]:
    """The summaries of one lightcone per seed at parameter `values`."""
    box = card.box_size.to_value("Mpc")
    params = SimParams.from_dict(values)
    return [summaries(_simulate(params, box, card.n_cells, redshifts, s, card.quantity), box / card.n_cells, card.los_cells) for s in seeds]


def check_sensitivity(card, seeds=(0, 1), threshold: float = THRESHOLD, raise_below: bool = True,
                      details: dict | None = None) -> dict[str, float]:
    """{parameter: effect ratio} for every parameter the card draws; InputError for one below `threshold`.

    Args:
        card: a field card with `lightcone: true` (e.g. `load_card("lightcone-21cm")`).
        seeds: density seeds, the same at both ends of each range (at least 2).
        threshold: the smallest accepted ratio (default THRESHOLD, see the module docstring).
        raise_below: False returns the ratios without refusing.
        details: if a dict, filled with {parameter: {summary: ratio}} and the run time.
    """
    from cosmofm.data_cards.mocks.fields import card_priors, lightcone_grid  # here: fields imports this package

    if not getattr(card, "lightcone", False):
        raise InputError(f"{card.name}.field.lightcone", "the sensitivity check simulates lightcones", "use a card with lightcone: true")
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise InputError("seeds", f"need at least 2 distinct seeds for the scatter, got {seeds}", "pass e.g. seeds=(0, 1)")
    fixed, priors = card_priors(card)  # refuses inert drawn parameters before any compute
    redshifts = lightcone_grid(card)[0]  # the mocks' fixed grid: both ends compared slice by slice at the same z
    centre = {**fixed, **{k: 0.5 * (lo + hi) for k, (lo, hi) in priors.items()}}
    t0 = time.perf_counter()
    ratios, per_summary, kept = {}, {}, {}
    for name, (lo, hi) in sorted(priors.items()):
        ends = [_runs(card, {**centre, name: value}, redshifts, seeds) for value in (lo, hi)]
        kept[name] = {"low": ends[0], "high": ends[1]}
        per_summary[name] = {key: effect_ratio([r[key] for r in ends[0]], [r[key] for r in ends[1]]) for key in ends[0][0]}
        ratios[name] = max(per_summary[name].values())
    if details is not None:
        details.update(per_summary=per_summary, seconds=time.perf_counter() - t0, n_lightcones=2 * len(seeds) * len(priors),
                       summaries=kept, centre=centre, priors=priors, redshifts=redshifts, seeds=seeds)
    if raise_below:
        weak = {k: v for k, v in ratios.items() if v < threshold}
        if weak:
            name = min(weak, key=weak.get)
            lo, hi = priors[name]
            raise InputError(f"{card.name}.field.parameters.{name}",
                             f"moving it across [{lo}, {hi}] changes the global signal and the power spectrum by {weak[name]:.3g} x the seed scatter "
                             f"(< {threshold}), so it would be a label of almost nothing (all ratios: {ratios})",
                             "widen its range, fix it to a number, or drop it")
    return ratios


def _chunk_redshifts(card, redshifts: np.ndarray) -> tuple[int, int]:
    """Indices of the two plotted power-spectrum chunks: the ones holding z ~ 8 (reionisation) and z ~ 15 (cosmic dawn)."""
    n_chunks = max(1, len(redshifts) // card.los_cells)
    centres = np.array([redshifts[min(len(redshifts) - 1, c * card.los_cells + card.los_cells // 2)] for c in range(n_chunks)])
    return int(np.argmin(np.abs(centres - 8.0))), int(np.argmin(np.abs(centres - 15.0)))


def plot_sensitivity(card, path, details: dict) -> None:
    """The per-parameter effect as a figure (module docstring), written atomically to `path` (PNG).

    `details` is what `check_sensitivity(card, details=...)` filled (low and high ends); the
    middle of each range is simulated here with the same seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from cosmofm.data_cards.io.atomic import atomic_write_bytes

    z, seeds, priors = details["redshifts"], details["seeds"], details["priors"]
    cell = card.box_size.to_value("Mpc") / card.n_cells
    chunk = card.los_cells
    n_bins = N_K_BINS
    k = power_spectrum(np.zeros((chunk, card.n_cells, card.n_cells)), cell, n_bins)[0]
    picks = _chunk_redshifts(card, z)
    names = sorted(priors)
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 2.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        lo, hi = priors[name]
        mid = 0.5 * (lo + hi)
        runs = [(lo, details["summaries"][name]["low"]), (mid, _runs(card, {**details["centre"], name: mid}, z, seeds)),
                (hi, details["summaries"][name]["high"])]
        for j, (value, seed_runs) in enumerate(runs):
            colour = ("C0", "C2", "C3")[j]
            gs = np.array([r["global_signal"] for r in seed_runs])  # (seeds, D)
            axes[row, 0].plot(z, gs.mean(axis=0), color=colour, lw=1, label=f"{name} = {value:.3g}")
            axes[row, 0].fill_between(z, gs.min(axis=0), gs.max(axis=0), color=colour, alpha=0.25, lw=0)
            ps = np.array([r["power_spectrum"] for r in seed_runs]).reshape(len(seed_runs), -1, n_bins)  # (seeds, chunks, bins)
            for col, c in zip((1, 2), picks):
                axes[row, col].loglog(k, ps[:, c].mean(axis=0), "-o", ms=2, color=colour, lw=1)
                axes[row, col].fill_between(k, ps[:, c].min(axis=0), ps[:, c].max(axis=0), color=colour, alpha=0.25, lw=0)
        ratio = max(details["per_summary"][name].values())
        axes[row, 0].set(ylabel="mean dT_b [mK]", title=f"{name} [{lo:g}, {hi:g}]: effect / seed scatter = {ratio:.1f}")
        axes[row, 0].legend(fontsize=7)
        for col, c in zip((1, 2), picks):
            z_lo, z_hi = z[c * chunk], z[min(len(z) - 1, (c + 1) * chunk - 1)]
            axes[row, col].set(ylabel="Delta^2_21 [mK^2]", title=f"chunk z = {z_lo:.2f}-{z_hi:.2f}")
    axes[-1, 0].set(xlabel="z")
    for ax in axes[:, 1:].ravel():  # plain k labels: log-axis minor labels overlap on a 0.1-3 /Mpc range
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.1, 0.2, 0.5, 1.0, 2.0]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for col in (1, 2):
        axes[-1, col].set(xlabel="k [1/Mpc]")
    fig.suptitle(f"{card.name}: low / mid / high end of each prior, others at their centres; seeds {list(seeds)} (band: seed range)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    from cosmofm.data_cards import load_card

    parser = argparse.ArgumentParser(description="Does every parameter a card draws act on its lightcones? (issue 18)")
    parser.add_argument("card", nargs="?", default="lightcone-21cm")
    parser.add_argument("--plot", metavar="PATH", help="also write the per-parameter effect as a PNG (e.g. docs/bench/sim21cm_sensitivity.png)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="density seeds, the same at both ends (default 0 1)")
    args = parser.parse_args(argv)
    card = load_card(args.card)
    info: dict = {}
    ratios = check_sensitivity(card, seeds=args.seeds, raise_below=False, details=info)
    for name, r in ratios.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in info["per_summary"][name].items())
        print(f"{name}: effect ratio {r:.2f} ({parts}){'  BELOW ' + str(THRESHOLD) if r < THRESHOLD else ''}")
    print(f"{info['n_lightcones']} lightcones in {info['seconds']:.1f} s")
    if args.plot:
        t0 = time.perf_counter()
        plot_sensitivity(card, args.plot, info)
        print(f"wrote {args.plot} ({len(info['priors']) * len(info['seeds'])} more lightcones, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
