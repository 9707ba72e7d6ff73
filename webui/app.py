"""Diffusion Preview: explore few-step previews across prompts and seeds, pick, refine, keep a history.

    python app.py [--model M] [--db PATH] [--host 127.0.0.1] [--port 7860] [--share]

Layout and wiring only: the handlers live in ``webui.handlers`` / ``webui.admin`` and call the engine
(``preview/``, ``refine/``), the store and ``training/`` through ``webui.backend``.

File serving: the only folder Gradio may serve besides its own cache is the export folder, where
the backend writes PNGs under names it chooses (``preview-12-<sha256 prefix>.png``); the database,
noise and logs live elsewhere and are also listed in ``blocked_paths``. Uploads are closed unless the
model is an editing model (FLUX.1 Kontext), whose Explore takes one input image. Closing the app stops a
training process it started (SIGINT: the trainer records the run as interrupted).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import argparse
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import gradio as gr

from runtime.cli import DB_HELP, add_db_option, add_model_options, load_options, model_argv
from runtime.images import MAX_INPUT_BYTES
from webui.admin import ADMIN_PASSWORD_ENV, MODEL_DEFAULT, Admin, reward_choices
from webui.guard import guarded_app, trusted_hosts
from webui.handlers import Handlers
from webui.inputs import DEFAULT_REFINE_STEPS, MAX_PROMPTS, PREVIEW_STEPS
from webui.views import Backend

logger = logging.getLogger("diffusion_preview.app")

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD = "1mb"  # a text-to-image model: the app takes no uploads; anything bigger is refused outright
MAX_IMAGE_UPLOAD = MAX_INPUT_BYTES  # an editing model: one input image, at most runtime.images' file limit
JOBS_POLL_S = 1.0
ADMIN_POLL_S = 2.0


@dataclass(frozen=True)
class AppPaths:
    """Where things live. Only ``exports`` and ``gradio_tmp`` are ever served."""

    db: Path
    exports: Path  # PNGs written by the backend (allowed_paths)
    gradio_tmp: Path  # GRADIO_TEMP_DIR, Gradio's own cache
    work: Path  # admin logs, prompt files, evaluation JSON: private

    @classmethod
    def default(cls, db: str | Path | None = None, cache: str | Path | None = None) -> "AppPaths":
        from store.connection import default_store_path

        db_path = Path(db).expanduser().resolve() if db else default_store_path().resolve()
        cache_root = cache or os.environ.get("DIFFUSION_PREVIEW_CACHE") or Path.home() / ".cache/diffusion-preview"
        cache_root = Path(cache_root).expanduser().resolve()
        return cls(db=db_path, exports=cache_root / "exports", gradio_tmp=cache_root / "gradio",
                   work=db_path.parent / "diffusion-preview-work")

    def check(self) -> None:
        """Refuse, before any folder is created, a database inside a served folder or in a place the store
        cannot write (a read-only folder): one :class:`store.errors.StoreError` sentence."""
        from store.connection import check_location
        from store.errors import StoreError

        for served in (self.exports, self.gradio_tmp):
            if self.db.is_relative_to(served) or self.work.is_relative_to(served):
                raise StoreError(f"--db: {self.db} is inside the served folder {served}; put the database elsewhere")
        check_location(self.db, [self.exports, self.gradio_tmp])

    def prepare(self) -> None:
        """Create the folders and refuse a database inside a served folder."""
        for served in (self.exports, self.gradio_tmp):
            if self.db.is_relative_to(served) or self.work.is_relative_to(served):
                raise SystemExit(f"--db: {self.db} is inside the served folder {served}; put the database elsewhere")
        for folder in (self.exports, self.gradio_tmp, self.work, self.db.parent):
            folder.mkdir(parents=True, exist_ok=True)
        os.environ["GRADIO_TEMP_DIR"] = str(self.gradio_tmp)


def explore_tab(backend: Backend) -> SimpleNamespace:
    """Prompts x seeds settings on the left, the streamed grid and the selection on the right."""
    height, width = backend.default_size
    with gr.Tab("Explore", id="explore"):
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                edits = bool(getattr(backend, "takes_image", False))  # an editing model (FLUX.1 Kontext)
                image = gr.Image(label="Input image", sources=["upload", "clipboard"], type="filepath",
                                 image_mode=None, format="png", visible=edits, elem_id="input-image", height=240)
                keep_size = gr.Checkbox(label="Keep input size", value=False, visible=edits, elem_id="keep-size",
                                        info="edit at the input image's own size (Width and Height are not used)")
                if edits:
                    prompts = gr.Textbox(label="Instructions", info=f"one edit per line, up to {MAX_PROMPTS}; "
                                         "the grid is instructions x seeds", lines=4, elem_id="prompts",
                                         placeholder="make the sky purple\nadd a small red hat")
                else:
                    prompts = gr.Textbox(label="Prompts", info=f"one per line, up to {MAX_PROMPTS}", lines=4,
                                         elem_id="prompts", placeholder="a crimson disc on a navy field\n"
                                         "a small yellow square at the top on a blue background")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                with gr.Row(equal_height=True):
                    seed_count = gr.Number(label="Seed count", value=8, elem_id="seed-count", min_width=90)
                    seed_start = gr.Number(label="Seed start", value=0, elem_id="seed-start", min_width=90)
                    dice = gr.Button("Random", size="sm", scale=0, min_width=70, elem_id="dice-btn")
                seed_list = gr.Textbox(label="Seed list", info="optional, overrides count/start: 3, 17, 100-103",
                                       elem_id="seed-list")
                with gr.Row():
                    steps = gr.Number(label="Preview steps", value=4, elem_id="steps",
                                      info=f"{PREVIEW_STEPS[0]}..{PREVIEW_STEPS[1]}")
                    solver = gr.Dropdown(backend.solvers(), value=backend.default_solver(), label="Solver",
                                         elem_id="solver", allow_custom_value=True)
                guidance = gr.Number(label="Guidance", value=backend.default_guidance, elem_id="guidance")
                with gr.Row():
                    # An edit's size, left empty, is the model's preferred size for the input image.
                    size_info = "0: fitted to the input" if edits else None
                    width_in = gr.Number(label="Width", value=None if edits else width, step=backend.size_multiple,
                                         elem_id="width", info=size_info)
                    height_in = gr.Number(label="Height", value=None if edits else height,
                                          step=backend.size_multiple, elem_id="height", info=size_info)
                    refine_steps = gr.Number(label="Refine steps", value=DEFAULT_REFINE_STEPS, elem_id="refine-steps")
                with gr.Row():
                    preview_btn = gr.Button("Preview (Ctrl+Enter)", variant="primary", elem_id="preview-btn", scale=3)
                    stop_btn = gr.Button("Stop (Esc)", variant="stop", elem_id="stop-btn", scale=1)
            with gr.Column(scale=5):
                status = gr.Markdown("Enter prompts and press Preview.", elem_id="explore-status")
                gallery = gr.Gallery(label="Previews", columns=8, allow_preview=False, object_fit="contain",
                                     height="auto", elem_id="preview-gallery", interactive=False)
                selection = gr.Dropdown(label="Selected tiles", choices=[], value=[], multiselect=True,
                                        allow_custom_value=True, elem_id="selection",
                                        info="click tiles in the grid to add or remove them")
                with gr.Row():
                    all_btn = gr.Button("Select all", size="sm", elem_id="select-all-btn")
                    clear_btn = gr.Button("Clear selection", size="sm", elem_id="clear-btn")
                    refine_btn = gr.Button("Refine selected", variant="primary", elem_id="refine-btn")
                refine_status = gr.Markdown(elem_id="refine-status")
        snapshot = gr.State(None)  # the grid as rendered: run id + preview ids, per session
    fields = [prompts, negative, seed_count, seed_start, seed_list, steps, solver, guidance, width_in, height_in,
              refine_steps, image, keep_size]
    return SimpleNamespace(**locals())


def refine_tab() -> SimpleNamespace:
    """Job list with progress bars and ETA (polled from the store), cancel, finals beside previews."""
    with gr.Tab("Refine", id="refine"):
        gr.Markdown("Full-step refines from the same noise as their preview. "
                    "Each final is shown beside its preview with the measured consistency.")
        jobs_view = gr.HTML(elem_id="jobs")
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="jobs-refresh-btn")
        with gr.Row():
            cancel_id = gr.Number(label="Job id", value=None, elem_id="cancel-id", scale=0)
            cancel_btn = gr.Button("Cancel job", variant="stop", elem_id="cancel-btn", scale=0)
            cancel_status = gr.Markdown()
        finals = gr.Gallery(label="Preview → final", columns=6, allow_preview=True, object_fit="contain",
                            height="auto", elem_id="finals-gallery", interactive=False)
        signature = gr.State(None)  # what the job list last showed, so unchanged polls send nothing
        timer = gr.Timer(JOBS_POLL_S)
    return SimpleNamespace(**locals())


def history_tab(edits: bool = False) -> SimpleNamespace:
    """Search by prompt, pick an image, send its settings back to Explore or download its PNG.

    ``edits`` (an editing model): a picked edit shows its input image beside it, and a final can be used as
    Explore's next input image."""
    with gr.Tab("History", id="history"):
        with gr.Row():
            query = gr.Textbox(label="Search prompts", scale=3, elem_id="history-query")
            search_btn = gr.Button("Search", scale=0, elem_id="history-search-btn")
        note = gr.Markdown()
        gallery = gr.Gallery(label="History", columns=8, allow_preview=False, height="auto",
                             elem_id="history-gallery", interactive=False)
        refs = gr.State([])  # "final:12" / "preview:3" per tile, as rendered
        with gr.Row():
            item = gr.Textbox(label="Item", info="click an image above, or type e.g. final:12",
                              elem_id="history-item", scale=2)
            send_btn = gr.Button("Send to Explore", elem_id="send-btn", scale=0)
            use_btn = gr.Button("Use this final as input", elem_id="use-input-btn", scale=0, visible=edits)
            png_btn = gr.Button("Download PNG", elem_id="png-btn", scale=0)
        with gr.Row(visible=edits):
            input_view = gr.Image(label="Input image of this edit", type="filepath", interactive=False,
                                  elem_id="history-input", height=200)
            picked_view = gr.Image(label="The edit", type="filepath", interactive=False,
                                   elem_id="history-picked", height=200)
        png_file = gr.File(label="PNG with its parameters", interactive=False, elem_id="png-file")
    return SimpleNamespace(**locals())


