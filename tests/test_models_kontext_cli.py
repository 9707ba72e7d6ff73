"""``python -m preview --model <tiny Kontext folder> --image x.png --prompt ... --seeds 0-3 --steps 4``: 4 JSON lines,
a rerun gives identical PNGs, the store holds the input image once; ``python -m refine`` refines an edit from the
same stored image and noise; bad input is refused naming ``image`` with nothing written."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preview.__main__ import main
from refine.__main__ import main as refine_main
from store import open_store
from store.png import read_png_parameters
from tests.tiny_flux import save_tiny_flux, save_tiny_kontext

INSTRUCTION = "make the sky purple"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_kontext(tmp_path_factory.mktemp("kontext-cli") / "tiny-kontext")


@pytest.fixture()
def picture(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray((np.random.RandomState(7).rand(32, 32, 3) * 255).astype("uint8")).save(path)
    return path


def run(capsys, argv: list[str]) -> tuple[int, list[dict], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.strip()], captured.err


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def edit_argv(folder: Path, image: Path, out: Path, db: Path, seeds: str = "0-3") -> list[str]:
    return ["--model", str(folder), "--image", str(image), "--keep-image-size", "--prompt", INSTRUCTION,
            "--seeds", seeds, "--steps", "4", "--out", str(out), "--db", str(db)]


def test_edit_previews_repeat_exactly_and_store_the_image_once(folder, picture, tmp_path, capsys):
    db = tmp_path / "a.sqlite"
    code, first, err = run(capsys, edit_argv(folder, picture, tmp_path / "a", db))
    assert code == 0, err
    code, again, err = run(capsys, edit_argv(folder, picture, tmp_path / "b", db))  # same store: image reused
    assert code == 0, err
    code, other, err = run(capsys, edit_argv(folder, picture, tmp_path / "c", tmp_path / "c.sqlite"))
    assert code == 0, err
    assert len(first) == 4 and [r["seed"] for r in first] == [0, 1, 2, 3] and first[0]["size"] == [32, 32]
    assert [digest(r["path"]) for r in first] == [digest(r["path"]) for r in again] == [digest(r["path"]) for r in other]
    assert len({digest(r["path"]) for r in first}) == 4
    assert len({r["input_image_id"] for r in first + again}) == 1
    code, alone, err = run(capsys, edit_argv(folder, picture, tmp_path / "d", db, seeds="2"))  # a grid of one
    assert code == 0, err
    assert digest(alone[0]["path"]) == digest(first[2]["path"])
    with open_store(db) as store:
        assert store.count_input_images() == 1
        stored = store.get_input_image(first[0]["input_image_id"])
        assert np.array_equal(np.asarray(stored.image()), np.asarray(Image.open(picture).convert("RGB")))
        params = read_png_parameters(Path(first[0]["path"]).read_bytes())
        assert params["Input image"] == stored.sha256
    # refine one edit: the same stored image and noise; its final carries the same input image hash
    code = refine_main(["--model", str(folder), "--preview-id", str(first[1]["preview_id"]), "--steps", "6",
                        "--out", str(tmp_path / "final"), "--db", str(db)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    final = json.loads(captured.out.strip().splitlines()[-1])
    assert final["seed"] == 1 and final["input_image_id"] == first[1]["input_image_id"]
    assert read_png_parameters(Path(final["path"]).read_bytes())["Input image"] == stored.sha256


def test_the_input_image_changes_the_edit(folder, picture, tmp_path, capsys):
    other = tmp_path / "other.png"
    Image.fromarray((np.random.RandomState(8).rand(32, 32, 3) * 255).astype("uint8")).save(other)
    _, a, _ = run(capsys, edit_argv(folder, picture, tmp_path / "a", tmp_path / "a.sqlite", "0"))
    _, b, _ = run(capsys, edit_argv(folder, other, tmp_path / "b", tmp_path / "b.sqlite", "0"))
    assert digest(a[0]["path"]) != digest(b[0]["path"])


def refused(capsys, argv: list[str], db: Path) -> str:
    code, lines, err = run(capsys, argv)
    assert code == 2 and lines == [], err
    if db.exists():
        with open_store(db) as store:
            assert store.count_input_images() == 0
            assert store.query_one("SELECT COUNT(*) AS n FROM generations")["n"] == 0
            assert store.query_one("SELECT COUNT(*) AS n FROM noise")["n"] == 0
    return err


def test_bad_input_names_the_image_and_writes_nothing(folder, picture, tmp_path, capsys):
    db = tmp_path / "bad.sqlite"
    base = ["--prompt", INSTRUCTION, "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "o"), "--db", str(db)]
    err = refused(capsys, ["--model", str(folder)] + base, db)
    assert "image: " in err and "editing model" in err
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert "image: not a readable image" in refused(capsys, ["--model", str(folder), "--image", str(not_image)] + base, db)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32)).save(cmyk)
    assert "image: mode CMYK is refused" in refused(capsys, ["--model", str(folder), "--image", str(cmyk)] + base, db)
    flux = save_tiny_flux(tmp_path / "tiny-flux")
    err = refused(capsys, ["--model", str(flux), "--image", str(picture)] + base, db)
    assert "image: " in err and "takes no input image" in err
