"""Our 21cm model against a live 21cmFAST 4.1.1 run with the spin temperature on (issue 18), on the same initial conditions.

The tolerances are issue 18's targets, unchanged: the mean brightness temperature within
max(10 mK, 15 %) of 21cmFAST's, the absorption trough's depth within 15 % and its redshift
within 1.0. No offset is added to either simulator. Both run on 21cmFAST's initial
conditions (`coeval_box(..., density0=)`), so box-to-box scatter does not enter: in the
10-point, 2-seed bench (`scripts/bench/validate_21cm.py`, 128 Mpc / 64^3, docs/benchmarks.md)
the matched-IC difference ours - 21cmFAST changes by at most 1.2 mK between seeds, and for
the defaults this 48 Mpc / 24^3 run gives the differences of a 64 Mpc / 32^3 run to ~1 mK,
far inside the 10 mK floor. The bench meets the global target at all 10 prior points (worst
margin 0.96x the tolerance, docs/benchmarks.md), which this one-point test does not cover.
The X-ray heating transition (z 15.2, 14.2) was a strict xfail until 21cmFAST's spin temperature,
source boost and time step were followed (heating.py, spin.py): ours -93.9 / -56.0 mK against
21cmFAST's -80.3 / -43.2 mK at z = 15.17 / 14.24 (1.13x / 1.28x the tolerance) before, -81.4 / -47.4 mK
now (0.09x / 0.41x; the worst of the run 0.75x at z = 18.3, the trough -98.6 vs -105.4 mK at z = 16.2
vs 16.5), so it is asserted like the rest.
"""

import numpy as np
import pytest

from cosmofm.data_cards import InputError
from cosmofm.data_cards.mocks.sim21cm import SimParams, coeval_box, cosmology
from cosmofm.data_cards.mocks.sim21cm.density import gaussian_field
from cosmofm.data_cards.mocks.sim21cm.reference import READS_21CMFAST, input_parameters, node_redshifts

BOX, N, SEED = 48.0, 24, 1  # 2 Mpc cells (the lightcone-21cm card's), one seed: ~25 s of 21cmFAST on one core
Z_LOW, Z_HIGH = 11.5, 24.0  # dark-ages tail -> Ly-alpha coupling -> trough -> heated IGM
GLOBAL_ABS_MK, GLOBAL_REL = 10.0, 0.15  # issue 18: |dT_b| within max(10 mK, 15 %) of 21cmFAST
TROUGH_DEPTH_REL, TROUGH_DZ = 0.15, 1.0  # issue 18: trough depth within 15 %, redshift within 1.0
# the global target at the dark-ages tail, Ly-alpha coupling, trough and heated IGM ...
Z_MEETS = (22.0, 19.5, 18.0, 17.0, 16.2, 12.5, 11.75)
# ... and through the heating transition (an xfail before, see the module docstring)
Z_HEATING = (15.2, 14.2)


def test_coeval_box_takes_given_initial_conditions():
    """density0 = the field coeval_box would draw gives the drawn box exactly; another field, another box."""
    p = SimParams(L_X=40.0)
    drawn_field = gaussian_field(np.random.default_rng([3, 21]), (16, 16, 16), 2.0, cosmology(p).power, cell_average=True)
    for spin, rsd in ((False, False), (True, True)):
        drawn = coeval_box(p, 12.0, 32.0, 16, seed=3, spin=spin, rsd=rsd)
        given = coeval_box(p, 12.0, 32.0, 16, seed=3, spin=spin, rsd=rsd, density0=drawn_field)
        for name in ("brightness_temp", "density", "x_HI"):
            np.testing.assert_array_equal(getattr(given, name), getattr(drawn, name))
    other = coeval_box(p, 12.0, 32.0, 16, seed=3, density0=np.roll(drawn_field, 5, axis=0))
    assert not np.array_equal(other.brightness_temp, drawn.brightness_temp)
    with pytest.raises(InputError, match="density0"):
        coeval_box(p, 12.0, 32.0, 16, density0=np.zeros((8, 16, 16)))
    with pytest.raises(InputError, match="density0"):
        coeval_box(p, 12.0, 32.0, 16, density0=np.full((16, 16, 16), np.nan))


def test_reference_refuses_what_21cmfast_lacks():
    """A SimParams entry 21cmFAST 4 has no counterpart of is refused before 21cmFAST is imported or run."""
    with pytest.raises(InputError, match="LOGNORMAL"):
        input_parameters(SimParams(LOGNORMAL=1.0), BOX, N, SEED)
    with pytest.raises(InputError, match="M_WDM"):
        input_parameters(SimParams(M_WDM=3.0), BOX, N, SEED)
    with pytest.raises(InputError, match="n_cells"):
        input_parameters(SimParams(), BOX, 4, SEED)
    assert {"HII_EFF_FACTOR", "ION_Tvir_MIN", "L_X", "NU_X_THRESH", "OMm", "SIGMA_8"} <= set(READS_21CMFAST)


