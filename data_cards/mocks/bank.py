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
import functools
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import fields
from cosmofm.data_cards.mocks.common import object_rng
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import FieldCard
from cosmofm.data_cards.workers import in_parallel
from cosmofm.data_cards.mocks.bank_prior import (  # noqa: F401 (re-exported: the bank's API)
    PRIORS_DIR, SAMPLINGS, SIMULATORS, BankPrior, Simulator, design, latin_hypercube, load_prior, shipped_priors, simulator,
)

BANK_FORMAT = "cosmofm-bank-1"
SHARD_BYTES = 256 * 2**20  # default shard: ~256 MB of values + ivar (within the 100-500 MB a Hub shard should be)


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


def _rows(bank: Bank, indices: Sequence[int], workers: int) -> Iterator[Sample]:
    """Rows of `indices` in order, made by `workers` processes (forked where the OS has it, as
    generators.generate: workers inherit the imported modules instead of re-importing them;
    the bank goes to each worker once). One lightcone per piece of work: a lightcone takes
    seconds, so per-item overhead is nothing and the ordered results never wait on a long chunk."""
    return in_parallel(functools.partial(simulate_row, bank), indices, min(workers, len(indices)), processes=True, picklable=True)


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
