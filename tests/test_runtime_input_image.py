"""Input images for editing: what is converted, what is refused with a reason, before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from runtime.images import InputImageError, read_input_image


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height greyscale pixels; its data is a tiny compressed stream."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + \
        chunk(b"IEND", b"")


def test_rgb_and_greyscale_and_opaque_alpha_come_back_as_the_same_rgb_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    out = read_input_image(_encode(Image.fromarray(rgb, "RGB")))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), rgb)
    grey = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    out = read_input_image(_encode(Image.fromarray(grey, "L")))
    assert np.array_equal(np.asarray(out), np.repeat(grey[..., None], 3, axis=2))
    opaque = np.concatenate([rgb, np.full((9, 7, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(np.asarray(read_input_image(_encode(Image.fromarray(opaque, "RGBA")))), rgb)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits():
    values = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    out = read_input_image(_encode(Image.fromarray(values)))
    assert np.asarray(out)[0, :, 0].tolist() == [0, 0, 1, 255]


@pytest.mark.parametrize("case", ["transparent_rgba", "cmyk", "not_an_image", "empty", "truncated"])
def test_refused_with_one_sentence_naming_the_field(case):
    rgb = Image.new("RGB", (8, 8), (10, 20, 30))
    data = {
        "transparent_rgba": lambda: _encode(Image.new("RGBA", (8, 8), (1, 2, 3, 128))),
        "cmyk": lambda: _encode(Image.new("CMYK", (8, 8)), "JPEG"),
        "not_an_image": lambda: b"%PDF-1.4 not an image",
        "empty": lambda: b"",
        "truncated": lambda: _encode(rgb.resize((64, 64)))[:60],
    }[case]()
    with pytest.raises(InputImageError) as err:
        read_input_image(data)
    message = str(err.value)
    assert message.startswith("image: ") and "\n" not in message and len(message) < 200


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding():
    data = _bomb_png(100_000, 100_000)  # 10^10 declared pixels in a file of under 100 bytes
    assert len(data) < 200
    t0 = time.perf_counter()
    with pytest.raises(InputImageError, match="over the limit"):
        read_input_image(data)
    assert time.perf_counter() - t0 < 0.5


def test_the_pixel_limit_is_the_configured_one():
    data = _encode(Image.new("RGB", (40, 30)))
    assert read_input_image(data, max_pixels=1200).size == (40, 30)
    with pytest.raises(InputImageError, match="1201 pixels|1200 pixels, over the limit of 1199"):
        read_input_image(data, max_pixels=1199)
