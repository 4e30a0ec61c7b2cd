"""The deblending bench's training seed (`--train-seed`: the head's initialisation and batch
order) and its mean +- std over seeds (`summarise_seeds`, through `seed_summary`)."""

import dataclasses

import numpy as np
import pytest
import torch

from cosmofm.bench.deblend_quality import TRAIN_SEED, _blends, train_head
from cosmofm.bench.deblend_report import summarise_seeds
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.schema import load_card

CARD = dataclasses.replace(load_card("lsst-like"), stamp_size=64)


def test_one_training_seed_repeats_and_two_differ():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = _blends(CARD, 4, TRAIN_SEED, 1, n_truth=1)  # as the bench: truth only for the blends tuned on
        assert train[0][1] is not None and [t for _, t in train[1:]] == [None] * 3
        runs = [train_head(CARD, train, 2, 2, 1e-3, seed, None, log_every=100) for seed in (1, 1, 2)]
    finally:
        torch.set_num_threads(threads)
    (a, info_a), (b, info_b), (c, info_c) = runs
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and info_a["losses_last"] == info_b["losses_last"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa) and info_a["losses_last"] != info_c["losses_last"]


def _report(seed, f1, mape_bright, rate):
    row = {"f1": f1, "blended_mape_vs_mag": {"0-19": mape_bright, "19-20": 2 * mape_bright}, "stamps_per_s": rate,
           "blended_nmad": f1 / 10, "blended_mape": mape_bright}
    return {"args": {"out": f"/tmp/{seed}", "train_seed": seed, "steps": 1500}, "headline": {"head": row, "sep aperture": dict(row, f1=0.7)},
            "training": {"steps": 1500, "train_s": 700.0 + seed}, "machine": {"loadavg_start": [1.0] * 3, "loadavg_end": [2.0] * 3}}


def test_the_seed_summary_flattens_binned_columns_and_refuses_a_repeated_seed():
    reports = {"a.json": _report(0, 0.9, 10.0, 40.0), "b.json": _report(1, 0.8, 14.0, 44.0)}
    out = summarise_seeds(reports)
    head = out["summary"]["head"]
    assert head["seeds"] == 2 and head["f1"] == pytest.approx([0.85, 0.0707107])
    assert head["blended_mape_vs_mag 19-20"] == pytest.approx([24.0, 5.656854])
    assert out["summary"]["sep aperture"]["f1"] == [0.7, 0.0]  # a deterministic baseline: no spread
    reports["b.json"]["headline"]["head"]["stamps_per_s"] = float("nan")  # a column missing in one run is left out
    assert "stamps_per_s" not in summarise_seeds(reports)["summary"]["head"]
    assert [r["train_seed"] for r in out["runs"]] == [0, 1] and "train_seed" not in out["args"]
    reports["c.json"] = _report(1, 0.7, 9.0, 41.0)
    with pytest.raises(InputError, match="c.json.*seed 1"):
        summarise_seeds(reports)
    # runs of saved heads (--model) are told apart by the head they loaded, whatever --train-seed said
    loaded = {f"{m}.json": dict(_report(0, f1, 10.0, 40.0), training={"loaded": f"/heads/{m}"}) for m, f1 in (("s0", 0.9), ("s1", 0.7))}
    out = summarise_seeds(loaded)
    assert out["summary"]["head"]["f1"] == pytest.approx([0.8, 0.1414214]) and [r["train_seed"] for r in out["runs"]] == ["/heads/s0", "/heads/s1"]
    loaded["again.json"] = dict(_report(0, 0.8, 10.0, 40.0), training={"loaded": "/heads/s1"})
    with pytest.raises(InputError, match="again.json.*/heads/s1"):
        summarise_seeds(loaded)


