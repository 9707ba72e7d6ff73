"""The artist's history: prompts, generations, previews, finals and their consistency.

Images live in the database as PNG bytes (one source of truth: no files to drift from their
rows; a backup of the one file is a backup of everything). Each PNG carries A1111-style
``parameters`` built here from the generation row, and a sha256 column that every read checks.
Files are only ever written on request, by :meth:`HistoryStore.export_png`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from store.connection import (
    DEFAULT_OWNER,
    check_finite,
    check_owner,
    check_positive_int,
    check_text,
    dumps_json,
    utc_now,
)
from store.errors import BlobIntegrityError, NotFoundError
from store.input_images import InputImageStore
from store.noise import check_seed
from store.png import encode_png

MAX_PROMPT_CHARS = 10_000
MAX_SIDE = 16_384
MAX_STEPS = 10_000
MAX_LIST = 10_000


@dataclass(frozen=True)
class Generation:
    """One (model, prompt, negative prompt, seed, size, guidance) request; an edit also names its
    stored input image (``input_image_id``, ``None`` for text-to-image)."""

    id: int
    owner: str
    prompt_id: int
    prompt: str
    negative_prompt: str
    model_id: str
    seed: int
    height: int
    width: int
    guidance: float
    noise_id: int | None
    created_at: str
    input_image_id: int | None = None


@dataclass(frozen=True)
class Preview:
    """A few-step preview image; ``png`` is ``None`` in listings made without images."""

    id: int
    owner: str
    generation: Generation
    solver: str
    steps: int
    checkpoint_id: int | None
    timings_ms: dict[str, float]
    png_sha256: str
    created_at: str
    png: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Final:
    """The full-step image a refine job produced."""

    id: int
    owner: str
    job_id: int
    timings_ms: dict[str, float]
    png_sha256: str
    created_at: str
    png: bytes = field(repr=False)


@dataclass(frozen=True)
class Consistency:
    """How close a preview came to its final (``psnr`` in dB: ``models.metrics.psnr`` gives identical images
    100 dB; rows written before it may hold ``inf``, which is still accepted)."""

    id: int
    preview_id: int
    final_id: int
    psnr: float | None
    ssim: float | None
    metrics: dict[str, Any]
    created_at: str


def check_timings(timings_ms: Mapping[str, Any]) -> dict[str, float]:
    """Validate a ``{name: milliseconds}`` mapping of finite, non-negative numbers."""
    if not isinstance(timings_ms, Mapping):
        raise ValueError(f"timings_ms must be a mapping of name to milliseconds, got {type(timings_ms).__name__}")
    out = {}
    for name, value in timings_ms.items():
        if not isinstance(name, str) or check_finite(value, f"timings_ms[{name!r}]") < 0:
            raise ValueError(f"timings_ms[{name!r}] must be a non-negative number of milliseconds")
        out[name] = float(value)
    return out


def like_pattern(text: str) -> str:
    """A ``LIKE ... ESCAPE '\\'`` pattern matching ``text`` literally anywhere (``%`` and ``_`` escaped)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_png(table: str, row: Mapping[str, Any]) -> bytes:
    """Return a row's PNG bytes after checking them against its ``png_sha256``."""
    digest = _sha256(row["png"])
    if digest != row["png_sha256"]:
        raise BlobIntegrityError(table, row["id"], f"PNG sha256 {digest[:12]}... does not match the stored {row['png_sha256'][:12]}...")
    return row["png"]


_GENERATION_SELECT = """
SELECT g.id, g.owner, g.prompt_id, p.prompt, p.negative_prompt, g.model_id, g.seed, g.height,
       g.width, g.guidance, g.noise_id, g.created_at, g.input_image_id
FROM generations g JOIN prompts p ON p.id = g.prompt_id
"""


def _generation(row: Mapping[str, Any], prefix: str = "") -> Generation:
    return Generation(**{f: row[prefix + f] for f in Generation.__dataclass_fields__})


