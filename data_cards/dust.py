"""Milky-Way dust in front of a spectrum: the E(B-V) its file records, and de-reddening by it.

Surveys record the dust-map reddening of every target's sight line on the scale of Schlegel,
Finkbeiner & Davis 1998 (SFD98; DESI: FIBERMAP `EBV`; BOSS: spAll `SFD_EBV`). Readers keep it
as `Sample.meta["ebv"]` [mag] on the scale of Schlafly & Finkbeiner 2011 (SF11: SFD98 x 0.86,
`recorded_ebv`), the E(B-V) the F99 curve below takes; a user whose files carry none can read
it from SFD98 map files they have (`DustMap`, `cosmofm classify --dust-map DIR`). The survey
mocks write what such a map would say (`mocks/survey.py`: the true E(B-V) with the map's 16 %
error, SFD98's quoted accuracy). A model whose head says `galactic_dereddening`
sees every spectrum divided by the dust's transmission along that sight line, in training
and in prediction alike, so a target behind more dust than the training set had still looks
like its class (issue 17's reddening shift).

The curve is Fitzpatrick 1999 with R_V = 3.1 (`dust_extinction`'s F99), the law Schlafly &
Finkbeiner 2011 calibrate the SFD map with; the mocks redden with Cardelli, Clayton & Mathis
1989 instead, so a mock test carries a law mismatch as real spectra do.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.sample import Sample

EBV_KEY = "ebv"  # Sample.meta key of the sight line's dust-map E(B-V) [mag, SF11 scale]
SF11_SCALE = 0.86  # SF11 E(B-V) / SFD98 E(B-V) (Schlafly & Finkbeiner 2011)
DEREDDENED_KEY = "dereddened_ebv"  # set on a de-reddened Sample: the E(B-V) it was corrected by
R_V = 3.1
EBV_MAX = 5.0  # mag; no survey target lies behind more (the SFD map saturates in the Galactic plane)


def map_ebv(sample: Sample) -> float | None:
    """The sample's dust-map E(B-V) [mag], None when its file recorded none; an InputError
    naming the field when the value cannot be a reddening."""
    value = sample.meta.get(EBV_KEY)
    if value is None:
        return None
    try:
        ebv = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{sample.id}.meta.{EBV_KEY}", f"is {value!r}, not a number", "give E(B-V) in magnitudes, e.g. 0.03") from None
    if not np.isfinite(ebv) or not 0 <= ebv <= EBV_MAX:
        raise InputError(f"{sample.id}.meta.{EBV_KEY}", f"is {ebv}, outside 0-{EBV_MAX} mag",
                         "give the sight line's E(B-V) in magnitudes (not A_V, not a flux); NaN = unknown: leave the key out")
    return ebv


def recorded_ebv(value) -> float | None:
    """A file's SFD98 E(B-V) column value as `meta["ebv"]` (x SF11_SCALE): None where the file
    has none for the target (a NaN, or a negative fill value such as -1 or -9999)."""
    ebv = _finite_float(value)
    return ebv * SF11_SCALE if ebv is not None and ebv >= 0 else None


class DustMap:
    """The SFD98 dust map in files a user already has (`SFD_dust_4096_ngp.fits` and `_sgp.fits`
    in `folder`; nothing is downloaded), read with `sfdmap2` at each target's RA/Dec
    (`meta["ra"]`, `meta["dec"]`, ICRS degrees), on the SF11 scale of `meta["ebv"]`."""

    FILES = ("SFD_dust_4096_ngp.fits", "SFD_dust_4096_sgp.fits")

    def __init__(self, folder):
        from pathlib import Path

        from sfdmap2.sfdmap import SFDMap

        folder = Path(folder)
        missing = [f for f in self.FILES if not (folder / f).is_file()]
        if missing:
            raise InputError("dust_map", f"{folder} lacks {', '.join(missing)}",
                             "give the folder holding the SFD98 maps (SFD_dust_4096_ngp.fits and _sgp.fits, e.g. from github.com/kbarbary/sfddata)")
        self.folder, self._map = folder, SFDMap(str(folder), scaling=SF11_SCALE)
        try:  # both hemispheres read now: a bad file fails here, and forked predict workers share the arrays
            self._map.ebv(np.array([0.0, 0.0]), np.array([90.0, -90.0]), frame="galactic")
        except Exception as e:
            raise InputError("dust_map", f"the SFD98 files in {folder} cannot be read ({type(e).__name__}: {e})",
                             "give intact SFD_dust_4096_ngp.fits / _sgp.fits (Lambert projections with CRPIX1/2, LAM_SCAL, LAM_NSGP)") from None

    def fill(self, samples: Sequence[Sample]) -> int:
        """Give every sample without `meta["ebv"]` but with a position the map's E(B-V) there
        (in place); returns how many were filled. A spectrum's own file value is never replaced."""
        todo = [s for s in samples if s.meta.get(EBV_KEY) is None and None not in (_finite_float(s.meta.get("ra")), _finite_float(s.meta.get("dec")))]
        if todo:
            ebv = np.atleast_1d(self._map.ebv(np.array([float(s.meta["ra"]) for s in todo]), np.array([float(s.meta["dec"]) for s in todo])))
            for s, e in zip(todo, ebv):
                s.meta[EBV_KEY] = float(e)
        return len(todo)


