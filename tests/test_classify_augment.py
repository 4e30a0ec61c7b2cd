"""Tilt augmentation of the classifier's training spectra (FinetuneConfig.tilt_rms, issue 17)."""

import numpy as np
import pytest

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.finetune.classification import FinetuneConfig, TiltedSpectra, build_model, finetune_classification, smooth_tilt
from cosmofm.finetune.classify import predict

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, spectrum_patch_size=128, coord_frequencies=4, projection_dim=8)
WAVE = np.geomspace(3600.0, 10400.0, 500)


@pytest.fixture(scope="module")
def spectra(sdss):
    return mock_samples(sdss, 24, seed=3)


def test_tilt_rms_is_the_drawn_amplitude_and_the_shape_a_low_order_polynomial():
    for order, rms in ((1, 0.1), (3, 0.2)):
        factor = smooth_tilt(WAVE, np.random.default_rng(5), rms, order)
        replay = np.random.default_rng(5)
        replay.normal(0, 1, order)
        assert np.std(np.log(factor)) == pytest.approx(replay.uniform(0, rms), rel=1e-9)
        t = np.linspace(-1, 1, WAVE.size)  # ln wavelength of a geometric grid, mapped onto [-1, 1]
        fit = np.polynomial.legendre.Legendre.fit(t, np.log(factor), order)
        assert np.max(np.abs(fit(t) - np.log(factor))) < 1e-9
        assert abs(fit.convert().coef[0]) < 1.5 * np.std(np.log(factor))  # no large constant: order 0 is left out
    slope = np.log(smooth_tilt(WAVE, np.random.default_rng(1), 0.1, 1))
    assert np.allclose(np.diff(slope, 2), 0, atol=1e-12)  # order 1: a straight line in ln wavelength


def test_tilted_spectra_redraw_every_read_keep_sn_and_replay(spectra):
    tilted = TiltedSpectra(spectra, 0.2, 3, seed=0)
    first, second = tilted[4], tilted[4]
    ok = spectra[4].ivar > 0
    ratio1, ratio2 = first.values[ok] / spectra[4].values[ok], second.values[ok] / spectra[4].values[ok]
    assert np.max(np.abs(np.log(ratio1) - np.log(ratio2))) > 0.01  # a new tilt on the second read
    sn = spectra[4].values * np.sqrt(spectra[4].ivar)
    assert np.allclose(first.values * np.sqrt(first.ivar), sn, rtol=1e-5, atol=1e-6)
    assert first.meta["labels"] == spectra[4].meta["labels"]
    again = TiltedSpectra(spectra, 0.2, 3, seed=0)  # a rerun draws the same tilts
    assert np.array_equal(again[4].values, first.values) and np.array_equal(again[4].values, second.values)
    other_seed = TiltedSpectra(spectra, 0.2, 3, seed=1)[4]
    assert not np.array_equal(other_seed.values, first.values)
    assert list(tilted.reads[:6]) == [0, 0, 0, 0, 2, 0]


def test_ivar_tilt_is_independent_of_the_values_tilt(spectra):
    plain, both = TiltedSpectra(spectra, 0.2, 3, seed=0)[7], TiltedSpectra(spectra, 0.2, 3, seed=0, ivar_rms=0.3)[7]
    assert np.array_equal(plain.values, both.values)  # the values' tilt is drawn first, as without the ivar tilt
    ok = plain.ivar > 0
    g = np.log(both.ivar[ok] / plain.ivar[ok])
    assert 0.005 < np.std(g) <= 0.3 * 1.001  # a tilt of ivar alone, within its rms bound
    t = np.log(spectra[7].coords["wavelength"][ok])
    fit = np.polynomial.legendre.Legendre.fit(t, g, 3)
    assert np.max(np.abs(fit(t) - g)) < 1e-4  # smooth: orders <= 3 in ln wavelength (float32 ivar)


def test_bad_tilt_settings_are_input_errors():
    for kw, field in (({"tilt_rms": -0.1}, "tilt_rms"), ({"tilt_rms": 2.0}, "tilt_rms"), ({"tilt_order": 0}, "tilt_order"), ({"tilt_ivar_rms": -1.0}, "tilt_ivar_rms"),
                      ({"tilt_ivar_rms": 0.2, "resume": True, "output_dir": "x"}, "resume"),
                      ({"tilt_rms": 0.1, "resume": True, "output_dir": "x"}, "resume")):
        with pytest.raises(InputError) as err:
            FinetuneConfig(**kw)
        assert err.value.field == field


def test_the_loop_reads_each_training_spectrum_once_for_targets_then_once_per_epoch(spectra, sdss):
    from cosmofm.finetune.loop import finetune_loop
    from cosmofm.heads.classification import ClassificationTask

    cfg = FinetuneConfig(strategy="full", epochs=3, batch_size=8, lr=3e-3)
    model = build_model(sdss, cfg, backbone_config=TINY)
    tilted = TiltedSpectra(spectra[:20], 0.2, 3, seed=0)
    finetune_loop(model, tilted, ClassificationTask(model.head_config).targets, cfg.tuning, cfg)
    assert tilted.reads.tolist() == [1 + 3] * 20


def test_tilts_change_the_fine_tune_and_zero_leaves_it_alone(spectra, sdss):
    logits = {}
    for key, rms in (("off", 0.0), ("off again", 0.0), ("on", 0.3)):
        cfg = FinetuneConfig(strategy="full", epochs=2, batch_size=8, lr=3e-3, tilt_rms=rms)
        logits[key] = predict(finetune_classification(spectra, sdss, cfg, backbone_config=TINY)["model"], spectra[:8])["logits"]
    assert np.array_equal(logits["off"], logits["off again"])
    assert np.max(np.abs(logits["on"] - logits["off"])) > 1e-3
