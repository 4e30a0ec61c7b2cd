"""Mock simulated fields for a `FieldCard`: 21cm lightcone chunks, coeval boxes, density fields.

The physics lives in `cosmofm.data_cards.mocks.sim21cm` (a 21cmFAST-like excursion-set model,
numpy only); this module maps a card and (seed, index) to a `Sample`:

- `quantity: brightness_temperature`, `lightcone: true`: lightcone *realisation*
  r = index // chunks_per_lightcone is one long lightcone from redshift_min to
  redshift_max (n_cells^2 cross-section); index picks its chunk of `los_cells` slices.
  Each realisation draws its own parameters and density seed; a random (per
  realisation) offset shifts where the chunks start, so chunk redshifts vary. Every
  realisation's slices sit on one fixed grid (`lightcone_grid`: comoving distances in
  the FIDUCIAL Planck 2018 cosmology, so fixed redshifts / frequencies), while its signal
  is simulated in its own cosmology: a drawn OMm changes the values, never `los_distance`. The last
  few realisations are cached, so consecutive indices cost one lightcone per
  chunks_per_lightcone chunks: for the shipped card (z = 5-30, 1811 slices of 2 Mpc,
  56 chunks of 32^3, spin temperature and RSD on) one lightcone takes ~2 s on one core
  (`python -m cosmofm.bench.lightcone_speed`; chunks per minute:
  `python -m cosmofm.bench.validate_21cm --speed-only`).
- `lightcone: false`: one coeval box (los_cells x n_cells^2) at redshift_min per index;
  brightness boxes have the lightcones' physics (spin temperature and RSD), so a parameter
  the card may draw acts in either mode.
- `quantity: overdensity`: Gaussian (or lognormal, LOGNORMAL: 1) linear density boxes at
  redshift_min per index, or density lightcone chunks grown with D(z) when lightcone: true.

Card `parameters` use 21cmFAST names (see `SimParams`); a number fixes a parameter, a
two-element list [low, high] draws it uniformly per realisation; only a parameter the
model reads (`sim21cm.params.MODEL_READS`) may be drawn -- drawing L_X for an overdensity
card, say, which is neither ionised nor heated, is an `InputError` before any compute
(`sim21cm.sensitivity.check_sensitivity` measures that each drawn one acts). Labels in
meta: every named parameter the model reads (not the HMF / LOGNORMAL switches, not fixed
inert ones), the chunk's mean neutral fraction `xHI_mean` (21cm) and its central
`redshift`. White noise of `noise_sigma` (the card's unit) is added and sets ivar.

A card with an `instrument:` block (`schema.FieldInstrument`) is observed instead
(`observe_field`, physics in `sim21cm.observe`): the signal is smoothed by the synthesised
beam lambda / B_max, SKA-Low thermal noise for the layout and integration time is added, and
the foreground wedge is removed -- for lightcones on the whole cached realisation, with wedge
FFT chunks aligned to the sample chunks, so each chunk is one wedge-filtered box and chunks
of a realisation share one noise draw. All of it on the FIDUCIAL grid (the coordinates). ivar
is 1 / the per-voxel variance of the noise in the data: sigma^2 of the thermal noise as added
(radiometer: the equation's sigma; tools21cm: the slice's empirical variance; "none":
noise_sigma), times the fraction of a chunk's modes the wedge cut keeps
(`observe.wedge_noise_variance`; 0.6-3 % for the horizon wedge at z = 20-5). The cut also
correlates voxels along and across the line of sight, so ivar is the diagonal of a
non-diagonal (singular) noise covariance, not its inverse.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.common import object_rng
from cosmofm.data_cards.sample import Sample
from cosmofm.data_cards.schema import FieldCard
from cosmofm.data_cards.mocks.sim21cm import SimParams, coeval_box, cosmology
from cosmofm.data_cards.mocks.sim21cm.density import check_box, gaussian_field, lognormal_field
from cosmofm.data_cards.mocks.sim21cm.observe import (
    SKA_LOW_STATION_DIAMETER_M, remove_wedge, ska_low, smooth_beam, thermal_noise, thermal_noise_sigma, wedge_noise_variance,
)
from cosmofm.data_cards.mocks.sim21cm.params import canonical_name, inert_reason
from cosmofm.data_cards.mocks.sim21cm.reionization import lightcone_at_redshifts

QUANTITIES = ("brightness_temperature", "overdensity")
SWITCHES = ("HMF", "LOGNORMAL")  # model switches: parameters, but not labels
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 4  # lightcones kept (a 32^2 x 480 lightcone is ~6 MB)
# The one cosmology (Planck 2018, SimParams' defaults) that maps the slices' observed
# redshifts (frequencies) to the `los_distance` coordinate, whatever cosmology a card fixes
# or a realisation draws: coordinates must carry no parameter (issue 18).
FIDUCIAL = SimParams()


def card_priors(card: FieldCard) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Split card.parameters into fixed values and uniform priors [low, high]."""
    fixed, priors = {}, {}
    for name, value in card.parameters.items():
        where = f"{card.name}.field.parameters.{name}"
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or value[0] > value[1]:
                raise InputError(where, f"{value!r} is not a range [low, high]", "give a number or a two-element list [low, high]")
            reason = inert_reason(name, card.quantity)
            if reason is not None:  # a drawn parameter becomes a label; one the model ignores would be a label of nothing
                raise InputError(where, reason, "fix it to a number or drop it")
            priors[name] = (float(value[0]), float(value[1]))
        else:
            fixed[name] = value
    check_priors(card, fixed, priors, f"{card.name}.field.")
    return fixed, priors


