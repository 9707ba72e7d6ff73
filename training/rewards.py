"""Similarity rewards Sim(target, preview) between a full-step image and a few-step preview.

Every measure takes images as float tensors (B, 3, H, W) in [0, 1] (what ``Denoiser.decode`` returns)
and returns one score per image, shape (B,), higher = more similar. A measure is split in two:
``features(images)`` (computed once for a target and reused for all G previews of its group, paper.md
6.4 T4) and ``compare(target_features, preview_features)``.

Pixel measures (no weights):
- ``psnr``     10 log10(1 / MSE), dB (the paper's "Img." column; ``models.metrics.psnr``).
- ``ssim``     structural similarity, Gaussian window 11, sigma 1.5 (torchmetrics), in [-1, 1].
- ``ms_ssim``  multi-scale SSIM (torchmetrics); on small images only the scales that fit are used and
               their exponents renormalised to sum to 1 (a 32x32 image has 2 of the 5 standard scales).
- ``gms``      gradient magnitude similarity (the mean of the GMSD map, Xue et al. 2014): edge
               agreement in [0, 1], independent of flat colour. The project's structure measure.
- ``h1_psnr``  Sobolev PSNR, 10 log10(1 / (MSE(x, y) + MSE(grad x, grad y))), dB: the default reward of
               the embedded model (see :func:`h1_psnr`).

Model-based measures (weights from a local folder or a hub id, ``local_files_only`` unless allowed):
- ``depth``          Depth-Anything-V2 depth of both images, each min-max normalised to [0, 1], then
                     PSNR, as in the paper ("Dep.").
- ``depth_aligned``  the same depths, the preview's aligned to the target's by least-squares scale and
                     shift before the PSNR (relative depth is only defined up to scale and shift; the
                     min-max normalisation of the paper lets one outlier pixel rescale everything, T7).
- ``dino``           DINOv2 CLS embedding cosine, reported as (cos + 1) * 50 as the paper does.
- ``clip``           CLIP image-embedding cosine, (cos + 1) * 50.
- ``segformer``      fraction of pixels whose SegFormer labels agree, x 100, with the logits upsampled to
                     the image size first (the paper compares at 1/4 resolution and calls it Dice, T7).

Reward specs: a name, or a weighted sum such as ``"psnr+10*gms"``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from models.metrics import psnr, psnr_from_mse

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {
    "depth": "depth-anything/Depth-Anything-V2-Small-hf",
    "depth_aligned": "depth-anything/Depth-Anything-V2-Small-hf",
    "dino": "facebook/dinov2-base",
    "clip": "openai/clip-vit-large-patch14",
    "segformer": "nvidia/segformer-b4-finetuned-ade-512-512",
}
WEIGHTS_ENV = "DIFFUSION_PREVIEW_{}_WEIGHTS"  # e.g. DIFFUSION_PREVIEW_DEPTH_WEIGHTS=/models/depth-anything


class RewardWeightsMissing(ValueError):
    """A model-based reward whose weights are neither in the given folder nor in the local HF cache."""


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be (B, 3, H, W), got shape {tuple(images.shape)}")
    return images.float()


# ------------------------------------------------------------------------------------------------
# Pixel measures
# ------------------------------------------------------------------------------------------------
def ssim(target: torch.Tensor, preview: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), torchmetrics, data range 1."""
    from torchmetrics.functional import structural_similarity_index_measure

    return structural_similarity_index_measure(preview.float(), target.float(), data_range=1.0, reduction="none")


MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(target: torch.Tensor, preview: torch.Tensor, kernel_size: int = 11) -> torch.Tensor:
    """Per-image MS-SSIM (torchmetrics) with as many of the 5 standard scales as the image size allows."""
    from torchmetrics.functional import multiscale_structural_similarity_index_measure

    side = min(target.shape[-2:])
    scales = 1
    while scales < len(MS_SSIM_BETAS) and side > (kernel_size - 1) * 2 ** scales:
        scales += 1
    if side <= kernel_size - 1:
        raise ValueError(f"ms_ssim needs images larger than {kernel_size - 1} pixels, got {side}")
    betas = torch.tensor(MS_SSIM_BETAS[:scales])
    betas = tuple((betas / betas.sum()).tolist())
    return multiscale_structural_similarity_index_measure(
        preview.float(), target.float(), data_range=1.0, reduction="none", betas=betas, kernel_size=kernel_size
    )