def _finite_float(value) -> float | None:
    """float(value), or None for a value that is missing, not a number, NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def transmission(wavelength: np.ndarray, ebv: float) -> np.ndarray:
    """Fraction of the light Milky-Way dust of `ebv` [mag] lets through at vacuum
    `wavelength` [A] (F99, R_V = 3.1)."""
    return 10 ** (-0.4 * ebv * R_V * _a_over_av(np.ascontiguousarray(wavelength, dtype=np.float64).tobytes()))


@functools.lru_cache(maxsize=64)
def _a_over_av(wavelength_bytes: bytes) -> np.ndarray:
    """A(lambda) / A(V) on one grid; cached, as the spectra of a survey file share their grid
    and E(B-V) only scales the curve. Outside F99's 0.1-3.3 um the curve is held at its end values."""
    from dust_extinction.parameter_averages import F99

    wave = np.frombuffer(wavelength_bytes, dtype=np.float64)
    lo, hi = F99.x_range  # inverse microns
    x = np.clip(1e4 / wave, lo, hi)
    curve = F99(Rv=R_V).evaluate(x, R_V)
    curve.setflags(write=False)
    return curve


def deredden(sample: Sample) -> Sample:
    """`sample` with Milky-Way dust taken out: flux / T and ivar * T^2, T the transmission of
    its `meta["ebv"]`. A spectrum without an E(B-V), or one already de-reddened, is returned
    as it is; `meta["dereddened_ebv"]` says which (the E(B-V) used, or None)."""
    if DEREDDENED_KEY in sample.meta:
        return sample
    ebv = map_ebv(sample)
    return divided(sample, 1.0 if ebv is None else transmission(sample.coords["wavelength"], ebv), ebv)


def divided(sample: Sample, t, ebv: float | None) -> Sample:
    """`sample` with the transmission `t` (per pixel, or 1) taken out, flux / t and ivar * t^2
    (the S/N of each pixel kept), marked as de-reddened by `ebv` (None: not corrected)."""
    return Sample(sample.modality, sample.values / t, sample.ivar * t**2, sample.coords, {**sample.meta, DEREDDENED_KEY: ebv})


class DereddenedSpectra(Sequence):
    """A lazy view of spectrum samples, each de-reddened (`deredden`) as it is read.

    With `require` every sample must carry its E(B-V): training data for a de-reddening
    model are refused, naming the first sample without one, rather than half corrected."""

    def __init__(self, samples: Sequence[Sample], require: bool = False):
        self.samples, self.require = samples, require

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        out = deredden(self.samples[i])
        if self.require and out.meta[DEREDDENED_KEY] is None:
            raise InputError(f"{out.id}.meta.{EBV_KEY}", "is missing, and the head de-reddens (galactic_dereddening)",
                             "give every training spectrum its dust-map E(B-V) (DESI: FIBERMAP EBV), or fine-tune with galactic_dereddening off")
        return out
