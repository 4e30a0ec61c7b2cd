"""The SDC2 scorer on hand-made catalogues: perfect match, false positive, frequency shift,
property terms, one-to-one assignment, units and bad input."""

import time

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table

from cosmofm.data_cards.errors import InputError
from cosmofm.heads.sdc2_score import C_KMS, HI_REST_HZ, THRESHOLDS, score_catalogue


def _truth(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return Table({
        "ra": (0.01 * np.arange(n)) * u.deg,  # 36 arcsec apart, larger than any match window
        "dec": np.full(n, -30.0) * u.deg,
        "central_freq": rng.uniform(1.0e9, 1.1e9, n) * u.Hz,
        "line_flux_integral": rng.uniform(20, 200, n) * u.Jy * u.Hz,
        "hi_size": rng.uniform(8, 20, n) * u.arcsec,
        "w20": rng.uniform(100, 300, n) * u.km / u.s,
        "pa": rng.uniform(0, 360, n) * u.deg,
        "i": rng.uniform(20, 80, n) * u.deg,
    })


def _spectral_size(t, k):
    return float(t["w20"][k] * t["central_freq"][k] ** 2 / (C_KMS * HI_REST_HZ))


def test_perfect_match_scores_one_per_source():
    t = _truth()
    r = score_catalogue(t.copy(), t)
    assert r.n_match == 5 and r.n_false == 0
    np.testing.assert_allclose(r.source_scores, 1.0)
    assert r.total == pytest.approx(5.0)
    assert r.completeness == 1.0 and r.purity == 1.0
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in r.median_errors().values())


def test_false_positive_subtracts_one():
    t = _truth()
    s = t.copy()
    s.add_row([10.0, 10.0, 1.05e9, 50.0, 10.0, 200.0, 0.0, 45.0])  # nowhere near a source
    r = score_catalogue(s, t)
    assert r.n_match == 5 and r.n_false == 1
    assert r.total == pytest.approx(4.0)
    assert r.purity == pytest.approx(5 / 6)


def test_frequency_shift_beyond_line_width_unmatches():
    t = _truth()
    s = t.copy()
    s["central_freq"][0] = t["central_freq"][0] + 1.1 * _spectral_size(t, 0)
    r = score_catalogue(s, t)
    assert r.n_match == 4 and r.n_false == 1
    assert r.total == pytest.approx(3.0)  # 4 perfect sources, 1 false detection, 1 missed
    assert r.completeness == pytest.approx(0.8)
    # inside the window, the frequency term is threshold / (|dnu| / spectral size)
    s["central_freq"][0] = t["central_freq"][0] + 0.6 * _spectral_size(t, 0)
    r = score_catalogue(s, t)
    assert r.n_match == 5
    assert r.property_scores["central_freq"][0] == pytest.approx(0.3 / 0.6)


def test_flux_error_gives_threshold_over_error():
    t = _truth()
    s = t.copy()
    s["line_flux_integral"][2] = 1.25 * t["line_flux_integral"][2]
    r = score_catalogue(s, t)
    k = list(r.truth_index).index(2)
    assert r.property_scores["line_flux_integral"][k] == pytest.approx(THRESHOLDS["line_flux_integral"] / 0.25)
    assert r.source_scores[k] == pytest.approx((6 + 0.4) / 7)
    assert r.total == pytest.approx(4 + 6.4 / 7)


def test_angle_terms_wrap_and_are_absolute():
    t = _truth(2)
    s = t.copy()
    t["pa"][0], s["pa"][0] = 355.0, 5.0  # 10 deg across 0
    t["pa"][1], s["pa"][1] = 90.0, 270.0  # the wrong (approaching) half: 180 deg
    s["i"][1] = t["i"][1] + 20.0
    r = score_catalogue(s, t)
    assert r.errors["pa"] == pytest.approx([10.0, 180.0])
    assert r.property_scores["pa"] == pytest.approx([1.0, 10.0 / 180.0])
    assert r.property_scores["i"][1] == pytest.approx(0.5)


