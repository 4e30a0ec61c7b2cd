"""The one adapter to 21cmFAST 4.1.1, the reference simulator of the 21cm model.

    from cosmofm.data_cards.mocks.sim21cm.reference import run_21cmfast_coevals, run_21cmfast_lightcone
    ref = run_21cmfast_coevals({"L_X": 40.0}, 128.0, 64, [8.0, 15.0], seed=1, box_redshifts=[8.0])
    ref.mean_brightness, ref.boxes[8.0].brightness_temp, ref.density0  # density0 feeds coeval_box(..., density0=)

21cmFAST runs the physics our model implements (`reionization`, `spin`, `heating` docstrings):
its `const-zeta` template (SOURCE_MODEL = CONST-ION-EFF, no recombinations, no minihaloes)
with the spin temperature on (USE_TS_FLUCT = True, from Z_HEAT_MAX = our Z_MAX = 35), linear
density (PERTURB_ALGORITHM = "LINEAR", our density field), the real-space top-hat
excursion-set filter, M_min from ION_Tvir_MIN (M_MIN_in_Mass = False), EH power spectrum,
and our SimParams' cosmology (OMm, OMb, SIGMA_8, hlittle, POWER_INDEX) and HMF
(1 = "ST", 0 = "PS"). The high-resolution IC grid is 3x the output grid (21cmFAST's
default), smoothed onto the output cells with a top-hat of radius 0.62 cell, as our
cell-averaged field. A SimParams entry 21cmFAST 4 does not have (LOGNORMAL = 1, a
warm-dark-matter M_WDM > 0, or any parameter added later) is refused with InputError unless
it is at its default, which is the physics 21cmFAST runs.

Arrays come back as ours are: (line of sight, y, x); 21cmFAST's are (x, y, line of sight).
py21cmfast is imported only when a run is asked for (the `[21cmfast]` extra).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.sim21cm.cosmology import cosmology, frequency_hz
from cosmofm.data_cards.mocks.sim21cm.heating import Z_MAX, Z_STEP_FACTOR
from cosmofm.data_cards.mocks.sim21cm.params import SimParams
from cosmofm.data_cards.mocks.sim21cm.reionization import CoevalBox, Lightcone

ASTRO_READS = ("HII_EFF_FACTOR", "ION_Tvir_MIN", "R_BUBBLE_MAX", "L_X", "NU_X_THRESH", "X_RAY_SPEC_INDEX")
COSMO_READS = ("OMm", "OMb", "SIGMA_8", "hlittle", "POWER_INDEX")
READS_21CMFAST: tuple[str, ...] = ASTRO_READS + COSMO_READS + ("HMF",)
HIRES_FACTOR = 3  # DIM / HII_DIM (21cmFAST's default): the ICs are drawn finer and smoothed onto the output cells
INSTALL_HINT = "install the extra: apt-get install libfftw3-dev libgsl-dev, then pip install -c constraints.txt -e '.[21cmfast]'"


def node_redshifts(z_min: float = 5.0) -> tuple[float, ...]:
    """21cmFAST's node redshifts, decreasing: (1 + z) grows by Z_STEP_FACTOR from z_min past Z_MAX.

    The same loop as py21cmfast's `get_logspaced_redshifts`, so the floats are identical: output
    redshifts picked from these are nodes, and cost no extra step.
    """
    z = [float(z_min)]
    while z[-1] < Z_MAX:
        z.append((z[-1] + 1.0) * Z_STEP_FACTOR - 1.0)
    return tuple(z[::-1])


def _py21cmfast():
    try:
        import py21cmfast
    except ImportError as err:
        raise InputError("simulator", f"21cmFAST is not installed ({err})", INSTALL_HINT) from None
    py21cmfast.config["ignore_R_BUBBLE_MAX_error"] = True  # R_BUBBLE_MAX above L_box / 3 on small boxes: ours caps it too
    return py21cmfast


def _refuse_unmatched(p: SimParams) -> None:
    """InputError for a parameter 21cmFAST 4 cannot run, unless it is at its default (the physics 21cmFAST has)."""
    for f in dataclasses.fields(p):
        if f.name in READS_21CMFAST or getattr(p, f.name) == f.default:
            continue
        raise InputError(f"parameters.{f.name}", f"21cmFAST 4 has no counterpart of {f.name} = {getattr(p, f.name)!r}",
                         f"leave {f.name} at its default ({f.default!r}) to compare with 21cmFAST, or use --simulator cosmofm")


def _check_grid(box_size: float, n_cells: int, redshifts, seed: int) -> np.ndarray:
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells < 8:
        raise InputError("n_cells", f"must be an integer >= 8, got {n_cells!r}", "give the cells per side, e.g. 32")
    if not np.isfinite(box_size) or box_size <= 0:
        raise InputError("box_size", f"must be positive (comoving Mpc), got {box_size!r}", "e.g. box_size=64.0")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}", "give e.g. seed=1")
    z = np.asarray(redshifts, dtype=float)
    if z.ndim != 1 or len(z) == 0 or not np.all(np.isfinite(z)) or z.min() < 0 or z.max() >= Z_MAX:
        raise InputError("redshifts", f"need a non-empty 1D array in [0, {Z_MAX})", f"give redshifts below 21cmFAST's Z_HEAT_MAX = {Z_MAX}")
    return z


def input_parameters(params: SimParams | dict | None, box_size: float, n_cells: int, seed: int, n_threads: int = 1,
                     z_min: float = 5.0):
    """The py21cmfast.InputParameters that run our model's physics (module docstring) for SimParams `params`.

    Node redshifts (where the spin temperature is evolved) are log-spaced by Z_STEP_FACTOR
    from z_min up to Z_MAX, so that the evolution reaches below the lowest output redshift.
    """
    p = SimParams.coerce(params)
    _refuse_unmatched(p)
    _check_grid(box_size, n_cells, [z_min], seed)
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
        raise InputError("n_threads", f"must be a positive integer, got {n_threads!r}", "give e.g. n_threads=1")
    p21c = _py21cmfast()
    values = {name: float(getattr(p, name)) for name in ASTRO_READS + COSMO_READS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 21cmFAST warns about its own defaults (R_BUBBLE_MAX, config)
        return p21c.InputParameters.from_template(
            "const-zeta", random_seed=int(seed),
            node_redshifts=node_redshifts(z_min),
            HII_DIM=int(n_cells), DIM=HIRES_FACTOR * int(n_cells), BOX_LEN=float(box_size), N_THREADS=int(n_threads),
            Z_HEAT_MAX=Z_MAX, ZPRIME_STEP_FACTOR=Z_STEP_FACTOR, USE_TS_FLUCT=True, INHOMO_RECO=False,
            HII_FILTER="spherical-tophat", M_MIN_in_Mass=False, PERTURB_ALGORITHM="LINEAR", POWER_SPECTRUM="EH",
            HMF="ST" if p.HMF == 1 else "PS", **values,
        )


def _ours(box) -> np.ndarray:
    """21cmFAST's (x, y, LOS) -> our (LOS, y, x), float32."""
    return np.ascontiguousarray(np.transpose(np.asarray(box), (2, 1, 0)), dtype=np.float32)