def test_reference_inputs_match_our_physics():
    pytest.importorskip("py21cmfast")
    p = SimParams(HII_EFF_FACTOR=55.0, ION_Tvir_MIN=4.3, L_X=39.2, NU_X_THRESH=700.0, OMm=0.35, SIGMA_8=0.78, HMF=0.0)
    inputs = input_parameters(p, BOX, N, SEED)
    assert inputs.astro_options.USE_TS_FLUCT and not inputs.astro_options.INHOMO_RECO
    assert inputs.matter_options.PERTURB_ALGORITHM == "LINEAR" and inputs.matter_options.HMF == "PS"
    assert inputs.matter_options.SOURCE_MODEL == "CONST-ION-EFF" and inputs.astro_options.HII_FILTER == "spherical-tophat"
    assert not inputs.astro_options.M_MIN_in_Mass and inputs.simulation_options.Z_HEAT_MAX == 35.0
    for name in ("HII_EFF_FACTOR", "ION_Tvir_MIN", "L_X", "NU_X_THRESH"):
        assert getattr(inputs.astro_params, name) == pytest.approx(getattr(p, name))
    for name in ("OMm", "OMb", "hlittle", "POWER_INDEX", "SIGMA_8"):
        assert getattr(inputs.cosmo_params, name) == pytest.approx(getattr(p, name))


@pytest.fixture(scope="module")
def matched_run():
    """One 21cmFAST run (defaults, spin temperature on) and ours on its initial conditions, at every node z in [Z_LOW, Z_HIGH]."""
    pytest.importorskip("py21cmfast")
    from cosmofm.data_cards.mocks.sim21cm.reference import run_21cmfast_coevals

    z = np.array([z for z in node_redshifts(Z_LOW) if z <= Z_HIGH])
    ref = run_21cmfast_coevals({}, BOX, N, z, SEED)
    ours = np.array([coeval_box({}, float(zi), BOX, N, SEED, spin=True, density0=ref.density0).brightness_temp.mean() for zi in ref.redshifts])
    return ref.redshifts, ours, ref.mean_brightness


def _at(z, values, targets):
    return np.array([values[np.argmin(np.abs(z - t))] for t in targets]), np.array([z[np.argmin(np.abs(z - t))] for t in targets])


def test_global_signal_and_trough_against_21cmfast(matched_run):
    z, ours, theirs = matched_run
    o, zs = _at(z, ours, Z_MEETS)
    t, _ = _at(z, theirs, Z_MEETS)
    allowed = np.maximum(GLOBAL_ABS_MK, GLOBAL_REL * np.abs(t))
    assert np.all(np.abs(o - t) <= allowed), list(zip(zs.round(2), o.round(1), t.round(1), allowed.round(1)))
    j_o, j_t = int(np.argmin(ours)), int(np.argmin(theirs))
    assert theirs[j_t] < -50, theirs[j_t]  # a real trough to compare (21cmFAST's defaults: ~-105 mK at z ~ 16)
    assert abs(ours[j_o] - theirs[j_t]) <= TROUGH_DEPTH_REL * abs(theirs[j_t]), (ours[j_o], theirs[j_t])
    assert abs(z[j_o] - z[j_t]) <= TROUGH_DZ, (z[j_o], z[j_t])


def test_global_signal_through_the_heating_transition(matched_run):
    z, ours, theirs = matched_run
    o, zs = _at(z, ours, Z_HEATING)
    t, _ = _at(z, theirs, Z_HEATING)
    assert np.all(np.abs(o - t) <= np.maximum(GLOBAL_ABS_MK, GLOBAL_REL * np.abs(t))), list(zip(zs.round(2), o.round(1), t.round(1)))


def test_reference_lightcone_contract():
    """run_21cmfast_lightcone: our Lightcone on the given redshifts, (LOS, y, x), what the simulation bank reads."""
    pytest.importorskip("py21cmfast")
    from cosmofm.data_cards.mocks.sim21cm.reference import run_21cmfast_lightcone

    p = SimParams(L_X=41.0)  # z 15-17: past the trough, the IGM heating (a short run: 21cmFAST stops at z = 15)
    z = np.linspace(15.0, 17.0, 12)
    lc = run_21cmfast_lightcone(p, 32.0, 16, z, seed=2)
    assert lc.brightness_temp.shape == (12, 16, 16) and lc.x_HI.shape == lc.density.shape == lc.spin_temp.shape == (12, 16, 16)
    np.testing.assert_array_equal(lc.redshifts, z)
    np.testing.assert_allclose(lc.los_distances, cosmology(p).comoving_distance(z))
    # z 15-17 is before reionisation: the box is neutral to a few per cent (the first, partly ionised cells aside)
    assert np.all(np.isfinite(lc.brightness_temp)) and lc.global_xHI.min() > 0.95 and lc.x_HI.max() <= 1.0
    tb = lc.mean_brightness
    assert np.all(tb < 0) and tb[0] > tb[-1] + 20, tb  # absorption, shallower towards low z as X-rays heat the gas
    with pytest.raises(InputError, match="redshifts"):
        run_21cmfast_lightcone(p, 32.0, 16, z[::-1], seed=2)
