"""The deblending head across seeing: blends observed at several PSF FWHMs, a head told each
stamp's PSF (`psf_conditioning`), and the seeing it was trained on recorded for the checks."""

import json

import numpy as np
import pytest
import torch
from astropy.io import fits

import cosmofm
from cosmofm.data_cards import InputError
from cosmofm.heads.deblending import DeblendingHeadConfig, DeblendingTask
from cosmofm.heads.deblending_data import psf_fwhm_pixels, seeing_card
from cosmofm.heads.deblending_predict import stamp_sample, tile_psf_fwhm
from cosmofm.pretrain import collate_samples
from cosmofm.pretrain.checkpoint import write_manifest

from test_deblending_head import CARD, _model, one_thread  # noqa: F401 (one_thread: the module's autouse fixture)

CARD_FWHM = [float((b.psf_fwhm / CARD.pixel_scale).decompose().value) for b in CARD.bands]  # pixels, per band


@pytest.fixture(scope="module")
def blends():
    """Four 32 x 32 blends, the odd ones observed at 1.5x the card's PSF FWHM."""
    return DeblendingTask.labelled_mocks(CARD, 4, 0, stamp_size=32, psf_scales=[1.0, 1.5])


def test_labelled_mocks_across_seeing_observe_blend_i_at_scale_i_mod_n(blends):
    """Blend i is the same object set as without psf_scales, observed with every band's PSF
    FWHM x psf_scales[i % n]: the even ones are the card's blends pixel for pixel, the odd
    ones blurrier (lower peak, same objects), and each carries its PSF."""
    plain = DeblendingTask.labelled_mocks(CARD, 4, 0, stamp_size=32)
    for i, (s, p) in enumerate(zip(blends, plain)):
        scale = 1.5 if i % 2 else 1.0
        assert psf_fwhm_pixels(s, DeblendingHeadConfig.from_card(CARD)) == pytest.approx(np.asarray(CARD_FWHM) * scale, rel=1e-5)
        assert s.meta["truth"]["objects"] == p.meta["truth"]["objects"]
        if scale == 1.0:
            assert np.array_equal(s.values, p.values)
        else:
            assert s.values.max() < 0.9 * p.values.max()
    assert seeing_card(CARD, 1.0) is CARD and seeing_card(CARD, 2.0).bands[0].psf_fwhm == 2 * CARD.bands[0].psf_fwhm
    for bad in ([], [1.0, 0.0], [True], "wide"):
        with pytest.raises(InputError, match="psf_scales"):
            DeblendingTask.labelled_mocks(CARD, 2, 0, stamp_size=32, psf_scales=bad)


def test_a_psf_conditioned_head_takes_each_bands_seeing_as_input_planes(blends):
    """psf_conditioning adds one input plane per band (log PSF FWHM over the card's) to the
    decoder's pixel branch and to the refiner; its Task gives the stamps' PSF as an input,
    the forward answers to it, and None is the card's seeing. An unconditioned head has
    neither the planes nor the input, so the heads saved before load unchanged."""
    b = len(CARD.bands)
    plain, told = _model(), _model(psf_conditioning=True)
    assert plain.decoder.pixel[0][0].in_channels == 2 * b + 1 and told.decoder.pixel[0][0].in_channels == 3 * b + 1
    assert plain.refiner.body[0][0].in_channels == 4 * b + 3 and told.refiner.body[0][0].in_channels == 5 * b + 3
    assert DeblendingTask(plain.head_config).inputs(blends) == {}
    inputs = DeblendingTask(told.head_config).inputs(blends)
    assert torch.allclose(inputs["psf_fwhm"][1], 1.5 * torch.tensor(CARD_FWHM), rtol=1e-5)
    assert "psf_fwhm" in DeblendingTask(told.head_config).targets(blends)  # training sees it too
    with torch.no_grad():
        told.refiner.out.weight.normal_(0, 0.1)  # a trained refiner's corrections (its fresh last layer is zero)
    batch = collate_samples(list(blends), told.config.survey_names)
    card_seeing = torch.tensor(CARD_FWHM).expand(len(blends), b)
    pos = torch.tensor([[[16.0, 16.0], [12.0, 19.0]]]).expand(len(blends), 2, 2)
    with torch.no_grad():
        none, same, wider = (told.eval()(batch, positions=pos, psf_fwhm=p) for p in (None, card_seeing, 1.5 * card_seeing))
    assert torch.equal(none.heatmap, same.heatmap) and torch.equal(none.fluxes.nan_to_num(-1), same.fluxes.nan_to_num(-1))
    assert not torch.equal(wider.heatmap, same.heatmap)  # fresh: a small change, but a change
    assert (wider.fluxes - same.fluxes).nan_to_num(0).abs().max() > 1e-4 * same.fluxes.nan_to_num(0).abs().max()
    loss = told.train()(batch, **DeblendingTask(told.head_config).targets(blends)).loss
    loss.backward()
    assert told.decoder.pixel[0][0].weight.grad[:, 2 * b + 1:].abs().sum() > 0  # the seeing planes are trained