class HistoryStore(InputImageStore):
    """Prompts, generations, previews, finals and consistency measurements."""

    # -- prompts and generations ------------------------------------------------------------

    def add_prompt(self, prompt: str, negative_prompt: str = "", *, owner: str = DEFAULT_OWNER) -> int:
        """Return the id of ``(owner, prompt, negative_prompt)``, inserting it the first time."""
        check_text(prompt, "prompt", max_len=MAX_PROMPT_CHARS, allow_empty=True)
        check_text(negative_prompt, "negative_prompt", max_len=MAX_PROMPT_CHARS, allow_empty=True)
        check_owner(owner)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO prompts (owner, prompt, negative_prompt, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (owner, prompt, negative_prompt) DO NOTHING",
                [owner, prompt, negative_prompt, utc_now()],
            )
            row = db.execute(
                "SELECT id FROM prompts WHERE owner = ? AND prompt = ? AND negative_prompt = ?",
                [owner, prompt, negative_prompt],
            ).fetchone()
        return int(row[0])

    def add_generation(
        self,
        *,
        model_id: str,
        prompt: str,
        seed: int,
        height: int,
        width: int,
        guidance: float,
        negative_prompt: str = "",
        noise_id: int | None = None,
        owner: str = DEFAULT_OWNER,
        input_image_id: int | None = None,
    ) -> int:
        """Record a generation request and return its id (the prompt row is reused or created).

        ``input_image_id``: the stored input image of an edit (:meth:`put_input_image`); it must be
        ``owner``'s own, as an owner's input images are private to them.

        :raises ValueError: a field out of range (named). :raises NotFoundError: unknown ``noise_id``,
            or an ``input_image_id`` that does not exist for ``owner``; nothing is written.
        """
        check_text(model_id, "model_id", max_len=1000)
        check_seed(seed)
        check_positive_int(height, "height", MAX_SIDE)
        check_positive_int(width, "width", MAX_SIDE)
        check_finite(guidance, "guidance")
        if input_image_id is not None and (isinstance(input_image_id, bool) or not isinstance(input_image_id, int)):
            raise ValueError(f"input_image_id must be an integer id or None, got {input_image_id!r}")
        with self.transaction() as db:
            prompt_id = self.add_prompt(prompt, negative_prompt, owner=owner)
            if noise_id is not None and db.execute("SELECT 1 FROM noise WHERE id = ?", [noise_id]).fetchone() is None:
                raise NotFoundError("noise", noise_id)
            if input_image_id is not None and db.execute(
                    "SELECT 1 FROM input_images WHERE id = ? AND owner = ?", [input_image_id, owner]).fetchone() is None:
                raise NotFoundError("input_images", input_image_id)
            cur = db.execute(
                "INSERT INTO generations (owner, prompt_id, model_id, seed, height, width, guidance, noise_id, "
                "input_image_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [owner, prompt_id, model_id, seed, height, width, float(guidance), noise_id, input_image_id, utc_now()],
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def get_generation(self, generation_id: int) -> Generation:
        """The generation ``generation_id`` with its prompt text. :raises NotFoundError:"""
        row = self.query_one(_GENERATION_SELECT + " WHERE g.id = ?", [generation_id])
        if row is None:
            raise NotFoundError("generations", generation_id)
        return _generation(row)

    def list_generations(
        self, *, search: str | None = None, owner: str = DEFAULT_OWNER, limit: int = 100, offset: int = 0
    ) -> list[Generation]:
        """Newest first; ``search`` matches the prompt text literally (case-insensitive for ASCII)."""
        check_positive_int(limit, "limit", MAX_LIST)
        where, params = "g.owner = ?", [owner]
        if search:
            where += " AND p.prompt LIKE ? ESCAPE '\\'"
            params.append(like_pattern(search))
        rows = self.query(_GENERATION_SELECT + f" WHERE {where} ORDER BY g.id DESC LIMIT ? OFFSET ?", params + [limit, offset])
        return [_generation(r) for r in rows]

    # -- images -------------------------------------------------------------------------------

    def png_parameters(self, generation: Generation, *, solver: str, steps: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The A1111 ``parameters`` dict the store writes into an image of ``generation``."""
        params: dict[str, Any] = {
            "prompt": generation.prompt,
            "negative_prompt": generation.negative_prompt,
            "steps": steps,
            "sampler": solver,
            "cfg_scale": generation.guidance,
            "seed": generation.seed,
            "width": generation.width,
            "height": generation.height,
            "model": generation.model_id,
        }
        if generation.noise_id is not None:
            params["noise_hash"] = self.get_noise_record(generation.noise_id).sha256[:12]
        if generation.input_image_id is not None:  # an edit: the full hash of its stored input image
            params["Input image"] = self.get_input_image(generation.input_image_id, with_png=False).sha256
        params.update(extra or {})
        return params

    def add_preview(
        self,
        generation_id: int,
        *,
        solver: str,
        steps: int,
        image: Image.Image,
        timings_ms: Mapping[str, float],
        checkpoint_id: int | None = None,
        extra_params: Mapping[str, Any] | None = None,
    ) -> int:
        """Store a preview image (encoded to PNG with its parameters here) and return its id."""
        check_text(solver, "solver", max_len=200)
        check_positive_int(steps, "steps", MAX_STEPS)
        timings = check_timings(timings_ms)
        generation = self.get_generation(generation_id)
        extra = dict(extra_params or {})
        if checkpoint_id is not None:
            extra.setdefault("Solver checkpoint", str(checkpoint_id))
        png = encode_png(image, self.png_parameters(generation, solver=solver, steps=steps, extra=extra))
        with self.transaction() as db:
            if checkpoint_id is not None and db.execute("SELECT 1 FROM solver_checkpoints WHERE id = ?", [checkpoint_id]).fetchone() is None:
                raise NotFoundError("solver_checkpoints", checkpoint_id)
            cur = db.execute(
                "INSERT INTO previews (owner, generation_id, solver, steps, checkpoint_id, png, png_sha256, timings_ms, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [generation.owner, generation_id, solver, steps, checkpoint_id, png, _sha256(png),
                 dumps_json(timings, "timings_ms"), utc_now()],
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def _previews(self, where: str, params: list[Any], *, with_images: bool, tail: str = "") -> list[Preview]:
        png = "v.png" if with_images else "NULL AS png"
        sql = (
            "SELECT v.id AS v_id, v.owner AS v_owner, v.solver, v.steps, v.checkpoint_id, v.timings_ms, "
            f"v.png_sha256, v.created_at AS v_created_at, {png}, g.id, g.owner, g.prompt_id, p.prompt, "
            "p.negative_prompt, g.model_id, g.seed, g.height, g.width, g.guidance, g.noise_id, g.created_at, "
            "g.input_image_id "
            "FROM previews v JOIN generations g ON g.id = v.generation_id JOIN prompts p ON p.id = g.prompt_id "
            f"WHERE {where} {tail}"
        )
        out = []
        for r in self.query(sql, params):
            if with_images:
                verify_png("previews", {"id": r["v_id"], "png": r["png"], "png_sha256": r["png_sha256"]})
            out.append(Preview(
                id=r["v_id"], owner=r["v_owner"], generation=_generation(r), solver=r["solver"], steps=r["steps"],
                checkpoint_id=r["checkpoint_id"], timings_ms=json.loads(r["timings_ms"]), png_sha256=r["png_sha256"],
                created_at=r["v_created_at"], png=r["png"],
            ))
        return out

    def get_preview(self, preview_id: int, *, with_image: bool = True) -> Preview:
        """Preview ``preview_id`` (its PNG verified). :raises NotFoundError: :raises BlobIntegrityError:"""
        rows = self._previews("v.id = ?", [preview_id], with_images=with_image)
        if not rows:
            raise NotFoundError("previews", preview_id)
        return rows[0]

    def list_previews(
        self,
        *,
        search: str | None = None,
        generation_id: int | None = None,
        owner: str | None = DEFAULT_OWNER,
        limit: int = 100,
        offset: int = 0,
        with_images: bool = False,
    ) -> list[Preview]:
        """Newest first, optionally filtered by prompt text (literal, LIKE) or generation; ``owner=None``
        for every owner's."""
        check_positive_int(limit, "limit", MAX_LIST)
        where = "(? IS NULL OR v.owner = ?)"
        params: list[Any] = [owner, owner]
        if search:
            where += " AND p.prompt LIKE ? ESCAPE '\\'"
            params.append(like_pattern(search))
        if generation_id is not None:
            where += " AND v.generation_id = ?"
            params.append(generation_id)
        return self._previews(where, params + [limit, offset], with_images=with_images,
                              tail="ORDER BY v.id DESC LIMIT ? OFFSET ?")

    def list_final_ids(self, *, search: str | None = None, owner: str | None = DEFAULT_OWNER,
                       limit: int = 100) -> list[int]:
        """Ids of ``owner``'s finals (``None``: everyone's), newest first, optionally only those whose prompt
        contains ``search`` (literal, LIKE); no image is read."""
        check_positive_int(limit, "limit", MAX_LIST)
        rows = self.query(
            "SELECT f.id FROM finals f JOIN refine_jobs j ON j.id = f.job_id "
            "JOIN generations g ON g.id = j.generation_id JOIN prompts p ON p.id = g.prompt_id "
            "WHERE (? IS NULL OR f.owner = ?) AND p.prompt LIKE ? ESCAPE '\\' ORDER BY f.id DESC LIMIT ?",
            [owner, owner, like_pattern(search or ""), limit])
        return [r["id"] for r in rows]

    def get_final(self, final_id: int) -> Final:
        """Final image ``final_id`` (its PNG verified). :raises NotFoundError: :raises BlobIntegrityError:"""
        row = self.query_one("SELECT * FROM finals WHERE id = ?", [final_id])
        if row is None:
            raise NotFoundError("finals", final_id)
        return Final(id=row["id"], owner=row["owner"], job_id=row["job_id"], timings_ms=json.loads(row["timings_ms"]),
                     png_sha256=row["png_sha256"], created_at=row["created_at"], png=verify_png("finals", row))

    def get_final_for_job(self, job_id: int) -> Final | None:
        """The final image of refine job ``job_id``, or ``None`` if it has none yet."""
        row = self.query_one("SELECT id FROM finals WHERE job_id = ?", [job_id])
        return None if row is None else self.get_final(row["id"])

    def export_png(self, kind: Literal["preview", "final", "input"], row_id: int, path: str | Path) -> Path:
        """Write a preview's, final's or input image's verified PNG (metadata intact) to ``path`` atomically."""
        if kind == "preview":
            png = self.get_preview(row_id).png
        elif kind == "final":
            png = self.get_final(row_id).png
        elif kind == "input":
            png = self.get_input_image(row_id).png
        else:
            raise ValueError(f"kind must be 'preview', 'final' or 'input', got {kind!r}")
        assert png is not None
        path = Path(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(png)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # -- consistency --------------------------------------------------------------------------

    def add_consistency(
        self,
        preview_id: int,
        final_id: int,
        *,
        psnr: float | None,
        ssim: float | None,
        metrics: Mapping[str, Any] | None = None,
    ) -> int:
        """Record how close a preview came to a final; returns the row id (one row per pair)."""
        if psnr is not None and (isinstance(psnr, bool) or not isinstance(psnr, (int, float)) or math.isnan(psnr)):
            raise ValueError(f"psnr must be a number (inf allowed for identical images), got {psnr!r}")
        if ssim is not None:
            check_finite(ssim, "ssim")
        metrics_json = dumps_json(dict(metrics or {}), "metrics")
        with self.transaction() as db:
            for table, row_id in (("previews", preview_id), ("finals", final_id)):
                if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", [row_id]).fetchone() is None:
                    raise NotFoundError(table, row_id)
            cur = db.execute(
                "INSERT INTO consistency (preview_id, final_id, psnr, ssim, metrics, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (preview_id, final_id) DO UPDATE SET psnr = excluded.psnr, ssim = excluded.ssim, "
                "metrics = excluded.metrics, created_at = excluded.created_at RETURNING id",
                [preview_id, final_id, None if psnr is None else float(psnr), None if ssim is None else float(ssim),
                 metrics_json, utc_now()],
            )
            return int(cur.fetchone()[0])

    def list_consistency(self, *, preview_id: int | None = None, final_id: int | None = None) -> list[Consistency]:
        """Consistency rows, filtered by preview and/or final, oldest first."""
        where, params = ["1"], []
        if preview_id is not None:
            where.append("preview_id = ?")
            params.append(preview_id)
        if final_id is not None:
            where.append("final_id = ?")
            params.append(final_id)
        rows = self.query(f"SELECT * FROM consistency WHERE {' AND '.join(where)} ORDER BY id", params)
        return [Consistency(id=r["id"], preview_id=r["preview_id"], final_id=r["final_id"], psnr=r["psnr"],
                            ssim=r["ssim"], metrics=json.loads(r["metrics"]), created_at=r["created_at"]) for r in rows]
