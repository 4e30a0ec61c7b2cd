"""Gaussian and lognormal density fields from a power spectrum, and a P(k) estimator.

A Gaussian field with power spectrum P(k) on a periodic grid of cell size `cell` is
white noise w (unit variance per cell) filtered in Fourier space by sqrt(P(k) / cell^3),
so that <|delta_k|^2> cell^6 / V = P(k). The lognormal field (Coles & Jones 1991)
delta = exp(g - sigma_g^2 / 2) - 1 is positive everywhere and, in `density_field`,
built so that its own power spectrum is P(k): the Gaussian g gets the spectrum of
ln(1 + xi(r)), xi being the correlation function of P on the grid (the method of
the `powerbox` package, which `backend="powerbox"` calls instead when installed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.fft

from cosmofm.data_cards.errors import InputError
from cosmofm.data_cards.mocks.sim21cm.cosmology import L_FACTOR, cosmology, tophat_window
from cosmofm.data_cards.mocks.sim21cm.params import SimParams

KINDS = ("gaussian", "lognormal")


def k_grid(shape: tuple[int, ...], cell: float, real: bool = True) -> list[np.ndarray]:
    """Wavenumbers (1/Mpc) per axis, broadcastable, for rfftn (real=True) or fftn of `shape`."""
    ks = [2 * np.pi * np.fft.fftfreq(n, d=cell) for n in shape]
    if real:
        ks[-1] = 2 * np.pi * np.fft.rfftfreq(shape[-1], d=cell)
    out = []
    for axis, k in enumerate(ks):
        view = [1] * len(shape)
        view[axis] = k.size
        out.append(k.reshape(view))
    return out


def k_magnitude(shape: tuple[int, ...], cell: float, real: bool = True) -> np.ndarray:
    return np.sqrt(sum(k**2 for k in k_grid(shape, cell, real)))


def radial(shape: tuple[int, ...], cell: float) -> Callable[[Callable[[np.ndarray], np.ndarray]], np.ndarray]:
    """f -> f(|k|) on the rfftn grid of `shape`, for an elementwise f (a window, a power spectrum).

    Equal, bit for bit, to f(k_magnitude(shape, cell)): |k| depends on the wavenumbers of every
    axis but the last only through their squares, so f is evaluated on the non-negative half
    of each of those axes (a quarter of a 3D grid) and copied to the mirrored rows. Evaluating
    top-hat windows (sines, cosines) and P(k) on the full grid was the largest single cost of
    a lightcone.
    """
    _, part = quarter_k(shape, cell)
    blocks = _mirror_blocks(shape)

    def on_grid(f):
        values = np.broadcast_to(f(part), part.shape)
        out = np.empty(tuple(shape[:-1]) + part.shape[-1:], values.dtype)
        for grid, quarter in blocks:
            out[grid] = values[quarter]
        return out

    return on_grid


def quarter_k(shape: tuple[int, ...], cell: float) -> tuple[list[np.ndarray], np.ndarray]:
    """The wavenumbers (broadcastable, one per axis) and |k| of the quarter of the rfftn grid of
    `shape` that `radial` and `TophatSmoother` evaluate: the non-negative half of every axis but the last."""
    head = tuple(slice(0, n // 2 + 1) for n in shape[:-1]) + (slice(None),)
    k_axes = [k[head] for k in k_grid(shape, cell)]
    return k_axes, np.sqrt(sum(k**2 for k in k_axes))


def tophat_windows(shape: tuple[int, int, int], cell: float) -> Callable[[float], np.ndarray]:
    """R -> the top-hat window W(|k| R) on the rfftn grid of a (D, H, W) box (`radial`), for filtering at many radii."""
    on_grid = radial(shape, cell)
    return lambda radius: on_grid(lambda k: tophat_window(k * radius))


def _mirror_blocks(shape: tuple[int, ...]) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(rfftn-grid block, quarter-grid block) pairs that tile the rfftn grid of `shape` (`radial`'s mirroring).

    Along every axis but the last, rows 0 .. n//2 are the quarter grid's own and rows n//2+1 .. n-1 are its
    rows n - n//2 - 1 .. 1 in reverse (row i holds |k| of row n - i), so grid[a] = quarter[b] for each pair.
    """
    per_axis = []
    for n in shape[:-1]:
        half = n // 2
        pairs = [(slice(0, half + 1), slice(0, half + 1))]
        if n - half - 1 > 0:
            pairs.append((slice(half + 1, n), slice(n - half - 1, 0, -1)))
        per_axis.append(pairs)
    blocks = [((), ())]
    for pairs in per_axis:
        blocks = [(a + (pa,), b + (pb,)) for a, b in blocks for pa, pb in pairs]
    return [(a + (slice(None),), b + (slice(None),)) for a, b in blocks]


