"""Realism checks of the 21cm model (cosmofm.data_cards.mocks.sim21cm) and the field mocks.

Reference numbers from 21cmFAST 4.1.1 were measured on this project's CPU machine with
`python -m cosmofm.bench.validate_21cm` (128 Mpc box, 64^3 cells, random_seed 12345,
`const-zeta` template with the real-space top-hat filter and M_MIN_in_Mass = False).
"""

import numpy as np
import pytest

from cosmofm.data_cards import InputError, load_card
from cosmofm.data_cards.mocks.generators import mock_samples
from cosmofm.data_cards.schema import card_from_dict
from cosmofm.data_cards.mocks.sim21cm import (
    NU21_HZ, SimParams, brightness_prefactor, coeval_box, cosmology, crossing_redshift, density_field, lightcone,
    power_spectrum, remove_wedge, thermal_noise, thermal_noise_sigma, wedge_slope,
)
from cosmofm.data_cards.mocks.sim21cm.cosmology import L_FACTOR, tophat_window
from cosmofm.data_cards.mocks.sim21cm.density import k_magnitude

# z(x_HI = 0.5) from 21cmFAST 4.1.1 (see the module docstring), 128 Mpc / 64^3 boxes.
REFERENCE_21CMFAST = {
    # name: (params, z_mid with PERTURB_ALGORITHM="LINEAR", z_mid with the default "2LPT")
    "fiducial": ({"HII_EFF_FACTOR": 30.0, "ION_Tvir_MIN": 4.69897}, 7.489, 7.232),
    "efficient_small_haloes": ({"HII_EFF_FACTOR": 60.0, "ION_Tvir_MIN": 4.4}, 9.881, 9.677),
    "inefficient_big_haloes": ({"HII_EFF_FACTOR": 20.0, "ION_Tvir_MIN": 5.0}, 5.788, 5.473),
}


def _theory_in_bins(shape, cell, power, edges):
    """P(|k|) averaged over exactly the grid modes that fall in each bin (no bin-centre bias)."""
    k = k_magnitude(shape, cell, real=False).ravel()
    keep = k > 0
    k = k[keep]
    which = np.digitize(k, edges) - 1
    ok = (which >= 0) & (which < len(edges) - 1)
    n = np.bincount(which[ok], minlength=len(edges) - 1)
    return np.bincount(which[ok], weights=power(k[ok]), minlength=len(edges) - 1) / np.maximum(n, 1)


def _assert_matches_theory(field, cell, power, edges):
    k, p, n = power_spectrum(field, cell, edges)
    theory = _theory_in_bins(field.shape, cell, power, edges)
    sigma = np.sqrt(2.0 / n)  # n counts +k and -k: n/2 independent complex modes per bin
    assert np.all(n > 0)
    assert np.all(np.abs(p / theory - 1) < 4 * sigma + 0.03), (k, p / theory, sigma)


def test_density_power_spectrum_matches_linear_theory():
    cosmo = cosmology(SimParams())
    edges = np.linspace(0.02, 0.3, 8)  # 1/Mpc: the large scales, a few hundred modes per bin
    # (the lognormal box is larger: its P(k) scatters more than a Gaussian's where the field is very non-linear)
    for kind, box in (("gaussian", 256.0), ("lognormal", 512.0)):
        f = density_field(box, 48, z=0.0, seed=3, kind=kind)
        _assert_matches_theory(f.delta, f.cell_size, cosmo.power, edges)
    # the lightcone's density is the cell-averaged linear field grown with D(z)
    box = coeval_box({}, 8.0, box_size=128.0, n_cells=32, seed=4)
    cell = box.cell_size
    grown = lambda k: cosmo.power(k, 8.0) * tophat_window(k * L_FACTOR * cell) ** 2  # noqa: E731
    _assert_matches_theory(box.density, cell, grown, np.linspace(0.05, 0.4, 6))
    lognormal = density_field(64.0, 16, seed=1, kind="lognormal").delta
    assert lognormal.min() > -1  # positive density everywhere


def _history(params, redshifts, seed=0):
    return np.array([coeval_box(params, z, 64.0, 32, seed).global_xHI for z in redshifts])


def test_neutral_fraction_history_is_monotonic_and_moves_with_the_sources():
    zs = np.array([5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 9.0, 10.0, 12.0])
    fid = _history({"HII_EFF_FACTOR": 30.0, "ION_Tvir_MIN": 4.7}, zs)
    assert np.all(np.diff(fid) > 0) and fid[0] < 0.1 and fid[-1] > 0.9, fid
    z_mid = crossing_redshift(zs, fid)
    efficient = crossing_redshift(zs, _history({"HII_EFF_FACTOR": 60.0, "ION_Tvir_MIN": 4.7}, zs))
    big_haloes = crossing_redshift(zs, _history({"HII_EFF_FACTOR": 30.0, "ION_Tvir_MIN": 5.2}, zs))
    assert efficient > z_mid + 0.3  # more ionising photons per baryon: earlier
    assert big_haloes < z_mid - 0.3  # only heavier haloes host sources: later
    # the lightcone's slice-by-slice history follows the coeval one (binned over dz = 1)
    lc = lightcone({"HII_EFF_FACTOR": 30.0, "ION_Tvir_MIN": 4.7}, 128.0, 32, 6.0, 12.0, seed=2)
    centres = np.arange(6.5, 12.0, 1.0)
    binned = [lc.global_xHI[np.abs(lc.redshifts - c) < 0.5].mean() for c in centres]
    assert np.all(np.diff(binned) > 0), binned
    half = np.arange(6.25, 12.0, 0.5)
    lc_mid = crossing_redshift(half, np.array([lc.global_xHI[np.abs(lc.redshifts - c) < 0.25].mean() for c in half]))
    assert abs(lc_mid - z_mid) < 0.3, (lc_mid, z_mid)


def test_brightness_temperature_follows_the_saturated_formula():
    for z in (9.0, 10.0, 12.0):
        box = coeval_box({}, z, 64.0, 32, seed=5, spin=False, rsd=False)  # the saturated limit, explicitly
        neutral = box.x_HI == 1
        # fully neutral cells: dT_b / (1 + delta) is the cosmological prefactor, ~27 sqrt((1+z)/10) mK
        ratio = box.brightness_temp[neutral] / np.clip(1 + box.density[neutral], 1e-6, None)
        np.testing.assert_allclose(ratio[(1 + box.density[neutral]) > 0.05], brightness_prefactor(z, box.params), rtol=1e-4)
        assert float(brightness_prefactor(z, SimParams())) == pytest.approx(27 * np.sqrt((1 + z) / 10), rel=0.01)
        # the mean: 27 x_HI sqrt((1+z)/10), lowered a little because ionised regions are the dense ones
        mean = float(box.brightness_temp.mean())
        expected = 27 * box.global_xHI * np.sqrt((1 + z) / 10)
        assert 0.85 * expected < mean < 1.02 * expected, (z, mean, expected)


def test_generation_is_deterministic():
    a = lightcone({}, 64.0, 16, 7.0, 8.0, seed=11)
    b = lightcone({}, 64.0, 16, 7.0, 8.0, seed=11)
    c = lightcone({}, 64.0, 16, 7.0, 8.0, seed=12)
    np.testing.assert_array_equal(a.brightness_temp, b.brightness_temp)
    assert not np.array_equal(a.brightness_temp, c.brightness_temp)
    # a mock chunk is the same whether generated alone or after its neighbours (the cache is transparent)
    from cosmofm.data_cards.mocks import fields as mock_fields

    card = load_card("lightcone-21cm")
    seq = mock_samples(card, 3, seed=9)
    mock_fields._CACHE.clear()
    alone = mock_samples(card, 1, seed=9, start=2)[0]
    np.testing.assert_array_equal(alone.values, seq[2].values)
    assert alone.meta == seq[2].meta


