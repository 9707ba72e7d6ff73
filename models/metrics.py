"""PSNR, the one implementation every part uses (rewards, preview/final consistency, model evaluation).

Images are float tensors in [0, 1] (data range 1)::

    PSNR = 10 log10(1 / MSE) = -10 log10(MSE)   dB

Identical images: MSE = 0 would give +inf. Here the MSE is floored at :data:`MSE_FLOOR` = 1e-10, so
identical images score **100 dB**, a finite number a reward can average and a JSON file can hold.
Any real difference of 8-bit images (MSE >= (1/255)^2 / pixels) stays far above the floor.
"""

from __future__ import annotations

import torch

MSE_FLOOR = 1e-10  # identical images: 100 dB (see the module docstring)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of a mean squared error of [0, 1] data: -10 log10(max(MSE, floor)), elementwise."""
    return -10.0 * torch.log10(mse + MSE_FLOOR)


def psnr(target: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, ...) images in [0, 1], shape (B,): identical images give 100 dB.

    Computed in float32, or in float64 when an input is float64.
    """
    dtype = torch.promote_types(torch.promote_types(target.dtype, other.dtype), torch.float32)
    mse = (target.to(dtype) - other.to(dtype)).pow(2).flatten(1).mean(1)
    return psnr_from_mse(mse)
