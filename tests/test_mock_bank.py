"""The simulation bank (data_cards/mocks/bank.py): design, labels, resume after a crash,
corrupt shards, bad prior files, the CLI. A tiny card (16 Mpc, 8^2 cells, z 6-9: 489 slices,
~0.2 s a lightcone) keeps the file to seconds."""

import dataclasses
import json

import numpy as np
import pytest
import yaml

from cosmofm.cli import main
from cosmofm.data_cards import InputError
from cosmofm.data_cards.mocks import bank as bank_mod
from cosmofm.data_cards.mocks import fields
from cosmofm.data_cards.mocks.bank import build_bank, bank_samples, design, latin_hypercube, load_prior, open_bank
from cosmofm.data_cards.schema import load_card

REAL = bank_mod.SIMULATORS["cosmofm"]  # the simulator itself, before any test wraps it
RANGES = {"HII_EFF_FACTOR": [10.0, 100.0], "ION_Tvir_MIN": [4.0, 5.3], "L_X": [38.0, 42.0]}


def _card(tmp_path, quantity="brightness_temperature", name="tiny-lc"):
    raw = {"name": name, "modality": "field", "survey": "test bank", "license": "CC-BY-4.0",
           "field": {"box_size": "16 Mpc", "n_cells": 8, "los_cells": 8, "redshift_min": 6.0, "redshift_max": 9.0,
                     "quantity": quantity, "unit": "mK" if quantity == "brightness_temperature" else "", "lightcone": True,
                     "parameters": {"R_BUBBLE_MAX": 8.0}, "noise_sigma": 1.0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _prior(tmp_path, card="tiny-lc.yaml", name="prior.yaml", **entries):
    raw = {"card": card, "sampling": "latin-hypercube", "parameters": {**RANGES, "OMm": 0.31}, **entries}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def prior(tmp_path):
    _card(tmp_path)
    return _prior(tmp_path)


class Counting:
    """The real simulator, counting calls per index, raising once at `fail_at` (a crash mid-bank)."""

    def __init__(self, fail_at=None):
        self.real, self.calls, self.fail_at = REAL, [], fail_at

    def install(self, monkeypatch):
        sim = bank_mod.Simulator("cosmofm", self.simulate, self.real.ignores, self.real.version)
        monkeypatch.setitem(bank_mod.SIMULATORS, "cosmofm", sim)
        return self

    def simulate(self, card, seed, index):
        self.calls.append(index)
        if index == self.fail_at:
            raise RuntimeError(f"simulated crash at lightcone {index}")
        return self.real.simulate(card, seed, index)


def test_latin_hypercube_is_stratified_and_deterministic(prior):
    u = latin_hypercube(40, 3, seed=5)
    assert u.shape == (40, 3) and np.all((u >= 0) & (u < 1))
    for column in u.T:  # exactly one point in each 1/n bin
        assert sorted(np.floor(column * 40).astype(int)) == list(range(40))
    assert np.array_equal(u, latin_hypercube(40, 3, seed=5)) and not np.allclose(u, latin_hypercube(40, 3, seed=6))
    p = load_prior(prior)
    assert p.names == sorted(RANGES) and p.fixed == {"OMm": 0.31, "R_BUBBLE_MAX": 8.0}
    values = design(p, 25, seed=1)
    for j, name in enumerate(p.names):
        lo, hi = RANGES[name]
        assert sorted(np.floor((values[:, j] - lo) / (hi - lo) * 25).astype(int)) == list(range(25))
    assert np.array_equal(values, design(p, 25, seed=1))


def test_bank_rows_carry_the_design_as_labels_for_any_worker_count(prior, tmp_path):
    r1 = build_bank(prior, 4, tmp_path / "w1", seed=3, workers=1, shard_size=3)
    build_bank(prior, 4, tmp_path / "w2", seed=3, workers=2, shard_size=3)
    assert (r1.shards_written, r1.shards_skipped) == (2, 0)
    manifest = json.loads((tmp_path / "w1" / "bank.json").read_text())
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [[0, 3], [3, 4]]
    names, rows = manifest["design"]["names"], np.array(manifest["design"]["values"])
    one, two = bank_samples(tmp_path / "w1"), bank_samples(tmp_path / "w2")
    p = load_prior(prior)
    z, d = fields.lightcone_grid(load_card(tmp_path / "tiny-lc.yaml"))
    assert len(one) == len(two) == 4
    for i in range(4):
        s = one[i]
        assert s.meta["bank_index"] == i and s.shape == (len(z), 8, 8)
        labels = s.meta["labels"]
        assert [labels[k] for k in names] == rows[i].tolist()  # the design row, exactly
        assert labels["OMm"] == 0.31 and labels["R_BUBBLE_MAX"] == 8.0
        # xHI_mean is that lightcone's neutral fraction: the card's own mock of realisation i at the row's parameters
        row_card = dataclasses.replace(p.card, parameters={**p.fixed, **{k: labels[k] for k in names}})
        assert labels["xHI_mean"] == float(np.mean(fields.simulate_realisation(row_card, 3, i)[1]))
        assert np.array_equal(s.coords["los_distance"], d)  # the card's fixed grid
        assert np.array_equal(s.values, two[i].values)  # workers change nothing
    assert len(set(rows[:, 0].round(6))) == 4  # distinct lightcones
    ds = open_bank(tmp_path / "w1")
    assert len(ds) == 4 and ds[3]["id"].endswith("-bank-3-3")
    readme = (tmp_path / "w1" / "README.md").read_text()
    assert readme.startswith("---") and "| HII_EFF_FACTOR | 10 | 100 |" in readme and "latin-hypercube" in readme


def test_crash_mid_bank_then_rerun_gives_the_uninterrupted_bank(prior, tmp_path, monkeypatch):
    out = tmp_path / "bank"
    crash = Counting(fail_at=4).install(monkeypatch)
    with pytest.raises(RuntimeError, match="crash at lightcone 4"):
        build_bank(prior, 7, out, seed=0, shard_size=3)
    manifest = json.loads((out / "bank.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000"] and not manifest["complete"]
    assert not (out / "shard-00001").exists() and not list(out.glob(".shard-*"))  # no half-written shard
    with pytest.raises(InputError, match="holds 3 of 7"):
        open_bank(out)
    rerun = Counting().install(monkeypatch)
    report = build_bank(prior, 7, out, seed=0, shard_size=3)
    assert crash.calls == [0, 1, 2, 3, 4] and rerun.calls == [3, 4, 5, 6]  # finished shard 0 not recomputed
    assert (report.shards_written, report.shards_skipped) == (2, 1)
    again = build_bank(prior, 7, out, seed=0, shard_size=3)
    assert (again.shards_written, again.shards_skipped) == (0, 3) and rerun.calls == [3, 4, 5, 6]
    build_bank(prior, 7, tmp_path / "clean", seed=0, shard_size=3)
    resumed, clean = bank_samples(out), bank_samples(tmp_path / "clean")
    assert [s.meta["bank_index"] for s in resumed] == list(range(7))  # no duplicates, no gaps
    for a, b in zip(resumed, clean):
        assert a.id == b.id and np.array_equal(a.values, b.values) and a.meta == b.meta


def test_corrupt_shard_is_detected_and_made_again(prior, tmp_path, monkeypatch):
    out = tmp_path / "bank"
    build_bank(prior, 3, out, seed=2, shard_size=2)
    before = [s.values for s in bank_samples(out)]
    arrow = sorted((out / "shard-00001").glob("*.arrow"))[0]
    data = bytearray(arrow.read_bytes())
    data[-100] ^= 0xFF
    arrow.write_bytes(bytes(data))
    with pytest.raises(InputError, match="shard-00001.*sha256"):
        open_bank(out)
    counter = Counting().install(monkeypatch)
    report = build_bank(prior, 3, out, seed=2, shard_size=2)
    assert (report.shards_written, report.shards_skipped) == (1, 1) and counter.calls == [2]
    assert all(np.array_equal(a, b.values) for a, b in zip(before, bank_samples(out)))


@pytest.mark.parametrize("change, field, problem", [
    ({"parameters": {"FOO": [1, 2]}}, "parameters.FOO", "not a parameter"),
    ({"parameters": {"HII_EFF_FACTOR": [100, 10]}}, "parameters.HII_EFF_FACTOR", "reversed"),
    ({"parameters": {"L_X": [20.0, 42.0]}}, "parameters.L_X", "low end 20.0"),
    ({"parameters": {"OMm": [0.03, 0.4]}}, "parameters.OMm", "OMb < OMm"),
    ({"parameters": {"R_BUBBLE_MAX": [5.0, 12.0]}}, "parameters.R_BUBBLE_MAX", "too small for the bubble scale"),
    ({"parameters": {"NU_X_THRESH": "lots"}}, "parameters.NU_X_THRESH", "not a number"),
    ({"sampling": "sobol"}, ": sampling", "unknown sampling"),
    ({"samplng": "prior"}, ": samplng", "not a prior-file key"),
    ({"card": "sdss-like"}, ": card", "not a lightcone field card"),
])
def test_bad_prior_is_one_error_naming_the_field_before_any_compute(tmp_path, monkeypatch, change, field, problem):
    _card(tmp_path)
    raw = {"card": "tiny-lc.yaml", "sampling": "latin-hypercube", "parameters": dict(RANGES)}
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if key == "parameters" else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    counter = Counting().install(monkeypatch)
    with pytest.raises(InputError) as e:
        build_bank(path, 4, tmp_path / "out", shard_size=2)
    assert e.value.field.startswith(str(path)) and e.value.field.endswith(field) and problem in e.value.problem, str(e.value)
    assert counter.calls == [] and not (tmp_path / "out").exists()


def test_parameter_the_simulator_ignores_and_bad_run_settings(prior, tmp_path, monkeypatch):
    _card(tmp_path, quantity="overdensity", name="tiny-density")
    density = _prior(tmp_path, card="tiny-density.yaml", name="density.yaml")
    counter = Counting().install(monkeypatch)
    with pytest.raises(InputError, match=r"density.yaml: parameters.HII_EFF_FACTOR: the cosmofm simulator ignores it"):
        load_prior(density)
    for kwargs, flag in (({"n": 0}, "--n"), ({"n": 2, "seed": -1}, "--seed"), ({"n": 2, "shard_size": 0}, "--shard-size"),
                         ({"n": 2, "workers": 0}, "--workers"), ({"n": 2, "simulator_name": "gadget"}, "--simulator")):
        with pytest.raises(InputError) as e:
            build_bank(prior, out=tmp_path / "out", **kwargs)
        assert e.value.field == flag
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no bank"):
        build_bank(prior, 2, tmp_path / "other", overwrite=True)
    assert counter.calls == []
    build_bank(prior, 2, tmp_path / "out", seed=0, shard_size=2)
    for kwargs, differ in (({"seed": 1}, "seed (0, not 1)"), ({"n": 3}, "n (2, not 3)"), ({"shard_size": 1}, "shard size")):
        with pytest.raises(InputError, match=r"--out .*holds a bank of another " + differ.replace("(", r"\(").replace(")", r"\)")):
            build_bank(prior, **{"n": 2, "seed": 0, "shard_size": 2, **kwargs}, out=tmp_path / "out")
    (tmp_path / "out" / "keep.txt").write_text("a note beside the bank")
    report = build_bank(prior, 3, tmp_path / "out", seed=1, shard_size=2, overwrite=True)
    assert report.shards_written == 2 and len(bank_samples(tmp_path / "out")) == 3 and (tmp_path / "out" / "keep.txt").exists()


def test_21cmfast_bank_refuses_what_21cmfast_does_not_run_before_any_compute(prior, tmp_path, monkeypatch):
    # A live 21cmFAST row of the tiny card took 155 s here (over the 60 s a test may take), so
    # only the checks run: M_WDM is not passed to 21cmFAST 4 (sim21cm.reference.READS_21CMFAST).
    pytest.importorskip("py21cmfast")
    _card(tmp_path)
    wdm = _prior(tmp_path, name="wdm.yaml", parameters={**RANGES, "M_WDM": [0.3, 10.0]})
    counter = Counting().install(monkeypatch)
    with pytest.raises(InputError, match=r"wdm.yaml: parameters.M_WDM: the 21cmfast simulator ignores it: is not passed to 21cmFAST"):
        build_bank(wdm, 2, tmp_path / "out", simulator_name="21cmfast")
    assert load_prior(prior, "21cmfast").ranges == {k: tuple(v) for k, v in RANGES.items()}  # the others are all passed
    cdm = _prior(tmp_path, name="cdm.yaml", parameters={**RANGES, "M_WDM": 0.0})  # at its default: what 21cmFAST runs
    assert load_prior(cdm, "21cmfast").fixed["M_WDM"] == 0.0
    assert counter.calls == [] and not (tmp_path / "out").exists()


def test_card_instrument_observes_the_whole_lightcone(tmp_path):
    path = _card(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["field"]["instrument"] = {"layout": "AA4", "noise_model": "radiometer", "integration_time": "1000 h", "wedge": "horizon"}
    path.write_text(yaml.safe_dump(raw))
    build_bank(_prior(tmp_path), 1, tmp_path / "out", shard_size=1)
    s = bank_samples(tmp_path / "out")[0]
    sigma = 1 / np.sqrt(s.ivar[:, 0, 0])  # per slice: thermal noise grows with redshift (sky temperature)
    assert np.all(s.ivar == s.ivar[:, :1, :1]) and sigma[-1] > 1.2 * sigma[0]


def test_cli_bank_end_to_end(prior, tmp_path, capsys):
    out = tmp_path / "bank"
    args = ["mock", "lightcones", "--prior", str(prior), "--n", "3", "--out", str(out), "--workers", "1", "--shard-size", "2"]
    assert main(args) == 0
    assert f"to {out}" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 shard(s) made, 2 already done" in capsys.readouterr().out
    assert main(args[:-4] + ["--seed", "1", "--workers", "1", "--shard-size", "2"]) == 2
    assert "holds a bank of another seed" in capsys.readouterr().err
    assert main(["mock", "lightcones", "--n", "1", "--out", str(tmp_path / "x"), "--shard-size", "2"]) == 2
    assert "--shard-size: applies only to a simulation bank" in capsys.readouterr().err
    assert main(["mock", "lightcones", "--prior", "no-such-prior", "--n", "1", "--out", str(tmp_path / "y")]) == 2
    assert "neutsch2022" in capsys.readouterr().err  # lists the shipped priors


def test_shipped_prior_loads_with_the_papers_ranges():
    p = load_prior("neutsch2022")
    assert p.card.name == "lightcone-21cm" and p.sampling == "latin-hypercube"
    assert p.ranges == {"HII_EFF_FACTOR": (10.0, 250.0), "ION_Tvir_MIN": (4.0, 5.3), "L_X": (38.0, 42.0),
                        "NU_X_THRESH": (100.0, 1500.0), "OMm": (0.2, 0.4), "M_WDM": (0.3, 10.0)}
    assert bank_mod.default_shard_size(p.card) == 18  # 1811 x 32^2 float32 values + ivar = 14.8 MB a lightcone
