"""The 3D detection head (heads/detection3d.py): shapes, targets, units, a short training, the release round trip."""

import json
import math

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.io import fits

from cosmofm.data_cards import load_card
from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.cubes import mock_survey_cube
from cosmofm.finetune.recipe import FinetuneRecipe, run_recipe
from cosmofm.finetune.release import from_pretrained
from cosmofm.heads import detection3d_data as data
from cosmofm.heads.base import task_class, task_model_class
from cosmofm.heads.detection3d import CosmoFMForDetection3D, Detection3DHeadConfig, Detection3DTask
from cosmofm.pretrain import CosmoFMConfig
from cosmofm.pretrain.checkpoint import write_manifest
from cosmofm.pretrain.data import collate_samples

SURVEYS = ["ska-hi-like"]
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cube_patch_size=[8, 8, 8], coord_frequencies=4,
            projection_dim=8, survey_names=SURVEYS)
SDC2 = {"line_flux_integral": u.Jy * u.Hz, "hi_size": u.arcsec, "w20": u.km / u.s, "pa": u.deg, "i": u.deg}


@pytest.fixture(scope="module")
def card():
    return load_card("ska-hi-like")


def _model(card, **head):
    torch.manual_seed(0)
    return CosmoFMForDetection3D.from_backbone_config(CosmoFMConfig(**TINY), Detection3DHeadConfig.from_card(card, **head))


def _bright_tiles(card, n, seed, shape=(32, 24, 24)):
    """Tiles with one bright galaxy each (log M_HI >= 10.4, S/N ~ 10-40) within a few voxels
    of the centre: cut around it from a cube twice the size (seeds with the galaxy near
    that cube's edges are skipped)."""
    out, k = [], seed
    big = tuple(2 * s for s in shape)
    while len(out) < n:
        k += 1
        f0 = 1100e6 + 4e6 * (k % 10)  # low redshift: bright
        cube, header, truth = mock_survey_cube(card, big[0], big[1:], n_sources=1, seed=k, log_mhi_min=10.2, frequency_start=f0,
                                               as_sample=False)
        scales = data.tile_scales(header, card.noise_per_channel)
        r = data.truth_in_tile(truth, header, 0, 0, 0, big, scales)[0]
        jitter = np.random.default_rng(k).integers(-3, 4, 3)
        start = [int(round(p - s / 2)) + int(j) for p, s, j in zip((r["chan"], r["row"], r["col"]), shape, jitter)]
        if any(s0 < 0 or s0 + s > b for s0, s, b in zip(start, shape, big)):
            continue
        c0, y0, x0 = start
        h = data.tile_header(header, c0, y0, x0, shape)
        rows = data.truth_in_tile(truth, header, c0, y0, x0, shape, scales)
        values = np.ascontiguousarray(cube[c0:c0 + shape[0], y0:y0 + shape[1], x0:x0 + shape[2]])
        ivar = np.full(shape, card.noise_per_channel**-2, np.float32)
        out.append((data.tile_sample(values, ivar, h, {"card": card.name, "id": f"bright-{k}",
                                                        "labels": {"sources": rows, "n_sources": len(rows), "tile": scales}}), h))
    return out


# ---------------------------------------------------------------------------- config, registry, shapes


def test_registered_config_round_trip_and_bad_values(card):
    assert task_model_class("detection3d") is CosmoFMForDetection3D and task_class("detection3d") is Detection3DTask
    head = Detection3DHeadConfig.from_card(card)
    assert head.beam_fwhm_pix == pytest.approx(2.5) and head.card == "ska-hi-like"  # 7 arcsec beam / 2.8 arcsec pixels
    assert Detection3DHeadConfig.from_dict(head.to_dict()) == head
    for bad, match in [(dict(threshold=1.0), "task.threshold"), (dict(nms_window=[9]), "task.nms_window"),
                       (dict(width=0), "task.width"), (dict(sigma_min=0), "sigma_min")]:
        with pytest.raises(InputError, match=match):
            Detection3DHeadConfig(**bad)


