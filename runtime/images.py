"""Pixels <-> 8-bit RGB images: the one conversion previews, finals and consistency measurement share."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> an 8-bit RGB image (round to nearest)."""
    array = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, mode="RGB")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> float (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