def test_one_candidate_per_truth_the_best_wins():
    t = _truth(1)
    good, bad = t.copy(), t.copy()
    bad["line_flux_integral"][0] *= 1.5
    bad["ra"][0] = t["ra"][0] + 2.0 / 3600  # 2 arcsec off
    s = Table(np.concatenate([bad.as_array(), good.as_array()]))  # bare floats: SDC2 units
    r = score_catalogue(s, t)
    assert r.n_match == 1 and r.n_false == 1
    assert list(r.candidate_index) == [1]
    assert r.total == pytest.approx(0.0)


def test_units_are_converted_and_bad_units_refused():
    t = _truth()
    s = t.copy()
    s["hi_size"] = s["hi_size"].to(u.arcmin)
    s["central_freq"] = s["central_freq"].to(u.MHz)
    s["w20"] = s["w20"].to(u.m / u.s)
    assert score_catalogue(s, t).total == pytest.approx(5.0)
    s["w20"] = np.asarray(t["w20"]) * u.Hz
    with pytest.raises(InputError, match="submission.w20"):
        score_catalogue(s, t)
    s.remove_column("w20")
    with pytest.raises(InputError, match="missing SDC2 column"):
        score_catalogue(s, t)
    with pytest.raises(InputError, match="astropy Table"):
        score_catalogue({"ra": [1.0]}, t)
    bad = t.copy()
    bad["line_flux_integral"][0] = np.nan
    with pytest.raises(InputError, match="truth.line_flux_integral"):
        score_catalogue(t, bad)


def test_empty_submission_and_nan_properties():
    t = _truth()
    r = score_catalogue(t[:0], t)
    assert r.n_match == 0 and r.total == 0.0 and r.completeness == 0.0
    s = t.copy()
    s["pa"][0] = np.nan  # an unmeasured property scores 0, the source still matches
    r = score_catalogue(s, t)
    assert r.n_match == 5 and r.property_scores["pa"][0] == 0.0


def test_large_catalogues_score_in_seconds():
    rng = np.random.default_rng(3)
    n = 50_000
    t = Table({
        "ra": rng.uniform(-1, 1, n) % 360 * u.deg, "dec": rng.uniform(-31, -29, n) * u.deg,
        "central_freq": rng.uniform(0.95e9, 1.15e9, n) * u.Hz, "line_flux_integral": 10 ** rng.uniform(0, 2, n) * u.Jy * u.Hz,
        "hi_size": rng.uniform(3, 40, n) * u.arcsec, "w20": rng.uniform(50, 500, n) * u.km / u.s,
        "pa": rng.uniform(0, 360, n) * u.deg, "i": rng.uniform(0, 90, n) * u.deg,
    })
    s = t.copy()
    s["ra"] = s["ra"] + rng.normal(0, 1, n) / 3600 * u.deg
    t0 = time.perf_counter()
    r = score_catalogue(s, t)
    assert time.perf_counter() - t0 < 10.0
    assert r.n_match >= 0.99 * n
    assert set(r.binned) >= {"completeness", "purity", "flux_edges"}


def test_cosmofm_score_reads_catalogue_files_and_writes_the_summary(tmp_path, capsys):
    import json

    from astropy.table import vstack

    from cosmofm.cli import main

    truth = _truth()
    spurious = _truth(1, seed=9)
    spurious["ra"] = [10.0] * u.deg  # far from every true source: a false detection
    truth.write(tmp_path / "truth.fits")
    vstack([truth, spurious]).write(tmp_path / "found.ecsv")
    assert main(["score", str(tmp_path / "found.ecsv"), str(tmp_path / "truth.fits"), "--output", str(tmp_path / "score.json")]) == 0
    summary = json.loads((tmp_path / "score.json").read_text())
    assert summary == json.loads(capsys.readouterr().out)
    assert (summary["n_match"], summary["n_false"]) == (5, 1) and summary["score"] == pytest.approx(4.0)
    assert summary["purity"] == pytest.approx(5 / 6) and summary["completeness"] == 1.0
    assert main(["score", str(tmp_path / "missing.fits"), str(tmp_path / "truth.fits")]) == 2
    assert "missing.fits: does not exist" in capsys.readouterr().err
