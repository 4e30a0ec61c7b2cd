"""The shift-equivariant redshift network (heads/redshift_net.py): symmetry, paths, checkpoints, training."""

import json
import math

import numpy as np
import pytest
import torch

from cosmofm.data_cards.errors import InputError
from cosmofm.heads.metrics import redshift_metrics
from cosmofm.heads.photoz_metrics import pit_ks
from cosmofm.heads import redshift_net_cpu
from cosmofm.heads.redshift_net import (RedshiftNet, RedshiftNetConfig, calibrate, correlate_direct, decode, load_redshift_net, row_nanmedian,
                                        save_redshift_net, train_redshift_net)

# a tiny grid: 1024 pixels of 1e-4 dex from 10^3.6 A, z 0 .. 0.5 in 4-pixel bins
TINY = dict(log_lambda_start=3.6, n_pixels=1024, bin_pixels=4, z_min=0.0, z_max=0.5, channels=8, xcorr_channels=4, n_templates=2)
REST_LINES = np.array([3.44, 3.475, 3.52, 3.56, 3.60, 3.645, 3.69])  # log10 rest wavelengths: 2-3 always in the window
LINE_AMPLITUDE = np.array([3.0, -0.6, 2.0, -0.8, 4.0, -0.6, 2.5])  # emission > 0, absorption < 0


def synthetic(n: int, cfg: RedshiftNetConfig, seed: int, noise: float = 0.3):
    """(flux, ivar, z) of n spectra: a sloped continuum and Gaussian lines (2 pixels wide) at
    random z, with Gaussian noise; a few masked pixels."""
    rng = np.random.default_rng(seed)
    loglam = cfg.log_lambda_start + cfg.log_lambda_step * np.arange(cfg.n_pixels)
    z = rng.uniform(0.02, 0.48, n)
    observed = REST_LINES[None, :] + np.log10(1 + z)[:, None]  # (n, lines)
    width = 2 * cfg.log_lambda_step
    lines = (LINE_AMPLITUDE * rng.uniform(0.6, 1.4, (n, len(REST_LINES))))[:, :, None] * np.exp(-0.5 * ((loglam - observed[:, :, None]) / width) ** 2)
    continuum = 1 + rng.uniform(-0.5, 0.5, (n, 1)) * (loglam - loglam.mean()) / np.ptp(loglam)
    flux = (continuum + lines.sum(1) + noise * rng.standard_normal((n, cfg.n_pixels))).astype(np.float32)
    ivar = np.full_like(flux, 1 / noise**2)
    ivar[rng.random(ivar.shape) < 0.01] = 0  # masked pixels
    return flux, ivar, z


def test_shift_by_k_bins_shifts_the_logits_by_k_bins():
    torch.manual_seed(0)
    cfg = RedshiftNetConfig(**TINY)
    model = RedshiftNet(cfg).eval()
    flux, ivar, _ = synthetic(3, cfg, seed=1)
    margin = 120  # masked pixels at both ends: the shifted spectrum keeps every usable pixel
    ivar[:, :margin] = ivar[:, -margin:] = 0
    flux[:, :margin] = np.nan  # NaN behind zero ivar is allowed
    for k in (1, 7, 20):  # bins; k x bin_pixels pixels <= margin
        p = k * cfg.bin_pixels
        flux_s, ivar_s = np.roll(flux, p, axis=1), np.roll(ivar, p, axis=1)
        with torch.no_grad():
            logits, shifted = model(flux, ivar).logits, model(flux_s, ivar_s).logits
        assert torch.allclose(shifted[:, k:], logits[:, :-k], atol=1e-5, rtol=1e-5), k
        assert not torch.allclose(shifted[:, k:], logits[:, k:], atol=1e-3)  # the logits do depend on z


def test_fft_path_matches_direct_reference():
    torch.manual_seed(1)
    cfg = RedshiftNetConfig(**TINY)
    model = RedshiftNet(cfg).eval()
    flux, ivar, _ = synthetic(4, cfg, seed=2)
    with torch.no_grad():
        features = model.feature_maps(flux, ivar)
        fast, reference = model.scores(features), model.scores(features, reference=True)
        # the reference itself, term by term, for one spectrum, group and z bin
        g, m = 1, 37
        kernel = model.kernels[g, :, cfg.n_z - 1 - m: cfg.n_z - 1 - m + cfg.n_bins]
        by_hand = (features[2] * kernel).sum()
        assert torch.allclose(correlate_direct(features, model.kernels)[2, g, m], by_hand, atol=1e-4)
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-4)
    model.cpu_bf16 = False  # float32 throughout (bfloat16 convolutions: test_cpu_kernels_match_the_reference_path)
    with torch.no_grad():  # and the whole forward: fast feature layers too
        assert torch.allclose(model(flux, ivar).logits, model(flux, ivar, reference=True).logits, atol=1e-4, rtol=1e-4)