def test_axes_match_astropy_cosmology():
    params = SimParams(OMm=0.3, hlittle=0.7)
    lc = lightcone(params, 64.0, 16, 7.0, 9.0, seed=0)
    cell = 64.0 / 16
    np.testing.assert_allclose(np.diff(lc.los_distances), cell, rtol=1e-12)
    np.testing.assert_allclose(lc.frequencies, NU21_HZ / (1 + lc.redshifts))
    assert lc.redshifts[0] == pytest.approx(7.0, abs=1e-6) and lc.redshifts[-1] <= 9.0
    assert np.all(np.diff(lc.redshifts) > 0) and np.all(np.diff(lc.frequencies) < 0)
    astro = cosmology(params).astropy
    assert astro.Om0 == 0.3 and astro.H0.value == pytest.approx(70.0)
    # distances: astropy's own E(z), integrated here independently of the model's table
    zz = np.linspace(0, 9.5, 200001)
    dc = 299792.458 / 70.0 * np.concatenate([[0], np.cumsum(np.diff(zz) * 0.5 * (astro.inv_efunc(zz)[1:] + astro.inv_efunc(zz)[:-1]))])
    np.testing.assert_allclose(np.interp(lc.redshifts, zz, dc), lc.los_distances, atol=0.01)
    try:
        import scipy  # noqa: F401  (astropy needs it for distances with massive neutrinos)
    except ImportError:
        return
    np.testing.assert_allclose(astro.comoving_distance(lc.redshifts[::10]).to_value("Mpc"), lc.los_distances[::10], atol=0.01)


def test_bad_input_is_an_input_error():
    with pytest.raises(InputError, match="z"):
        lightcone({}, 64.0, 16, -1.0, 8.0)
    with pytest.raises(InputError, match="HII_EFF_FACTOR"):
        lightcone({"HII_EFF_FACTOR": 0.0}, 64.0, 16, 7.0, 8.0)
    with pytest.raises(InputError, match="HII_EFF_FACTOR"):
        coeval_box({"HII_EFF_FACTOR": -5.0}, 8.0)
    for bad in (0, -4, 2.5):
        with pytest.raises(InputError, match="n_cells"):
            coeval_box({}, 8.0, 64.0, bad)
        with pytest.raises(InputError, match="n_cells"):
            density_field(64.0, bad)
    with pytest.raises(InputError, match="z"):
        coeval_box({}, -0.5)
    with pytest.raises(InputError, match="z_max"):
        lightcone({}, 64.0, 16, 8.0, 7.0)
    with pytest.raises(InputError, match="ZETA"):
        SimParams.from_dict({"ZETA": 30})
    with pytest.raises(InputError, match="box_size"):
        density_field(-1.0, 8)
    raw = load_card("lightcone-21cm").to_dict()
    raw["field"]["parameters"]["HII_EFF_FACTOR"] = [100.0, 10.0]
    with pytest.raises(InputError, match="parameters.HII_EFF_FACTOR"):
        mock_samples(card_from_dict(raw), 1)


def test_mock_chunks_follow_the_card(cards):
    card = cards["lightcone-21cm"]
    chunks = mock_samples(card, 3, seed=1)
    for s in chunks:
        assert s.shape == (card.los_cells, card.n_cells, card.n_cells)
        labels = s.meta["labels"]
        assert 10 <= labels["HII_EFF_FACTOR"] <= 100 and 4.0 <= labels["ION_Tvir_MIN"] <= 5.3
        assert 38 <= labels["L_X"] <= 42 and 200 <= labels["NU_X_THRESH"] <= 1500
        assert card.redshift_min <= labels["redshift"] <= card.redshift_max
        np.testing.assert_allclose(np.diff(s.coords["los_distance"]), 2.0)
        assert np.all(s.ivar == pytest.approx(1 / card.noise_sigma**2))
    # chunks of one lightcone share its parameters and follow each other along the line of sight
    assert chunks[0].meta["labels"]["HII_EFF_FACTOR"] == chunks[1].meta["labels"]["HII_EFF_FACTOR"]
    assert chunks[1].coords["los_distance"][0] == pytest.approx(chunks[0].coords["los_distance"][-1] + 2.0)
    # along one lightcone reionisation runs backwards with distance: its far end (z ~ 30) is far more
    # neutral than its near end (z ~ 5); single chunks scatter by ~0.1 (bubbles of 10-20 Mpc in 64 Mpc)
    from cosmofm.data_cards.mocks import fields as mock_fields

    whole = mock_samples(card, mock_fields._layout(card)[1], seed=1)
    x_hi = [c.meta["labels"]["xHI_mean"] for c in whole]
    assert {c.meta["lightcone"] for c in whole} == {0} and np.mean(x_hi[-3:]) > np.mean(x_hi[:3]) + 0.2, x_hi
    density = mock_samples(load_card("density-field"), 2, seed=1)
    assert density[0].shape == (32, 32, 32) and density[0].meta["labels"]["OMm"] != density[1].meta["labels"]["OMm"]
    assert density[0].values.mean() == pytest.approx(0.0, abs=0.05)


