"""PNG images with A1111-style generation parameters, so other tools can read them back.

The ``parameters`` text chunk holds::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 4, Sampler: consistency, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: <id>, Noise hash: <sha256 prefix>, Version: diffusion-preview 0.1.0

The negative-prompt line is left out when it is empty (as A1111 does). Values that contain a
comma, colon, quote or newline are written as JSON strings. Extra keys are appended as
``Key: value`` with ``str(value)``; :func:`parse_parameters` returns them as strings under the
same key. Known keys come back typed and in snake_case: ``prompt, negative_prompt, steps,
sampler, cfg_scale, seed, width, height, model, model_hash, noise_hash, version``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"

# (label in the text, dict key, type); Size is special-cased into width/height.
_FIELDS: list[tuple[str, str, type]] = [
    ("Steps", "steps", int),
    ("Sampler", "sampler", str),
    ("CFG scale", "cfg_scale", float),
    ("Seed", "seed", int),
    ("Size", "size", str),
    ("Model hash", "model_hash", str),
    ("Model", "model", str),
    ("Noise hash", "noise_hash", str),
    ("Version", "version", str),
]
_REQUIRED = ("prompt", "steps", "sampler", "cfg_scale", "seed", "width", "height", "model")
_KNOWN_KEYS = {"prompt", "negative_prompt", "width", "height"} | {key for _, key, _ in _FIELDS}
_LABEL_TO_KEY = {label: key for label, key, _ in _FIELDS}
_KEY_TO_LABEL = {key: label for label, key, _ in _FIELDS}
_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9 _\-/]*\Z")
# One "Label: value" pair: the value is a JSON string or runs to the next comma.
_PAIR_RE = re.compile(r'\s*([A-Za-z][A-Za-z0-9 _\-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|\Z)')
_NEGATIVE = "Negative prompt: "


def app_version() -> str:
    """``diffusion-preview <installed version>`` as written in the ``Version`` field."""
    try:
        return f"diffusion-preview {metadata.version('diffusion-preview')}"
    except metadata.PackageNotFoundError:  # running from a bare checkout
        return "diffusion-preview unknown"


def _quote(value: str) -> str:
    if any(c in value for c in ',:"\n'):
        return json.dumps(value, ensure_ascii=False)
    return value


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def format_parameters(params: Mapping[str, Any]) -> str:
    """Render ``params`` as A1111 ``parameters`` text (see the module docstring for the keys).

    :raises ValueError: naming a missing required key or an extra key that cannot be a label.
    """
    for key in _REQUIRED:
        if key not in params:
            raise ValueError(f"params is missing {key!r}")
    lines = [str(params["prompt"])]
    negative = str(params.get("negative_prompt") or "")
    if negative:
        lines.append(_NEGATIVE + negative)
    pairs = [
        ("Steps", str(int(params["steps"]))),
        ("Sampler", _quote(str(params["sampler"]))),
        ("CFG scale", _number(params["cfg_scale"])),
        ("Seed", str(int(params["seed"]))),
        ("Size", f"{int(params['width'])}x{int(params['height'])}"),
    ]
    if params.get("model_hash"):
        pairs.append(("Model hash", _quote(str(params["model_hash"]))))
    pairs.append(("Model", _quote(str(params["model"]))))
    if params.get("noise_hash"):
        pairs.append(("Noise hash", _quote(str(params["noise_hash"]))))
    pairs.append(("Version", _quote(str(params.get("version") or app_version()))))
    for key, value in params.items():
        if key in _KNOWN_KEYS:
            continue
        if not isinstance(key, str) or not _LABEL_RE.match(key) or key != key.strip() or key in _LABEL_TO_KEY:
            raise ValueError(f"params key {key!r} cannot be written as a parameters label")
        pairs.append((key, _quote(str(value))))
    lines.append(", ".join(f"{label}: {value}" for label, value in pairs))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text back into a dict (inverse of :func:`format_parameters`).

    :raises ValueError: when the last line holds no ``Steps:`` parameters.
    """
    lines = text.split("\n")
    pairs = [(m.group(1).strip(), m.group(2).strip()) for m in _PAIR_RE.finditer(lines[-1]) if m.group(0).strip()]
    if not pairs or pairs[0][0] != "Steps":
        raise ValueError("parameters text has no 'Steps: ...' line at its end")
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines[:-1]:
        if not in_negative and line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):]
        (negative_lines if in_negative else prompt_lines).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for label, raw in pairs:
        value = json.loads(raw) if raw.startswith('"') else raw
        key = _LABEL_TO_KEY.get(label)
        if key == "size":
            width, _, height = value.partition("x")
            out["width"], out["height"] = int(width), int(height)
        elif key is not None:
            kind = next(t for _, k, t in _FIELDS if k == key)
            out[key] = kind(value)
        else:
            out[label] = value
    return out


def encode_png(image: Image.Image, params: Mapping[str, Any]) -> bytes:
    """Encode ``image`` as PNG bytes carrying ``params`` in its ``parameters`` text chunk."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, format_parameters(params))  # falls back to iTXt for non-Latin-1 text
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_parameters(png: bytes) -> dict[str, Any]:
    """Read the ``parameters`` chunk of PNG bytes and parse it.

    :raises ValueError: when the bytes are not a PNG or carry no ``parameters`` chunk.
    """
    try:
        with Image.open(io.BytesIO(png)) as im:
            if im.format != "PNG":
                raise ValueError(f"png must be PNG bytes, got {im.format}")
            text = im.info.get(PARAMETERS_KEY)
    except (OSError, Image.UnidentifiedImageError) as exc:
        raise ValueError(f"png is not a readable PNG image ({exc})") from None
    if not isinstance(text, str):
        raise ValueError("the PNG has no 'parameters' text chunk")
    return parse_parameters(text)
