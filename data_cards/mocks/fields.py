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
  56 chunks of 32^3, spin temperature and RSD on) about 1,100 chunks a minute on one
  core (3.1 s a lightcone; the saturated-T_S model made ~1,900 a minute of the old z = 7-12
  card), 10k chunks in ~9 min (`python -m cosmofm.bench.validate_21cm --speed-only`).
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
from cosmofm.data_cards.mocks.sim21cm.density import gaussian_field, lognormal_field
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
    # validate names and values once, at the prior centre
    SimParams.from_dict({**fixed, **{k: 0.5 * (lo + hi) for k, (lo, hi) in priors.items()}})
    return fixed, priors


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


def _realisation(card: FieldCard, seed: int, r: int, n_los: int):
    key = (card.name, card.box_size.to_value("Mpc"), card.n_cells, card.redshift_min, n_los, card.quantity,
           repr(sorted(card.parameters.items())), seed, r)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    params, labels = draw_params(card, seed, r)
    sim_seed = int(object_rng(seed, r, 5).integers(2**31))
    box = card.box_size.to_value("Mpc")
    z, d = lightcone_grid(card)
    if card.quantity == "brightness_temperature":
        lc = lightcone_at_redshifts(params, box, card.n_cells, z, sim_seed)
        out = (lc.brightness_temp, lc.x_HI, z, d, params, labels)
    else:
        lc = lightcone_at_redshifts(params, box, card.n_cells, z, sim_seed, ionize=False)
        out = (lc.density, None, z, d, params, labels)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


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
        s = slice(offset + j * nlos, offset + (j + 1) * nlos)
        values, z, los = values[s], z[s], los[s]
        x_hi = None if x_hi is None else x_hi[s]
        meta.update(lightcone=r, chunk=j)
    else:
        params, labels = draw_params(card, seed, index)
        sim_seed = int(object_rng(seed, index, 5).integers(2**31))
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
    labels = dict(labels)
    labels["redshift"] = float(np.mean(z))
    if x_hi is not None:
        labels["xHI_mean"] = float(np.mean(x_hi))
    meta["labels"] = labels
    noise = object_rng(seed, index, 4).normal(0.0, card.noise_sigma, values.shape)
    transverse = (np.arange(n) - (n - 1) / 2) * cell
    return Sample(
        "field", values + noise, np.full(values.shape, 1 / card.noise_sigma**2, dtype=np.float32),
        {"los_distance": los, "y_comoving": transverse, "x_comoving": transverse}, meta,
    )
