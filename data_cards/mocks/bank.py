"""A simulation bank: whole 21cm lightcones on a design over a prior, sharded, resumable.

    cosmofm mock lightcones --prior data_cards/priors/neutsch2022.yaml --n 2000 --out bank/ --workers 8

A prior file (YAML) names a lightcone card (geometry: box, cells, redshift range; and its
fixed parameters), how to sample, and the parameters, 21cmFAST names as in `SimParams`
(a number fixes one, [low, high] draws it):

    card: lightcone-21cm              # a shipped card name, or a YAML path (relative to this file)
    sampling: latin-hypercube         # or: prior (independent uniform draws per lightcone)
    parameters: {HII_EFF_FACTOR: [10, 250], ION_Tvir_MIN: [4.0, 5.3], OMm: [0.2, 0.4], L_X: 40.5}

The prior's parameters are laid over the card's (the prior wins); every [low, high] of the
result is one dimension of the design. A Latin hypercube (McKay, Beckman & Conover 1979)
puts exactly one of the n lightcones in each 1/n bin of every parameter, so a bank of a
few thousand covers a 5-6 dimensional prior evenly where independent draws leave holes;
it depends only on (seed, n). `sampling: prior` draws each lightcone alone, exactly as the
card's own mocks do (`fields.draw_params`), so rows do not depend on n.

Row i (`bank_index` i) is one WHOLE lightcone on the card's fixed redshift grid
(`fields.lightcone_grid`), simulated with the design's parameters and the density seed of
realisation i (as `fields.mock_field`), then observed as the card's mocks are: with the card's
`instrument` block by `fields.observe_field` (beam, SKA-Low thermal noise, wedge cut; ivar per
slice), else plus the card's white noise (`noise_sigma`, sets ivar). Its meta labels are every parameter the model reads (drawn and fixed) and the
lightcone's mean neutral fraction `xHI_mean`. Rows depend only on (prior, seed, n, i), so
any number of worker processes writes the same bank.

Layout of OUT:
    bank.json          what the bank is (prior, seed, n, sampling, simulator and version,
                       card, design) and the finished shards with their files' sha256;
                       rewritten atomically after each shard
    README.md          a Hugging Face dataset card with the prior table
    shard-00000/ ...   `hf_io.write_dataset` folders of `shard_size` lightcones each

A rerun of the same command verifies the finished shards, skips them and makes the rest (a
shard is written to a temporary folder and moved into place, so a crash never leaves half a
shard behind; one that fails its sha256 is made again); another prior, seed, n, simulator
or shard size in the same OUT is refused (`overwrite=True` replaces the bank).
`open_bank` reads a finished bank back as one `datasets.Dataset`, `bank_samples` as Samples.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import yaml

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import fields
from cosmofm.data_cards.mocks.common import object_rng
from cosmofm.data_cards.mocks.sim21cm.params import SimParams, canonical_name, inert_reason
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import FieldCard, load_card

BANK_FORMAT = "cosmofm-bank-1"
SAMPLINGS = ("latin-hypercube", "prior")
PRIOR_KEYS = ("card", "sampling", "parameters", "description", "citation")
SHARD_BYTES = 256 * 2**20  # default shard: ~256 MB of values + ivar (within the 100-500 MB a Hub shard should be)
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


# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Bank:
    """Everything that defines the bank's rows (picklable: workers get a copy)."""

    prior: BankPrior
    n: int
    seed: int
    simulator: str
    shard_size: int
    values: np.ndarray  # (n, d) design

    def row_card(self, index: int) -> FieldCard:
        """The card with every parameter fixed at the design row `index`."""
        drawn = {k: float(v) for k, v in zip(self.prior.names, self.values[index])}
        return dataclasses.replace(self.prior.card, parameters={**self.prior.fixed, **drawn})

    def key(self) -> dict[str, Any]:
        """What a rerun must match to resume into the same folder (JSON-normalised)."""
        key = {"prior": self.prior.to_dict(), "card": self.prior.card.to_dict(), "seed": self.seed, "n": self.n,
               "simulator": {"name": self.simulator, "version": SIMULATORS[self.simulator].version()}, "shard_size": self.shard_size}
        return json.loads(json.dumps(key))

    def shards(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of the shards."""
        return [(s, min(s + self.shard_size, self.n)) for s in range(0, self.n, self.shard_size)]


def simulate_row(bank: Bank, index: int) -> Sample:
    """Bank row `index`: one whole lightcone (D, H, W) with its parameters as labels."""
    card = bank.row_card(index)
    values, x_hi, _params, labels = SIMULATORS[bank.simulator].simulate(card, bank.seed, index)
    z, los = fields.lightcone_grid(card)
    labels = dict(labels)
    if x_hi is not None:
        labels["xHI_mean"] = float(np.mean(x_hi))
    if card.instrument is not None:  # beam, thermal noise, wedge on the whole lightcone, as the card's mocks observe it
        values, ivar = fields.observe_field(card, values, z, fields.noise_seed(bank.seed, index))
    else:  # the card's white noise, as mock_field
        values = values + object_rng(bank.seed, index, 4).normal(0.0, card.noise_sigma, values.shape)
        ivar = np.full(values.shape, 1 / card.noise_sigma**2, dtype=np.float32)
    cell = card.box_size.to_value("Mpc") / card.n_cells
    transverse = (np.arange(card.n_cells) - (card.n_cells - 1) / 2) * cell
    meta = {"card": card.name, "id": f"{card.name}-bank-{bank.seed}-{index}", "bank_index": index,
            "simulator": bank.simulator, "simulator_version": SIMULATORS[bank.simulator].version(), "labels": labels}
    return Sample("field", np.asarray(values, np.float32), np.asarray(ivar, np.float32),
                  {"los_distance": los, "y_comoving": transverse, "x_comoving": transverse}, meta)


_WORKER_BANK: Bank | None = None


def _init_worker(bank: Bank) -> None:
    global _WORKER_BANK
    _WORKER_BANK = bank


def _worker_row(index: int) -> Sample:
    return simulate_row(_WORKER_BANK, index)


def _rows(bank: Bank, indices: Sequence[int], workers: int) -> Iterator[Sample]:
    """Rows of `indices` in order, made by `workers` processes (fork where the OS has it, as
    generators.generate: workers inherit the imported modules instead of re-importing them)."""
    if workers <= 1 or len(indices) <= 1:
        for i in indices:
            yield simulate_row(bank, i)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(indices)), _init_worker, (bank,)) as pool:
        # chunksize 1: a lightcone takes seconds, so per-task overhead is nothing and the
        # ordered imap never waits on a long chunk
        yield from pool.imap(_worker_row, indices, chunksize=1)


# ---------------------------------------------------------------------------- the bank folder


@dataclass
class BankReport:
    out: Path
    n: int
    shards_written: int
    shards_skipped: int
    seconds: float


def default_shard_size(card: FieldCard) -> int:
    """Lightcones per shard so that a shard holds ~SHARD_BYTES (values + ivar, float32)."""
    n_los = len(fields.lightcone_grid(card)[0])
    per = 2 * 4 * n_los * card.n_cells**2
    return max(1, SHARD_BYTES // per)


def build_bank(prior: str | os.PathLike | BankPrior, n: int, out: str | os.PathLike, seed: int = 0, workers: int = 1,
               shard_size: int | None = None, simulator_name: str = "cosmofm", overwrite: bool = False,
               progress: bool = False) -> BankReport:
    """Make (or finish) the bank of `n` lightcones of `prior` in `out`; see the module docstring.

    Every check (prior file, n, seed, workers, shard size, simulator, what `out` holds) runs
    before any lightcone is simulated.
    """
    from tqdm.auto import tqdm

    from cosmofm.data_cards.io.hf_io import write_dataset

    t0 = time.perf_counter()
    prior = prior if isinstance(prior, BankPrior) else load_prior(prior, simulator_name)
    for flag, value, low in (("--n", n, 1), ("--seed", seed, 0), ("--workers", workers, 1), ("--shard-size", shard_size, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise InputError(flag, f"must be an integer >= {low}, got {value!r}", f"give {flag} {max(low, 1)} or more")
    simulator(simulator_name)
    out = Path(out)
    bank = Bank(prior, n, seed, simulator_name, shard_size or default_shard_size(prior.card), design(prior, n, seed))
    manifest = _open_folder(out, bank, overwrite)
    done = _verified_shards(out, manifest, {_shard_name(s, bank): [s, e] for s, e in bank.shards()})
    todo = [(s, e) for s, e in bank.shards() if _shard_name(s, bank) not in done]
    manifest["shards"] = [done[k] for k in sorted(done)]
    _save(out, manifest, bank)
    bar = tqdm(total=n, initial=n - sum(e - s for s, e in todo), desc=f"bank {prior.card.name}", unit="lightcone", disable=not progress)
    rows = _rows(bank, [i for s, e in todo for i in range(s, e)], workers)
    try:
        for start, stop in todo:
            name = _shard_name(start, bank)
            shutil.rmtree(out / name, ignore_errors=True)  # a shard not in bank.json, or one that failed its sha256
            write_dataset(_counted(itertools.islice(rows, stop - start), bar), out / name, [prior.card],
                          pretty_name=f"{prior.card.name} bank, rows {start}-{stop - 1}")
            manifest["shards"].append({"name": name, "rows": [start, stop], "files": _files(out / name)})
            manifest["shards"].sort(key=lambda s: s["rows"][0])
            _save(out, manifest, bank)
    finally:
        rows.close()  # stops the worker pool, also after an error
        bar.close()
    return BankReport(out, n, len(todo), len(bank.shards()) - len(todo), time.perf_counter() - t0)


def _shard_name(start: int, bank: Bank) -> str:
    return f"shard-{start // bank.shard_size:05d}"


def _counted(samples: Iterator[Sample], bar) -> Iterator[Sample]:
    for s in samples:
        yield s
        bar.update()


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    from cosmofm.data_cards.io.atomic import sha256_file

    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _open_folder(out: Path, bank: Bank, overwrite: bool) -> dict[str, Any]:
    """The manifest to continue: a fresh one, or the folder's own when it holds this bank."""
    fresh = {"format": BANK_FORMAT, "key": bank.key(), "design": {"names": bank.prior.names, "values": bank.values.tolist()},
             "shards": [], "complete": False}
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}", "is a file", "give a folder for the bank")
    path = out / "bank.json"
    if not out.exists() or not any(out.iterdir()):
        return fresh
    if not path.is_file():
        raise InputError(f"--out {out}", "exists and holds no bank (no bank.json); refusing to write into it", "choose a new or empty folder")
    if overwrite:  # only what a bank writes goes; anything else in the folder stays
        for p in out.iterdir():
            if p.name in ("bank.json", "README.md") or p.name.startswith(("shard-", ".shard-")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return fresh
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(str(path), f"is not valid JSON ({e})", "pass --overwrite to make the bank again") from None
    if not isinstance(old, dict) or old.get("format") != BANK_FORMAT:
        raise InputError(str(path), f"is not a {BANK_FORMAT} manifest", "pass --overwrite to make the bank again, or choose a new folder")
    if old.get("key") != fresh["key"]:
        differ = _differences(old.get("key") or {}, fresh["key"])
        raise InputError(f"--out {out}", f"holds a bank of another {differ}", "use a new --out, rerun with the bank's own settings, or pass --overwrite to replace it")
    for p in out.glob(".shard-*"):  # write_dataset's staging folders left by a killed run
        shutil.rmtree(p, ignore_errors=True)
    return {**fresh, "shards": old.get("shards") or []}


def _differences(old: dict, new: dict) -> str:
    names = {"prior": "prior", "card": "card", "seed": "seed", "n": "n", "simulator": "simulator", "shard_size": "shard size"}
    parts = []
    for k, label in names.items():
        if old.get(k) != new.get(k):
            parts.append(f"{label} ({_short(old.get(k))}, not {_short(new.get(k))})")
    return ", ".join(parts) or "format"


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _verified_shards(out: Path, manifest: dict, expected: dict[str, list[int]]) -> dict[str, dict]:
    """The manifest's shards that are the expected ones (name and rows) and whose files all
    match their sha256; the rest are made again."""
    from cosmofm.data_cards.io.atomic import sha256_file

    def intact(folder: Path, rel: str, entry: dict) -> bool:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:  # a manifest never points outside its shard
            return False
        path = folder.joinpath(*parts)
        return path.is_file() and path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry.get("sha256")

    good = {}
    for shard in manifest.get("shards") or []:
        name = shard.get("name") if isinstance(shard, dict) else None
        if name not in expected or shard.get("rows") != expected[name] or not isinstance(shard.get("files"), dict) or not shard["files"]:
            continue
        if (out / name).is_dir() and all(intact(out / name, rel, f) for rel, f in shard["files"].items()):
            good[name] = shard
    return good


def _save(out: Path, manifest: dict, bank: Bank) -> None:
    from cosmofm.data_cards.io.atomic import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    rows = sum(s["rows"][1] - s["rows"][0] for s in manifest["shards"])
    manifest["complete"] = rows == bank.n
    atomic_write_json(out / "bank.json", manifest)
    atomic_write_bytes(out / "README.md", dataset_card(bank, rows).encode())


def dataset_card(bank: Bank, rows: int) -> str:
    """README.md: the Hugging Face dataset card of the shards' card, then the bank's prior and design."""
    from cosmofm.data_cards.io.hf_io import dataset_card_text

    p = bank.prior
    text = dataset_card_text([p.card], {p.card.name: rows}, pretty_name=f"{p.card.name} simulation bank ({bank.n} lightcones)")
    lines = ["", "## Simulation bank", "",
             f"{rows} of {bank.n} lightcones written ({'complete' if rows == bank.n else 'incomplete: rerun the same command to finish'}), "
             f"in shards `shard-NNNNN/` of {bank.shard_size}; one row = one whole lightcone on the card's fixed redshift grid.", "",
             f"- simulator: `{bank.simulator}` {SIMULATORS[bank.simulator].version()}",
             f"- design: {p.sampling}" + (" (one lightcone per 1/n bin of every parameter; McKay et al. 1979)" if p.sampling == "latin-hypercube" else
                                          " (independent uniform draws per lightcone)") + f", seed {bank.seed}",
             f"- prior file: `{Path(p.source).name}`, card `{p.card_ref}`", ""]
    if p.description:
        lines += [p.description.strip(), ""]
    lines += ["| parameter | low | high |", "|---|---|---|"] + [f"| {k} | {lo:g} | {hi:g} |" for k, (lo, hi) in p.ranges.items()]
    lines += ["", "Fixed: " + (", ".join(f"{k} = {v:g}" for k, v in sorted(p.fixed.items())) or "none (simulator defaults)"), ""]
    if p.citation:
        lines += [f"**Prior from:** {p.citation.strip()}", ""]
    lines += ["Labels in `meta`: the parameters above (drawn and fixed) the simulator reads, `xHI_mean`, and `bank_index`.", "",
              "Load every shard, checked against `bank.json`:", "", "```python",
              "from cosmofm.data_cards.mocks.bank import open_bank, bank_samples",
              'ds = open_bank("path/to/this/folder")       # one datasets.Dataset', 'samples = bank_samples("path/to/this/folder")  # Samples', "```", ""]
    return text + "\n".join(lines)


# ---------------------------------------------------------------------------- reading


def _finished(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The shard folders of a complete bank whose files all match bank.json, in row order."""
    from cosmofm.data_cards.io.atomic import read_json

    path = Path(path)
    manifest = read_json(path / "bank.json", "bank manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
        raise InputError(str(path / "bank.json"), f"is not a {BANK_FORMAT} manifest", "point to a folder written by `cosmofm mock lightcones --prior`")
    n, size = manifest["key"]["n"], manifest["key"]["shard_size"]
    expected = {f"shard-{s // size:05d}": [s, min(s + size, n)] for s in range(0, n, size)}
    listed = {s.get("name") for s in manifest["shards"]}
    missing = [name for name in expected if name not in listed]
    if missing:
        raise InputError(str(path), f"holds {n - sum(e - s for name, (s, e) in expected.items() if name in missing)} of {n} lightcones",
                         "rerun the command that made it to finish the bank")
    good = _verified_shards(path, manifest, expected)
    bad = [name for name in expected if name not in good]
    if bad:
        raise InputError(str(path / bad[0]), "does not match its sha256 in bank.json (corrupt or changed)", "rerun the command that made the bank: it makes such shards again")
    return path, [path / name for name in expected]


def open_bank(path: str | os.PathLike):
    """A finished bank as one `datasets.Dataset` (rows in bank_index order), shards verified first."""
    import datasets

    _path, shards = _finished(path)
    return datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards])


class BankSamples:
    """A finished bank as a sequence of `Sample`s (memory-mapped, shards verified), for torch DataLoaders."""

    def __init__(self, path: str | os.PathLike):
        from cosmofm.data_cards.io.hf_io import SampleDataset

        self.path, shards = _finished(path)
        self._parts = [SampleDataset(s) for s in shards]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Sample:
        i = int(index) + (len(self) if int(index) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} lightcones")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._parts[k][i - int(self._starts[k])]

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def bank_samples(path: str | os.PathLike) -> BankSamples:
    return BankSamples(path)
