"""A tiny random-weight Stable Diffusion pipeline built from configs, for tests (no download).

``save_tiny_sd(folder, prediction_type)`` writes a diffusers folder (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, a CLIPTokenizer made from a 60-token vocabulary, the SD 1.5 scheduler config) of
32 x 32 images with 16 x 16 x 4 latents. ``save_ldm_single_file(folder, path)`` re-saves its
weights as one ``.safetensors`` file in the original SD / LDM key layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``), the layout of A1111 / Civitai
checkpoints that ``StableDiffusionPipeline.from_single_file`` reads.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CROSS_DIM = 32
MAX_TOKENS = 77


def _tokenizer(src: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    vocab["th"], vocab["th</w>"] = len(vocab), len(vocab) + 1
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\nt h\nt h</w>\n")
    return CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=MAX_TOKENS)


def build_tiny_sd(tmp: Path, prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionPipeline with a few channels per layer and random weights (fp32, CPU)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=CROSS_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=MAX_TOKENS,
        )
    )
    scheduler = PNDMScheduler(  # Stable Diffusion 1.5's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=_tokenizer(tmp / "tokenizer_src"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it (safetensors) into ``folder``."""
    folder = Path(folder)
    build_tiny_sd(folder.parent / f"{folder.name}_src", prediction_type, seed).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


# --- diffusers -> original SD (LDM) key layout, for the single-file test -------------------------
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int, num_blocks: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    out: dict[str, torch.Tensor] = {}
    per = layers_per_block + 1
    for key, value in sd.items():
        p = key.split(".")
        if key in top:
            new = top[key]
        elif p[0] == "down_blocks" and p[2] == "downsamplers":  # down_blocks.i.downsamplers.0.conv.w
            new = f"input_blocks.{(int(p[1]) + 1) * per}.0.op.{p[-1]}"
        elif p[0] == "down_blocks":  # down_blocks.i.{resnets|attentions}.j.rest
            sub = 0 if p[2] == "resnets" else 1
            rest = ".".join(p[4:])
            new = f"input_blocks.{int(p[1]) * per + int(p[3]) + 1}.{sub}.{_rename(rest, _UNET_RESNET) if sub == 0 else rest}"
        elif p[0] == "mid_block":  # resnets.0 -> 0, attentions.0 -> 1, resnets.1 -> 2
            idx = 2 * int(p[2]) if p[1] == "resnets" else 1
            rest = ".".join(p[3:])
            new = f"middle_block.{idx}.{_rename(rest, _UNET_RESNET) if p[1] == 'resnets' else rest}"
        elif p[0] == "up_blocks" and p[2] == "upsamplers":  # after the block's last layer, behind its attention
            has_attn = any(k.startswith(f"up_blocks.{p[1]}.attentions.") for k in sd)
            new = f"output_blocks.{int(p[1]) * per + layers_per_block}.{2 if has_attn else 1}.conv.{p[-1]}"
        elif p[0] == "up_blocks":
            sub = 0 if p[2] == "resnets" else 1
            rest = ".".join(p[4:])
            new = f"output_blocks.{int(p[1]) * per + int(p[3])}.{sub}.{_rename(rest, _UNET_RESNET) if sub == 0 else rest}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    assert num_blocks > 0
    return out


def _vae_to_ldm(sd: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        p = key.split(".")
        if key in top:
            new = top[key]
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if p[1] == "down_blocks" else num_blocks - 1 - int(p[2])
            name = "down" if p[1] == "down_blocks" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{p[0]}.{name}.{i}.{'downsample' if name == 'down' else 'upsample'}.conv.{p[-1]}"
            else:
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{p[0]}.{name}.{i}.block.{p[4]}.{rest}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{rest}"
        elif p[1] == "mid_block" and p[2] == "attentions":
            new = f"{p[0]}.mid.attn_1.{_rename('.'.join(p[4:]), _VAE_ATTN)}"
            if value.ndim == 2:  # LDM keeps the attention projections as 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def save_ldm_single_file(folder: Path, path: Path) -> Path:
    """Re-save the diffusers folder's UNet, VAE and CLIP text encoder as one LDM-layout safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    state: dict[str, torch.Tensor] = {}
    state.update(_unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, len(unet.config.block_out_channels)))
    state.update(_vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    # the original layout keeps HF CLIP's ``text_model.`` level (transformers >= 5.6 flattened it away)
    state.update(
        {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
