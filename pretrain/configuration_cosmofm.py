"""CosmoFMConfig: the backbone's and the pretraining objectives' hyper-parameters.

transformers-style configuration (see `configuration_vit.py`): every argument is
documented with its default and meaning, and the config round-trips through
`config.json`. `schema_version` lets later releases upgrade old checkpoints.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from cosmofm.data_cards.errors import InputError

SCHEMA_VERSION = 1
PIXEL_WEIGHTS = ("mask", "ivar", "ivar_local")  # kinds of the second input channel (see pixel_weight)


class CosmoFMConfig(PretrainedConfig):
    r"""
    Args:
        hidden_size (`int`, 256): width of tokens and of the transformer.
        num_hidden_layers (`int`, 4): transformer blocks shared by all modalities.
        num_attention_heads (`int`, 4): attention heads per block.
        mlp_ratio (`float`, 4.0): MLP hidden width / hidden_size.
        hidden_dropout_prob (`float`, 0.0): dropout after attention and MLP. 0 keeps
            pretraining deterministic across process layouts.
        attention_dropout (`float`, 0.0): dropout on attention weights.
        layer_norm_eps (`float`, 1e-6).
        initializer_range (`float`, 0.02): std of the truncated-normal weight init.
        spectrum_patch_size (`int`, 32): pixels per 1D spectrum token.
        pixel_weight (`str`, "mask"): second input channel of every pixel next to its value:
            "mask" (1 = measured, 0 = masked) or "ivar" (1/sigma relative to the sample's
            median, clipped to [0, 3]; tells noisy pixels such as sky lines from signal) or
            "ivar_local" (spectra only: 1/sigma relative to its running median over
            pixel_weight_window pixels, clipped the same way; sky lines and bad columns still
            read as noisy, but where the noise follows the source's counts the weight no longer
            carries the continuum's shape, e.g. a star's temperature or its reddening).
        pixel_weight_window (`int`, 101): pixels of the running median of "ivar_local" (>= 3);
            a feature narrower than about half of it reads as noisy or clean against its
            surroundings. Unused by the other kinds.
        spectrum_stem_channels (`int`, 0): channels of a small convolutional stem over the
            whole spectrum, pooled into each token (line widths and ratios at any redshift);
            0 = each token is a linear map of its pixels only.
        spectrum_stem_stride (`int`, 1): pixels per step of the stem's first convolution
            (kernel 2 x stride + 1, or spectrum_stem_kernel at stride 1, where the second
            convolution is dilated by 2); spectrum_patch_size must be a multiple of it.
        spectrum_stem_kernel (`int`, 9): kernel of the stem's second convolution (odd).
        image_patch_size (`int`, 8): pixels per side of a 2D image token (one band each).
        cube_patch_size (`list[int]`, [8, 8, 8]): (channels, y, x) per radio-cube token.
        field_patch_size (`list[int]`, [8, 8, 8]): (los, y, x) cells per simulated-field token.
        coord_frequencies (`int`, 12): Fourier frequencies per physical coordinate.
        survey_names (`list[str]`, []): data cards with their own learned embedding; samples
            of other cards share slot 0 ("other survey").
        mask_ratio (`float`, 0.5): fraction of tokens hidden for masked modelling.
        objectives (`list[str]`, ["masked", "contrastive"]): pretraining objectives to use.
        masked_loss (`str`, "log_chi2"): per-sample score of masked modelling: "log_chi2"
            (log of the reduced ivar-weighted chi-square, error scale profiled out) or
            "chi2" (the reduced chi-square itself).
        contrastive_weight (`float`, 0.1): weight of the cross-modal alignment loss.
        contrastive_temperature (`float`, 0.1): InfoNCE temperature.
        projection_dim (`int`, 128): width of the contrastive projection.
        cpu_kernels (`bool`, True): on CPU tensors, let the tokenizers take their CPU fast
            paths (`cpu_kernels.py`: a sorting network for the short medians of "ivar_local", the stem's
            convolutions channels last for oneDNN, a grid shared by the batch processed once),
            which give the reference path's tokens to float32 rounding. Other devices, and
            torch.compile, always run the reference path; False runs it on CPU too (to check
            or profile it). A choice of kernels, not of model: weights load either way.
        schema_version (`int`): version of this config's layout; see `SCHEMA_VERSION`.
    """

    model_type = "cosmofm"

    def __init__(
        self,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        mlp_ratio: float = 4.0,
        hidden_dropout_prob: float = 0.0,
        attention_dropout: float = 0.0,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        spectrum_patch_size: int = 32,
        pixel_weight: str = "mask",
        pixel_weight_window: int = 101,
        spectrum_stem_channels: int = 0,
        spectrum_stem_stride: int = 1,
        spectrum_stem_kernel: int = 9,
        image_patch_size: int = 8,
        cube_patch_size: list[int] | tuple[int, ...] = (8, 8, 8),
        field_patch_size: list[int] | tuple[int, ...] = (8, 8, 8),
        coord_frequencies: int = 12,
        survey_names: list[str] | None = None,
        mask_ratio: float = 0.5,
        objectives: list[str] | tuple[str, ...] = ("masked", "contrastive"),
        masked_loss: str = "log_chi2",
        contrastive_weight: float = 0.1,
        contrastive_temperature: float = 0.1,
        projection_dim: int = 128,
        cpu_kernels: bool = True,
        schema_version: int = SCHEMA_VERSION,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        unknown = set(objectives) - {"masked", "contrastive"}
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; use 'masked' and/or 'contrastive'")
        if masked_loss not in ("log_chi2", "chi2"):
            raise ValueError(f"masked_loss must be 'log_chi2' or 'chi2', got {masked_loss!r}")
        if pixel_weight not in PIXEL_WEIGHTS:
            raise InputError("pixel_weight", f"unknown kind {pixel_weight!r}", f"use one of {', '.join(PIXEL_WEIGHTS)}")
        if isinstance(pixel_weight_window, bool) or int(pixel_weight_window) != pixel_weight_window or pixel_weight_window < 3:
            raise InputError("pixel_weight_window", f"must be a whole number of pixels >= 3, got {pixel_weight_window!r}",
                             "use about the width of the narrowest continuum feature to keep, e.g. the default 101")
        if spectrum_stem_channels < 0 or spectrum_stem_stride < 1 or spectrum_stem_kernel < 1 or spectrum_stem_kernel % 2 == 0:
            raise ValueError(f"spectrum_stem_channels must be >= 0, spectrum_stem_stride >= 1 and spectrum_stem_kernel odd; got "
                             f"{spectrum_stem_channels}, {spectrum_stem_stride}, {spectrum_stem_kernel}")
        if not isinstance(cpu_kernels, bool):
            raise ValueError(f"cpu_kernels must be true or false, got {cpu_kernels!r}")
        if schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"this checkpoint has config schema_version {schema_version}, newer than this cosmofm "
                f"understands ({SCHEMA_VERSION}); upgrade cosmofm (pip install -U cosmofm)"
            )
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.spectrum_patch_size = int(spectrum_patch_size)
        self.pixel_weight = pixel_weight
        self.pixel_weight_window = int(pixel_weight_window)
        self.spectrum_stem_channels = int(spectrum_stem_channels)
        self.spectrum_stem_stride = int(spectrum_stem_stride)
        self.spectrum_stem_kernel = int(spectrum_stem_kernel)
        self.image_patch_size = int(image_patch_size)
        self.cube_patch_size = [int(p) for p in cube_patch_size]
        self.field_patch_size = [int(p) for p in field_patch_size]
        self.coord_frequencies = coord_frequencies
        self.survey_names = list(survey_names or [])
        self.mask_ratio = mask_ratio
        self.objectives = list(objectives)
        self.masked_loss = masked_loss
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        self.projection_dim = projection_dim
        self.cpu_kernels = cpu_kernels
        self.schema_version = schema_version
        super().__init__(**kwargs)
