"""What a preview run is asked to do, checked in full before anything runs or is written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

DEFAULT_STEPS = 4
MAX_STEPS = 50
DEFAULT_MAX_SEEDS = 64
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1  # A1111's range; the store's CPU generator takes any of these
MAX_SEED_TEXT_CHARS = 10_000  # a seed list as text: checked before it is parsed
MAX_GUIDANCE = 50.0
DEFAULT_SOLVER = "consistency"
QUOTE_CHARS = 40  # how much of a rejected value an error message quotes


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, so an error never echoes a whole input."""
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit + 2 else text[:limit] + "…"


def check_unicode(text: str, field_name: str) -> str:
    """``text`` if it is valid Unicode text (no lone surrogate, which no database or file can store)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field_name} contains an invalid character at position {exc.start} "
                         "(a lone surrogate); remove it") from None
    return text


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-7"``, ``"1,5,9"`` or mixes such as ``"0-3,10,20-21"`` (ranges inclusive, order kept).

    Raises ValueError naming ``seeds`` for anything else (empty parts, reversed ranges, negatives).
    Linear in the length of ``text``, which is checked against :data:`MAX_SEED_TEXT_CHARS` first.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"seeds must be like '0-7', '1,5,9' or a mix, got {quote(text)}")
    if len(text) > MAX_SEED_TEXT_CHARS:
        raise ValueError(f"seeds: at most {MAX_SEED_TEXT_CHARS} characters, got {len(text)}")
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        lo, hi = lo.strip(), hi.strip()
        if not lo.isascii() or not lo.isdigit() or (dash and (not hi.isascii() or not hi.isdigit())):
            raise ValueError(f"seeds: cannot read {quote(part)} (use '0-7', '1,5,9' or a mix)")
        if len(lo) > 10 or len(hi) > 10:
            raise ValueError(f"seeds must be in 0..{MAX_SEED}, got {quote(part)}")
        a = int(lo)
        b = int(hi) if dash else a
        if b < a:
            raise ValueError(f"seeds: range {quote(part)} runs backwards")
        if b - a >= 100_000:
            raise ValueError(f"seeds: range {quote(part)} is too long")
        seeds.extend(range(a, b + 1))
    return seeds


@dataclass(frozen=True)
class PreviewRequest:
    """A grid of previews: every prompt x every seed, with the same settings.

    Attributes:
        prompts: one or more non-empty prompts.
        seeds: one or more seeds in 0..2**32-1 (each seed's noise comes from the store).
        steps: K, the number of model evaluations per preview, 1..50.
        solver: ``"consistency"`` (the active learned checkpoint) or a name from ``solver.registry``.
        guidance: classifier-free guidance scale w >= 0 (``None`` = the model's default).
        height, width: pixels (``None`` = the model's default size).
        negative_prompt: the text of the unconditional branch ("" = unconditional).
        image: the input image of an edit (an editing model such as FLUX.1 Kontext needs one, a
            text-to-image model takes none): PNG/JPEG/WebP bytes, a file path or a PIL image, checked by
            :func:`runtime.images.read_input_image` (modes, pixel limit); validated into 8-bit RGB.
        keep_image_size: with an image and no height / width: keep the input's size (rounded down to the
            model's size multiple) instead of the nearest preferred resolution.
    """

    prompts: Sequence[str]
    seeds: Sequence[int]
    steps: int = DEFAULT_STEPS
    solver: str = DEFAULT_SOLVER
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    image: Any = None
    keep_image_size: bool = False

    @property
    def pairs(self) -> list[tuple[str, int]]:
        """(prompt, seed) in output order: prompt-major, seeds in the order given."""
        return [(p, s) for p in self.prompts for s in self.seeds]


def default_guidance(model: Any) -> float:
    return float(getattr(model, "default_guidance", 5.0))


def check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: give at least one prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"prompts: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] is empty; every prompt must be non-empty text")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts[{i}] is longer than {MAX_PROMPT_CHARS} characters")
        check_unicode(p, f"prompts[{i}]")
    return list(prompts)


def check_seeds(seeds: Any, max_seeds: int) -> list[int]:
    if isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError("seeds: give at least one seed")
    if len(seeds) > max_seeds:
        raise ValueError(f"seeds: at most {max_seeds} seeds per request, got {len(seeds)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise ValueError(f"seeds must be integers in 0..{MAX_SEED}, got {quote(s)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds: a seed is listed twice")
    return list(seeds)


def check_guidance(guidance: Any, field_name: str = "guidance") -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise ValueError(f"{field_name} must be a number, got {quote(guidance)}")
    g = float(guidance)
    if math.isnan(g) or math.isinf(g):
        raise ValueError(f"{field_name} must be a finite number, got {quote(guidance)}")
    if not 0.0 <= g <= MAX_GUIDANCE:
        raise ValueError(f"{field_name} must be in 0..{MAX_GUIDANCE:g}, got {quote(guidance)}")
    return g


def check_steps(steps: Any, limit: int, field_name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"{field_name} must be an integer, got {quote(steps)}")
    if not 1 <= steps <= limit:
        raise ValueError(f"{field_name} must be in 1..{limit}, got {steps}")
    return steps


def check_size(model: Any, height: Any, width: Any) -> tuple[int, int]:
    """(height, width), the model's default for ``None``; the model's own rule otherwise."""
    h = model.default_size[0] if height is None else height
    w = model.default_size[1] if width is None else width
    model.check_size(h, w)  # ValueError naming height / width
    allowed = getattr(model, "allowed_sizes", None)
    if allowed and (h, w) not in {tuple(s) for s in allowed}:
        raise ValueError(f"size {h}x{w} is not one {model.model_id} supports; choose one of {sorted(allowed)}")
    return int(h), int(w)


def check_image(model: Any, image: Any, max_pixels: int | None = None) -> Any:
    """The input image as 8-bit RGB (``None`` for a text-to-image request); one ValueError naming ``image``
    when an editing model gets none, a text-to-image model gets one, or the image itself is refused."""
    from runtime.images import DEFAULT_MAX_INPUT_PIXELS, as_input_image

    takes = bool(getattr(model, "takes_image", False))
    if image is None:
        if takes:
            raise ValueError(f"image: {model.model_id} is an editing model; give an input image to edit")
        return None
    if not takes:
        raise ValueError(f"image: {model.model_id} is a text-to-image model and takes no input image")
    return as_input_image(image, DEFAULT_MAX_INPUT_PIXELS if max_pixels is None else max_pixels)


def check_request_size(model: Any, height: Any, width: Any, image: Any, keep_image_size: Any) -> tuple[int, int]:
    """(height, width) of a request: as given, else the size the model picks for the input image of an edit
    (``default_size_for``), else the model's default size."""
    if not isinstance(keep_image_size, bool):
        raise ValueError(f"keep_image_size must be true or false, got {quote(keep_image_size)}")
    if image is not None and (height is None or width is None):
        h, w = model.default_size_for(image, keep_image_size)
        height, width = (h if height is None else height), (w if width is None else width)
    return check_size(model, height, width)


def check_solver(name: Any) -> str:
    from solver.registry import solver_names

    names = [DEFAULT_SOLVER] + [n for n in solver_names() if n != DEFAULT_SOLVER]
    if isinstance(name, str) and name.startswith(DEFAULT_SOLVER + ":") and len(name) > len(DEFAULT_SOLVER) + 1:
        return name  # consistency:PATH, a saved policy directory (checked when it is loaded, before any write)
    if isinstance(name, str) and name not in names and ("[" in name or name.startswith("tuned:")):
        from solver.registry import check_name  # a baseline with options NAME[key=value,...], or tuned:FAMILY

        try:
            return check_name(name)
        except ValueError as exc:
            raise ValueError(f"solver: {exc}") from None
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"solver must be one of {names} or 'consistency:PATH', got {quote(name)}")
    return name


def validate(request: PreviewRequest, model: Any, max_seeds: int = DEFAULT_MAX_SEEDS) -> PreviewRequest:
    """The request with defaults filled in, or one ValueError naming the first bad field. Writes nothing."""
    if not isinstance(request.negative_prompt, str):
        raise ValueError(f"negative_prompt must be text, got {quote(request.negative_prompt)}")
    if len(request.negative_prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters")
    check_unicode(request.negative_prompt, "negative_prompt")
    prompts = check_prompts(request.prompts)
    seeds = check_seeds(request.seeds, max_seeds)
    steps = check_steps(request.steps, MAX_STEPS)
    solver = check_solver(request.solver)
    guidance = check_guidance(default_guidance(model) if request.guidance is None else request.guidance)
    image = check_image(model, request.image)
    height, width = check_request_size(model, request.height, request.width, image, request.keep_image_size)
    return PreviewRequest(
        prompts=tuple(prompts),
        seeds=tuple(seeds),
        steps=steps,
        solver=solver,
        guidance=guidance,
        height=height,
        width=width,
        negative_prompt=request.negative_prompt,
        extra=dict(request.extra),
        image=image,
        keep_image_size=request.keep_image_size,
    )
