"""Augmentation of the classifier's training spectra (finetune/spectra_augment.py: FinetuneConfig.tilt_rms,
tilt_ivar_rms, extra_noise, redshift_stretch; issue 17)."""

import numpy as np
import pytest

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.mocks.spectra import CLASSES
from cosmofm.finetune.classification import FinetuneConfig, build_model, finetune_classification
from cosmofm.finetune.classify import predict
from cosmofm.finetune.spectra_augment import AugmentedSpectra, smooth_tilt
from cosmofm.heads.template_fit import class_family

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


def test_augmented_spectra_redraw_every_read_keep_sn_and_replay(spectra):
    tilted = AugmentedSpectra(spectra, 0, tilt_rms=0.2)
    first, second = tilted[4], tilted[4]
    ok = spectra[4].ivar > 0
    ratio1, ratio2 = first.values[ok] / spectra[4].values[ok], second.values[ok] / spectra[4].values[ok]
    assert np.max(np.abs(np.log(ratio1) - np.log(ratio2))) > 0.01  # a new tilt on the second read
    sn = spectra[4].values * np.sqrt(spectra[4].ivar)
    assert np.allclose(first.values * np.sqrt(first.ivar), sn, rtol=1e-5, atol=1e-6)
    assert first.meta["labels"] == spectra[4].meta["labels"]
    again = AugmentedSpectra(spectra, 0, tilt_rms=0.2)  # a rerun draws the same tilts
    assert np.array_equal(again[4].values, first.values) and np.array_equal(again[4].values, second.values)
    other_seed = AugmentedSpectra(spectra, 1, tilt_rms=0.2)[4]
    assert not np.array_equal(other_seed.values, first.values)
    assert list(tilted.reads[:6]) == [0, 0, 0, 0, 2, 0]


def test_ivar_tilt_is_independent_of_the_values_tilt(spectra):
    plain, both = AugmentedSpectra(spectra, 0, tilt_rms=0.2)[7], AugmentedSpectra(spectra, 0, tilt_rms=0.2, tilt_ivar_rms=0.3)[7]
    assert np.array_equal(plain.values, both.values)  # the values' tilt is drawn first, as without the ivar tilt
    ok = plain.ivar > 0
    g = np.log(both.ivar[ok] / plain.ivar[ok])
    assert 0.005 < np.std(g) <= 0.3 * 1.001  # a tilt of ivar alone, within its rms bound
    t = np.log(spectra[7].coords["wavelength"][ok])
    fit = np.polynomial.legendre.Legendre.fit(t, g, 3)
    assert np.max(np.abs(fit(t) - g)) < 1e-4  # smooth: orders <= 3 in ln wavelength (float32 ivar)


def test_extra_noise_lowers_the_sn_by_the_drawn_factor_with_a_fresh_draw_each_read(spectra):
    noisy = AugmentedSpectra(spectra, 0, extra_noise=1.0)
    plain = spectra[5]
    ok = plain.ivar > 0
    factors = []
    for read in range(6):
        got = noisy[5]
        k2 = plain.ivar[ok] / got.ivar[ok] - 1  # ivar / (1 + k^2): one k for the whole spectrum
        assert np.ptp(k2) < 1e-4 * max(1.0, float(np.mean(k2)))
        k = float(np.sqrt(max(np.mean(k2), 0.0)))
        factors.append(k)
        if k > 0.2:  # the noise added is k sigma per pixel, Gaussian
            z = (got.values[ok] - plain.values[ok]) * np.sqrt(plain.ivar[ok]) / k
            assert abs(np.std(z) - 1) < 0.1 and abs(np.mean(z)) < 0.1
        assert np.array_equal(got.values[~ok], plain.values[~ok]) and np.all(got.ivar[~ok] == 0)  # masked pixels untouched
    assert len(set(np.round(factors, 6))) == 6  # a new draw on every read
    many = []
    for _ in range(300):  # k is uniform in [0, extra_noise]: spans it, never beyond, mean at its middle
        k2 = plain.ivar[ok] / noisy[5].ivar[ok] - 1
        many.append(float(np.sqrt(max(np.mean(k2), 0.0))))
    assert max(many) <= 1.0 + 1e-6 and max(many) > 0.97 and min(many) < 0.03 and abs(np.mean(many) - 0.5) < 0.05
    assert np.array_equal(AugmentedSpectra(spectra, 0, extra_noise=1.0)[5].values, AugmentedSpectra(spectra, 0, extra_noise=1.0)[5].values)
    assert FinetuneConfig(extra_noise=0.5).augments and not FinetuneConfig().augments


