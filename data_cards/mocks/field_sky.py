"""The sky of a mock field: galaxies from an evolving luminosity function, Galactic stars,
and clustered positions, down to any magnitude limit.

The stamp mocks (mocks/images.py) show objects of a 16.5 <= r <= 20.5 window; a survey
field shows everything to its depth, so this module draws a whole population per area:

- **Galaxies**: the red and blue Schechter luminosity functions of mocks/luminosity.py
  (Herbel et al. 2017, JCAP 08, 035: M*_B(z) and phi*(z) evolving, alpha = -0.5 / -1.3),
  integrated over dV/dz (Planck18) for 0.02 < z < 3 and M_B < -12. Apparent magnitudes are
  M_B + DM(z) - 2.5 log10(1 + z) - 2.5 log10(F_b(z)): F_b is the mean f_nu of the galaxy's
  rest-frame SED, stretched by (1 + z), through the card's real filter curves, over its
  mean f_nu through rest-frame Bessell B -- the exact K-correction of the mocks' own SEDs
  (`spectra.rest_model`: CWW E / Im continua, absorption, dust, nebular lines), with the
  Lyman-alpha / beta forest and the Lyman limit of the IGM (Madau 1995, ApJ 441, 18, its
  leading terms). Each galaxy's SED is a random mix of two of `N_TEMPLATES` drawn
  templates of its population (red: passive; blue: 80 % star-forming, 20 % starburst), so
  colours are continuous; fluxes are linear in the mix, so they stay exact. Sampling is
  exact: (z, M_B) are drawn from the LF down to the faintest M_B any template could show
  at the limit, then thinned by each galaxy's own apparent magnitude. Sizes follow the
  size-luminosity relation of the stamp mocks (`images.galaxy_morphology`, Shen et al.
  2003 with (1+z) evolution) from each galaxy's rest-frame SDSS r, so faint galaxies are
  mostly small and distant. The linear M*(z) evolution is extrapolated beyond z ~ 1, where
  Herbel et al. constrain it; QSOs are left out (< 1 % of faint counts).
- **Stars**: point sources with cumulative counts N(< m) = STAR_DENSITY_24 x 10^(STAR_SLOPE
  (m - 24)) per arcmin^2 in the reference band: a shallow slope, as high-latitude counts
  are dominated by the halo at faint magnitudes (d log N / dm ~ 0.1-0.2 in the Besancon
  model, Robin et al. 2003, A&A 409, 523), normalised to ~1 star per arcmin^2 at r < 24
  (of the order of high-latitude HSC / SDSS counts; an approximation, settable). Colours
  are the parametric stellar spectra of mocks/stellar.py for halo turn-off stars (half)
  and K / M dwarfs (half), reddened by a fixed E(B-V) = 0.03.
- **Clustering**: galaxy positions are a Thomas process (a fraction `fraction` of the
  galaxies sit in Gaussian clumps of width `scale_arcsec` around Poisson parents, the rest
  are Poisson), with the clump occupancy chosen so that the mean excess of neighbours
  within `match_within` arcsec matches the angular correlation function w(theta) =
  w_1arcsec (theta / 1")^-0.8 (default w(1") = 0.7, i.e. A_w(1 deg) ~ 1e-3 for faint
  galaxies, the order of Brainerd, Smail & Mould 1995, MNRAS 275, 781): pair counts within
  5" exceed Poisson by ~32 %. Clumps are physical groups: their members share nearly one
  redshift (`clustered_positions(..., redshift=)`), so close pairs are mostly physical
  pairs with similar colours; stars are Poisson.

Everything is drawn from one numpy Generator, so a population is deterministic given it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks import luminosity, stellar
from cosmofm.data_cards.mocks.common import ARCSEC_PER_RAD, NJY_AB_ZP, distance_tables, filter_weights
from cosmofm.data_cards.mocks.images import MORPHOLOGY, Source, card_model, galaxy_morphology, psf_profile
from cosmofm.data_cards.mocks.spectra import R_BAND, ObjectParams, draw_object, rest_model
from cosmofm.data_cards.schema import ImageCard

GALAXY_Z = (0.02, 3.0)  # redshift range of field galaxies
M_FAINT = -12.0  # faintest absolute B magnitude drawn (dwarfs below it are below the LFs' fits)
N_TEMPLATES = 8  # SED templates per population
TEMPLATE_SEED = 20170  # the templates are part of the model, the same for every field
POPULATIONS = {"red": (luminosity.RED, ("GALAXY",) * N_TEMPLATES),
               "blue": (luminosity.BLUE, ("GALAXY_STARFORMING",) * (N_TEMPLATES - 2) + ("GALAXY_STARBURST",) * 2)}
STAR_DENSITY_24 = 1.0  # stars per arcmin^2 brighter than 24 in the reference band
STAR_SLOPE = 0.12  # d log10 N / dm of the star counts
STAR_BRIGHT = 16.0  # brightest star drawn (brighter ones saturate a deep survey)
STAR_EBV = 0.03
_Z = np.linspace(*GALAXY_Z, 300)


@dataclass(frozen=True)
class Clustering:
    """Thomas-process clustering matched to w(theta) = w_1arcsec (theta / 1 arcsec)^-slope."""

    w_1arcsec: float = 0.7
    slope: float = 0.8
    scale_arcsec: float = 2.5  # Gaussian sigma of a clump
    fraction: float = 0.5  # of the galaxies in clumps
    match_within: float = 5.0  # arcsec: the mean excess of neighbours inside this radius is matched

    def __post_init__(self):
        for name in ("w_1arcsec", "scale_arcsec", "match_within"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise InputError(f"clustering.{name}", f"must be a positive number, got {getattr(self, name)!r}", "e.g. Clustering()")
        if not 0 < self.slope < 2:
            raise InputError("clustering.slope", f"must be in (0, 2), got {self.slope!r}", "the usual value is 0.8")
        if not 0 < self.fraction <= 1:
            raise InputError("clustering.fraction", f"must be in (0, 1], got {self.fraction!r}", "e.g. 0.5")

    def w(self, theta):
        """The target angular correlation function at theta [arcsec]."""
        return self.w_1arcsec * np.asarray(theta, dtype=float) ** -self.slope

    def mean_excess(self) -> float:
        """Mean of w over the disc of radius match_within: neighbours there / Poisson - 1."""
        r = self.match_within
        return 2 * self.w_1arcsec * r**-self.slope / (2 - self.slope)

    def occupancy(self, density: float) -> float:
        """Mean galaxies per clump at `density` [per arcsec^2] that matches `mean_excess`:
        a Thomas process has w(theta) = f nu exp(-theta^2 / 4 s^2) / (4 pi s^2 n)."""
        s, r = self.scale_arcsec, self.match_within
        amplitude = self.mean_excess() * r**2 / (4 * s**2 * (1 - np.exp(-(r**2) / (4 * s**2))))
        return amplitude * 4 * np.pi * s**2 * density / self.fraction


def igm_transmission(wave_obs: np.ndarray, z: float) -> np.ndarray:
    """Mean IGM transmission (Madau 1995 Lyman-alpha and -beta terms; none below 912 A rest)."""
    rest = wave_obs / (1 + z)
    tau = np.where(rest < 1215.67, 0.0036 * (wave_obs / 1215.67) ** 3.46, 0.0)
    tau += np.where(rest < 1025.72, 0.0017 * (wave_obs / 1025.72) ** 3.46, 0.0)
    return np.where(rest < 911.75, 0.0, np.exp(-tau))


def _f_nu(sed_lambda: np.ndarray, wave: np.ndarray) -> np.ndarray:
    return sed_lambda * wave**2


class FieldSky:
    """A card's sky model, tabulated once (`field_sky(card)`): template colours on a z grid."""

    def __init__(self, card: ImageCard):
        model = card_model(card)
        self.card = card
        self.bands = list(model.band_names)
        self.ref = int(np.argmin([abs(w - R_BAND) for w in model.wavelengths]))
        wave, weights = filter_weights(model.filters, model.wavelengths)
        rest_wave, rest_weights = filter_weights(("bessell-B", "sdss2010-r"))
        rest = np.exp(np.arange(np.log(wave[0] / (1 + GALAXY_Z[1])) - 0.01, np.log(max(wave[-1], rest_wave[-1])) + 0.01, 5e-4))
        rng = np.random.default_rng(TEMPLATE_SEED)
        self.tables = {}
        for pop, (lf, classes) in POPULATIONS.items():
            flux, old, r_over_b, cls = [], [], [], []
            for c in classes:
                obj = draw_object(rng, c)
                params = {**obj.params}
                seds = [rest_model(ObjectParams(c, 0.0, params), rest, 500.0),
                        rest_model(ObjectParams(c, 0.0, {**params, "young_fraction": 0.0, "halpha_ew": 0.0}), rest, 500.0)]
                fnu = [_f_nu(s, rest) for s in seds]
                b_rest = [float(rest_weights[0] @ np.interp(rest_wave, rest, f)) for f in fnu]
                r_over_b.append(float(rest_weights[1] @ np.interp(rest_wave, rest, fnu[0])) / b_rest[0])
                # F_b(z): observed mean f_nu of the stretched SED over its rest-frame B mean
                tab = [np.stack([weights @ (np.interp(wave / (1 + z), rest, f) * igm_transmission(wave, z)) for z in _Z], axis=-1) / b_rest[0]
                       for f in fnu]
                flux.append(tab[0])
                old.append(tab[1])
                cls.append(c)
            self.tables[pop] = {"lf": lf, "flux": np.array(flux), "old": np.array(old), "r_over_b": np.array(r_over_b), "cls": cls}
        # stars: colours (flux per band over the reference band's) of a temperature grid
        self.star_teff = np.linspace(3200.0, 7500.0, 24)
        ext = stellar.galactic_extinction(wave, STAR_EBV)
        srng = np.random.default_rng(TEMPLATE_SEED + 1)
        colours = []
        for teff in self.star_teff:
            f = weights @ (_f_nu(stellar.star_spectrum(wave, stellar.draw_star(srng, teff), 500.0), wave) * ext)
            colours.append(f / f[self.ref])
        self.star_colours = np.array(colours)  # (T, B)
        # 5 sigma point-source depth per band: 5 sky sigma x sqrt(effective PSF pixels)
        p = model.p
        depth = []
        for b in range(len(self.bands)):
            img = psf_profile(card, b).drawImage(nx=96, ny=96, scale=p).array
            n_eff = img.sum() ** 2 / float(np.sum(img**2))
            depth.append(NJY_AB_ZP - 2.5 * np.log10(5 * model.sky_sigma[b] * np.sqrt(n_eff)))
        self.depth = np.array(depth)

    # ---------------------------------------------------------------- galaxies

    def _magnitude_terms(self, z: np.ndarray) -> np.ndarray:
        """DM(z) - 2.5 log10(1 + z): apparent = M_B + this - 2.5 log10(F(z))."""
        t = distance_tables()
        return np.interp(z, t.z, t.distmod) - 2.5 * np.log10(1 + z)

    def _candidates(self, pop: str, faint: float) -> tuple[np.ndarray, np.ndarray]:
        """(z grid weights per sr [dN/dz], d_lim(z) = M_lim - M*): the LF down to the faintest
        M_B any template of the population shows at apparent `faint` in the reference band."""
        tab = self.tables[pop]
        lf = tab["lf"]
        f_max = tab["flux"][:, self.ref, :].max(axis=0)
        m_lim = np.minimum(faint - self._magnitude_terms(_Z) + 2.5 * np.log10(np.maximum(f_max, 1e-30)), M_FAINT)
        d_lim = m_lim - lf.characteristic(_Z)
        t = distance_tables()
        weight = np.interp(_Z, t.z, t.dvdz) * lf.density(_Z) * lf.cumulative(d_lim, _Z)
        return weight, d_lim

    def galaxy_density(self, mag_limit: float) -> float:
        """Expected galaxies per arcmin^2 brighter than mag_limit, the templates taken one at a time
        (a mix of two templates falls between them)."""
        total = 0.0
        for pop, tab in self.tables.items():
            lf = tab["lf"]
            t = distance_tables()
            for f in tab["flux"][:, self.ref, :]:
                m_lim = np.minimum(mag_limit - self._magnitude_terms(_Z) + 2.5 * np.log10(np.maximum(f, 1e-30)), M_FAINT)
                w = np.interp(_Z, t.z, t.dvdz) * lf.density(_Z) * lf.cumulative(m_lim - lf.characteristic(_Z), _Z)
                total += np.trapezoid(w, _Z) / len(tab["flux"])
        return total / (ARCSEC_PER_RAD / 60) ** 2

    def draw_galaxies(self, rng: np.random.Generator, area_arcmin2: float, mag_range: tuple[float, float], scale: float = 1.0,
                      z_slice: tuple[float, float] | None = None) -> dict:
        """Galaxies in `area_arcmin2` with mag_range[0] <= m_ref < mag_range[1]; `scale` multiplies the LF.
        `z_slice = (z, dz)` keeps those of a slice around z (triangular weight of half-width dz)."""
        out = []
        for pop, tab in self.tables.items():
            lf = tab["lf"]
            weight, d_lim = self._candidates(pop, mag_range[1])
            if z_slice is not None:
                weight = weight * np.clip(1 - np.abs(_Z - z_slice[0]) / z_slice[1], 0.0, None)
            cdf = np.concatenate([[0.0], np.cumsum(0.5 * (weight[1:] + weight[:-1]) * np.diff(_Z))])
            n = rng.poisson(scale * cdf[-1] * area_arcmin2 / (ARCSEC_PER_RAD / 60) ** 2)
            z = np.interp(rng.random(n) * cdf[-1], cdf, _Z)
            g = rng.random(n) * lf.cumulative(np.interp(z, _Z, d_lim), z)
            # inverse of the LF's cumulative table (luminosity.Schechter keeps it on the M - M* grid _D)
            abs_b = lf.characteristic(z) + np.interp(g, lf._table, luminosity._D)
            k = len(tab["cls"])
            a, b = rng.integers(k, size=n), rng.integers(k, size=n)
            w = rng.random(n)
            iz = np.interp(z, _Z, np.arange(_Z.size))
            lo = np.minimum(np.floor(iz).astype(int), _Z.size - 2)
            frac = iz - lo

            def mix(table):  # (n, B): w table[a] + (1 - w) table[b], linear in z
                at = lambda i: table[i, :, lo] * (1 - frac[:, None]) + table[i, :, lo + 1] * frac[:, None]  # noqa: E731
                return w[:, None] * at(a) + (1 - w[:, None]) * at(b)

            f = mix(tab["flux"])
            mag = abs_b[:, None] + self._magnitude_terms(z)[:, None] - 2.5 * np.log10(np.maximum(f, 1e-300))
            keep = (mag[:, self.ref] >= mag_range[0]) & (mag[:, self.ref] < mag_range[1])
            old = mix(tab["old"])[keep]
            f = f[keep]
            tilt = (old / np.maximum(old[:, [self.ref]], 1e-300)) / np.maximum(f / np.maximum(f[:, [self.ref]], 1e-300), 1e-300)
            cls = np.array(tab["cls"])[np.where(w >= 0.5, a, b)][keep]
            abs_r = (abs_b - 2.5 * np.log10(w * tab["r_over_b"][a] + (1 - w) * tab["r_over_b"][b]))[keep]
            out.append({"z": z[keep], "abs_b": abs_b[keep], "abs_r": abs_r, "flux": 10 ** (-0.4 * (mag[keep] - NJY_AB_ZP)),
                        "tilt": tilt, "cls": cls, "population": np.full(int(keep.sum()), pop)})
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    # ---------------------------------------------------------------- stars

    def star_counts(self, mag_limit: float, bright: float = STAR_BRIGHT) -> float:
        """Stars per arcmin^2 with max(bright, STAR_BRIGHT) <= m_ref < mag_limit."""
        bright = max(bright, STAR_BRIGHT)
        if mag_limit <= bright:
            return 0.0
        return STAR_DENSITY_24 * (10 ** (STAR_SLOPE * (mag_limit - 24)) - 10 ** (STAR_SLOPE * (bright - 24)))

    def draw_stars(self, rng: np.random.Generator, n: int, mag_range: tuple[float, float]) -> dict:
        """n stars with counts N(<m) ~ 10^(STAR_SLOPE m) inside mag_range, colours from the template grid."""
        lo, hi = (10 ** (STAR_SLOPE * (m - 24)) for m in mag_range)
        mag = 24 + np.log10(lo + rng.random(n) * (hi - lo)) / STAR_SLOPE
        teff = np.where(rng.random(n) < 0.5, rng.normal(5900.0, 350.0, n), rng.uniform(3200.0, 5000.0, n))
        t = np.clip(np.rint(np.interp(teff, self.star_teff, np.arange(self.star_teff.size))), 0, self.star_teff.size - 1).astype(int)
        return {"mag": mag, "teff": self.star_teff[t], "flux": 10 ** (-0.4 * (mag[:, None] - NJY_AB_ZP)) * self.star_colours[t]}

    # ---------------------------------------------------------------- sources

    def galaxy_source(self, gal: dict, i: int, rng: np.random.Generator, pair_id: str) -> Source:
        """Galaxy i of a `draw_galaxies` result as a renderable Source (at offset 0)."""
        src = Source(pair_id, str(gal["cls"][i]), float(gal["z"][i]), "galaxy", [float(v) for v in gal["flux"][i]])
        bt = galaxy_morphology(src, MORPHOLOGY[src.spectral_class], float(gal["abs_r"][i]), rng)
        src.bulge_fraction = [float(v) for v in np.clip(bt * gal["tilt"][i], 0.0, 1.0)]
        return src

    def star_source(self, stars: dict, i: int, pair_id: str) -> Source:
        return Source(pair_id, "STAR", 0.0, "point", [float(v) for v in stars["flux"][i]], bulge_fraction=[0.0] * len(self.bands))