@dataclass
class ReferenceCoevals:
    """21cmFAST coeval outputs of one run: global histories at every output redshift, boxes at some.

    Attributes:
        redshifts: (Z,) output redshifts, decreasing (21cmFAST's order).
        mean_brightness: (Z,) box-mean dT_b, mK (real space: no velocity gradient, as our coeval_box(rsd=False)).
        global_xHI: (Z,) box-mean neutral fraction.
        mean_spin_temp, mean_kinetic_temp: (Z,) box means of T_S and of the neutral gas' T_K, K.
        boxes: redshift -> CoevalBox (LOS, y, x) for the redshifts asked for in `box_redshifts`.
        density0: (n, n, n) 21cmFAST's low-resolution linear density at z = 0 (LOS, y, x): the
            initial conditions, to pass to `coeval_box(..., density0=)`.
        seconds: wall time of the 21cmFAST run.
        nonfinite_cells: (Z,) cells whose dT_b 21cmFAST returned as nan / inf (then the means are nan: kept
            visible, not averaged away; seen once, z = 5 of a prior corner, from a nan T_S).
    """

    redshifts: np.ndarray
    mean_brightness: np.ndarray
    global_xHI: np.ndarray
    mean_spin_temp: np.ndarray
    mean_kinetic_temp: np.ndarray
    boxes: dict
    density0: np.ndarray
    seconds: float
    params: SimParams
    seed: int
    nonfinite_cells: np.ndarray


