"""The app's event handlers: read the fields, call the backend, format what the components show.

No business logic lives here: parsing is ``webui.inputs``, work is the :class:`webui.views.Backend`.
Every bad input becomes one ``gr.Error`` naming its field, raised before the backend is called.
"""

from __future__ import annotations

import html
import logging
import re
import time
import uuid
from typing import Any, Iterator, Sequence

import gradio as gr

from store.errors import StoreError
from webui.inputs import (
    MAX_ITEM_CHARS,
    MAX_SEARCH_CHARS,
    MAX_TILES,
    REFINE_STEPS,
    FieldError,
    check_field_text,
    dice_seed,
    parse_explore,
    parse_int,
)
from webui.rejects import reject
from webui.views import Backend, HistoryItem, JobView, Tile

logger = logging.getLogger(__name__)

STREAM_MIN_INTERVAL_S = 0.3  # coalesce gallery updates that arrive faster than this
LOCAL_OWNER = "local"
_REF = re.compile(r"(preview|final):(\d{1,18})")


MAX_OWNER_CHARS = 100


def owner_of(request: gr.Request | None, user_header: str | None = None) -> str:
    """The row owner: the user a trusted reverse proxy names in ``user_header`` (multi-user mode), else
    the logged-in user when Gradio auth is on, else the single local user."""
    if user_header:
        headers = getattr(request, "headers", None) or {}
        name = str(headers.get(user_header.lower()) or headers.get(user_header) or "").strip()
        if not name or len(name) > MAX_OWNER_CHARS or not name.isprintable():
            raise reject(f"User: the request carries no valid {user_header} header.", request, "Not signed in")
        return name
    name = getattr(request, "username", None) if request is not None else None
    return name or LOCAL_OWNER


def _error(exc: Exception, request: gr.Request | None = None) -> gr.Error:
    return reject(exc, request)


def tile_caption(tile: Tile) -> str:
    return f"seed {tile.seed} · {tile.prompt}"  # the seed first: it survives the thumbnail's truncation


def tile_label(i: int, tile: Tile) -> str:
    prompt = tile.prompt if len(tile.prompt) <= 40 else tile.prompt[:39] + "…"
    return f"#{i + 1} {prompt} · seed {tile.seed}"


