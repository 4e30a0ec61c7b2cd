"""What a simulation bank (`mocks.bank`) simulates: the simulators, the prior file and its design.

A prior file (YAML) names a lightcone card, how to sample and the parameters (module
docstring of `mocks.bank`); `load_prior` validates it against the chosen simulator before any
compute, `design` gives the n parameter rows: a Latin hypercube (McKay, Beckman & Conover
1979) deterministic in (seed, n), or the card's own prior draws.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import fields
from cosmofm.data_cards.mocks.sim21cm.params import SimParams, canonical_name, inert_reason
from cosmofm.data_cards.schema import FieldCard, load_card

SAMPLINGS = ("latin-hypercube", "prior")
PRIOR_KEYS = ("card", "sampling", "parameters", "description", "citation")
# Shipped priors (package data, like the cards): `--prior neutsch2022` works from any install.
PRIORS_DIR = resources.files("cosmofm.data_cards") / "priors"
_DESIGN_STREAM = 8  # random stream of the Latin hypercube (fields.py uses streams 3-7)


# ---------------------------------------------------------------------------- simulators


@dataclass(frozen=True)
class Simulator:
    """One way to turn (card with fixed parameters, seed, index) into a lightcone.

    `simulate` returns (values (D, H, W) in the card's unit, x_HI (D, H, W) or None,
    SimParams, labels); `ignores(name)` says why the simulator never reads a parameter
    (None if it reads it); `version()` is recorded in the bank.
    """

    name: str
    simulate: Callable[[FieldCard, int, int], tuple[np.ndarray, np.ndarray | None, SimParams, dict[str, float]]]
    ignores: Callable[[str, str], str | None]
    version: Callable[[], str]


def _cosmofm_simulate(card: FieldCard, seed: int, index: int):
    # The mocks' own path (parameters, density seed, fixed grid): bank row i is realisation i of
    # the card fixed at the design's parameters. Uncached (fields._realisation keeps the last few
    # lightcones for the chunks that share them; a bank row is made once).
    values, x_hi, _z, _d, params, labels = fields.simulate_realisation(card, seed, index)
    return values, x_hi, params, labels


def _cosmofm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cosmofm")
    except PackageNotFoundError:
        return "unknown"


def _reference():
    """The 21cmFAST adapter (`sim21cm.reference`, optional extra `21cmfast`), or an InputError."""
    import importlib.util

    try:
        from cosmofm.data_cards.mocks.sim21cm import reference
    except ImportError as e:
        raise InputError("--simulator", f"21cmfast is not available here ({e})", "use --simulator cosmofm") from None
    if importlib.util.find_spec("py21cmfast") is None:  # the adapter imports it only when a run starts: ask now, before any compute
        raise InputError("--simulator", "21cmfast is not available here (py21cmfast is not installed)", f"{reference.INSTALL_HINT}, or use --simulator cosmofm")
    return reference


def _21cmfast_simulate(card: FieldCard, seed: int, index: int):
    reference = _reference()
    params, labels = fields.draw_params(card, seed, index)
    sim_seed = fields.density_seed(seed, index)  # the density seed of realisation `index`, as our simulator's
    z, _d = fields.lightcone_grid(card)
    lc = reference.run_21cmfast_lightcone(params, card.box_size.to_value("Mpc"), card.n_cells, z, sim_seed, n_threads=1)
    values = lc.brightness_temp if card.quantity == "brightness_temperature" else lc.density
    return np.asarray(values, np.float32), np.asarray(lc.x_HI, np.float32), params, labels


def _21cmfast_ignores(name: str, quantity: str) -> str | None:
    reads = _reference().READS_21CMFAST
    if canonical_name(name) in reads:
        return None
    return f"is not passed to 21cmFAST by sim21cm.reference (it passes {', '.join(reads)})"


def _21cmfast_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("21cmFAST")
    except PackageNotFoundError:
        return "unknown"


SIMULATORS: dict[str, Simulator] = {
    "cosmofm": Simulator("cosmofm", _cosmofm_simulate, inert_reason, _cosmofm_version),
    "21cmfast": Simulator("21cmfast", _21cmfast_simulate, _21cmfast_ignores, _21cmfast_version),
}


def simulator(name: str) -> Simulator:
    if name not in SIMULATORS:
        raise InputError("--simulator", f"unknown simulator {name!r}", f"use one of {sorted(SIMULATORS)}")
    sim = SIMULATORS[name]
    if name == "21cmfast":
        _reference()  # refuse before any compute when the extra is missing
    return sim


# ---------------------------------------------------------------------------- the prior file


@dataclass(frozen=True)
class BankPrior:
    """A validated prior file.

    Attributes:
        source: the file it came from (for messages).
        card_ref: the `card:` entry as written (shipped name or path).
        card: the lightcone card, its `parameters` = the card's overlaid with the prior's.
        sampling: "latin-hypercube" or "prior".
        ranges: drawn parameters {name: (low, high)}, sorted by name (the design's columns).
        fixed: fixed parameters {name: value}.
        description, citation: free text for the dataset card.
    """

    source: str
    card_ref: str
    card: FieldCard
    sampling: str
    ranges: dict[str, tuple[float, float]]
    fixed: dict[str, float]
    description: str = ""
    citation: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.ranges)

    def to_dict(self) -> dict[str, Any]:
        """What defines the bank's parameters (no file path: a moved prior file is the same prior)."""
        return {"card": self.card_ref, "sampling": self.sampling,
                "ranges": {k: list(v) for k, v in self.ranges.items()}, "fixed": dict(sorted(self.fixed.items()))}


def shipped_priors() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in PRIORS_DIR.iterdir() if p.name.endswith(".yaml"))


