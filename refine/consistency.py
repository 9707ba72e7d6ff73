"""How far a preview is from its refined final: the promise the preview made, measured.

All metrics are computed on float images in [0, 1] (data range 1):

- ``psnr``: peak signal-to-noise ratio in dB (higher = closer), ``models.metrics.psnr`` (its
  docstring states the identical-image convention);
- ``ssim``: structural similarity, Gaussian window 11 (Wang et al. 2004);
- ``scc``: spatial correlation coefficient of the high-pass (Laplacian) responses, a structural
  measure of whether edges sit in the same places (Zhou et al. 1998); defined at every size
  (never NaN: ``None`` if torchmetrics ever returns a non-finite value);
- ``ms_ssim``: multi-scale SSIM (Wang et al. 2003), only when both sides exceed 160 px (five scales
  with an 11 px window need it); ``None`` otherwise, never a value computed on a padded image.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    spatial_correlation_coefficient,
    structural_similarity_index_measure,
)

from models.metrics import psnr

MS_SSIM_MIN_SIDE = 161


class Consistency(TypedDict):
    psnr: float
    ssim: float
    scc: float | None
    ms_ssim: float | None


def _as_batch(image: torch.Tensor, name: str) -> torch.Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"{name} must be (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}")
    return image.detach().to("cpu", torch.float64)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # e.g. SCC of a flat image (no edges at all)


def measure_consistency(preview: torch.Tensor, final: torch.Tensor) -> Consistency:
    """Preview-vs-final metrics (final is the reference); images float in [0, 1], (3, H, W) or (1, 3, H, W)."""
    p, f = _as_batch(preview, "preview"), _as_batch(final, "final")
    if p.shape != f.shape:
        raise ValueError(f"preview shape {tuple(p.shape)} differs from final shape {tuple(f.shape)}")
    ms_ssim = None
    if min(p.shape[-2:]) >= MS_SSIM_MIN_SIDE:
        ms_ssim = float(multiscale_structural_similarity_index_measure(p, f, data_range=1.0))
    return Consistency(
        psnr=float(psnr(f.reshape(1, -1), p.reshape(1, -1))[0]),  # the whole batch's MSE
        ssim=float(torch.as_tensor(structural_similarity_index_measure(p, f, data_range=1.0))),
        scc=_finite_or_none(float(spatial_correlation_coefficient(p, f))),
        ms_ssim=ms_ssim,
    )
