"""Procedural scenes for the embedded model: a palette, shapes, a scene sampler and an antialiased renderer.

A :class:`Scene` is one to three coloured shapes on a background (solid, striped or a gradient). The
first object is the *main* object: it is always rendered largest, and it is the one the caption
mentions first and the scene analyzer reads back. Rendering draws the scene at ``supersample`` times
the target size with PIL and box-filters it down (antialiasing), so a scene is a pure function of its
fields: the same scene always gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Well-separated named colours (sRGB 0..255). Order is part of the held-out split: do not reorder.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 225, 40),
    "green": (35, 160, 55),
    "cyan": (40, 205, 215),
    "blue": (30, 55, 200),
    "purple": (125, 40, 170),
    "pink": (245, 135, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "diamond", "cross")
SIZES: dict[str, float] = {"small": 0.34, "medium": 0.48, "large": 0.64}  # main object's extent / image side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) preferred centre, in [0, 1] image coordinates
    "centre": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
BACKGROUND_STYLES: tuple[str, ...] = ("solid", "stripes", "gradient")


@dataclass(frozen=True)
class SceneObject:
    """One shape: kind, colour name, extent (fraction of the image side) and centre (fractions)."""

    shape: str
    colour: str
    extent: float
    cx: float
    cy: float
    angle: float = 0.0  # small rotation in degrees (a "square" stays axis-aligned-ish, a diamond stays a diamond)


@dataclass(frozen=True)
class Scene:
    """A background plus objects; ``objects[0]`` is the main object (the largest)."""

    background: str
    objects: tuple[SceneObject, ...]
    style: str = "solid"  # "solid", "stripes" or "gradient"
    stripe_vertical: bool = False
    # Caption facts (not needed to render, kept so a caption can be written from the scene)
    size_word: str | None = None
    position_word: str | None = None
    count: int = 1  # how many copies of the main object (objects[0:count])
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def main(self) -> SceneObject:
        return self.objects[0]


def shade(rgb: tuple[int, int, int], amount: float = 0.22) -> tuple[int, int, int]:
    """The stripe / gradient partner of a background colour: darker, or lighter for very dark colours.

    Kept subtle so its nearest palette colour is still the background's own.
    """
    r, g, b = rgb
    if max(rgb) < 60:
        return tuple(int(round(c + (110 - c) * amount * 1.2)) for c in rgb)  # type: ignore[return-value]
    return (int(round(r * (1 - amount))), int(round(g * (1 - amount))), int(round(b * (1 - amount))))


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float = 0.0) -> list[list[tuple[float, float]]]:
    """Outline(s) of a polygonal shape in pixel coordinates: a list of polygons (the cross is one polygon)."""
    rot = math.radians(angle)

    def pts(radii_angles: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(cx + r * math.cos(a + rot), cy + r * math.sin(a + rot)) for r, a in radii_angles]

    if shape == "square":
        h = radius * 0.86
        return [pts([(h * math.sqrt(2), math.pi / 4 + k * math.pi / 2) for k in range(4)])]
    if shape == "diamond":
        return [pts([(radius, k * math.pi / 2) for k in range(4)])]
    if shape == "triangle":
        # apex up; centred on the bounding box so the shape fills its extent
        return [pts([(radius * 1.1, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)])]
    if shape == "star":
        return [pts([(radius if k % 2 == 0 else radius * 0.45, -math.pi / 2 + k * math.pi / 5) for k in range(10)])]
    if shape == "cross":
        w = radius * 0.36
        r = radius
        c = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        cs, sn = math.cos(rot), math.sin(rot)
        return [[(cx + x * cs - y * sn, cy + x * sn + y * cs) for x, y in c]]
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, fill: tuple[int, int, int] | int, hole: tuple[int, int, int] | int | None) -> None:
    """Draw one object on a canvas of ``side`` pixels. ``hole`` is what the ring's inside shows."""
    cx, cy, radius = obj.cx * side, obj.cy * side, obj.extent * side / 2
    if obj.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif obj.shape == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        r2 = radius * 0.52
        if hole is not None:
            draw.ellipse([cx - r2, cy - r2, cx + r2, cy + r2], fill=hole)
    else:
        for poly in shape_polygon(obj.shape, cx, cy, radius, obj.angle):
            draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 array, antialiased by supersampling."""
    side = size * supersample
    bg = np.array(PALETTE[scene.background], dtype=np.float32)
    if scene.style == "solid":
        canvas = np.broadcast_to(bg, (side, side, 3)).copy()
    else:
        other = np.array(shade(PALETTE[scene.background]), dtype=np.float32)
        coord = np.arange(side, dtype=np.float32) / side
        if scene.style == "stripes":
            period = 8 * supersample
            band = ((np.arange(side) // (period // 2)) % 2).astype(np.float32)
            w = band[None, :, None] if scene.stripe_vertical else band[:, None, None]
        elif scene.style == "gradient":
            w = (coord[None, :, None] if scene.stripe_vertical else coord[:, None, None]) * 0.9
        else:
            raise ValueError(f"style must be one of {BACKGROUND_STYLES}, got {scene.style!r}")
        canvas = bg * (1 - w) + other * w
        canvas = np.broadcast_to(canvas, (side, side, 3)).copy()
    img = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    # Draw back to front: secondary objects first, the main object(s) last so they are never covered.
    for i, obj in reversed(list(enumerate(scene.objects))):
        layer = Image.new("L", (side, side), 0)
        draw_object(ImageDraw.Draw(layer), obj, side, fill=255, hole=0)
        img.paste(Image.new("RGB", (side, side), PALETTE[obj.colour]), (0, 0), layer)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


# --- sampling -----------------------------------------------------------------------------------
def _place(rng: np.random.Generator, extent: float, pref: tuple[float, float] | None, placed: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """A centre for an object of ``extent`` that stays inside the image and off the objects in ``placed``."""
    half = extent / 2 + 0.02
    for _ in range(60):
        if pref is not None:
            x = pref[0] + rng.normal(0, 0.04)
            y = pref[1] + rng.normal(0, 0.04)
        else:
            x, y = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
        x, y = float(np.clip(x, half, 1 - half)), float(np.clip(y, half, 1 - half))
        if all(math.hypot(x - px, y - py) > (extent + pe) / 2 * 1.05 for px, py, pe in placed):
            return x, y
    return None


def sample_scene(rng: np.random.Generator, exclude: set[tuple[str, str, str]] | None = None,
                 only: list[tuple[str, str, str]] | None = None) -> Scene:
    """A random scene. ``exclude``: (colour, shape, background) main-object combos never drawn;
    ``only``: draw the main combo from this list instead."""
    while True:
        if only is not None:
            colour, shape, background = only[int(rng.integers(len(only)))]
        else:
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            background = COLOURS[int(rng.integers(len(COLOURS)))]
            if background == colour or (exclude and (colour, shape, background) in exclude):
                continue
        style = str(rng.choice(BACKGROUND_STYLES, p=[0.7, 0.15, 0.15]))
        count = int(rng.choice([1, 2, 3], p=[0.75, 0.18, 0.07]))
        size_word = str(rng.choice(["small", "medium", "large"])) if rng.random() < 0.6 else None
        base = SIZES[size_word] if size_word else float(rng.uniform(0.42, 0.64))
        extent = base if count == 1 else min(base, 0.40 if count == 2 else 0.30)
        if count > 1 and size_word in ("medium", "large"):
            size_word = None  # several large objects do not fit: the caption does not claim a size
        extent *= float(rng.uniform(0.94, 1.06))
        position_word = str(rng.choice(list(POSITIONS))) if (rng.random() < 0.45 and count == 1) else None
        pref = POSITIONS[position_word] if position_word else None
        if position_word and extent > 0.5:
            extent = 0.5
            size_word = None if size_word == "large" else size_word
        placed: list[tuple[float, float, float]] = []
        objs: list[SceneObject] = []
        ok = True
        for _ in range(count):
            angle = float(rng.uniform(-8, 8)) if shape not in ("circle", "ring") else 0.0
            c = _place(rng, extent, pref if count == 1 else None, placed)
            if c is None:
                ok = False
                break
            placed.append((c[0], c[1], extent))
            objs.append(SceneObject(shape, colour, extent, c[0], c[1], angle))
        if not ok:
            continue
        if count < 3 and rng.random() < 0.35:  # one smaller secondary object of another kind
            s_colour = COLOURS[int(rng.integers(len(COLOURS)))]
            s_shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if s_colour not in (background, colour) or (s_shape != shape and s_colour != background):
                s_extent = extent * float(rng.uniform(0.45, 0.6))
                c = _place(rng, s_extent, None, placed)
                if c is not None and s_colour != background:
                    objs.append(SceneObject(s_shape, s_colour, s_extent, c[0], c[1], 0.0))
        return Scene(background=background, objects=tuple(objs), style=style,
                     stripe_vertical=bool(rng.random() < 0.5), size_word=size_word,
                     position_word=position_word, count=count)