def test_cpu_kernels_match_the_reference_path():
    """heads/redshift_net_cpu.py (CPU inference: blocks and chunks, channels-last convolutions, the
    pointwise layer folded into the kernels' transforms, numpy's median) gives the reference
    logits: to float32 rounding in float32, within 1 % of each row's logit range (and the same
    argmax) with bfloat16 convolutions, the default where the CPU has them natively."""
    torch.manual_seed(3)
    model = RedshiftNet(RedshiftNetConfig(**TINY, prior_knots=4)).eval()
    with torch.no_grad():
        model.prior.normal_()
    flux, ivar, _ = synthetic(7, model.cfg, seed=6)
    ivar[2, :300] = 0
    flux[2, :300] = np.nan  # NaN behind zero weight: the path that cleans the flux
    ivar[4] = 0  # nothing usable: scale 1, every bin masked
    flux, ivar = torch.from_numpy(flux), torch.from_numpy(ivar)
    with torch.no_grad():
        reference = model(flux, ivar, reference=True).logits
        assert redshift_net_cpu.takes_fast_path(model, flux)
        for chunk, block in ((3, 16), (16, 256), (2, 4)):  # chunks, partial ones; blocks of several chunks, a partial one
            fast = model._with_prior(redshift_net_cpu.logits(model, flux, ivar, chunk, block, bf16=False))
            assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-4)
        bf16 = model._with_prior(redshift_net_cpu.logits(model, flux, ivar, bf16=True))
        spread = reference.amax(1, keepdim=True) - reference.amin(1, keepdim=True)
        assert ((bf16 - reference).abs() <= 0.01 * spread).all() and torch.equal(bf16.argmax(1), reference.argmax(1))
        assert not torch.allclose(bf16, reference, atol=1e-6, rtol=0)  # bfloat16 was used
        model.cpu_bf16 = None  # the default: bfloat16 where native (redshift_net_cpu.native_bf16)
        assert torch.allclose(model(flux, ivar).logits, bf16 if redshift_net_cpu.native_bf16() else fast, atol=1e-6, rtol=1e-6)
        model.cpu_bf16 = False
        assert torch.allclose(model(flux, ivar).logits, fast, atol=1e-6, rtol=1e-6)
        model.cpu_kernels = False  # the FFT path alone
        assert not redshift_net_cpu.takes_fast_path(model, flux)
        assert torch.allclose(model(flux, ivar).logits, reference, atol=1e-4, rtol=1e-4)
    assert not redshift_net_cpu.takes_fast_path(model.train(), flux)  # training: gradients wanted
    values = torch.rand(5, 12)
    values[0, :5] = values[1] = values[2, 3] = torch.nan  # 7 values left (odd), none, 11 (even: the lower median)
    np.testing.assert_array_equal(redshift_net_cpu.lower_nanmedian(values).numpy(), row_nanmedian(values).numpy())


def test_prior_breaks_equivariance_and_is_off_by_default():
    assert RedshiftNetConfig().prior_knots == 0
    torch.manual_seed(0)
    cfg = RedshiftNetConfig(**TINY, prior_knots=8)
    model = RedshiftNet(cfg).eval()
    with torch.no_grad():
        model.prior.copy_(torch.linspace(-2, 2, 8))
        flux, ivar, _ = synthetic(1, cfg, seed=3)
        with_prior = model(flux, ivar).logits
        model.prior.zero_()
        assert not torch.allclose(with_prior, model(flux, ivar).logits)


def test_save_load_round_trip_gives_identical_output(tmp_path):
    torch.manual_seed(2)
    cfg = RedshiftNetConfig(**TINY, prior_knots=6, temperature=1.7)
    model = RedshiftNet(cfg).eval()
    with torch.no_grad():
        model.prior.normal_()
    save_redshift_net(model, tmp_path)
    loaded = load_redshift_net(tmp_path)
    assert loaded.cfg == cfg == RedshiftNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    # the key contract a parent model (e.g. the spectral classifier) nests under one prefix
    assert sorted(loaded.state_dict()) == sorted(model.state_dict()) == sorted(
        [f"features.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")] + ["kernels", "prior"])
    flux, ivar, _ = synthetic(5, cfg, seed=4)
    a, b = model.predict(flux, ivar), loaded.predict(flux, ivar)
    assert np.array_equal(a.z, b.z) and np.array_equal(a.z_err, b.z_err) and np.array_equal(a.probs, b.probs)
    with pytest.raises(InputError):
        load_redshift_net(tmp_path / "missing")