def check_priors(card: FieldCard, fixed: dict, priors: dict[str, tuple[float, float]], prefix: str) -> None:
    """Refuse, before any compute, priors that reach unphysical values or a box too small for them.

    Every bound of every drawn parameter, with the others at their centres, must be a valid
    SimParams whose largest bubble fits the card's box (`density.check_box`); so must the
    corner where the one joint constraint, OMb < OMm, is tightest. Errors name
    `{prefix}parameters.NAME` (a card's field, or a prior file's key).
    """
    centre = {k: 0.5 * (lo + hi) for k, (lo, hi) in priors.items()}
    trials = [(None, "", {})]
    trials += [(name, f"at its {end} end {bound!r}: ", {name: bound}) for name, bounds in priors.items() for end, bound in zip(("low", "high"), bounds)]
    if "OMm" in priors or "OMb" in priors:
        corner = {k: priors[k][i] for k, i in (("OMm", 0), ("OMb", 1)) if k in priors}
        trials.append((None, f"at {corner}: ", corner))
    for name, what, values in trials:
        try:
            params = SimParams.from_dict({**fixed, **centre, **values})
            check_box(params, card.box_size.to_value("Mpc"), card.n_cells, float(card.redshift_max),
                      bubbles=card.quantity == "brightness_temperature")
        except InputError as e:
            bad = "R_BUBBLE_MAX" if e.field == "box_size" else e.field.removeprefix("parameters.")
            raise InputError(f"{prefix}parameters.{name or bad}", f"{what}{e.problem}", e.fix) from None


def draw_params(card: FieldCard, seed: int, realisation: int) -> tuple[SimParams, dict[str, float]]:
    """The parameters of one realisation and the labels (every parameter the card names that the model reads)."""
    fixed, priors = card_priors(card)
    rng = object_rng(seed, realisation, 3)
    drawn = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in sorted(priors.items())}
    values = {**fixed, **drawn}
    labels = {k: float(v) for k, v in values.items() if canonical_name(k) not in SWITCHES and inert_reason(k, card.quantity) is None}
    return SimParams.from_dict(values), labels


