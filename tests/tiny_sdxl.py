"""A tiny random-weight SDXL pipeline built from configs, for tests (no download).

``save_tiny_sdxl(folder)`` writes a diffusers folder: a UNet with SDXL's text-time conditioning
(``addition_embed_type="text_time"``), two CLIP text encoders (the second with a projection, its
pooled output is SDXL's ``text_embeds``) with tokenizers made from local files, an AutoencoderKL with
``force_upcast``, and SDXL's EulerDiscreteScheduler config. 32 x 32 images, 16 x 16 x 4 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_sd import MAX_TOKENS, _tokenizer

HIDDEN = 32


def _clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=HIDDEN, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=MAX_TOKENS,
        projection_dim=HIDDEN, hidden_act="gelu",
    )


def build_tiny_sdxl(tmp: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=HIDDEN + 6 * 8,
        cross_attention_dim=2 * HIDDEN, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, layers_per_block=1,
        norm_num_groups=4, sample_size=32, scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(  # SDXL base 1.0's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
    )
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=CLIPTextModel(_clip_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()).eval(),
        tokenizer=_tokenizer(tmp / "tokenizer_src"),
        tokenizer_2=_tokenizer(tmp / "tokenizer_2_src"),
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )


def save_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    folder = Path(folder)
    build_tiny_sdxl(folder.parent / f"{folder.name}_src", seed).save_pretrained(folder, safe_serialization=True)
    return folder