def admin_tab(admin: Admin) -> SimpleNamespace:
    """Password, dataset, PPO run with its live reward plot, checkpoints, evaluation."""
    with gr.Tab("Admin", id="admin"):
        unlocked = gr.State(None)  # the admin session token (webui.admin.UnlockGate), None while locked
        if not admin.enabled:
            gr.Markdown(f"**Admin is disabled.** Set the environment variable `{ADMIN_PASSWORD_ENV}` "
                        "and restart the app to enable dataset building, PPO training and checkpoints.")
        with gr.Row(visible=admin.enabled) as lock_row:
            password = gr.Textbox(label="Admin password", type="password", elem_id="admin-password")
            unlock_btn = gr.Button("Unlock", elem_id="unlock-btn", scale=0)
        lock_note = gr.Markdown()
        with gr.Column(visible=False) as panel:
            with gr.Row():
                proc_status = gr.Markdown(elem_id="admin-proc")
                logout_btn = gr.Button("Lock (log out)", size="sm", scale=0, elem_id="logout-btn")
            with gr.Accordion("1. Offline dataset", open=True):
                ds_prompts = gr.Textbox(label="Training prompts (one per line)", lines=4)
                with gr.Row():
                    ds_seeds = gr.Number(label="Seeds per prompt", value=4)
                    ds_btn = gr.Button("Build dataset", scale=0)
            with gr.Accordion("2. PPO training", open=True):
                with gr.Row():
                    ppo_dataset = gr.Dropdown(label="Dataset", choices=[], value=None)
                    ppo_updates = gr.Number(label="Updates", value=50)
                    ppo_reward = gr.Dropdown(reward_choices(), value=MODEL_DEFAULT, label="Reward",
                                             allow_custom_value=True, info="a measure or a sum like psnr+10*gms")
                    ppo_btn = gr.Button("Start PPO run", variant="primary", scale=0)
                    stop_btn = gr.Button("Stop", variant="stop", scale=0)
                reward_plot = gr.LinePlot(x="update", y="reward", title="Mean reward per update", height=260)
            with gr.Accordion("3. Checkpoints", open=True):
                gr.Markdown("A checkpoint belongs to the model it was trained on. **Activate** one trained on "
                            "this model; **Use for this model too** runs one trained on another model of the "
                            "same schedule family here, labelled *transferred*.")
                ckpts = gr.Dataframe(label="Checkpoints", interactive=False, wrap=True)
                with gr.Row():
                    ckpt_id = gr.Number(label="Checkpoint id")
                    activate_btn = gr.Button("Activate", scale=0)
                    assign_btn = gr.Button("Use for this model too", scale=0)
            with gr.Accordion("4. Evaluation", open=True):
                ev_prompts = gr.Textbox(label="Held-out prompts (one per line, not used in training)", lines=3)
                with gr.Row():
                    ev_steps = gr.Textbox(label="Steps", value="3,4,5,6,8")
                    ev_seeds = gr.Number(label="Seeds", value=4)
                    ev_btn = gr.Button("Run evaluation", scale=0)
                ev_table = gr.Markdown()
                ev_plot = gr.Image(label="Measures against NFE", type="filepath", interactive=False)
            timer = gr.Timer(ADMIN_POLL_S, active=False)
    return SimpleNamespace(**locals())


