"""A tiny random-weight SDXL pipeline built from configs, for tests (no download).

``save_tiny_sdxl(folder)`` writes a diffusers folder: a UNet with SDXL's text-time conditioning
(``addition_embed_type="text_time"``), two CLIP text encoders (the second with a projection, its
pooled output is SDXL's ``text_embeds``) with tokenizers made from local files, an AutoencoderKL with
``force_upcast``, and SDXL's EulerDiscreteScheduler config. 32 x 32 images, 16 x 16 x 4 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_sd import MAX_TOKENS, _tokenizer, _unet_to_ldm, _vae_to_ldm

HIDDEN = 32


def _clip_config(hidden: int = HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden, hidden_act="gelu",
    )


def build_tiny_sdxl(tmp: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True, hidden_2: int = HIDDEN):
    """``hidden_2``: the second text encoder's width (SDXL's OpenCLIP bigG is wider than its CLIP-L, which is
    how diffusers' single-file loader tells the two apart; the single-file test needs them different)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=hidden_2 + 6 * 8,
        cross_attention_dim=HIDDEN + hidden_2, norm_num_groups=4,
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
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(hidden_2)).eval(),
        tokenizer=_tokenizer(tmp / "tokenizer_src"),
        tokenizer_2=_tokenizer(tmp / "tokenizer_2_src"),
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )


def save_tiny_sdxl(folder: Path, seed: int = 0, hidden_2: int = HIDDEN) -> Path:
    folder = Path(folder)
    build_tiny_sdxl(folder.parent / f"{folder.name}_src", seed, hidden_2=hidden_2).save_pretrained(folder, safe_serialization=True)
    return folder


# --- diffusers -> original SDXL (sgm) key layout, for the single-file tests ------------------------
# The inverse of what diffusers' single-file loader reads: convert_ldm_unet_checkpoint (UNet under
# model.diffusion_model., the text-time embedding as label_emb), convert_ldm_vae_checkpoint (VAE under
# first_stage_model.), convert_ldm_clip_checkpoint (CLIP-L under conditioner.embedders.0.transformer.) and
# convert_open_clip_checkpoint (the second encoder in OpenCLIP's layout under conditioner.embedders.1.model.).
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}


def open_clip_to_original(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (fused q/k/v ``in_proj``, the
    projection as a (width, dim) matrix). Every key is mapped or this raises."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {"text_projection": sd.pop("text_projection.weight").T}
    for new, old in _OPEN_CLIP_TOP.items():
        out[old] = sd.pop(new)
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        p, q = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{q}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{p}self_attn.{c}_proj.{kind}") for c in "qkv"])
            for new, old in _OPEN_CLIP_LAYER.items():
                out[f"{q}{old}.{kind}"] = sd.pop(f"{p}{new}.{kind}")
    if sd:
        raise KeyError(f"no OpenCLIP name for {sorted(sd)}")
    return {prefix + k: v for k, v in out.items()}


def save_sgm_single_file(folder: Path, path: Path) -> Path:
    """Re-save the tiny SDXL folder's UNet, VAE and both text encoders as one original-layout (sgm)
    safetensors file, the form SDXL checkpoints are shared in."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    text_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    unet_sd = unet.state_dict()
    label = {k: unet_sd.pop(k) for k in [k for k in unet_sd if k.startswith("add_embedding.")]}
    state: dict[str, torch.Tensor] = _unet_to_ldm(unet_sd, unet.config.layers_per_block, len(unet.config.block_out_channels))
    state.update({"model.diffusion_model.label_emb.0." + k.removeprefix("add_embedding.").replace("linear_1", "0").replace("linear_2", "2"): v
                  for k, v in label.items()})
    state.update(_vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    # CLIP-L keeps HF's layout under its prefix, with its text_model. level (flattened away in transformers >= 5.6)
    state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in text.state_dict().items() if not k.endswith("position_ids")})
    state.update(open_clip_to_original(text_2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
