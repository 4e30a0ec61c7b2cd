"""The mock gallery: one figure per modality, for the docs (docs/gallery/).

python -m cosmofm.gallery --out docs/gallery
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cosmofm.data_cards.mock import generate  # noqa: E402
from cosmofm.data_cards.mock_spectra import BROAD, NEBULAR, STELLAR  # noqa: E402
from cosmofm.data_cards.schema import load_card  # noqa: E402


def spectra_figure(out: Path, card_name: str = "sdss-like") -> Path:
    """One spectrum per class family, with its redshifted lines marked."""
    card = load_card(card_name)
    wanted = ["STAR_A0", "STAR_K5", "GALAXY", "GALAXY_STARFORMING", "GALAXY_AGN", "QSO_BROADLINE"]
    found = {}
    for s in generate(card, 400, seed=11):
        c = s.meta["labels"]["spectral_class"]
        if c in wanted and c not in found:
            found[c] = s
        if len(found) == len(wanted):
            break
    fig, axes = plt.subplots(len(wanted), 1, figsize=(10, 2.0 * len(wanted)), sharex=True)
    for ax, cls in zip(axes, wanted):
        s = found[cls]
        w, f = s.coords["wavelength"], s.values
        good = s.ivar > 0
        # NaN where pixels are masked or between the windows of a multi-window card, so no line bridges them
        gap = np.r_[False, np.diff(w) > 5 * np.median(np.diff(w))]
        shown = np.where(good & ~gap, f, np.nan)
        ax.plot(w, shown, lw=0.4, color="k")
        ax.plot(w, np.where(good & ~gap, 1 / np.sqrt(np.where(good, s.ivar, 1)), np.nan), lw=0.4, color="tab:red", alpha=0.6)
        z = s.meta["labels"]["redshift"]
        lines = STELLAR if cls.startswith("STAR") else (BROAD if cls.startswith("QSO") else NEBULAR)
        for name, lam in lines.items():
            lam = lam[0] if isinstance(lam, tuple) else lam
            if w[0] < lam * (1 + z) < w[-1]:
                ax.axvline(lam * (1 + z), color="tab:blue", lw=0.5, alpha=0.5)
                ax.text(lam * (1 + z), 0.92, name, transform=ax.get_xaxis_transform(), fontsize=5, rotation=90, va="top")
        lo, hi = np.percentile(f[good], [1, 99.5])
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.3 * (hi - lo))
        ax.set_ylabel("f_lambda\n[1e-17 cgs]", fontsize=7)
        ax.set_title(f"{cls}  z = {z:.4f}", fontsize=8, loc="left")
    axes[-1].set_xlabel("vacuum wavelength [Angstrom]")
    fig.suptitle(f"mock spectra, {card.name} (R = {card.resolving_power:g}); red: 1-sigma noise", fontsize=9)
    fig.tight_layout()
    path = out / f"spectra_{card.name}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def images_figure(out: Path, card_name: str = "lsst-like") -> Path:
    card = load_card(card_name)
    samples = list(generate(card, 6, seed=11))
    fig, axes = plt.subplots(len(samples), len(card.bands), figsize=(1.4 * len(card.bands), 1.4 * len(samples)))
    for row, s in zip(axes, samples):
        for ax, band, img in zip(row, card.bands, s.values):
            ax.imshow(np.arcsinh(img / band.sky_noise), origin="lower", cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(s.meta["labels"].get("spectral_class", ""), fontsize=6)
    for ax, band in zip(axes[0], card.bands):
        ax.set_title(band.name, fontsize=8)
    fig.suptitle(f"mock stamps, {card.name}, asinh(flux / sky noise)", fontsize=9)
    fig.tight_layout()
    path = out / f"images_{card.name}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def cube_figure(out: Path, card_name: str = "ska-hi-like") -> Path:
    card = load_card(card_name)
    s = next(generate(card, 1, seed=11))
    cube = s.values
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    mom0 = cube.sum(0) * card.channel_width.to_value("MHz")
    im = a.imshow(mom0, origin="lower", extent=[s.coords["ra_offset"][0], s.coords["ra_offset"][-1], s.coords["dec_offset"][0], s.coords["dec_offset"][-1]])
    fig.colorbar(im, ax=a, label="Jy/beam MHz")
    a.set(xlabel="RA offset [arcsec]", ylabel="Dec offset [arcsec]", title="moment 0")
    peak = np.unravel_index(np.argmax(mom0), mom0.shape)
    b.step(s.coords["frequency"] / 1e6, cube[:, peak[0], peak[1]] * 1e6, where="mid", lw=0.8)
    b.set(xlabel="frequency [MHz]", ylabel="Jy/beam x 1e-6", title="spectrum at the peak")
    fig.suptitle(f"mock HI cube chunk, {card.name}", fontsize=9)
    fig.tight_layout()
    path = out / f"cube_{card.name}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def field_figure(out: Path, card_name: str = "lightcone-21cm") -> Path:
    card = load_card(card_name)
    s = next(generate(card, 1, seed=11))
    tb = s.values
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    im = a.imshow(tb[:, tb.shape[1] // 2, :].T, origin="lower", aspect="auto", cmap="viridis",
                  extent=[s.coords["los_distance"][0], s.coords["los_distance"][-1], s.coords["x_comoving"][0], s.coords["x_comoving"][-1]])
    fig.colorbar(im, ax=a, label="dTb [mK]")
    a.set(xlabel="line-of-sight comoving distance [Mpc]", ylabel="x [Mpc]", title="lightcone slice")
    cell = float(np.diff(s.coords["x_comoving"])[0])
    k, pk = spherical_power(tb - tb.mean(), cell)
    b.loglog(k, k**3 * pk / (2 * np.pi**2), marker=".")
    b.set(xlabel="k [1/Mpc]", ylabel="Delta^2(k) [mK^2]", title="21cm power spectrum")
    fig.suptitle(f"mock 21cm lightcone chunk, {card.name}", fontsize=9)
    fig.tight_layout()
    path = out / f"field_{card.name}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def spherical_power(field: np.ndarray, cell: float, n_bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Spherically averaged power spectrum of a cubic-cell field (units^2 Mpc^3)."""
    f = np.fft.fftn(field) * cell**3
    volume = field.size * cell**3
    power = np.abs(f) ** 2 / volume
    k = np.sqrt(sum(g**2 for g in np.meshgrid(*[2 * np.pi * np.fft.fftfreq(n, cell) for n in field.shape], indexing="ij")))
    edges = np.geomspace(k[k > 0].min(), k.max(), n_bins + 1)
    idx = np.digitize(k.ravel(), edges)
    centres, values = [], []
    for i in range(1, n_bins + 1):
        sel = idx == i
        if sel.any():
            centres.append(k.ravel()[sel].mean())
            values.append(power.ravel()[sel].mean())
    return np.array(centres), np.array(values)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/gallery")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [spectra_figure(out), spectra_figure(out, "4most-hrs"), images_figure(out), cube_figure(out), field_figure(out)]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
