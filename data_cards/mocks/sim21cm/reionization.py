"""Excursion-set reionisation, 21cm brightness temperature, coeval boxes and lightcones.

The model follows 21cmFAST's `CONST-ION-EFF` source model (Mesinger & Furlanetto 2007;
Mesinger, Furlanetto & Cen 2011) with a linear density field:

1. A Gaussian linear density field delta_0 (z = 0) with the EH98 no-wiggle P(k) on a
   periodic grid, averaged over each cell's volume (top-hat of radius 0.62 cell, as
   21cmFAST smooths its high-resolution field onto the ionisation grid). At redshift z
   the density is D(z) delta_0, or with LOGNORMAL = 1 its lognormal transform
   exp(D delta_0 - D^2 s^2 / 2) - 1 (s^2 the grid variance of delta_0), which is
   positive everywhere; the excursion set always uses the linear field.
2. For radii R from min(R_BUBBLE_MAX, 0.62 L_box) down to the cell radius
   (0.62 x cell) in steps of 1.1 (21cmFAST's DELTA_R_HII_FACTOR), the field is smoothed
   with a real-space top-hat; a cell is ionised (central-pixel flagging, 21cmFAST's
   default) when

       zeta * f_coll(R) >= 1 - x_e,  f_coll = N(z, R) erfc[(delta_c / D(z) - delta_R,0) / sqrt(2 (sigma^2(M_min) - sigma^2(R)))]

   with M_min(z) from ION_Tvir_MIN (Barkana & Loeb 2001). N(z, R) rescales the
   extended Press-Schechter f_coll so that its expectation over the grid equals the
   global Sheth-Tormen (HMF = 1, 21cmFAST's default) or Press-Schechter collapsed fraction,
   as 21cmFAST's `fix_mean` does; we use the analytic grid expectation
   erfc(delta_c / D / sqrt(2 (sigma^2_min - sigma^2_R + var_grid(R)))) instead of the
   noisy box mean. The criterion is a per-(R, z) barrier on delta_R,0, so no erfc is
   evaluated per cell except at the last, cell-size step, where cells that are not fully
   ionised get the partial ionisation x_HII = zeta f_coll (as 21cmFAST).
   x_e is the X-ray (and residual) ionisation of the neutral IGM (`heating`, global as ours is;
   0 in the saturated limit spin=False): 21cmFAST's IonisationBox.c lowers the barrier to
   1 - x_e (its xHII_from_xrays, filtered per cell) and counts x_e out of the neutral fraction,
   x_HI = 1 - x_e in never-ionised cells and max(0, 1 - zeta f_coll - x_e) in partial ones.
3. The brightness temperature (Furlanetto, Oh & Briggs 2006, Phys. Rep. 433, 181,
   with the prefactor 21cmFAST uses):
   dT_b = 27 x_HI (1 + delta) (1 - T_CMB / T_S) sqrt((1 + z)/10 * 0.15 / (OMm h^2)) (OMb h^2 / 0.023)
          / (1 + dv_r/dr / H)  mK,
   T_S from X-ray heating, Lyman-alpha and collisional coupling (`spin`, `heating`: cosmic
   dawn, driven by L_X, NU_X_THRESH and X_RAY_SPEC_INDEX), the last factor the linear
   redshift-space distortion (`spin.velocity_gradient`); x_HI already excludes x_e (point 2). Lightcones have both by default
   (spin=True, rsd=True); coeval boxes default to the saturated limit T_S >> T_CMB without
   RSD (spin=False, rsd=False), where x_e = 0 and the bracket is 1.
4. A lightcone is one elongated periodic box along the line of sight: slice i sits at
   comoving distance d(z_min) + i x cell, its redshift is the inverse of astropy's
   comoving distance, and density, M_min, f_coll normalisation and the barrier are all
   evaluated at that slice's redshift, so the lightcone evolves continuously (21cmFAST
   instead interpolates between coeval boxes). The box is padded along the line of sight
   by R_max on each side so no bubble wraps around. `lightcone_at_redshifts` puts such a
   lightcone on given redshifts (a fixed observed-frequency grid), so that a varied
   cosmology changes the signal, not the grid. With the spin temperature on, the padding is
   the largest fluctuating heating shell (0.62 L_box) when that exceeds R_BUBBLE_MAX.
   LIGHTCONE_Z = (5, 30) is the range that holds the whole signal: below z = 5 the default
   and prior models are fully ionised (the Ly-alpha forest ends at z ~ 5.3, Bosman et al.
   2022); at z = 30 no atomic-cooling source has switched on yet (x_alpha < 1e-3 for
   default parameters) and the gas, coupled to T_S by collisions only, sits in the
   dark-ages tail a few mK below zero, while 21cmFAST's Z_HEAT_MAX = 35 (our Z_MAX) still
   leaves the X-ray and Lyman-alpha histories 5 in z to build up before the lightcone starts.

Arrays are (D, H, W) = (line of sight, y, x), the `Sample` "field" axis order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.sim21cm.cosmology import DELTA_C, L_FACTOR, Cosmology, cosmology, erfc, erfcinv, frequency_hz
from cosmofm.data_cards.mocks.sim21cm.density import check_box, gaussian_field, tophat_smoother
from cosmofm.data_cards.mocks.sim21cm.heating import Z_MAX  # the model's redshift range (21cmFAST's Z_HEAT_MAX)
from cosmofm.data_cards.mocks.sim21cm.params import SimParams
from cosmofm.data_cards.mocks.sim21cm.spin import CHUNK_CELLS, brightness_temperature, shells, xray_ionised_fraction

DELTA_R_HII_FACTOR = 1.1  # ratio of successive smoothing radii (21cmFAST default)
R_BUBBLE_MIN = L_FACTOR  # Mpc, 21cmFAST's default floor on the smallest radius
LIGHTCONE_Z = (5.0, 30.0)  # the redshifts a full lightcone spans (module docstring, point 4)


def smoothing_radii(params: SimParams, cell: float, box_len: float) -> np.ndarray:
    """Excursion-set radii in Mpc, largest first, built as 21cmFAST's `setup_radii`."""
    r_max = min(params.R_BUBBLE_MAX, L_FACTOR * box_len)
    r_min = max(R_BUBBLE_MIN, L_FACTOR * cell)
    if r_max <= r_min:
        return np.array([r_min])
    n = int(math.log(r_max / r_min) / math.log(DELTA_R_HII_FACTOR) + 1)
    radii = []
    for i in range(n + 1):
        r = r_min * DELTA_R_HII_FACTOR**i
        if r > r_max - 1e-6:
            radii.append(r_max)
            break
        radii.append(r)
    return np.array(radii[::-1])