def lightcone_grid(card: FieldCard) -> tuple[np.ndarray, np.ndarray]:
    """(redshifts, los_distances) of every realisation's slices: one fixed grid per card.

    Slice i sits at FIDUCIAL comoving distance d(redshift_min) + i x cell, up to
    redshift_max; its redshift (so its observed frequency) is the same for every
    realisation, and each realisation's signal is simulated in its own cosmology at that
    redshift (`lightcone_at_redshifts`).
    """
    fid = cosmology(FIDUCIAL)
    cell = card.box_size.to_value("Mpc") / card.n_cells
    d0 = float(fid.comoving_distance(card.redshift_min))
    n_los = int(math.floor((float(fid.comoving_distance(card.redshift_max)) - d0) / cell + 1e-9)) + 1
    d = d0 + np.arange(n_los) * cell
    z = fid.redshift_at_distance(d)
    z[0] = card.redshift_min
    return z, d


def _layout(card: FieldCard) -> tuple[int, int]:
    """(slices per lightcone, chunks per lightcone) on the card's fixed grid (`lightcone_grid`)."""
    card_priors(card)  # refuses bad parameters before any compute
    n_los = len(lightcone_grid(card)[0])
    cell = card.box_size.to_value("Mpc") / card.n_cells
    if n_los < card.los_cells:
        raise InputError(f"{card.name}.field.redshift_max", f"the lightcone from z={card.redshift_min} to {card.redshift_max} holds {n_los} slices of {cell} Mpc, fewer than los_cells={card.los_cells}",
                         "widen the redshift range or lower los_cells")
    return n_los, n_los // card.los_cells


def _cached(key: tuple, make):
    """make() once per key, keeping the last _CACHE_SIZE results."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    out = make()
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def _realisation_key(card: FieldCard, seed: int, r: int, n_los: int) -> tuple:
    return (card.name, card.box_size.to_value("Mpc"), card.n_cells, card.redshift_min, n_los, card.quantity,
            repr(sorted(card.parameters.items())), seed, r)


def _realisation(card: FieldCard, seed: int, r: int, n_los: int):
    return _cached(_realisation_key(card, seed, r, n_los), lambda: simulate_realisation(card, seed, r))


def simulate_realisation(card: FieldCard, seed: int, r: int):
    """Lightcone realisation r of the card, uncached: (values, x_HI or None, redshifts, los_distances, params, labels).

    The whole lightcone on the card's fixed grid (`lightcone_grid`), with the parameters
    `draw_params` gives r and the density seed `density_seed(seed, r)`; `mock_field` cuts its
    chunks from it and the simulation bank (`mocks.bank`) stores it whole.
    """
    params, labels = draw_params(card, seed, r)
    sim_seed = density_seed(seed, r)
    box = card.box_size.to_value("Mpc")
    z, d = lightcone_grid(card)
    if card.quantity == "brightness_temperature":
        lc = lightcone_at_redshifts(params, box, card.n_cells, z, sim_seed)
        out = (lc.brightness_temp, lc.x_HI, z, d, params, labels)
    else:
        lc = lightcone_at_redshifts(params, box, card.n_cells, z, sim_seed, ionize=False)
        out = (lc.density, None, z, d, params, labels)
    return out


def density_seed(seed: int, realisation: int) -> int:
    """The seed of the initial density field of lightcone realisation (or coeval index) `realisation`."""
    return int(object_rng(seed, realisation, 5).integers(2**31))


def noise_seed(seed: int, realisation: int) -> int:
    """The instrument-noise seed of lightcone realisation (or coeval index) `realisation`."""
    return int(object_rng(seed, realisation, 7).integers(2**31))


def observe_field(card: FieldCard, values: np.ndarray, redshifts, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The card's instrument applied to a simulated brightness field: (values, ivar), both (D, H, W).

    values: (D, n_cells, n_cells) brightness temperature in mK, line of sight on axis 0, cells
    of box_size / n_cells on the FIDUCIAL grid; redshifts: (D,) of the slices; seed: the noise
    seed (the result is deterministic in it; the mocks use `noise_seed(seed, realisation)`).
    Wedge FFT chunks of `wedge_chunk` slices (0: los_cells) begin at slice `start`, and the
    slices before it are one chunk of their own: a lightcone's sample chunks, which begin at
    its offset, are then each exactly one wedge-filtered box. Returns the observed values
    (float64, mK) and ivar (float32, 1/mK^2: 1 / sigma^2 of the noise as added, per slice;
    see the module docstring for what it means after the wedge cut).
    """
    inst = card.instrument
    if inst is None:
        raise InputError(f"{card.name}.field.instrument", "is missing", "add an instrument block, or use mock_field's white noise")
    v = np.asarray(values, dtype=float)
    z = np.asarray(redshifts, dtype=float)
    n = card.n_cells
    if v.ndim != 3 or v.shape[1:] != (n, n) or z.shape != (v.shape[0],):
        raise InputError("values", f"need (D, {n}, {n}) values and (D,) redshifts, got {v.shape} and {z.shape}",
                         "pass the card's slices and one redshift per slice")
    if not 0 <= start <= v.shape[0]:
        raise InputError("start", f"{start} is outside 0..{v.shape[0]}", "give the first slice of the first wedge chunk")
    cell = card.box_size.to_value("Mpc") / n
    # The order the data are made in: the array's finite baselines blur the sky (the beam acts
    # on the signal, not on receiver noise), the receivers add thermal noise to what was
    # measured, and the wedge is cut in analysis from the data, so from signal and noise alike.
    if inst.beam == "max-baseline":
        v = smooth_beam(v, z, cell, inst.max_baseline.to_value("km"), FIDUCIAL)
    noise, sigma = _instrument_noise(card, v.shape, z, cell, seed)
    v = v + noise
    variance = sigma**2
    if inst.wedge != "none":
        parts = (slice(0, start), slice(start, len(z)))
        v = np.concatenate([_cut_wedge(card, v[p], z[p], cell) for p in parts])
        variance = np.concatenate([_wedge_variance(card, sigma[p], z[p], cell) for p in parts])
    ivar = np.broadcast_to((1.0 / variance).astype(np.float32)[:, None, None], v.shape).copy()
    return v, ivar


