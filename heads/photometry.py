"""Aperture photometry of image stamps as tensors, and the small network that reads it.

One implementation serves the photo-z head's photometry branch (in the forward pass, on
any device, differentiable) and the classical baselines beside it (`photoz_baseline`):

- **photometry from the pixels** (never the mock's truth fluxes): per band, the flux in
  circular apertures of radius 1" and 2" about the stamp centre (where catalogue stamps
  put the object) and its error sqrt(sum 1/ivar) over the pixels with ivar > 0;
- **asinh magnitudes** (Lupton, Gunn & Szalay 1999, AJ 118, 1406; softening = the
  aperture's 1-sigma noise), so faint and negative fluxes stay finite;
- **features**: the colours of adjacent bands and the reference band's magnitude in the
  largest aperture, then that band's smallest - largest aperture magnitude (a
  concentration, i.e. a size: sizes carry weak redshift information).

Why a photometry branch beside the image tokens: a redshift is read off colours, i.e.
differences of log fluxes between bands at the 0.01-0.05 mag level. The backbone sees
each band's pixels as separate linearly-scaled tokens, so a colour is a ratio between
tokens that attention must compute to 1 %; with a few hundred labels the fine-tuned
network does not get there (NMAD 0.05 against 0.016 for a small network on these
features, docs/benchmarks.md). Networks that take images and magnitudes together
("mixed-input", Henghes et al. 2022, MNRAS 512, 1696) beat either input alone; the
value of the backbone is then what the images add beyond the photometry, which the
photo-z benchmark measures against this branch alone (`photoz_baseline.MLPPhotoz`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

APERTURES_ARCSEC = (1.0, 2.0)  # radii; the last is the "total" flux
AB_NJY = 31.4  # AB magnitude of 1 nJy (the image cards' flux unit)


def aperture_photometry(values: torch.Tensor, ivar: torch.Tensor, dec_offset: torch.Tensor, ra_offset: torch.Tensor,
                        radii_arcsec: Sequence[float] = APERTURES_ARCSEC) -> tuple[torch.Tensor, torch.Tensor]:
    """(flux, error), each (n, B, R): the pixel sum inside circles of `radii_arcsec` about
    the stamp centre and its 1-sigma error sqrt(sum 1/ivar) (pixels with ivar 0 left out).

    values, ivar: (n, B, H, W) in the card's flux unit; dec_offset (n, H), ra_offset (n, W)
    in arcsec from the stamp centre. Computed in float32 whatever the input dtype."""
    r = torch.hypot(dec_offset.float()[:, :, None], ra_offset.float()[:, None, :])  # (n, H, W) arcsec
    radii = torch.tensor(list(radii_arcsec), dtype=torch.float32, device=values.device)
    inside = (r.unsqueeze(1) <= radii[None, :, None, None]).float()  # (n, R, H, W)
    good = ivar > 0
    var = torch.where(good, 1 / torch.where(good, ivar.float(), torch.ones_like(ivar, dtype=torch.float32)), 0.0)
    flux = torch.einsum("nbhw,nrhw->nbr", torch.where(good, values.float(), 0.0), inside)
    error = torch.einsum("nbhw,nrhw->nbr", var, inside).sqrt()
    return flux, error


def asinh_magnitude(flux: torch.Tensor, softening: torch.Tensor) -> torch.Tensor:
    """Lupton et al. (1999) asinh magnitude of a flux in nJy with softening b (nJy): ~AB
    magnitude when flux >> b, finite for flux <= 0."""
    return AB_NJY - 2.5 / math.log(10) * (torch.asinh(flux / (2 * softening)) + softening.log())


def reference_band_index(band_names: Sequence[str], reference: str = "r") -> int:
    """Index of the band named `reference` (or ending in "-r", e.g. "lsst-r"); the middle band when there is none."""
    names = [str(b) for b in band_names]
    return next((i for i, b in enumerate(names) if b == reference or b.endswith(f"-{reference}")), len(names) // 2)


def photometry_features(values: torch.Tensor, ivar: torch.Tensor, dec_offset: torch.Tensor, ra_offset: torch.Tensor,
                        reference: int, radii_arcsec: Sequence[float] = APERTURES_ARCSEC) -> torch.Tensor:
    """(n, B + 1) features of (n, B, H, W) stamps: B - 1 adjacent-band colours and band
    `reference`'s magnitude in the largest aperture, then its smallest - largest aperture
    magnitude (a concentration)."""
    flux, error = aperture_photometry(values, ivar, dec_offset, ra_offset, radii_arcsec)
    mag = asinh_magnitude(flux, error.clamp(min=1e-3))  # (n, B, R)
    total = mag[..., -1]  # (n, B)
    return torch.cat([total[:, :-1] - total[:, 1:], total[:, reference:reference + 1],
                      mag[:, reference, :1] - mag[:, reference, -1:]], dim=-1)


class PhotometryBranch(nn.Module):
    """(n, B + 1) photometry features -> (n, hidden_size): standardised with the training
    set's mean and spread (`set_standardisation`; saved with the weights: colours spread by
    0.1-0.4 mag, and a network learns slowly and imprecisely from inputs that small or from
    noisy batch statistics), then two hidden layers (the architecture of ANNz-style photo-z
    networks, Collister & Lahav 2004, PASP 116, 345)."""

    def __init__(self, n_features: int, hidden_size: int, dropout: float):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.layers = nn.Sequential(nn.Linear(n_features, hidden_size), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Dropout(dropout))

    @torch.no_grad()
    def set_standardisation(self, features: torch.Tensor) -> None:
        """Standardise inputs with the mean and standard deviation of (n, F) training `features`."""
        features = features.float().to(self.feature_mean.device)
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features.float() - self.feature_mean) / self.feature_std)


__all__ = [
    "APERTURES_ARCSEC",
    "PhotometryBranch",
    "aperture_photometry",
    "asinh_magnitude",
    "photometry_features",
    "reference_band_index",
]