def _luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma, (B, 1, H, W)."""
    w = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _sobel(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical Sobel derivatives per channel (replicate padding), /8 so a unit step gives 1/2."""
    kx = images.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    c = images.shape[1]
    weight = torch.stack([kx, kx.T]).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), weight, groups=c)
    return g[:, 0::2], g[:, 1::2]


GMS_C = 170.0 / 255.0**2  # the GMSD constant for images scaled to [0, 1] (Xue et al. 2014: c = 170 on 0..255)


def gms(target: torch.Tensor, preview: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude similarity (GMSD, Xue et al. 2014), in [0, 1].

    GMS(p) = (2 m_t m_p + c) / (m_t^2 + m_p^2 + c) with m the Sobel gradient magnitude of the luma
    (Prewitt in the paper; scaled by 4 here so a unit edge has the paper's magnitude). 1 where edges agree
    and where both images are flat; low where an edge is missing, blurred or moved.
    """
    def magnitude(x: torch.Tensor) -> torch.Tensor:
        gx, gy = _sobel(_luma(x.float()))
        return 4.0 * torch.sqrt(gx**2 + gy**2)

    m_t, m_p = magnitude(target), magnitude(preview)
    gms_map = (2 * m_t * m_p + GMS_C) / (m_t**2 + m_p**2 + GMS_C)
    return gms_map.flatten(1).mean(1)


def h1_psnr(target: torch.Tensor, preview: torch.Tensor) -> torch.Tensor:
    """Sobolev (H1) PSNR in dB: 10 log10(1 / (MSE(x, y) + MSE(grad x, grad y))), per image.

    The default reward of the embedded model. Why this measure:
    - The L2 term sees colour: the scene analyzer's verdict (and a user's) depends on the object's and the
      background's colour, which SSIM and GMS barely see in flat regions.
    - The gradient term (Sobel, per RGB channel) sees structure: a blurred, doubled or shifted edge costs
      as much as a wrong colour on the edge pixels, so the solver is not rewarded for a smooth average.
    - The log scale makes a group's improvements relative, like PSNR, and the measure is exact-match
      optimal, smooth and differentiable (also usable for the distillation variant), with no weights to load.
    """
    t, p = target.float(), preview.float()
    mse = (t - p).pow(2).flatten(1).mean(1)
    return psnr_from_mse(mse + gradient_mse(t, p))


def gradient_mse(target: torch.Tensor, preview: torch.Tensor) -> torch.Tensor:
    """MSE(grad x, grad y) per image: the squared difference of the Sobel derivatives (per channel, both
    directions), the gradient term of :func:`h1_psnr`. Differentiable in ``preview``."""
    gxt, gyt = _sobel(target.float())
    gxp, gyp = _sobel(preview.float())
    return ((gxt - gxp).pow(2) + (gyt - gyp).pow(2)).flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------
# The Similarity interface
# ------------------------------------------------------------------------------------------------
class Similarity:
    """Sim(target, preview) split into per-image features and a comparison, so a group's target is
    featurised once. ``units`` names the scale of the score (for tables)."""

    name: str = ""
    units: str = ""

    def features(self, images: torch.Tensor) -> Any:
        return _check_images(images)

    def compare(self, target_features: Any, preview_features: Any) -> torch.Tensor:
        raise NotImplementedError

    def select(self, features: Any, index: torch.Tensor) -> Any:
        """Rows ``index`` of a feature batch (expands a group's target to its G previews)."""
        return features.index_select(0, index.to(features.device))

    @torch.no_grad()
    def __call__(self, target: torch.Tensor, preview: torch.Tensor) -> torch.Tensor:
        if target.shape != preview.shape:
            raise ValueError(f"target {tuple(target.shape)} and preview {tuple(preview.shape)} differ in shape")
        return self.compare(self.features(target), self.features(preview)).float().cpu()


class PixelSimilarity(Similarity):
    """A pixel measure: the features are the images themselves."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], units: str):
        self.name, self.fn, self.units = name, fn, units

    def compare(self, target_features: torch.Tensor, preview_features: torch.Tensor) -> torch.Tensor:
        return self.fn(target_features, preview_features)


@dataclass
class WeightedSum(Similarity):
    """sum_k w_k Sim_k: a reward spec like ``"psnr+10*gms"``."""

    terms: list[tuple[float, Similarity]] = field(default_factory=list)
    name: str = ""
    units: str = "mixed"

    def features(self, images: torch.Tensor) -> list[Any]:
        return [sim.features(images) for _, sim in self.terms]

    def select(self, features: list[Any], index: torch.Tensor) -> list[Any]:
        return [sim.select(f, index) for (_, sim), f in zip(self.terms, features)]

    def compare(self, target_features: list[Any], preview_features: list[Any]) -> torch.Tensor:
        out = 0.0
        for (w, sim), ft, fp in zip(self.terms, target_features, preview_features):
            out = out + w * sim.compare(ft, fp).float().cpu()
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Model-based measures
# ------------------------------------------------------------------------------------------------
def resolve_weights(reward: str, weights: str | os.PathLike | None, allow_download: bool) -> tuple[str, bool]:
    """(path or hub id, local_files_only) for a model-based reward; raises RewardWeightsMissing early.

    Order: the ``weights`` argument, then the ``DIFFUSION_PREVIEW_<NAME>_WEIGHTS`` environment variable,
    then the hub id of the paper. A local folder must contain ``config.json``; a hub id must be in the
    local Hugging Face cache unless ``allow_download``.
    """
    source = weights or os.environ.get(WEIGHTS_ENV.format(reward.upper())) or DEFAULT_WEIGHTS[reward]
    source = str(source)
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise RewardWeightsMissing(
                f"reward {reward!r}: no model weights at {str(path)!r} (expected a folder with config.json, "
                f"as written by save_pretrained)"
            )
        return str(path), True
    if allow_download:
        return source, False
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise RewardWeightsMissing(
            f"reward {reward!r}: weights {source!r} are not in the local Hugging Face cache and downloads are "
            f"off; pass a local folder (--reward-weights / {WEIGHTS_ENV.format(reward.upper())}) or allow downloads"
        )
    return source, True


def _preprocess(images: torch.Tensor, size: tuple[int, int], mean: Any, std: Any) -> torch.Tensor:
    """Resize (bicubic, antialiased) and normalise in torch: the processors' math without a PIL round trip."""
    x = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    mean = x.new_tensor(mean).view(1, -1, 1, 1)
    std = x.new_tensor(std).view(1, -1, 1, 1)
    return (x - mean) / std


def _processor_geometry(processor: Any, multiple: int = 1) -> tuple[tuple[int, int], Any, Any]:
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or processor.size
    if "height" in size:
        hw = (int(size["height"]), int(size["width"]))
    else:
        side = int(size.get("shortest_edge", 224))
        hw = (side, side)
    hw = tuple(max(multiple, int(round(s / multiple)) * multiple) for s in hw)  # type: ignore[assignment]
    return hw, processor.image_mean, processor.image_std  # type: ignore[return-value]


class ModelSimilarity(Similarity):
    """Base of the model-based measures: loads a transformers model and its image processor settings."""

    auto_model: str = "AutoModel"
    multiple: int = 1

    def __init__(self, name: str, weights: str | None = None, allow_download: bool = False, device: str = "cpu"):
        import transformers

        self.name = name
        source, local_only = resolve_weights(name, weights, allow_download)
        try:
            self.model = getattr(transformers, self.auto_model).from_pretrained(source, local_files_only=local_only)
            processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        except OSError as err:
            raise RewardWeightsMissing(f"reward {name!r}: could not load weights from {source!r}: {err}") from err
        self.model.eval().to(device)
        self.device = torch.device(device)
        backbone = getattr(self.model.config, "backbone_config", None)
        patch = int(getattr(backbone, "patch_size", 0) or self.multiple)  # depth: the DINOv2 backbone's patch
        self.size, self.mean, self.std = _processor_geometry(processor, patch if self.multiple > 1 else 1)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return _preprocess(_check_images(images).to(self.device), self.size, self.mean, self.std)


class DepthSimilarity(ModelSimilarity):
    """Depth-Anything-V2 relative depth compared by PSNR (paper: min-max; ``aligned``: scale/shift fit)."""

    auto_model = "AutoModelForDepthEstimation"
    multiple = 14
    units = "dB"

    def __init__(self, name: str = "depth", aligned: bool = False, **kw: Any):
        super().__init__(name, **kw)
        self.aligned = aligned

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        depth = self.model(pixel_values=self._inputs(images)).predicted_depth  # (B, h, w)
        depth = F.interpolate(depth.unsqueeze(1).float(), size=images.shape[-2:], mode="bicubic", align_corners=False)
        d = depth.flatten(1)
        lo, hi = d.min(1, keepdim=True).values, d.max(1, keepdim=True).values
        return ((d - lo) / (hi - lo).clamp_min(1e-8)).cpu()  # (B, H*W) in [0, 1]

    def compare(self, target_features: torch.Tensor, preview_features: torch.Tensor) -> torch.Tensor:
        t, p = target_features.double(), preview_features.double()
        if self.aligned:
            # least squares a, b minimising |a p + b - t|^2 per image
            pc, tc = p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
            a = (pc * tc).sum(1, keepdim=True) / pc.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
            p = a * pc + t.mean(1, keepdim=True)
        mse = (t - p).pow(2).mean(1)
        return psnr_from_mse(mse).float()


class EmbeddingSimilarity(ModelSimilarity):
    """Cosine of image embeddings, reported as (cos + 1) * 50 (paper.md 3.3)."""

    units = "0-100"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self._inputs(images)
        if hasattr(self.model, "get_image_features"):  # CLIP
            emb = self.model.get_image_features(pixel_values=pixels)
            emb = getattr(emb, "pooler_output", emb)
        else:  # DINOv2: the CLS token
            emb = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return F.normalize(emb.float(), dim=-1).cpu()

    def compare(self, target_features: torch.Tensor, preview_features: torch.Tensor) -> torch.Tensor:
        return ((target_features * preview_features).sum(-1) + 1.0) * 50.0


class SegmentationSimilarity(ModelSimilarity):
    """SegFormer label agreement at image resolution, x 100."""

    auto_model = "AutoModelForSemanticSegmentation"
    units = "%"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values=self._inputs(images)).logits
        logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1).cpu()  # (B, H, W) labels

    def compare(self, target_features: torch.Tensor, preview_features: torch.Tensor) -> torch.Tensor:
        return (target_features == preview_features).float().flatten(1).mean(1) * 100.0


