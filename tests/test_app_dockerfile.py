"""The Dockerfile cannot be built here (no Docker, no CUDA); check that it parses and runs our app.

Parsed by hand (continuations, comments, exec-form JSON), then: a non-root USER before CMD, the
exposed port is the one the app binds, the database is on the declared volume, and the CMD's
script exists in the copied tree and accepts exactly the flags it is given.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
from app_launch import REPO

from webui import app

KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
         "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; backslash continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        if instruction.upper() not in KNOWN:
            raise ValueError(f"unknown Dockerfile instruction {instruction!r} in: {full}")
        out.append((instruction.upper(), args.strip()))
    if pending:
        raise ValueError("the Dockerfile ends inside a line continuation")
    return out


def env_pairs(args: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(args))


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile((REPO / "Dockerfile").read_text(encoding="utf-8"))


def test_parser_rejects_broken_files():
    with pytest.raises(ValueError, match="unknown"):
        parse_dockerfile("FROM x\nRUNN echo\n")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM x\nRUN echo \\\n")
    assert parse_dockerfile("# c\nFROM x\nRUN a \\\n  # note\n  b\n") == [("FROM", "x"), ("RUN", "a b")]


def test_dockerfile_runs_the_app_as_a_non_root_user_with_the_db_on_the_volume(instructions):
    names = [i for i, _ in instructions]
    assert names[0] == "FROM" and "nvidia/cuda" in instructions[0][1]
    cmd_at = max(k for k, (i, _) in enumerate(instructions) if i == "CMD")
    users = [a for i, a in instructions[:cmd_at] if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the app must not run as root"

    cmd = json.loads(instructions[cmd_at][1])  # exec form, so signals reach Python
    # The console script pip installs from pyproject.toml, and it is the app's main().
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts.get(cmd[0]) == "webui.app:main"
    workdir = PurePosixPath([a for i, a in instructions[:cmd_at] if i == "WORKDIR"][-1])
    copies = [a.split() for i, a in instructions if i == "COPY"]
    assert any(c[-2:] == [".", "."] for c in copies), "the repository is copied into WORKDIR"
    assert workdir.is_absolute()
    assert any("pip install" in a and a.rstrip().endswith(".") for i, a in instructions if i == "RUN")
    # An init as PID 1 forwards SIGTERM (docker stop) and reaps zombies; it is installed by apt.
    entry = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    assert entry and entry[-1][0].endswith("/tini") and entry[-1][1:] == ["--"]
    assert any("apt-get install" in a and " tini" in a for i, a in instructions if i == "RUN")

    args = app.parse_args(cmd[1:])  # SystemExit on an unknown flag or a bad value
    assert args.host == "0.0.0.0" and args.share is False  # inside a container; publish the port on localhost
    exposed = {int(p.split("/")[0]) for i, a in instructions if i == "EXPOSE" for p in a.split()}
    assert args.port in exposed
    volumes = [PurePosixPath(v) for i, a in instructions if i == "VOLUME" for v in json.loads(a)]
    db = PurePosixPath(args.db)
    assert any(db.is_relative_to(v) for v in volumes), f"{db} is not on a volume {volumes}"

    env = {k: v for i, a in instructions if i == "ENV" for k, v in env_pairs(a).items()}
    assert env.get("GRADIO_ANALYTICS_ENABLED") == "False"
    paths = app.AppPaths.default(args.db, cache="/home/app/.cache/diffusion-preview")
    assert not Path(paths.db).is_relative_to(paths.exports) and not Path(paths.db).is_relative_to(paths.gradio_tmp)