def test_tiny_net_learns_redshifts_of_synthetic_lines():
    cfg = RedshiftNetConfig(**TINY)
    train_flux, train_ivar, train_z = synthetic(600, cfg, seed=10)
    val_flux, val_ivar, val_z = synthetic(200, cfg, seed=11)
    test_flux, test_ivar, test_z = synthetic(300, cfg, seed=12)
    model, history = train_redshift_net({"flux": train_flux, "ivar": train_ivar, "z": train_z}, {"flux": val_flux, "ivar": val_ivar, "z": val_z},
                                        cfg, steps=200, seed=0, batch_size=32, eval_every=100, log=lambda line: None)
    assert [h["step"] for h in history] == [100, 200]
    assert cfg.temperature == 1.0 and model.cfg.temperature > 0  # the caller's config is not changed
    pred = model.predict(test_flux, test_ivar)
    metrics = redshift_metrics(test_z, pred.z)
    # measured over training seeds 0-2: catastrophic 0.047-0.050 (an untrained net: ~0.99),
    # NMAD 2.9-3.0e-4, PIT KS 0.058-0.079
    assert metrics["redshift_catastrophic_fraction"] < 0.10
    assert metrics["redshift_nmad"] < 5e-4  # sub-bin: bins are 9.2e-4 in dz / (1 + z)
    assert np.all(pred.z_err > 0) and np.allclose(pred.probs.sum(1), 1)
    pit = model.pit(pred, test_z)
    assert np.all((pit >= 0) & (pit <= 1)) and pit_ks(pit) < 0.15
    # per family: a "QSO" half of the validation set with 3x the noise gets its own, larger error
    # scale; decode uses it for rows of that family (by class name) and the global one for others
    noisy_flux, noisy_ivar, noisy_z = synthetic(100, cfg, seed=13, noise=0.9)
    val = {"flux": np.concatenate([val_flux[:100], noisy_flux]), "ivar": np.concatenate([val_ivar[:100], noisy_ivar]),
           "z": np.concatenate([val_z[:100], noisy_z]), "cls": np.array(["STAR_K"] * 100 + ["QSO"] * 100)}
    families = calibrate(model, val, min_family=50).cfg.family_calibration
    assert set(families) == {"STAR", "QSO"} and families["QSO"]["error_scale"] > 1.3 * families["STAR"]["error_scale"]
    logits = model.batched_logits(test_flux[:4], test_ivar[:4])
    _, err_qso, _ = decode(logits, model.cfg, ["QSO"] * 4)
    _, err_galaxy, _ = decode(logits, model.cfg, ["GALAXY_SB"] * 4)  # no fit of its own: the global scale
    _, err_global, _ = decode(logits, model.cfg)
    np.testing.assert_allclose(err_galaxy, err_global)
    np.testing.assert_allclose(err_qso / err_global, families["QSO"]["error_scale"] / model.cfg.error_scale)


def test_bad_input_raises_input_error():
    cfg = RedshiftNetConfig(**TINY)
    model = RedshiftNet(cfg).eval()
    flux, ivar, _ = synthetic(2, cfg, seed=5)
    bad = flux.copy()
    bad[0, 10] = np.nan  # NaN where ivar > 0
    ivar[0, 10] = 1.0
    with pytest.raises(InputError, match="where ivar > 0"):
        model(bad, ivar)
    with pytest.raises(InputError, match=r"flux/ivar: shapes \(2, 1020\)"):
        model(flux[:, :-4], ivar[:, :-4])  # wrong length
    with pytest.raises(InputError, match="negative"):
        model(flux, -ivar)
    with pytest.raises(InputError):
        RedshiftNetConfig(**{**TINY, "bin_pixels": 3})  # 1024 is not a multiple of 3
    with torch.no_grad():
        assert math.isfinite(float(model(flux, ivar).logits.sum()))


