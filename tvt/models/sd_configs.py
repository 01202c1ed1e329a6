"""Architecture configurations (constructor kwargs) of every network the project builds.

Paper mode uses Stable Diffusion 2.1-base's own configurations — on a cluster its weights
come from ``from_pretrained``; here they build the models on the meta device for the
complexity table. Mini mode uses tiny networks of the *same architecture families*
(same block types, same number of resolution levels, attention at the same places), so
every code path is exercised on a CPU in seconds.

All values are plain dicts: ``AutoencoderKL(**SD21_BASE_VAE)``,
``UNet2DConditionModel(**SD21_BASE_UNET)``, ``VAED4(**VAE_D4_PAPER)``.
"""

from __future__ import annotations

_SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# stabilityai/stable-diffusion-2-1-base, vae/config.json: 83.65 M parameters, 8x ("VAE-D8").
SD21_BASE_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 768,  # as on the hub; only AutoencoderKL's optional tiling reads it
    "scaling_factor": 0.18215,
}

# stabilityai/stable-diffusion-2-1-base, unet/config.json: 865.9 M parameters.
# (diffusers reads SD 2.x's ``attention_head_dim`` as the number of heads: 5/10/20/20 heads of 64.)
SD21_BASE_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
    "down_block_types": _SD_DOWN_BLOCKS,
    "up_block_types": _SD_UP_BLOCKS,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# TVT's compact 4x VAE (docs/method.md §1.1): no mid-block, no attention.
VAE_D4_PAPER = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "encoder_channels": (128, 256, 256),
    "encoder_layers_per_block": 2,
    "decoder_channels": (256, 256, 128),
    "decoder_layers_per_block": 3,
    "mid_block": False,
    "mid_block_attention": False,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

# Paper ablation V1: wider last stage (512) plus SD's mid-block with attention.
VAE_D4_V1 = {
    **VAE_D4_PAPER,
    "encoder_channels": (128, 256, 512),
    "decoder_channels": (512, 256, 128),
    "mid_block": True,
    "mid_block_attention": True,
}

# Paper ablation V2: wider last stage (512), no mid-block.
VAE_D4_V2 = {**VAE_D4_PAPER, "encoder_channels": (128, 256, 512), "decoder_channels": (512, 256, 128)}

# ---- mini mode: same families, a few hundred thousand to a few million parameters ----

# SD's VAE at 1/8 of its widths: (128, 256, 512, 512) -> (16, 32, 64, 64), the same 1:2:4:4 shape. The
# full-resolution level is where the training time goes: at (32, 64, 64, 64) an update cost ~3x as much,
# and every VAE stage of mini mode is compute-bound (docs/mini-mode.md, "Widths").
MINI_VAE_D8 = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 64, 64),
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}

MINI_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 32,
    "down_block_types": _SD_DOWN_BLOCKS,
    "up_block_types": _SD_UP_BLOCKS,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4, 4, 4),
    "use_linear_projection": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# MINI_VAE_D8's first three widths. Not VAE_D4_PAPER's shape (SD's third width halved): at (16, 32, 32)
# the mini E4 reconstructed the test windows at 20.97 dB against 24.97 dB at these widths, the same run
# otherwise (docs/mini-mode.md, "Widths").
MINI_VAE_D4 = {
    **VAE_D4_PAPER,
    "encoder_channels": (16, 32, 64),
    "encoder_layers_per_block": 1,
    "decoder_channels": (64, 32, 16),
    "decoder_layers_per_block": 2,
    "norm_num_groups": 8,
}

# Mini mode's V1 / V2: MINI_VAE_D4 with its last stage doubled (64 -> 128), as V1/V2 double the paper's (256 -> 512)
MINI_VAE_D4_V1 = {**MINI_VAE_D4, "encoder_channels": (16, 32, 128), "decoder_channels": (128, 32, 16),
                  "mid_block": True, "mid_block_attention": True}
MINI_VAE_D4_V2 = {**MINI_VAE_D4, "encoder_channels": (16, 32, 128), "decoder_channels": (128, 32, 16)}

# ---- StableSR's time-aware encoder (tvt.models.stablesr.TimeAwareEncoder) ----

# StableSR's ``EncoderUNetModelWT`` (configs/stableSRNew/v2-finetune_text_T_512.yaml): model
# channels 256, mults (1, 1, 2, 2), 2 res blocks per level, 4 attention heads, attention where
# ``attention_resolutions: [4, 2, 1]`` puts it — at downsampling factors 1, 2, 4, i.e. the
# three *finest* of the four levels (where SD's UNet has its transformers too) — and a
# mid-block with attention; every level's feature is mapped to 256 channels.
STABLESR_ENCODER_PAPER = {
    "in_channels": 4,
    "block_out_channels": (256, 256, 512, 512),
    "down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "layers_per_block": 2,
    "out_channels": 256,
    "num_attention_heads": 4,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# Mini mode: the same family for MINI_UNET (4 levels, norm groups of 8).
STABLESR_ENCODER_MINI = {
    **STABLESR_ENCODER_PAPER,
    "block_out_channels": (16, 16, 32, 32),
    "layers_per_block": 1,
    "out_channels": 16,
    "num_attention_heads": 2,
    "norm_num_groups": 8,
}

# The trainable part of StableSR (encoder + SFT heads; tvt.models.stablesr.StableSRConditioner):
# ``StableSRConditioner.for_unet(unet, **STABLESR_CONDITIONER_PAPER)``. StableSR's SFT layers
# (its ``SPADE``) have 128 hidden channels and GroupNorm(32) the feature first; mini mode keeps
# the plain SFT equation, whose zero-initialised heads start exactly at the prior.
STABLESR_CONDITIONER_PAPER = {"encoder_config": STABLESR_ENCODER_PAPER, "sft_hidden_channels": 128,
                              "sft_norm_groups": 32}
STABLESR_CONDITIONER_MINI = {"encoder_config": STABLESR_ENCODER_MINI, "sft_hidden_channels": 16}