class Handlers:
    """Event functions bound to one backend (shared by every session; per-session data is gr.State)."""

    def __init__(self, backend: Backend, user_header: str | None = None, admin_users: Sequence[str] = ()) -> None:
        self.backend = backend
        self.user_header = user_header
        self.admin_users = frozenset(admin_users)

    def owner(self, request: gr.Request | None) -> str:
        """Who this request acts for: new rows are theirs."""
        return owner_of(request, self.user_header)

    def scope(self, request: gr.Request | None) -> str | None:
        """Whose rows this request may see, refine and cancel: the user's own, or everyone's (``None``) for
        the admin users named at start (``--admin-users``)."""
        owner = self.owner(request)
        return None if owner in self.admin_users else owner

    # --- Explore ------------------------------------------------------------------------------
    def dice(self) -> tuple[int, str]:
        """A random seed start; clears the explicit seed list so the start is what runs."""
        return dice_seed(), ""

    def preview(
        self,
        prompts: str,
        negative: str,
        seed_count: float,
        seed_start: float,
        seed_list: str,
        steps: float,
        solver: str,
        guidance: float,
        width: float | None = None,
        height: float | None = None,
        refine_steps: float | None = None,
        image: Any = None,
        keep_image_size: Any = False,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, dict, Any, str]]:
        """Stream the grid: (gallery, snapshot, selection choices, status) after every finished chunk.

        The snapshot ``{"run": id, "tiles": [{"preview_id", "label"}...]}`` is exactly what the gallery
        shows; the selection values are ``"<run>:<index>"`` so a refine can tell a stale selection.
        ``image`` (Gradio's file record of the uploaded input image) and ``keep_image_size``: an edit's input,
        for an editing model; the grid is then instructions x seeds. The defaults only make these parameters
        optional for API clients (an edit's Width and Height may be empty); every value is checked.
        """
        b = self.backend
        try:
            settings = parse_explore(
                prompts, negative, seed_count, seed_start, seed_list, steps, solver, guidance, width, height,
                refine_steps, solvers=b.solvers(), max_size=b.max_size, image=image,
                keep_image_size=keep_image_size, upload_root=upload_folder(), edits=takes_image(b),
            )
        except FieldError as exc:
            raise _error(exc, request) from None
        owner = self.owner(request)
        run = uuid.uuid4().hex[:8]
        total = len(settings.prompts) * len(settings.seeds)
        tiles: list[Tile] = []
        last = 0.0
        t0 = time.monotonic()
        try:
            chunks = b.preview(settings, owner)
            for chunk in chunks:
                tiles.extend(chunk)
                now = time.monotonic()
                if now - last >= STREAM_MIN_INTERVAL_S and len(tiles) < total:
                    yield self._grid(run, tiles, f"{len(tiles)} / {total} previews…", first=last == 0.0)
                    last = now
        except (ValueError, StoreError) as exc:
            raise _error(exc, request) from None
        ran = f" {b.solver_status()}." if settings.solver == "consistency" else ""  # which policy, in words
        yield self._grid(run, tiles, f"{len(tiles)} previews in {time.monotonic() - t0:.1f} s.{ran} "
                                     "Click tiles to select them, then press Refine.", first=last == 0.0)

    def _grid(self, run: str, tiles: list[Tile], status: str, first: bool) -> tuple[Any, dict, Any, str]:
        """The outputs for the tiles so far. Only a run's first update clears the selection: tiles picked
        while the grid is still streaming stay picked (the choices only grow within a run)."""
        gallery = [(str(t.path), tile_caption(t)) for t in tiles]
        snapshot = {"run": run,
                    "tiles": [{"preview_id": t.preview_id, "label": tile_label(i, t)} for i, t in enumerate(tiles)]}
        choices = [(tile["label"], f"{run}:{i}") for i, tile in enumerate(snapshot["tiles"])]
        selection = gr.Dropdown(choices=choices, value=[]) if first else gr.Dropdown(choices=choices)
        return gallery, snapshot, selection, status

    def toggle_tile(self, selected: list[str] | None, snapshot: dict | None, evt: gr.SelectData) -> Any:
        """A click on a tile ticks or unticks it in the selection (the selection is the source of truth)."""
        if not snapshot or not isinstance(evt.index, int) or not 0 <= evt.index < len(snapshot["tiles"]):
            return gr.skip()
        value = f"{snapshot['run']}:{evt.index}"
        selected = list(selected or [])
        selected = [v for v in selected if v != value] if value in selected else selected + [value]
        return gr.Dropdown(value=selected)

    def select_all(self, snapshot: dict | None) -> Any:
        if not snapshot:
            return gr.skip()
        return gr.Dropdown(value=[f"{snapshot['run']}:{i}" for i in range(len(snapshot["tiles"]))])

    def refine(self, selected: list[str] | None, snapshot: dict | None, refine_steps: float,
               request: gr.Request) -> str:
        """Queue one refine job per selected tile; ids come from the rendered snapshot, re-read by the backend."""
        if not isinstance(snapshot, dict) or not snapshot.get("tiles"):
            raise reject("Selection: preview a grid first, then select tiles to refine.", request, "Nothing to refine")
        if not selected:
            raise reject("Selection: select at least one tile (click it in the grid).", request, "Nothing to refine")
        if not isinstance(selected, list) or len(selected) > MAX_TILES:
            raise reject(f"Selection: at most {MAX_TILES} tiles.", request)
        preview_ids = []
        for value in selected:
            run, _, index = str(value)[:40].partition(":")
            if run != snapshot["run"] or not index.isdigit() or int(index) >= len(snapshot["tiles"]):
                raise reject("Selection: the grid changed since you selected; select the tiles again.", request)
            preview_ids.append(int(snapshot["tiles"][int(index)]["preview_id"]))
        try:
            steps = parse_int(refine_steps, "Refine steps", *REFINE_STEPS)
            job_ids = self.backend.refine(preview_ids, steps, self.scope(request))
        except (ValueError, StoreError) as exc:
            raise _error(exc, request) from None
        gr.Info(f"Queued {len(job_ids)} refine job(s); follow them in the Refine tab.")
        return f"Queued refine job(s) {', '.join('#' + str(j) for j in job_ids)} — see the Refine tab."

    # --- Refine -------------------------------------------------------------------------------
    def jobs(self, signature: str | None, request: gr.Request) -> tuple[Any, Any, str]:
        """The job list (HTML with progress bars) and the finals beside their previews; skipped if unchanged."""
        views = self.backend.jobs(self.scope(request))
        # Consistency is stored just after a job turns done: its arrival must change the signature too.
        sig = repr([(v.job_id, v.state, v.step, v.total, round(v.eta_s or 0), sorted(v.consistency)) for v in views])
        if sig == signature:
            return gr.skip(), gr.skip(), sig
        return jobs_html(views), finals_gallery(views), sig

    def jobs_now(self, request: gr.Request) -> tuple[Any, Any, str]:
        """The job list and finals, always sent (the Refresh button and API clients)."""
        return self.jobs(None, request)

    def cancel(self, job_id: object, request: gr.Request) -> str:
        """Cancel a job by id. Wired with ``preprocess=False``: the raw value (a number, text, 2**63,
        Infinity, NaN...) is checked here, so every bad id gets the same one-sentence message."""
        try:
            number = parse_int(job_id, "Job id", 1, 2**62)
        except FieldError:
            raise reject("Job id: enter the number of a job from the list.", request) from None
        try:
            state = self.backend.cancel(number, self.scope(request))
        except (ValueError, StoreError) as exc:
            raise _error(exc, request) from None
        if state == "running":
            return f"Job #{number}: cancel requested; it stops after its current model step."
        return f"Job #{number}: {state}."

    # --- History ------------------------------------------------------------------------------
    def search(self, query: str | None, request: gr.Request) -> tuple[list, list[str], str]:
        try:
            query = check_field_text(query, "Search", MAX_SEARCH_CHARS).strip()
        except FieldError as exc:
            raise _error(exc, request) from None
        try:
            items = self.backend.history(query, self.scope(request))
        except (ValueError, StoreError) as exc:
            raise _error(exc, request) from None
        gallery = [(str(it.path), history_caption(it)) for it in items]
        refs = [it.ref for it in items]
        note = f"{len(items)} image(s)" + (f" matching “{query}”" if query else "") + ". Click one to pick it."
        return gallery, refs, note

    def pick(self, refs: list[str] | None, evt: gr.SelectData) -> Any:
        if not refs or not isinstance(evt.index, int) or not 0 <= evt.index < len(refs):
            return gr.skip()
        return refs[evt.index]

    def _item(self, ref: str | None, request: gr.Request | None) -> HistoryItem:
        text = ref if isinstance(ref, str) and len(ref) <= MAX_ITEM_CHARS else ""
        m = _REF.fullmatch(text.strip())
        if not m:
            raise reject("Item: pick an image in the history (e.g. final:12 or preview:3).", request)
        try:
            return self.backend.history_item(m.group(0), self.scope(request))
        except (ValueError, KeyError, StoreError) as exc:
            raise reject(f"Item: {exc}", request, "Not found") from None

    def send_to_explore(self, ref: str, request: gr.Request) -> tuple:
        """Every Explore field from a stored image (an edit's input image too), and the Explore tab selected."""
        s = self._item(ref, request).settings
        return (
            "\n".join(s.prompts), s.negative_prompt, 1, s.seeds[0], "", s.steps, s.solver, s.guidance,
            s.width, s.height, s.refine_steps, s.image, False, gr.Tabs(selected="explore"),
        )

    def edit_pair(self, ref: str, request: gr.Request) -> tuple[str | None, str]:
        """(input image, image) of the history item ``ref``: an edit beside the image it started from (the input
        is ``None`` for an image made from text alone)."""
        item = self._item(ref, request)
        return (None if item.input_path is None else str(item.input_path)), str(item.path)

    def use_as_input(self, ref: str, request: gr.Request) -> tuple[str, Any]:
        """A final from the history as Explore's input image (an editing model's next edit starts from it)."""
        if not takes_image(self.backend):
            raise reject(f"image: {self.backend.model_name} is a text-to-image model and takes no input image",
                         request)
        item = self._item(ref, request)
        if item.kind != "final":
            raise reject(f"Item: {item.ref} is a preview; refine it and use the final as input", request)
        return str(item.path), gr.Tabs(selected="explore")

    def png(self, ref: str, request: gr.Request) -> str:
        """The stored PNG file itself (metadata intact), never a re-encoded image."""
        return str(self._item(ref, request).path)


