"""CosmoFM backbone: modality tokenizers -> one shared transformer encoder.

Written in the transformers style (`modeling_vit.py`): embeddings, layer, encoder,
pretrained-model base, model, and model-for-pretraining, in reading order. The
attention/MLP blocks follow nanoGPT (pre-LayerNorm, fused qkv, PyTorch's
scaled_dot_product_attention). Positions are not learned per index: every token's
position is the Fourier embedding of its physical coordinates (tokenizers.py).

Loading (`from_pretrained`, also through `AutoModel`) verifies a local folder's
manifest.json first when it has one, so a flipped byte in a release never loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from cosmofm.data_cards.sample import MODALITIES
from cosmofm.pretrain.checkpoint import MANIFEST_NAME
from cosmofm.pretrain.checkpoint import verify_manifest as check_manifest
from cosmofm.pretrain.configuration_cosmofm import CosmoFMConfig
from cosmofm.pretrain.data import CosmoFMBatch
from cosmofm.pretrain.tokenizers import TOKENIZERS, TokenGroup


def masked_token_mean(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, D) mean of tokens (N, T, D) over the valid ones (N, T) bool: the backbone's pooled
    embedding (of its last, normed tokens), and any other layer's token mean."""
    keep = valid.unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)


@dataclass
class CosmoFMOutput(ModelOutput):
    """What the backbone returns; every head and objective consumes this.

    last_hidden_state: (N, T, D) tokens after the encoder, rows in batch order,
        padded to the longest sample (see attention_mask).
    pooled: (N, D) mean of each sample's valid tokens.
    attention_mask: (N, T) bool, True for real tokens.
    token_coords: (N, T, C_max) physical coordinate features of each token (zero-padded).
    token_mask: (N, T) bool, True where the token's content was hidden (masked modelling).
    token_groups: per (modality, shape) group, its tokens' targets and rows.
    """

    last_hidden_state: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    token_coords: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    token_groups: list[TokenGroup] | None = None


class CosmoFMEmbeddings(nn.Module):
    """Tokenizers + mask token + modality and survey embeddings -> (N, T, D) tokens."""

    def __init__(self, config: CosmoFMConfig):
        super().__init__()
        self.tokenizers = nn.ModuleDict({m: TOKENIZERS[m](config) for m in MODALITIES})
        self.mask_token = nn.Parameter(torch.zeros(config.hidden_size))
        self.modality_embedding = nn.Embedding(len(MODALITIES), config.hidden_size)
        self.survey_embedding = nn.Embedding(len(config.survey_names) + 1, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, batch: CosmoFMBatch, mask_ratio: float = 0.0):
        groups = [self.tokenizers[g.modality](g, mask_ratio, batch.sample_seeds[g.rows]) for g in batch.groups]
        n = len(batch)
        t_max = max(g.content.shape[1] for g in groups)
        c_max = max(g.coords.shape[2] for g in groups)
        ref = groups[0].content
        tokens = ref.new_zeros(n, t_max, ref.shape[-1])
        attention_mask = torch.zeros(n, t_max, dtype=torch.bool, device=ref.device)
        token_mask = torch.zeros(n, t_max, dtype=torch.bool, device=ref.device)
        coords = torch.zeros(n, t_max, c_max, dtype=torch.float64, device=ref.device)
        for g in groups:
            t = g.content.shape[1]
            content = g.content
            if g.hidden is not None:  # masked modelling: hidden tokens carry only the mask token
                content = torch.where(g.hidden.unsqueeze(-1), self.mask_token.to(content.dtype), content)
                token_mask[g.rows, :t] = g.hidden
            modality = self.modality_embedding.weight[MODALITIES.index(g.modality)]
            tokens[g.rows, :t] = (content + g.position + modality).to(tokens.dtype)
            attention_mask[g.rows, :t] = True
            coords[g.rows, :t, : g.coords.shape[2]] = g.coords
        tokens = tokens + self.survey_embedding(batch.survey_ids).unsqueeze(1)
        return self.dropout(tokens), attention_mask, token_mask, coords, groups