def test_midpoint_matches_stored_21cmfast_numbers():
    """Our z(x_HI = 0.5) on 21cmFAST's box against the numbers 21cmFAST 4.1.1 gave (module docstring)."""
    # against 21cmFAST's linear-density runs only: its default 2LPT density is physics the model
    # lacks, and the issue-18 target (midpoint within 0.1) is not relaxed to pass on an offset
    for name, (params, z_linear, _z_2lpt) in REFERENCE_21CMFAST.items():
        zs = np.array([z_linear - 0.3, z_linear + 0.3])
        xhi = np.array([coeval_box(params, z, 128.0, 64, seed=0).global_xHI for z in zs])
        ours = crossing_redshift(zs, xhi)
        assert abs(ours - z_linear) < 0.1, (name, ours, z_linear)  # same physics, different density seed


def test_thermal_noise_and_wedge():
    z = np.linspace(7.0, 8.0, 16)
    sigma = thermal_noise_sigma(z, 2.0, hours=1000.0)
    assert np.all(np.diff(sigma) > 0)  # brighter sky and smaller pixels (in solid angle) at higher z
    np.testing.assert_allclose(thermal_noise_sigma(z, 2.0, hours=4000.0), sigma / 2)
    noise = thermal_noise((16, 32, 32), z, 2.0, seed=1)
    np.testing.assert_allclose(noise.std(axis=(1, 2)), sigma, rtol=0.15)
    np.testing.assert_array_equal(noise, thermal_noise((16, 32, 32), z, 2.0, seed=1))
    # the wedge slope (Liu et al. 2014) and the cut
    cosmo = cosmology(SimParams())
    m = float(wedge_slope(8.0))
    assert m == pytest.approx(cosmo.comoving_distance(8.0) * cosmo.astropy.efunc(8.0) / (cosmo.hubble_distance * 9.0))
    assert 3.0 < m < 4.0
    box = coeval_box({}, 8.0, 64.0, 16, seed=0).brightness_temp.astype(np.float64)
    cut = remove_wedge(box, np.full(16, 8.0), 4.0)
    fk = np.fft.fftn(cut)
    kz = np.abs(2 * np.pi * np.fft.fftfreq(16, 4.0))[:, None, None]
    kp = np.sqrt((2 * np.pi * np.fft.fftfreq(16, 4.0))[None, :, None] ** 2 + (2 * np.pi * np.fft.fftfreq(16, 4.0))[None, None, :] ** 2)
    inside = kz < m * kp
    assert np.abs(fk[inside]).max() < 1e-6 * np.abs(fk).max()
    np.testing.assert_allclose(fk[~inside], np.fft.fftn(box)[~inside], rtol=1e-6, atol=1e-6)
    # a lightcone observed: noise then the wedge cut, deterministic in the seed
    lc = lightcone({}, 64.0, 16, 7.0, 8.0, seed=0)
    seen = lc.observe(hours=1000.0, seed=3)
    assert seen.shape == lc.shape and np.array_equal(seen, lc.observe(hours=1000.0, seed=3))
    assert np.allclose(lc.observe(noise=None, wedge=False), lc.brightness_temp)


def test_optional_backends_when_installed():
    pytest.importorskip("powerbox")
    cosmo = cosmology(SimParams())
    f = density_field(256.0, 48, seed=3, backend="powerbox")
    _assert_matches_theory(f.delta, f.cell_size, cosmo.power, np.linspace(0.02, 0.3, 8))


def test_tools21cm_noise_when_installed():
    pytest.importorskip("tools21cm")
    z = np.full(4, 8.0)
    noise = thermal_noise((4, 16, 16), z, 4.0, seed=0, model="tools21cm", int_time=600.0)
    assert noise.shape == (4, 16, 16) and np.all(np.isfinite(noise)) and noise.std() > 0