SLAB_CELLS = 1 << 16  # complex cells per slab of `irfftn_by_slabs` (~1 MB: the slab's two transforms stay in cache)


def irfftn_by_slabs(spectrum: np.ndarray, shape: tuple[int, int, int], out: np.ndarray | None = None) -> np.ndarray:
    """scipy.fft.irfftn(spectrum, s=shape) of a (D, H, W // 2 + 1) rfftn grid, bit for bit, in a cache-friendly order.

    irfftn runs the inverse c2c transform along axis 0 over the whole box, then along axis 1 over the
    whole box, then the c2r transform along axis 2, and scales by 1 / (D H W) at the end. Here axis 0
    runs over the whole box and axes 1 and 2 a slab of slices at a time, while the slab is in cache:
    the same 1D transforms in the same order and the same scaling, ~2.5x faster on a 2,560 x 140 x 140
    lightcone box (the whole-box pass along axis 1 streams 400 MB through memory for little arithmetic).
    `spectrum` is overwritten; the result goes to `out` (float64 of `shape`) when given.
    """
    depth, height, width = shape
    fct = 1.0 / (depth * height * width)
    spectrum = scipy.fft.ifft(spectrum, axis=0, norm="forward", overwrite_x=True)  # unscaled, as inside irfftn
    out = np.empty(shape) if out is None else out
    rows = max(1, SLAB_CELLS // max(1, height * spectrum.shape[2]))
    for i in range(0, depth, rows):
        slab = scipy.fft.ifft(spectrum[i:i + rows], axis=1, norm="forward", overwrite_x=True)
        np.multiply(scipy.fft.irfft(slab, n=width, axis=2, norm="forward", overwrite_x=True), fct, out=out[i:i + rows])
    return out


class TophatSmoother:
    """R -> the periodic (D, H, W) `field` smoothed with a real-space spherical top-hat of radius R Mpc.

    The field is transformed once (`dk`, scipy's rfftn, ~2x faster than numpy's on lightcone-sized
    boxes); each radius costs the window at the distinct |k| of a quarter of the k grid (`radial`),
    one multiply and one inverse FFT (`irfftn_by_slabs`). The multiply reads the quarter-grid window through mirrored
    views into one reused buffer, which the inverse FFT overwrites, so no full-grid window or product is allocated per
    radius: equal, bit for bit, to irfftn(dk * tophat_windows(shape, cell)(R)) (tests/test_sim21cm_speed.py).
    Callers that filter at many radii pass `out=`, one array they reuse: a fresh 400 MB result per radius
    is page-faulted in anew each time (a paper-size lightcone's system time fell from 34.5 s to 11-15 s).
    """

    def __init__(self, field: np.ndarray, cell: float):
        self.shape = field.shape
        self.dk = scipy.fft.rfftn(np.asarray(field, dtype=float))
        self.k_axes, self._k_quarter = quarter_k(self.shape, cell)  # wavenumbers and |k| of the quarter grid
        self._k_values = self._k_index = None  # the distinct |k| of the quarter grid, on the first radius
        self._blocks = _mirror_blocks(self.shape)
        self._buffer = np.empty_like(self.dk)
        self._kernel = None  # the window on the quarter grid, reused

    def apply(self, kernel: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The field filtered by a kernel given on the quarter grid (`k_axes`; even in every wavenumber but the last)."""
        for grid, part in self._blocks:
            np.multiply(self.dk[grid], kernel[part], out=self._buffer[grid])
        if len(self.shape) == 3:
            return irfftn_by_slabs(self._buffer, self.shape, out)
        result = scipy.fft.irfftn(self._buffer, s=self.shape, axes=tuple(range(len(self.shape))), overwrite_x=True)
        if out is None:
            return result
        out[...] = result
        return out

    def __call__(self, radius: float, out: np.ndarray | None = None) -> np.ndarray:
        """The field smoothed at `radius` Mpc, into `out` when given."""
        if self._k_values is None:
            # the window needs each distinct |k| once: ~45 % of a lightcone's quarter grid (|k_y| and |k_x| share
            # values), and its sin / cos are most of its cost
            self._k_values, index = np.unique(self._k_quarter, return_inverse=True)
            self._k_index = index.reshape(self._k_quarter.shape)
            self._kernel = np.empty(self._k_quarter.shape)
        np.take(tophat_window(self._k_values * radius), self._k_index, out=self._kernel)
        return self.apply(self._kernel, out)


def tophat_smoother(field: np.ndarray, cell: float) -> Callable[[float], np.ndarray]:
    """R -> `field` smoothed with a real-space top-hat of radius R Mpc (a `TophatSmoother`)."""
    return TophatSmoother(field, cell)


def gaussian_field(rng: np.random.Generator, shape: tuple[int, ...], cell: float, power: Callable, cell_average: bool = False) -> np.ndarray:
    """A periodic Gaussian random field with power spectrum power(k) (Mpc^3, k in 1/Mpc); float64, mean 0.

    cell_average=True smooths with a real-space top-hat of the cell's volume (radius
    0.62 cell), so each cell holds the mean over its volume rather than a point value --
    what 21cmFAST's low-resolution grid holds (its high-resolution field filtered so).
    """
    white = rng.standard_normal(shape)
    wk = np.fft.rfftn(white)
    amp = radial(shape, cell)(lambda k: np.sqrt(power(k) / cell**3) * (tophat_window(k * L_FACTOR * cell) if cell_average else 1.0))
    amp.flat[0] = 0.0  # no k = 0 mode: the box mean is the cosmic mean
    return np.fft.irfftn(wk * amp, s=shape)


def lognormal_gaussian_power(shape: tuple[int, ...], cell: float, power: Callable) -> np.ndarray:
    """On the rfft grid: the power of g such that exp(g - s^2/2) - 1 has spectrum `power`."""
    pk = power(k_magnitude(shape, cell)) / cell**3  # per-mode variance / N, in grid units
    pk.flat[0] = 0.0
    xi = np.fft.irfftn(pk, s=shape)  # correlation function on the grid
    xi_g = np.log1p(np.maximum(xi, -0.999999))
    pg = np.fft.rfftn(xi_g).real
    pg.flat[0] = 0.0
    return np.maximum(pg, 0.0)  # rare negative modes from the transform are unphysical


def lognormal_field(rng: np.random.Generator, shape: tuple[int, ...], cell: float, power: Callable) -> np.ndarray:
    """A periodic lognormal overdensity field whose power spectrum is `power`."""
    white = rng.standard_normal(shape)
    g = np.fft.irfftn(np.fft.rfftn(white) * np.sqrt(lognormal_gaussian_power(shape, cell, power)), s=shape)
    return np.exp(g - g.var() / 2) - 1


@dataclass
class DensityField:
    """A coeval overdensity box; axis 0 is taken as the line of sight.

    Attributes:
        delta: (D, H, W) overdensity rho / <rho> - 1.
        cell_size: comoving Mpc per cell.
        redshift: of the box (the linear field is grown with D(z)).
        kind: "gaussian" or "lognormal".
        params: cosmology used for P(k) (None when a custom P(k) was given).
    """

    delta: np.ndarray
    cell_size: float
    redshift: float
    kind: str
    params: SimParams | None
    seed: int

    @property
    def box_size(self) -> float:
        return self.cell_size * self.delta.shape[-1]

    @property
    def coords(self) -> np.ndarray:
        """Cell centres along each axis (comoving Mpc, centred on 0)."""
        n = self.delta.shape[-1]
        return (np.arange(n) - (n - 1) / 2) * self.cell_size


def density_field(box_size: float, n_cells: int, z: float = 0.0, seed: int = 0, *, params: SimParams | dict | None = None,
                  kind: str = "gaussian", power: Callable | None = None, backend: str = "numpy") -> DensityField:
    """A Gaussian or lognormal overdensity field in a periodic box (for the emulation head).

    Args:
        box_size: comoving side of the box in Mpc.
        n_cells: cells per side.
        z: redshift; the linear P(k) is scaled by D(z)^2 (ignored when `power` is given).
        seed: random seed (same seed, same field).
        params: cosmology (SimParams or a 21cmFAST-named dict); default Planck 2018.
        kind: "gaussian" or "lognormal".
        power: optional P(k) callable (k in 1/Mpc -> Mpc^3) instead of the EH98 linear spectrum.
        backend: "numpy" (default, no extra packages) or "powerbox" (the `[sim21cm]` extra).
    """
    p = check_box(params, box_size, n_cells, z, seed, bubbles=False)  # a density field has no bubbles
    if kind not in KINDS:
        raise InputError("kind", f"unknown density kind {kind!r}", f"use one of {KINDS}")
    if power is None:
        cosmo = cosmology(p)
        growth2 = float(cosmo.growth(z)) ** 2

        def power(k):
            return cosmo.power(k) * growth2
    cell = box_size / n_cells
    shape = (n_cells,) * 3
    if backend == "numpy":
        rng = np.random.default_rng([seed, 7])
        delta = gaussian_field(rng, shape, cell, power) if kind == "gaussian" else lognormal_field(rng, shape, cell, power)
    elif backend == "powerbox":
        try:
            import powerbox
        except ImportError:
            raise InputError("backend", "powerbox is not installed", "pip install 'cosmofm[sim21cm]' or use backend='numpy'") from None
        cls = powerbox.PowerBox if kind == "gaussian" else powerbox.LogNormalPowerBox
        pb = cls(N=n_cells, dim=3, pk=lambda k: power(k), boxlength=box_size, seed=seed)
        delta = np.asarray(pb.delta_x())
    else:
        raise InputError("backend", f"unknown backend {backend!r}", "use 'numpy' or 'powerbox'")
    return DensityField(delta.astype(np.float32), cell, float(z), kind, p, seed)


def power_spectrum(field: np.ndarray, cell_size: float, bins: int | np.ndarray = 12, *, dimensionless: bool = False,
                   subtract_mean: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spherically averaged power spectrum of a 3D periodic field.

    Args:
        field: (D, H, W) array, any shape (non-cubic lightcone chunks are fine).
        cell_size: comoving Mpc per cell (the same along every axis).
        bins: number of log-spaced bins from the smallest non-zero |k| to the largest, or edges (1/Mpc).
        dimensionless: return Delta^2 = k^3 P / (2 pi^2) (field unit^2) instead of P (unit^2 Mpc^3).

    Returns:
        (k, P, n_modes): mean |k| per bin (1/Mpc), the binned spectrum, and the number of
        Fourier modes per bin (counting +k and -k separately; independent modes are half).
    """
    f = np.asarray(field, dtype=np.float64)
    if f.ndim != 3:
        raise InputError("field", f"needs 3 axes, got shape {f.shape}", "pass a (D, H, W) box")
    if subtract_mean:
        f = f - f.mean()
    volume = f.size * cell_size**3
    pk = np.abs(np.fft.fftn(f)) ** 2 * cell_size**6 / volume
    kmag = k_magnitude(f.shape, cell_size, real=False)
    kmag, pk = kmag.ravel(), pk.ravel()
    keep = kmag > 0
    kmag, pk = kmag[keep], pk[keep]
    edges = np.geomspace(kmag.min(), kmag.max() * 1.0001, int(bins) + 1) if np.ndim(bins) == 0 else np.asarray(bins, dtype=float)
    which = np.digitize(kmag, edges) - 1
    ok = (which >= 0) & (which < len(edges) - 1)
    n = np.bincount(which[ok], minlength=len(edges) - 1).astype(float)
    ksum = np.bincount(which[ok], weights=kmag[ok], minlength=len(edges) - 1)
    psum = np.bincount(which[ok], weights=pk[ok], minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        k_mean, p_mean = ksum / n, psum / n
    if dimensionless:
        p_mean = k_mean**3 * p_mean / (2 * np.pi**2)
    return k_mean, p_mean, n


def check_box(params, box_size, n_cells, z, seed: int = 0, bubbles: bool = True) -> SimParams:
    """Validated SimParams of a box; bubbles=True (the ionised field) also asks the box to hold the largest bubble.

    A box narrower than 2 R_BUBBLE_MAX cannot hold an ionised region of the photon mean
    free path's size: the largest bubble would overlap its own periodic image, and below
    1.61 R_BUBBLE_MAX the excursion set even cuts its largest radius to 0.62 box_size
    (`reionization.smoothing_radii`), so R_BUBBLE_MAX would silently stop acting. 21cmFAST
    refuses R_BUBBLE_MAX > BOX_LEN; we ask for the diameter. The heating shells of the spin
    temperature need nothing more: they stop at 0.62 box_size by construction (`spin.shells`).
    """
    p = SimParams.coerce(params)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}", "give e.g. seed=0")
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells <= 0:
        raise InputError("n_cells", f"must be a positive integer, got {n_cells!r}", "give the number of cells per side, e.g. 32")
    if not np.isfinite(box_size) or box_size <= 0:
        raise InputError("box_size", f"must be positive (comoving Mpc), got {box_size!r}", "e.g. box_size=64.0")
    if bubbles and box_size < 2 * p.R_BUBBLE_MAX:
        raise InputError("box_size", f"{box_size} Mpc is too small for the bubble scale: the minimum is 2 R_BUBBLE_MAX = {2 * p.R_BUBBLE_MAX:g} Mpc",
                         f"use box_size >= {2 * p.R_BUBBLE_MAX:g} Mpc or a smaller R_BUBBLE_MAX")
    if not np.isfinite(z) or z < 0:
        raise InputError("z", f"redshift must be >= 0, got {z!r}", "give a physical redshift")
    if z > 35:
        raise InputError("z", f"redshift {z} is above the model's range (35)", "use z <= 35")
    return p
