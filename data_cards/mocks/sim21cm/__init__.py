"""A fast 21cmFAST-like semi-numerical model of reionisation (numpy only), and its observation.

    from cosmofm.data_cards.mocks.sim21cm import SimParams, lightcone, coeval_box, density_field
    lc = lightcone({"HII_EFF_FACTOR": 30, "L_X": 40.5}, box_size=64.0, n_cells=32, z_min=5, z_max=30, seed=0)
    lc.brightness_temp  # (D, 32, 32) mK; lc.redshifts, lc.frequencies, lc.los_distances, lc.global_xHI, lc.spin_temp

Modules: `params` (SimParams, 21cmFAST names), `cosmology` (EH98 P(k), sigma(R), D(z),
distances, M_min, f_coll), `density` (Gaussian / lognormal fields, P(k) estimator),
`reionization` (excursion set, coeval boxes, lightcones), `heating` (cosmic dawn's mean X-ray
heating, ionisation and Lyman-alpha history), `spin` (spin temperature per cell, brightness
temperature, redshift-space distortions), `sensitivity` (does each drawn
parameter act?), `observe` (SKA-Low thermal
noise, foreground wedge). The reference simulator is 21cmFAST (Mesinger, Furlanetto &
Cen 2011; Murray et al. 2020); `scripts/bench/validate_21cm.py` compares the two.
"""

from cosmofm.data_cards.mocks.sim21cm.cosmology import NU21_HZ, Cosmology, cosmology, frequency_hz
from cosmofm.data_cards.mocks.sim21cm.density import DensityField, density_field, power_spectrum
from cosmofm.data_cards.mocks.sim21cm.observe import SKA_LOW, Telescope, remove_wedge, thermal_noise, thermal_noise_sigma, wedge_slope
from cosmofm.data_cards.mocks.sim21cm.params import SimParams
from cosmofm.data_cards.mocks.sim21cm.reionization import (
    LIGHTCONE_Z, CoevalBox, Lightcone, coeval_box, crossing_redshift, lightcone, lightcone_at_redshifts, lightcone_slices,
)
from cosmofm.data_cards.mocks.sim21cm.spin import brightness_prefactor, spin_temperature

__all__ = [
    "LIGHTCONE_Z", "NU21_HZ", "SKA_LOW", "CoevalBox", "Cosmology", "DensityField", "Lightcone", "SimParams", "Telescope",
    "brightness_prefactor", "coeval_box", "cosmology", "crossing_redshift", "density_field", "frequency_hz",
    "lightcone", "lightcone_at_redshifts", "lightcone_slices", "power_spectrum", "remove_wedge", "spin_temperature", "thermal_noise", "thermal_noise_sigma", "wedge_slope",
]