def run_21cmfast_coevals(params: SimParams | dict | None, box_size: float, n_cells: int, redshifts, seed: int, n_threads: int = 1,
                         box_redshifts=()) -> ReferenceCoevals:
    """Run 21cmFAST once (spin temperature on) and return its coeval outputs at `redshifts`.

    Global means are kept at every redshift; full boxes only at `box_redshifts` (each must
    be one of `redshifts`), which keeps a dense redshift grid cheap in memory. The
    evolution itself runs on the node redshifts (input_parameters), so outputs between
    nodes do not change it.
    """
    p = SimParams.coerce(params)
    z_out = _check_grid(box_size, n_cells, redshifts, seed)
    keep = {round(float(z), 6) for z in box_redshifts}
    missing = keep - {round(float(z), 6) for z in z_out}
    if missing:
        raise InputError("box_redshifts", f"{sorted(missing)} are not among the output redshifts", "pick box redshifts from `redshifts`")
    inputs = input_parameters(p, box_size, n_cells, seed, n_threads, z_min=float(z_out.min()))  # evolve no lower than asked
    p21c = _py21cmfast()
    cell = box_size / n_cells
    t0 = time.perf_counter()
    rows, boxes, density0 = [], {}, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for coeval, is_output in p21c.generate_coeval(inputs=inputs, out_redshifts=[float(z) for z in z_out], write=False):
            if density0 is None:
                density0 = _ours(coeval.initial_conditions.get("lowres_density"))
            if not is_output:
                continue
            z = float(coeval.redshift)
            tb = np.asarray(coeval.brightness_temp)
            rows.append((z, float(tb.mean()), float(np.mean(coeval.neutral_fraction)), float(np.mean(coeval.spin_temperature)),
                         float(np.mean(coeval.kinetic_temp_neutral)), int(np.sum(~np.isfinite(tb)))))
            if round(z, 6) in keep:
                boxes[round(z, 6)] = CoevalBox(_ours(tb), _ours(coeval.density), _ours(coeval.neutral_fraction), z, cell, p, int(seed))
    seconds = time.perf_counter() - t0
    z, tb, xhi, ts, tk, bad = (np.array(c) for c in zip(*sorted(rows, reverse=True)))
    return ReferenceCoevals(z, tb, xhi, ts, tk, boxes, density0, seconds, p, int(seed), bad)


def initial_density(params: SimParams | dict | None, box_size: float, n_cells: int, seed: int, n_threads: int = 1,
                    z_min: float = 5.0) -> np.ndarray:
    """21cmFAST's z = 0 low-resolution linear density (LOS, y, x) for `seed`, without evolving anything.

    The initial conditions `run_21cmfast_coevals` hands over as `density0` (the same inputs, so
    the same random draw: seconds at 64^3), for rerunning our model on a stored reference run.
    """
    p = SimParams.coerce(params)
    inputs = input_parameters(p, box_size, n_cells, seed, n_threads, z_min=z_min)
    p21c = _py21cmfast()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ics = p21c.compute_initial_conditions(inputs=inputs)
    return _ours(ics.get("lowres_density"))


def run_21cmfast_lightcone(params: SimParams | dict | None, box_size: float, n_cells: int, redshifts: np.ndarray, seed: int,
                           n_threads: int = 1) -> Lightcone:
    """A 21cmFAST lightcone (spin temperature on, velocity gradient in tau_21 as our rsd=True) on the given redshifts.

    21cmFAST builds it on cells of box_size / n_cells Mpc of params' own comoving distance,
    interpolating between its node coevals; here it is interpolated linearly along the line
    of sight onto the increasing `redshifts` (as `lightcone_at_redshifts` does ours), so
    both simulators hand over the same grid. Axis order (LOS, y, x).
    """
    p = SimParams.coerce(params)
    z = _check_grid(box_size, n_cells, redshifts, seed)
    if np.any(np.diff(z) <= 0):
        raise InputError("redshifts", "must be strictly increasing", "give the slices' redshifts from low to high")
    inputs = input_parameters(p, box_size, n_cells, seed, n_threads, z_min=min(5.0, float(z[0]) * 0.99))
    p21c = _py21cmfast()
    import astropy.units as u

    cosmo = cosmology(p)
    cell = box_size / n_cells
    # one cell beyond the last redshift, so that it is interpolated between two 21cmFAST slices
    z_top = float(cosmo.redshift_at_distance(float(cosmo.comoving_distance(z[-1])) + cell))
    lightconer = p21c.RectilinearLightconer.between_redshifts(
        min_redshift=float(z[0]), max_redshift=z_top, resolution=cell * u.Mpc,
        cosmo=cosmo.astropy, quantities=("brightness_temp", "neutral_fraction", "density", "spin_temperature"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lc = p21c.run_lightcone(lightconer=lightconer, inputs=inputs, write=False)
    d_lc = np.asarray(lc.lightcone_distances.to_value(u.Mpc))
    d = np.asarray(cosmo.comoving_distance(z), dtype=float)

    def on_grid(name):  # (x, y, L) -> (D, y, x), linear in comoving distance
        box = np.asarray(lc.lightcones[name])
        j = np.clip(np.searchsorted(d_lc, d) - 1, 0, len(d_lc) - 2)
        w = np.clip((d - d_lc[j]) / (d_lc[j + 1] - d_lc[j]), 0.0, 1.0)
        out = (1 - w) * box[:, :, j] + w * box[:, :, j + 1]
        return _ours(out)

    x_hi = on_grid("neutral_fraction")
    transverse = (np.arange(n_cells) - (n_cells - 1) / 2) * cell
    return Lightcone(on_grid("brightness_temp"), on_grid("density"), x_hi, z, frequency_hz(z), d, transverse,
                     x_hi.mean(axis=(1, 2)), cell, p, int(seed), on_grid("spin_temperature"))


__all__ = ["READS_21CMFAST", "ReferenceCoevals", "initial_density", "input_parameters", "node_redshifts", "run_21cmfast_coevals", "run_21cmfast_lightcone"]