def test_seed_summaries_of_several_test_settings_are_kept_apart(tmp_path):
    """--seed-summary over runs of two --test-shift settings writes one summary per setting."""
    import json

    from cosmofm.bench.deblend_report import write_seed_summary

    paths = []
    for i, (shift, seed, f1) in enumerate([({}, 0, 0.9), ({}, 1, 0.8), ({"psf_scale": 1.25}, 0, 0.6), ({"psf_scale": 1.25}, 1, 0.4)]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(dict(_report(seed, f1, 10.0, 40.0), test_shift=shift)))
    out = write_seed_summary(paths, tmp_path, "shifts.json")
    assert json.loads((tmp_path / "shifts.json").read_text()) == out and set(out["by_test_shift"]) == {"none", "psf_scale=1.25"}
    assert out["by_test_shift"]["psf_scale=1.25"]["summary"]["head"]["f1"] == pytest.approx([0.5, 0.1414214])
    assert out["by_test_shift"]["none"]["summary"]["head"]["f1"] == pytest.approx([0.85, 0.0707107])
    assert write_seed_summary(paths[:2], tmp_path)["summary"]["head"]["seeds"] == 2  # one setting: the plain summary
    assert (tmp_path / "shifts.png").stat().st_size > 0  # two seeings (1 and 1.25): the figure against the seeing
    assert not (tmp_path / "deblend_quality_seeds.png").exists()  # one seeing: none


def test_head_settings_reach_the_trained_head_and_bad_ones_are_refused():
    import argparse

    from cosmofm.bench.deblend_quality import head_settings

    args = argparse.Namespace(fraction_flux_weight=0.5, head_setting=["flux_correction=false", "embed_size=16"])
    settings = head_settings(args)
    assert settings == {"fraction_flux_weight": 0.5, "flux_correction": False, "embed_size": 16}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = train_head(CARD, _blends(CARD, 2, TRAIN_SEED, 1, n_truth=0), 1, 2, 1e-3, 0, None, log_every=100, **settings)
    finally:
        torch.set_num_threads(threads)
    assert (model.head_config.flux_correction, model.head_config.embed_size, model.head_config.fraction_flux_weight) == (False, 16, 0.5)
    assert model.decoder.out.out_channels == 3 + 6 * (2 + 16) + 16 + 1  # the per-band embeddings are 16 wide
    with pytest.raises(InputError, match="--head-setting"):
        head_settings(argparse.Namespace(fraction_flux_weight=None, head_setting=["embed_size"]))
    with pytest.raises(InputError, match="task.peak_threshold"):
        train_head(CARD, [], 1, 1, 1e-3, 0, None, peak_threshold=2)


def test_error_sources_head_row_is_the_benchs_own_score_of_the_same_fluxes():
    """The "head" estimate of `error_sources` (true centres, no outskirts correction) scores
    the fluxes the bench's no-correction row scores: the same blended and isolated figures."""
    from cosmofm.bench.deblend_quality import summarise
    from cosmofm.bench.deblend_report import error_sources
    from cosmofm.heads.deblend_baseline import fwhm_in_pixels
    from cosmofm.heads.deblending_predict import deblend_samples

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blends = _blends(CARD, 6, 0, 1)
        model, _ = train_head(CARD, blends, 1, 2, 1e-3, 0, None, log_every=100)
        fwhm, ref, bands = fwhm_in_pixels(CARD), 2, [b.name for b in CARD.bands]
        found = error_sources(model, blends, fwhm, ref, batch_size=4)  # two batches, of 4 and 2 blends
        model.head_config.flux_correction = False
        cats = deblend_samples(model, [s for s, _ in blends], positions=[t.pixel_positions for _, t in blends])
        scored = summarise(cats, blends, fwhm, "head", bands, ref)
    finally:
        torch.set_num_threads(threads)
    assert model.head_config.flux_correction is False  # error_sources restored what it was given
    blended = scored["flux_blended"]["r"]
    assert found["head"]["blended"]["n"] == blended["n"] > 5
    assert found["head"]["blended"]["mape"] == pytest.approx(blended["mape"], rel=1e-4)
    assert found["head"]["blended"]["bias"] == pytest.approx(blended["bias"], rel=1e-4, abs=1e-6)
    for name in ("background only", "sources only"):  # the hybrids mend one error each, so they differ from the head
        assert found[name]["blended"]["mape"] != pytest.approx(found["head"]["blended"]["mape"], rel=1e-3)


