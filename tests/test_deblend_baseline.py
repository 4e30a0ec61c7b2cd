"""Deblending metrics on hand-made cases, and the sep / photutils baselines on mock stamps.

sep and photutils are real dependencies of the deblending benchmark (the `deblend` and
`test` extras): when missing, these tests fail and say how to install them.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest

from cosmofm.heads import deblending_metrics as dm


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:  # a failure, not a skip: the benchmark cannot run without it
        pytest.fail(f"`{module}` is not importable ({err}); install the extra: pip install -c constraints.txt -e '.[deblend]'")


# ---------------------------------------------------------------------------- metrics


def test_matching_and_detection_scores():
    true = np.array([[10.0, 10.0], [10.0, 20.0], [30.0, 30.0], [50.0, 5.0]])
    # perfect detection (shuffled, within a pixel): F1 = 1
    pred = true[[2, 0, 3, 1]] + 0.5
    ti, pi = dm.match_detections(true, pred, max_distance=3.0)
    assert sorted(zip(ti, pi)) == [(0, 1), (1, 3), (2, 0), (3, 2)]
    s = dm.detection_scores(len(ti), len(true), len(pred))
    assert s["precision"] == s["recall"] == s["f1"] == 1.0
    # one missed source: recall drops by 1/N, precision stays 1
    ti, _ = dm.match_detections(true, pred[:3], max_distance=3.0)
    s = dm.detection_scores(len(ti), len(true), 3)
    assert s["recall"] == pytest.approx(1 - 1 / 4) and s["precision"] == 1.0 and s["fn"] == 1
    # a detection beyond max_distance is a false positive, not a match
    ti, pi = dm.match_detections(true[:1], [[10.0, 14.0]], max_distance=3.0)
    assert len(ti) == 0
    # Hungarian, not greedy: the globally closest assignment
    ti, pi = dm.match_detections([[0.0, 0.0], [0.0, 2.0]], [[0.0, 1.1], [0.0, 3.0]], max_distance=2.0)
    assert dict(zip(ti, pi)) == {0: 0, 1: 1}
    assert dm.match_detections(np.zeros((0, 2)), pred, 3.0)[0].size == 0


def test_separation_and_binned_detection():
    true = np.array([[0.0, 0.0], [0.0, 4.0], [40.0, 40.0]])
    sep = dm.nearest_neighbour_distance(true) / 4.0  # FWHM = 4 pixels
    np.testing.assert_allclose(sep[:2], [1.0, 1.0])
    s = dm.score_stamp(true, np.ones((3, 2)), [[0.0, 0.2], [40.0, 40.0], [20.0, 0.0]], np.ones((3, 2)), fwhm_pixels=4.0)
    assert s["matched"].tolist() == [True, False, True] and s["pred_matched"].tolist() == [True, True, False]
    rows = dm.detection_vs_separation(s["sep_fwhm"], s["matched"], s["pred_sep_fwhm"], s["pred_matched"], [0, 2, np.inf])
    assert rows[0]["recall"] == 0.5 and rows[1]["recall"] == 1.0
    assert np.isnan(s["f_pred"][1]).all()  # a missed object has no flux
    empty = dm.score_stamp(true, np.ones((3, 2)), np.zeros((0, 2)), np.zeros((0, 2)), fwhm_pixels=4.0)
    assert not empty["matched"].any()


def test_flux_colour_iou_chi2():
    f_true = np.array([[100.0, 200.0], [50.0, 80.0], [10.0, 30.0]])
    st = dm.flux_stats(dm.relative_flux_error(1.1 * f_true, f_true))
    assert st["bias"] == pytest.approx(0.1) and st["scatter"] == pytest.approx(0.0, abs=1e-12) and st["mape"] == pytest.approx(10.0)
    # a 10 % flux error in every band leaves the colours unbiased; in one band it biases them by 2.5 log10(1.1)
    assert np.allclose(dm.colour_bias(1.1 * f_true, f_true)["bias"], 0.0)
    np.testing.assert_allclose(dm.colour_bias(f_true * [1.1, 1.0], f_true)["bias"], [-2.5 * np.log10(1.1)])
    rows = dm.binned_flux_stats([0.1, -0.2, 0.3], [1.0, 5.0, 5.5], [0, 2, 10])
    assert rows[0]["bias"] == pytest.approx(0.1) and rows[1]["n"] == 2
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:6] = True
    assert dm.iou(mask, mask) == 1.0 and dm.iou(mask, ~mask) == 0.0
    half = mask.copy()
    half[2:5, 4:6] = False
    assert dm.iou(mask, half) == pytest.approx(0.5)
    seg = np.where(mask, 2, 0)  # detection 1 (label 2) covers object 0
    np.testing.assert_allclose(dm.matched_iou(mask[None].repeat(2, 0), seg, [0], [1]), [1.0, 0.0])
    rng = np.random.default_rng(0)
    model = rng.normal(size=(3, 40, 40))
    noise = rng.normal(size=model.shape) * 0.5
    assert dm.residual_chi2(model + noise, np.full(model.shape, 4.0), model) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError):
        dm.relative_flux_error([1.0], [0.0])


def test_suite_on_a_perfect_catalogue():
    true = np.array([[10.0, 10.0], [10.0, 15.0], [40.0, 40.0]])
    flux = np.array([[100.0, 120.0], [80.0, 90.0], [300.0, 310.0]])
    stamp = dm.score_stamp(true, flux, true[::-1], 1.1 * flux[::-1], fwhm_pixels=4.0)
    out = dm.deblending_metrics([stamp, stamp], ["g", "r"], reference_band=1)
    assert out["detection"]["f1"] == 1.0
    assert out["flux_blended"]["r"]["n"] == 4 and out["flux_blended"]["r"]["bias"] == pytest.approx(0.1)
    assert out["flux_all"]["g"]["n"] == 6


# ---------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def card64():
    from cosmofm.data_cards.schema import load_card

    return dataclasses.replace(load_card("lsst-like"), stamp_size=64)


PIPELINES = {"sep": ("isophotal", "kron"), "photutils": ("segment", "kron")}


@pytest.mark.parametrize("pipeline", ["sep", "photutils"])
def test_baseline_isolated_galaxy(pipeline, card64):
    _need(pipeline)
    from cosmofm.data_cards.mocks.images import draw_source, mock_image
    from cosmofm.heads import deblend_baseline as db

    fwhm = db.fwhm_in_pixels(card64)
    src = draw_source(card64, 0, 20)  # a bright (r = 20.3), compact, smooth galaxy
    assert src.kind == "galaxy" and 31.4 - 2.5 * np.log10(src.flux_njy[2]) < 21
    cat = db.PIPELINES[pipeline][0](mock_image(card64, 0, 20), fwhm_pixels=fwhm)
    assert len(cat) == 1 and np.hypot(*(cat.positions[0] - 31.5)) < 1.0
    assert cat.segmentation.shape == (64, 64) and set(np.unique(cat.segmentation)) == {0, 1}
    segment, kron = PIPELINES[pipeline]
    rel = cat.fluxes[segment][0, 1:5] / src.flux_njy[1:5] - 1  # g, r, i, z: S/N > 100
    assert np.all(np.abs(rel) < 0.05), rel
    assert np.all(np.abs(cat.fluxes[kron][0, 1:5] / src.flux_njy[1:5] - 1) < 0.10)
    err = cat.flux_errors[segment][0]
    assert np.all((err > 0) & (err < 0.05 * cat.fluxes[segment][0, 1:5].min()))
    table = cat.to_table()
    assert len(table) == 1 and f"FLUX_{segment.upper()}_lsst2023-r" in table.colnames


@pytest.mark.parametrize("pipeline", ["sep", "photutils"])
def test_baseline_separated_pair(pipeline, card64):
    _need(pipeline)
    from cosmofm.data_cards.mocks.blends import mock_blend
    from cosmofm.heads import deblend_baseline as db

    fwhm = db.fwhm_in_pixels(card64)  # 4.5 pixels: the pairs are 3.3 FWHM apart
    for index in range(3):
        sample, truth = mock_blend(card64, 1, index, n_objects=2, separation=3.0, delta_mag=0.5)
        cat = db.PIPELINES[pipeline][0](sample, fwhm_pixels=fwhm)
        s = db.score(cat, truth, fwhm, PIPELINES[pipeline][0])
        assert s["matched"].all() and len(cat) == 2, (index, truth.pixel_positions, cat.positions)
        iou = dm.matched_iou(truth.footprints, cat.segmentation, s["true_index"], s["pred_index"])
        # the truth footprints are 3-sigma isophotes of the unsmoothed noiseless images; photutils
        # segments the PSF-smoothed image, so its segments reach further out
        assert np.all(iou > 0.3), (index, iou)
        for i, j in zip(s["true_index"], s["pred_index"]):
            row, col = np.round(truth.pixel_positions[i]).astype(int)
            assert cat.segmentation[row, col] == j + 1, (index, i)


def test_baseline_bad_input(card64):
    _need("sep")
    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.mocks.images import mock_image
    from cosmofm.heads import deblend_baseline as db

    sample = mock_image(card64, 0, 20)
    blank = dataclasses.replace(sample, values=np.zeros_like(sample.values), ivar=np.full_like(sample.ivar, 1e-2))
    assert len(db.sep_deblend(blank)) == 0  # an empty field is a valid, empty answer
    assert len(db.photutils_deblend(blank)) == 0
    # masked (NaN, ivar 0) pixels, a whole masked band among them, are left out, not propagated
    holed, ivar = sample.values.copy(), sample.ivar.copy()
    holed[:, 30:34, 10:14] = np.nan
    ivar[:, 30:34, 10:14] = 0
    ivar[0] = 0
    for fn in (db.sep_deblend, db.photutils_deblend):
        cat = fn(dataclasses.replace(sample, values=holed, ivar=ivar))
        flux = cat.fluxes[next(iter(cat.fluxes))]
        assert len(cat) == 1 and np.all(np.isfinite(flux[:, 1:])) and np.all(np.isnan(flux[:, 0])), (cat.method, flux)
    masked = dataclasses.replace(sample, ivar=np.zeros_like(sample.ivar))
    with pytest.raises(InputError, match="ivar"):
        db.sep_deblend(masked)


def test_scarlet2_handoff_without_scarlet2(card64, monkeypatch):
    """What the scarlet2 baseline computes itself, without scarlet2 (not a test dependency: it
    brings jax; the bench runs the real fits): the mock's PSF handed to it, the catalogue made
    from its per-source models, and the error naming the extra when it is missing."""
    import sys

    from cosmofm.data_cards.errors import InputError
    from cosmofm.data_cards.mocks.images import mock_image
    from cosmofm.heads import deblend_baseline as db

    psf = db.mock_psf(card64)  # (B, 41, 41): normalised, centred on the central pixel, as wide as the card says
    assert psf.shape == (6, 41, 41) and np.allclose(psf.sum((1, 2)), 1, atol=1e-5)
    y = np.arange(41)
    np.testing.assert_allclose((psf.sum(2) * y).sum(1), 20, atol=1e-3)
    np.testing.assert_allclose((psf.sum(1) * y).sum(1), 20, atol=1e-3)
    width = 2 * np.sqrt((psf >= psf.max((1, 2), keepdims=True) / 2).sum((1, 2)) / np.pi)  # half-maximum area -> diameter
    fwhm = np.array([(b.psf_fwhm / card64.pixel_scale).decompose().value for b in card64.bands])
    assert np.all(np.abs(width / fwhm - 1) < 0.2) and width[0] > width[-1], (width, fwhm)
    with pytest.raises(InputError, match="odd"):
        db.mock_psf(card64, size=40)

    # two Gaussian sources as exact models of a noiseless stamp: the image splits back into them
    rows, cols = np.indices((32, 32))
    centres = np.array([[12.0, 12.0], [16.0, 21.0]])
    shape = [np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 2.0**2)) for r, c in centres]
    models = np.stack([np.stack([100.0 * shape[0], 50.0 * shape[0]]), np.stack([30.0 * shape[1], 90.0 * shape[1]])])  # (K, B, H, W)
    values, ivar = models.sum(0), np.full((2, 32, 32), 4.0)
    totals = models.sum((2, 3))
    cat = db.model_catalogue(models, 1.02 * totals, values, ivar, centres, ["g", "r"])
    np.testing.assert_allclose(cat.fluxes["reweighted"], totals, rtol=1e-6)
    np.testing.assert_allclose(cat.fluxes["model"], 1.02 * totals)  # the models' own sums pass through
    assert np.all(cat.flux_errors["model"] > 0) and np.all(cat.flux_errors["model"] < np.sqrt((1 / ivar[0]).sum()))
    assert cat.segmentation[12, 12] == 1 and cat.segmentation[16, 21] == 2 and cat.segmentation[0, 31] == 0
    with pytest.raises(InputError, match="models"):
        db.model_catalogue(models[:1], totals, values, ivar, centres, ["g", "r"])

    monkeypatch.setitem(sys.modules, "scarlet2", None)  # as where it is not installed
    with pytest.raises(ImportError, match=r"\.\[scarlet\]"):
        db.scarlet2_deblend(mock_image(card64, 0, 20))
