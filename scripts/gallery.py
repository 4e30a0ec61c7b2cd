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

from cosmofm.data_cards.mocks.generators import generate  # noqa: E402
from cosmofm.data_cards.mocks.spectra import BROAD, NEBULAR, STELLAR  # noqa: E402
from cosmofm.data_cards.mocks.blends import mock_blend  # noqa: E402
from cosmofm.data_cards.schema import load_card  # noqa: E402
from cosmofm.data_cards.mocks.sim21cm import power_spectrum  # noqa: E402


def _save(fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


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
    return _save(fig, f"mock spectra, {card.name} (R = {card.resolving_power:g}); red: 1-sigma noise", out / f"spectra_{card.name}.png")


def images_figure(out: Path, card_name: str = "lsst-like") -> Path:
    card = load_card(card_name)
    samples = list(generate(card, 6, seed=11))
    fig, axes = plt.subplots(len(samples), len(card.bands), figsize=(1.4 * max(len(card.bands), 2), 1.4 * len(samples)), squeeze=False)
    for row, s in zip(axes, samples):
        for ax, band, img in zip(row, card.bands, s.values):
            ax.imshow(np.arcsinh(img / band.sky_noise), origin="lower", cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(s.meta["labels"].get("spectral_class", ""), fontsize=6)
    for ax, band in zip(axes[0], card.bands):
        ax.set_title(band.name, fontsize=8)
    return _save(fig, f"mock stamps, {card.name}, asinh(flux / sky noise)", out / f"images_{card.name}.png")


def blends_figure(out: Path, card_name: str = "lsst-like") -> Path:
    """Blends of 2-4 objects: the observed stamp, each object's truth image, the segmentation."""
    card = load_card(card_name)
    r = [b.name for b in card.bands].index("r") if "r" in [b.name for b in card.bands] else 0
    rows = [mock_blend(card, 21, i, separation=(0.6, 2.0), delta_mag=(0.0, 2.0)) for i in range(4)]
    n_cols = 2 + max(len(t.isolated) for _, t in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.5 * n_cols, 1.5 * len(rows)))
    for ax_row, (sample, truth) in zip(axes, rows):
        noise = card.bands[r].sky_noise
        ax_row[0].imshow(np.arcsinh(sample.values[r] / noise), origin="lower", cmap="gray")
        for k, iso in enumerate(truth.isolated):
            ax_row[1 + k].imshow(np.arcsinh(iso[r] / noise), origin="lower", cmap="gray")
            ax_row[1 + k].set_title(f"obj {k}: {truth.flux_njy[k, r] / 1e3:.0f} uJy", fontsize=6)
        ax_row[-1].imshow(truth.segmentation, origin="lower", cmap="tab10", interpolation="nearest")
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in ax_row[1 + len(truth.isolated) : -1]:
            ax.axis("off")
    axes[0][0].set_title("blend (r)", fontsize=7)
    axes[0][-1].set_title("segmentation", fontsize=7)
    return _save(fig, f"mock blends, {card.name}: observed, truth per object, segmentation", out / f"blends_{card.name}.png")


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
    return _save(fig, f"mock HI cube chunk, {card.name}", out / f"cube_{card.name}.png")


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
    k, delta2, _ = power_spectrum(tb, cell, dimensionless=True)
    b.loglog(k, delta2, marker=".")
    b.set(xlabel="k [1/Mpc]", ylabel="Delta^2(k) [mK^2]", title="21cm power spectrum")
    return _save(fig, f"mock 21cm lightcone chunk, {card.name}", out / f"field_{card.name}.png")


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/gallery")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        spectra_figure(out), spectra_figure(out, "4most-hrs"), images_figure(out), images_figure(out, "euclid-like"),
        blends_figure(out), cube_figure(out), field_figure(out),
    ]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