def _wedge_args(card: FieldCard) -> dict:
    inst = card.instrument
    return {"params": FIDUCIAL, "chunk": inst.wedge_chunk or card.los_cells, "buffer": inst.wedge_buffer.to_value("1 / Mpc"),
            "primary_beam": SKA_LOW_STATION_DIAMETER_M if inst.wedge == "primary-beam" else None}


def _cut_wedge(card: FieldCard, values: np.ndarray, z: np.ndarray, cell: float) -> np.ndarray:
    """The card's foreground wedge removed from (D, H, W) values, in chunks of wedge_chunk (0: los_cells) slices."""
    return values if len(values) == 0 else remove_wedge(values, z, cell, **_wedge_args(card))


def _wedge_variance(card: FieldCard, sigma: np.ndarray, z: np.ndarray, cell: float) -> np.ndarray:
    """(D,) noise variance per voxel after `_cut_wedge` of white noise with per-slice rms sigma."""
    return sigma**2 if len(z) == 0 else wedge_noise_variance(sigma, z, (card.n_cells, card.n_cells), cell, **_wedge_args(card))


def _instrument_noise(card: FieldCard, shape, z: np.ndarray, cell: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noise (D, H, W) mK, its sigma per slice (D,) mK) for the card's noise model."""
    inst = card.instrument
    hours = inst.integration_time.to_value("h")
    telescope = ska_low(inst.layout)
    if inst.noise_model == "radiometer":
        noise = thermal_noise(shape, z, cell, seed, hours, telescope, "radiometer", FIDUCIAL)
        return noise, thermal_noise_sigma(z, cell, hours, telescope, FIDUCIAL)
    if inst.noise_model == "tools21cm":
        noise = thermal_noise(shape, z, cell, seed, hours, telescope, "tools21cm", FIDUCIAL, chunk=inst.wedge_chunk or card.los_cells)
        return noise, noise.std(axis=(1, 2))  # uv-gridded noise has no closed-form per-voxel sigma: measure it
    noise = np.random.default_rng([seed, 1420]).standard_normal(shape) * card.noise_sigma  # "none": the card's white noise
    return noise, np.full(shape[0], float(card.noise_sigma))


