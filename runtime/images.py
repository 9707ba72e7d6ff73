"""Pixels <-> 8-bit RGB images: the one conversion previews, finals and consistency measurement share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> an 8-bit RGB image (round to nearest)."""
    array = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, mode="RGB")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> float (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096  # an input image for editing; larger is refused, never resized silently
MAX_INPUT_BYTES = 32 * 1024 * 1024

# Modes an input image may arrive in, and whether converting it to RGB keeps what the user sees.
_SAFE_TO_RGB = {"RGB", "L", "1"}
_REFUSED = {
    "CMYK": "CMYK needs a colour profile to convert faithfully; save the image as RGB",
    "YCbCr": "YCbCr images are not read; save the image as RGB",
    "LAB": "Lab images need a colour profile to convert faithfully; save the image as RGB",
    "HSV": "HSV images are not read; save the image as RGB",
    "F": "floating-point images have no fixed range to map to 8 bits; save the image as 8-bit RGB",
    "I": "32-bit integer images have no fixed range to map to 8 bits; save the image as 8-bit RGB",
}


class InputImageError(ValueError):
    """An input image was refused; the message names the field ``image`` and the reason."""


def read_input_image(data: bytes, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Decode an uploaded input image into 8-bit RGB, or refuse it with one sentence.

    Checked before any pixel is decoded: the byte size, that it is an image at all, and its width x height
    against ``max_pixels`` (a decompression bomb declares a huge size in a small file; the header is read
    first, so it is refused without being decompressed). Then the mode:

    - RGB, L and 1 convert to RGB without changing what the user sees;
    - 16-bit greyscale (``I;16``) is scaled to 8 bits (the top byte of each value, a fixed map);
    - RGBA, LA, PA and palette images with transparency convert only when every pixel is opaque:
      dropping real transparency would change the image the edit starts from;
    - CMYK, Lab, YCbCr, HSV, 32-bit integer and float images are refused with the reason.
    """
    import io

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InputImageError("image: no image was given")
    if len(data) > MAX_INPUT_BYTES:
        raise InputImageError(f"image: the file is {len(data)} bytes, over the limit of {MAX_INPUT_BYTES}")
    try:
        image = Image.open(io.BytesIO(bytes(data)))  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own header check, at twice its MAX_IMAGE_PIXELS
        raise InputImageError(f"image: its declared size is over the limit of {max_pixels} pixels") from None
    except (Image.UnidentifiedImageError, OSError) as exc:
        raise InputImageError(f"image: not a readable image file ({type(exc).__name__})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InputImageError(f"image: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise InputImageError(f"image: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}")
    mode = image.mode
    if mode in _REFUSED:
        raise InputImageError(f"image: mode {mode} is refused: {_REFUSED[mode]}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputImageError(f"image: the file is damaged or truncated ({type(exc).__name__})") from None
    if mode in _SAFE_TO_RGB:
        return image.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if int(alpha.min()) < 255:
            raise InputImageError("image: it has transparent pixels; flatten it onto a background first "
                                  "(dropping transparency would change the image the edit starts from)")
        return rgba.convert("RGB")
    raise InputImageError(f"image: mode {mode} is not supported; save the image as 8-bit RGB")


def as_input_image(image: Any, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """An input image given as bytes, a file path or a PIL image -> 8-bit RGB, by :func:`read_input_image`'s rules
    (a PIL image that is already RGB and within the pixel limit is taken as it is)."""
    import io
    import os

    if isinstance(image, Image.Image):
        if image.mode in _REFUSED:
            raise InputImageError(f"image: mode {image.mode} is refused: {_REFUSED[image.mode]}")
        if image.width * image.height > max_pixels:
            raise InputImageError(f"image: {image.width}x{image.height} is {image.width * image.height} pixels, "
                                  f"over the limit of {max_pixels}")
        if image.mode == "RGB":
            return image
        buffer = io.BytesIO()
        try:
            image.save(buffer, format="PNG")  # the file rules below decide what converts safely
        except (OSError, ValueError) as exc:
            raise InputImageError(f"image: mode {image.mode} is not supported ({type(exc).__name__}); "
                                  "save the image as 8-bit RGB") from None
        return read_input_image(buffer.getvalue(), max_pixels)
    if isinstance(image, (bytes, bytearray)):
        return read_input_image(bytes(image), max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise InputImageError(f"image: no such file {path!r}")
        if os.path.getsize(path) > MAX_INPUT_BYTES:
            raise InputImageError(f"image: the file is {os.path.getsize(path)} bytes, over the limit of {MAX_INPUT_BYTES}")
        with open(path, "rb") as f:
            return read_input_image(f.read(), max_pixels)
    raise InputImageError(f"image: expected image bytes, a file path or a PIL image, got {type(image).__name__}")
