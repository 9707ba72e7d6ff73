"""A tiny random-weight Stable Diffusion 3 pipeline built from configs, for tests (no download).

``save_tiny_sd3(folder, t5=True)`` writes a diffusers folder: an SD3Transformer2DModel, two CLIP text
encoders with projections (tokenizers from local vocab.json / merges.txt), optionally a T5 encoder
with ``ByT5Tokenizer()`` (no files needed; ``t5=False`` leaves it out, as SD3 allows), a VAE with a
shift factor and SD3's FlowMatchEulerDiscreteScheduler config (static shift 3.0). 32 x 32 images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_sd import MAX_TOKENS, _tokenizer

HIDDEN = 32


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=HIDDEN, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=MAX_TOKENS,
        projection_dim=HIDDEN, hidden_act="gelu",
    )).eval()


def build_tiny_sd3(tmp: Path, seed: int = 0, t5: bool = True):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=2 * HIDDEN, pooled_projection_dim=2 * HIDDEN, out_channels=4,
    )
    clip_1, clip_2 = _clip(), _clip()
    text_encoder_3 = tokenizer_3 = None
    if t5:
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=384, d_model=2 * HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )).eval()
        tokenizer_3 = ByT5Tokenizer()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, layers_per_block=1,
        norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=clip_1, tokenizer=_tokenizer(tmp / "tokenizer_src"),
        text_encoder_2=clip_2, tokenizer_2=_tokenizer(tmp / "tokenizer_2_src"),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def save_tiny_sd3(folder: Path, seed: int = 0, t5: bool = True) -> Path:
    folder = Path(folder)
    build_tiny_sd3(folder.parent / f"{folder.name}_src", seed, t5).save_pretrained(folder, safe_serialization=True)
    return folder
