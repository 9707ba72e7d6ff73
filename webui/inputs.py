"""The Explore tab's fields, parsed and checked before anything touches the engine or the store.

The app shows one clear message per bad field (:class:`FieldError` names the field as the UI labels
it) and writes nothing. The limits are the engine's own (``runtime.request``, ``refine.full_step``);
the engine checks them again, with the model's own rules (allowed sizes), before it writes anything.
Checking here too makes the message name the field the user typed into.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from refine.full_step import DEFAULT_STEPS as DEFAULT_REFINE_STEPS
from refine.full_step import MAX_STEPS as MAX_REFINE_STEPS
from runtime import request as engine_limits

SEED_MAX = engine_limits.MAX_SEED  # A1111's seed range: 32-bit seeds
MAX_PROMPTS = engine_limits.MAX_PROMPTS
MAX_SEEDS = engine_limits.DEFAULT_MAX_SEEDS
MAX_PROMPT_CHARS = engine_limits.MAX_PROMPT_CHARS
PREVIEW_STEPS = (1, engine_limits.MAX_STEPS)
REFINE_STEPS = (1, MAX_REFINE_STEPS)
GUIDANCE_MAX = engine_limits.MAX_GUIDANCE
MAX_TILES = 256  # prompts x seeds in one grid: what a browser gallery shows comfortably

# Length limits of the text fields, checked before any parsing (so no input can make parsing slow).
MAX_PROMPTS_FIELD_CHARS = MAX_PROMPTS * (MAX_PROMPT_CHARS + 1) + 1000  # 16 prompts, newlines, blank lines
MAX_SEED_LIST_CHARS = 1000  # 64 ten-digit seeds with separators fit
MAX_SEARCH_CHARS = 200
MAX_SOLVER_CHARS = 300
MAX_ITEM_CHARS = 40  # "final:123456789012345678"
quote = engine_limits.quote


class FieldError(ValueError):
    """Bad input in one UI field; ``field`` is the field's label."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ExploreSettings:
    """Everything a preview grid depends on (the determinism key, less the model)."""

    prompts: list[str]
    negative_prompt: str
    seeds: list[int]
    steps: int
    solver: str
    guidance: float
    width: int | None  # None: an edit's size is picked for its input image (``model.default_size_for``)
    height: int | None
    refine_steps: int = DEFAULT_REFINE_STEPS
    image: str | None = None  # the input image of an edit: a file Gradio received (its upload folder)
    keep_image_size: bool = False  # an edit at its input image's own size (width and height unused)

    def as_dict(self) -> dict:
        return asdict(self)