def history_caption(item: HistoryItem) -> str:
    s = item.settings
    steps = f"{s.refine_steps} steps" if item.kind == "final" else f"{s.solver} {s.steps} steps"
    edit = " · edit" if item.is_edit else ""
    return f"{item.ref} · {s.prompts[0]} · seed {s.seeds[0]} · {steps}{edit}"


def takes_image(backend: Backend) -> bool:
    """Whether the backend's model is an editing model (a stand-in backend without the flag is not)."""
    return bool(getattr(backend, "takes_image", False))


def upload_folder() -> str:
    """Gradio's upload folder (``GRADIO_TEMP_DIR``): the only place an input image is read from."""
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return ""
    return f"{eta:.0f} s left" if eta < 120 else f"{eta / 60:.1f} min left"


def jobs_html(views: list[JobView]) -> str:
    """A table with one progress bar per job; every user string is HTML-escaped."""
    if not views:
        return "<p class='dp-empty'>No refine jobs yet. Select previews in Explore and press Refine.</p>"
    rows = []
    for v in views:
        pct = 100.0 * v.step / v.total if v.total else 0.0
        detail = _fmt_eta(v.eta_s) if v.state in ("running", "queued") else ""
        if v.state == "done" and v.consistency.get("psnr") is not None:
            detail = f"PSNR {v.consistency['psnr']:.1f} dB · SSIM {v.consistency.get('ssim', 0.0):.3f}"
        if v.error:
            detail = v.error
        rows.append(
            f"<tr class='dp-job' data-job='{v.job_id}' data-state='{html.escape(v.state)}'>"
            f"<td>#{v.job_id}</td><td>{html.escape(v.prompt)}</td><td>{v.seed}</td>"
            f"<td><progress max='{v.total}' value='{v.step}'></progress> {v.step}/{v.total} ({pct:.0f}%)</td>"
            f"<td class='dp-state dp-{html.escape(v.state)}'>{html.escape(v.state)}</td>"
            f"<td>{html.escape(detail)}</td></tr>"
        )
    head = "<tr><th>Job</th><th>Prompt</th><th>Seed</th><th>Progress</th><th>State</th><th>ETA / consistency</th></tr>"
    return f"<table class='dp-jobs'>{head}{''.join(rows)}</table>"


def finals_gallery(views: list[JobView]) -> list[tuple[str, str]]:
    """Preview then final, side by side (two columns), for every finished job."""
    out = []
    for v in views:
        if v.state != "done" or v.final_path is None or v.preview_path is None:
            continue
        c = v.consistency
        metrics = ", ".join(f"{k.upper()} {val:.3f}" for k, val in c.items() if isinstance(val, float))
        out.append((str(v.preview_path), f"preview · job #{v.job_id} · seed {v.seed} · {v.prompt}"))
        out.append((str(v.final_path), f"final · job #{v.job_id} · {metrics}"))
    return out