def test_coordinates_carry_no_cosmology():
    """Issue 18: a varied Omega_m changes the signal, never the coordinates handed to the tokenizer."""
    from cosmofm.data_cards.mocks import fields as mock_fields
    from cosmofm.data_cards.mocks.sim21cm.reionization import lightcone_at_redshifts, lightcone_slices

    raw = load_card("lightcone-21cm").to_dict()
    raw["field"].update(box_size="32 Mpc", n_cells=16, los_cells=16, redshift_min=7.0, redshift_max=9.0)  # the reionisation era
    raw["field"]["parameters"].update(HII_EFF_FACTOR=30.0, ION_Tvir_MIN=4.7)  # mid-reionisation at z = 7-9
    chunks = {}
    for om in (0.26, 0.36):
        raw["field"]["parameters"]["OMm"] = om
        chunks[om] = mock_samples(card_from_dict(raw), 2, seed=5)
    for a, b in zip(chunks[0.26], chunks[0.36]):
        assert a.coords.keys() == b.coords.keys()
        for key in a.coords:
            np.testing.assert_array_equal(a.coords[key], b.coords[key])
        assert a.meta["labels"]["redshift"] == b.meta["labels"]["redshift"]
        assert a.meta["labels"]["OMm"] != b.meta["labels"]["OMm"]
        # same seed and index: same density phases and noise, so the difference is the cosmology's
        assert np.abs(a.values - b.values).mean() > 1.0 and a.meta["labels"]["xHI_mean"] != b.meta["labels"]["xHI_mean"]
    # a drawn OMm: every chunk of every realisation lies on the card's one fiducial grid
    raw["field"]["parameters"]["OMm"] = [0.25, 0.40]
    card = card_from_dict(raw)
    z, d = mock_fields.lightcone_grid(card)
    _, per = mock_fields._layout(card)
    drawn = mock_samples(card, 2 * per, seed=1)
    assert drawn[0].meta["labels"]["OMm"] != drawn[per].meta["labels"]["OMm"]
    for s in drawn:
        assert np.all(np.isin(s.coords["los_distance"], d))
    # on its own cosmology's grid the regridding changes nothing; at fixed redshifts a higher
    # Omega_m (sigma_8 fixed today) has grown more structure, so reionisation is further along
    fid = mock_fields.FIDUCIAL
    on_grid = lightcone_at_redshifts(fid, 32.0, 16, z, seed=3)
    np.testing.assert_array_equal(on_grid.brightness_temp, lightcone_slices(fid, 32.0, 16, float(z[0]), len(z), seed=3).brightness_temp)
    low, high = (lightcone_at_redshifts(fid.replace(OMm=om), 32.0, 16, z, seed=3) for om in (0.25, 0.40))
    np.testing.assert_array_equal(low.redshifts, high.redshifts)
    assert high.global_xHI.mean() < low.global_xHI.mean() - 0.02, (low.global_xHI.mean(), high.global_xHI.mean())


def test_coeval_brightness_boxes_have_the_spin_temperature():
    """lightcone: false makes coeval boxes with the lightcones' physics, so a drawable L_X acts there too."""
    raw = load_card("lightcone-21cm").to_dict()
    raw["field"].update(box_size="32 Mpc", n_cells=16, los_cells=16, redshift_min=15.0, redshift_max=15.0, lightcone=False)
    boxes = {}
    for lx in (38.0, 42.0):
        raw["field"]["parameters"].update(HII_EFF_FACTOR=30.0, ION_Tvir_MIN=4.7, L_X=lx, NU_X_THRESH=500.0)
        [boxes[lx]] = mock_samples(card_from_dict(raw), 1, seed=2)
        assert boxes[lx].meta["labels"]["L_X"] == lx and boxes[lx].meta["labels"]["redshift"] == 15.0
    # z = 15: faint X-rays leave cold gas in deep absorption (~ -190 mK), bright ones have heated it into emission (~ +25 mK)
    faint, bright = boxes[38.0].values.mean(), boxes[42.0].values.mean()
    assert faint < -100.0 and bright > 0.0, (faint, bright)
    saturated = coeval_box({"HII_EFF_FACTOR": 30.0, "ION_Tvir_MIN": 4.7}, 15.0, 32.0, 16, seed=0, spin=False, rsd=False)
    assert saturated.brightness_temp.min() > 0  # the saturated limit is in emission everywhere: not what the mocks make