_SKIES: dict[tuple, FieldSky] = {}


def field_sky(card: ImageCard) -> FieldSky:
    """The card's sky model (tabulated once per card description; ~1 s)."""
    model = card_model(card)
    key = (card.name, tuple(model.band_names), model.fwhm, tuple(model.sky_sigma), model.p)
    if key not in _SKIES:
        if len(_SKIES) >= 8:
            _SKIES.clear()
        _SKIES[key] = FieldSky(card)
    return _SKIES[key]


def clustered_positions(rng: np.random.Generator, n: int, width: float, height: float, clustering: Clustering | None,
                        redshift: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) positions (x, y) [arcsec] in [0, width) x [0, height): Poisson, or a Thomas process
    conditioned on n points (clump members assigned to Poisson parents, wrapped at the edges).

    With `redshift` (n,), clumps are physical groups: members sorted by redshift fill the
    clumps in turn (the occupancies are the same random ones), so a clump's galaxies share
    nearly one redshift and close pairs are mostly physical pairs, as on the sky.
    """
    xy = rng.random((n, 2)) * [width, height]
    if clustering is None or n < 2:
        return xy
    members = np.flatnonzero(rng.random(n) < clustering.fraction)
    nu = clustering.occupancy(n / (width * height))
    parents = max(1, int(rng.poisson(max(len(members) / max(nu, 1e-9), 1.0))))
    centres = rng.random((parents, 2)) * [width, height]
    owner = rng.integers(parents, size=len(members))
    if redshift is not None:
        members, owner = members[np.argsort(np.asarray(redshift)[members], kind="stable")], np.sort(owner)
    xy[members] = (centres[owner] + rng.normal(0.0, clustering.scale_arcsec, (len(members), 2))) % [width, height]
    return xy


def neighbour_separations(rng: np.random.Generator, n: int, lo: float, hi: float, clustering: Clustering | None) -> np.ndarray:
    """n separations [arcsec] in [lo, hi] from the neighbour distribution of a clustered field,
    p(theta) ~ theta (1 + w(theta)) (theta alone without clustering)."""
    if hi <= lo:
        return np.full(n, float(lo))
    grid = np.linspace(lo, hi, 513)
    pdf = grid * (1 + (clustering.w(np.maximum(grid, 1e-3)) if clustering is not None else 0.0))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    return np.interp(rng.random(n) * cdf[-1], cdf, grid)
