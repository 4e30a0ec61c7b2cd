"""The ceiling of the star classes on survey mocks: a fit with the generator's own model (issue 17).

    python -m cosmofm.bench.classify_star_ceiling --labelled WORK/labelled-sdss-like-survey-14000-seed21 \
        --models WORK/finetune-shared-multimodal-seed0/model WORK/finetune-shared-multimodal-seed1/model \
        WORK/finetune-shared-multimodal-seed2/model --out docs/bench

A measurement, not a classifier for the catalogue: for every star of the classify_survey test
block (the last 15 % of the labelled mocks, as classify_star_errors reads them) the posterior
over the star classes (`mocks.spectra.STAR_TEFF`) under the generator's own forward model
(mocks/survey.survey_model: stellar.star_spectrum x galactic_extinction, then
instrument.observe_survey's telluric residual and flux-calibration error), with the
generator's priors, scored by the recall of its MAP class beside the network's.

The model of a star's spectrum y (observed frame, the spectrum's own ivar as its noise):

    y = A [m(Teff, log g, [Fe/H]) e(E(B-V))] (1 + sum_k c_k P_k + r T + d K) + noise

- m: stellar.stellar_fine broadened by stellar.broaden (rotation + R = 2000 line-spread
  function) on one fine ln(lambda) grid, shifted to the star's KNOWN radial velocity (the
  label's redshift, in RV_BIN_KMS bins) and interpolated onto the pixels as star_spectrum does;
- grids: Teff every TEFF_STEP K over each class centre +- TEFF_HALF_RANGE (prior: the class
  centre with its TEFF_RMS rms, equal class priors as the generator draws its classes);
  log g in cells of draw_star's three regimes, [Fe/H] ([alpha/Fe] follows it as draw_star sets
  it) in FEH_STEP cells, E(B-V) in EBV_EDGES cells, each cell weighted by its prior mass from
  N_PRIOR_DRAWS draws of the generator's own stellar.draw_star / draw_ebv;
- inside each cell the template is linear in the offset from the cell's mean (a secant
  derivative template for [Fe/H] and log g, d ln e / d E(B-V) = -0.921 R_V A(lambda)/A(V)
  for the dust), with a Gaussian prior of the cell's rms, so the grid's coarseness does not
  bias Teff at high S/N;
- the flux-calibration error (instrument.calibration_error: Legendre orders 1-4 in lambda,
  5-10 % rms) is marginalised analytically with a Gaussian prior on c whose covariance is
  measured from N_PRIOR_DRAWS draws of calibration_error itself, and the O2 telluric
  residual r (instrument.telluric, U(0, 0.05)) the same way with its mean and rms;
- A (the r-band flux) has a flat prior; the model is linear in A x (1, c, r, d, offsets), so
  the marginal likelihood is a closed-form generalised least squares (`gls_marginal`).
The sky-subtraction residual (one scale error for all lines, one at 5577 A, one wavelength
shift, in a dark sky's fixed f_lambda) is added to each pixel's variance (`sky_residual_ivar`;
--no-sky-variance leaves ivar as it is), its correlation across lines dropped. Not used: what
the mocks' ivar itself says of the star (its variance follows the source's counts, so 1/ivar
is a noise-free copy of the star's continuum x calibration beside the known sky): this is the
ceiling of the flux, with ivar as its noise, not of everything a network is given.

--map-ebv gives the fit what a survey's dust map says of each sight line (`meta["ebv"]`, the
mocks' true E(B-V) off by survey.DUST_MAP_ERROR, log-normal): the E(B-V) cells become each
star's own, MAP_EBV_CELLS cells of equal mass of its posterior (the generator's prior, from
N_MAP_PRIOR_DRAWS draws of draw_ebv, times the map's error), each with its own mean and rms,
so the ceiling is that of a classifier which reads spectra with a dust map beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cosmofm.bench.classify_star_errors import BINS, TEST_FRACTION, star_parameters
from cosmofm.data_cards.mocks import instrument, stellar
from cosmofm.data_cards.mocks.spectra import R_TOP_HAT, STAR_TEFF
from cosmofm.data_cards.mocks.survey import DUST_MAP_ERROR

TEFF_STEP, TEFF_HALF_RANGE, TEFF_RMS = 20.0, 300.0, 80.0  # K: the grid and the classes' spread (spectra.draw_object)
FEH_STEP, FEH_RANGE = 0.2, (-2.5, 0.5)  # dex: draw_star clips [Fe/H] to this range
EBV_EDGES = (0.0, 0.025, 0.05, 0.09, 0.16, 0.6)  # mag: draw_ebv clips at 0.6
# log g cells of draw_star's regimes, keyed (Teff > 8000, Teff > 5500): BHB + dwarf A stars,
# F-G turn-off dwarfs + subgiants, K dwarfs + giants (cells with no prior draws are dropped)
LOGG_EDGES = {
    (True, True): (2.9, 3.5, 3.9, 4.4),
    (False, True): (3.4, 3.8, 4.1, 4.35, 4.6),
    (False, False): (1.5, 2.25, 3.0, 4.3, 4.6, 4.9),
}
RV_BIN_KMS = 2.0  # stars are fitted with templates shifted to their bin's centre (<= 1 km/s off)
N_PRIOR_DRAWS = 20000
N_MAP_PRIOR_DRAWS, MAP_EBV_CELLS = 400000, 3  # --map-ebv: prior draws (the posterior is ~5x narrower) and cells per star
TELLURIC_RESIDUAL = (0.0, 0.05)  # observe_survey's rng.uniform(0.0, 0.05) of the O2 bands' correction residual
R_V = 3.1
FAMILY = ("amplitude", "P1", "P2", "P3", "P4", "dust", "telluric")  # columns of m e x (1, ...): the calibration family


@dataclass
class PriorGrid:
    """The fit's grid and prior cells; the defaults are the bench's (module docstring)."""

    classes: tuple[str, ...] = tuple(STAR_TEFF)
    teff_step: float = TEFF_STEP
    teff_half_range: float = TEFF_HALF_RANGE
    feh_edges: tuple[float, ...] = tuple(float(x) for x in np.round(np.arange(FEH_RANGE[0] - FEH_STEP / 2, FEH_RANGE[1] + FEH_STEP, FEH_STEP), 4))  # cells centred on the ends
    ebv_edges: tuple[float, ...] = EBV_EDGES
    logg_edges: dict = field(default_factory=lambda: dict(LOGG_EDGES))
    n_draws: int = N_PRIOR_DRAWS
    seed: int = 0

    def teff_nodes(self) -> np.ndarray:
        """The union of every class's Teff grid [K]."""
        k = int(round(self.teff_half_range / self.teff_step))
        return np.unique(np.concatenate([STAR_TEFF[c] + self.teff_step * np.arange(-k, k + 1) for c in self.classes]))

    def class_log_prior(self, teff: np.ndarray) -> np.ndarray:
        """(classes, nodes) log of each class's Teff prior at the nodes (Gaussian x step, -inf off its grid)."""
        out = np.full((len(self.classes), teff.size), -np.inf)
        for i, c in enumerate(self.classes):
            d = teff - STAR_TEFF[c]
            on = np.abs(d) <= self.teff_half_range + 1e-6
            out[i, on] = -0.5 * (d[on] / TEFF_RMS) ** 2 - math.log(math.sqrt(2 * math.pi) * TEFF_RMS / self.teff_step)
        return out