def test_bad_tilt_settings_are_input_errors():
    for kw, field in (({"tilt_rms": -0.1}, "tilt_rms"), ({"tilt_rms": 2.0}, "tilt_rms"), ({"tilt_order": 0}, "tilt_order"), ({"tilt_ivar_rms": -1.0}, "tilt_ivar_rms"),
                      ({"tilt_ivar_rms": 0.2, "resume": True, "output_dir": "x"}, "resume"),
                      ({"tilt_rms": 0.1, "resume": True, "output_dir": "x"}, "resume"),
                      ({"redshift_stretch": -0.1}, "redshift_stretch"), ({"redshift_stretch": 0.8}, "redshift_stretch"),
                      ({"redshift_stretch": 0.1, "resume": True, "output_dir": "x"}, "resume"),
                      ({"redshift_stretch_families": "QSO"}, "redshift_stretch_families"),
                      ({"extra_noise": -0.5}, "extra_noise"), ({"extra_noise": 4.0}, "extra_noise"),
                      ({"extra_noise": 1.0, "resume": True, "output_dir": "x"}, "resume")):
        with pytest.raises(InputError) as err:
            FinetuneConfig(**kw)
        assert err.value.field == field


def test_the_loop_reads_each_training_spectrum_once_for_targets_then_once_per_epoch(spectra, sdss):
    from cosmofm.finetune.loop import finetune_loop
    from cosmofm.heads.classification import ClassificationTask

    cfg = FinetuneConfig(strategy="full", epochs=3, batch_size=8, lr=3e-3)
    model = build_model(sdss, cfg, backbone_config=TINY)
    tilted = AugmentedSpectra(spectra[:20], 0, tilt_rms=0.2)
    finetune_loop(model, tilted, ClassificationTask(model.head_config).targets, cfg.tuning, cfg)
    assert tilted.reads.tolist() == [1 + 3] * 20


def test_tilts_change_the_fine_tune_and_zero_leaves_it_alone(spectra, sdss):
    logits = {}
    for key, augment in (("off", {}), ("off again", {"tilt_rms": 0.0, "extra_noise": 0.0}), ("on", {"tilt_rms": 0.3}), ("noise", {"extra_noise": 1.0})):
        cfg = FinetuneConfig(strategy="full", epochs=2, batch_size=8, lr=3e-3, **augment)
        logits[key] = predict(finetune_classification(spectra, sdss, cfg, backbone_config=TINY)["model"], spectra[:8])["logits"]
    assert np.array_equal(logits["off"], logits["off again"])
    assert np.max(np.abs(logits["on"] - logits["off"])) > 1e-3
    assert np.max(np.abs(logits["noise"] - logits["off"])) > 1e-3


def _family(sample) -> str:
    return class_family(sample.meta["labels"]["spectral_class"])


def test_redshift_stretch_moves_galaxies_and_qsos_by_whole_pixels_with_their_label(spectra):
    stretched = AugmentedSpectra(spectra, 0, redshift_stretch=0.1, stretch_classes=[c for c in CLASSES if class_family(c) != "STAR"])
    step = np.log(spectra[0].coords["wavelength"][1] / spectra[0].coords["wavelength"][0])
    moved = 0
    for i, s in enumerate(spectra):
        out = stretched[i]
        z, z_new = s.meta["labels"]["redshift"], out.meta["labels"]["redshift"]
        if _family(s) == "STAR":
            assert np.array_equal(out.values, s.values) and z_new == z  # a star is never stretched
            continue
        k = int(round(np.log((1 + z_new) / (1 + z)) / step))
        assert abs(np.log((1 + z_new) / (1 + z)) - k * step) < 1e-9 and abs(k * step) <= 0.1 + step and z_new >= 0
        if k > 0:  # features move redward; the pixels entering at the blue edge are masked
            assert np.array_equal(out.values[k:], s.values[:-k]) and np.all(out.ivar[:k] == 0)
        elif k < 0:
            assert np.array_equal(out.values[:k], s.values[-k:]) and np.all(out.ivar[k:] == 0)
        assert s.meta["labels"]["redshift"] == z  # the stored sample is untouched
        moved += k != 0
    assert moved >= 5


