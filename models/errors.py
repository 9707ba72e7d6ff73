"""Project errors for loading base models: one clear sentence for the user, the cause chained for debugging."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model name, path or checkpoint that cannot be loaded (unknown, not cached offline, corrupt, pickle)."""


class UnsupportedModelError(ModelLoadError):
    """A real checkpoint of an architecture this project has no backend for yet (SDXL, SD3, FLUX, ...)."""
