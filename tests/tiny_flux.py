"""A tiny random-weight FLUX.1 pipeline built from configs, for tests (no download).

``save_tiny_flux(folder, guidance_embeds=True)`` writes a diffusers folder: a FluxTransformer2DModel
(dev-like with the distilled guidance embedding, schnell-like without), CLIP and T5 text encoders
with tokenizers that need no download (CLIP from a local vocab.json / merges.txt, ``ByT5Tokenizer()``
for T5), a 16-channel-style AutoencoderKL with a shift factor, and FLUX.1's scheduler config
(dynamic shifting). 32 x 32 images, 16 x 16 x 4 latents packed into 8 x 8 tokens of 2 x 2 patches.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


# --- diffusers -> original FLUX.1 (BFL) key layout, for the single-file tests ----------------------
# The inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers.
_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_FLUX_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale", "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift); the original layout is (shift, scale)."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux_transformer_to_original(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in the original FLUX.1 layout (``double_blocks.*``),
    each key behind ``prefix`` (``""`` as BFL ships it, ``"model.diffusion_model."`` as ComfyUI saves it).
    Every key is mapped or this raises, so nothing is silently left out."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key in [k for k in sd if k.startswith("norm_out.linear.")]:
        out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = _swap_halves(sd.pop(key))
    blocks = {k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(blocks, key=int):
        p = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"double_blocks.{i}.img_attn.qkv.{kind}"] = torch.cat([sd.pop(f"{p}attn.to_{c}.{kind}") for c in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{kind}"] = torch.cat([sd.pop(f"{p}attn.add_{c}_proj.{kind}") for c in "qkv"])
            for new, old in _FLUX_DOUBLE.items():
                out[f"double_blocks.{i}.{old}.{kind}"] = sd.pop(f"{p}{new}.{kind}")
        for new, old in _FLUX_NORMS.items():
            out[f"double_blocks.{i}.{old}"] = sd.pop(p + new)
    singles = {k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles, key=int):
        p = f"single_transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{p}attn.to_{c}.{kind}") for c in "qkv"] + [sd.pop(f"{p}proj_mlp.{kind}")]
            out[f"single_blocks.{i}.linear1.{kind}"] = torch.cat(parts)
            out[f"single_blocks.{i}.linear2.{kind}"] = sd.pop(f"{p}proj_out.{kind}")
            out[f"single_blocks.{i}.modulation.lin.{kind}"] = sd.pop(f"{p}norm.linear.{kind}")
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd.pop(f"{p}attn.norm_q.weight")
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd.pop(f"{p}attn.norm_k.weight")
    for key in list(sd):
        module, kind = key.rsplit(".", 1)
        if module in _FLUX_TOP:
            out[f"{_FLUX_TOP[module]}.{kind}"] = sd.pop(key)
    if sd:
        raise KeyError(f"no original FLUX name for {sorted(sd)}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def save_flux_single_file(folder: Path, path: Path, prefix: str = "") -> Path:
    """The folder's transformer as one original-layout safetensors file (the form FLUX.1 is shipped in)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    save_file(flux_transformer_to_original(transformer.state_dict(), prefix), str(path))
    return Path(path)


# FLUX.1's width, which diffusers' converter assumes when it splits single_blocks.*.linear1 into q, k, v, mlp.
_FLUX1_SPLIT = (3072, 3072, 3072, 4 * 3072)


@contextmanager
def converter_at_tiny_width() -> Iterator[None]:
    """Let diffusers' FLUX converter read a checkpoint narrower than FLUX.1.

    ``convert_flux_transformer_checkpoint_to_diffusers`` splits each ``single_blocks.*.linear1`` with the
    fixed sizes of FLUX.1 (inner dim 3072, MLP ratio 4): right for every FLUX.1 checkpoint, impossible for
    a tiny test model. Inside this context that one split, and only it, is scaled to the tensor's own width
    (d, d, d, 4d); every other line of diffusers' converter runs unchanged.
    """
    import diffusers.loaders.single_file_utils as sfu

    real = sfu.torch

    class _Torch:
        def __getattr__(self, name: str):
            return getattr(real, name)

        @staticmethod
        def split(tensor, sizes, dim=0):
            if isinstance(sizes, (tuple, list)) and tuple(sizes) == _FLUX1_SPLIT and tensor.shape[dim] != sum(sizes):
                d = tensor.shape[dim] // 7
                sizes = (d, d, d, 4 * d)
            return real.split(tensor, sizes, dim=dim)

    sfu.torch = _Torch()
    try:
        yield
    finally:
        sfu.torch = real