def test_a_saved_head_is_scored_again_without_training(tmp_path):
    """`--save-model` then `--model`: the second run loads the head instead of training one and
    scores the same test blends to the same figures."""
    from cosmofm.bench.deblend_quality import main

    common = ["--n-train", "6", "--n-test", "2", "--seeds", "0", "--batch-size", "2", "--workers", "1", "--baselines", "sep",
              "--n-tune", "2"]
    first = main(common + ["--out", str(tmp_path / "a"), "--steps", "2", "--save-model", str(tmp_path / "model")])
    again = main(common + ["--out", str(tmp_path / "b"), "--model", str(tmp_path / "model")])
    assert again["training"] == {"loaded": str(tmp_path / "model")} and first["training"]["steps"] == 2
    assert again["headline"]["head"]["f1"] == first["headline"]["head"]["f1"]
    from cosmofm.heads.redshift_net_cpu import native_bf16_on

    assert ("head_bf16" in again["headline"]) is native_bf16_on(torch.device("cpu"))  # the verb's default here, timed too
    known, known_again = first["headline"]["head_known_positions"], again["headline"]["head_known_positions"]
    for key in ("blended_mape", "blended_nmad", "isolated_mape"):  # true centres: fluxes whatever the detections
        assert np.isfinite(known[key]) and known_again[key] == pytest.approx(known[key])
    assert known_again["blended_mape_by_kind"] == pytest.approx(known["blended_mape_by_kind"]) and known["blended_mape_by_kind"]
    worse = main(common + ["--out", str(tmp_path / "c"), "--model", str(tmp_path / "model"), "--test-shift", "psf_scale=1.5"])
    assert worse["test_shift"] == {"psf_scale": 1.5} and worse["fwhm_pixels"] == pytest.approx(1.5 * first["fwhm_pixels"])
    assert worse["headline"]["head_known_positions"]["isolated_mape"] != pytest.approx(known["isolated_mape"])


def test_a_test_shift_draws_the_same_objects_under_other_seeing_depth_and_sky():
    """`shifted_card` + `offset_sky`: the same objects (fluxes, centres) with a wider
    PSF, twice the sky noise and a sky residual of 0.5 sigma; unknown or bad shifts are refused."""
    from cosmofm.bench.deblend_shifts import offset_sky, shifted_card

    card, offset = shifted_card(CARD, {"psf_scale": 1.5, "noise_scale": 2, "sky_offset": 0.5})
    assert offset == 0.5 and [b.sky_noise for b in card.bands] == [2 * b.sky_noise for b in CARD.bands]
    plain, shifted = _blends(CARD, 3, 0, 1), offset_sky(_blends(card, 3, 0, 1), card, offset)
    sigma = np.array([b.sky_noise for b in card.bands])[:, None, None]
    for (s0, t0), (s1, t1) in zip(plain, shifted):
        np.testing.assert_allclose(t1.flux_njy, t0.flux_njy, rtol=1e-6)  # the same objects, so the drop is paired
        np.testing.assert_allclose(t1.pixel_positions, t0.pixel_positions)
        assert t1.isolated.max() < 0.7 * t0.isolated.max()  # the same light spread by a 1.5x wider PSF: peaks ~1/2.25
        resid = (np.asarray(s1.values) - t1.isolated.sum(0)) / sigma  # noise + offset, in the shifted sky sigma
        assert abs(np.median(resid) - 0.5) < 0.1 and 0.9 < np.median(np.abs(resid - np.median(resid))) * 1.4826 < 1.2
    for bad, where in (({"seeing": 2}, "seeing"), ({"psf_scale": 0}, "psf_scale"), ({"sky_offset": -1}, "sky_offset")):
        with pytest.raises(InputError, match=where):
            shifted_card(CARD, bad)


def test_training_blends_interleave_one_universe_per_train_shift():
    """`--train-shifts none psf_scale=1.5`: blends alternate between universe 1000 as drawn and
    universe 1001 under the wider PSF; the tuning blends at the front carry truth."""
    import argparse

    from cosmofm.bench.deblend_quality import training_blends
    from cosmofm.bench.deblend_shifts import shifted_card

    args = argparse.Namespace(train_shifts=["none", "psf_scale=1.5"], n_train=5, n_tune=2, workers=1)
    train = training_blends(CARD, args)
    wide, _ = shifted_card(CARD, {"psf_scale": 1.5})
    assert len(train) == 5 and all(t is not None for _, t in train[:2])
    plain, other = _blends(CARD, 3, TRAIN_SEED, 1), _blends(wide, 2, TRAIN_SEED + 1, 1)
    for got, want in zip(train, [plain[0], other[0], plain[1], other[1], plain[2]]):
        np.testing.assert_array_equal(got[0].values, want[0].values)
    with pytest.raises(InputError, match="--train-shifts seeing"):
        training_blends(CARD, argparse.Namespace(train_shifts=["seeing=2"], n_train=2, n_tune=1, workers=1))
