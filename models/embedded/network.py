"""The embedded denoising network: a diffusers UNet2DConditionModel on 2x2 pixel patches."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from models.embedded.config import PATCH, UNET_CONFIG


def pooled_context(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the token states over real tokens (mask = 1): (B, L, D) -> (B, D)."""
    if mask is None:
        return context.mean(dim=1)
    m = mask.to(context.dtype)[..., None]
    return (context * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class PatchUNet(nn.Module):
    """eps(x, t, context) for 32x32 RGB x: pixel_unshuffle -> UNet -> pixel_shuffle.

    The UNet also gets the pooled context as its ``class_labels`` (projection class embedding).

    ``patch`` folds patch x patch pixels into channels (space-to-depth), so the UNet works on a
    (3 * patch^2, H / patch, W / patch) grid; the output is unfolded back to (3, H, W).
    """

    def __init__(self, unet_config: Mapping[str, Any] | None = None, patch: int = PATCH) -> None:
        super().__init__()
        self.patch = patch
        self.unet = UNet2DConditionModel(**dict(unet_config or UNET_CONFIG))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.pixel_unshuffle(x, self.patch)
        pooled = pooled_context(context, mask) if self.unet.config.class_embed_type == "projection" else None
        out = self.unet(h, t, encoder_hidden_states=context, encoder_attention_mask=mask, class_labels=pooled).sample
        return F.pixel_shuffle(out, self.patch)