@pytest.mark.parametrize("shape", [(32, 24, 24), (20, 13, 35)])
def test_any_tile_shape_gives_voxel_maps_of_its_shape(card, shape):
    model = _model(card).eval()
    rng = np.random.default_rng(0)
    values = rng.normal(0, 3e-5, (2, *shape)).astype(np.float32)
    header = mock_survey_cube(card, shape[0], shape[1:], n_sources=0, as_sample=False)[1]
    samples = [data.tile_sample(v, np.full(shape, 1 / 9e-10, np.float32), header, {"card": card.name, "id": f"t{k}"}) for k, v in enumerate(values)]
    with torch.no_grad():
        out = model(collate_samples(samples, SURVEYS), return_maps=True)
    assert tuple(out.heatmap.shape) == (2, *shape)
    assert tuple(out.properties.shape) == (2, 2 * len(data.REGRESSED), *[(n + 1) // 2 for n in shape])
    assert tuple(out.detections.shape) == (2, model.head_config.max_detections, len(data.DETECTION_FIELDS))
    assert out.loss is None
    # an untrained head scores ~1e-3 everywhere: with threshold 1e-4 every local maximum is a detection
    model._set_task(threshold=1e-4)
    with torch.no_grad():
        out = model(collate_samples(samples, SURVEYS))
    rows = Detection3DTask(model.head_config).catalogue_rows(out)
    n = int((out.detections[..., 0] > 0).sum())
    assert n >= 2 and len(rows["TILE"]) == n and set(rows["TILE"].tolist()) == {0, 1}
    assert np.all((rows["CHAN"] > -1.5) & (rows["CHAN"] < shape[0] + 0.5)) and np.all(rows["score"] >= 1e-4)


# ---------------------------------------------------------------------------- targets


def test_targets_put_the_heatmap_peak_on_the_source_voxel_and_scale_its_width(card):
    (sample, header), = _bright_tiles(card, 1, 11)
    targets = Detection3DTask(Detection3DHeadConfig.from_card(card)).targets([sample])
    src = targets["sources"][0, 0]
    f = {k: i for i, k in enumerate(data.SOURCE_FIELDS)}
    heat = data.heatmap_target(targets["sources"][0], tuple(sample.shape), 0.15, 1.0, 4.0)
    peak = np.unravel_index(int(heat.argmax()), heat.shape)
    assert list(peak) == [int(round(float(src[f[k]]))) for k in ("chan", "row", "col")] and float(heat.max()) == 1.0
    sigma_c = max(1.0, 0.15 * 10 ** float(src[f["log_w20_chan"]]))
    c = peak[0] + 2
    assert float(heat[c, peak[1], peak[2]]) == pytest.approx(math.exp(-0.5 * (2 / sigma_c) ** 2), rel=1e-5)
    # the truth centre is where the emission is: the moment-0 centroid of the source's channels
    chan = int(round(float(src[f["chan"]])))
    w = max(2, int(0.5 * 10 ** float(src[f["log_w20_chan"]])))
    mom0 = sample.values[max(0, chan - w):chan + w + 1].sum(0)
    yy, xx = np.indices(mom0.shape)
    pos = np.clip(mom0, 0, None) * (mom0 > 0.3 * mom0.max())
    assert (pos * yy).sum() / pos.sum() == pytest.approx(float(src[f["row"]]), abs=1.0)
    assert (pos * xx).sum() / pos.sum() == pytest.approx(float(src[f["col"]]), abs=1.0)


def test_labelled_mocks_carry_tile_frame_truth_and_missing_labels_are_refused(card):
    tiles = Detection3DTask.labelled_mocks(card, 5, 3, tile=(16, 20, 20), density=20000.0)
    assert len(tiles) == 5 and all(s.shape == (16, 20, 20) for s in tiles)
    rows = [r for s in tiles for r in s.meta["labels"]["sources"]]
    assert len(rows) >= 5 and all(-0.5 <= r["chan"] < 15.5 and -0.5 <= r["row"] < 19.5 and -0.5 <= r["col"] < 19.5 for r in rows)
    json.dumps([s.meta for s in tiles])  # JSON-safe
    s = tiles[0]
    h = fits.Header(s.meta["wcs"])
    scales = data.tile_scales(h, card.noise_per_channel)
    assert s.coords["frequency"][0] == pytest.approx(scales["freq0"]) and scales["dnu"] == pytest.approx(3e4)
    bad = data.tile_sample(s.values, s.ivar, h, {"card": card.name, "id": "no-labels"})
    with pytest.raises(InputError, match="no-labels"):
        Detection3DTask(Detection3DHeadConfig()).targets([tiles[1], bad])
    with pytest.raises(InputError, match="mocks.tile"):
        Detection3DTask.labelled_mocks(card, 2, 0, tile=(16, 2, 16))


# ---------------------------------------------------------------------------- units


def _header(card, ctype3="FREQ"):
    h = mock_survey_cube(card, 16, 16, n_sources=0, as_sample=False)[1]
    if ctype3 == "VRAD":  # the same channels as radio velocities
        nu0, dnu, rest = h["CRVAL3"], h["CDELT3"], h["RESTFRQ"]
        h["CTYPE3"], h["CUNIT3"] = "VRAD", "m/s"
        h["CRVAL3"], h["CDELT3"] = 299792458.0 * (1 - nu0 / rest), -299792458.0 * dnu / rest
    return h


def test_pixel_frame_to_sdc2_units_by_hand(card):
    for ctype in ("FREQ", "VRAD"):
        scales = data.tile_scales(_header(card, ctype), 3e-5)
        assert scales["freq0"] == pytest.approx(950e6, rel=1e-9) and scales["dnu"] == pytest.approx(3e4, rel=1e-6)
        assert scales["pixel_scale"] == pytest.approx(2.8) and scales["beam_fwhm"] == pytest.approx(7.0)
    det = np.zeros((2, len(data.DETECTION_FIELDS)))
    f = {k: i for i, k in enumerate(data.DETECTION_FIELDS)}
    det[:, f["score"]] = 0.9
    det[:, f["chan"]] = 10.0
    det[:, f["mu_log_flux_norm"]], det[:, f["mu_log_size_pix"]], det[:, f["mu_log_w20_chan"]] = 1.0, 0.5, 1.3
    det[:, f["mu_incl_frac"]] = 0.5
    det[0, f["mu_ux"]], det[0, f["mu_uy"]] = -1.0, 0.0  # towards lower column = east (CDELT1 < 0)
    det[1, f["mu_ux"]], det[1, f["mu_uy"]] = 0.0, 1.0  # towards higher row = north
    det[:, [f[f"lv_{k}"] for k in data.REGRESSED]] = 2 * math.log(0.1)  # sigma 0.1 in every regressed quantity
    cols = data.to_sdc2(det, scales)
    nu = 950e6 + 10 * 3e4
    assert cols["line_flux_integral"] == pytest.approx([10 * 3e4 * 3e-5] * 2)  # 10 x channel width x noise = 9 Jy Hz
    assert cols["line_flux_integral_err"] == pytest.approx([9.0 * math.log(10) * 0.1] * 2)
    assert cols["hi_size"] == pytest.approx([10**0.5 * 2.8] * 2)
    assert cols["w20"] == pytest.approx([299792.458 * 10**1.3 * 3e4 * 1420405751.768 / nu**2] * 2)  # SDC2: c dnu nu_HI / nu^2
    assert cols["i"] == pytest.approx([45.0, 45.0]) and cols["i_err"] == pytest.approx([9.0, 9.0])
    assert cols["pa"] == pytest.approx([90.0, 0.0])
    # and back: pixel_frame inverts it
    frame = data.pixel_frame({"central_freq": np.array([nu]), "line_flux_integral": np.array([9.0]), "hi_size": np.array([2.8 * 10**0.5]),
                              "w20": cols["w20"][:1], "pa": np.array([90.0]), "i": np.array([45.0])}, scales)
    assert frame["log_flux_norm"][0] == pytest.approx(1.0) and frame["log_w20_chan"][0] == pytest.approx(1.3)
    assert frame["ux"][0] == pytest.approx(-1.0) and frame["uy"][0] == pytest.approx(0.0, abs=1e-9)


def test_an_empty_tile_gives_an_empty_table_with_the_columns_and_units(card):
    model = _model(card)
    task = Detection3DTask(model.head_config)
    values = np.random.default_rng(1).normal(0, 3e-5, (16, 16, 16)).astype(np.float32)
    table = task.find_in_tile(model, values, None, _header(card))
    assert len(table) == 0
    for c in ("CHAN", "ROW", "COL", *SDC2):
        assert c in table.colnames
    for c, unit in SDC2.items():
        assert table[c].unit == unit and table[f"{c}_err"].unit == unit


def test_bad_inputs_are_refused_with_messages(card):
    model = _model(card)
    task = Detection3DTask(model.head_config)
    values = np.zeros((16, 16, 16), np.float32)
    no_spec = _header(card)
    no_spec["CTYPE3"] = "STOKES"
    with pytest.raises(InputError, match="spectral"):
        task.find_in_tile(model, values, None, no_spec)
    wide = _header(card)
    wide["BMAJ"] = wide["BMIN"] = 14.0 / 3600
    with pytest.raises(InputError, match="trained on 2.50"):
        task.find_in_tile(model, values, None, wide)
    with pytest.raises(InputError, match=r"\(C, H, W\)"):
        task.find_in_tile(model, values[0], None, _header(card))
    spectra = __import__("cosmofm.data_cards.mocks.generators", fromlist=["mock_samples"]).mock_samples(load_card("sdss-like"), 1, seed=0)
    with pytest.raises(InputError, match="cube tiles"):
        model(collate_samples(spectra, SURVEYS))


# ---------------------------------------------------------------------------- training and the release


def test_a_short_training_finds_a_bright_isolated_source_and_the_release_round_trips(card, tmp_path):
    """The whole chain (truth rows -> heatmap and regression targets -> loss -> peaks -> find_in_tile
    -> world units) is consistent: after a short training the best detection on a training tile
    sits on its source. Memorising a handful of tiles, not generalisation: that is measured by
    scripts/bench/detect_quality.py on held-out survey cubes."""
    from cosmofm.finetune.loop import LoopConfig, finetune_loop
    from cosmofm.finetune.strategies import Strategy

    tiles = _bright_tiles(card, 8, 100)
    model = _model(card, threshold=0.05)
    task = Detection3DTask(model.head_config)
    run = finetune_loop(model, [s for s, _ in tiles], task.targets, Strategy("full"), LoopConfig(epochs=40, batch_size=4, lr=5e-3, seed=0))
    model = run.model.eval()
    assert np.mean(run.step_losses[-4:]) < 0.3 * np.mean(run.step_losses[:4])
    hits = 0
    for sample, header in tiles[:4]:
        truth = sample.meta["labels"]["sources"][0]
        found = task.find_in_tile(model, sample.values, sample.ivar, header)
        if not len(found):
            continue
        best = found[int(np.argmax(found["score"]))]
        sep = math.hypot(best["ROW"] - truth["row"], best["COL"] - truth["col"])
        hits += sep < 2.5 and abs(best["CHAN"] - truth["chan"]) < 4  # within a beam (2.5 pixels) and a few channels
    assert hits >= 3

    model.save_pretrained(tmp_path / "det")
    write_manifest(tmp_path / "det")
    loaded = from_pretrained(tmp_path / "det", expect_task="detection3d").eval()
    assert type(loaded) is CosmoFMForDetection3D and loaded.head_config == model.head_config
    batch = collate_samples([s for s, _ in tiles[:2]], SURVEYS)
    with torch.no_grad():
        a, b = model(batch, return_maps=True), loaded(batch, return_maps=True)
    assert torch.equal(a.heatmap, b.heatmap) and torch.equal(a.properties, b.properties)
    torch.testing.assert_close(a.detections, b.detections, rtol=0, atol=0, equal_nan=True)  # padding rows are NaN
    assert float(a.detections[0, 0, 0]) > 0.05


def test_the_shipped_recipe_runs_with_tiny_overrides_and_makes_a_release(tmp_path):
    recipe = FinetuneRecipe.load("detection3d", ["backbone_recipe=tiny", "n_labelled=10", "mocks.tile=[16, 16, 16]",
                                                 "mocks.density=20000.0", "finetune.epochs=1", "finetune.batch_size=3",
                                                 f"finetune.output_dir={tmp_path / 'run'}"])
    assert recipe.task == "detection3d" and recipe.mocks["tile"] == [16, 16, 16]
    result = run_recipe(recipe, progress=False)
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    details = results["details"]
    assert details["n_test"] == 2 and "sdc2_score" in details and "completeness" in details and details["n_truth"] >= 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file() and (tmp_path / "run" / "finetune_recipe.yaml").is_file()
    release = from_pretrained(result["model_dir"], expect_task="detection3d")
    assert type(release) is CosmoFMForDetection3D
    # cosmofm detect runs it on blocks of its training tiles
    assert release.head_config.inference == {"head_block": [16, 16, 16], "block_overlap": [4, 4, 4]}


# ---------------------------------------------------------------------------- post-processing: merging and the receding side


def test_merge_keeps_the_strongest_of_each_source_window_and_only_suppresses_from_survivors():
    from cosmofm.heads.detection3d_post import merge_keep

    score = np.array([0.9, 0.5, 0.4, 0.8])
    xy = np.array([[0.0, 0.0], [3.0, 0.0], [7.0, 0.0], [30.0, 0.0]])
    z = np.array([0.0, 5.0, 9.0, 0.0])
    conv, spec = np.full(4, 4.0), np.full(4, 10.0)
    # 1 lies in 0's window (3 < 4, 5 < 10) and goes; 2 lies in 1's window only, and 1 is gone: 2 stays; 3 is far
    assert merge_keep(score, xy, z, conv, spec, 1.0).tolist() == [True, False, True, True]
    assert merge_keep(score, xy, z, conv, spec, 0.0).tolist() == [True] * 4
    # a wider factor reaches 2 from 0 (7 < 8, 9 < 20); the spectral window alone decides too
    assert merge_keep(score, xy, z, conv, spec, 2.0).tolist() == [True, False, False, True]
    assert merge_keep(score, xy, z + np.array([0.0, 20.0, 0.0, 0.0]), conv, spec, 1.0).tolist() == [True] * 4  # 1 at 25 channels: out of 0's window


def test_merge_catalogue_works_in_world_units_and_needs_scores():
    from astropy.table import Table

    from cosmofm.heads.detection3d_post import merge_catalogue

    t = Table({"ra": [10.0, 10.0 + 3.0 / 3600, 10.0 + 60.0 / 3600], "dec": [0.0, 0.0, 0.0], "central_freq": [1.1e9, 1.1e9 + 2e4, 1.1e9],
               "hi_size": [10.0, 10.0, 10.0], "w20": [200.0, 200.0, 200.0], "score": [0.3, 0.6, 0.5]})
    out = merge_catalogue(t, 7.0, 1.0)  # 3 arcsec < sqrt(10^2 + 7^2), 20 kHz < ~0.8 MHz: one source
    assert out["score"].tolist() == [0.6, 0.5]
    with pytest.raises(InputError, match="score"):
        merge_catalogue(t[["ra", "dec", "central_freq", "hi_size", "w20"]], 7.0, 1.0)


def test_receding_direction_follows_the_velocity_gradient_and_the_channel_direction():
    from cosmofm.heads.detection3d_post import receding_direction

    shape = (40, 32, 32)
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    u_dir = np.array([math.cos(math.radians(30)), math.sin(math.radians(30))])  # (col, row) of the receding side
    cube = np.zeros(shape)
    for t in np.linspace(-1, 1, 9):  # a rotating bar: offset t along u at channel 20 - 8 t (lower channel = receding)
        x, y = 16 + 6 * t * u_dir[0], 16 + 6 * t * u_dir[1]
        cube += 5 * np.exp(-0.5 * (((xx - x) ** 2 + (yy - y) ** 2) / 1.5**2 + ((zz - (20 - 8 * t)) / 2.0) ** 2))
    cube += np.random.default_rng(0).normal(0, 0.3, shape)
    det = torch.zeros(1, 2, len(data.DETECTION_FIELDS))
    f = {k: i for i, k in enumerate(data.DETECTION_FIELDS)}
    det[0, 0, [f["score"], f["chan"], f["row"], f["col"]]] = torch.tensor([0.9, 20.0, 16.0, 16.0])
    det[0, 0, f["mu_log_w20_chan"]], det[0, 0, f["mu_log_size_pix"]] = math.log10(20.0), math.log10(12.0)
    snr = torch.tensor(cube, dtype=torch.float32).unsqueeze(0)
    up = receding_direction(snr, det, torch.tensor([1.0]))[0]
    assert float(up[0] @ torch.tensor(u_dir, dtype=up.dtype)) > math.cos(math.radians(8))  # within 8 deg
    assert torch.isnan(up[1]).all()  # the padding row
    down = receding_direction(snr, det, torch.tensor([-1.0]))[0]  # frequency falling with channel: the other side recedes
    torch.testing.assert_close(down[0], -up[0])


def test_merge_factor_and_pa_source_are_checked(card):
    assert Detection3DHeadConfig().merge_factor == 1.0 and Detection3DHeadConfig().pa_from == "moment"
    with pytest.raises(InputError, match="task.merge_factor"):
        Detection3DHeadConfig(merge_factor=-1.0)
    with pytest.raises(InputError, match="task.pa_from"):
        Detection3DHeadConfig(pa_from="network")


def test_cube_calibration_prefers_merging_a_duplicate_to_raising_the_threshold(card):
    from astropy.table import Table

    truth = Table({"ra": [10.0, 10.02], "dec": [0.0, 0.0], "central_freq": [1.10e9, 1.12e9], "line_flux_integral": [1.0, 2.0],
                   "hi_size": [10.0, 12.0], "w20": [200.0, 250.0], "pa": [30.0, 200.0], "i": [50.0, 60.0]})
    cat = Table({c: np.concatenate([np.asarray(truth[c]), np.asarray(truth[c][:1]), np.asarray(truth[c][:1])]) for c in truth.colnames})
    cat["ra"][2] += 3.0 / 3600  # a duplicate of source 0, 3 arcsec off (its window: sqrt(10^2 + 7^2) = 12 arcsec)
    cat["ra"][3] += 0.01  # noise: 36 arcsec from anything
    cat["score"] = [0.8, 0.7, 0.62, 0.3]
    model = _model(card)
    task = Detection3DTask(model.head_config)
    fitted = task.calibrate_catalogues(model, [(cat, truth)], 7.0, 0.9)
    # the noise row (0.3) must go; the duplicate goes by merging (0.5 x its window reaches 3 arcsec), not by a threshold above 0.62;
    # every threshold from 0.31 to 0.70 keeps the same catalogue: the middle of that run is chosen
    assert (fitted["threshold"], fitted["merge_factor"]) == (0.5, 0.5) and model.head_config.threshold == 0.5
    assert fitted["purity_calibration"] == 1.0 and fitted["sdc2_score_calibration"] == pytest.approx(2.0)
    model._set_task(threshold=0.05)
    task = Detection3DTask(model.head_config)
    fitted = task.calibrate_catalogues(model, [(cat, truth)], 7.0, 0.9, merge_factors=(0.0,))  # no merging: the threshold must climb
    assert fitted["threshold"] == 0.66 and fitted["sdc2_score_calibration"] == pytest.approx(2.0)  # the middle of 0.63-0.70


def test_cube_calibration_keeps_a_binomial_margin_above_the_purity_floor(card):
    from astropy.table import Table

    n = 9
    truth = Table({"ra": 10.0 + 0.05 * np.arange(n), "dec": np.zeros(n), "central_freq": np.full(n, 1.1e9), "line_flux_integral": np.ones(n),
                   "hi_size": np.full(n, 10.0), "w20": np.full(n, 200.0), "pa": np.full(n, 30.0), "i": np.full(n, 50.0)})
    cat = Table({c: np.append(np.asarray(truth[c]), np.asarray(truth[c][:1])) for c in truth.colnames})
    cat["dec"][-1] += 0.02  # noise: 72 arcsec from anything
    cat["score"] = [0.8] * 5 + [0.4] * 4 + [0.6]  # the false row outscores four true ones
    model = _model(card)
    # all ten rows: purity 0.90 exactly, but 0.90 - sqrt(0.9 x 0.1 / 10) = 0.81 clears 0.8, not 0.9
    fitted = Detection3DTask(model.head_config).calibrate_catalogues(model, [(cat, truth)], 7.0, 0.9, merge_factors=(0.0,))
    assert fitted["threshold"] > 0.6 and fitted["purity_calibration"] == 1.0 and fitted["sdc2_score_calibration"] == pytest.approx(5.0)
    model._set_task(threshold=0.05)
    fitted = Detection3DTask(model.head_config).calibrate_catalogues(model, [(cat, truth)], 7.0, 0.8, merge_factors=(0.0,))
    assert fitted["threshold"] <= 0.4 and fitted["purity_calibration"] == pytest.approx(0.9)
    assert fitted["purity_bound_calibration"] == pytest.approx(0.9 - 0.3 / math.sqrt(10))
    assert fitted["sdc2_score_calibration"] == pytest.approx(8.0)


def test_detect_quality_strategies_train_what_they_name(card, tmp_path):
    """scripts/bench/detect_quality.py --strategy goes through the shared fine-tune strategies on a
    pretrained backbone: frozen leaves every backbone weight as loaded, lora changes only the
    attention layers its adapters sit on (merged)."""
    from argparse import Namespace

    from cosmofm.bench.detect_quality import train
    from cosmofm.pretrain import CosmoFMModel

    torch.manual_seed(0)
    backbone = CosmoFMModel(CosmoFMConfig(**TINY))
    backbone.save_pretrained(tmp_path / "bb")
    write_manifest(tmp_path / "bb")
    args = Namespace(n_train=2, train_sparse_share=0.0, tile=[32, 16, 16], train_density=10000.0, log_mhi_min=9.5, backbone=str(tmp_path / "bb"),
                     backbone_recipe="demo", train_seed=0, batch_size=2, steps=1, lr=1e-2, progress=False, max_grad_norm=100.0)
    frozen, lora = (train(card, Namespace(**vars(args), strategy=s))[2] for s in ("frozen", "lora"))
    assert frozen["trainable"]["backbone"] == 0 and frozen["changed"]["backbone_tensors"] == []
    assert frozen["changed"]["head_values"] == frozen["trainable"]["head"] > 0
    assert lora["changed"]["backbone_tensors"] and all(".attn.qkv.weight" in n or ".attn.proj.weight" in n for n in lora["changed"]["backbone_tensors"])
    assert 0 < lora["trainable"]["backbone"] < sum(p.numel() for p in backbone.parameters()) / 2