def test_spectra_on_grid_stacks_a_batch_and_decode_skips_probs_with_the_same_redshifts():
    """A batch on the grid (a file's rows share one wavelength array) is one stacked copy equal
    to each sample's own (flux behind zero weight, NaN included, set to 0); in a batch with a
    sample off the grid only that one is resampled. decode without p(z) gives the same z and
    z_err (only the peak's window in float64) as with it, and as from float64 logits."""
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.mocks.spectra import mock_spectrum
    from cosmofm.data_cards.sample import Sample
    from cosmofm.heads.redshift_net import spectra_on_grid

    card = load_card("sdss-like")
    cfg = RedshiftNetConfig.for_card(card)
    mocks = [mock_spectrum(card, i, 3) for i in range(4)]
    wave = mocks[0].coords["wavelength"]
    batch = [Sample("spectrum", m.values, m.ivar, {"wavelength": wave}, m.meta) for m in mocks]
    batch[1].values[7], batch[1].ivar[7] = np.nan, 0.0
    flux, ivar = spectra_on_grid(batch, cfg)
    for k, m in enumerate(batch):
        np.testing.assert_array_equal(ivar[k], m.ivar[:cfg.n_pixels])
        np.testing.assert_array_equal(flux[k], np.where(m.ivar > 0, m.values, 0)[:cfg.n_pixels])
    off = Sample("spectrum", mocks[0].values[17:3017], mocks[0].ivar[17:3017], {"wavelength": wave[17:3017]}, mocks[0].meta)
    mixed_flux, mixed_ivar = spectra_on_grid(batch[:2] + [off] + batch[2:], cfg)
    alone = spectra_on_grid([off], cfg)
    np.testing.assert_array_equal(mixed_flux, np.concatenate([flux[:2], alone[0], flux[2:]]))
    np.testing.assert_array_equal(mixed_ivar, np.concatenate([ivar[:2], alone[1], ivar[2:]]))
    assert spectra_on_grid([], cfg)[0].shape == (0, cfg.n_pixels)

    torch.manual_seed(5)
    tiny = RedshiftNetConfig(**TINY, temperature=0.7, error_scale=0.2, family_calibration={"QSO": {"temperature": 2.0, "error_scale": 0.5}})
    logits = 4 * torch.randn(6, tiny.n_z)
    logits[0, :2] = 50.0  # a peak at the grid's edge: the window is clamped
    classes = ["QSO", "STAR_K", "GALAXY", "QSO", "STAR_A0", "QSO"]
    z, z_err, probs = decode(logits, tiny, classes)
    z2, z_err2, none = decode(logits, tiny, classes, probs=False)
    assert none is None and probs.shape == (6, tiny.n_z) and np.allclose(probs.sum(1), 1)
    np.testing.assert_array_equal(z2, z)
    np.testing.assert_array_equal(z_err2, z_err)
    z64, z_err64, _ = decode(logits.double(), tiny, classes)  # the whole of p(z) in float64, as before
    np.testing.assert_array_equal(z64, z)
    np.testing.assert_array_equal(z_err64, z_err)
    _, z_err_star, _ = decode(logits, tiny, ["STAR_K"] * 6, probs=False)  # no fit of its own: the global scale
    np.testing.assert_allclose(z_err[[0, 3, 5]] / z_err_star[[0, 3, 5]], 0.5 / 0.2)  # the QSO rows took their family's


def test_spectra_on_grid_copies_the_cards_grid_and_resamples_another():
    """Mocks on the card's grid are copied as they are; a spectrum on a shifted, shorter
    1e-4-dex grid (an SDSS file's own) lands on the same pixels, the rest masked."""
    from cosmofm.data_cards import load_card
    from cosmofm.data_cards.mocks.spectra import mock_spectrum, wavelength_grid
    from cosmofm.data_cards.sample import Sample
    from cosmofm.heads.redshift_net import spectra_on_grid

    card = load_card("sdss-like")
    cfg = RedshiftNetConfig.for_card(card)
    np.testing.assert_allclose(cfg.log_lambda_start + np.arange(cfg.n_pixels) * cfg.log_lambda_step, np.log10(wavelength_grid(card)), atol=1e-9)
    sample = mock_spectrum(card, 0, 3)
    flux, ivar = spectra_on_grid([sample], cfg)
    np.testing.assert_array_equal(ivar[0], sample.ivar.astype(np.float32))
    np.testing.assert_array_equal(flux[0], np.where(sample.ivar > 0, sample.values, 0).astype(np.float32))
    # the same spectrum cut to pixels 17..3016, on its own grid
    part = Sample("spectrum", sample.values[17:3017], sample.ivar[17:3017], {"wavelength": sample.coords["wavelength"][17:3017]}, sample.meta)
    flux2, ivar2 = spectra_on_grid([part], cfg)
    inner = np.zeros(cfg.n_pixels, bool)
    inner[18:3016] = True  # the end pixels interpolate from a neighbour off the cut
    kept = inner & (ivar2[0] > 0)  # pixels next to a masked one may be masked too (rounding of the grid)
    assert kept.sum() >= 0.98 * (ivar[0, inner] > 0).sum()
    np.testing.assert_allclose(flux2[0, kept], flux[0, kept], rtol=1e-5, atol=1e-6 * np.abs(flux).max())
    assert not ivar2[0, :17].any() and not ivar2[0, 3017:].any()
    with pytest.raises(InputError, match="sampling"):
        RedshiftNetConfig.for_card(load_card("4most-hrs"))
