"""A tiny random-weight FLUX.1 pipeline built from configs, for tests (no download).

``save_tiny_flux(folder, guidance_embeds=True)`` writes a diffusers folder: a FluxTransformer2DModel
(dev-like with the distilled guidance embedding, schnell-like without), CLIP and T5 text encoders
with tokenizers that need no download (CLIP from a local vocab.json / merges.txt, ``ByT5Tokenizer()``
for T5), a 16-channel-style AutoencoderKL with a shift factor, and FLUX.1's scheduler config
(dynamic shifting). 32 x 32 images, 16 x 16 x 4 latents packed into 8 x 8 tokens of 2 x 2 patches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_sd import MAX_TOKENS, _tokenizer

HIDDEN = 32


def build_tiny_flux(tmp: Path, seed: int = 0, guidance_embeds: bool = True):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=HIDDEN, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=MAX_TOKENS,
        projection_dim=HIDDEN, hidden_act="gelu",
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=384, d_model=HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, layers_per_block=1,
        norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=_tokenizer(tmp / "tokenizer_src"), text_encoder_2=t5.eval(), tokenizer_2=ByT5Tokenizer(),
        transformer=transformer.eval(),
    )


def save_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    folder = Path(folder)
    build_tiny_flux(folder.parent / f"{folder.name}_src", seed, guidance_embeds).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_kontext(folder: Path, seed: int = 0) -> Path:
    """A tiny FLUX.1 Kontext folder: the dev-like parts of :func:`build_tiny_flux` in a FluxKontextPipeline."""
    from diffusers import FluxKontextPipeline

    folder = Path(folder)
    parts = build_tiny_flux(folder.parent / f"{folder.name}_src", seed, guidance_embeds=True).components
    FluxKontextPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder
