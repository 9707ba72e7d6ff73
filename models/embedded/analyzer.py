"""The scene analyzer: read back the main object's colour and shape and the background colour.

Classical image analysis, no learned weights (numpy + scipy.ndimage):

1. every pixel gets the name of its nearest palette colour (each colour and its stripe/gradient shade);
2. the background is the most frequent name on the image border;
3. the main object is the largest connected region of one non-background colour;
4. its shape is the template (each shape at a few small rotations, rendered by the scene renderer)
   whose mask, scaled to the region's bounding box, has the highest IoU with the region.

:func:`judge` compares this reading with what a prompt asks for (:func:`models.embedded.parse.parse_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from models.embedded.parse import ParsedPrompt, parse_prompt
from models.embedded.scenes import COLOURS, PALETTE, SHAPES, SceneObject, draw_object, shade

_TEMPLATE_SIDE = 128
_ANGLES = (-8.0, -4.0, 0.0, 4.0, 8.0)


@dataclass(frozen=True)
class SceneReading:
    """What the analyzer sees: main object colour and shape, background colour, and the evidence."""

    main_colour: str | None
    main_shape: str | None
    background: str
    main_area: int = 0  # pixels in the main region
    shape_iou: float = 0.0  # IoU of the best shape template


@dataclass(frozen=True)
class Verdict:
    """``ok`` when every field the prompt names matches what the image shows."""

    ok: bool
    expected: ParsedPrompt
    found: SceneReading
    mismatches: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def _reference_colours() -> tuple[np.ndarray, np.ndarray]:
    refs, names = [], []
    for i, c in enumerate(COLOURS):
        rgb = PALETTE[c]
        for v in (rgb, shade(rgb)):
            refs.append(v)
            names.append(i)
    return np.array(refs, dtype=np.float32), np.array(names)


def palette_references() -> tuple[np.ndarray, np.ndarray]:
    """The colours pixels are named by: (R, 3) float32 RGB in [0, 1] (each palette colour and its shade) and
    (R,) int, the index into COLOURS each one names. :func:`colour_labels` gives a pixel its nearest one's name."""
    refs, names = _reference_colours()
    return refs / 255.0, names.copy()


def _as_uint8_hwc(image) -> np.ndarray:
    """Accept (H, W, 3) uint8, or float (3, H, W) / (H, W, 3) in [0, 1] (numpy or torch), or a PIL image."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"image must have 3 dimensions (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] != 3:
        raise ValueError(f"image must have 3 colour channels, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return arr


def colour_labels(image) -> np.ndarray:
    """(H, W) int: index into COLOURS of each pixel's nearest palette colour (or its shade)."""
    arr = _as_uint8_hwc(image).astype(np.float32)
    refs, names = _reference_colours()
    d = ((arr[:, :, None, :] - refs[None, None]) ** 2).sum(-1)
    return names[d.argmin(-1)]


