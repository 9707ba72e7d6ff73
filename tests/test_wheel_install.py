"""The built wheel is the product: installed into a fresh virtual environment, run from another folder
(no checkout on ``sys.path``), it has the app's console script, the CLIs, the embedded model's weights,
the prompt files, the default policy and the app's static files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the wheel must carry besides the Python modules (package data in pyproject.toml)
DATA = ["webui/static/app.css", "webui/static/app.js", "models/embedded/weights/config.json",
        "models/embedded/weights/embedded_unet.safetensors", "models/embedded/heldout_prompts.txt",
        "models/embedded/validation_prompts.txt", "training/checkpoints/default/policy.safetensors",
        "training/checkpoints/default/policy_config.json"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _sources(dest: Path) -> Path:
    """A clean copy of what the build reads, so the build writes nothing into the checkout."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in {p.rstrip("*") for p in packages}:
        shutil.copytree(ROOT / package, dest / package, ignore=ignore)
    return dest


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1",
               DIFFUSION_PREVIEW_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    src = _sources(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w",
          str(tmp_path / "dist")], cwd=src, env=env)
    (wheel,) = (tmp_path / "dist").glob("diffusion_preview-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [d for d in DATA if d not in names], "package data missing from the wheel"
    assert not [n for n in names if n.startswith("tests/")]

    venv = tmp_path / "venv"  # torch, diffusers, gradio... come from the system; the project only from the wheel
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    python, script = venv / "bin" / "python", venv / "bin" / "diffusion-preview"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
         cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"  # cwd holds no checkout: imports must resolve to the venv
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import preview, webui, models.embedded; print(preview.__file__); "
                  "print(webui.__file__)"], cwd=elsewhere, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    assert "--model" in _run([str(script), "--help"], cwd=elsewhere, env=env).stdout
    assert "--prompt" in _run([str(python), "-m", "preview", "--help"], cwd=elsewhere, env=env).stdout

    out = _run([str(python), "-m", "preview", "--prompt", "a red circle on a blue background", "--seeds", "0",
                "--steps", "3", "--db", str(tmp_path / "s.db"), "--out", str(elsewhere / "out"), "--device", "cpu"],
               cwd=elsewhere, env=env).stdout
    (record,) = [json.loads(line) for line in out.splitlines() if line.strip()]
    from PIL import Image

    with Image.open(record["path"]) as png:  # the embedded model and the policy shipped inside the wheel
        params = png.info["parameters"]
    assert record["solver"] == "consistency" and record["size"] == [32, 32]
    assert "Model: embedded" in params and "ConsistencySolver shipped training/checkpoints/default, trained for this model" in params
