"""``python -m preview --model <tiny SDXL / FLUX / SD3 folder> --seeds 0-3 --steps 4``: 4 JSON lines, and the
same seeds twice give identical PNGs; ``python -m refine --preview-id`` refines one. Family detection reads
the folder's model_index.json."""

import hashlib
import json
from pathlib import Path

import pytest

from models.registry import load_model
from preview.__main__ import main
from refine.__main__ import main as refine_main
from tests.tiny_flux import save_tiny_flux
from tests.tiny_sd3 import save_tiny_sd3
from tests.tiny_sdxl import save_tiny_sdxl

SAVERS = {"sdxl": save_tiny_sdxl, "flux": save_tiny_flux, "sd3": save_tiny_sd3}
BACKENDS = {"sdxl": "StableDiffusionXLDenoiser", "flux": "FluxDenoiser", "sd3": "StableDiffusion3Denoiser"}


def run(capsys, folder: Path, out: Path, db: Path) -> list[dict]:
    code = main(["--model", str(folder), "--prompt", "a red cat", "--seeds", "0-3", "--steps", "4",
                 "--out", str(out), "--db", str(db)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines() if line.strip()]


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_preview_cli_prints_four_lines_and_repeats_exactly(family, tmp_path, capsys):
    folder = SAVERS[family](tmp_path / f"tiny-{family}")
    assert type(load_model(str(folder), device="cpu")).__name__ == BACKENDS[family]
    first = run(capsys, folder, tmp_path / "a", tmp_path / "a.sqlite")
    second = run(capsys, folder, tmp_path / "b", tmp_path / "b.sqlite")
    assert len(first) == 4 and [r["seed"] for r in first] == [0, 1, 2, 3]
    assert [digest(r["path"]) for r in first] == [digest(r["path"]) for r in second]
    assert len({digest(r["path"]) for r in first}) == 4  # different seeds, different images
    # refine the first preview (full-step dpm2m from the same noise) through the refine CLI
    code = refine_main(["--model", str(folder), "--preview-id", str(first[0]["preview_id"]), "--steps", "6",
                        "--out", str(tmp_path / "final"), "--db", str(tmp_path / "a.sqlite")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    final = json.loads(captured.out.strip().splitlines()[-1])
    assert final["seed"] == 0 and Path(final["path"]).is_file()