@lru_cache(maxsize=1)
def _templates() -> dict[tuple[str, float], np.ndarray]:
    """Each shape (and rotation) rendered large and cropped to its bounding box, as a bool mask."""
    out = {}
    for shape in SHAPES:
        for angle in _ANGLES if shape not in ("circle", "ring") else (0.0,):
            layer = Image.new("L", (_TEMPLATE_SIDE, _TEMPLATE_SIDE), 0)
            draw_object(ImageDraw.Draw(layer), SceneObject(shape, "white", 0.7, 0.5, 0.5, angle), _TEMPLATE_SIDE, fill=255, hole=0)
            m = np.asarray(layer) > 127
            ys, xs = np.nonzero(m)
            out[(shape, angle)] = m[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    return out


def shape_ious(alpha: np.ndarray) -> np.ndarray:
    """(len(SHAPES),) float: for each shape, the best soft IoU  sum(min(a, t)) / sum(max(a, t))  over its
    rotations of a soft coverage map (H, W) in [0, 1], cropped to the object's bounding box, with the
    template's box-filtered coverage."""
    h, w = alpha.shape
    best = np.full(len(SHAPES), -1.0)
    for (shape, _angle), tmpl in _templates().items():
        t = np.asarray(Image.fromarray(tmpl.astype(np.uint8) * 255).resize((w, h), Image.BOX), dtype=np.float32) / 255.0
        i = SHAPES.index(shape)
        best[i] = max(best[i], float(np.minimum(t, alpha).sum() / max(1e-6, np.maximum(t, alpha).sum())))
    return best


def coverage(arr, fg, bg):
    """Per-pixel fraction of the foreground colour: projection of the pixel (..., 3) on the bg -> fg segment,
    clipped to [0, 1]. numpy arrays or torch tensors alike (the distillation's coverage term differentiates it)."""
    d = fg - bg
    a = ((arr - bg) @ d) / max(1e-6, float(d @ d))
    return a.clip(0.0, 1.0)


@dataclass(frozen=True)
class MainRegion:
    """The main object as :func:`analyze` finds it: its colour (an index into COLOURS) and the window around
    it where its shape is read: ``box`` (y0, y1, x0, x1), the foreground and
    background reference colours ``fg`` / ``bg`` (RGB 0..255) whose segment a pixel's coverage is read on, the
    region grown by one pixel ``grown`` (bool, box-sized) and the coverage ``alpha`` there (0 outside it)."""

    colour: int
    box: tuple[int, int, int, int]
    fg: np.ndarray
    bg: np.ndarray
    grown: np.ndarray
    alpha: np.ndarray


def main_region(image) -> tuple[int, int, MainRegion | None]:
    """(background colour, largest region's area, the main object or None when there is no region of at least
    4 pixels): steps 2-3 of the module docstring and the coverage window step 4 reads the shape in."""
    arr = _as_uint8_hwc(image)
    labels = colour_labels(arr)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    best_area, best_mask, best_colour = 0, None, None
    for c in np.unique(labels):
        if c == bg:
            continue
        comp, n = ndimage.label(labels == c)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        k = int(sizes.argmax())
        if sizes[k] > best_area:
            best_area, best_mask, best_colour = int(sizes[k]), comp == (k + 1), int(c)
    if best_mask is None or best_area < 4:
        return bg, best_area, None
    # two copies of the main object touching through antialiased rims: split them by a 1-pixel erosion
    # (only for regions without a hole: eroding a thin ring would break it into arcs)
    has_hole = ndimage.binary_fill_holes(best_mask).sum() > best_mask.sum() + 2
    core, n_core = ndimage.label(ndimage.binary_erosion(best_mask))
    core_sizes = np.sort(np.bincount(core.ravel())[1:])[::-1]
    if n_core > 1 and not has_hole and core_sizes[1] >= 0.5 * core_sizes[0]:  # two similar copies, not a star's arms
        k = int(np.bincount(core.ravel())[1:].argmax()) + 1
        best_mask = ndimage.binary_dilation(core == k, iterations=1) & best_mask
    # soft coverage of the main colour around its region (antialiased edges count fractionally);
    # the background reference is the local median of background-labelled pixels (stripes, gradients)
    fg_ref = np.median(arr[best_mask].astype(np.float32), axis=0)
    ys, xs = np.nonzero(best_mask)
    y0, y1 = max(0, ys.min() - 1), min(arr.shape[0], ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(arr.shape[1], xs.max() + 2)
    window = arr[y0:y1, x0:x1].astype(np.float32)
    bg_pixels = window[labels[y0:y1, x0:x1] == bg]
    bg_ref = np.median(bg_pixels, axis=0) if len(bg_pixels) else np.array(PALETTE[COLOURS[bg]], np.float32)
    # keep only the main region (grown by one pixel for its antialiased rim), not its neighbours
    grown = ndimage.binary_dilation(best_mask, structure=np.ones((3, 3), bool))[y0:y1, x0:x1]
    alpha = np.where(grown, coverage(window, fg_ref, bg_ref), 0.0)
    return bg, best_area, MainRegion(best_colour, (int(y0), int(y1), int(x0), int(x1)), fg_ref, bg_ref, grown, alpha)


def read_scene(image) -> tuple[SceneReading, np.ndarray | None]:
    """:func:`analyze`'s reading and the evidence of its shape: every shape's IoU (:func:`shape_ious`), or
    None where no shape is read."""
    bg, area, region = main_region(image)
    if region is None:
        return SceneReading(None, None, COLOURS[bg], area, 0.0), None
    on = region.alpha > 0.5
    if not on.any():
        return SceneReading(COLOURS[region.colour], None, COLOURS[bg], area, 0.0), None
    oy, ox = np.nonzero(on)
    ious = shape_ious(region.alpha[oy.min(): oy.max() + 1, ox.min(): ox.max() + 1])
    k = int(ious.argmax())
    return SceneReading(COLOURS[region.colour], SHAPES[k], COLOURS[bg], area, float(ious[k])), ious


def analyze(image) -> SceneReading:
    """Read the background colour and the main object's colour and shape from one image."""
    return read_scene(image)[0]


def judge(image, prompt: str | ParsedPrompt) -> Verdict:
    """Does ``image`` show what ``prompt`` asks for (main colour, main shape, background)?"""
    expected = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    found = analyze(image)
    mismatches = []
    for name in ("main_colour", "main_shape", "background"):
        want = getattr(expected, name)
        if want is not None and getattr(found, name) != want:
            mismatches.append(f"{name}: expected {want}, found {getattr(found, name)}")
    return Verdict(ok=not mismatches, expected=expected, found=found, mismatches=tuple(mismatches))
