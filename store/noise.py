"""Initial noise: generated from the seed alone, stored once, verified on every load.

Noise is generation-independent: one row per key ``(seed, shape, dtype, device='cpu')``. It is
drawn with one ``torch.Generator("cpu").manual_seed(seed)`` per seed in float32 and then cast, so
it never depends on batch size, batch order, the GPU, or the dtype's own RNG path. The row keeps
the tensor as safetensors bytes plus its shape, dtype and the sha256 of the tensor's raw
(little-endian, C-contiguous) bytes. Every load checks all three; a mismatch raises
:class:`~store.errors.NoiseIntegrityError` naming the row: stored noise is never silently
regenerated, because a newer torch may draw different numbers for the same seed and the stored
tensor is what keeps an old preview refinable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from store.connection import StoreBase, utc_now
from store.errors import NoiseIntegrityError, NotFoundError

SEED_MAX = 2**32 - 1
MAX_NOISE_ELEMENTS = 2**26
NOISE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_TENSOR_KEY = "noise"


def check_seed(seed: Any) -> int:
    """Return ``seed`` if it is an int in [0, 2**32 - 1]; otherwise a ValueError naming ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, {SEED_MAX}], got {seed!r}")
    return seed


def check_shape(shape: Any) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of positive ints (at most 2**26 elements), else a ValueError."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
    ):
        raise ValueError(f"shape must be a non-empty tuple of positive integers, got {shape!r}")
    if torch.Size(shape).numel() > MAX_NOISE_ELEMENTS:
        raise ValueError(f"shape {tuple(shape)} has more than {MAX_NOISE_ELEMENTS} elements")
    return tuple(shape)


def dtype_name(dtype: Any) -> str:
    """The store's name for a supported torch dtype; a ValueError naming ``dtype`` otherwise."""
    for name, value in NOISE_DTYPES.items():
        if dtype == value:
            return name
    raise ValueError(f"dtype must be one of {', '.join(NOISE_DTYPES)} (torch dtypes), got {dtype!r}")


def make_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw the noise for one seed: ``randn(shape)`` from a fresh CPU generator, float32, then cast.

    Pure function of ``(seed, shape, dtype)``; stack per-seed results to build a batch.
    """
    check_seed(seed)
    shape = check_shape(shape)
    dtype_name(dtype)
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a CPU tensor's raw C-contiguous bytes (independent of the container format)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class NoiseRecord:
    """A noise row without its tensor."""

    id: int
    seed: int
    shape: tuple[int, ...]
    dtype: str
    device: str
    sha256: str
    created_at: str


def _shape_text(shape: tuple[int, ...]) -> str:
    return json.dumps(list(shape))


def _load_verified(row: dict[str, Any]) -> torch.Tensor:
    """Deserialize a noise row and check hash, shape and dtype against its columns."""
    row_id = row["id"]
    try:
        tensor = safetensors.torch.load(row["data"])[_TENSOR_KEY]
    except Exception as exc:  # a damaged header or truncated bytes
        raise NoiseIntegrityError(row_id, f"its safetensors bytes do not parse: {exc}") from None
    if list(tensor.shape) != json.loads(row["shape"]) or dtype_name(tensor.dtype) != row["dtype"]:
        raise NoiseIntegrityError(
            row_id, f"stored tensor is {tuple(tensor.shape)} {tensor.dtype}, row says {row['shape']} {row['dtype']}"
        )
    digest = tensor_sha256(tensor)
    if digest != row["sha256"]:
        raise NoiseIntegrityError(row_id, f"sha256 {digest[:12]}... does not match the stored {row['sha256'][:12]}...")
    return tensor


class NoiseStore(StoreBase):
    """Noise rows: create once from the seed, then always load and verify."""

    def get_or_create_noise(
        self, seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> tuple[int, torch.Tensor]:
        """Return ``(noise_id, tensor)`` for ``(seed, shape, dtype)``, creating the row on first use.

        An existing row is loaded and verified (never regenerated). Safe under concurrent callers:
        whoever inserts first wins and everyone gets that row.

        :raises ValueError: bad ``seed`` / ``shape`` / ``dtype``.
        :raises NoiseIntegrityError: the stored row fails its checks.
        """
        seed = check_seed(seed)
        shape = check_shape(shape)
        name = dtype_name(dtype)
        key = [seed, _shape_text(shape), name]
        select = "SELECT * FROM noise WHERE seed = ? AND shape = ? AND dtype = ? AND device = 'cpu'"
        row = self.query_one(select, key)
        if row is not None:
            return row["id"], _load_verified(row)
        tensor = make_noise(seed, shape, dtype)
        blob = safetensors.torch.save(
            {_TENSOR_KEY: tensor},
            metadata={"seed": str(seed), "generator": "torch.Generator('cpu').manual_seed(seed); randn float32"},
        )
        digest = tensor_sha256(tensor)
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO noise (seed, shape, dtype, device, data, sha256, created_at) "
                "VALUES (?, ?, ?, 'cpu', ?, ?, ?) ON CONFLICT (seed, shape, dtype, device) DO NOTHING",
                key + [blob, digest, utc_now()],
            )
            inserted = cur.rowcount == 1
            new_id = cur.lastrowid
        if inserted:
            return int(new_id), tensor  # type: ignore[arg-type]
        row = self.query_one(select, key)  # another process won the race; load theirs
        assert row is not None
        return row["id"], _load_verified(row)

    def get_noise(self, noise_id: int) -> torch.Tensor:
        """Load noise row ``noise_id``, verified.

        :raises NotFoundError: unknown id. :raises NoiseIntegrityError: failed checks.
        """
        row = self.query_one("SELECT * FROM noise WHERE id = ?", [noise_id])
        if row is None:
            raise NotFoundError("noise", noise_id)
        return _load_verified(row)

    def get_noise_record(self, noise_id: int) -> NoiseRecord:
        """Metadata of noise row ``noise_id`` (no tensor, no verification)."""
        row = self.query_one(
            "SELECT id, seed, shape, dtype, device, sha256, created_at FROM noise WHERE id = ?", [noise_id]
        )
        if row is None:
            raise NotFoundError("noise", noise_id)
        return NoiseRecord(
            id=row["id"], seed=row["seed"], shape=tuple(json.loads(row["shape"])), dtype=row["dtype"],
            device=row["device"], sha256=row["sha256"], created_at=row["created_at"],
        )
