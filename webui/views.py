"""What the app shows, as plain records: the interface between the UI and the engine adapter.

The UI (``app.py``, ``webui/handlers.py``) only ever sees these records and the :class:`Backend`
protocol; ``webui/backend.py`` fills them from the store and the engine. Paths in these records are
PNG files that the backend wrote into the app's export folder under names it chose itself
(``preview-<id>.png``), never a path a user typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from webui.inputs import ExploreSettings


@dataclass(frozen=True)
class Tile:
    """One finished preview in the Explore grid."""

    preview_id: int
    prompt: str
    seed: int
    path: Path


@dataclass(frozen=True)
class JobView:
    """One refine job as the Refine tab shows it."""

    job_id: int
    state: str  # queued | running | done | failed | cancelled | interrupted
    step: int
    total: int
    eta_s: float | None
    prompt: str
    seed: int
    preview_id: int
    preview_path: Path | None = None
    final_path: Path | None = None
    consistency: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class HistoryItem:
    """One stored image (a preview or a final) with every setting needed to make it again."""

    kind: str  # "preview" | "final"
    image_id: int
    settings: ExploreSettings  # prompts has one entry, seeds one entry; an edit's image is input_path
    path: Path
    created: str = ""
    input_path: Path | None = None  # an edit's input image, exported beside the image (None: text-to-image)

    @property
    def is_edit(self) -> bool:
        return self.input_path is not None

    @property
    def ref(self) -> str:
        """The stable handle the UI passes back, e.g. ``final:12``."""
        return f"{self.kind}:{self.image_id}"


class Backend(Protocol):
    """What the app needs from the engine and the store (see ``webui.backend.EngineBackend``)."""

    model_name: str
    default_size: tuple[int, int]  # (height, width)
    default_guidance: float
    size_multiple: int
    max_size: int
    takes_image: bool  # an editing model: Explore takes an input image, the lines are instructions

    def solvers(self) -> list[str]: ...
    def default_solver(self) -> str: ...
    def preview(self, settings: ExploreSettings, owner: str) -> Iterator[list[Tile]]: ...
    def refine(self, preview_ids: list[int], steps: int, owner: str) -> list[int]: ...
    def jobs(self, owner: str, limit: int = 50) -> list[JobView]: ...
    def cancel(self, job_id: int, owner: str) -> str: ...
    def history(self, query: str, owner: str, limit: int = 48) -> list[HistoryItem]: ...
    def history_item(self, ref: str, owner: str) -> HistoryItem: ...
    def reload_solver(self) -> None: ...
    # Admin tab
    def reward_frame(self) -> Any: ...  # pandas DataFrame (update, reward)
    def checkpoints_table(self) -> Any: ...  # pandas DataFrame
    def datasets(self) -> list[tuple[str, int]]: ...
    def dataset_folder(self, dataset_id: int) -> Path: ...
    def activate_checkpoint(self, checkpoint_id: int) -> str: ...
    def assign_checkpoint(self, checkpoint_id: int) -> str: ...  # "use for this model too"
    def solver_status(self) -> str: ...  # what `consistency` runs for the loaded model, in words
    def close(self, timeout: float = 30.0) -> None: ...
