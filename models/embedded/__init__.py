"""The embedded default model: procedural scenes, training, weights, denoiser and scene analyzer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from models.embedded.model import EmbeddedDenoiser


def is_embedded(model: object) -> bool:
    """Whether ``model`` (a denoiser, or a model id string) is the embedded model or one of its variants,
    whose scenes the scene analyzer reads."""
    model_id = model if isinstance(model, str) else getattr(model, "model_id", "")
    return str(model_id).startswith("embedded")


def load_embedded(device=None) -> "EmbeddedDenoiser":
    """The shipped embedded model (no network). See :func:`models.embedded.model.load_embedded`."""
    from models.embedded.model import load_embedded as _load

    return _load(device=device)


__all__ = ["is_embedded", "load_embedded"]