def load_prior(path: str | os.PathLike, simulator_name: str = "cosmofm") -> BankPrior:
    """Read and check a prior file; every error names `PATH: key` before any compute."""
    path = Path(path)
    if not path.suffix and not path.exists():  # a shipped prior by name
        shipped = PRIORS_DIR / f"{path.name}.yaml"
        if not shipped.is_file():
            raise InputError("--prior", f"no shipped prior named {str(path)!r}", f"use one of {shipped_priors()} or a path to a prior YAML")
        with resources.as_file(shipped) as real:
            return load_prior(real, simulator_name)
    src = str(path)
    if not path.is_file():
        raise InputError(src, "does not exist", f"give the path of a prior YAML file, or a shipped prior: {shipped_priors()}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(src, f"is not valid YAML ({e})", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise InputError(src, "is not a mapping", "write card:, sampling: and parameters: entries")
    unknown = sorted(set(raw) - set(PRIOR_KEYS))
    if unknown:
        raise InputError(f"{src}: {unknown[0]}", "is not a prior-file key", f"use {list(PRIOR_KEYS)}")
    sampling = raw.get("sampling", "latin-hypercube")
    if sampling not in SAMPLINGS:
        raise InputError(f"{src}: sampling", f"unknown sampling {sampling!r}", f"use one of {list(SAMPLINGS)}")
    card_ref, card = _prior_card(raw.get("card"), path)
    own = raw.get("parameters")
    if not isinstance(own, dict) or not own:
        raise InputError(f"{src}: parameters", "is missing or not a mapping", "give e.g. parameters: {HII_EFF_FACTOR: [10, 250], OMm: 0.31}")
    sim = simulator(simulator_name)
    defaults = SimParams().to_dict()
    ranges, fixed = {}, {}
    card_params = {canonical_name(k): v for k, v in card.parameters.items()}
    for key, value in own.items():
        where = f"{src}: parameters.{key}"
        name = canonical_name(str(key))
        if name not in {f.name for f in dataclasses.fields(SimParams)}:
            raise InputError(where, "is not a parameter of the 21cm model", f"use one of {sorted(f.name for f in dataclasses.fields(SimParams))}")
        value = _prior_value(value, where)
        reason = sim.ignores(name, card.quantity)
        # a drawn label of nothing: an inference head would learn its prior and look calibrated; a fixed
        # value away from the default: a label that claims physics the simulator did not run
        if reason is not None and (isinstance(value, list) or value != defaults[name]):
            raise InputError(where, f"the {sim.name} simulator ignores it: {reason}", f"drop it from the prior, or fix it at its default {defaults[name]:g}")
        card_params[name] = value
    for name, value in card_params.items():
        if isinstance(value, (list, tuple)):
            ranges[name] = (float(value[0]), float(value[1]))
        else:
            fixed[name] = value
    ranges = dict(sorted(ranges.items()))
    named = {canonical_name(str(k)) for k in own}
    for name in set(card_params) - named:  # the card's own: drawn, or fixed away from the default, the simulator must read
        drawn = name in ranges
        if (drawn or fixed[name] != defaults.get(name)) and sim.ignores(name, card.quantity) is not None:
            raise InputError(f"{card.name}.field.parameters.{name}", f"is {'drawn' if drawn else 'set'} by the card but the {sim.name} simulator ignores it",
                             f"fix it at its default in {src}: parameters.{name}")
    fields.check_priors(card, fixed, ranges, f"{src}: ")
    bank_card = dataclasses.replace(card, parameters={**fixed, **{k: list(v) for k, v in ranges.items()}})
    return BankPrior(src, card_ref, bank_card, sampling, ranges, fixed,
                     str(raw.get("description") or ""), str(raw.get("citation") or ""))


def _prior_card(ref: Any, prior_path: Path) -> tuple[str, FieldCard]:
    where = f"{prior_path}: card"
    if not isinstance(ref, str) or not ref:
        raise InputError(where, "is missing", "name a lightcone card, e.g. card: lightcone-21cm, or a YAML path")
    target = ref
    if Path(ref).suffix and not Path(ref).is_absolute():
        target = str(prior_path.parent / ref)  # a card next to its prior: the pair moves together
    try:
        card = load_card(target)
    except InputError as e:
        raise InputError(where, f"{ref!r} does not load ({e})", "name a shipped card or a card YAML path") from None
    if not isinstance(card, FieldCard) or not card.lightcone or card.quantity not in fields.QUANTITIES:
        raise InputError(where, f"{card.name} is not a lightcone field card (a bank row is one whole lightcone)",
                         "use a field card with lightcone: true, e.g. lightcone-21cm")
    return ref, card


def _prior_value(value: Any, where: str):
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(number(v) for v in value):
            raise InputError(where, f"{value!r} is not a range [low, high]", "give a number, or a two-element list [low, high]")
        if not value[0] < value[1]:
            raise InputError(where, f"[{value[0]}, {value[1]}] is empty or reversed (low must be below high)", f"write [{min(value)}, {max(value)}], or a number to fix it")
        return [float(value[0]), float(value[1])]
    if not number(value):
        raise InputError(where, f"{value!r} is not a number or [low, high]", "give a number, or a two-element list [low, high]")
    return value


# ---------------------------------------------------------------------------- the design


def latin_hypercube(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) points in [0, 1)^d, one per 1/n bin of every column, deterministic in (seed, n, d).

    Each column is a random permutation of the n bins with a uniform jitter inside its bin
    (McKay et al. 1979; what scipy.stats.qmc.LatinHypercube does, without scipy as a dependency).
    """
    rng = np.random.default_rng([seed, _DESIGN_STREAM, n, d])
    bins = np.stack([rng.permutation(n) for _ in range(d)], axis=1)  # (n, d)
    return (bins + rng.uniform(size=(n, d))) / n


def design(prior: BankPrior, n: int, seed: int) -> np.ndarray:
    """(n, len(prior.names)) parameter values of the bank's lightcones, columns in prior.names order."""
    if not prior.ranges:
        return np.zeros((n, 0))
    if prior.sampling == "prior":
        # per lightcone, exactly the card's own draw for realisation i: rows do not depend on n
        return np.array([[fields.draw_params(prior.card, seed, i)[1][name] for name in prior.names] for i in range(n)])
    lo, hi = (np.array([r[k] for r in prior.ranges.values()]) for k in (0, 1))
    return lo + latin_hypercube(n, len(lo), seed) * (hi - lo)
