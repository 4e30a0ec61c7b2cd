"""The detection head's speed options in `cosmofm detect` (finetune/detect.py `HeadFinder`,
issue 21), each against the readable path: the network on blocks inside a large tile gives
the catalogue of tiles of the block's size exactly; the prefilter skips blocks of noise,
runs the ones holding emission and drops nothing else; bfloat16 autocast stays within a
stated tolerance of float32; the separable local-maximum box equals `max_pool3d`'s. The
purity cut: the negatives are the sign-flipped cube's detections, its threshold rises
with the noise's share (`detection3d_post.purity_threshold`), and `detect_cube` keeps the
positive rows above it.

A tiny untrained model whose objectness bias is raised so that it fires everywhere: its
detections are arbitrary but deterministic, which is what an exactness test needs."""

import math

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage
from torch.nn import functional as F

from cosmofm.data_cards import load_card
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cubes import survey_header
from cosmofm.finetune.detect import HeadFinder, detect_cube, prefilter_config
from cosmofm.heads import detection3d_data as data
from cosmofm.heads.detection3d import CosmoFMForDetection3D, Detection3DHeadConfig
from cosmofm.pretrain import CosmoFMConfig
from cosmofm.pretrain.data import collate_samples

SHAPE = (64, 64, 64)
NOISE = 3e-5  # Jy/beam per channel, the card's
SOURCE = (30, 34, 28)  # chan, row, col of the one bright line
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cube_patch_size=[8, 8, 8], coord_frequencies=4,
            projection_dim=8, survey_names=["ska-hi-like"])


@pytest.fixture(scope="module")
def card():
    return load_card("ska-hi-like")


@pytest.fixture(scope="module")
def model(card):
    torch.manual_seed(0)
    m = CosmoFMForDetection3D.from_backbone_config(CosmoFMConfig(**TINY), Detection3DHeadConfig.from_card(card, merge_factor=0.0, max_detections=8, pa_from="regressed"))
    with torch.no_grad():
        m.decoder.objectness.bias.fill_(0.0)  # fires everywhere: many local maxima per block
    return m.eval()


def _cube(path, card, source: bool, seed: int = 0, shape=SHAPE):
    nf, ny, nx = shape
    h = survey_header(card, nf, ny, nx, 30.0, -30.0, 1.25e9)
    rng = np.random.default_rng(seed)
    beam_sigma = card.beam_fwhm.to_value(u.arcsec) / math.sqrt(8 * math.log(2)) / card.pixel_scale.to_value(u.arcsec)
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0, beam_sigma / math.sqrt(2), beam_sigma / math.sqrt(2)), mode="wrap")
    cube = n * np.float32(NOISE / n.std())
    if source:
        zz, yy, xx = np.indices(shape, dtype=np.float32)
        z, y, x = SOURCE
        cube += np.float32(4e-4) * np.exp(-0.5 * (((yy - y) ** 2 + (xx - x) ** 2) / 2.5**2 + ((zz - z) / 5.0) ** 2))
    fits.PrimaryHDU(cube, h).writeto(path)
    return path


@pytest.fixture(scope="module")
def cubes(card, tmp_path_factory):
    d = tmp_path_factory.mktemp("detect_speed")
    return _cube(d / "source.fits", card, True), _cube(d / "noise.fits", card, False, seed=1)


def _rows(cat: Table) -> set:
    return {tuple(np.round([r["CHAN"], r["ROW"], r["COL"], r["score"]], 5)) for r in cat}


def _run(path, out, model, **kw):
    summary = detect_cube(path, out, model=model, workers=1, progress=False, **kw)
    return summary, Table.read(out)