def test_redshift_stretch_never_takes_a_redshift_below_zero(spectra):
    galaxy = next(s for s in spectra if _family(s) == "GALAXY")
    near = type(galaxy).validated("spectrum", galaxy.values, galaxy.ivar, galaxy.coords,
                                  {**galaxy.meta, "labels": {**galaxy.meta["labels"], "redshift": 0.02}})
    stretched = AugmentedSpectra([near], 0, redshift_stretch=0.1, stretch_classes=[galaxy.meta["labels"]["spectral_class"]])
    z = [stretched[0].meta["labels"]["redshift"] for _ in range(300)]
    assert min(z) >= 0 and min(z) < 0.005 and max(z) > 0.1  # down to ~0, up to 1.02 exp(0.1) - 1 = 0.127


def test_redshift_stretch_refuses_a_grid_that_is_not_log_sampled(spectra):
    s = spectra[0]
    linear = type(s).validated("spectrum", s.values, s.ivar, {"wavelength": np.linspace(3600.0, 10400.0, s.values.size)}, s.meta)
    with pytest.raises(InputError) as err:
        AugmentedSpectra([linear], 0, redshift_stretch=0.1, stretch_classes=[s.meta["labels"]["spectral_class"]])[0]
    assert "wavelength" in err.value.field


def test_the_loop_takes_a_stretched_batch_targets_from_the_spectra_as_read(spectra, sdss):
    from cosmofm.finetune.loop import _Collate
    from cosmofm.heads.classification import ClassificationTask

    model = build_model(sdss, FinetuneConfig(), backbone_config=TINY)
    task = ClassificationTask(model.head_config)
    stretched = AugmentedSpectra(spectra, 0, redshift_stretch=0.2, stretch_classes=[c for c in CLASSES if class_family(c) != "STAR"])
    first = task.targets(stretched)  # the reads the loop makes for its targets up front
    keys = [(i, len(spectra)) for i in range(len(spectra))]
    _, targets, _, _ = _Collate(stretched, first, model.config.survey_names, relabel=task.targets)(keys)
    again = AugmentedSpectra(spectra, 0, redshift_stretch=0.2, stretch_classes=stretched.stretch_classes)
    expected = [again[i] for i in range(len(spectra)) for _ in range(2)][1::2]  # the second read of each
    assert np.allclose(targets["redshift"].numpy(), [s.meta["labels"]["redshift"] for s in expected])
    assert not np.allclose(targets["redshift"].numpy(), first["redshift"].numpy())  # a new stretch on the second read
    assert np.array_equal(targets["class_labels"].numpy(), first["class_labels"].numpy())


def test_redshift_stretch_changes_the_fine_tune_and_leaves_star_only_runs_alone(spectra, sdss):
    stars = [s for s in spectra if _family(s) == "STAR"]
    logits = {}
    for key, data, stretch in (("all off", spectra, 0.0), ("all on", spectra, 0.1), ("stars off", stars, 0.0), ("stars on", stars, 0.1)):
        cfg = FinetuneConfig(strategy="full", epochs=2, batch_size=8, lr=3e-3, redshift_stretch=stretch)
        logits[key] = predict(finetune_classification(data, sdss, cfg, backbone_config=TINY)["model"], spectra[:8])["logits"]
    assert np.max(np.abs(logits["all on"] - logits["all off"])) > 1e-3
    assert np.array_equal(logits["stars on"], logits["stars off"])