def _cells(values: np.ndarray, edges, weights: np.ndarray | None = None) -> list[tuple[float, float, float, np.ndarray]]:
    """(prior mass, mean, rms, member mask) of the draws in each cell of `edges` (empty cells
    dropped), each draw counted with its `weights` (default: equal)."""
    edges = np.asarray(edges, dtype=float)
    weights = np.ones(values.size) if weights is None else weights
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, edges.size - 2)
    inside = (values >= edges[0]) & (values <= edges[-1])
    out = []
    for i in range(edges.size - 1):
        member = inside & (index == i)
        if member.any():
            w, v = weights[member], values[member]
            mean = float(np.sum(w * v) / w.sum())
            out.append((float(w.sum() / weights.sum()), mean, float(np.sqrt(np.sum(w * (v - mean) ** 2) / w.sum())), member))
    return out


def star_cells(teff: float, grid: PriorGrid) -> list[dict]:
    """The (log g, vsini, [Fe/H]) cells of a star of temperature `teff`: prior mass, means and
    rms, from grid.n_draws draws of stellar.draw_star (a cell of fast and slow rotators is split
    at the median vsini, so each node broadens as its stars do)."""
    rng = np.random.default_rng(grid.seed)
    draws = [stellar.draw_star(rng, teff) for _ in range(grid.n_draws)]
    logg, feh, vsini = (np.array([getattr(d, k) for d in draws]) for k in ("logg", "feh", "vsini_kms"))
    regime = (teff > 8000, teff > 5500)
    if regime not in grid.logg_edges:
        raise ValueError(f"PriorGrid.logg_edges: no log g cells for Teff {teff:.0f} K (regime {regime}); add them")
    out = []
    for g_mass, g_mean, g_sd, g_in in _cells(logg, grid.logg_edges[regime]):
        v = vsini[g_in]
        parts = [v <= np.median(v), v > np.median(v)] if np.ptp(v) > 20 else [np.ones(v.size, bool)]
        for part in parts:
            if not part.any():
                continue
            for f_mass, f_mean, f_sd, _ in _cells(feh, grid.feh_edges):
                out.append({"logg": g_mean, "logg_sd": max(g_sd, 1e-3), "vsini": float(v[part].mean()), "feh": f_mean,
                            "feh_sd": max(f_sd, 1e-3), "log_mass": math.log(g_mass * part.mean() * f_mass)})
    return out