def check_field_text(value: object, field: str, limit: int) -> str:
    """``value`` as text of at most ``limit`` characters and valid Unicode, checked before any parsing.

    ``None`` is the empty text. Anything else that is not text, anything longer than ``limit`` and a
    lone surrogate (which the store cannot encode) are one :class:`FieldError` naming the field.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(field, f"expected text, got {type(value).__name__}")
    if len(value) > limit:
        raise FieldError(field, f"at most {limit} characters, got {len(value)}")
    try:
        engine_limits.check_unicode(value, field)
    except ValueError as exc:
        raise FieldError(field, str(exc).removeprefix(field + " ")) from None
    return value


def parse_prompts(text: str | None, label: str = "Prompts") -> list[str]:
    """One prompt per non-empty line (an editing model's instructions: ``label`` "Instructions")."""
    text = check_field_text(text, label, MAX_PROMPTS_FIELD_CHARS)
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    what = label.lower().rstrip("s")
    if not prompts:
        raise FieldError(label, f"enter at least one {what} (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise FieldError(label, f"at most {MAX_PROMPTS} {label.lower()}, got {len(prompts)}")
    for p in prompts:
        if len(p) > MAX_PROMPT_CHARS:
            raise FieldError(label, f"each {what} is at most {MAX_PROMPT_CHARS} characters")
    return prompts


def parse_negative(text: str | None) -> str:
    neg = check_field_text(text, "Negative prompt", MAX_PROMPT_CHARS + 100).strip()
    if "\n" in neg:
        raise FieldError("Negative prompt", "one line only (it applies to every prompt)")
    if len(neg) > MAX_PROMPT_CHARS:
        raise FieldError("Negative prompt", f"at most {MAX_PROMPT_CHARS} characters")
    return neg


def parse_int(value: object, name: str, lo: int, hi: int) -> int:
    """An integer in lo..hi; a float only when it is whole (Gradio Numbers arrive as floats)."""
    if isinstance(value, bool) or value is None or value == "":
        raise FieldError(name, f"enter a whole number in {lo}..{hi}")
    if isinstance(value, str):
        value = value.strip()[:40]  # a longer number is out of range anyway; never parse megabytes
        if not re.fullmatch(r"[+-]?\d{1,30}", value):
            raise FieldError(name, f"enter a whole number in {lo}..{hi}, got {quote(value, 20)}")
        value = int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise FieldError(name, f"enter a whole number in {lo}..{hi}, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise FieldError(name, f"enter a whole number in {lo}..{hi}, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise FieldError(name, f"must be in {lo}..{hi}, got {value}")
    return value


def parse_seed_list(text: str, field: str = "Seed list", limit: int = MAX_SEEDS,
                    max_chars: int = MAX_SEED_LIST_CHARS) -> list[int]:
    """``"3, 17, 100-103"`` -> [3, 17, 100, 101, 102, 103]: the engine's grammar, order kept, no repeats.

    Linear time: the length is checked first, then the text is split on commas and each part read on
    its own (a part is a number or ``a-b``), each range bounded before it is expanded.
    """
    text = check_field_text(text, field, max_chars)
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        lo, hi = lo.strip(), hi.strip()
        if not _digits(lo) or (dash and not _digits(hi)):
            raise FieldError(field, f"enter numbers and ranges separated by commas, like 3, 17, 100-103; "
                                    f"cannot read {quote(part.strip(), 20)}")
        a = int(lo)
        b = int(hi) if dash else a
        if a > SEED_MAX or b > SEED_MAX:
            raise FieldError(field, f"values are in 0..{SEED_MAX}, got {max(a, b)}")
        if b < a:
            raise FieldError(field, f"the range {a}-{b} runs backwards")
        if len(seeds) + (b - a + 1) > limit:
            raise FieldError(field, f"at most {limit} values, got more")
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        raise FieldError(field, "a value appears twice")
    return seeds


def _digits(text: str) -> bool:
    """A non-negative decimal integer of at most 20 ASCII digits."""
    return 0 < len(text) <= 20 and text.isascii() and text.isdigit()


def parse_seeds(seed_list: str | None, count: object, start: object) -> list[int]:
    """The explicit list when given, else ``count`` seeds from ``start`` (seed + i, as A1111 does)."""
    seed_list = check_field_text(seed_list, "Seed list", MAX_SEED_LIST_CHARS)
    if seed_list.strip():
        return parse_seed_list(seed_list)
    n = parse_int(count, "Seed count", 1, MAX_SEEDS)
    s = parse_int(start, "Seed start", 0, SEED_MAX)
    if s + n - 1 > SEED_MAX:
        raise FieldError("Seed start", f"start + count - 1 must stay within {SEED_MAX}")
    return list(range(s, s + n))


def parse_guidance(value: object) -> float:
    if isinstance(value, bool) or value is None or value == "":
        raise FieldError("Guidance", "enter a number")
    try:
        g = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FieldError("Guidance", f"enter a number, got {quote(value, 20)}") from None
    if not math.isfinite(g) or not 0.0 <= g <= GUIDANCE_MAX:
        raise FieldError("Guidance", f"must be a finite number in 0..{GUIDANCE_MAX:g}, got {quote(value, 20)}")
    return g


def parse_explore(
    prompts: str | None,
    negative: str | None,
    seed_count: object,
    seed_start: object,
    seed_list: str | None,
    steps: object,
    solver: str | None,
    guidance: object,
    width: object,
    height: object,
    refine_steps: object = DEFAULT_REFINE_STEPS,
    solvers: list[str] | None = None,
    max_size: int = 2048,
    image: object = None,
    keep_image_size: object = False,
    upload_root: str | Path | None = None,
    edits: bool = False,
) -> ExploreSettings:
    """All Explore fields at once; the first bad one raises :class:`FieldError`.

    ``image`` / ``keep_image_size``: the input image of an edit (see :func:`parse_image`) and whether to keep
    its size. ``edits``: the model is an editing model, whose lines are instructions ("Instructions" in
    messages) and whose Width and Height may be left empty (the model picks the size for the input image);
    with ``keep_image_size`` they are not used. Whether an image is required (or refused) is the engine's
    rule (``runtime.request.check_image``), applied before anything is written.
    """
    keep = parse_checkbox(keep_image_size, "Keep input size")
    label = "Instructions" if edits else "Prompts"
    items = parse_prompts(prompts, label)
    path = parse_image(image, upload_root)
    settings = ExploreSettings(
        prompts=items,
        negative_prompt=parse_negative(negative),
        seeds=parse_seeds(seed_list, seed_count, seed_start),
        steps=parse_int(steps, "Preview steps", *PREVIEW_STEPS),
        solver=_solver(solver, solvers),
        guidance=parse_guidance(guidance),
        width=None if keep else _size(width, "Width", max_size, edits),
        height=None if keep else _size(height, "Height", max_size, edits),
        refine_steps=parse_int(refine_steps, "Refine steps", *REFINE_STEPS),
        image=path,
        keep_image_size=keep,
    )
    if len(settings.prompts) * len(settings.seeds) > MAX_TILES:
        raise FieldError(label, f"{label.lower()} x seeds is at most {MAX_TILES} tiles, got "
                                f"{len(settings.prompts)} x {len(settings.seeds)}")
    return settings


def _size(value: object, name: str, max_size: int, may_be_empty: bool) -> int | None:
    """Width / Height; empty or 0 means "the model's size for the input image" when ``may_be_empty`` (a
    Gradio Number shows an empty value as 0)."""
    if may_be_empty and (value is None or (isinstance(value, str) and value.strip() in ("", "0"))
                         or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)):
        return None
    return parse_int(value, name, 1, max_size)


def parse_checkbox(value: object, name: str) -> bool:
    """A checkbox value: true or false (``None`` is false), nothing else."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FieldError(name, f"must be true or false, got {quote(value, 20)}")
    return value


def parse_image(value: object, upload_root: str | Path | None = None) -> str | None:
    """The input image field -> the path of the file Gradio received, or ``None`` when empty.

    The value is Gradio's file record (``{"path": ..., "orig_name": ...}``; the preview listener takes raw
    values). Gradio has already refused a path outside its upload folder; this checks again against
    ``upload_root`` (the same folder), so no other file on the server is ever read as an input image. The
    file's content (an image at all, its size, mode and pixel count) is the engine's check
    (``runtime.images.read_input_image``), which names the field ``image``.
    """
    if value is None or value == "":
        return None
    path = value.get("path") if isinstance(value, dict) else None
    if not isinstance(path, str) or not path or len(path) > 4096 or "\x00" in path:
        raise FieldError("image", "upload an image file (PNG, JPEG or WebP)")
    if upload_root is not None:
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(Path(os.path.realpath(upload_root))):
            raise FieldError("image", "upload the image through the app; files on the server are not read")
    return path


def _solver(value: str | None, solvers: list[str] | None) -> str:
    value = check_field_text(value, "Solver", MAX_SOLVER_CHARS)
    if not value:
        raise FieldError("Solver", "choose a solver")
    if solvers is not None and value not in solvers:
        raise FieldError("Solver", f"unknown solver {quote(value)}; choose one of {', '.join(solvers)}")
    return value


def dice_seed(rng: random.Random | None = None) -> int:
    """A random seed start for the dice button."""
    return (rng or random.SystemRandom()).randrange(SEED_MAX + 1)
