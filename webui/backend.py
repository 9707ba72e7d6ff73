"""The app's adapter to the engine and the store: fills :mod:`webui.views` records, writes export PNGs.

Every device-bound call goes through the engine's device worker(s) (``runtime.worker``): previews
run at preview priority, refine jobs one model step at a time at refine priority, so a preview
waits at most one refine step. Images are exported from the store's verified PNG bytes into the
export folder under names made here from row ids and hashes (``preview-12-<sha>.png``), so the
A1111 ``parameters`` chunk reaches the browser and the download untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from webui.inputs import ExploreSettings
from webui.views import HistoryItem, JobView, Tile

logger = logging.getLogger(__name__)

EXPORT_MAX_AGE_S = 7 * 86400


def _devices(spec: str | None) -> list[str]:
    import torch

    if spec:
        names = [d.strip() for d in spec.split(",") if d.strip()]
        if not names:
            raise ValueError("--device: give one or more torch devices, e.g. cuda:0,cuda:1")
        return names
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


class EngineBackend:
    """The :class:`webui.views.Backend` on the real engine (``preview``, ``refine``) and store."""

    def __init__(self, store: Any, executor: Any, exports: Path, *, chunk_size: int | None = None) -> None:
        from refine.jobs import RefineService
        from runtime.request import default_guidance

        self.store = store
        self.executor = executor
        self.exports = Path(exports)
        self.exports.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.model = executor.wait_ready()[0] if hasattr(executor, "workers") else executor.wait_ready()
        self.model_name = str(self.model.model_id)
        self.default_size = tuple(self.model.default_size)
        self.size_multiple = int(self.model.size_multiple)
        self.max_size = int(getattr(self.model, "max_size", 2048))
        self.takes_image = bool(getattr(self.model, "takes_image", False))  # an editing model (FLUX.1 Kontext)
        self.default_guidance = default_guidance(self.model)
        self.refine_service = RefineService(executor, store)
        self._engines: dict[str, Any] = {}
        self._views: dict[tuple, JobView] = {}  # by (id, state, step, restarts, updated_at): one query per poll
        self._lock = threading.Lock()

    @classmethod
    def open(cls, model: str | None = None, db: Path | None = None, exports: Path = Path("exports"),
             devices: str | None = None, forbid_under: list[Path] | None = None,
             chunk_size: int | None = None, options: Any = None, check: str = "quick") -> "EngineBackend":
        """Open the store (refusing a served folder), start one device worker per device, resume jobs."""
        # Import the engine (and through torchmetrics, transformers) on this thread BEFORE the worker
        # thread starts loading the model: two threads importing transformers' lazy modules at once
        # fail with "cannot import name 'AutoModel'".
        import preview.engine  # noqa: F401
        import refine.jobs  # noqa: F401
        from models.registry import load_model
        from runtime.worker import DeviceWorker, WorkerPool
        from store import open_store

        store = open_store(db, forbid_under=forbid_under or [exports], app_lock=True, check=check)
        names = _devices(devices)
        if len(names) == 1:
            executor: Any = DeviceWorker(factory=lambda: load_model(model, device=names[0], options=options),
                                         name=names[0])
        else:
            executor = WorkerPool.for_devices(names, lambda d: load_model(model, device=d, options=options))
        try:
            backend = cls(store, executor, exports, chunk_size=chunk_size)
        except BaseException:
            executor.close()
            store.close()
            raise
        backend.prune_exports()
        requeued = backend.refine_service.resume()
        if requeued:
            logger.info("re-queued refine jobs interrupted by the last shutdown: %s", requeued)
        return backend

    def close(self, timeout: float = 30.0) -> None:
        """Stop the device worker(s) after their current unit of work, then close the store.

        A refine job the worker was running is interrupted by the worker (``interrupted`` -> ``queued``,
        its step finished first); one still ``running`` after ``timeout`` (a worker stuck in a long unit) is
        marked the same way here, so a clean stop never counts as a crash at the next start.
        """
        self.executor.close(timeout)
        try:
            for job in self.store.list_jobs(states=["running"], owner=None, limit=10_000):
                state = self.store.interrupt_job(job.id, note="the app stopped while it ran")
                logger.info("refine job %d was still running at shutdown; it is %s", job.id, state)
        except Exception:  # noqa: BLE001 - the next start's recovery re-queues it anyway
            logger.warning("could not mark the running refine jobs interrupted at shutdown", exc_info=True)
        self.store.close()

    def prune_exports(self, max_age_s: float = EXPORT_MAX_AGE_S) -> int:
        """Delete export PNGs older than ``max_age_s`` (the store keeps the originals; they are re-exported
        on demand). Returns how many went."""
        cutoff = time.time() - max_age_s
        gone = 0
        for path in self.exports.glob("*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                pass
        return gone

    # --- Explore ------------------------------------------------------------------------------
    def solvers(self) -> list[str]:
        from solver.registry import CONSISTENCY, solver_names

        # the tuned baselines (tuned:best, tuned:FAMILY) when the committed tuned file was tuned for this model
        return [CONSISTENCY, *(n for n in solver_names(self.model_name) if n != CONSISTENCY)]

    def default_solver(self) -> str:
        from solver.registry import CONSISTENCY

        return CONSISTENCY

    def _engine(self, owner: str) -> Any:
        from preview.engine import PreviewEngine

        with self._lock:
            if owner not in self._engines:
                self._engines[owner] = PreviewEngine(self.executor, self.store, chunk_size=self.chunk_size, owner=owner)
            return self._engines[owner]

    def preview(self, settings: ExploreSettings, owner: str) -> Iterator[list[Tile]]:
        """Previews of the grid, one list per finished chunk (validated before anything is written).

        Fairness between sessions: the grid is cut into sub-grids of whole prompts worth about one
        device chunk, and a sub-grid is submitted only when the previous one is back, so the device
        worker's FIFO interleaves concurrent sessions chunk by chunk instead of finishing one user's
        whole grid first. Previews are batch-independent (the engine pads every chunk to a fixed
        size), so the cut changes no pixel.
        """
        from dataclasses import replace

        from runtime.request import PreviewRequest

        engine = self._engine(owner)
        request = engine.validate(PreviewRequest(
            prompts=settings.prompts, seeds=settings.seeds, steps=settings.steps, solver=settings.solver,
            guidance=settings.guidance, height=settings.height, width=settings.width,
            negative_prompt=settings.negative_prompt, image=settings.image,
            keep_image_size=settings.keep_image_size))  # one ValueError naming the field, nothing written
        prompts = list(request.prompts)
        per = max(1, engine.chunk_size_for(request.height, request.width) // len(request.seeds))
        first = engine.run(replace(request, prompts=prompts[:per]))  # solver resolved before returning

        def stream() -> Iterator[list[Tile]]:
            yield from self._tiles_by_chunk(first)
            for i in range(per, len(prompts), per):
                yield from self._tiles_by_chunk(engine.run(replace(request, prompts=prompts[i:i + per])))

        return stream()

    def _tiles_by_chunk(self, results: Iterator[Any]) -> Iterator[list[Tile]]:
        group: list[Tile] = []
        chunk = None
        for r in results:
            if chunk is not None and r.chunk_index != chunk and group:
                yield group
                group = []
            chunk = r.chunk_index
            group.append(Tile(r.preview_id, r.prompt, r.seed, self.export("preview", r.preview_id)))
        if group:
            yield group

    def export(self, kind: str, row_id: int, sha: str | None = None) -> Path:
        """The stored PNG as a file in the export folder (named by id and hash, so never stale)."""
        if sha is None and kind == "preview":
            sha = self.store.get_preview(row_id, with_image=False).png_sha256
        elif sha is None:
            sha = self.store.get_final(row_id).png_sha256
        path = self.exports / f"{kind}-{row_id}-{sha[:16]}.png"
        if not path.exists():
            self.store.export_png(kind, row_id, path)
        return path

    def export_input(self, input_image_id: int) -> Path:
        """An edit's stored input image as a PNG in the export folder (named by id and hash, written once)."""
        image = self.store.get_input_image(input_image_id, with_png=False)
        path = self.exports / f"input-{image.id}-{image.sha256[:16]}.png"
        if not path.exists():
            self.store.export_png("input", image.id, path)  # verified against its hash, written atomically
        return path

    def refine(self, preview_ids: list[int], steps: int, owner: str | None) -> list[int]:
        """Queue a refine per preview, after checking every id exists and belongs to ``owner`` (``None``: an
        admin, who may refine anyone's; the job belongs to the preview's owner)."""
        from refine.full_step import check_full_steps
        from store.errors import NotFoundError

        check_full_steps(steps, "Refine steps")
        for pid in preview_ids:
            try:
                preview = self.store.get_preview(pid, with_image=False)
            except NotFoundError:
                raise ValueError(f"Selection: preview {pid} no longer exists") from None
            if owner is not None and preview.owner != owner:
                raise ValueError(f"Selection: preview {pid} is not yours")
            if preview.generation.model_id != self.model_name:
                raise ValueError(f"Selection: preview {pid} was made with {preview.generation.model_id}, "
                                 f"not with the model this app runs ({self.model_name})")
        return [self.refine_service.refine_preview(pid, steps) for pid in preview_ids]

    # --- Refine -------------------------------------------------------------------------------
    def jobs(self, owner: str | None, limit: int = 50) -> list[JobView]:
        """The newest jobs; a job whose row did not change since the last poll costs no further query."""
        views = []
        for key in self.store.newest_job_stamps(owner=owner, limit=limit):
            view = self._views.get(key)
            if view is None:
                view = self._job_view(key.id)
                if view.state != "done" or view.consistency or view.preview_id == 0:  # else: metrics still coming
                    with self._lock:
                        if len(self._views) > 10_000:
                            self._views.clear()
                        self._views[key] = view
            views.append(view)
        return views

    def _job_view(self, job_id: int) -> JobView:
        p = self.refine_service.progress(job_id)
        job = self.store.get_job(job_id)
        gen = self.store.get_generation(job.generation_id)
        preview_path = final_path = None
        consistency: dict[str, float | None] = {}
        if p.state == "done" and p.final_id is not None:
            final_path = self.export("final", p.final_id)
            if job.preview_id is not None:
                preview_path = self.export("preview", job.preview_id)
                rows = self.store.list_consistency(preview_id=job.preview_id, final_id=p.final_id)
                if rows:
                    c = rows[-1]
                    consistency = {"psnr": c.psnr, "ssim": c.ssim,
                                   **{k: v for k, v in c.metrics.items() if isinstance(v, (int, float))}}
        view = JobView(job_id=job_id, state=p.state, step=p.step, total=p.steps, eta_s=p.eta_s, prompt=gen.prompt,
                       seed=gen.seed, preview_id=job.preview_id or 0, preview_path=preview_path,
                       final_path=final_path, consistency=consistency, error=p.error)
        return view

    def cancel(self, job_id: int, owner: str | None) -> str:
        from store.errors import JobStateError, NotFoundError

        try:
            job = self.store.get_job(job_id)
        except NotFoundError:
            raise ValueError(f"Job id: there is no job #{job_id}") from None
        if owner is not None and job.owner != owner:
            raise ValueError(f"Job id: job #{job_id} is not yours")
        try:
            return self.refine_service.cancel(job_id)
        except JobStateError as exc:
            raise ValueError(f"Job id: {exc}") from None

    # --- History ------------------------------------------------------------------------------
    def history(self, query: str, owner: str | None, limit: int = 48) -> list[HistoryItem]:
        """Finals first, then previews, newest first, whose prompt contains ``query``."""
        finals = self.store.list_final_ids(search=query or None, owner=owner, limit=limit)
        items = [self.history_item(f"final:{fid}", owner) for fid in finals]
        previews = self.store.list_previews(search=query or None, owner=owner, limit=max(1, limit - len(items)))
        items += [self._preview_item(p) for p in previews]
        return items[:limit]

    def _input_path(self, gen: Any) -> Path | None:
        input_image_id = getattr(gen, "input_image_id", None)
        return None if input_image_id is None else self.export_input(input_image_id)

    def _settings(self, gen: Any, solver: str, steps: int, refine_steps: int = 40) -> ExploreSettings:
        input_path = self._input_path(gen)
        return ExploreSettings(prompts=[gen.prompt], negative_prompt=gen.negative_prompt, seeds=[gen.seed],
                               steps=steps, solver=solver, guidance=gen.guidance, width=gen.width,
                               height=gen.height, refine_steps=refine_steps,
                               image=None if input_path is None else str(input_path))

    def _preview_item(self, p: Any) -> HistoryItem:
        settings = self._settings(p.generation, p.solver, p.steps)
        return HistoryItem("preview", p.id, settings, self.export("preview", p.id, p.png_sha256), p.created_at,
                           input_path=None if settings.image is None else Path(settings.image))

    def history_item(self, ref: str, owner: str | None) -> HistoryItem:
        """``preview:ID`` or ``final:ID`` of ``owner``; ValueError when missing or someone else's."""
        from store.errors import NotFoundError

        kind, _, number = ref.partition(":")
        row_id = int(number)
        try:
            if kind == "preview":
                p = self.store.get_preview(row_id, with_image=False)
                if owner is not None and p.owner != owner:
                    raise NotFoundError("previews", row_id)
                return self._preview_item(p)
            final = self.store.get_final(row_id)
            if owner is not None and final.owner != owner:
                raise NotFoundError("finals", row_id)
            job = self.store.get_job(final.job_id)
            gen = self.store.get_generation(job.generation_id)
            if job.preview_id is not None:
                p = self.store.get_preview(job.preview_id, with_image=False)
                settings = self._settings(gen, p.solver, p.steps, job.steps)
            else:
                settings = self._settings(gen, self.default_solver(), 4, job.steps)
            return HistoryItem("final", row_id, settings, self.export("final", row_id, final.png_sha256),
                               final.created_at, input_path=None if settings.image is None else Path(settings.image))
        except NotFoundError:
            raise ValueError(f"there is no {kind} #{row_id}") from None

    # --- Admin --------------------------------------------------------------------------------
    def reload_solver(self) -> None:
        """Nothing to do: ``consistency`` resolves the active checkpoint from the store on every run."""

    def reward_frame(self) -> pd.DataFrame:
        """Mean reward per update of the newest training run (for the live plot)."""
        runs = self.store.list_training_runs()
        if not runs:
            return pd.DataFrame({"update": [], "reward": []})
        rows = self.store.training_metrics(runs[0].id)
        key = next((k for k in ("reward_mean", "reward", "mean_reward") if rows and k in rows[-1].metrics), None)
        nan = float("nan")
        return pd.DataFrame({"update": [m.update_index for m in rows],
                             "reward": [float(m.metrics.get(key, nan)) if key else nan for m in rows]})

    def _identity(self) -> Any:
        from preview.identity import model_identity

        if getattr(self, "_model_identity", None) is None:
            self._model_identity = model_identity(self.model)
        return self._model_identity

    def solver_status(self) -> str:
        """What ``consistency`` runs for the loaded model, in words (e.g. "not yet trained for this model")."""
        from preview.solvers import resolve_policy

        try:
            return resolve_policy(self.store, self.model)[1]
        except ValueError as exc:
            return f"ConsistencySolver cannot run for this model: {exc}"

    def checkpoints_table(self) -> pd.DataFrame:
        """Every checkpoint with the model it was trained on, what is in force for the loaded model, and
        the shipped default (the embedded model's)."""
        from preview.identity import read_identity, short_name
        from preview.solvers import display_path, shipped_checkpoint_dir

        ident = self._identity()
        mine = self.store.get_assignment(ident.key, ident.legacy_key)
        rows = []
        for c in self.store.list_checkpoints():
            numbers = {k: v for k, v in c.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            own = c.model_key in (ident.key, ident.legacy_key)
            here = ""
            if mine is not None and mine.checkpoint.id == c.id:
                here = "✔ transferred here" if mine.transferred else "✔"
            rows.append({"id": c.id, "this model": here, "active": "✔" if c.active else "", "name": c.name,
                         "model": "this model" if own else short_name(c.model_id or "unknown"),
                         "family": c.model_family or "", "run": c.training_run_id, "created": c.created_at[:19],
                         **numbers})
        shipped = shipped_checkpoint_dir()
        if shipped is not None:
            recorded = read_identity(shipped)
            rows.append({"id": "shipped", "this model": "✔" if mine is None and shipped_checkpoint_dir(ident) else "",
                         "name": display_path(shipped), "model": short_name(recorded) if recorded else "embedded",
                         "family": recorded.family if recorded else ""})
        return pd.DataFrame(rows or [{"id": "", "name": "no checkpoints yet"}])

    def datasets(self) -> list[tuple[str, int]]:
        """(label, id) of the offline datasets in the store, newest first."""
        rows = sorted(self.store.list_datasets(), key=lambda d: d.id, reverse=True)
        return [(f"#{d.id} {d.name} ({len(d.shard_paths)} shards, {d.model_id})", d.id) for d in rows]

    def dataset_folder(self, dataset_id: int) -> Path:
        """The folder of dataset ``dataset_id`` as the store recorded it (never a path typed by a user)."""
        from store.errors import NotFoundError

        try:
            d = self.store.get_dataset(dataset_id)
        except NotFoundError:
            raise ValueError(f"Dataset: there is no dataset #{dataset_id}") from None
        if not d.shard_paths:
            raise ValueError(f"Dataset: #{dataset_id} has no shards yet")
        return Path(d.shard_paths[0]).parent

    def activate_checkpoint(self, checkpoint_id: int) -> str:
        """Make a checkpoint trained on the loaded model the one ``consistency`` runs for it."""
        from preview.identity import short_name
        from store.errors import NotFoundError

        ident = self._identity()
        try:
            ckpt = self.store.get_checkpoint(checkpoint_id)
        except NotFoundError:
            raise ValueError(f"Checkpoint id: there is no checkpoint #{checkpoint_id}") from None
        if ckpt.model_key not in (ident.key, ident.legacy_key):
            raise ValueError(f"Checkpoint id: #{checkpoint_id} was trained for {short_name(ckpt.model_id or 'an unknown model')}, "
                             f"not {short_name(ident)}; use “Use for this model too” to transfer it")
        self.store.set_active_checkpoint(checkpoint_id)
        return ckpt.name

    def assign_checkpoint(self, checkpoint_id: int) -> str:
        """“Use for this model too”: record that the loaded model runs checkpoint ``checkpoint_id``
        (labelled "transferred from A" when trained on another model); refused across schedule families."""
        from preview.identity import short_name
        from store.errors import NotFoundError

        ident = self._identity()
        try:
            ckpt = self.store.get_checkpoint(checkpoint_id)
            transferred = self.store.assign_checkpoint(checkpoint_id, ident.key, family=ident.family)
        except NotFoundError:
            raise ValueError(f"Checkpoint id: there is no checkpoint #{checkpoint_id}") from None
        except ValueError as exc:
            raise ValueError(f"Checkpoint id: {str(exc).removeprefix('checkpoint_id: ')}") from None
        return f"{ckpt.name}, transferred from {short_name(ckpt.model_id or '?')}" if transferred else ckpt.name
