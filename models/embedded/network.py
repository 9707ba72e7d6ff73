"""The embedded denoising network: a diffusers UNet2DConditionModel on 2x2 pixel patches."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from models.embedded.config import PATCH, UNET_CONFIG


class PatchUNet(nn.Module):
    """eps(x, t, context) for 32x32 RGB x: pixel_unshuffle -> UNet -> pixel_shuffle.

    ``patch`` folds patch x patch pixels into channels (space-to-depth), so the UNet works on a
    (3 * patch^2, H / patch, W / patch) grid; the output is unfolded back to (3, H, W).
    """

    def __init__(self, unet_config: Mapping[str, Any] | None = None, patch: int = PATCH) -> None:
        super().__init__()
        self.patch = patch
        self.unet = UNet2DConditionModel(**dict(unet_config or UNET_CONFIG))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.pixel_unshuffle(x, self.patch)
        out = self.unet(h, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        return F.pixel_shuffle(out, self.patch)
