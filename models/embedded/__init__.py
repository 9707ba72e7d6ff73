"""The embedded default model: procedural scenes, training, weights, denoiser and scene analyzer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from models.embedded.model import EmbeddedDenoiser


def load_embedded(device=None) -> "EmbeddedDenoiser":
    """The shipped embedded model (no network). See :func:`models.embedded.model.load_embedded`."""
    from models.embedded.model import load_embedded as _load

    return _load(device=device)


__all__ = ["load_embedded"]
