"""Read a prompt of the caption grammar back: main object's colour, shape, count, and the background colour.

Free-form within the domain: synonyms, plurals, any template order. The main object is the first
shape word; its colour is the nearest colour word before it in the same noun phrase. The background
colour is a colour word not attached to any shape (preferring one next to a background noun).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.embedded.captions import BG_NOUNS, COLOUR_SYNONYMS, SHAPE_SYNONYMS

_COLOUR_WORDS = {w: c for c, ws in COLOUR_SYNONYMS.items() for w in ws}
_SHAPE_WORDS: dict[str, str] = {}
for _shape, _pairs in SHAPE_SYNONYMS.items():
    for _s, _p in _pairs:
        _SHAPE_WORDS[_s] = _shape
        _SHAPE_WORDS[_p] = _shape
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "pair": 2, "three": 3}
_STOP = {"on", "against", "with", "and", "beside", "over", "upon", "in", "at", "near", "front", "showing", "is", ","}


@dataclass(frozen=True)
class ParsedPrompt:
    """What a prompt asks for; ``None`` where it does not say."""

    main_colour: str | None
    main_shape: str | None
    background: str | None
    count: int = 1


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*|,", text.lower())


def parse_prompt(text: str) -> ParsedPrompt:
    """Parse ``text``; multi-word synonyms ("five-pointed star", "plus sign") are matched first."""
    toks = _tokens(text)
    # merge two-word shape names
    merged: list[str] = []
    i = 0
    while i < len(toks):
        two = " ".join(toks[i:i + 2])
        if two in _SHAPE_WORDS:
            merged.append(two)
            i += 2
        else:
            merged.append(toks[i])
            i += 1
    toks = merged
    used_colour = set()
    objects: list[tuple[int, str, str | None, int]] = []  # (index, shape, colour, count)
    for i, w in enumerate(toks):
        if w not in _SHAPE_WORDS:
            continue
        colour, count = None, None
        for j in range(i - 1, max(-1, i - 5), -1):
            if toks[j] in _STOP or toks[j] in _SHAPE_WORDS or toks[j] in BG_NOUNS:
                break
            if colour is None and toks[j] in _COLOUR_WORDS:
                colour = _COLOUR_WORDS[toks[j]]
                used_colour.add(j)
            if count is None and toks[j] in _COUNT_WORDS:
                count = _COUNT_WORDS[toks[j]]
        objects.append((i, _SHAPE_WORDS[w], colour, count or 1))
    background = None
    free = [j for j, w in enumerate(toks) if w in _COLOUR_WORDS and j not in used_colour]
    near_noun = [j for j in free if any(k < len(toks) and toks[k] in BG_NOUNS for k in (j + 1, j + 2))]
    pick = near_noun or free
    if pick:
        background = _COLOUR_WORDS[toks[pick[0]]]
    if not objects:
        return ParsedPrompt(None, None, background)
    _, shape, colour, count = objects[0]
    return ParsedPrompt(colour, shape, background, count)