def ebv_cells(grid: PriorGrid) -> list[tuple[float, float, float]]:
    """(log prior mass, mean, rms) of each E(B-V) cell, from draws of stellar.draw_ebv."""
    rng = np.random.default_rng(grid.seed + 1)
    ebv = np.array([stellar.draw_ebv(rng) for _ in range(grid.n_draws)])
    return [(math.log(m), mean, max(sd, 1e-4)) for m, mean, sd, _ in _cells(ebv, grid.ebv_edges)]


def map_ebv_cells(map_ebv: float, draws: np.ndarray, n_cells: int = MAP_EBV_CELLS) -> list[tuple[float, float, float]]:
    """(log mass, mean, rms) of `n_cells` cells of equal mass of the E(B-V) posterior of a star
    whose dust map reads `map_ebv`: the generator's prior (`draws` of stellar.draw_ebv, sorted
    ascending, so the many stars of a fit share one sort) weighted by the map's log-normal error,
    ln(map / true) ~ N(0, DUST_MAP_ERROR)."""
    if not (np.isfinite(map_ebv) and map_ebv > 0):
        raise ValueError(f"map_ebv_cells: the map's E(B-V) must be a positive number, got {map_ebv!r}")
    if np.any(np.diff(draws) < 0):
        raise ValueError("map_ebv_cells: the prior draws must be sorted ascending (np.sort them once)")
    w = np.exp(-0.5 * ((math.log(map_ebv) - np.log(np.clip(draws, 1e-6, None))) / DUST_MAP_ERROR) ** 2)
    if w.sum() ** 2 / (w * w).sum() < 30:  # effective draws: too few to cut cells from
        raise ValueError(f"map_ebv_cells: E(B-V) {map_ebv:.3f} is too far into the prior's tail for {draws.size} draws; raise N_MAP_PRIOR_DRAWS")
    quantile = np.cumsum(w) / w.sum()
    inner = draws[np.searchsorted(quantile, np.arange(1, n_cells) / n_cells)]  # the first draw of each cell after the first
    return [(math.log(m), mean, max(sd, 1e-4)) for m, mean, sd, _ in _cells(draws, [draws[0], *inner, draws[-1]], w)]