def test_prepare_records_the_training_seeing_and_it_round_trips(blends, tmp_path):
    """`DeblendingTask.prepare` measures trained_psf_range from the training stamps' PSFs; it
    and psf_conditioning survive save / from_pretrained, and bad values are refused."""
    model = _model(psf_conditioning=True)
    assert model.head_config.trained_psf_range == [1.0, 1.0]
    DeblendingTask(model.head_config).prepare(model, blends)
    assert model.head_config.trained_psf_range == [1.0, 1.5] and model.config.task["trained_psf_range"] == [1.0, 1.5]
    model.save_pretrained(tmp_path / "m")
    write_manifest(tmp_path / "m")
    loaded = cosmofm.from_pretrained(str(tmp_path / "m"), expect_task="deblending")
    assert loaded.head_config.psf_conditioning and loaded.head_config.trained_psf_range == [1.0, 1.5]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["task"]["band_fwhm_pixels"] == pytest.approx(CARD_FWHM)
    for field, value in (("trained_psf_range", [1.2, 1.0]), ("trained_psf_range", [0.0, 1.0]), ("band_fwhm_pixels", [4.0]),
                         ("psf_conditioning", "yes")):
        with pytest.raises(InputError, match=field):
            DeblendingHeadConfig.from_card(CARD, **{field: value})


def test_a_stamps_psf_comes_from_its_tile_header_or_meta_else_the_card():
    """find_in_tile's stamps carry the header's per-band PSFFWHM{k} (else PSFFWHM for every
    band) in arcsec; psf_fwhm_pixels converts by the stamp's pixel step; a stamp with none gets
    the head's card seeing; a non-positive PSF is refused naming it."""
    head = DeblendingHeadConfig.from_card(CARD)
    b = len(CARD.bands)
    header = fits.Header({"PSFFWHM": 1.0})
    assert tile_psf_fwhm(header, b) == [1.0] * b and tile_psf_fwhm(fits.Header(), b) is None and tile_psf_fwhm(None, b) is None
    header.update({f"PSFFWHM{k}": 0.5 + 0.1 * k for k in range(b)})
    assert tile_psf_fwhm(header, b) == pytest.approx([0.5 + 0.1 * k for k in range(b)])
    values = np.zeros((b, 16, 16), np.float32)
    s = stamp_sample(head, values, np.ones_like(values), pixel_scale=0.25, psf_fwhm_arcsec=tile_psf_fwhm(header, b))
    assert psf_fwhm_pixels(s, head) == pytest.approx([(0.5 + 0.1 * k) / 0.25 for k in range(b)], rel=1e-5)
    assert psf_fwhm_pixels(stamp_sample(head, values, np.ones_like(values)), head) == pytest.approx(CARD_FWHM, rel=1e-5)
    for bad in ([0.0] * b, [0.8] * (b - 1)):  # not positive; not one per band
        with pytest.raises(InputError, match="PSF FWHM"):
            psf_fwhm_pixels(stamp_sample(head, values, np.ones_like(values), psf_fwhm_arcsec=bad), head)
    one = stamp_sample(head, values, np.ones_like(values), psf_fwhm_arcsec=[0.8] * b)
    one.meta["psf_fwhm_arcsec"] = 0.8  # one value: every band's
    assert psf_fwhm_pixels(one, head) == pytest.approx([4.0] * b)


