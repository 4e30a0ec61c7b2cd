"""A classical spectral classifier with templates the mock generator did not make (issue 17).

Three family fits, as SDSS's spec1d (Bolton et al. 2012, AJ 144, 144), redrock (Bailey et
al., in prep.) and pPXF (Cappellari 2017, MNRAS 466, 798) do them, on the log10(lambda)
lattice of heads/template_fit.py (`to_log_grid`, `DELTA`); templates in heads/classical_templates.py:

1. stars: chi-square over the Teff x log g x [Fe/H] grid times a free multiplicative Legendre
   polynomial (pPXF's `mdegree`: flux-calibration error and reddening), first over the whole
   grid on every 4th pixel, then a radial-velocity scan (+-500 km/s) of its best model, then
   every model near that Teff at every pixel and that velocity. Teff is the minimum of the
   profile chi2(Teff) (best over log g, [Fe/H]) through a parabola; the class is the STAR_TEFF
   class of nearest centre (boundaries at the midpoints).
2. galaxies: a redshift scan over 0 < z < 1 on 2-pixel bins with the leading principal
   components of the BC03-MILES SSPs, nebular-line components and an additive polynomial
   (redrock's scan; normal equations at all shifts as FFT cross-correlations, as
   TemplateFitter._scan), refined at native pixels around its best minima; there a
   non-negative fit (NNLS, Lawson & Hanson 1974) of all SSPs and lines times a multiplicative
   polynomial picks the redshift; Gaussian fits of Halpha, [NII], Hbeta, [OIII], [OII] on the
   continuum-subtracted residual give the subclass by the SDSS rules: no significant Halpha
   -> GALAXY; above Kewley et al. 2001 in the [NII] BPT diagram (or, [OIII] undetected,
   log [NII]/Halpha > N2_AGN) -> AGN; else EW(Halpha) > EW_STARBURST -> STARBURST (Brinchmann
   et al. 2004; Bolton et al. 2012), otherwise STARFORMING.
3. QSOs: the same scan over 0.3 < z < 4 with the power-law + broad-line basis; at the best z
   the broad-line FWHM on a grid; QSO_BROADLINE when FWHM > QSO_FWHM_SPLIT_KMS (3000 km/s,
   between the narrow class's 2400 and the broad one's 3500).
4. the family of lowest chi-square wins, after a redrock-like preference (FAMILY_PENALTY,
   delta chi2 per good pixel) tuned on 400 validation mocks (sdss-like-survey, seed 5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import stellar
from cosmofm.data_cards.mocks.spectra import STAR_TEFF
from cosmofm.heads import classical_templates as ct
from cosmofm.heads.classical_templates import ScanTransforms, nnls_calibrated, parabola_min, scan_chi2, shifted, solve_chi2
from cosmofm.heads.template_fit import DELTA, legendre_rows, to_log_grid

Z_GALAXY = (0.0, 1.0)
Z_QSO = (0.3, 4.0)
RV_MAX_KMS = 500.0
STAR_STRIDE = 4  # pixels: the whole-grid first pass uses every 4th (the minimum's neighbourhood, at a quarter of the cost)
STAR_TEFF_WINDOW = 6  # Teff grid steps either side of the first pass's best, refitted at every pixel
SCAN_BIN = 2  # native pixels per bin of the redshift scans (138 km/s); refined at native pixels after
N_SCAN_MINIMA = 4  # minima of the binned scan refined at native pixels
N_SSP_COMPONENTS = 5  # principal components of the SSPs in the galaxy scan
SCAN_DEGREE = 5  # additive Legendre degree of the redshift scans: it stands in for the calibration error there
POLY_DEGREE = 2  # additive Legendre degree of the galaxy and QSO fits (redrock uses 2)
MULT_DEGREE = 4  # multiplicative Legendre degree of the galaxy and QSO final fits, as the stars'
STAR_POLY_DEGREE = 4  # multiplicative Legendre degree of the star fit: the calibration error has orders 1-4; on 221 validation stars (3 x 3 log g x [Fe/H] grid) degree 1/2/3/4/5/6/8 classified 0.56/0.68/0.77/0.81/0.81/0.80/0.78
QSO_FWHM_GRID = np.geomspace(1000.0, 10000.0, 11)  # km/s
QSO_FWHM_SPLIT_KMS = 3000.0
LINE_SIGMA_GRID = (50.0, 80.0, 120.0, 180.0, 260.0)  # km/s, gas velocity dispersions tried in the line fit
LINE_SNR = 3.0  # a line counts as detected at this S/N (Brinchmann et al. 2004 use 3)
EW_DETECT = 3.0  # A, rest EW(Halpha) below which a galaxy shows "no significant lines" (tuned: quiescent mocks reach 3 A)
EW_STARBURST = 40.0  # A, observed (dust-attenuated) rest EW(Halpha); SDSS uses 50 (tuned on seed-5 mocks: galaxy subclass accuracy 0.92 at 50, 0.96 at 40)
N2_AGN = -0.1  # log [NII]/Halpha above which a galaxy with undetected [OIII] is AGN (tuned; Kewley et al. 2006 use -0.2)
# delta chi2 per good pixel added to each family's chi2 before the minimum (tuned, seed-5 mocks)
FAMILY_PENALTY = {"STAR": 0.0, "GALAXY": 0.0, "QSO": 0.005}
LINES = {"Halpha": ((6564.61, 1.0),), "[NII]": ((6585.27, 1.0), (6549.86, 1 / 3.05)), "Hbeta": ((4862.68, 1.0),),
         "[OIII]": ((5008.24, 1.0), (4960.30, 1 / 2.98)), "[OII]": ((3727.09, 1.0), (3729.88, 1.3))}


@dataclass
class ClassicalFit:
    spectral_class: str
    z: float
    chi2: dict[str, float]  # best chi-square per family (STAR, GALAXY, QSO)
    details: dict = field(default_factory=dict)  # per family: Teff/log g/[Fe/H]/RV, line fluxes and EWs, FWHM, ...


class ClassicalClassifier:
    """Star / galaxy / QSO template fits and SDSS-style subclasses (module docstring).

    Args:
        resolving_power (`float`, 2000): the data's R, to which the stellar grid is broadened.
        star_poly_degree (`int`, STAR_POLY_DEGREE): degree of the stars' multiplicative Legendre polynomial.
    """

    def __init__(self, resolving_power: float = 2000.0, star_poly_degree: int = STAR_POLY_DEGREE, family_penalty: dict | None = None):
        self.resolving_power = float(resolving_power)
        self.star_poly_degree = int(star_poly_degree)
        self.family_penalty = dict(FAMILY_PENALTY if family_penalty is None else family_penalty)
        self.lsf = stellar.lsf_sigma_lnl(self.resolving_power)
        self.stars = ct.star_grid(self.resolving_power)
        ssps = ct.bc03_ssps()
        self.ssp_first, self.ssps = ssps.first, ssps.flux
        _, gal_wave = ct.rest_lattice(*ct.GALAXY_REST_RANGE)
        self.emission = ct.galaxy_emission(gal_wave, 80.0, self.lsf)
        _, _, vt = np.linalg.svd(self.ssps, full_matrices=False)
        self.galaxy_scan = ScanTransforms(np.vstack([vt[:N_SSP_COMPONENTS], self.emission]), SCAN_BIN)
        self.qso_first, qso_basis, _ = ct.qso_scan_basis(4000.0, self.resolving_power)
        self.qso_scan = ScanTransforms(qso_basis, SCAN_BIN)

    # ------------------------------------------------------------------ entry point
    def classify(self, wave, flux, ivar) -> ClassicalFit:
        wave, flux, ivar = _check(wave, flux, ivar)
        log0, f, w = to_log_grid(wave, np.where(ivar > 0, flux, 0.0), ivar)
        o0 = int(np.round(log0 / DELTA))
        fwf = float(np.sum(w * f * f))
        star = self._fit_star(o0, f, w, fwf)
        galaxy = self._fit_galaxy(o0, f, w, fwf)
        qso = self._fit_qso(o0, f, w, fwf)
        chi2 = {"STAR": star["chi2"], "GALAXY": galaxy["chi2"], "QSO": qso["chi2"]}
        n_good = int(np.sum(w > 0))
        score = {k: v + self.family_penalty[k] * n_good for k, v in chi2.items()}
        family = min(score, key=score.get)
        best = {"STAR": star, "GALAXY": galaxy, "QSO": qso}[family]
        details = {"STAR": star, "GALAXY": galaxy, "QSO": qso, "n_good": n_good}
        return ClassicalFit(best["class"], float(best["z"]), chi2, details)

    # ------------------------------------------------------------------ stars
    def _star_chi2(self, start: int, f, w, fwf, poly, rows=None, stride: int = 1) -> np.ndarray:
        """chi2 (G,) of every grid model (or `rows`) times a free polynomial, at template offset
        `start`; with `stride`, on every stride-th pixel (f, w, poly given so already)."""
        models = self.stars.flux if rows is None else self.stars.flux[rows]
        t = shifted(models, start, f.size * stride - stride + 1, stride)  # (G, n)
        p = poly.shape[0]
        pairs = [(q, r) for q in range(p) for r in range(q, p)]
        a_pairs = (t * t) @ np.array([w * poly[q] * poly[r] for q, r in pairs]).T  # (G, pairs)
        b = t @ (poly * (w * f)).T  # (G, P)
        a = np.empty((len(t), p, p))
        for c, (q, r) in enumerate(pairs):
            a[:, q, r] = a[:, r, q] = a_pairs[:, c]
        a += np.eye(p) * 1e-10 * np.trace(a, axis1=1, axis2=2)[:, None, None]
        coef = np.linalg.solve(a, b[..., None])[..., 0]
        return fwf - np.einsum("gp,gp->g", b, coef)

    def _fit_star(self, o0, f, w, fwf) -> dict:
        poly = legendre_rows(f.size, self.star_poly_degree)
        off = o0 - self.stars.first
        params = self.stars.params
        teffs = np.unique(params[:, 0])
        # 1. the whole grid on every STAR_STRIDE-th pixel at z = 0: where the minimum lies
        st = STAR_STRIDE
        coarse = self._star_chi2(off, f[::st], w[::st], float(np.sum((w * f * f)[::st])), poly[:, ::st], stride=st)
        g = int(np.argmin(coarse))
        # 2. the radial velocity (+-RV_MAX_KMS) of that model, at native pixels
        k_max = int(np.ceil(np.log10(1 + RV_MAX_KMS / ct.C_KMS) / DELTA))
        shifts = np.arange(-k_max, k_max + 1)
        rv_chi2 = np.array([self._star_chi2(off - k, f, w, fwf, poly, rows=[g])[0] for k in shifts])
        i = int(np.argmin(rv_chi2))
        k = parabola_min(shifts.astype(float), rv_chi2, i)
        # 3. all log g and [Fe/H] within STAR_TEFF_WINDOW grid steps of its Teff, at native pixels and that velocity
        j0 = int(np.searchsorted(teffs, params[g, 0]))
        near = teffs[max(j0 - STAR_TEFF_WINDOW, 0):j0 + STAR_TEFF_WINDOW + 1]
        rows = np.flatnonzero(np.isin(params[:, 0], near))
        chi2 = self._star_chi2(off - int(shifts[i]), f, w, fwf, poly, rows=rows)
        profile = np.array([chi2[params[rows, 0] == t].min() for t in near])
        j = int(np.argmin(profile))
        teff = float(np.clip(parabola_min(near, profile, j), near[max(j - 1, 0)], near[min(j + 1, len(near) - 1)]))
        g = int(rows[np.argmin(chi2)])
        cls = min(STAR_TEFF, key=lambda c: abs(STAR_TEFF[c] - teff))
        z = 10 ** (k * DELTA) - 1
        return {"class": cls, "z": z, "chi2": float(chi2.min()), "teff": teff, "logg": float(params[g, 1]), "feh": float(params[g, 2]),
                "rv_kms": float(z * ct.C_KMS)}

    # ------------------------------------------------------------------ redshift scans
    def _redshift(self, o0, f, w, fwf, first, scan: ScanTransforms, z_range, degree: int = POLY_DEGREE) -> list[tuple[int, float]]:
        """Candidate shifts [(integer shift, parabola-refined shift)] of the linear model basis +
        an additive Legendre polynomial of `degree`: a binned FFT scan, then native-pixel chi2 around its N_SCAN_MINIMA best
        minima. The least-squares scan lets line amplitudes go negative, so the caller picks
        among the candidates with a non-negative fit (a wrong redshift where an "emission"
        component fits an absorption feature then loses)."""
        n, b = f.size, SCAN_BIN
        off = o0 - first
        phase = off % b
        basis = scan.basis
        n_b = n // b
        wb = w[:n_b * b].reshape(n_b, b).sum(1)
        wfb = (w * f)[:n_b * b].reshape(n_b, b).sum(1)
        fwf_b = float(np.sum(np.where(wb > 0, wfb**2 / np.where(wb > 0, wb, 1.0), 0.0)))
        lo, hi = (np.log10(1 + z) / (b * DELTA) for z in z_range)
        shifts = np.arange(int(np.floor(lo)), int(np.ceil(hi)) + 1)
        chi2_b = scan_chi2(wb, wfb, fwf_b, scan, phase, legendre_rows(n_b, degree), (off - phase) // b, shifts)
        minima = [i for i in range(len(shifts)) if (i == 0 or chi2_b[i] <= chi2_b[i - 1]) and (i == len(shifts) - 1 or chi2_b[i] <= chi2_b[i + 1])]
        minima = sorted(minima, key=lambda i: chi2_b[i])[:N_SCAN_MINIMA]
        poly = legendre_rows(n, degree)
        out = []
        for i in minima:
            ks = np.arange(shifts[i] * b - b, shifts[i] * b + b + 1)
            c2 = np.array([solve_chi2(np.vstack([shifted(basis, off - k, n), poly]), w, f, fwf)[0] for k in ks])
            j = int(np.argmin(c2))
            out.append((int(ks[j]), parabola_min(ks.astype(float), c2, j)))
        return out

    # ------------------------------------------------------------------ galaxies
    def _galaxy_nnls(self, o0, f, w, k, rounds: int = 2) -> tuple[float, np.ndarray, np.ndarray]:
        """(chi2, model, continuum) of the non-negative SSP + line fit with a free quadratic, times
        a multiplicative polynomial, at shift k."""
        n = f.size
        off = o0 - self.ssp_first
        ssp = shifted(self.ssps, off - k, n)
        lines = shifted(self.emission, off - k, n)
        poly = legendre_rows(n, POLY_DEGREE)
        x = np.vstack([ssp, lines, poly])
        chi2, coef, mult = nnls_calibrated(x, len(poly), f, w, MULT_DEGREE, rounds)
        model = mult * (coef @ x)
        continuum = model - mult * (coef[len(ssp):len(ssp) + len(lines)] @ lines)
        return chi2, model, continuum

    def _fit_galaxy(self, o0, f, w, fwf) -> dict:
        cands = self._redshift(o0, f, w, fwf, self.ssp_first, self.galaxy_scan, Z_GALAXY, SCAN_DEGREE)
        i = int(np.argmin([self._galaxy_nnls(o0, f, w, k, rounds=1)[0] for k, _ in cands]))  # one alternation to choose
        chi2, _, continuum = self._galaxy_nnls(o0, f, w, cands[i][0])
        z = float(10 ** (cands[i][1] * DELTA) - 1)
        wave = 10 ** ((o0 + np.arange(f.size)) * DELTA)
        measured = self._measure_lines(wave, f - continuum, w, continuum, z)
        return {"class": galaxy_subclass(measured), "z": z, "chi2": chi2, "lines": measured}

    def _measure_lines(self, wave, resid, w, continuum, z) -> dict:
        """Flux, error and rest EW [A] of each of LINES on the continuum-subtracted residual:
        Gaussians of one common gas sigma (the best of LINE_SIGMA_GRID), fitted linearly."""
        rest = wave / (1 + z)
        names = [name for name, group in LINES.items() if rest[0] + 20 < group[0][0] < rest[-1] - 20]
        near = np.zeros(wave.size, bool)
        for name in names:
            for centre, _ in LINES[name]:
                near |= np.abs(rest - centre) < 40.0
        out = {}
        if not names or not np.any(w[near] > 0):
            return out
        rw, rr = w[near], resid[near]
        best = None
        for sigma in LINE_SIGMA_GRID:
            x = np.array([ct.gaussian_lines(rest[near], LINES[name], sigma, self.lsf) / (1 + z) for name in names])  # per observed A
            a = (x * rw) @ x.T + np.eye(len(x)) * 1e-12
            coef = np.linalg.solve(a, x @ (rw * rr))
            chi2 = float(np.sum(rw * (rr - coef @ x) ** 2))
            if best is None or chi2 < best[0]:
                best = (chi2, coef, np.sqrt(np.clip(np.diag(np.linalg.inv(a)), 0, None)), sigma)
        _, coef, err, sigma = best
        for name, flux, flux_err in zip(names, coef, err):
            centre = LINES[name][0][0] * (1 + z)
            window = (np.abs(wave - centre) < 30.0) & (w > 0)
            cont = float(np.median(continuum[window])) if window.any() else np.nan
            out[name] = {"flux": float(flux), "err": float(flux_err), "ew": float(flux / cont / (1 + z)) if cont > 0 else np.nan}
        out["sigma_kms"] = float(sigma)
        return out

    # ------------------------------------------------------------------ QSOs
    def _qso_model(self, o0, f, w, k, fwhm, non_negative: bool, rounds: int = 2) -> float:
        """chi2 of the QSO basis with broad lines of `fwhm` + quadratic at shift k; with
        `non_negative`, power law and lines >= 0 (NNLS), forest step and polynomial free."""
        n = f.size
        rest = 10 ** ((o0 + np.arange(n) - k) * DELTA)
        basis, _ = ct.qso_basis(rest, fwhm, self.lsf)
        poly = legendre_rows(n, POLY_DEGREE)
        if not non_negative:
            return solve_chi2(np.vstack([basis, poly]), w, f, float(np.sum(w * f * f)))[0]
        # power law and lines >= 0; the forest step and the polynomial free
        x = np.vstack([basis[:1], basis[2:], basis[1:2], poly])
        return nnls_calibrated(x, 1 + len(poly), f, w, MULT_DEGREE, rounds)[0]

    def _fit_qso(self, o0, f, w, fwf) -> dict:
        cands = self._redshift(o0, f, w, fwf, self.qso_first, self.qso_scan, Z_QSO, SCAN_DEGREE)
        scan_fwhm = 4000.0
        chi2s = [self._qso_model(o0, f, w, k, scan_fwhm, True, rounds=1) for k, _ in cands]
        i = int(np.argmin(chi2s))
        k, k_frac = cands[i]
        grid = np.array([self._qso_model(o0, f, w, k, fwhm, False) for fwhm in QSO_FWHM_GRID])
        j = int(np.argmin(grid))
        fwhm = float(np.exp(parabola_min(np.log(QSO_FWHM_GRID), grid, j)))
        chi2 = self._qso_model(o0, f, w, k, QSO_FWHM_GRID[j], True)
        z = float(10 ** (k_frac * DELTA) - 1)
        return {"class": "QSO_BROADLINE" if fwhm > QSO_FWHM_SPLIT_KMS else "QSO", "z": z, "chi2": chi2, "fwhm_kms": fwhm}


def kewley01(log_n2ha):
    """Maximum-starburst line of the [NII] BPT diagram (Kewley et al. 2001, ApJ 556, 121): AGN above it."""
    return 0.61 / (log_n2ha - 0.47) + 1.19


def galaxy_subclass(lines: dict) -> str:
    """SDSS-style galaxy subclass from measured lines (module docstring, rules of item 2)."""
    def snr(name):
        return lines[name]["flux"] / lines[name]["err"] if name in lines and lines[name]["err"] > 0 else 0.0

    if "Halpha" in lines:
        strength, ew = snr("Halpha"), lines["Halpha"]["ew"]
    elif "Hbeta" in lines:  # Halpha redshifted out: Hbeta x the Case-B decrement (flat f_lambda continuum) as its proxy
        strength, ew = snr("Hbeta"), 2.86 * lines["Hbeta"]["ew"]
    else:
        return "GALAXY"
    if not (strength >= LINE_SNR and np.isfinite(ew) and ew >= EW_DETECT):
        return "GALAXY"
    if "Halpha" in lines and "[NII]" in lines:
        floor = lambda name: max(lines[name]["flux"], lines[name]["err"], 1e-30)  # noqa: E731  (1-sigma upper limits)
        x = np.log10(floor("[NII]") / floor("Halpha"))
        if "[OIII]" in lines and "Hbeta" in lines and snr("[OIII]") >= LINE_SNR:
            # [OIII] detected: with Hbeta undetected its 1-sigma limit makes y a lower limit
            if x >= 0.47 or np.log10(floor("[OIII]") / floor("Hbeta")) > kewley01(x):
                return "GALAXY_AGN"
        elif x > N2_AGN:  # [OIII] undetected: the [NII]/Halpha ratio alone (Kewley et al. 2006's N2 limit)
            return "GALAXY_AGN"
    return "GALAXY_STARBURST" if ew > EW_STARBURST else "GALAXY_STARFORMING"


def _check(wave, flux, ivar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wave, flux, ivar = (np.asarray(a, dtype=float) for a in (wave, flux, ivar))
    if wave.ndim != 1 or flux.shape != wave.shape or ivar.shape != wave.shape or wave.size < 200:
        raise InputError("wave/flux/ivar", f"shapes {wave.shape}, {flux.shape}, {ivar.shape}", "give three 1-D arrays of one length (>= 200 pixels)")
    if not (np.all(np.isfinite(wave)) and np.all(np.diff(wave) > 0) and wave[0] > 0):
        raise InputError("wave", "must be finite, positive and increasing", "pass the spectrum's wavelengths in Angstrom, ascending")
    if not np.all(np.isfinite(ivar)) or np.any(ivar < 0):
        raise InputError("ivar", "has NaN, inf or negative values", "set masked pixels to ivar = 0")
    if not np.all(np.isfinite(flux[ivar > 0])):
        raise InputError("flux", "has NaN or inf where ivar > 0", "mask those pixels with ivar = 0")
    if np.sum(ivar > 0) < 100:
        raise InputError("ivar", f"only {int(np.sum(ivar > 0))} usable pixels", "a spectrum needs >= 100 pixels with ivar > 0")
    return wave, flux, ivar


# ---------------------------------------------------------------------- batches
_WORKER: ClassicalClassifier | None = None


def _init_worker(resolving_power: float, star_poly_degree: int) -> None:
    global _WORKER
    _WORKER = ClassicalClassifier(resolving_power, star_poly_degree)


def _classify_one(args) -> tuple[str, float, float]:
    t0 = time.process_time()
    fit = _WORKER.classify(*args)
    return fit.spectral_class, fit.z, time.process_time() - t0


def classify_samples(samples, workers: int = 1, progress: bool = True, resolving_power: float = 2000.0,
                     star_poly_degree: int = STAR_POLY_DEGREE) -> dict:
    """Classes and redshifts of spectrum Samples: {"classes" (N,) str, "z" (N,), "spectra_per_s"
    (wall clock, template loading included), "spectra_per_cpu_s" (per CPU-second of the fits, a
    one-core speed that other load on the machine does not change)}; `workers` > 1 runs a process pool."""
    import sys
    from functools import partial

    from cosmofm.data_cards.workers import in_parallel

    if workers < 1:
        raise InputError("workers", f"must be >= 1, got {workers}", "e.g. 2")
    jobs = [(s.coords["wavelength"], s.values, s.ivar) for s in samples]
    t0 = time.perf_counter()
    out = []
    if workers == 1:  # in this process: the worker initializer runs in worker processes only
        _init_worker(resolving_power, star_poly_degree)
    results = in_parallel(_classify_one, jobs, workers, processes=True, picklable=True, chunksize=8,
                          initializer=partial(_init_worker, resolving_power, star_poly_degree))
    for i, r in enumerate(results):
        out.append(r)
        if progress and (i + 1) % 100 == 0:
            print(f"classical: {i + 1}/{len(jobs)} spectra, {(i + 1) / (time.perf_counter() - t0):.1f}/s", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    return {"classes": np.array([c for c, _, _ in out]), "z": np.array([z for _, z, _ in out]), "spectra_per_s": len(jobs) / max(elapsed, 1e-9),
            "spectra_per_cpu_s": len(jobs) / max(sum(t for _, _, t in out), 1e-9)}
