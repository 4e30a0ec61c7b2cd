"""Simulation parameters of the 21cm model, named as in 21cmFAST (v4 `AstroParams` / `CosmoParams`).

`SimParams` holds every number the model reads. Defaults are 21cmFAST 4.x's (Planck 2018
cosmology; HII_EFF_FACTOR = 30, ION_Tvir_MIN = 4.69897, R_BUBBLE_MAX = 15 Mpc), so a
run of our model and a 21cmFAST run with its `const-zeta` template describe the same
universe. `SimParams.from_dict` also takes the aliases `Omega_m`, `Omega_b`, `sigma_8`,
`hubble`, `n_s` and `m_WDM`, and rejects unknown names and unphysical values with `InputError`.
M_WDM is the warm dark matter particle mass in keV (0 = cold dark matter, the default), the
WDM parameter of 21cmFAST 1.x-3.x (`global_params.M_WDM` with `P_CUTOFF`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from astropy.cosmology import Planck18

from cosmofm.data_cards.errors import InputError

# Other names people write for the 21cmFAST cosmology parameters.
ALIASES = {"Omega_m": "OMm", "Omega_b": "OMb", "sigma_8": "SIGMA_8", "sigma8": "SIGMA_8", "hubble": "hlittle", "h": "hlittle", "n_s": "POWER_INDEX",
           "m_WDM": "M_WDM"}
# Below ~0.1 keV a thermal relic erases the haloes of every galaxy (half-mode mass of 0.1 keV
# ~ 1e14 Msun in `cosmology.half_mode_mass`, a galaxy cluster): not a model of our Universe.
M_WDM_MIN = 0.1  # keV

# Which parameters the embedded model reads, per simulated quantity: the single source of
# truth for what a card may draw ([low, high]) and what is written as a label. A parameter
# that changes nothing must not become a label (an inference head trained on it would return
# its prior and look calibrated), so `inert_reason` refuses drawing it and the mocks drop it
# from the labels. The X-ray parameters act through the spin temperature (`spin`, `heating`):
# heating and Lyman-alpha coupling of cosmic dawn; the density field reads only the cosmology.
COSMOLOGY_READS = ("OMm", "OMb", "SIGMA_8", "hlittle", "POWER_INDEX", "M_WDM", "LOGNORMAL")  # growth, P(k), distances, M_min
XRAY_READS = ("L_X", "NU_X_THRESH", "X_RAY_SPEC_INDEX")  # X-ray heating (spin temperature)
BRIGHTNESS_READS = ("HII_EFF_FACTOR", "ION_Tvir_MIN", "R_BUBBLE_MAX", "HMF") + XRAY_READS + COSMOLOGY_READS
MODEL_READS = {"brightness_temperature": BRIGHTNESS_READS, "overdensity": COSMOLOGY_READS}


def canonical_name(name: str) -> str:
    """The 21cmFAST name of a parameter or alias (unknown names come back unchanged)."""
    return ALIASES.get(name, name)


def inert_reason(name: str, quantity: str = "brightness_temperature") -> str | None:
    """Why the embedded model ignores parameter `name` when simulating `quantity`, or None if it reads it.

    Unknown names also give None: `SimParams.from_dict` refuses them with its own error.
    """
    name = canonical_name(name)
    if name in MODEL_READS.get(quantity, BRIGHTNESS_READS) or name not in {f.name for f in dataclasses.fields(SimParams)}:
        return None
    return (f"changes nothing in the embedded model's {quantity} (it is a reionisation / X-ray heating parameter; "
            f"the {quantity} field is neither ionised nor heated)")


@dataclass(frozen=True)
class SimParams:
    """Parameters of one simulated universe (21cmFAST names and units).

    Args:
        HII_EFF_FACTOR: ionising efficiency zeta (ionising photons escaping per baryon in
            collapsed haloes, times the escape and star-formation fractions); > 0.
        ION_Tvir_MIN: log10 of the minimum virial temperature (K) of haloes that host
            ionising sources; sets M_min(z) through Barkana & Loeb (2001).
        R_BUBBLE_MAX: largest excursion-set smoothing radius in comoving Mpc (the photon
            mean free path through ionised regions).
        L_X: log10 of the soft-band (NU_X_THRESH to 2 keV) X-ray luminosity per star-formation
            rate, erg/s per Msun/yr (21cmFAST v3+); in [30, 50] (a linear value is refused).
        NU_X_THRESH: X-ray energy threshold for self-absorption by the host galaxies (E_0),
            eV; photons below it do not escape. 0 < NU_X_THRESH < 2000 (the top of the L_X band).
        X_RAY_SPEC_INDEX: energy index alpha_X of the X-ray spectrum, L(E) ~ E^-alpha_X
            (21cmFAST default 1.0); in [-1, 3].
        OMm, OMb: matter and baryon density parameters today.
        SIGMA_8: rms linear density fluctuation in 8 Mpc/h top-hat spheres today.
        hlittle: H0 / (100 km/s/Mpc).
        POWER_INDEX: primordial spectral index n_s.
        M_WDM: warm dark matter (thermal relic) particle mass in keV; 0 = cold dark matter.
            A finite mass cuts P(k) off with the Bode, Ostriker & Turok (2001) transfer
            function and raises the minimum source mass to the WDM "Jeans" mass (Barkana,
            Haiman & Ostriker 2001), as 21cmFAST's P_CUTOFF (`cosmology.wdm_transfer`).
            0 or >= 0.1 keV (M_WDM_MIN).
        HMF: which global collapsed fraction the excursion set is normalised to, 1 =
            Sheth-Tormen with the Jenkins et al. (2001) fit that 21cmFAST uses (its default
            `HMF = "ST"`), 0 = Press-Schechter. A number so that cards can set it.
        LOGNORMAL: 1 = the density field is lognormal (positive everywhere), 0 = Gaussian
            linear field (1 + delta clipped at 0 in the brightness temperature).
    """

    HII_EFF_FACTOR: float = 30.0
    ION_Tvir_MIN: float = 4.69897
    R_BUBBLE_MAX: float = 15.0  # Mpc, comoving
    L_X: float = 40.5  # log10 erg/s/(Msun/yr), integrated from NU_X_THRESH to 2 keV
    NU_X_THRESH: float = 500.0  # eV
    X_RAY_SPEC_INDEX: float = 1.0  # L(E) ~ E^-alpha_X
    OMm: float = float(Planck18.Om0)
    OMb: float = float(Planck18.Ob0)
    SIGMA_8: float = 0.8102
    hlittle: float = float(Planck18.h)
    POWER_INDEX: float = 0.9665
    M_WDM: float = 0.0  # keV; 0 = cold dark matter
    HMF: float = 1.0  # 1 = Sheth-Tormen (21cmFAST default), 0 = Press-Schechter
    LOGNORMAL: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"parameters.{f.name}", f"{v!r} is not a finite number", "give a plain number")
        positive = ("HII_EFF_FACTOR", "R_BUBBLE_MAX", "NU_X_THRESH", "OMm", "OMb", "SIGMA_8", "hlittle", "POWER_INDEX")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"parameters.{name}", f"must be positive, got {getattr(self, name)!r}", "give a positive value")
        if not self.OMm < 1:  # flat: Omega_Lambda = 1 - OMm must not be negative
            raise InputError("parameters.OMm", f"must be below 1 (flat universe, Omega_Lambda = 1 - OMm), got {self.OMm!r}", "use e.g. OMm = 0.31")
        if not 0 < self.OMb < self.OMm < 1:
            raise InputError("parameters.OMb", f"need 0 < OMb < OMm < 1, got OMb={self.OMb}, OMm={self.OMm}", "use e.g. OMm = 0.31, OMb = 0.049")
        if not 2.0 <= self.ION_Tvir_MIN <= 7.0:
            raise InputError("parameters.ION_Tvir_MIN", f"{self.ION_Tvir_MIN!r} is not a log10 temperature in K", "give log10(T_vir / K), e.g. 4.7 (5e4 K)")
        if not 30.0 <= self.L_X <= 50.0:
            raise InputError("parameters.L_X", f"{self.L_X!r} is not a log10 luminosity in erg/s per Msun/yr",
                             "give log10(L_X), e.g. 40.5 (a linear or negative value is not accepted)")
        if not self.NU_X_THRESH < 2000.0:
            raise InputError("parameters.NU_X_THRESH", f"must be below the 2 keV top of the L_X band, got {self.NU_X_THRESH!r} eV",
                             "give E_0 in eV, e.g. 500")
        if not -1.0 <= self.X_RAY_SPEC_INDEX <= 3.0:
            raise InputError("parameters.X_RAY_SPEC_INDEX", f"{self.X_RAY_SPEC_INDEX!r} is outside [-1, 3]", "use e.g. 1.0 (21cmFAST's default)")
        if self.M_WDM != 0 and not self.M_WDM >= M_WDM_MIN:
            raise InputError("parameters.M_WDM", f"{self.M_WDM!r} keV is not a warm dark matter mass (0 = cold dark matter, else >= {M_WDM_MIN} keV)",
                             "give the thermal-relic mass in keV, e.g. 2.0, or 0 for cold dark matter")
        for name in ("HMF", "LOGNORMAL"):
            if getattr(self, name) not in (0, 1):
                raise InputError(f"parameters.{name}", f"must be 0 or 1, got {getattr(self, name)!r}", "use 1 (on) or 0 (off)")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None, **overrides) -> "SimParams":
        """Parameters from a card's `parameters` mapping (21cmFAST names or ALIASES); defaults fill the rest."""
        known = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, float] = {}
        for key, value in {**(values or {}), **overrides}.items():
            name = ALIASES.get(key, key)
            if name not in known:
                raise InputError(f"parameters.{key}", "is not a parameter of the 21cm model", f"use one of {sorted(known)} (or aliases {sorted(ALIASES)})")
            if name in out and out[name] != value:
                raise InputError(f"parameters.{key}", f"repeats {name} with a different value", "give each parameter once")
            out[name] = value
        return cls(**out)

    @classmethod
    def coerce(cls, params: "SimParams | dict[str, Any] | None") -> "SimParams":
        """params as SimParams: a SimParams as it is, a dict (or None) through `from_dict`, anything else an InputError."""
        if isinstance(params, cls):
            return params
        if params is None or isinstance(params, dict):
            return cls.from_dict(params or {})
        raise InputError("params", f"expected SimParams or a dict, got {type(params).__name__}", "pass SimParams(...) or {'HII_EFF_FACTOR': 30, ...}")

    def replace(self, **changes) -> "SimParams":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def cosmo_key(self) -> tuple[float, ...]:
        """The parameters the cosmology tables depend on (for caching), in the order of COSMO_KEY."""
        return tuple(getattr(self, name) for name in COSMO_KEY)


# What `cosmology.Cosmology` reads: every parameter here must be in `cosmo_key`, or the cache
# would hand one cosmology's tables to another.
COSMO_KEY = ("OMm", "OMb", "SIGMA_8", "hlittle", "POWER_INDEX", "M_WDM")
