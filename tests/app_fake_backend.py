"""A stand-in for ``webui.backend.EngineBackend`` with the same :class:`webui.views.Backend` surface.

It lets the UI tests check wiring, streaming, selection mapping and bad-input handling in
milliseconds, without a model. Images are flat colours derived from (prompt, seed) written as PNG
with an A1111 ``parameters`` chunk; refine jobs advance one "step" per ``step_s`` on a thread.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Iterator

from PIL import Image

from store.png import encode_png
from webui.inputs import ExploreSettings
from webui.views import HistoryItem, JobView, Tile


class FakeBackend:
    model_name = "fake"
    default_size = (32, 32)
    default_guidance = 3.0
    size_multiple = 8
    max_size = 256
    takes_image = False  # a text-to-image model: an input image is refused as the engine refuses it

    def __init__(self, exports: Path, chunk: int = 4, step_s: float = 0.02) -> None:
        self.exports = exports
        self.chunk = chunk
        self.step_s = step_s
        self.chunk_s = 0.0  # delay before each chunk (to observe streaming)
        self.lock = threading.Lock()
        self.previews: dict[int, tuple[ExploreSettings, str, int]] = {}
        self.jobs_: dict[int, dict] = {}
        self.calls: list[str] = []
        self.owners: dict[int, str] = {}  # preview id -> owner (jobs carry their preview's owner)

    def solvers(self) -> list[str]:
        return ["consistency", "ddim", "unipc"]

    def default_solver(self) -> str:
        return "consistency"

    def _png(self, name: str, prompt: str, seed: int, s: ExploreSettings, shade: int = 0) -> Path:
        rgb = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()[:3]
        width, height = s.width or 32, s.height or 32  # an edit without a size: the fake picks 32x32
        img = Image.new("RGB", (width, height), tuple((c + shade) % 256 for c in rgb))
        params = dict(prompt=prompt, negative_prompt=s.negative_prompt, steps=s.steps, sampler=s.solver,
                      cfg_scale=s.guidance, seed=seed, width=width, height=height, model=self.model_name)
        path = self.exports / name
        path.write_bytes(encode_png(img, params))
        return path

    def preview(self, settings: ExploreSettings, owner: str) -> Iterator[list[Tile]]:
        if settings.image is not None and not self.takes_image:
            raise ValueError(f"image: {self.model_name} is a text-to-image model and takes no input image")
        if settings.image is None and self.takes_image:
            raise ValueError(f"image: {self.model_name} is an editing model; give an input image to edit")
        self.calls.append("preview")
        pairs = [(p, s) for p in settings.prompts for s in settings.seeds]
        for i in range(0, len(pairs), self.chunk):
            time.sleep(self.chunk_s)
            out = []
            for prompt, seed in pairs[i:i + self.chunk]:
                with self.lock:
                    pid = len(self.previews) + 1
                    self.previews[pid] = (settings, prompt, seed)
                    self.owners[pid] = owner
                out.append(Tile(pid, prompt, seed, self._png(f"preview-{pid}.png", prompt, seed, settings)))
            yield out

    def _mine(self, pid: int, owner: str | None) -> bool:
        """Whether ``owner`` may see preview ``pid`` (``None``: an admin, who sees every user's)."""
        return owner is None or self.owners.get(pid, owner) == owner

    def refine(self, preview_ids: list[int], steps: int, owner: str | None) -> list[int]:
        self.calls.append("refine")
        for pid in preview_ids:
            if pid not in self.previews:
                raise ValueError(f"preview {pid} does not exist")
            if not self._mine(pid, owner):
                raise ValueError(f"Selection: preview {pid} is not yours")
        ids = []
        for pid in preview_ids:
            with self.lock:
                jid = len(self.jobs_) + 1
                self.jobs_[jid] = dict(preview_id=pid, state="queued", step=0, total=steps)
            ids.append(jid)
            threading.Thread(target=self._run, args=(jid,), daemon=True).start()
        return ids

    def _run(self, jid: int) -> None:
        job = self.jobs_[jid]
        job["state"] = "running"
        while job["step"] < job["total"]:
            if job["state"] == "cancelled":
                return
            time.sleep(self.step_s)
            job["step"] += 1
        settings, prompt, seed = self.previews[job["preview_id"]]
        self._png(f"final-{jid}.png", prompt, seed, settings, shade=10)
        job["state"] = "done"

    def jobs(self, owner: str, limit: int = 50) -> list[JobView]:
        out = []
        mine = [(jid, j) for jid, j in sorted(self.jobs_.items(), reverse=True)
                if self._mine(j["preview_id"], owner)]
        for jid, j in mine[:limit]:
            settings, prompt, seed = self.previews[j["preview_id"]]
            done = j["state"] == "done"
            out.append(JobView(jid, j["state"], j["step"], j["total"], 1.0, prompt, seed, j["preview_id"],
                               self.exports / f"preview-{j['preview_id']}.png",
                               self.exports / f"final-{jid}.png" if done else None,
                               {"psnr": 30.0, "ssim": 0.9} if done else {}))
        return out

    def cancel(self, job_id: int, owner: str) -> str:
        if job_id not in self.jobs_:
            raise ValueError(f"Job id: no job #{job_id}")
        if not self._mine(self.jobs_[job_id]["preview_id"], owner):
            raise ValueError(f"Job id: job #{job_id} is not yours")
        self.jobs_[job_id]["state"] = "cancelled"
        return "cancelled"

    def history(self, query: str, owner: str, limit: int = 48) -> list[HistoryItem]:
        items = []
        for jid, j in sorted(self.jobs_.items(), reverse=True):
            if j["state"] == "done" and self._mine(j["preview_id"], owner):
                items.append(self.history_item(f"final:{jid}", owner))
        for pid in sorted(self.previews, reverse=True):
            if not self._mine(pid, owner):
                continue
            items.append(self.history_item(f"preview:{pid}", owner))
        return [it for it in items if query.lower() in it.settings.prompts[0].lower()][:limit]

    def history_item(self, ref: str, owner: str) -> HistoryItem:
        kind, _, n = ref.partition(":")
        n = int(n)
        pid = self.jobs_[n]["preview_id"] if kind == "final" else n
        if pid not in self.previews:
            raise ValueError(f"no {kind} #{n}")
        settings, prompt, seed = self.previews[pid]
        one = ExploreSettings(**{**settings.as_dict(), "prompts": [prompt], "seeds": [seed]})
        return HistoryItem(kind, n, one, self.exports / f"{kind}-{n}.png")

    def reload_solver(self) -> None:
        pass

    def reward_frame(self):
        import pandas as pd

        return pd.DataFrame({"update": [0, 1], "reward": [0.1, 0.2]})

    def checkpoints_table(self):
        import pandas as pd

        return pd.DataFrame([{"id": 1, "active": "", "name": "fake"}])

    def datasets(self):
        return [("#1 fake", 1)]

    def dataset_folder(self, dataset_id: int) -> Path:
        if dataset_id != 1:
            raise ValueError(f"Dataset: there is no dataset #{dataset_id}")
        return self.exports.parent / "dataset"

    def activate_checkpoint(self, checkpoint_id: int) -> str:
        if checkpoint_id != 1:
            raise ValueError(f"Checkpoint id: there is no checkpoint #{checkpoint_id}")
        return "fake"

    def assign_checkpoint(self, checkpoint_id: int) -> str:
        if checkpoint_id != 1:
            raise ValueError(f"Checkpoint id: there is no checkpoint #{checkpoint_id}")
        return "fake, transferred from other"

    def solver_status(self) -> str:
        return "ConsistencySolver, not yet trained for this model: runs DPM-Solver-2"

    def close(self, timeout: float = 30.0) -> None:
        pass