def ionized_fraction(delta0: np.ndarray, cell: float, redshifts: np.ndarray, params: SimParams, cosmo: Cosmology | None = None,
                     box_len: float | None = None, x_e: np.ndarray | None = None, smoother=None) -> np.ndarray:
    """Ionised fraction 1 - x_HI of a (D, H, W) box whose slice i is at redshifts[i]: excursion set plus X-ray pre-ionisation.

    Args:
        delta0: linear overdensity extrapolated to z = 0 (periodic box).
        cell: comoving cell size in Mpc.
        redshifts: (D,) redshift of each slice along axis 0 (all equal for a coeval box).
        box_len: transverse box size limiting the largest radius (default W * cell).
        x_e: (D,) X-ray ionised fraction of the neutral IGM per slice (module docstring, point 2); None = 0.
        smoother: `density.tophat_smoother(delta0, cell)` when the caller has one (its forward FFT is shared).
    """
    cosmo = cosmo or cosmology(params)
    p = params
    z = np.asarray(redshifts, dtype=float)
    growth = cosmo.growth(z)  # (D,)
    sigma2_min = cosmo.sigma2_mass(cosmo.min_source_mass(z, p.ION_Tvir_MIN))  # (D,)
    f_global = cosmo.fcoll_global(z, p.ION_Tvir_MIN, "ST" if p.HMF == 1 else "PS")  # (D,)
    barrier_c = DELTA_C / growth  # (D,)
    box_len = box_len or delta0.shape[-1] * cell
    x_e = np.zeros_like(z) if x_e is None else np.clip(np.broadcast_to(np.asarray(x_e, dtype=float), z.shape), 0.0, 1.0)
    radii = smoothing_radii(p, cell, box_len)
    smooth = smoother or tophat_smoother(delta0, cell)
    ionised = np.zeros(delta0.shape, dtype=bool)
    above = np.empty(delta0.shape, dtype=bool)
    buffer = np.empty(delta0.shape)  # every radius's smoothed field, reused (`density.TophatSmoother`)
    x_hii = None
    for i, radius in enumerate(radii):
        last = i == len(radii) - 1
        # The last step uses the unfiltered field, as 21cmFAST does (R = cell radius).
        smoothed = delta0 if last else smooth(radius, out=buffer)
        flat = smoothed.reshape(-1)
        var_grid = float(np.dot(flat, flat)) / flat.size  # the grid variance (mean 0) without a squared copy of the box
        sig2_diff = sigma2_min - cosmo.sigma2_radius(radius)  # (D,)
        valid = sig2_diff > 0  # a cell lighter than M_min hosts no source
        s = np.sqrt(2 * np.where(valid, sig2_diff, 1.0))
        grid_mean = erfc(barrier_c / np.sqrt(2 * np.where(valid, sig2_diff, 1.0) + 2 * var_grid))
        with np.errstate(divide="ignore", invalid="ignore"):
            efficiency = p.HII_EFF_FACTOR * np.where(grid_mean > 0, f_global / grid_mean, 0.0)  # zeta * normalisation, (D,)
            y = np.where(efficiency > 0, (1 - x_e) / efficiency, np.inf)  # the barrier zeta f_coll >= 1 - x_e
        ok = valid & (y < 2)
        barrier = np.where(ok, barrier_c - s * erfcinv(np.where(ok, y, 1.0)), np.inf)  # (D,)
        ionised |= np.greater_equal(smoothed, barrier[:, None, None], out=above)
        if last:  # per-cell erfc, a few slices at a time (cache-sized blocks, as `spin._cell_spin`)
            x_hii = np.empty(delta0.shape)
            rows = max(1, CHUNK_CELLS // max(1, int(np.prod(delta0.shape[1:]))))
            for j in range(0, delta0.shape[0], rows):
                b = slice(j, j + rows)
                fcoll = erfc((barrier_c[b, None, None] - smoothed[b]) / s[b, None, None])
                partial = np.clip(efficiency[b, None, None] * fcoll, 0.0, 1.0) * valid[b, None, None]
                x_hii[b] = np.where(ionised[b], 1.0, np.minimum(partial + x_e[b, None, None], 1.0))
    return x_hii


@dataclass
class CoevalBox:
    """One redshift: brightness temperature (mK), overdensity and neutral fraction, (D, H, W)."""

    brightness_temp: np.ndarray
    density: np.ndarray
    x_HI: np.ndarray
    redshift: float
    cell_size: float  # comoving Mpc
    params: SimParams
    seed: int

    @property
    def global_xHI(self) -> float:
        return float(self.x_HI.mean())

    @property
    def frequency(self) -> float:
        """Observed 21cm frequency in Hz."""
        return float(frequency_hz(self.redshift))

    @property
    def box_size(self) -> float:
        return self.cell_size * self.brightness_temp.shape[-1]


@dataclass
class Lightcone:
    """A 21cm lightcone; axis 0 runs along the line of sight from z_min (index 0) outwards.

    Attributes:
        brightness_temp: (D, H, W) differential brightness temperature, mK.
        density: (D, H, W) overdensity at each slice's redshift.
        x_HI: (D, H, W) neutral hydrogen fraction.
        redshifts: (D,) redshift of each slice.
        frequencies: (D,) observed 21cm frequency of each slice, Hz (decreasing).
        los_distances: (D,) comoving distance of each slice, Mpc.
        transverse: (H,) cell-centre positions across the line of sight, Mpc (centred on 0).
        global_xHI: (D,) mean neutral fraction of each slice (excursion set and, with spin, X-ray pre-ionisation x_e).
        spin_temp: (D, H, W) spin temperature T_S in K, None when saturated (spin=False).
    """

    brightness_temp: np.ndarray
    density: np.ndarray
    x_HI: np.ndarray
    redshifts: np.ndarray
    frequencies: np.ndarray
    los_distances: np.ndarray
    transverse: np.ndarray
    global_xHI: np.ndarray
    cell_size: float
    params: SimParams
    seed: int
    spin_temp: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.brightness_temp.shape

    @property
    def box_size(self) -> float:
        return self.cell_size * self.shape[-1]

    @property
    def mean_brightness(self) -> np.ndarray:
        """(D,) mean brightness temperature of each slice, mK."""
        return self.brightness_temp.mean(axis=(1, 2))

    def midpoint_redshift(self) -> float:
        """Redshift where the global neutral fraction crosses 0.5 (nan if it does not inside the lightcone)."""
        return crossing_redshift(self.redshifts, self.global_xHI, 0.5)

    def observe(self, hours: float = 1000.0, noise: str | None = "radiometer", wedge: bool = True, seed: int = 0,
                telescope=None, wedge_chunk: int | None = None) -> np.ndarray:
        """The brightness temperature as an interferometer sees it, (D, H, W) mK.

        Thermal noise (`observe.thermal_noise`, model `noise`; None for none) is added,
        then the foreground wedge is removed from signal and noise together
        (`observe.remove_wedge`, chunks of `wedge_chunk` slices, default H).
        """
        from cosmofm.data_cards.mocks.sim21cm.observe import SKA_LOW, remove_wedge, thermal_noise

        out = self.brightness_temp.astype(np.float64)
        if noise is not None:
            out = out + thermal_noise(self.shape, self.redshifts, self.cell_size, seed, hours, telescope or SKA_LOW, noise, self.params)
        if wedge:
            out = remove_wedge(out, self.redshifts, self.cell_size, self.params, wedge_chunk)
        return out

    def chunk(self, start: int, length: int) -> "Lightcone":
        """Slices start .. start+length-1 (views, no copy)."""
        if start < 0 or length <= 0 or start + length > self.shape[0]:
            raise InputError("chunk", f"slices {start}..{start + length - 1} are outside 0..{self.shape[0] - 1}", "pick a range inside the lightcone")
        s = slice(start, start + length)
        return Lightcone(self.brightness_temp[s], self.density[s], self.x_HI[s], self.redshifts[s], self.frequencies[s],
                         self.los_distances[s], self.transverse, self.global_xHI[s], self.cell_size, self.params, self.seed,
                         None if self.spin_temp is None else self.spin_temp[s])


def crossing_redshift(z: np.ndarray, x_hi: np.ndarray, level: float = 0.5) -> float:
    """First redshift (from low z) where x_HI(z) reaches `level`, linearly interpolated."""
    order = np.argsort(z)
    z, x = np.asarray(z)[order], np.asarray(x_hi)[order]
    above = np.nonzero(x >= level)[0]
    if len(above) == 0 or above[0] == 0:
        return float("nan")
    j = above[0]
    return float(z[j - 1] + (level - x[j - 1]) * (z[j] - z[j - 1]) / (x[j] - x[j - 1]))


def _grown(delta0: np.ndarray, growth: np.ndarray, lognormal: bool) -> np.ndarray:
    """Density at each slice's redshift from the z = 0 linear field; growth is (D,)."""
    g = growth[:, None, None]
    if lognormal:
        return np.exp(g * delta0 - 0.5 * g**2 * float(np.mean(delta0**2))) - 1
    return g * delta0


def _next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    best = 2 * n
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def coeval_box(params: SimParams | dict | None, z: float, box_size: float = 64.0, n_cells: int = 32, seed: int = 0,
               los_cells: int | None = None, spin: bool = False, rsd: bool = False, density0: np.ndarray | None = None) -> CoevalBox:
    """A periodic coeval box at redshift z: (los_cells or n_cells) x n_cells^2 cells of box_size / n_cells Mpc.

    spin=False is the saturated limit T_S >> T_CMB; spin=True adds the spin temperature, rsd=True the velocity gradient.
    density0: a given (los_cells, n_cells, n_cells) linear overdensity at z = 0, already averaged over
    each cell (e.g. 21cmFAST's low-resolution initial conditions, `reference.run_21cmfast_coevals`),
    used instead of drawing one from `seed`; the box is then the model run on those initial conditions.
    """
    p = SimParams.coerce(params)
    check_box(p, box_size, n_cells, z, seed)
    los_cells = n_cells if los_cells is None else los_cells
    if isinstance(los_cells, bool) or not isinstance(los_cells, (int, np.integer)) or los_cells <= 0:
        raise InputError("los_cells", f"must be a positive integer, got {los_cells!r}", "give the number of cells along the line of sight")
    shape = (los_cells, n_cells, n_cells)
    if density0 is not None:
        density0 = np.asarray(density0, dtype=np.float64)
        if density0.shape != shape or not np.all(np.isfinite(density0)):
            raise InputError("density0", f"must be a finite {shape} array, got shape {density0.shape}",
                             "pass the z = 0 linear density on the box's own grid (LOS, y, x)")
    cosmo = cosmology(p)
    cell = box_size / n_cells
    if density0 is None:
        delta0 = gaussian_field(np.random.default_rng([seed, 21]), shape, cell, cosmo.power, cell_average=True)
    else:
        delta0 = density0
    zs = np.full(los_cells, float(z))
    x_e = xray_ionised_fraction(p, cell, box_size, zs) if spin else None  # saturated T_S: no X-ray history, x_e = 0
    smooth = tophat_smoother(delta0, cell)  # one forward FFT for the excursion set, the shells and the velocities
    x_hi = 1 - ionized_fraction(delta0, cell, zs, p, cosmo, box_size, x_e, smooth)
    delta = _grown(delta0, cosmo.growth(zs), p.LOGNORMAL == 1)
    tb, _ = brightness_temperature(delta0, delta, x_hi, zs, p, cosmo, cell, box_size, spin, rsd, smooth)
    return CoevalBox(tb.astype(np.float32), delta.astype(np.float32), x_hi.astype(np.float32), float(z), cell, p, seed)


def lightcone(params: SimParams | dict | None, box_size: float, n_cells: int, z_min: float = LIGHTCONE_Z[0], z_max: float = LIGHTCONE_Z[1],
              seed: int = 0, spin: bool = True, rsd: bool = True) -> Lightcone:
    """A 21cm lightcone from z_min to z_max with a box_size x box_size (comoving Mpc) cross-section.

    Cells are cubes of box_size / n_cells Mpc; slice i is at comoving distance
    d(z_min) + i x cell, for every slice up to d(z_max). Deterministic in `seed`.
    spin: spin temperature (cosmic dawn) on, else saturated T_S; rsd: redshift-space distortions.
    """
    p = SimParams.coerce(params)
    check_box(p, box_size, n_cells, z_min, seed)
    check_box(p, box_size, n_cells, z_max)
    if z_max <= z_min:
        raise InputError("z_max", f"must be above z_min ({z_min}), got {z_max}", "give z_min < z_max")
    cosmo = cosmology(p)
    cell = box_size / n_cells
    n_los = int(math.floor((float(cosmo.comoving_distance(z_max)) - float(cosmo.comoving_distance(z_min))) / cell + 1e-9)) + 1
    return lightcone_slices(p, box_size, n_cells, z_min, n_los, seed, spin=spin, rsd=rsd)


def lightcone_slices(params: SimParams | dict | None, box_size: float, n_cells: int, z_min: float, n_los: int, seed: int = 0,
                     ionize: bool = True, spin: bool = True, rsd: bool = True) -> Lightcone:
    """A lightcone of exactly `n_los` slices starting at z_min (see `lightcone`).

    ionize=False skips the excursion set, the spin temperature and RSD (x_HI = 1): a density lightcone.
    """
    p = SimParams.coerce(params)
    check_box(p, box_size, n_cells, z_min, seed, bubbles=ionize)
    if isinstance(n_los, bool) or not isinstance(n_los, (int, np.integer)) or n_los <= 0:
        raise InputError("n_los", f"must be a positive integer, got {n_los!r}", "give the number of slices along the line of sight")
    cosmo = cosmology(p)
    cell = box_size / n_cells
    d_min = float(cosmo.comoving_distance(z_min))
    if float(cosmo.redshift_at_distance(d_min + (n_los - 1) * cell)) > Z_MAX:
        raise InputError("z_max", f"the lightcone reaches beyond z = {Z_MAX}", "shorten the lightcone")
    spin, rsd = spin and ionize, rsd and ionize
    reach = max(smoothing_radii(p, cell, box_size)[0], shells(cell, box_size)[1][-1] if spin else 0.0)
    pad = int(math.ceil(reach / cell)) + 2 if ionize else 0
    n_box = _next_fast_len(n_los + 2 * pad)
    pad_lo = (n_box - n_los) // 2
    dist = d_min + (np.arange(n_box) - pad_lo) * cell
    z_box = cosmo.redshift_at_distance(np.clip(dist, 0.0, None))
    delta0 = gaussian_field(np.random.default_rng([seed, 21]), (n_box, n_cells, n_cells), cell, cosmo.power, cell_average=True)
    keep = slice(pad_lo, pad_lo + n_los)
    smooth = tophat_smoother(delta0, cell) if ionize else None  # one forward FFT for the excursion set, shells and velocities
    if ionize:
        x_e = xray_ionised_fraction(p, cell, box_size, z_box) if spin else None  # saturated T_S: x_e = 0
        x_hi = 1 - ionized_fraction(delta0, cell, z_box, p, cosmo, box_size, x_e, smooth)[keep]
    else:
        x_hi = np.ones((n_los, n_cells, n_cells))
    if spin or rsd:  # on the padded box: shells and velocities see across the ends
        delta_box = _grown(delta0, cosmo.growth(z_box), p.LOGNORMAL == 1)
        x_hi_box = np.ones(delta0.shape)
        x_hi_box[keep] = x_hi
        tb, t_s = brightness_temperature(delta0, delta_box, x_hi_box, z_box, p, cosmo, cell, box_size, spin, rsd, smooth)
        z, delta, tb, t_s = z_box[keep], delta_box[keep], tb[keep], None if t_s is None else t_s[keep].astype(np.float32)
    else:
        z, delta0 = z_box[keep], delta0[keep]
        delta = _grown(delta0, cosmo.growth(z), p.LOGNORMAL == 1)
        tb, t_s = brightness_temperature(delta0, delta, x_hi, z, p, cosmo, cell, box_size, False, False)
    transverse = (np.arange(n_cells) - (n_cells - 1) / 2) * cell
    return Lightcone(tb.astype(np.float32), delta.astype(np.float32), x_hi.astype(np.float32), z, frequency_hz(z), dist[keep],
                     transverse, x_hi.mean(axis=(1, 2)), cell, p, seed, t_s)


def lightcone_at_redshifts(params: SimParams | dict | None, box_size: float, n_cells: int, redshifts, seed: int = 0,
                           ionize: bool = True, spin: bool = True, rsd: bool = True) -> Lightcone:
    """A lightcone whose slices sit at the given increasing `redshifts` (an observed frequency grid).

    The signal is the model's, in params' own cosmology: `lightcone_slices` from redshifts[0]
    with cells of box_size / n_cells Mpc of that cosmology's comoving distance, interpolated
    linearly along the line of sight to each redshift's own comoving distance (a slice
    within 1e-3 cell of a simulated one is taken as it is, so on params' own grid this is
    `lightcone_slices` exactly). Varying the cosmology then moves the signal, not the grid:
    the same redshifts give the same frequencies for every realisation (Alcock-Paczynski:
    the line-of-sight spacing in own Mpc differs from box_size / n_cells). `los_distances`
    are params' own comoving distances of the redshifts.
    """
    p = SimParams.coerce(params)
    z = np.asarray(redshifts, dtype=float)
    if z.ndim != 1 or len(z) == 0 or not np.all(np.isfinite(z)) or np.any(np.diff(z) <= 0):
        raise InputError("redshifts", "must be a non-empty, strictly increasing 1D array", "give the slices' redshifts from low to high")
    check_box(p, box_size, n_cells, float(z[0]), seed, bubbles=ionize)
    check_box(p, box_size, n_cells, float(z[-1]), bubbles=ionize)
    cosmo = cosmology(p)
    cell = box_size / n_cells
    d = cosmo.comoving_distance(z)
    t = (d - d[0]) / cell  # fractional index of each redshift on the simulated grid
    nearest = np.round(t)
    on_grid = np.abs(t - nearest) < 1e-3
    j0 = np.where(on_grid, nearest, np.floor(t)).astype(int)
    w = np.where(on_grid, 0.0, t - j0)
    n_sim = int(j0[-1]) + (2 if w[-1] > 0 else 1)
    lc = lightcone_slices(p, box_size, n_cells, float(z[0]), n_sim, seed, ionize, spin, rsd)
    j1 = np.minimum(j0 + 1, n_sim - 1)
    ww = w[:, None, None]

    def interp(a):
        return ((1 - ww) * a[j0] + ww * a[j1]).astype(np.float32)

    x_hi = interp(lc.x_HI)
    return Lightcone(interp(lc.brightness_temp), interp(lc.density), x_hi, z, frequency_hz(z), d, lc.transverse,
                     x_hi.mean(axis=(1, 2)), cell, p, seed, None if lc.spin_temp is None else interp(lc.spin_temp))
