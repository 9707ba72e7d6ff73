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


# --- diffusers -> original SD3 (MMDiT) key layout, for the single-file tests ----------------------
# The inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers.
_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_SD3_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift); the original layout is (shift, scale)."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_transformer_to_original(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict in the original MMDiT layout (``joint_blocks.*``), each key
    behind ``prefix`` (``"model.diffusion_model."`` as Stability ships it). Every key is mapped or this raises."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    for key in [k for k in sd if k.startswith("norm_out.linear.")]:
        out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = _swap_halves(sd.pop(key))
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        p, q = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == blocks[-1]  # its context branch is pre-only: AdaLayerNormContinuous, (scale, shift)
        for kind in ("weight", "bias"):
            out[f"{q}x_block.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{p}attn.to_{c}.{kind}") for c in "qkv"])
            out[f"{q}context_block.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{p}attn.add_{c}_proj.{kind}") for c in "qkv"])
            if f"{p}attn2.to_q.{kind}" in sd:
                out[f"{q}x_block.attn2.qkv.{kind}"] = torch.cat([sd.pop(f"{p}attn2.to_{c}.{kind}") for c in "qkv"])
            context_norm = sd.pop(f"{p}norm1_context.linear.{kind}")
            out[f"{q}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(context_norm) if last else context_norm
        for key in [k for k in sd if k.startswith(p)]:
            module, kind = key[len(p):].rsplit(".", 1)
            out[f"{q}{_SD3_BLOCK[module]}.{kind}"] = sd.pop(key)
    for key in list(sd):
        module, kind = key.rsplit(".", 1)
        if module in _SD3_TOP:
            out[f"{_SD3_TOP[module]}.{kind}"] = sd.pop(key)
    if sd:
        raise KeyError(f"no original SD3 name for {sorted(sd)}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def save_sd3_single_file(folder: Path, path: Path, prefix: str = "model.diffusion_model.") -> Path:
    """The folder's transformer as one original-layout safetensors file."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    save_file(sd3_transformer_to_original(transformer.state_dict(), prefix), str(path))
    return Path(path)
