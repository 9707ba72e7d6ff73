"""The identity of a base model, as a learned solver checkpoint records it (design contract 7).

A ConsistencySolver policy is fitted to one model's trajectories, so a checkpoint carries:

- ``model_id``: what the user loaded (``embedded``, a hub id, a path);
- ``schedule_sha256``: sha256 of the model's scheduler config (canonical JSON, ``_``-keys dropped,
  the prediction type included), so the same weights under another schedule are another model;
- ``content_sha256``: for local files, sha256 over the denoiser weight files (UNet / transformer
  safetensors, or the single checkpoint file), so two folders holding the same weights match;
- ``family``: ``<schedule kind>/<prediction type>`` (``vp/epsilon``, ``vp/v_prediction``,
  ``flow/flow_prediction``). A policy may be *transferred* (explicitly) only within one family.

``key`` is what matching uses: ``embedded`` for the embedded model (a fixed identity), else
``sha256:<content>|<schedule>`` for local files and ``hub:<id>|<schedule>`` for hub ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from solver.schedules import schedule_from_config

EMBEDDED_ID = "embedded"
IDENTITY_NAME = "model_identity.json"  # written beside a policy folder's weights
_WEIGHT_DIRS = ("unet", "transformer")
_CONTENT_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    schedule_sha256: str
    family: str
    content_sha256: str | None = None

    @property
    def key(self) -> str:
        if self.model_id == EMBEDDED_ID:
            return EMBEDDED_ID
        head = f"sha256:{self.content_sha256[:16]}" if self.content_sha256 else f"hub:{self.model_id}"
        return f"{head}|{self.schedule_sha256[:16]}"

    @property
    def legacy_key(self) -> str:
        """The key a checkpoint migrated from an older store carries (it knew only the model id)."""
        return legacy_key(self.model_id)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), key=self.key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model identity") -> ModelIdentity:
        try:
            return cls(model_id=str(data["model_id"]), schedule_sha256=str(data["schedule_sha256"]),
                       family=str(data["family"]), content_sha256=data.get("content_sha256"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: missing field {exc}") from None


def legacy_key(model_id: str) -> str:
    return EMBEDDED_ID if model_id == EMBEDDED_ID else f"legacy:{model_id}"


def schedule_family(scheduler_config: Mapping[str, Any]) -> str:
    """``<kind>/<prediction type>`` of a scheduler config."""
    schedule = schedule_from_config(scheduler_config)
    return f"{schedule.kind}/{schedule.prediction_type}"


def schedule_sha256(scheduler_config: Mapping[str, Any]) -> str:
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config["prediction_type"] = config.get("prediction_type", "epsilon")
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _CONTENT_CACHE.get(cache_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _CONTENT_CACHE[cache_key] = h.hexdigest()
    return digest


def content_sha256(path: str | os.PathLike) -> str | None:
    """sha256 over the denoiser weights of a local model (folder or single file); None if none found."""
    p = Path(path).expanduser()
    if p.is_file():
        return _file_sha256(p)
    if not p.is_dir():
        return None
    files = sorted(f for d in _WEIGHT_DIRS if (p / d).is_dir() for f in (p / d).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:  # relative names too, so unet/ and transformer/ weights never collide
        h.update(f"{f.parent.name}/{f.name}:{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def model_identity(model: Any) -> ModelIdentity:
    """The identity of a loaded :class:`models.base.Denoiser` (anything with ``model_id`` and
    ``scheduler_config``)."""
    model_id = str(model.model_id)
    config = model.scheduler_config
    content = None if model_id == EMBEDDED_ID else content_sha256(model_id) if _is_local(model_id) else None
    return ModelIdentity(model_id=model_id, schedule_sha256=schedule_sha256(config),
                         family=schedule_family(config), content_sha256=content)


def _is_local(model_id: str) -> bool:
    try:
        return Path(model_id).expanduser().exists()
    except OSError:
        return False


def read_identity(directory: str | os.PathLike) -> ModelIdentity | None:
    """The identity recorded in a policy folder, or None (a folder saved before identities existed)."""
    path = Path(directory) / IDENTITY_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable model identity ({exc})") from None
    return ModelIdentity.from_dict(data, str(path))


def write_identity(directory: str | os.PathLike, identity: ModelIdentity) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / IDENTITY_NAME).write_text(json.dumps(identity.to_dict(), indent=1, sort_keys=True))


def short_name(identity_or_id: ModelIdentity | str) -> str:
    """A model id as a user reads it (the folder name of a local path)."""
    model_id = identity_or_id.model_id if isinstance(identity_or_id, ModelIdentity) else str(identity_or_id)
    if model_id.startswith(("/", ".", "~")):
        return Path(model_id).name or model_id
    return model_id