def build_demo(backend: Backend, admin: Admin, user_header: str | None = None,
               admin_users: Sequence[str] = ()) -> gr.Blocks:
    """The four tabs and their wiring. Every listener has an api_name; admin ones are private.

    ``user_header``: multi-user mode behind a reverse proxy; each request's owner is that header.
    """
    h = Handlers(backend, user_header, admin_users)
    # delete_cache: Gradio's copies of served PNGs older than a day go, hourly (the store keeps the originals).
    with gr.Blocks(title="Diffusion Preview", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## Diffusion Preview  \nModel: `{backend.model_name}` · previews are few-step estimates "
                    "of the final image from the same noise: same composition, fewer details.")
        with gr.Tabs(selected="explore") as tabs:
            edits = bool(getattr(backend, "takes_image", False))
            ex, rf, hi, ad = explore_tab(backend), refine_tab(), history_tab(edits), admin_tab(admin)
        jobs_out = [rf.jobs_view, rf.finals, rf.signature]
        history_out = [hi.gallery, hi.refs, hi.note]
        reads = dict(concurrency_limit=8, concurrency_id="reads")
        private = dict(api_visibility="private")

        # Explore: the preview streams; tile clicks edit the selection; Refine maps it to preview ids.
        ex.dice.click(h.dice, None, [ex.seed_start, ex.seed_list], api_name="dice", queue=False)
        preview = ex.preview_btn.click(
            h.preview, ex.fields, [ex.gallery, ex.snapshot, ex.selection, ex.status], api_name="preview",
            concurrency_limit=8, concurrency_id="preview", trigger_mode="once", show_progress="minimal",
            preprocess=False)  # raw values: webui.inputs checks each (text for a Number, NaN...) with one message
        preview.then(h.search, hi.query, history_out, api_name="history_after_preview", **private)
        # Stop ends the stream between chunks; the engine then drops the chunks not yet started.
        ex.stop_btn.click(None, None, None, cancels=[preview], api_name="stop_preview", **private)
        ex.gallery.select(h.toggle_tile, [ex.selection, ex.snapshot], ex.selection, api_name="toggle_tile",
                          queue=False)
        ex.all_btn.click(h.select_all, ex.snapshot, ex.selection, api_name="select_all", queue=False)
        ex.clear_btn.click(lambda: gr.Dropdown(value=[]), None, ex.selection, api_name="clear_selection", queue=False)
        ex.refine_btn.click(h.refine, [ex.selection, ex.snapshot, ex.refine_steps], ex.refine_status,
                            api_name="refine", trigger_mode="once", preprocess=False
                            ).then(h.jobs, rf.signature, jobs_out, api_name="jobs_after_refine", **private)

        # Refine: polled from the store; the Refresh button is the public endpoint.
        rf.timer.tick(h.jobs, rf.signature, jobs_out, api_name="jobs_tick", show_progress="hidden", **reads,
                      **private)
        rf.refresh_btn.click(h.jobs_now, None, jobs_out, api_name="jobs", **reads)
        demo.load(h.jobs, rf.signature, jobs_out, api_name="jobs_on_load", **private)
        rf.cancel_btn.click(h.cancel, rf.cancel_id, rf.cancel_status, api_name="cancel_job",
                            preprocess=False)  # the handler checks the raw id: text, NaN, 2**63 -> one message

        # History.
        gr.on([hi.search_btn.click, hi.query.submit], h.search, hi.query, history_out, api_name="search_history",
              **reads)
        demo.load(h.search, hi.query, history_out, api_name="history_on_load", **private)
        picked = hi.gallery.select(h.pick, hi.refs, hi.item, api_name="pick_history", queue=False)
        hi.send_btn.click(h.send_to_explore, hi.item, ex.fields + [tabs], api_name="send_to_explore")
        if edits:  # an edit beside its input image; a final as the next edit's input
            picked.then(h.edit_pair, hi.item, [hi.input_view, hi.picked_view], api_name="history_edit_after_pick",
                        **private)
            hi.item.submit(h.edit_pair, hi.item, [hi.input_view, hi.picked_view], api_name="history_edit")
            hi.use_btn.click(h.use_as_input, hi.item, [ex.image, tabs], api_name="use_as_input")
        hi.png_btn.click(h.png, hi.item, hi.png_file, api_name="history_png")

        # Admin: private endpoints; every handler re-checks the session token. The unlock answers at once
        # (no sleep; wrong passwords back off per client) and bypasses the queue, so it cannot fill it.
        lock_outputs = [ad.unlocked, ad.panel, ad.lock_row, ad.lock_note, ad.timer]
        gr.on([ad.unlock_btn.click, ad.password.submit], admin.unlock, [ad.password], lock_outputs, queue=False,
              api_name="admin_unlock", **private)
        ad.logout_btn.click(admin.logout, [ad.unlocked], lock_outputs, queue=False, api_name="admin_logout",
                            **private)
        ad.ds_btn.click(admin.build_dataset, [ad.unlocked, ad.ds_prompts, ad.ds_seeds], ad.proc_status,
                        api_name="admin_build_dataset", **private)
        ad.ppo_btn.click(admin.start_ppo, [ad.unlocked, ad.ppo_dataset, ad.ppo_updates, ad.ppo_reward], ad.proc_status,
                         api_name="admin_start_ppo", **private)
        ad.stop_btn.click(admin.stop, [ad.unlocked], ad.proc_status, api_name="admin_stop", **private)
        ad.timer.tick(admin.poll, [ad.unlocked, ad.ppo_dataset], [ad.proc_status, ad.reward_plot, ad.ckpts,
                      ad.ppo_dataset], show_progress="hidden", api_name="admin_poll", **private)
        ad.activate_btn.click(admin.activate, [ad.unlocked, ad.ckpt_id], [ad.proc_status, ad.ckpts],
                              api_name="admin_activate", **private)
        ad.assign_btn.click(admin.assign, [ad.unlocked, ad.ckpt_id], [ad.proc_status, ad.ckpts],
                            api_name="admin_assign", **private)
        ad.ev_btn.click(admin.evaluate, [ad.unlocked, ad.ev_prompts, ad.ev_steps, ad.ev_seeds],
                        [ad.ev_table, ad.ev_plot], api_name="admin_evaluate", **private)
    return demo


