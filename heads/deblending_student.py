"""The deblending head's fast path: a small convolutional student in place of backbone + decoder.

The head's readable path (`CosmoFMForDeblending.forward`) runs the backbone over 6 bands x
64 patches = 384 tokens a 64 x 64 stamp and a decoder at full resolution: ~7x the time of
sep on the same stamps (docs/benchmarks.md, deblending). `PixelStudent` computes the same
`DenseOutputs` (heatmap, offsets, embeddings, amplitudes, sizes, corrections) from the
decoder's own pixel input (`deblending_net.normalised_pixels`) with a U-Net of a few
channels (Ronneberger et al. 2015, arXiv:1505.04597), so everything after them (peaks,
the split, the refiner, the fluxes) is the head's, unchanged. It is trained by
distillation (Hinton et al. 2015, arXiv:1503.02531) from the head's own outputs on the
training blends, beside the head's task loss (`distillation_loss`), the backbone,
decoder and refiner frozen (a student with its own, narrower refiner also learns the head's
refined fractions): a speed option chosen by flag (`deblend_samples(student=True)`,
`cosmofm deblend --student`), measured against the readable path in
`scripts/bench/deblend_student.py`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cosmofm.heads.deblending_net import DenseOutputs, SplitRefiner, _conv, dense_outputs, output_convs


class PixelStudent(nn.Module):
    """Normalised pixels (n, 2B + 1 + P, H8, W8) -> `DenseOutputs` cropped to (H, W).

    Encoder: per level two 3 x 3 convolutions, the first of each level below the top with
    stride 2 (`widths` channels per level: 4 levels reach 1/8 of the stamp, the token grid's
    scale, and a receptive field of ~70 pixels, several galaxies across). Decoder, per level
    up: a 1 x 1 convolution to the level's width, bilinear x2 up, added to the encoder's
    features of that level (the skip, added as in feature pyramids, Lin et al. 2017,
    arXiv:1612.03144: concatenating tripled the cost of the full-resolution convolution),
    one 3 x 3 convolution; then the head's own 1 x 1 output convolutions (`output_convs`).

    `refiner`: the student's own `deblending_net.SplitRefiner` (narrower than the head's,
    which is ~40 % of the student path's time with it), used in place of the head's on the
    student's path; None: the head's refiner. Kept here so that everything the fast path
    trains lives under `student.`."""

    def __init__(self, n_bands: int, embed_size: int, widths: Sequence[int] = (16, 32, 48, 64), condition_planes: int = 0,
                 refiner: nn.Module | None = None):
        super().__init__()
        self.refiner = refiner
        widths = [int(w) for w in widths]
        self.n_bands, self.embed_size = n_bands, embed_size
        cin = 2 * n_bands + 1 + condition_planes
        self.down = nn.ModuleList([nn.Sequential(_conv(cin, widths[0]), _conv(widths[0], widths[0]))])
        for a, b in zip(widths[:-1], widths[1:]):
            self.down.append(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GELU(), _conv(b, b)))
        self.lateral = nn.ModuleList([nn.Conv2d(b, a, 1) for a, b in zip(widths[:-1], widths[1:])])  # level i+1 -> i's width
        self.up = nn.ModuleList([_conv(a, a) for a in widths[:-1]])
        self.out, self.correction = output_convs(widths[0], n_bands, embed_size)

    @classmethod
    def from_head(cls, head) -> "PixelStudent":
        """A fresh student for a `DeblendingHeadConfig`: its student_widths, and its own refiner
        of student_refine_channels (0: none, the head's is used) with the head's window and dilations."""
        planes = head.n_bands if head.psf_conditioning else 0
        refiner = None
        if head.student_refine_channels and head.refine_steps:
            refiner = SplitRefiner(head.n_bands, head.student_refine_channels, head.refine_window, head.refine_dilations, planes)
        return cls(head.n_bands, head.embed_size, head.student_widths, planes, refiner)

    def forward(self, pixels: torch.Tensor, shape: tuple[int, int]) -> DenseOutputs:
        skips, x = [], pixels
        for level in self.down:
            x = level(x)
            skips.append(x)
        for i in range(len(self.up) - 1, -1, -1):
            skip = skips[i]
            x = F.interpolate(self.lateral[i](x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[i](x + skip)
        return dense_outputs(x, self.out, self.correction, self.n_bands, self.embed_size, shape)


def distillation_loss(student: DenseOutputs, teacher: DenseOutputs) -> torch.Tensor:
    """How far the student's per-pixel outputs are from the head's: the heatmap as a binary
    cross-entropy against the head's probabilities (its far-negative logits in empty sky do
    not matter, only where sources are), every other field (offsets, background logits,
    embeddings, amplitudes, sizes, corrections) as a mean squared error, summed over fields."""
    loss = F.binary_cross_entropy_with_logits(student.heat, torch.sigmoid(teacher.heat))
    for name in ("offset", "background", "pixel_embedding", "source_embedding", "amplitude", "size", "correction"):
        loss = loss + F.mse_loss(getattr(student, name), getattr(teacher, name))
    return loss


__all__ = ["PixelStudent", "distillation_loss"]