class CosmoFMAttention(nn.Module):
    def __init__(self, config: CosmoFMConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class CosmoFMMLP(nn.Module):
    def __init__(self, config: CosmoFMConfig):
        super().__init__()
        inner = int(config.mlp_ratio * config.hidden_size)
        self.fc = nn.Linear(config.hidden_size, inner)
        self.proj = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class CosmoFMLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: CosmoFMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CosmoFMAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CosmoFMMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), attn_mask))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class CosmoFMEncoder(nn.Module):
    def __init__(self, config: CosmoFMConfig):
        super().__init__()
        self.layers = nn.ModuleList([CosmoFMLayer(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """x (N, T, D) tokens; attention_mask (N, T) bool, True for real tokens, or None when
        no sample is padded (SDPA's fast kernels take no mask)."""
        attn_mask = None if attention_mask is None else attention_mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return self.ln_f(x)


class CosmoFMPreTrainedModel(PreTrainedModel):
    config_class = CosmoFMConfig
    base_model_prefix = "cosmofm"
    main_input_name = "batch"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CosmoFMLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, verify_manifest: bool = True, **kwargs):
        """transformers' loader; a local folder with a manifest.json (every cosmofm release and
        run `model/` folder has one) is first checked against it: config.json and every
        weights file must be listed and match their sha256, else an InputError names the file.

        `verify_manifest=False` is for a caller that has just verified the folder itself
        (`cosmofm.from_pretrained`). Hub repo ids are downloaded by transformers without
        the manifest; `cosmofm.from_pretrained` is the verified path for those.
        """
        if verify_manifest and isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            if (folder / MANIFEST_NAME).is_file():
                weights = sorted(p.name for p in folder.glob("model*.safetensors*"))
                check_manifest(folder, required=("config.json", *weights))
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, CosmoFMEmbeddings):
            nn.init.trunc_normal_(module.mask_token, std=std, a=-2 * std, b=2 * std)

    def parameter_groups(self, lr: float, weight_decay: float, layer_decay: float = 1.0, head_lr: float | None = None) -> list[dict]:
        """AdamW parameter groups of the trainable (`requires_grad`) parameters, each in one group.

        Weight decay on matrices only: none on biases, norms or other 1-D parameters.
        Layer-wise LR decay (ELECTRA, Clark et al. 2020; BEiT) over the backbone's
        `layer_groups()`: the last block and the final norm get `lr`, the block k below
        the last `lr * layer_decay**k`, the embeddings `lr * layer_decay**num_blocks`
        (the smallest). Parameters outside the backbone (a task head, the pretraining
        objectives) get `head_lr`, default `lr`. Groups of one LR and kind (decayed or
        not) are merged, in the model's parameter order: at layer_decay 1 without
        head_lr that is [matrices, the rest], as the pretraining optimizer state has it.
        """
        backbone = self.base_model  # the CosmoFMModel itself, or a head model's `cosmofm` (peft-wrapped under LoRA)
        layers = backbone.layer_groups()
        n_blocks = len(layers) - 2  # embeddings, blocks, final norm
        tiers = [(layer.parameters(), lr * layer_decay ** max(n_blocks - i, 0)) for i, layer in enumerate(layers)]
        in_backbone = {id(p) for p in backbone.parameters()}
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        assert in_layers == in_backbone, "layer_groups() must cover every backbone parameter"
        tiers.append(((p for p in self.parameters() if id(p) not in in_backbone), lr if head_lr is None else head_lr))
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for params, tier_lr in tiers:
            trainable = [p for p in params if p.requires_grad]
            for decayed in (True, False):
                chosen = [p for p in trainable if (p.dim() >= 2) == decayed]
                if chosen:
                    groups.setdefault((tier_lr, decayed), []).extend(chosen)
        return [{"params": params, "lr": tier_lr, "weight_decay": weight_decay if decayed else 0.0} for (tier_lr, decayed), params in groups.items()]


class CosmoFMModel(CosmoFMPreTrainedModel):
    """The backbone: a mixed-modality `CosmoFMBatch` in, `CosmoFMOutput` out."""

    def __init__(self, config: CosmoFMConfig):
        super().__init__(config)
        self.embeddings = CosmoFMEmbeddings(config)
        self.encoder = CosmoFMEncoder(config)
        self.post_init()

    def layer_groups(self) -> list[nn.Module]:
        """Embeddings, then each block, then the final norm: for n_blocks / LR decay."""
        return [self.embeddings, *self.encoder.layers, self.encoder.ln_f]

    def forward(self, batch: CosmoFMBatch, mask_ratio: float = 0.0) -> CosmoFMOutput:
        if not isinstance(batch, CosmoFMBatch):
            raise TypeError(f"CosmoFMModel takes a CosmoFMBatch (see cosmofm.pretrain.collate_samples), got {type(batch).__name__}")
        tokens, attention_mask, token_mask, coords, groups = self.embeddings(batch, mask_ratio)
        # Padding is known from the groups' shapes, without reading the mask back from the device.
        padded = sum(len(g.rows) for g in groups) < len(batch) or any(g.content.shape[1] < tokens.shape[1] for g in groups)
        hidden = self.encoder(tokens, attention_mask if padded else None)  # (N, T, D)
        return CosmoFMOutput(
            last_hidden_state=hidden,
            pooled=masked_token_mean(hidden, attention_mask),
            attention_mask=attention_mask,
            token_coords=coords,
            token_mask=token_mask,
            token_groups=groups,
        )

    def estimate_flops_per_token(self, n_tokens: int) -> float:
        """Training FLOPs per token (6N + attention), as in PaLM appendix B."""
        d, layers = self.config.hidden_size, self.config.num_hidden_layers
        dense = sum(p.numel() for n, p in self.encoder.named_parameters() if p.dim() == 2)
        return 6 * dense + 12 * layers * d * n_tokens


@dataclass
class CosmoFMPretrainingOutput(ModelOutput):
    """loss = masked chi-square + contrastive_weight * contrastive (when each is active)."""

    loss: torch.Tensor | None = None
    masked_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    per_sample_chi2: torch.Tensor | None = None
    per_modality: dict | None = None
    backbone: CosmoFMOutput | None = None


class CosmoFMForPretraining(CosmoFMPreTrainedModel):
    """Backbone + the self-supervised objectives named in `config.objectives`."""

    def __init__(self, config: CosmoFMConfig):
        super().__init__(config)
        from cosmofm.pretrain.objectives import ContrastiveAlignment, MaskedReconstruction

        self.cosmofm = CosmoFMModel(config)
        self.masked = MaskedReconstruction(config) if "masked" in config.objectives else None
        self.contrastive = ContrastiveAlignment(config) if "contrastive" in config.objectives else None
        self.post_init()

    def forward(self, batch: CosmoFMBatch) -> CosmoFMPretrainingOutput:
        mask_ratio = self.config.mask_ratio if self.masked is not None else 0.0
        out = self.cosmofm(batch, mask_ratio=mask_ratio)
        loss = out.pooled.new_zeros((), dtype=torch.float32)
        masked_loss = contrastive_loss = per_sample = None
        per_modality = {}
        if self.masked is not None:
            masked_loss, per_sample, per_modality = self.masked(out)
            loss = loss + masked_loss
        if self.contrastive is not None:
            contrastive_loss = self.contrastive(out, batch.pair_ids)
            if contrastive_loss is not None:
                loss = loss + self.config.contrastive_weight * contrastive_loss
        return CosmoFMPretrainingOutput(
            loss=loss,
            masked_loss=masked_loss,
            contrastive_loss=contrastive_loss,
            per_sample_chi2=per_sample,
            per_modality=per_modality,
            backbone=out,
        )
