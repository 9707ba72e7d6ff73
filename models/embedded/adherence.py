"""Prompt adherence by prompt category: prompts of each kind, and what the analyzer checks on top of a verdict.

The scene analyzer's :func:`~models.embedded.analyzer.judge` reads the main object's colour and shape and
the background colour. A prompt can also ask *where* the main object is ("at the top") and *how many*
copies there are ("two squares"); :func:`layout_mismatches` checks those two on the pixels of the main
colour. :func:`category_prompts` writes prompts of one category from the caption grammar, with the
scene each one describes where the grammar has one (a rendered scene is the check's own sanity test:
the checks should pass on it).

Categories (``CATEGORIES``): one object with or without a background, a position, a count, and a count
with a position. The training grammar always names a background and gives a position only to a single
object, so the categories without a background and "count + position" lie outside what the model saw.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.embedded.analyzer import colour_labels, judge
from models.embedded.captions import (HELDOUT_COMBOS, HELDOUT_TEMPLATES, POSITION_PHRASES, TRAIN_TEMPLATES,
                                      caption, object_phrase)
from models.embedded.parse import parse_prompt
from models.embedded.scenes import COLOURS, POSITIONS, Scene, sample_scene

MIN_REGION = 4  # pixels: smaller regions of the main colour are specks, not objects
SIDE_MARGIN = 0.42  # "top": the main colour's centroid above 0.42 of the height (grammar places it at 0.28)
CENTRE_MARGIN = 0.12  # "centre": centroid within 0.12 of the middle on both axes
COPY_FRACTION = 0.4  # a region counts as a copy of the main object when at least this fraction of the largest


@dataclass(frozen=True)
class Category:
    name: str
    background: bool
    position: bool
    count: bool

    @property
    def in_grammar(self) -> bool:
        """Whether the training captions contain prompts of this kind."""
        return self.background and not (self.position and self.count)


CATEGORIES: tuple[Category, ...] = (
    Category("object + background", True, False, False),
    Category("object, no background", False, False, False),
    Category("position + background", True, True, False),
    Category("position, no background", False, True, False),
    Category("count + background", True, False, True),
    Category("count, no background", False, False, True),
    Category("count + position + background", True, True, True),
    Category("count + position, no background", False, True, True),
)

# longest phrase first, so "in the top left corner" is not read as "at the top"
_POSITION_PATTERNS = sorted(((p, pos) for pos, ps in POSITION_PHRASES.items() for p in ps), key=lambda t: -len(t[0]))


def parse_position(text: str) -> str | None:
    """The position word ("top left", "centre", ...) a prompt names for its object, or None."""
    lowered = " ".join(re.findall(r"[a-z]+", text.lower()))
    for phrase, pos in _POSITION_PATTERNS:
        if re.search(rf"\b{phrase}\b", lowered):
            return pos
    return None


def main_colour_regions(image, colour: str) -> list[tuple[int, float, float]]:
    """Connected regions of ``colour`` (area >= MIN_REGION) as (area, cx, cy), centres in [0, 1], largest first.
    Two copies touching through antialiased rims are split by a one-pixel erosion when that gives more
    regions of the admitted size (not where the colour encloses a hole: that would cut a ring into arcs)."""
    labels = colour_labels(image)
    mask = labels == COLOURS.index(colour)
    h, w = mask.shape

    def regions(m: np.ndarray) -> list[tuple[int, float, float]]:
        comp, n = ndimage.label(m)
        out = []
        for k in range(1, n + 1):
            ys, xs = np.nonzero(comp == k)
            if len(ys) >= MIN_REGION:
                out.append((len(ys), (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h))
        return sorted(out, reverse=True)

    found = regions(mask)
    if ndimage.binary_fill_holes(mask).sum() > mask.sum() + 2:  # rings: eroding a thin ring breaks it into arcs
        return found
    eroded = regions(ndimage.binary_erosion(mask))
    if len(_copies(eroded)) > len(_copies(found)):
        return eroded
    return found


def _copies(regions: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    return [r for r in regions if regions and r[0] >= COPY_FRACTION * regions[0][0]]


def position_ok(position: str, cx: float, cy: float) -> bool:
    """Whether a centre (cx, cy) in [0, 1] image coordinates (y down) is where ``position`` says."""
    if position == "centre":
        return abs(cx - 0.5) < CENTRE_MARGIN and abs(cy - 0.5) < CENTRE_MARGIN
    ok = True
    if "top" in position:
        ok &= cy < SIDE_MARGIN
    if "bottom" in position:
        ok &= cy > 1 - SIDE_MARGIN
    if "left" in position:
        ok &= cx < SIDE_MARGIN
    if "right" in position:
        ok &= cx > 1 - SIDE_MARGIN
    return bool(ok)


def layout_mismatches(image, prompt: str) -> tuple[str, ...]:
    """What the image gets wrong about the main object's position and count (empty when the prompt names
    neither, or the image shows both right). The position is that of the copies' area-weighted centre."""
    parsed = parse_prompt(prompt)
    position = parse_position(prompt)
    if parsed.main_colour is None or (position is None and parsed.count == 1):
        return ()
    copies = _copies(main_colour_regions(image, parsed.main_colour))
    out = []
    if parsed.count > 1 and len(copies) != parsed.count:
        out.append(f"count: expected {parsed.count}, found {len(copies)}")
    if position is not None:
        if not copies:
            out.append(f"position: expected {position}, found no object")
        else:
            area = sum(a for a, _, _ in copies)
            cx = sum(a * x for a, x, _ in copies) / area
            cy = sum(a * y for a, _, y in copies) / area
            if not position_ok(position, cx, cy):
                out.append(f"position: expected {position}, found centre ({cx:.2f}, {cy:.2f})")
    return tuple(out)