def launch_kwargs(paths: AppPaths, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
                  trusted: list[str] | tuple[str, ...] = (), stopping: threading.Event | None = None,
                  user_header: str | None = None, auth: Any = None, takes_image: bool = False) -> dict:
    """The launch settings that keep file access minimal; tests launch with the same ones.

    The app is a :func:`webui.guard.guarded_app`: requests naming an untrusted Host, cross-origin
    writes, uploads and the monitoring pages are refused before Gradio sees them. ``takes_image`` (an
    editing model): the upload route is open, for one input image of at most :data:`MAX_IMAGE_UPLOAD` bytes.
    """
    blocked = [str(paths.db), str(paths.db) + "-wal", str(paths.db) + "-shm", str(paths.work)]
    return dict(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(paths.exports)],
        blocked_paths=blocked,
        max_file_size=MAX_IMAGE_UPLOAD if takes_image else MAX_UPLOAD,
        ssr_mode=False,
        mcp_server=False,
        footer_links=["api"],
        css_paths=[STATIC / "app.css"],
        js=(STATIC / "app.js").read_text(encoding="utf-8"),
        _app=guarded_app(trusted_hosts(host, trusted, share), stopping, user_header,
                         max_upload=MAX_IMAGE_UPLOAD if takes_image else None),
        auth=auth,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffusion-preview", description=__doc__.split("\n")[0])
    add_model_options(p, device_help="torch device(s), comma-separated: one worker each "
                      "(default: every CUDA device, else cpu)")
    add_db_option(p, help=DB_HELP + "; never in a served folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="open a public gradio.live link for 72 h (off by default)")
    p.add_argument("--trusted-host", action="append", default=[], metavar="NAME",
                   help="a host name (or *.domain) browsers may use to reach the app, besides localhost and "
                   "--host; repeat or separate with commas. Needed with --host 0.0.0.0 for names other than "
                   "localhost (DNS-rebinding protection)")
    u = p.add_argument_group("multi-user mode (each user sees and cancels only their own jobs and history)")
    u.add_argument("--auth-file", default=None, metavar="PATH",
                   help="Gradio login: a file of 'name:password' lines (# comments)")
    u.add_argument("--user-header", default=None, metavar="NAME",
                   help="the header an authenticating reverse proxy sets to the user's name (e.g. "
                   "X-Forwarded-User); requests without it are refused. Bind to 127.0.0.1 behind the proxy")
    u.add_argument("--admin-users", default="", metavar="NAMES",
                   help="comma-separated user names (of --auth-file or --user-header) who see, refine and cancel "
                   "every user's jobs and history")
    p.add_argument("--check-db", choices=("quick", "full", "off"), default="quick",
                   help="at start: quick = PRAGMA quick_check (default); full = integrity_check and every stored "
                   "image, noise and checkpoint hash (reads the whole database); off")
    return p.parse_args(argv)


def read_auth_file(path: str | Path) -> Any:
    """Gradio's ``auth`` callable from a file of ``name:password`` lines (blank lines and # comments skipped).

    :raises ValueError: naming the file and line of a malformed entry.
    """
    import hmac

    users: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, password = line.partition(":")
        if not sep or not name.strip() or not password or len(name.strip()) > 100:
            raise ValueError(f"--auth-file: line {n} of {path} is not 'name:password'")
        users[name.strip()] = password
    if not users:
        raise ValueError(f"--auth-file: {path} names no user")

    def check(name: str, password: str) -> bool:
        known = users.get(str(name)[:100])
        return known is not None and hmac.compare_digest(str(password)[:1000].encode(), known.encode())

    return check


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Gradio self-request otherwise
    from store.errors import StoreError
    from webui.backend import EngineBackend  # heavy imports (torch, the model) after argument parsing
    from webui.shutdown import TRAINER_GRACE_S, WORKER_GRACE_S, GracefulStop

    paths = AppPaths.default(args.db)
    try:
        paths.check()
        auth = read_auth_file(args.auth_file) if args.auth_file else None
    except (StoreError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    if args.user_header and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("--user-header trusts whoever sets %s: bind to 127.0.0.1 behind the proxy", args.user_header)
    paths.prepare()
    stop = GracefulStop().install()  # SIGTERM / SIGINT from here on only ask for a clean stop
    if (args.host not in ("127.0.0.1", "localhost", "::1") or args.share) and not (args.auth_file or args.user_header):
        logger.warning("the app is reachable from other machines (host %s, share %s) and has no user login "
                       "(--auth-file or --user-header give one)", args.host, args.share)
    try:
        backend = EngineBackend.open(model=args.model, db=paths.db, exports=paths.exports, devices=args.device,
                                     forbid_under=[paths.exports, paths.gradio_tmp], options=load_options(args),
                                     check=args.check_db)
    except (ValueError, OSError, StoreError) as exc:
        sys.exit(f"error: {exc}")
    admin = Admin(db=paths.db, work=paths.work, exports=paths.exports, model=args.model, backend=backend,
                  model_argv=model_argv(args))
    demo = build_demo(backend, admin, args.user_header, [n.strip() for n in args.admin_users.split(",") if n.strip()])
    demo.queue(max_size=128, default_concurrency_limit=4)
    try:
        if not stop.requested.is_set():  # a signal during the model load: stop without serving
            demo.launch(prevent_thread_lock=True,
                        **launch_kwargs(paths, args.host, args.port, args.share, args.trusted_host, stop.stopping,
                                        args.user_header, auth, takes_image=backend.takes_image))
            stop.wait()
    finally:
        stop.shutdown([
            ("stopping the training process", lambda left: admin.close(min(TRAINER_GRACE_S, left))),
            ("stopping the device worker and closing the store",
             lambda left: backend.close(min(WORKER_GRACE_S, left))),
            ("closing the web server", lambda left: demo.close()),
        ])
    logging.shutdown()
    os._exit(0)  # every resource is closed; leftover request threads must not hold the exit past the budget


if __name__ == "__main__":
    main()
