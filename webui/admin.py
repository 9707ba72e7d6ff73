"""The Admin tab: a password, background training processes, checkpoints and the evaluation.

Security: the tab is disabled unless ``DIFFUSION_PREVIEW_ADMIN_PASSWORD`` is set; its endpoints
are private (``api_visibility="private"``) and every handler re-checks the session's unlock flag
(a ``gr.State``), so a hand-made request without the password does nothing.

Work: dataset building, PPO and evaluation run as child PROCESSES (``python -m training...``), one
at a time, so the UI never freezes and Stop really stops (a thread could not be killed). Their
progress comes from the store (``training_runs`` / ``training_metrics``) and from a log file in the
private work folder. Every path handed to them is built here; no user text becomes a path.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from webui.inputs import MAX_PROMPT_CHARS, FieldError, check_field_text, parse_int, parse_seed_list
from webui.rejects import client_address, reject

logger = logging.getLogger(__name__)

ADMIN_PASSWORD_ENV = "DIFFUSION_PREVIEW_ADMIN_PASSWORD"
REPO = Path(__file__).resolve().parents[1]  # the folder holding the packages: training jobs run from here
MAX_TRAIN_PROMPTS = 10_000
STOP_GRACE_S = 10.0
LOG_TAIL_CHARS = 1500
MAX_PASSWORD_CHARS = 1000
SESSION_IDLE_S = 30 * 60  # an unlocked Admin tab locks itself after this long without an admin action
SESSION_MAX_S = 8 * 3600  # and after this long in any case
FREE_ATTEMPTS = 5  # wrong passwords a client may try before the back-off starts
MAX_BACKOFF_S = 300.0


@dataclass
class Running:
    kind: str  # "dataset" | "ppo" | "evaluate"
    proc: subprocess.Popen
    log: Path
    started: float


class ProcessSlot:
    """At most one background process for the whole app (training competes for the device)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._lock = threading.Lock()
        self.current: Running | None = None
        self.last: Running | None = None

    def start(self, kind: str, argv: list[str]) -> Running:
        with self._lock:
            if self.current is not None and self.current.proc.poll() is None:
                raise gr.Error(f"A {self.current.kind} process is still running (pid {self.current.proc.pid}); "
                               "stop it or wait for it to finish.", title="Busy")
            log = self.work / f"{kind}-{stamp()}.log"
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env.pop(ADMIN_PASSWORD_ENV, None)  # the child does not need the password
            with open(log, "wb") as fh:
                proc = subprocess.Popen(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            self.current = Running(kind, proc, log, time.monotonic())
            logger.info("started %s (pid %d): %s", kind, proc.pid, " ".join(argv))
            return self.current

    def stop(self, grace_s: float = STOP_GRACE_S) -> str:
        """SIGINT (the trainer records its run as interrupted), then SIGKILL to the whole process group
        after ``grace_s``, so no child of the trainer survives either."""
        with self._lock:
            run = self.current
            if run is None or run.proc.poll() is not None:
                return "Nothing is running."
            run.proc.send_signal(signal.SIGINT)
            try:
                run.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("the %s process (pid %d) did not stop within %.0f s; killing it", run.kind,
                               run.proc.pid, grace_s)
                with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
                    os.killpg(run.proc.pid, signal.SIGKILL)  # start_new_session: its group id is its pid
                run.proc.kill()
                run.proc.wait()
            logger.info("stopped the %s process (pid %d, exit %s)", run.kind, run.proc.pid, run.proc.returncode)
            return f"Stopped the {run.kind} process (exit {run.proc.returncode})."

    def status(self) -> str:
        run = self.current
        if run is None:
            return "No background process has run in this app yet."
        code = run.proc.poll()
        took = time.monotonic() - run.started
        state = f"running for {took:.0f} s (pid {run.proc.pid})" if code is None else f"finished with exit code {code}"
        tail = tail_text(run.log)
        return f"**{run.kind}**: {state}\n\n```\n{tail}\n```" if tail else f"**{run.kind}**: {state}"

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.current is not None and self.current.proc.poll() is None:
            self.stop(grace_s)


class UnlockGate:
    """Admin sessions and per-client password back-off, without ever sleeping in a request.

    A client (by address) may try :data:`FREE_ATTEMPTS` wrong passwords; after that each further
    wrong one locks that client out for 2, 4, 8... seconds (at most :data:`MAX_BACKOFF_S`); attempts
    during a lock-out are refused at once without looking at the password. Other clients are not
    affected. A right password gives a random session token that expires after
    :data:`SESSION_IDLE_S` without use or :data:`SESSION_MAX_S` in all, or at logout.
    """

    MAX_CLIENTS = 10_000

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (wrong attempts, locked until)
        self._sessions: dict[str, tuple[str, float, float]] = {}  # token -> (client, created, last used)

    def wait_s(self, client: str) -> float:
        """Seconds ``client`` must wait before its next attempt (0: it may try now)."""
        with self._lock:
            _, until = self._failures.get(client, (0, 0.0))
            return max(0.0, until - self.clock())

    def attempt(self, client: str, right: Callable[[], bool]) -> tuple[bool, float]:
        """One password attempt of ``client``, decided atomically (concurrent attempts cannot slip past
        a lock-out): ``(True, 0)`` when ``right()``; else ``(False, seconds locked out)``, where a client
        still locked out is refused without calling ``right``."""
        with self._lock:
            _, until = self._failures.get(client, (0, 0.0))
            if until > self.clock():
                return False, until - self.clock()
            if right():
                return True, 0.0
            return False, -self._failed(client)  # negative: this attempt was wrong (and earned this wait)

    def failed(self, client: str) -> float:
        """Record a wrong password; returns the lock-out it earned (0 while attempts are free)."""
        with self._lock:
            return self._failed(client)

    def _failed(self, client: str) -> float:
        """Count a wrong password of ``client`` (the caller holds the lock)."""
        if len(self._failures) >= self.MAX_CLIENTS:
            now = self.clock()
            self._failures = {c: f for c, f in self._failures.items() if f[1] > now}
        count = self._failures.get(client, (0, 0.0))[0] + 1
        wait = 0.0 if count <= FREE_ATTEMPTS else min(MAX_BACKOFF_S, 2.0 ** (count - FREE_ATTEMPTS))
        self._failures[client] = (count, self.clock() + wait)
        return wait

    def open_session(self, client: str) -> str:
        with self._lock:
            self._failures.pop(client, None)
            now = self.clock()
            self._sessions = {t: v for t, v in self._sessions.items() if self._alive(v, now)}
            token = secrets.token_urlsafe(32)
            self._sessions[token] = (client, now, now)
            return token

    def _alive(self, session: tuple[str, float, float], now: float) -> bool:
        _, created, used = session
        return now - used < SESSION_IDLE_S and now - created < SESSION_MAX_S

    def alive(self, token: Any) -> bool:
        """Whether ``token`` is a live session (without counting this as a use)."""
        with self._lock:
            session = self._sessions.get(token) if isinstance(token, str) else None
            return session is not None and self._alive(session, self.clock())

    def touch(self, token: Any) -> bool:
        """Whether ``token`` is a live session; using it keeps it alive."""
        if not isinstance(token, str) or len(token) > 100:
            return False
        with self._lock:
            session = self._sessions.get(token)
            now = self.clock()
            if session is None or not self._alive(session, now):
                self._sessions.pop(token, None)
                return False
            self._sessions[token] = (session[0], session[1], now)
            return True

    def close_session(self, token: Any) -> bool:
        with self._lock:
            return isinstance(token, str) and self._sessions.pop(token, None) is not None


def tail_text(path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    """The end of a log, with carriage-return progress bars collapsed to their last state."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4 * limit))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(lines)[-limit:].replace("```", "'''")


class Admin:
    """Handlers of the Admin tab (all private endpoints)."""

    def __init__(self, db: Path, work: Path, exports: Path, model: str | None, backend: Any,
                 model_argv: list[str] | None = None) -> None:
        self.db, self.work, self.exports, self.model, self.backend = db, work, exports, model, backend
        # the app's model options as the training jobs take them (runtime.cli.model_argv); else --model alone
        self.model_argv = list(model_argv) if model_argv is not None else (["--model", model] if model else [])
        self.work.mkdir(parents=True, exist_ok=True)
        self.slot = ProcessSlot(work)
        self.gate = UnlockGate()
        self._password = os.environ.get(ADMIN_PASSWORD_ENV) or ""

    @property
    def enabled(self) -> bool:
        return bool(self._password)

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the background process this app started (SIGINT, then SIGKILL after ``grace_s``)."""
        self.slot.close(grace_s)

    # --- access -------------------------------------------------------------------------------
    def unlock(self, password: str | None, request: gr.Request | None = None) -> tuple:
        """A session token for the right password; wrong ones are counted per client (no sleeping here:
        the answer is immediate, and a client past its free attempts is refused until its back-off ends).

        Outputs: (session, panel, lock row, note, timer). A refusal changes only the note, which says why
        (the unlock runs outside the queue, where Gradio's page would show an error without its text).
        """
        client = client_address(request)
        if not self.enabled:
            raise reject(f"Admin is disabled: set {ADMIN_PASSWORD_ENV} and restart the app.", request, "Locked",
                         what="admin unlock")
        given = password if isinstance(password, str) and len(password) <= MAX_PASSWORD_CHARS else ""
        ok, wait = self.gate.attempt(client, lambda: bool(given) and hmac.compare_digest(
            given.encode("utf-8", "replace"), self._password.encode()))
        if not ok:
            if wait > 0:
                note = f"Admin password: too many wrong attempts from your address; try again in {wait:.0f} s."
                logger.info("admin: refused an unlock from %s (locked out for %.0f s more)", client, wait)
            else:
                note = "Admin password: wrong password."
                logger.warning("admin: wrong password from %s%s", client,
                               f" (locked out for {-wait:.0f} s)" if wait else "")
            return gr.skip(), gr.skip(), gr.skip(), note, gr.skip()
        token = self.gate.open_session(client)
        logger.info("admin: unlocked by %s", client)
        return (token, gr.Column(visible=True), gr.Row(visible=False),
                f"Unlocked; the tab locks itself after {SESSION_IDLE_S // 60} min without use.", gr.Timer(active=True))

    def logout(self, session: Any, request: gr.Request | None = None) -> tuple:
        """End the admin session: the token stops working at once."""
        if self.gate.close_session(session):
            logger.info("admin: logged out by %s", client_address(request))
        return (None, gr.Column(visible=False), gr.Row(visible=self.enabled), "Locked.", gr.Timer(active=False))

    def _check(self, session: Any, request: gr.Request | None = None) -> None:
        if not self.enabled or not self.gate.touch(session):
            raise reject("Admin: unlock the Admin tab with the password first (sessions expire).", request,
                         "Locked", what="admin action")

    # --- background work ----------------------------------------------------------------------
    def _model_args(self) -> list[str]:
        return list(self.model_argv)

    def _prompt_file(self, kind: str, text: str | None, field: str) -> tuple[Path, int]:
        """Prompts typed in the tab, written to a file whose name the app chooses."""
        text = check_field_text(text, field, MAX_TRAIN_PROMPTS * (MAX_PROMPT_CHARS + 1))
        prompts = [p.strip() for p in (text or "").splitlines() if p.strip()]
        if not prompts:
            raise FieldError(field, "enter at least one prompt (one per line)")
        if len(prompts) > MAX_TRAIN_PROMPTS or any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise FieldError(field, f"at most {MAX_TRAIN_PROMPTS} prompts of {MAX_PROMPT_CHARS} characters")
        path = self.work / f"{kind}-prompts-{stamp()}.txt"
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        return path, len(prompts)

    def build_dataset(self, session: Any, prompts_text: str | None, seeds: Any) -> str:
        """``python -m training.dataset`` on the typed prompts, into a new folder under the work folder."""
        self._check(session)
        try:
            n_seeds = parse_int(seeds, "Seeds per prompt", 1, 64)
            prompt_file, n_prompts = self._prompt_file("train", prompts_text, "Training prompts")
        except FieldError as exc:
            raise reject(exc, what="admin input") from None
        name = f"admin-{stamp()}"
        argv = [sys.executable, "-m", "training.dataset", "--prompts", str(prompt_file), "--seeds",
                f"0-{n_seeds - 1}", "--out", str(self.work / "datasets" / name), "--db", str(self.db),
                "--name", name, *self._model_args()]
        run = self.slot.start("dataset", argv)
        return f"Building dataset {name} (pid {run.proc.pid}) from {n_prompts} prompts x {n_seeds} seeds…"

    def start_ppo(self, session: Any, dataset_id: Any, updates: Any, reward: str | None = None) -> str:
        """``python -m training.train`` on a dataset chosen from the store's list (by id, never by path)."""
        self._check(session)
        try:
            n = parse_int(updates, "Updates", 1, 100_000)
            reward_args = (["--reward", check_reward(reward, getattr(self.backend, "model_name", None))]
                           if reward and reward != MODEL_DEFAULT else [])
            if dataset_id in (None, ""):
                raise FieldError("Dataset", "build a dataset first, then choose it")
            folder = self.backend.dataset_folder(parse_int(dataset_id, "Dataset", 1, 2**62))
        except (FieldError, ValueError) as exc:
            raise reject(exc, what="admin input") from None
        name = f"admin-ppo-{stamp()}"
        argv = [sys.executable, "-m", "training.train", "--dataset", str(folder), "--out",
                str(self.work / "runs" / name), "--db", str(self.db), "--num-updates", str(n), "--name", name,
                *reward_args, *self._model_args()]
        run = self.slot.start("ppo", argv)
        return f"PPO run {name} started (pid {run.proc.pid}, {n} updates); the reward plot follows the store."

    def stop(self, session: Any) -> str:
        self._check(session)
        return self.slot.stop()

    def poll(self, session: Any, dataset_id: Any) -> tuple[Any, Any, Any, Any]:
        """Process status, reward curve, checkpoints and the dataset list (keeping the current pick)."""
        if not self.enabled or not self.gate.alive(session):  # polling does not keep a session alive
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        choices = self.backend.datasets()
        values = [v for _, v in choices]
        value = dataset_id if dataset_id in values else (values[0] if values else None)
        return (self.slot.status(), self.backend.reward_frame(), self.backend.checkpoints_table(),
                gr.Dropdown(choices=choices, value=value))

    def activate(self, session: Any, checkpoint_id: Any) -> tuple[str, Any]:
        return self._checkpoint_action(session, checkpoint_id, self.backend.activate_checkpoint,
                                       "Checkpoint #{cid} ({name}) is now the active ConsistencySolver for this model.")

    def assign(self, session: Any, checkpoint_id: Any) -> tuple[str, Any]:
        """“Use for this model too”: run a checkpoint trained on another model (same schedule family) here."""
        return self._checkpoint_action(session, checkpoint_id, self.backend.assign_checkpoint,
                                       "This model now runs checkpoint #{cid} ({name}).")

    def _checkpoint_action(self, session: Any, checkpoint_id: Any, action: Callable[[int], str],
                           done: str) -> tuple[str, Any]:
        """Check the session and the id, run ``action(id)`` (-> the checkpoint's name), reload the solver."""
        self._check(session)
        try:
            cid = parse_int(checkpoint_id, "Checkpoint id", 1, 2**62)
            name = action(cid)
        except (FieldError, ValueError, LookupError) as exc:
            raise reject(exc, what="admin input") from None
        self.backend.reload_solver()
        return (done.format(cid=cid, name=name) + f" Previews run: {self.backend.solver_status()}",
                self.backend.checkpoints_table())

    def evaluate(self, session: Any, prompts_text: str | None, steps_text: str | None,
                 seeds: Any) -> Iterator[tuple[str, Any]]:
        """Run ``python -m training.evaluate`` in a child process; stream its log, then show table and plot."""
        self._check(session)
        try:
            steps = parse_steps(steps_text)
            n_seeds = parse_int(seeds, "Seeds", 1, 64)
            prompt_file, _ = self._prompt_file("eval", prompts_text, "Held-out prompts")
        except FieldError as exc:
            raise reject(exc, what="admin input") from None
        when = stamp()
        out_json = self.work / f"evaluate-{when}.json"
        out_plot = self.exports / f"evaluate-{when}.png"  # served: the plot is shown in the page
        argv = [sys.executable, "-m", "training.evaluate", "--prompts", str(prompt_file), "--seeds",
                f"0-{n_seeds - 1}", "--steps", ",".join(map(str, steps)), "--json", str(out_json), "--plot",
                str(out_plot), "--db", str(self.db), *self._model_args()]
        run = self.slot.start("evaluate", argv)
        while run.proc.poll() is None:
            yield f"Evaluating… (pid {run.proc.pid})\n\n```\n{tail_text(run.log, 800)}\n```", gr.skip()
            time.sleep(1.0)
        if run.proc.returncode != 0 or not out_json.exists():
            raise gr.Error(f"The evaluation failed (exit {run.proc.returncode}): {tail_text(run.log, 400)}")
        table = results_markdown(json.loads(out_json.read_text(encoding="utf-8")))
        yield table, (str(out_plot) if out_plot.exists() else None)


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"


MODEL_DEFAULT = "model default"
_REWARD_TERM = re.compile(r"\s*(?:\d*\.?\d+\s*\*\s*)?([a-z_0-9]+)\s*")


def reward_choices() -> list[str]:
    from training.rewards import REWARD_NAMES

    return [MODEL_DEFAULT, *REWARD_NAMES]


def check_reward(spec: str, model_id: str | None = None) -> str:
    """A reward name or weighted sum (``psnr+10*gms``) of known measures that ``model_id`` (when given) can be
    scored with (``readings`` only for the embedded model); the trainer checks the rest."""
    from training.rewards import REWARD_NAMES, check_reward_for_model

    spec = check_field_text(spec, "Reward", 200)
    for part in spec.split("+"):
        m = _REWARD_TERM.fullmatch(part)
        if m is None or m.group(1) not in REWARD_NAMES:
            raise FieldError("Reward", f"{part.strip()!r} is not a known measure ({', '.join(REWARD_NAMES)}) "
                                       "or WEIGHT*NAME")
    if model_id is not None:
        try:
            check_reward_for_model(spec, model_id)
        except ValueError as exc:
            raise FieldError("Reward", str(exc).removeprefix("reward: ")) from None
    return spec.replace(" ", "")


def parse_steps(text: str | None) -> list[int]:
    """``"3,4,5,6,8"`` -> [3, 4, 5, 6, 8] (each in 1..50)."""
    text = check_field_text(text, "Steps", 200)
    if not text or not re.fullmatch(r"\s*\d+(\s*[,-]\s*\d+)*\s*", text):
        raise FieldError("Steps", "enter step counts such as 3,4,5,6,8")
    steps = parse_seed_list(text, "Steps", limit=50, max_chars=200)  # the same "a,b,c-d" grammar
    if any(not 1 <= s <= 50 for s in steps):
        raise FieldError("Steps", "each step count must be in 1..50")
    return steps


def results_markdown(result: dict) -> str:
    """The evaluation JSON's ``results`` as a markdown table (every column the JSON has)."""
    rows = result.get("results") or []
    if not rows:
        return "The evaluation produced no results."
    cols = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    ref = result.get("reference") or {}
    head = (f"Model `{result.get('model', '?')}`, reference {ref.get('solver', '?')} "
            f"at {ref.get('steps', '?')} steps.\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in cols) + " |" for row in rows]
    return head + "\n".join(lines)