def adherence_mismatches(image, prompt: str) -> tuple[str, ...]:
    """Every way ``image`` departs from ``prompt``: the analyzer's verdict (main colour, main shape,
    background) and :func:`layout_mismatches` (position, count). Empty: the image is right."""
    return judge(image, prompt).mismatches + layout_mismatches(image, prompt)


def category_prompts(category: Category, n: int, seed: int = 0, grammar: str = "train") -> list[tuple[str, Scene | None]]:
    """``n`` prompts of ``category`` with the scene each describes (None where the grammar has no such
    scene: no background, or several copies at one position). ``grammar``: "train" (training combinations
    and templates) or "heldout" (the held-out combinations, half in held-out templates). Deterministic."""
    if grammar not in ("train", "heldout"):
        raise ValueError(f"grammar must be 'train' or 'heldout', got {grammar!r}")
    rng = np.random.default_rng([seed, CATEGORIES.index(category)])
    out: list[tuple[str, Scene | None]] = []
    while len(out) < n:
        if grammar == "train":
            scene, templates = sample_scene(rng, exclude=set(HELDOUT_COMBOS)), TRAIN_TEMPLATES
        else:
            scene = sample_scene(rng, only=sorted(HELDOUT_COMBOS))
            templates = HELDOUT_TEMPLATES if len(out) % 2 == 0 else TRAIN_TEMPLATES
        if (scene.count > 1) != category.count:
            continue
        if category.count and category.position:
            position = str(rng.choice(list(POSITIONS)))
            scene, truth = dataclasses.replace(scene, position_word=position), False
        elif (scene.position_word is not None) != category.position:
            continue
        else:
            truth = True
        scene = dataclasses.replace(scene, objects=scene.objects[:scene.count])  # no secondary object
        if category.background:
            text = caption(scene, rng, templates)
        else:
            text = object_phrase(rng, scene.main, scene.count, scene.size_word, scene.position_word)
            truth = False
        if all(text != t for t, _ in out):
            out.append((text, scene if truth else None))
    return out