# ------------------------------------------------------------------------------------------------
# The embedded model's scene analyzer as a reward
# ------------------------------------------------------------------------------------------------
class ReadingSimilarity(Similarity):
    """``readings``: does the preview read as the target does under the embedded model's scene analyzer
    (``models.embedded.analyzer``), the judge of the verdict agreement ``training.evaluate`` reports?

    Per image, the mean of three scores in [-1, 1]: +1 / -1 for the same / another main colour, the same for
    the background, and for the main shape the preview's margin for the target's shape,
    clip((IoU_p(s_t) - max_{s != s_t} IoU_p(s)) / tau, -1, 1), where s_t is the shape read in the target
    and IoU_p the preview's template IoUs (``analyzer.shape_ious``). So a preview whose corner is rounding
    toward another shape scores less before its reading flips, which a 0/1 verdict cannot tell a policy.
    No shape in either image: +1 when neither has one, -1 when one has.
    Not differentiable (the analyzer is numpy): a PPO reward, typically beside a pixel measure
    (``h1_psnr+3*readings``). The embedded model only: :func:`check_reward_for_model` refuses it for others
    (``training.train``, the recipe and the admin tab call it before any compute).
    """

    name, units = "readings", "[-1,1]"

    def __init__(self, tau: float = 0.05):
        self.tau = tau

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2 + len(SHAPES)) float: main colour index (-1: none), background index, each shape's IoU (-1: no
        shape read)."""
        from models.embedded.analyzer import read_scene
        from models.embedded.scenes import COLOURS, SHAPES

        rows = []
        for image in _check_images(images):
            reading, ious = read_scene(image)
            colour = COLOURS.index(reading.main_colour) if reading.main_colour is not None else -1
            evidence = ious if ious is not None else [-1.0] * len(SHAPES)
            rows.append([colour, COLOURS.index(reading.background), *evidence])
        return torch.tensor(rows, dtype=torch.float32)

    def compare(self, target_features: torch.Tensor, preview_features: torch.Tensor) -> torch.Tensor:
        t, p = target_features, preview_features
        colour = 2.0 * (t[:, 0] == p[:, 0]).float() - 1.0
        background = 2.0 * (t[:, 1] == p[:, 1]).float() - 1.0
        t_ious, p_ious = t[:, 2:], p[:, 2:]
        has_t, has_p = t_ious[:, 0] >= 0, p_ious[:, 0] >= 0
        s_t = t_ious.argmax(1, keepdim=True)
        own = p_ious.gather(1, s_t)[:, 0]
        other = p_ious.scatter(1, s_t, float("-inf")).max(1).values
        margin = ((own - other) / self.tau).clamp(-1.0, 1.0)
        shape = torch.where(has_t & has_p, margin, torch.where(has_t == has_p, 1.0, -1.0))
        return (colour + background + shape) / 3.0


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
PIXEL_MEASURES: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]] = {
    "psnr": (psnr, "dB"),
    "ssim": (ssim, "[-1,1]"),
    "ms_ssim": (ms_ssim, "[0,1]"),
    "gms": (gms, "[0,1]"),
    "h1_psnr": (h1_psnr, "dB"),
}
MODEL_MEASURES: dict[str, Callable[..., Similarity]] = {
    "depth": lambda **kw: DepthSimilarity("depth", aligned=False, **kw),
    "depth_aligned": lambda **kw: DepthSimilarity("depth_aligned", aligned=True, **kw),
    "dino": lambda **kw: EmbeddingSimilarity("dino", **kw),
    "clip": lambda **kw: EmbeddingSimilarity("clip", **kw),
    "segformer": lambda **kw: SegmentationSimilarity("segformer", **kw),
}
ANALYZER_MEASURES: dict[str, Callable[[], Similarity]] = {"readings": ReadingSimilarity}  # embedded model only
REWARD_NAMES = tuple(PIXEL_MEASURES) + tuple(MODEL_MEASURES) + tuple(ANALYZER_MEASURES)
_TERM = re.compile(r"^\s*(?:(?P<w>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\*\s*)?(?P<name>[a-z_0-9]+)\s*$")


def get_similarity(
    spec: str,
    weights: dict[str, str] | None = None,
    allow_download: bool = False,
    device: str = "cpu",
) -> Similarity:
    """A similarity from a name (``"ssim"``) or a weighted sum (``"psnr+10*gms"``).

    ``weights`` maps a model-based name to its local folder or hub id. Model weights are loaded here, so
    a missing reward model fails before any rollout (RewardWeightsMissing, a ValueError).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward must be a measure name or a weighted sum like 'psnr+10*gms', got {spec!r}")
    terms: list[tuple[float, Similarity]] = []
    for part in spec.split("+"):
        m = _TERM.match(part)
        if m is None:
            raise ValueError(f"reward: cannot parse term {part!r} of {spec!r} (expected NAME or WEIGHT*NAME)")
        name, w = m.group("name"), float(m.group("w") or 1.0)
        if name in PIXEL_MEASURES:
            fn, units = PIXEL_MEASURES[name]
            sim: Similarity = PixelSimilarity(name, fn, units)
        elif name in MODEL_MEASURES:
            sim = MODEL_MEASURES[name](weights=(weights or {}).get(name), allow_download=allow_download, device=device)
        elif name in ANALYZER_MEASURES:
            sim = ANALYZER_MEASURES[name]()
        else:
            raise ValueError(f"reward: unknown measure {name!r}; known: {', '.join(REWARD_NAMES)}")
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"reward: weight of {name!r} must be positive, got {w}")
        terms.append((w, sim))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return WeightedSum(terms=terms, name=spec.replace(" ", ""))


def check_reward_for_model(spec: str, model: object) -> None:
    """Refuse a reward spec with an analyzer measure (``readings``) for a model (a denoiser or a model id) that
    is not the embedded model: the scene analyzer only reads the embedded model's scenes."""
    from models.embedded import is_embedded

    names = {m.group("name") for m in map(_TERM.match, spec.split("+")) if m is not None}
    analyzer_terms = sorted(names & set(ANALYZER_MEASURES))
    if analyzer_terms and not is_embedded(model):
        model_id = model if isinstance(model, str) else getattr(model, "model_id", model)
        raise ValueError(f"reward: {', '.join(analyzer_terms)} reads scenes with the embedded model's analyzer; "
                         f"model {model_id!r} is not the embedded model")


def default_reward(model_id: str) -> str:
    """The default training reward for a model: ``h1_psnr`` for the embedded model, ``depth`` (the
    paper's choice) for Stable Diffusion and other latent models whose images are large enough for it."""
    from models.embedded import is_embedded

    return "h1_psnr" if is_embedded(model_id) else "depth"