def calibration_prior(wave: np.ndarray, n_draws: int = N_PRIOR_DRAWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(basis (n, 4), covariance (4, 4)) of instrument.calibration_error: its Legendre orders
    1-4 on the pixels and the covariance of their coefficients over n_draws of its own draws
    (the rms normalisation makes them non-Gaussian; the fit uses their second moments)."""
    t = 2 * (wave - wave[0]) / (wave[-1] - wave[0]) - 1
    basis = np.polynomial.legendre.legvander(t, 4)[:, 1:]
    rng = np.random.default_rng(seed)
    draws = np.stack([instrument.calibration_error(wave, rng) - 1 for _ in range(n_draws)])  # (D, n)
    coef = np.linalg.lstsq(basis, draws.T, rcond=None)[0].T  # (D, 4)
    return basis, coef.T @ coef / n_draws


@dataclass
class Instrument:
    """What the fit knows of the pixels: the calibration family's columns and their prior."""

    wave: np.ndarray  # (n,) observed vacuum wavelengths [A]
    family: np.ndarray  # (n, 7) columns of FAMILY
    prior_mean: np.ndarray  # (6,) of the proper family coefficients (all but the amplitude)
    prior_cov: np.ndarray  # (6, 6); the dust entry is replaced per E(B-V) cell
    r_band: np.ndarray  # (n,) weights of the r top hat (mean over its pixels)

    @classmethod
    def build(cls, wave: np.ndarray, n_draws: int = N_PRIOR_DRAWS) -> "Instrument":
        basis, cov = calibration_prior(wave, n_draws)
        dust = -0.4 * math.log(10) * R_V * stellar.ccm89(wave, R_V)  # d ln e / d E(B-V), the continuum part
        eps = 1e-6
        tell = -(1 - instrument.telluric(wave, eps)) / eps  # d telluric / d residual at 0
        lo, hi = TELLURIC_RESIDUAL
        family = np.column_stack([np.ones(wave.size), basis, dust, tell])
        prior_cov = np.zeros((6, 6))
        prior_cov[:4, :4] = cov
        prior_cov[4, 4] = 1.0  # placeholder: the E(B-V) cell's rms
        prior_cov[5, 5] = (hi - lo) ** 2 / 12
        r_band = ((wave >= R_TOP_HAT[0]) & (wave <= R_TOP_HAT[1])).astype(float)
        return cls(wave, family, np.array([0, 0, 0, 0, 0, (lo + hi) / 2]), prior_cov, r_band / max(r_band.sum(), 1))


# ------------------------------------------------------------------ the marginal likelihood


def gls_marginal(H: torch.Tensor, h: torch.Tensor, ywy: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor,
                 proper: torch.Tensor) -> torch.Tensor:
    """-2 ln of the likelihood of y = X b + noise marginalised over b with a Gaussian prior
    N(mean, precision^-1) on the entries marked `proper` and a flat one (density 1) on the
    rest, up to a constant: from H = X^T W X (..., p, p), h = X^T W y (..., p), ywy = y^T W y,
    mean (..., p), precision (..., p, p) (zero rows and columns on the flat entries).

        -2 ln L = y'Wy + m'Pm - g'(H + P)^-1 g + ln det(H + P) - ln det P_proper,  g = h + P m
    """
    Q = H + precision
    g = h + (precision @ mean.unsqueeze(-1)).squeeze(-1)
    L, info = torch.linalg.cholesky_ex(Q)
    if bool((info != 0).any()):
        raise ValueError("gls_marginal: H + precision is not positive definite; a template is all zero on the unmasked pixels")
    z = torch.linalg.solve_triangular(L, g.unsqueeze(-1), upper=False).squeeze(-1)
    idx = proper.nonzero().squeeze(-1)
    P_proper = precision[..., idx[:, None], idx[None, :]]
    quad_prior = (mean * (precision @ mean.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return (ywy + quad_prior - (z * z).sum(-1) + 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            - torch.logdet(P_proper))


def normal_equations(m0: torch.Tensor, mf: torch.Tensor, mg: torch.Tensor, family: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                     ext: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H (T, S, J, p, p), h (T, S, J, p)) of the columns [m0 e F_0 .. m0 e F_6, mf e, mg e]
    (p = 9) for templates m0, mf, mg (T, n), stars y, w (S, n) and extinctions e (1 or S, J, n), by
    one matrix product per block of the normal equations (float64: y'Wy - g'Q^-1 g cancels
    to ~1e-8 of y'Wy at S/N 100)."""
    T, S, J, k = m0.shape[0], y.shape[0], ext.shape[1], family.shape[1]
    v = w[:, None, :] * ext**2  # (S, J, n)
    wy = (w * y)[:, None, :] * ext  # (S, J, n)
    a, b = torch.triu_indices(k, k)
    pair = family[:, a] * family[:, b]  # (n, k(k+1)/2)

    def cols(weights, f=None):  # (S, J, n) [x (n, q)] -> (n, S J q)
        x = weights.unsqueeze(-1) if f is None else weights.unsqueeze(-1) * f
        return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1)

    def prod(m, weights, f=None):
        q = 1 if f is None else f.shape[1]
        return (m @ cols(weights, f)).reshape(T, S, J, q)

    p = k + 2
    H = torch.zeros(T, S, J, p, p, dtype=m0.dtype)
    H[..., a, b] = prod(m0 * m0, v, pair)
    H[..., b, a] = H[..., a, b]
    H[..., :k, k] = prod(m0 * mf, v, family)
    H[..., :k, k + 1] = prod(m0 * mg, v, family)
    H[..., k, :k], H[..., k + 1, :k] = H[..., :k, k], H[..., :k, k + 1]
    H[..., k, k] = prod(mf * mf, v)[..., 0]
    H[..., k + 1, k + 1] = prod(mg * mg, v)[..., 0]
    H[..., k, k + 1] = H[..., k + 1, k] = prod(mf * mg, v)[..., 0]
    h = torch.cat([prod(m0, wy, family), prod(mf, wy), prod(mg, wy)], dim=-1)
    return H, h


class StarFit:
    """Templates of one PriorGrid on one pixel grid and the per-Teff-node evidence of stars."""

    def __init__(self, wave: np.ndarray, resolving_power: float, grid: PriorGrid, max_rv_kms: float = 400.0):
        self.grid, self.resolving_power = grid, resolving_power
        self.inst = Instrument.build(wave, grid.n_draws)
        self.teff = grid.teff_nodes()
        self.ebv = ebv_cells(grid)
        pad = math.exp(max_rv_kms / stellar.C_KMS)
        self.fine = stellar.fine_grid(float(wave[0]) / pad, float(wave[-1]) * pad, stellar.lsf_sigma_lnl(resolving_power))
        self.step = float(self.fine[1] - self.fine[0])
        self.ext = np.stack([stellar.galactic_extinction(wave, e) for _, e, _ in self.ebv])  # (J, n)
        self._cells: dict = {}

    def cells(self, teff: float) -> list[dict]:
        key = (teff > 8000, teff > 5500, teff > 7500)  # draw_star depends on Teff only through these
        if key not in self._cells:
            self._cells[key] = star_cells(teff, self.grid)
        return self._cells[key]

    def fine_templates(self, teff: float) -> tuple[np.ndarray, list[dict]]:
        """(3, T, fine) float32: each cell's broadened spectrum, and the same at [Fe/H] + h_f
        and at log g + h_g (h = rms x sqrt 3, half a uniform cell's width), on self.fine."""
        cells = self.cells(teff)
        out = np.empty((3, len(cells), self.fine.size), dtype=np.float32)
        lsf = stellar.lsf_sigma_lnl(self.resolving_power)
        for i, c in enumerate(cells):
            sigma = float(np.hypot(c["vsini"] / stellar.C_KMS, lsf))
            hf, hg = c["feh_sd"] * math.sqrt(3), c["logg_sd"] * math.sqrt(3)
            for j, (g, f) in enumerate(((c["logg"], c["feh"]), (c["logg"], c["feh"] + hf), (c["logg"] + hg, c["feh"]))):
                p = stellar.StarParams(float(teff), g, f, float(np.clip(-0.3 * f, 0.0, 0.3)), c["vsini"])
                out[j, i] = stellar.broaden(stellar.stellar_fine(self.fine, p), self.step, sigma)
        return out, cells

    def shifted(self, fine: torch.Tensor, z: float) -> torch.Tensor:
        """(..., n) float64: fine templates at redshift z interpolated onto the pixels (linear, as star_spectrum)."""
        x = (np.log(self.inst.wave) - math.log1p(z) - self.fine[0]) / self.step
        i = np.clip(np.floor(x).astype(np.int64), 0, self.fine.size - 2)
        frac = torch.from_numpy(x - i)
        i = torch.from_numpy(i)
        return fine[..., i].double() * (1 - frac) + fine[..., i + 1].double() * frac

    def log_evidence(self, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray, chunk: int = 16, progress: bool = False,
                     map_ebv: np.ndarray | None = None) -> np.ndarray:
        """(stars, Teff nodes) ln p(y | Teff) marginalised over the cells, calibration, telluric
        residual and amplitude, for stars flux, ivar (S, n) at redshifts z (S,); `chunk` Teff
        nodes share each star's columns of the normal equations (memory ~ chunk x 60 MB).
        `map_ebv` (S,): each star's dust-map E(B-V), which replaces the shared E(B-V) cells by
        the star's own (map_ebv_cells)."""
        bins = np.round(np.asarray(z) * stellar.C_KMS / RV_BIN_KMS).astype(int)
        family = torch.from_numpy(self.inst.family)
        if map_ebv is None:
            ebv = [self.ebv]
            ext = torch.from_numpy(self.ext)[None]  # (1, J, n): one set of cells for every star
        else:
            rng = np.random.default_rng(self.grid.seed + 1)
            draws = np.sort([stellar.draw_ebv(rng) for _ in range(N_MAP_PRIOR_DRAWS)])
            ebv = [map_ebv_cells(float(m), draws) for m in map_ebv]
            ext = torch.from_numpy(np.stack([[stellar.galactic_extinction(self.inst.wave, e) for _, e, _ in cells] for cells in ebv]))
        log_ebv = torch.tensor([[m for m, _, _ in cells] for cells in ebv], dtype=torch.float64)  # (1 or S, J)
        ebv_sd = torch.tensor([[sd for _, _, sd in cells] for cells in ebv], dtype=torch.float64)
        out = np.empty((len(flux), self.teff.size))
        t0 = time.perf_counter()
        for start in range(0, self.teff.size, chunk):
            nodes = range(start, min(start + chunk, self.teff.size))
            parts = [self.fine_templates(float(self.teff[i])) for i in nodes]
            fine = torch.from_numpy(np.concatenate([f for f, _ in parts], axis=1))  # (3, T, fine)
            cells = [c for _, cs in parts for c in cs]
            rows = np.cumsum([0] + [len(cs) for _, cs in parts])  # node k's templates: rows[k]:rows[k + 1]
            log_cell = torch.tensor([c["log_mass"] for c in cells], dtype=torch.float64)
            sd = torch.tensor([[c["feh_sd"], c["logg_sd"]] for c in cells], dtype=torch.float64)  # (T, 2)
            step = sd * math.sqrt(3)  # the secant steps of fine_templates
            for b in np.unique(bins):
                members = np.nonzero(bins == b)[0]
                own = slice(None) if map_ebv is None else torch.from_numpy(members)  # the E(B-V) cells' rows of these stars
                m0, mf, mg = self.shifted(fine, float(b * RV_BIN_KMS / stellar.C_KMS))  # (T, n) each
                mf, mg = (mf - m0) / step[:, :1], (mg - m0) / step[:, 1:]
                y, w = torch.from_numpy(flux[members]).double(), torch.from_numpy(ivar[members]).double()
                H, h = normal_equations(m0, mf, mg, family, y, w, ext[own])
                chi2 = self._marginal(H, h, (w * y * y).sum(-1), m0, sd, ebv_sd[own], ext[own])  # (T, S, J)
                logl = (-0.5 * chi2 + log_cell[:, None, None] + log_ebv[own]).permute(1, 0, 2)  # (S, T, J)
                for k, i in enumerate(nodes):
                    out[members, i] = torch.logsumexp(logl[:, rows[k]:rows[k + 1]].reshape(len(members), -1), 1).numpy()
            if progress:
                print(f"Teff nodes {nodes[-1] + 1}/{self.teff.size} ({self.teff[nodes[-1]]:.0f} K): {time.perf_counter() - t0:.0f} s", flush=True)
        return out

    def _marginal(self, H, h, ywy, m0, sd, ebv_sd, ext) -> torch.Tensor:
        """-2 ln L (T, S, J) from the normal equations with the family's prior scaled by each
        fit's amplitude; ebv_sd (1 or S, J) the E(B-V) cells' rms, ext (1 or S, J, n) their extinction."""
        inst = self.inst
        T, S, J, p = h.shape
        amp = (h[..., 0] / H[..., 0, 0]).clamp_min(1e-30)  # (T, S, J): the template-only amplitude
        cov = torch.zeros(T, ebv_sd.shape[0], J, p - 1, p - 1, dtype=torch.float64)  # of the coefficients (c, d, r, offsets)
        cov[..., :6, :6] = torch.from_numpy(inst.prior_cov)
        cov[..., 4, 4] = ebv_sd**2
        cov[..., 6, 6] = sd[:, None, None, 0] ** 2
        cov[..., 7, 7] = sd[:, None, None, 1] ** 2
        precision = torch.zeros(T, S, J, p, p, dtype=torch.float64)  # of b = A x coefficients
        precision[..., 1:, 1:] = torch.linalg.inv(cov) / (amp * amp)[..., None, None]
        mean = torch.zeros(T, S, J, p, dtype=torch.float64)
        mean[..., 1:7] = torch.from_numpy(inst.prior_mean) * amp[..., None]
        proper = torch.arange(p) > 0
        chi2 = gls_marginal(H, h, ywy[None, :, None], mean, precision, proper)
        # flat prior on the r-band flux A' = A n, n the template's r-band mean: -2 ln n
        norm = torch.einsum("tn,sjn->tsj", m0, ext * torch.from_numpy(inst.r_band)).clamp_min(1e-30)  # (T, 1 or S, J)
        return chi2 - 2 * torch.log(norm)

    def class_posterior(self, log_evidence: np.ndarray) -> np.ndarray:
        """(stars, classes) posterior of grid.classes (equal class priors) from log_evidence (stars, nodes)."""
        prior = self.grid.class_log_prior(self.teff)  # (C, nodes)
        logp = torch.logsumexp(torch.from_numpy(log_evidence)[:, None, :] + torch.from_numpy(prior)[None], -1)
        return torch.softmax(logp, -1).numpy()


# ------------------------------------------------------------------ the bench


def sky_residual_ivar(wave: np.ndarray, ivar: np.ndarray, resolving_power: float) -> np.ndarray:
    """ivar with the variance of instrument.observe_survey's sky-subtraction residual added:
    eps x sky lines (eps ~ N(0, 0.05), N(0, 0.06) at 5577 A) + a wavelength-solution shift
    (N(0, 0.08) pixels) x their gradient, in f_lambda [1e-17 erg/s/cm^2/A]: the lines of a dark
    sky of r = SKY_R_MAG, whatever the star's magnitude. One draw of eps and of the shift serves
    every line; here each pixel gets the marginal variance alone (the correlation is dropped)."""
    from cosmofm.data_cards.mocks.spectra import _f_lambda_r

    cont, lines = instrument.sky_spectrum(wave, resolving_power)
    r_band = np.abs(wave - 6231.0) < 436.0  # observe_survey's
    scale = _f_lambda_r(instrument.SKY_R_MAG) / float(np.median(cont[r_band]))
    eps = np.where(np.abs(wave - 5578.9) < 10, 0.06, 0.05)
    shift = 0.08 * float(np.median(np.diff(wave)))
    var = scale**2 * ((eps * lines) ** 2 + (shift * np.gradient(lines, wave)) ** 2)
    return np.where(ivar > 0, ivar / (1 + ivar * var), 0.0)



def test_stars(folder: str, whole: bool = False) -> list:
    """The stars of the classify_survey test block (the last TEST_FRACTION of the labelled mocks,
    by index); `whole`: every star of the folder (a shift set of classify_survey: the test
    block's objects, in its order, observed again under a shift)."""
    from cosmofm.data_cards.io.hf_io import SampleDataset

    ds = SampleDataset(folder)
    n = len(ds)
    test = (ds[i] for i in range(0 if whole else n - round(TEST_FRACTION * n), n))
    return [s for s in test if s.meta["labels"]["spectral_class"].startswith("STAR")]


def network_recall(models: Sequence[str], stars: list, truth: np.ndarray) -> tuple[list[np.ndarray], list[dict]]:
    """Per model: whether it named each star's class, and its per-star-class recall."""
    import cosmofm
    from cosmofm.finetune.classify import predict

    right, recall = [], []
    for folder in models:
        model = cosmofm.from_pretrained(folder).eval()
        with torch.no_grad():
            named = np.array(model.class_names)[predict(model, stars, batch_size=256)["logits"].argmax(1)]
        right.append(named == truth)
        recall.append({c: float(np.mean(named[truth == c] == c)) for c in STAR_TEFF if np.any(truth == c)})
    return right, recall


def binned(correct: np.ndarray, params: dict) -> dict:
    """Recall of `correct` (stars,) in classify_star_errors' S/N and |Teff - centre| bins."""
    return {name: [{"lo": lo, "hi": hi, "n": int(m.sum()), "recall": float(correct[m].mean()) if m.any() else None}
                   for lo, hi in zip(BINS[name][:-1], BINS[name][1:]) for m in [(params[name] >= lo) & (params[name] < hi)]]
            for name in ("snr", "abs_dteff_K")}


def teff_precision(fit: StarFit, log_evidence: np.ndarray, params: dict, teff: np.ndarray) -> list[dict]:
    """Per S/N bin: rms of (posterior-mean Teff - true Teff) and the median posterior rms, the
    prior being the classes' mixture (what the spectra say of Teff, beside the class)."""
    log_prior = np.logaddexp.reduce(fit.grid.class_log_prior(fit.teff), axis=0)
    post = torch.softmax(torch.from_numpy(log_evidence + log_prior), -1).numpy()
    mean = post @ fit.teff
    sd = np.sqrt(np.clip(post @ fit.teff**2 - mean**2, 0, None))
    edges, snr = BINS["snr"], params["snr"]
    return [{"lo": lo, "hi": hi, "n": int(m.sum()), "rms_error_K": float(np.sqrt(np.mean((mean[m] - teff[m]) ** 2))) if m.any() else None,
             "median_posterior_sd_K": float(np.median(sd[m])) if m.any() else None}
            for lo, hi in zip(edges[:-1], edges[1:]) for m in [(snr >= lo) & (snr < hi)]]


def main(argv: Sequence[str] | None = None) -> dict:
    from cosmofm.bench.pretrain_throughput import machine_info
    from cosmofm.data_cards.schema import load_card

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelled", required=True, help="the bench's labelled datasets folder (WORK/labelled-sdss-like-survey-14000-seed21)")
    p.add_argument("--models", nargs="*", default=[], help="fine-tuned classifier folders to score on the same stars")
    p.add_argument("--every", type=int, default=1, help="fit every k-th star of the test block (1 = all)")
    p.add_argument("--whole", action="store_true", help="--labelled is a shift set of classify_survey: fit all its stars, not its last block")
    p.add_argument("--no-sky-variance", action="store_true",
                   help="use the spectra's ivar as they are (default: add the sky-subtraction residual's variance, sky_residual_ivar)")
    p.add_argument("--map-ebv", action="store_true",
                   help="give the fit each star's dust-map E(B-V) (meta['ebv'], the mocks' truth off by DUST_MAP_ERROR) as a prior")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--name", default="classify_star_ceiling")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    stars = test_stars(args.labelled, args.whole)[:: args.every]
    truth = np.array([s.meta["labels"]["spectral_class"] for s in stars])
    grid = PriorGrid()
    fit = StarFit(stars[0].coords["wavelength"], load_card("sdss-like-survey").resolving_power, grid)
    flux = np.stack([s.values for s in stars]).astype(np.float64)
    ivar = np.stack([s.ivar for s in stars]).astype(np.float64)
    if not args.no_sky_variance:
        ivar = sky_residual_ivar(stars[0].coords["wavelength"], ivar, fit.resolving_power)
    z = np.array([s.meta["labels"]["redshift"] for s in stars])
    map_ebv = None
    if args.map_ebv:
        if any("ebv" not in s.meta for s in stars):
            raise SystemExit(f"--map-ebv: the spectra of {args.labelled} carry no meta['ebv']; regenerate them (classify_survey with a fresh --work)")
        map_ebv = np.array([s.meta["ebv"] for s in stars], dtype=float)
    log_ev = fit.log_evidence(flux, ivar, z, progress=True, map_ebv=map_ebv)
    post = fit.class_posterior(log_ev)
    fit_seconds = time.perf_counter() - t0
    named = np.array(grid.classes)[post.argmax(1)]
    correct = named == truth
    params = star_parameters(stars)
    ceiling = {c: float(np.mean(correct[truth == c])) for c in grid.classes if np.any(truth == c)}
    report = {"machine": machine_info(), "labelled": args.labelled, "whole": args.whole, "n_stars": len(stars), "every": args.every,
              "fit_seconds": fit_seconds, "grid": {"teff_nodes": int(fit.teff.size), "teff_step_K": grid.teff_step,
                                                   "teff_half_range_K": grid.teff_half_range, "feh_edges": list(grid.feh_edges),
                                                   "ebv_edges": list(grid.ebv_edges) if map_ebv is None else f"per star: {MAP_EBV_CELLS} cells of its map posterior (DUST_MAP_ERROR {DUST_MAP_ERROR})",
                                                   "logg_edges": {str(k): v for k, v in grid.logg_edges.items()},
                                                   "rv_bin_kms": RV_BIN_KMS, "class_prior": "equal", "redshift": "known (labels)",
                                                   "sky_residual": "ivar as given" if args.no_sky_variance else "variance added per pixel (sky_residual_ivar)"},
              "ceiling": {"per_class_recall": ceiling, "macro_recall": float(np.mean(list(ceiling.values()))),
                          "star_recall": float(correct.mean()), "by": binned(correct.astype(float), params),
                          "teff_by_snr": teff_precision(fit, log_ev, params, np.array([st.meta["truth"]["params"]["teff"] for st in stars])),
                          "mean_true_class_posterior": float(np.mean(post[np.arange(len(stars)), [grid.classes.index(c) for c in truth]]))}}
    if args.models:
        right, recall = network_recall(args.models, stars, truth)
        share = np.mean(right, axis=0)
        per_class = {c: [float(np.mean([r[c] for r in recall])), float(np.std([r[c] for r in recall]))] for c in ceiling}
        report["network"] = {"models": args.models, "per_class_recall": per_class,
                             "macro_recall": [float(np.mean([np.mean(list(r.values())) for r in recall])),
                                              float(np.std([np.mean(list(r.values())) for r in recall]))],
                             "star_recall": float(share.mean()), "by": binned(share, params)}
    report["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    net = report.get("network", {}).get("per_class_recall", {})
    print(f"{'class':10s} ceiling  network")
    for c, r in ceiling.items():
        print(f"{c:10s} {r:.3f}    " + (f"{net[c][0]:.3f} +- {net[c][1]:.3f}" if c in net else "-"))
    print(f"macro      {report['ceiling']['macro_recall']:.3f}    " + (f"{report['network']['macro_recall'][0]:.3f}" if net else "-"))
    for name in ("snr", "abs_dteff_K"):
        print(name, [(b["lo"], b["hi"], b["n"], None if b["recall"] is None else round(b["recall"], 3)) for b in report["ceiling"]["by"][name]])
    print("Teff by S/N", [(b["lo"], b["hi"], b["rms_error_K"] and round(b["rms_error_K"]), b["median_posterior_sd_K"] and round(b["median_posterior_sd_K"]))
                          for b in report["ceiling"]["teff_by_snr"]])
    print(f"{len(stars)} stars in {report['seconds']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
