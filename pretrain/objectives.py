"""Self-supervised objectives, each a module chosen by `config.objectives`.

- MaskedReconstruction: predict the hidden tokens' normalised values, scored by the
  ivar-weighted chi-square per degree of freedom of each sample (a perfect model sits
  at ~1, the noise floor). By default each sample contributes log(chi2/dof): the
  Gaussian likelihood with the sample's error scale profiled out, which keeps an
  S/N~300 galaxy stamp from drowning the S/N~3 HI cube in the same batch
  (`config.masked_loss = "chi2"` optimises the plain reduced chi-square instead).
- ContrastiveAlignment: InfoNCE between pooled embeddings of the same object seen in
  two modalities (`pair_id`), with in-batch negatives gathered over all processes so
  the loss does not depend on how the batch is split.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from cosmofm.data_cards.sample import MODALITIES
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.tokenizers import TOKENIZERS

if TYPE_CHECKING:
    from cosmofm.pretrain.modeling_cosmofm import CosmoFMOutput


class MaskedReconstruction(nn.Module):
    def __init__(self, config: CosmoFMConfig):
        super().__init__()
        self.log_loss = config.masked_loss == "log_chi2"
        self.decoders = nn.ModuleDict(
            {m: nn.Linear(config.hidden_size, TOKENIZERS[m](config).patch_size) for m in MODALITIES}
        )

    def forward(self, output: "CosmoFMOutput") -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (loss, per-sample reduced chi-square (N,), per-modality mean reduced chi-square
        over the samples with hidden measured pixels; NaN for a modality with none)."""
        hidden_states = output.last_hidden_state
        n = hidden_states.shape[0]
        per_sample = hidden_states.new_zeros(n, dtype=torch.float32)
        has_dof = torch.zeros(n, dtype=torch.bool, device=hidden_states.device)
        per_modality = {}
        for g in output.token_groups:
            t = g.patches.shape[1]
            pred = self.decoders[g.modality](hidden_states[g.rows, :t]).float()  # (n_g, t, P)
            hidden = output.token_mask[g.rows, :t].unsqueeze(-1)  # (n_g, t, 1)
            weight = g.patch_ivar * hidden  # only the masked tokens count
            chi2 = (weight * (pred - g.patches) ** 2).sum((1, 2))
            dof = (weight > 0).sum((1, 2))
            reduced = chi2 / dof.clamp(min=1)
            per_sample = per_sample.index_put((g.rows,), reduced)
            has_dof = has_dof.index_put((g.rows,), dof > 0)
            counted = (dof > 0).to(reduced.dtype)
            per_modality[g.modality] = ((reduced * counted).sum() / counted.sum()).detach()  # 0 / 0 = NaN: none counted
        per_sample_loss = per_sample.clamp(min=1e-6).log() if self.log_loss else per_sample
        # Mean over the local batch: with equal local batches, DDP's gradient average
        # then equals the gradient of the mean over the global batch.
        loss = (per_sample_loss * has_dof).sum() / n
        return loss, per_sample.detach(), per_modality


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank (gloo and nccl)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch of `x` (rows of rank 0 first), differentiable."""
    return _GatherWithGrad.apply(x) if _distributed() else x


def gather_labels(labels: list) -> list:
    """The global batch of a list of picklable labels, in the same order."""
    if not _distributed():
        return labels
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, labels)
    return [label for part in parts for label in part]


class ContrastiveAlignment(nn.Module):
    def __init__(self, config: CosmoFMConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.projection_dim)
        self.temperature = config.contrastive_temperature

    def forward(self, output: "CosmoFMOutput", pair_ids: list[str]) -> torch.Tensor | None:
        """Mean InfoNCE over samples that have a partner in another modality; None when no
        pair id occurs twice (known on the host), 0 when pairs share their modality."""
        z = F.normalize(self.proj(output.pooled).float(), dim=-1)  # (n, P)
        # pair ids are host-side labels: gathered and coded on the host
        pid_all = gather_labels(list(pair_ids))
        if not any(count > 1 for p, count in Counter(pid_all).items() if p):
            return None
        codes = {p: i for i, p in enumerate(dict.fromkeys(pid_all))}
        pid = torch.tensor([codes[p] if p else -1 for p in pid_all], device=z.device)  # (n,)
        modality = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)  # rows' modalities, on the device
        for g in output.token_groups:
            modality[g.rows] = MODALITIES.index(g.modality)
        z_all, mod = gather_with_grad(z), gather_with_grad(modality)  # (n, P), (n,)
        n = len(pid)
        positive = (pid[:, None] == pid[None, :]) & (pid[:, None] >= 0) & (mod[:, None] != mod[None, :])  # (n, n)
        anchors = positive.any(1)
        logits = z_all @ z_all.T / self.temperature  # (n, n)
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
        log_prob = logits.log_softmax(dim=1)
        partners = positive | ~anchors[:, None]  # a row without one takes every row instead: finite, then left out
        pos_log_prob = torch.logsumexp(log_prob.masked_fill(~partners, float("-inf")), dim=1)
        # Every rank computes the same global loss; _GatherWithGrad sums its gradients
        # over ranks and DDP averages them, which gives the single-process gradient.
        return -(pos_log_prob * anchors).sum() / anchors.sum().clamp(min=1)
