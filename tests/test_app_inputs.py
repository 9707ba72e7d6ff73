"""Parsing of the Explore fields: what is accepted, and one error naming the field for the rest."""

from __future__ import annotations

import math

import pytest

from webui.inputs import (  # noqa: E402
    MAX_SEEDS,
    MAX_TILES,
    SEED_MAX,
    FieldError,
    dice_seed,
    parse_explore,
    parse_int,
    parse_seed_list,
    parse_seeds,
)

GOOD = dict(prompts="a\nb", negative="", seed_count=8.0, seed_start=5.0, seed_list="", steps=4.0, solver="ddim",
            guidance=4.0, width=32.0, height=32.0, refine_steps=40.0)


def parse(**changes):
    return parse_explore(**{**GOOD, **changes}, solvers=["consistency", "ddim"], max_size=64)


def test_good_fields_become_typed_settings():
    s = parse(prompts="  a red circle \n\n a blue square  \n", negative=" blurry ")
    assert s.prompts == ["a red circle", "a blue square"] and s.negative_prompt == "blurry"
    assert s.seeds == list(range(5, 13)) and (s.steps, s.width, s.height, s.refine_steps) == (4, 32, 32, 40)
    assert all(type(v) is int for v in (s.steps, s.width, s.height, s.refine_steps, *s.seeds))
    assert parse(seed_list="3, 17, 100-103").seeds == [3, 17, 100, 101, 102, 103]  # the list wins over count/start
    assert parse(seed_start=SEED_MAX, seed_count=1).seeds == [SEED_MAX]


@pytest.mark.parametrize("changes, field", [
    (dict(prompts=""), "Prompts"),
    (dict(prompts=None), "Prompts"),
    (dict(prompts="\n".join("p" * 17)), "Prompts"),
    (dict(negative="a\nb"), "Negative prompt"),
    (dict(seed_count=0), "Seed count"),
    (dict(seed_count=MAX_SEEDS + 1), "Seed count"),
    (dict(seed_count=2.5), "Seed count"),
    (dict(seed_count=True), "Seed count"),
    (dict(seed_start=-1), "Seed start"),
    (dict(seed_start=SEED_MAX, seed_count=2), "Seed start"),
    (dict(seed_start=math.nan), "Seed start"),
    (dict(seed_list="1,1"), "Seed list"),
    (dict(seed_list="7-2"), "Seed list"),
    (dict(seed_list="0-99999999999"), "Seed list"),
    (dict(seed_list="1; 2"), "Seed list"),
    (dict(steps=0), "Preview steps"),
    (dict(steps=51), "Preview steps"),
    (dict(solver="consistency:/etc"), "Solver"),
    (dict(solver=None), "Solver"),
    (dict(guidance=math.nan), "Guidance"),
    (dict(guidance=math.inf), "Guidance"),
    (dict(guidance=-0.5), "Guidance"),
    (dict(guidance="lots"), "Guidance"),
    (dict(width=65), "Width"),
    (dict(height=None), "Height"),
    (dict(refine_steps=201), "Refine steps"),
    (dict(prompts="\n".join(f"p{i}" for i in range(16)), seed_count=64), "Prompts"),  # 1024 tiles > MAX_TILES
])
def test_each_bad_field_is_named(changes, field):
    with pytest.raises(FieldError) as err:
        parse(**changes)
    assert err.value.field == field and str(err.value).startswith(field + ":")


def test_helpers():
    assert MAX_TILES >= MAX_SEEDS
    assert parse_int("12", "X", 1, 20) == 12 and parse_int(3.0, "X", 1, 20) == 3
    with pytest.raises(FieldError, match="X"):
        parse_int("1e3", "X", 1, 2000)
    assert parse_seed_list("3,4", "Steps", limit=50) == [3, 4]
    with pytest.raises(FieldError, match="^Steps: "):
        parse_seed_list("3,3", "Steps")
    assert parse_seeds("", 2, 9) == [9, 10]
    assert all(0 <= dice_seed() <= SEED_MAX for _ in range(20))


def test_an_editing_model_takes_instructions_an_uploaded_image_and_an_optional_size(tmp_path):
    upload = tmp_path / "gradio" / "abc" / "in.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"checked by the engine, not here")
    record = {"path": str(upload), "orig_name": "in.png", "meta": {"_type": "gradio.FileData"}}
    s = parse(image=record, width=None, height="", edits=True, upload_root=tmp_path / "gradio")
    assert (s.image, s.width, s.height, s.keep_image_size) == (str(upload), None, None, False)
    assert parse(image=record, width=0.0, height=0, edits=True).width is None  # a Gradio Number shows empty as 0
    assert parse(edits=True, height="0").height is None
    kept = parse(image=record, keep_image_size=True, edits=True, upload_root=tmp_path / "gradio")
    assert (kept.width, kept.height, kept.keep_image_size) == (None, None, True)  # the input's own size
    assert parse(edits=True).image is None  # whether an image is required is the engine's rule
    with pytest.raises(FieldError, match="^Instructions: enter at least one instruction"):
        parse(prompts=" ", edits=True)
    with pytest.raises(FieldError, match="^Width"):
        parse(width=None)  # a text-to-image model has no input image to take a size from


@pytest.mark.parametrize("value, message", [
    ({"path": "/etc/passwd"}, "upload the image through the app"),
    ({"path": "UPLOAD/../../elsewhere.png"}, "upload the image through the app"),
    ({"url": "data:image/png;base64,AAAA"}, "upload an image file"),
    ("in.png", "upload an image file"),
    (7, "upload an image file"),
])
def test_an_image_field_is_only_a_file_gradio_received(tmp_path, value, message):
    """Only a file in Gradio's upload folder is read as an input image: never any other file on the server."""
    root = tmp_path / "gradio"
    root.mkdir()
    if isinstance(value, dict) and "path" in value:
        value = {"path": value["path"].replace("UPLOAD", str(root))}
    with pytest.raises(FieldError, match=f"^image: {message}"):
        parse(image=value, edits=True, upload_root=root)
    with pytest.raises(FieldError, match="^Keep input size: must be true or false"):
        parse(keep_image_size="yes", edits=True)
