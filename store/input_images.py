"""Input images of instruction edits (FLUX.1 Kontext): stored once per owner by content hash.

An edit is an input image plus an instruction. The image is stored once, as a canonical PNG with
its size and mode, in ``input_images``; every generation of an edit points at it through
``generations.input_image_id``, so all its previews and finals share the one row, a refine of an
edit reads back exactly the pixels its previews used, and the images' ``parameters`` carry its full
sha256 as ``Input image`` (see :meth:`store.history.HistoryStore.png_parameters`).

Canonical PNG: the pixels alone (a fresh RGB image built from them, so no ICC profile, EXIF, text
chunk or other metadata of the upload travels), saved with a fixed ``compress_level``. The same
pixels therefore give the same bytes and the same sha256, however the image reached us.

Rows are per owner, as prompts are (``UNIQUE (owner, sha256)``): an input image is something a
user uploaded, so one user's image is never shown to, found by hash by, or referenced from another
user's generations (noise, by contrast, is a function of the seed alone and is shared). Two owners
uploading the same picture get two rows with the same hash.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from store.connection import DEFAULT_OWNER, check_owner, utc_now
from store.errors import BlobIntegrityError, NotFoundError
from store.noise import NoiseStore

#: zlib level of the canonical PNG: fixed, so equal pixels give equal bytes.
PNG_COMPRESS_LEVEL = 6
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
_COLUMNS = "id, owner, sha256, width, height, mode, created_at"


@dataclass(frozen=True)
class InputImage:
    """A stored input image; ``png`` is ``None`` when read with ``with_png=False``."""

    id: int
    owner: str
    sha256: str
    width: int
    height: int
    mode: str
    created_at: str
    png: bytes | None = field(default=None, repr=False)

    def image(self) -> Image.Image:
        """The stored pixels as an 8-bit RGB PIL image (decoded from ``png``).

        :raises ValueError: when the row was read without its PNG.
        """
        if self.png is None:
            raise ValueError(f"input image {self.id} was read without its PNG; use get_input_image(id, with_png=True)")
        with Image.open(io.BytesIO(self.png)) as im:
            return im.convert("RGB")


def check_input_image(image: Any) -> Image.Image:
    """Return ``image`` if it is a non-empty 8-bit RGB PIL image; otherwise a ValueError naming ``image``.

    Converting other modes (or refusing them) is the runtime's job (``runtime.images``), before the store.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"image must be an 8-bit RGB image, got mode {image.mode!r}; convert it before storing")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image must have at least one pixel, got {image.width}x{image.height}")
    return image


def canonical_png(image: Image.Image) -> bytes:
    """The canonical PNG bytes of an 8-bit RGB image: its pixels only, fixed compression, no metadata."""
    check_input_image(image)
    bare = Image.frombytes("RGB", image.size, image.tobytes())  # drops info: ICC profile, EXIF, text
    buf = io.BytesIO()
    bare.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def check_sha256(value: Any, field_name: str = "sha256") -> str:
    """Return ``value`` if it is 64 lowercase hex digits; otherwise a ValueError naming the field."""
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise ValueError(f"{field_name} must be 64 lowercase hex digits, got {value!r}")
    return value


def _input_image(row: dict[str, Any], png: bytes | None) -> InputImage:
    return InputImage(id=row["id"], owner=row["owner"], sha256=row["sha256"], width=row["width"],
                      height=row["height"], mode=row["mode"], created_at=row["created_at"], png=png)


def verify_input_png(row: dict[str, Any]) -> bytes:
    """Return an ``input_images`` row's PNG bytes after checking them against its ``sha256``."""
    digest = hashlib.sha256(row["png"]).hexdigest()
    if digest != row["sha256"]:
        raise BlobIntegrityError("input_images", row["id"],
                                 f"PNG sha256 {digest[:12]}... does not match the stored {row['sha256'][:12]}...")
    return row["png"]


class InputImageStore(NoiseStore):
    """Input images of edits: put once by content hash, read back verified."""

    def put_input_image(self, image: Image.Image, *, owner: str = DEFAULT_OWNER) -> InputImage:
        """Store ``image`` (8-bit RGB) once for ``owner`` and return its row, new or existing.

        Safe under concurrent callers (threads or processes): the insert is ``ON CONFLICT DO
        NOTHING`` on ``(owner, sha256)`` and the row is read back in the same transaction. Joins an
        enclosing :meth:`transaction` (the image then goes with it, all or nothing).

        :raises ValueError: ``image`` is not a non-empty 8-bit RGB PIL image, or a bad ``owner``;
            nothing is written.
        """
        check_owner(owner)
        png = canonical_png(image)
        digest = hashlib.sha256(png).hexdigest()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO input_images (owner, sha256, png, width, height, mode, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'RGB', ?) ON CONFLICT (owner, sha256) DO NOTHING",
                [owner, digest, png, image.width, image.height, utc_now()],
            )
            cur = db.execute(f"SELECT {_COLUMNS} FROM input_images WHERE owner = ? AND sha256 = ?", [owner, digest])
            names = [d[0] for d in cur.description]
            row = dict(zip(names, cur.fetchone()))
        return _input_image(row, png)  # the stored bytes hash to the same sha256 by construction

    def get_input_image(self, input_image_id: int, *, with_png: bool = True) -> InputImage:
        """Input image ``input_image_id``; with its PNG (checked against its sha256) unless ``with_png=False``.

        :raises NotFoundError: unknown id. :raises BlobIntegrityError: the PNG no longer matches its hash.
        """
        columns = _COLUMNS + (", png" if with_png else "")
        row = self.query_one(f"SELECT {columns} FROM input_images WHERE id = ?", [input_image_id])
        if row is None:
            raise NotFoundError("input_images", input_image_id)
        return _input_image(row, verify_input_png(row) if with_png else None)

    def find_input_image(self, sha256: str, *, owner: str = DEFAULT_OWNER, with_png: bool = True) -> InputImage | None:
        """``owner``'s input image whose canonical PNG has this sha256, or ``None``.

        :raises ValueError: ``sha256`` is not 64 lowercase hex digits. :raises BlobIntegrityError:
        """
        check_sha256(sha256)
        check_owner(owner)
        row = self.query_one("SELECT id FROM input_images WHERE owner = ? AND sha256 = ?", [owner, sha256])
        return None if row is None else self.get_input_image(row["id"], with_png=with_png)

    def count_input_images(self, *, owner: str | None = None) -> int:
        """How many input images are stored (``owner=None``: every owner's)."""
        row = self.query_one("SELECT count(*) AS n FROM input_images WHERE (? IS NULL OR owner = ?)", [owner, owner])
        return int(row["n"]) if row else 0