def _observed(card: FieldCard, seed: int, r: int, n_los: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Realisation r observed whole (`observe_field`), cached: its chunks share one observation."""
    key = ("observed", *_realisation_key(card, seed, r, n_los), repr(card.instrument), card.los_cells, offset)

    def make():
        values, _, z, *_ = _realisation(card, seed, r, n_los)
        return observe_field(card, values, z, noise_seed(seed, r), start=offset)

    return _cached(key, make)


def mock_field(card: FieldCard, seed: int, index: int) -> Sample:
    """One chunk (los_cells x n_cells x n_cells) of the card's simulated field, deterministic in (seed, index)."""
    if card.quantity not in QUANTITIES:
        raise InputError(f"{card.name}.field.quantity", f"the mock cannot simulate {card.quantity!r}", f"use one of {QUANTITIES}")
    n, nlos = card.n_cells, card.los_cells
    box = card.box_size.to_value("Mpc")
    cell = box / n
    meta = {"card": card.name, "id": f"{card.name}-{seed}-{index}", "simulator": "cosmofm.data_cards.mocks.sim21cm"}
    if card.lightcone:
        n_los, per = _layout(card)
        r, j = divmod(index, per)
        values, x_hi, z, los, params, labels = _realisation(card, seed, r, n_los)
        offset = int(object_rng(seed, r, 6).integers(0, n_los - per * nlos + 1))
        if card.instrument is not None:
            values, ivar = _observed(card, seed, r, n_los, offset)
        s = slice(offset + j * nlos, offset + (j + 1) * nlos)
        values, z, los = values[s], z[s], los[s]
        ivar = ivar[s] if card.instrument is not None else None
        x_hi = None if x_hi is None else x_hi[s]
        meta.update(lightcone=r, chunk=j)
    else:
        params, labels = draw_params(card, seed, index)
        sim_seed = density_seed(seed, index)
        z = np.full(nlos, float(card.redshift_min))
        d0 = float(cosmology(FIDUCIAL).comoving_distance(card.redshift_min))  # the coordinate carries no parameter
        los = d0 + (np.arange(nlos) - (nlos - 1) / 2) * cell
        if card.quantity == "brightness_temperature":
            # the model the lightcones use (spin temperature and RSD): every parameter the card may draw acts here too
            cb = coeval_box(params, card.redshift_min, box, n, sim_seed, los_cells=nlos, spin=True, rsd=True)
            values, x_hi = cb.brightness_temp, cb.x_HI
        else:
            rng = np.random.default_rng([sim_seed, 21])
            make = lognormal_field if params.LOGNORMAL == 1 else gaussian_field
            cosmo = cosmology(params)
            g2 = float(cosmo.growth(card.redshift_min)) ** 2
            values = make(rng, (nlos, n, n), cell, lambda k: cosmo.power(k) * g2)
            x_hi = None
        ivar = None
        if card.instrument is not None:
            values, ivar = observe_field(card, values, z, noise_seed(seed, index))
    labels = dict(labels)
    labels["redshift"] = float(np.mean(z))
    if x_hi is not None:
        labels["xHI_mean"] = float(np.mean(x_hi))
    meta["labels"] = labels
    if ivar is None:  # no instrument: white noise of noise_sigma, exactly as before instruments existed
        noise = object_rng(seed, index, 4).normal(0.0, card.noise_sigma, values.shape)
        values, ivar = values + noise, np.full(values.shape, 1 / card.noise_sigma**2, dtype=np.float32)
    transverse = (np.arange(n) - (n - 1) / 2) * cell
    return Sample(
        "field", values, ivar,
        {"los_distance": los, "y_comoving": transverse, "x_comoving": transverse}, meta,
    )