def test_blocks_inside_a_large_tile_give_the_small_tiles_catalogue(card, model, tmp_path):
    path = _cube(tmp_path / "cube.fits", card, True, shape=(32, 64, 64))
    _, small = _run(path, tmp_path / "small.fits", model, tile=(32, 32, 32), overlap=(8, 8, 8))
    s, blocks = _run(path, tmp_path / "blocks.fits", model, tile=(32, 64, 64), overlap=(8, 8, 8), head_block=(32, 32, 32))
    assert s["n_tiles"] == 1 and s["head_stats"]["blocks"] == 1 * 3 * 3 == s["head_stats"]["blocks_run"]
    assert len(small) > 15  # the raised bias fires in every block (8 detections per block at most)
    assert _rows(blocks) == _rows(small)
    np.testing.assert_allclose(np.asarray(blocks["line_flux_integral"]), np.asarray(small["line_flux_integral"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(blocks["ra"]), np.asarray(small["ra"]), rtol=0, atol=1e-9)


def test_the_prefilter_runs_the_blocks_with_emission_and_drops_nothing_else(cubes, model, tmp_path):
    path, noise_only = cubes
    _, everything = _run(path, tmp_path / "all.fits", model, tile=SHAPE, overlap=(8, 8, 8), head_block=(32, 32, 32))
    s, filtered = _run(path, tmp_path / "pre.fits", model, tile=SHAPE, overlap=(8, 8, 8), head_block=(32, 32, 32), prefilter=5.0)
    st = s["head_stats"]
    # the blocks whose grown cores reach the source's smoothed emission (a 13-sigma line, the
    # 31-channel boxcar spreads it over ~40 channels), not the 27
    assert 1 <= st["blocks_run"] <= 14 < st["blocks"]
    assert _rows(filtered) <= _rows(everything)  # a run block gives exactly what it gave without the prefilter
    near = lambda cat: _rows(cat[(np.abs(np.asarray(cat["CHAN"]) - SOURCE[0]) < 12) & (np.hypot(np.asarray(cat["ROW"]) - SOURCE[1], np.asarray(cat["COL"]) - SOURCE[2]) < 12)])  # noqa: E731
    assert near(everything) and near(filtered) == near(everything)  # around the source nothing is lost
    s, few = _run(noise_only, tmp_path / "noise.fits", model, tile=SHAPE, overlap=(8, 8, 8), head_block=(32, 32, 32), prefilter=5.0)
    assert s["head_stats"]["blocks_run"] <= 2 and len(few) <= 8 * s["head_stats"]["blocks_run"]  # noise fires a block now and then
    s, none = _run(noise_only, tmp_path / "none.fits", model, tile=SHAPE, overlap=(8, 8, 8), head_block=(32, 32, 32), prefilter=8.0)
    assert s["head_stats"]["blocks_run"] == 0 and len(none) == 0 and "line_flux_integral" in none.colnames  # a valid empty catalogue
    with pytest.raises(InputError, match="prefilter"):
        prefilter_config(0.0)


def test_prefilter_mask_marks_the_source_and_little_noise(cubes, model, card):
    from cosmofm.data_cards.readers.mosaic import open_survey_cube

    cube = open_survey_cube(cubes[0], None, None)
    values, ivar = cube.read(tuple(slice(0, n) for n in SHAPE))
    finder = HeadFinder(model, prefilter=prefilter_config(5.0))
    mask = finder.candidates(values, ivar)
    assert mask[SOURCE]
    z, y, x = SOURCE
    away = np.ones(SHAPE, bool)
    away[max(z - 25, 0):z + 26, y - 12:y + 13, x - 12:x + 13] = False  # the line (sigma 5 ch) under the 31-channel boxcar, a few beams
    assert mask[~away].mean() > 0.1 and mask[away].mean() < 0.002


def test_bf16_autocast_objectness_within_tolerance_of_float32(cubes, model, card):
    from cosmofm.data_cards.readers.mosaic import open_survey_cube

    cube = open_survey_cube(cubes[0], None, None)
    region = (slice(0, 32), slice(32, 64), slice(24, 56))
    values, ivar = cube.read(region)
    sample = data.tile_sample(values, np.ascontiguousarray(ivar), cube.tile_header(region), {"card": "ska-hi-like", "id": "t"})
    batch = collate_samples([sample], ["ska-hi-like"])
    with torch.no_grad():
        ref = torch.sigmoid(model(batch, return_maps=True).heatmap)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = torch.sigmoid(model(batch, return_maps=True).heatmap.float())
    diff = (fast - ref).abs()
    assert float(diff.max()) < 0.02  # bf16 keeps 8 bits of mantissa: ~0.4 % per operation
    assert float(diff.max()) > 0  # autocast did change the arithmetic


def test_separable_local_maximum_box_equals_max_pool3d():
    torch.manual_seed(0)
    logits = torch.randn(2, 24, 20, 20)
    maps = torch.randn(2, 2 * len(data.REGRESSED), 12, 10, 10)
    det = data.peaks(logits, maps, 0.6, (9, 5), 200)
    prob = torch.sigmoid(logits)
    box = F.max_pool3d(prob.unsqueeze(1), (9, 5, 5), stride=1, padding=(4, 2, 2)).squeeze(1)
    want = torch.where((prob == box) & (prob >= 0.6), prob, torch.zeros_like(prob)).flatten(1)
    n_want = (want > 0).sum(1)
    assert int(n_want.min()) > 3
    for t in range(2):
        got = det[t, :, 0][det[t, :, 0] > 0]
        assert len(got) == int(n_want[t])
        torch.testing.assert_close(got, want[t][want[t] > 0].sort(descending=True).values)


def test_cli_speed_flags_reach_the_head_and_the_model_runs_its_recorded_ones_by_default(cubes, model, tmp_path, capsys):
    import copy

    from cosmofm.cli import main as cli_main
    from cosmofm.finetune.detect import model_inference
    from cosmofm.heads.redshift_net_cpu import native_bf16
    from cosmofm.pretrain.checkpoint import write_manifest

    recorded = copy.deepcopy(model)
    recorded._set_task(inference={"head_block": [32, 32, 32], "block_overlap": [8, 8, 8], "prefilter": 5.0, "bf16": True})
    recorded.save_pretrained(tmp_path / "det")
    write_manifest(tmp_path / "det")
    run = ["detect", str(cubes[0]), "--model", str(tmp_path / "det"), "--workers", "1"]
    assert cli_main([*run, "--output", str(tmp_path / "fast.fits"), "--tile", "64", "--overlap", "8", "--head-block", "32,32,32",
                     "--prefilter", "5", "--bf16"]) == 0
    fast = Table.read(tmp_path / "fast.fits")
    assert 0 < len(fast) <= 8 * 14  # at most 8 per block run, and the noise blocks were skipped (27 x ~6 without the prefilter)
    z, y, x = SOURCE
    d = np.hypot(np.asarray(fast["ROW"]) - y, np.asarray(fast["COL"]) - x)
    assert np.any((d < 12) & (np.abs(np.asarray(fast["CHAN"]) - z) < 12))
    capsys.readouterr()
    # no flags: the options the model recorded (bf16 only where the CPU computes it natively), its
    # blocks overlapping as recorded, not as the default tiles (64 x 24 x 24, more than a block holds)
    assert cli_main([*run, "--output", str(tmp_path / "default.fits")]) == 0
    bf16 = native_bf16()
    assert f"head: blocks of 32x32x32 overlapping 8x8x8, prefilter 5 rms, {'bf16' if bf16 else 'float32'}" in capsys.readouterr().out
    default = Table.read(tmp_path / "default.fits")
    if bf16:
        assert _rows(default) == _rows(fast)
    assert model_inference(recorded) == ((32, 32, 32), (8, 8, 8), 5.0, bf16)
    assert model_inference(recorded, head_block=None, prefilter=None, bf16=False) == (None, None, None, False)
    assert model_inference(recorded, head_block=(16, 16, 16)) == ((16, 16, 16), None, 5.0, bf16)  # given blocks overlap as the tiles
    assert model_inference(model) == (None, None, None, False)  # nothing recorded: the whole tile, every block, float32
    s = detect_cube(cubes[0], tmp_path / "whole.fits", model=str(tmp_path / "det"), tile=64, overlap=8, workers=1, progress=False,
                    head_block=None, prefilter=None, bf16=False)
    assert s["head_options"] == {"head_block": None, "block_overlap": None, "prefilter": None, "bf16": False}
    with pytest.raises(InputError, match="task.inference.head_block"):
        Detection3DHeadConfig(inference={"head_block": [32, 32]})
    with pytest.raises(InputError, match="task.inference"):
        Detection3DHeadConfig(inference={"tile": 64})
    with pytest.raises(InputError, match="task.inference.block_overlap"):
        Detection3DHeadConfig(inference={"head_block": [32, 32, 32], "block_overlap": [32, 8, 8]})


def test_negatives_are_the_flipped_cubes_detections(cubes, model):
    from cosmofm.data_cards.readers.mosaic import open_survey_cube

    cube = open_survey_cube(cubes[0], None, None)
    region = tuple(slice(0, n) for n in SHAPE)
    values, ivar = cube.read(region)
    header = cube.tile_header(region)
    kw = dict(block=(32, 64, 64), block_overlap=(8, 8, 8), prefilter=prefilter_config(4.0))
    finder = HeadFinder(model, negatives=True, **kw)
    both = finder(values, ivar, header)
    sign = np.asarray(both["sign"])
    assert finder.stats["blocks_run_negative"] >= 1 and (sign < 0).any() and (sign > 0).any()
    # the negative mask is the flipped cube's positive one, and the network sees the flipped block
    assert _rows(both[sign < 0]) == _rows(HeadFinder(model, **kw)(-values, ivar, header))
    assert _rows(both[sign > 0]) == _rows(HeadFinder(model, **kw)(values, ivar, header))


def test_purity_threshold_scales_with_the_noise_share_not_the_source_count():
    from cosmofm.heads.detection3d_post import expected_false, purity_threshold

    noise = [0.22, 0.25]  # the flipped cube's detections, decoded at 0.2: the same volume's false ones
    assert purity_threshold(np.linspace(0.2, 0.9, 30), noise, 0.9, 0.2)[0] == 0.2  # dense: 2 expected false in 30
    assert purity_threshold([0.21, 0.3, 0.8], noise, 0.9, 0.2)[0] == 0.3  # sparse: the same noise, a higher threshold
    assert purity_threshold([0.26], noise, 0.9, 0.2)[0] == math.inf  # above the top negative, still inside the noise's tail
    assert purity_threshold([0.3, 0.4], [], 0.9, 0.2) == (0.3, 1.0)
    # the fitted tail follows the counts of many negatives drawn from it
    x0 = math.log(0.2 / 0.8)
    neg = 1 / (1 + np.exp(-(x0 + np.random.default_rng(0).exponential(0.3, 2000))))
    t = 1 / (1 + math.exp(-(x0 + 0.6)))
    assert abs(float(expected_false(t, neg, 0.2)) - (neg >= t).sum()) < 3 * math.sqrt(2000 * math.exp(-2))


def test_noise_prior_from_calibration_rejects_a_lone_positive_at_noise_level():
    from cosmofm.heads.detection3d_post import expected_false, fit_noise_prior, purity_threshold

    # calibration: 400 flipped blocks, flipped detections decoded at 0.05 with an exponential logit excess
    # (scale 0.3, 0.1 per block above the calibrated threshold 0.2): the prior recovers both from the tail
    x_t, scale = math.log(0.2 / 0.8), 0.3
    rng = np.random.default_rng(1)
    cal = 1 / (1 + np.exp(-(x_t + rng.exponential(scale, 40))))
    low = 1 / (1 + np.exp(-(x_t - rng.uniform(0, 1.2, 200))))  # below the threshold: not part of the tail above it
    prior = fit_noise_prior(np.concatenate([cal, low]), 400, 0.2, 0.05)
    assert prior["level"] == 0.2 and abs(prior["tail_scale"] - scale) < 0.12 and abs(prior["per_block"] - 0.1) < 1e-9
    # a sparse cube: 100 flipped blocks run, its flipped copy holds 2 detections just above the floor
    neg = [0.201, 0.205]
    lone = 1 / (1 + math.exp(-(x_t + 0.5)))  # inside the noise's tail: the prior expects 10 x exp(-0.5 / 0.3) = 1.9 above it
    assert purity_threshold([lone], neg, 0.9, 0.2)[0] == lone  # the cube's own 2 negatives: a tiny scale lets it through
    assert purity_threshold([lone], neg, 0.9, 0.2, prior, 100)[0] == math.inf  # with the prior: rejected
    clear = 1 / (1 + math.exp(-(x_t + 3.0)))
    assert purity_threshold([lone, clear], neg, 0.9, 0.2, prior, 100)[0] == clear  # a clear one is kept
    # no flipped detection at all: the prior still expects noise (the rule without it: none)
    assert float(expected_false(lone, [], 0.2, prior, 100)) > 0.5 and float(expected_false(lone, [], 0.2)) == 0.0
    assert fit_noise_prior([], 100, 0.2, 0.05) == {}


def test_reliability_cut_keeps_the_positive_rows_above_the_threshold(cubes, model, tmp_path):
    _, noise_only = cubes
    _, plain = _run(noise_only, tmp_path / "plain.fits", model, tile=SHAPE, overlap=(8, 8, 8), head_block=SHAPE)
    s, cut = _run(noise_only, tmp_path / "cut.fits", model, tile=SHAPE, overlap=(8, 8, 8), head_block=SHAPE, reliability=0.9)
    rel = s["reliability"]
    assert s["head_stats"]["blocks_run_negative"] == 1 and rel["n_negative"] >= 4 and len(plain) >= 4  # the block, both signs
    assert "sign" not in cut.colnames and len(cut) == rel["n_kept"]
    kept = plain[np.asarray(plain["score"]) >= rel["threshold"]]
    assert _rows(cut) == _rows(kept) and len(cut) < len(plain)  # pure noise: the flipped cube's twins push the threshold up
    assert rel["n_negative_above"] <= 0.1 * max(len(cut), 1)


def test_the_noise_prior_counts_only_on_the_blocks_it_was_measured_on(cubes, model, tmp_path):
    """The prior's count part is a number of false detections per flipped block: it holds for
    blocks of the calibration's size, overlap and prefilter; with other blocks the cut uses the
    prior's tail scale only (`blocks_run_negative` None)."""
    import copy

    from cosmofm.finetune.detect import calibrate_noise_prior

    _, noise_only = cubes
    m = copy.deepcopy(model)
    m._set_task(threshold=0.3, reliability=0.9)
    blocks = dict(tile=SHAPE, overlap=(8, 8, 8), head_block=(32, 64, 64), prefilter=None)
    prior = calibrate_noise_prior(m, [noise_only], **blocks, floor=0.05)
    assert prior["block_overlap"] == [8, 8, 8] and prior["head_block"] == [32, 64, 64] and prior["n_negatives"] >= 1

    def counted(**kw):
        s, _ = _run(noise_only, tmp_path / "cut.fits", m, overwrite=True, **{**blocks, **kw})
        return s["reliability"]["blocks_run_negative"]

    assert counted() == 3  # 64 channels in blocks of 32 overlapping by 8: three blocks
    assert counted(overlap=(16, 8, 8)) is None  # the same block size, another overlap
    assert counted(head_block=(64, 32, 32)) is None


def test_a_catalogue_is_the_floor_catalogue_thresholded_and_merged(cubes, model, card, tmp_path):
    """What `calibrate_catalogues` chooses the threshold and merge factor on: the catalogue
    decoded at the floor without merging, cut at t and merged over the whole cube
    (`merge_catalogue`). `cosmofm detect` at (t, f) must write exactly that catalogue (it
    merged per tile too before, with a wider window, and removed more than calibration saw)."""
    from cosmofm.heads.detection3d_post import merge_catalogue

    floor = model.head_config.threshold
    _, every = _run(cubes[0], tmp_path / "floor.fits", model, tile=(32, 32, 32), overlap=(8, 8, 8))
    t = float(np.quantile(np.asarray(every["score"]), 0.3))
    try:
        model._set_task(threshold=t, merge_factor=3.0)  # a wide window: the tiny head's sizes are small
        _, cut = _run(cubes[0], tmp_path / "cut.fits", model, tile=(32, 32, 32), overlap=(8, 8, 8))
    finally:
        model._set_task(threshold=floor, merge_factor=0.0)
    expected = merge_catalogue(every[np.asarray(every["score"]) >= t], float(card.beam_fwhm.to_value(u.arcsec)), 3.0)
    kept = np.asarray(every["score"]) >= t
    assert kept.sum() > len(expected) > 10 and len(cut) == len(expected)  # the merge removed rows of those above t
    assert _rows(cut) == _rows(expected)