def test_a_mosaic_tile_header_gives_each_bands_psf(tmp_path):
    """The mock mosaic writes PSFFWHM per band; `Mosaic.tile_header` passes each on as PSFFWHM{k}."""
    from cosmofm.data_cards.mocks.blend_fields import mock_field, write_field_fits
    from cosmofm.data_cards.readers.mosaic import open_mosaic

    path = write_field_fits(tmp_path / "field.fits", mock_field(CARD, 48, 0, density=20.0), CARD)
    mosaic = open_mosaic(path)
    header = mosaic.tile_header((slice(0, 16), slice(0, 16)))
    assert tile_psf_fwhm(header, len(CARD.bands)) == pytest.approx([b.psf_fwhm.to_value("arcsec") for b in CARD.bands])
    assert mosaic.psf_fwhm == pytest.approx(max(b.psf_fwhm.to_value("arcsec") for b in CARD.bands))


def test_the_recipe_trains_a_told_head_across_seeing(tmp_path):
    """The deblending recipe with mocks.psf_scales and a psf_conditioning head: the fine-tune
    records the seeing it trained on, evaluates with each stamp's PSF, and saves both."""
    from cosmofm.finetune.recipe import FinetuneRecipe, run_recipe

    out = tmp_path / "run"
    recipe = FinetuneRecipe.load("deblending", ["n_labelled=20", "backbone_recipe=tiny", "mocks.stamp_size=32", "mocks.psf_scales=[1.0, 1.25]",
                                                "finetune.head={psf_conditioning: true}", "finetune.epochs=1", "finetune.batch_size=8",
                                                f"finetune.output_dir={out}"])
    result = run_recipe(recipe, progress=False)
    model = cosmofm.from_pretrained(result["model_dir"], expect_task="deblending")
    assert model.head_config.psf_conditioning and model.head_config.trained_psf_range == [1.0, 1.25]
    assert json.loads((out / "eval_results.json").read_text())["details"]["n_test"] == 4


def test_find_in_tile_tells_a_conditioned_head_the_tiles_seeing(blends):
    """`cosmofm deblend`'s tile finder passes the tile header's PSF on: a conditioned head's
    fluxes change with PSFFWHM, an unconditioned head's do not."""
    told, plain = _model(psf_conditioning=True, peak_threshold=1e-3), _model(peak_threshold=1e-3)
    with torch.no_grad():
        for m in (told, plain):
            m.refiner.out.weight.normal_(0, 0.1)
            m.decoder.out.bias[0] = 3.0  # untrained: detect the bright peaks
    s = blends[0]
    fluxes = {}
    for name, m in (("told", told), ("plain", plain)):
        for seeing in (0.7, 1.05):
            header = fits.Header({"PSFFWHM": seeing, "PIXSCALE": 0.2})
            t = DeblendingTask(m.head_config).find_in_tile(m.eval(), s.values, s.ivar, header)
            fluxes[name, seeing] = np.asarray(t[f"FLUX_{CARD.bands[0].name}"])
    assert len(fluxes["told", 0.7]) > 0
    assert np.array_equal(fluxes["plain", 0.7], fluxes["plain", 1.05])
    assert not np.array_equal(fluxes["told", 0.7], fluxes["told", 1.05])


def test_the_told_seeing_bench_tells_a_conditioned_head_each_seeing(tmp_path):
    """`deblend_told_seeing`: per saved head and test seeing, the true-centre blended flux
    figures for each seeing it is told; a conditioned head answers to what it is told, an
    unconditioned one is run once (told the card's)."""
    from cosmofm.bench.deblend_told_seeing import main
    from cosmofm.pretrain.manifest import save_release

    told, plain = _model(psf_conditioning=True), _model()
    with torch.no_grad():
        told.refiner.out.weight.normal_(0, 0.1)
    save_release(told, tmp_path / "told")
    save_release(plain, tmp_path / "plain")
    report = main(["--out", str(tmp_path / "out"), "--models", str(tmp_path / "told"), str(tmp_path / "plain"), "--n", "3",
                   "--true", "1.25", "--told", "1", "1.25"])
    assert json.loads((tmp_path / "out" / "deblend_told_seeing.json").read_text())["heads"].keys() == report["heads"].keys()
    rows = report["heads"][str(tmp_path / "told")]["by_true_seeing"]["1.25"]
    assert set(rows) == {"1", "1.25"} and rows["1"]["n"] == rows["1.25"]["n"] > 0
    assert rows["1"]["mape"] != rows["1.25"]["mape"]
    assert set(report["heads"][str(tmp_path / "plain")]["by_true_seeing"]["1.25"]) == {"1"}
