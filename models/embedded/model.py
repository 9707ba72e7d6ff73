"""The embedded default model behind the :class:`models.base.Denoiser` interface.

A small pixel-space text-to-image diffusion model trained by this project on procedural scenes
(``python -m models.embedded.train``): 32x32 RGB in [-1, 1] (the latent *is* the image), a UNet on
2x2 pixel patches with cross-attention on frozen MiniLM token states, DDPM linear schedule, epsilon
prediction. Loads the committed weights (models/embedded/weights/) with no network, fp32 on the CPU
by default. Upscaling for display is the app's job; the native size is 32x32 and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from models.base import Conditioning, Denoiser
from models.embedded.config import CONFIG_FILE, NATIVE_SIZE, SCHEDULER_CONFIG, WEIGHTS_DIR, WEIGHTS_FILE
from models.embedded.network import PatchUNet
from models.embedded.text import TextEncoder
from solver.schedules import VPSchedule

logger = logging.getLogger(__name__)

ALLOWED_SIZES: tuple[tuple[int, int], ...] = ((NATIVE_SIZE, NATIVE_SIZE),)


class EmbeddedDenoiser(Denoiser):
    """The embedded scenes model: ``latent_shape(32, 32) == (3, 32, 32)``, decode = (x + 1) / 2."""

    model_id = "embedded"
    size_multiple = NATIVE_SIZE
    default_size = (NATIVE_SIZE, NATIVE_SIZE)
    max_size = NATIVE_SIZE

    def __init__(self, network: PatchUNet, text_encoder: TextEncoder, scheduler_config: dict[str, Any] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 default_guidance: float = 3.0) -> None:
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.network = network.to(self.device, dtype).eval()
        self.network.requires_grad_(False)
        self.text_encoder = text_encoder
        self.scheduler_config = dict(scheduler_config or SCHEDULER_CONFIG)
        self.schedule = VPSchedule.from_config(self.scheduler_config)
        self.default_guidance = float(default_guidance)

    # --- sizes -----------------------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        """Only 32x32 is allowed: the network was trained at that size and nothing else."""
        super().check_size(height, width)
        if (height, width) not in ALLOWED_SIZES:
            raise ValueError(f"height x width must be {NATIVE_SIZE}x{NATIVE_SIZE} for the embedded model, got {height}x{width}")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        return (3, height, width)

    # --- prompts ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str = "") -> Conditioning:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, got a single string (wrap it in a list)")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        negs = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negs) != len(prompts):
            raise ValueError(f"negative_prompts has {len(negs)} entries but prompts has {len(prompts)}")
        for name, seq in (("prompts", prompts), ("negative_prompts", negs)):
            for p in seq:
                if not isinstance(p, str):
                    raise ValueError(f"{name} must hold strings, got {p!r}")
        unique = list(dict.fromkeys(prompts + negs))  # encode each distinct text once
        states, masks = self.text_encoder.encode(unique)
        row = {p: i for i, p in enumerate(unique)}
        ci = torch.tensor([row[p] for p in prompts])
        ui = torch.tensor([row[p] for p in negs])
        states, masks = states.to(self.device, self.dtype), masks.to(self.device)
        return Conditioning(cond=states[ci], uncond=states[ui], prompts=prompts, negative_prompts=negs,
                            cond_mask=masks[ci], uncond_mask=masks[ui])

    # --- network ---------------------------------------------------------------------------------
    @torch.no_grad()
    def model_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Epsilon prediction for x (B, 3, 32, 32) at timestep(s) t."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, NATIVE_SIZE, NATIVE_SIZE):
            raise ValueError(f"x must have shape (B, 3, {NATIVE_SIZE}, {NATIVE_SIZE}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        t = t.to(torch.float32) if t.is_floating_point() else t.long()
        return self.network(x.to(self.device, self.dtype), t, context.to(self.device, self.dtype),
                            None if mask is None else mask.to(self.device))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent is the image in [-1, 1]: rescale to [0, 1] (clamped: the network's range is not exact)."""
        return ((latents.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def load_embedded(device: torch.device | str | None = None, weights_dir: str | None = None) -> EmbeddedDenoiser:
    """The shipped embedded model from ``models/embedded/weights/``, no network; fp32, CPU by default."""
    weights_dir = weights_dir or WEIGHTS_DIR
    path = os.path.join(weights_dir, WEIGHTS_FILE)
    cfg_path = os.path.join(weights_dir, CONFIG_FILE)
    if not os.path.exists(path) or not os.path.exists(cfg_path):
        raise FileNotFoundError(f"embedded model weights not found in {weights_dir} (train them: python -m models.embedded.train)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    unet_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["unet_config"].items()}
    network = PatchUNet(unet_cfg, int(cfg["patch"]))
    state = load_file(path)
    network.load_state_dict(state)
    device = torch.device(device or "cpu")
    return EmbeddedDenoiser(network, TextEncoder(device), cfg["scheduler_config"], device, torch.float32,
                            float(cfg.get("default_guidance", 3.0)))
