"""Captions for scenes (a small grammar with paraphrase templates and synonyms) and the held-out split.

The grammar: ``main [and secondary] + background`` where ``main = [count] [size] colour shape [position]``.
Templates paraphrase where the background goes ("a crimson disc on a navy field", "navy backdrop, a red
circle"). The held-out split is deterministic: the (colour, shape, background) combinations in
:data:`HELDOUT_COMBOS` and the templates in :data:`HELDOUT_TEMPLATES` never appear in training.
"""

from __future__ import annotations

import re

import numpy as np

from models.embedded.scenes import COLOURS, SHAPES, Scene, SceneObject

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "grass-green"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "blue": ("blue", "navy", "cobalt"),
    "purple": ("purple", "violet", "plum"),
    "pink": ("pink", "rose", "salmon-pink"),
    "white": ("white", "snow-white", "ivory"),
    "black": ("black", "jet-black", "ebony"),
}
# singular, plural
SHAPE_SYNONYMS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("dot", "dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("pyramid", "pyramids")),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars")),
    "ring": (("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombi"), ("lozenge", "lozenges")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized"), "large": ("large", "big", "huge")}
POSITION_PHRASES = {
    "centre": ("in the centre", "in the middle", "at the center"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "top left": ("in the top left corner", "at the top left"),
    "top right": ("in the top right corner", "at the top right"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
COUNT_WORDS = {1: ("a",), 2: ("two", "a pair of"), 3: ("three",)}
BG_NOUNS = ("background", "field", "backdrop", "wall", "canvas", "ground")
STYLE_PHRASES = {"stripes": ("striped", "stripy"), "gradient": ("gradient", "shaded")}

# {main}: the main object phrase; {sec}: " and a ..." or ""; {bg}: colour phrase of the background
# (with style adjective), {bgnoun}: a background noun.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{main}{sec} on a {bg} {bgnoun}",
    "{main}{sec} on a {bg} {bgnoun}",
    "{main}{sec} against a {bg} {bgnoun}",
    "a {bg} {bgnoun} with {main}{sec}",
    "{main}{sec}, {bg} {bgnoun}",
    "{bg} {bgnoun}, {main}{sec}",
    "a picture of {main}{sec} on a {bg} {bgnoun}",
    "{main}{sec} over a {bg} {bgnoun}",
    "{main}{sec} in front of a {bg} {bgnoun}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "an image of {main}{sec} set on a plain {bg} {bgnoun}",
    "there is {main}{sec} on a {bg} {bgnoun}",
    "a drawing showing {main}{sec} upon a {bg} {bgnoun}",
)


def _heldout_combos() -> frozenset[tuple[str, str, str]]:
    """About 7% of (colour, shape, background) combinations, chosen by a fixed arithmetic rule."""
    out = set()
    for ci, c in enumerate(COLOURS):
        for si, s in enumerate(SHAPES):
            for bi, b in enumerate(COLOURS):
                if b != c and (3 * ci + 5 * si + 7 * bi) % 13 == 0:
                    out.add((c, s, b))
    return frozenset(out)


HELDOUT_COMBOS: frozenset[tuple[str, str, str]] = _heldout_combos()


def _pick(rng: np.random.Generator, options: tuple) -> str:
    return options[int(rng.integers(len(options)))]


def object_phrase(rng: np.random.Generator, obj: SceneObject, count: int = 1, size_word: str | None = None,
                  position_word: str | None = None, article: bool = True) -> str:
    """"two small crimson discs", "a star on the left"... Synonyms drawn from ``rng``."""
    sing, plur = SHAPE_SYNONYMS[obj.shape][int(rng.integers(len(SHAPE_SYNONYMS[obj.shape])))]
    words = []
    count_word = _pick(rng, COUNT_WORDS[count])
    if size_word:
        words.append(_pick(rng, SIZE_SYNONYMS[size_word]))
    words.append(_pick(rng, COLOUR_SYNONYMS[obj.colour]))
    words.append(sing if count == 1 else plur)
    if count == 1 and article:
        count_word = "an" if words[0][0] in "aeiou" else "a"
    phrase = " ".join([count_word] + words)
    if position_word:
        phrase += " " + _pick(rng, POSITION_PHRASES[position_word])
    return phrase


def caption(scene: Scene, rng: np.random.Generator, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """One caption for ``scene``; the main object is always the first object mentioned."""
    main = object_phrase(rng, scene.main, scene.count, scene.size_word, scene.position_word)
    sec = ""
    extra = scene.objects[scene.count:]
    if extra and rng.random() < 0.7:
        joiner = _pick(rng, (" and ", " with ", " beside "))
        sec = joiner + object_phrase(rng, extra[0], 1, "small" if rng.random() < 0.5 else None)
    bg = _pick(rng, COLOUR_SYNONYMS[scene.background])
    if scene.style in STYLE_PHRASES and rng.random() < 0.8:
        bg = f"{_pick(rng, STYLE_PHRASES[scene.style])} {bg}"
    template = _pick(rng, templates)
    text = template.format(main=main, sec=sec, bg=bg, bgnoun=_pick(rng, BG_NOUNS))
    text = " ".join(text.split())
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


HELDOUT_PROMPTS_FILE = "heldout_prompts.txt"


def heldout_scenes(n: int = 240, seed: int = 20261126) -> list[tuple[Scene, str]]:
    """The held-out evaluation set: scenes whose main (colour, shape, background) is in HELDOUT_COMBOS,
    every other prompt written with a held-out template. Deterministic in (n, seed)."""
    from models.embedded.scenes import sample_scene

    rng = np.random.default_rng(seed)
    combos = sorted(HELDOUT_COMBOS)
    out = []
    for i in range(n):
        scene = sample_scene(rng, only=[combos[i % len(combos)]])
        templates = HELDOUT_TEMPLATES if i % 2 == 0 else TRAIN_TEMPLATES
        out.append((scene, caption(scene, rng, templates)))
    return out
