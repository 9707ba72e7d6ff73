"""The adherence CLI: bad input is refused before the model loads; a run scores what it renders."""

import json

import pytest

from training.adherence import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("argv, field", [(["--grammar", "other"], "grammar"), (["--per-category", "0"], "per_category"),
                                         (["--steps", "0"], "steps"), (["--seeds", "x"], "seeds")])
def test_bad_input_names_the_field(argv, field, monkeypatch):
    import models.registry

    monkeypatch.setattr(models.registry, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(ValueError, match=field):
        main(argv)


def test_prompt_rows_count_the_seeds_a_prompt_is_drawn_right(tmp_path, monkeypatch):
    import models.embedded.adherence as checks

    calls = []

    def scorer(image, prompt):  # every pair after the first is wrong, each named by its call number
        calls.append((tuple(image.shape), prompt))
        return () if len(calls) == 1 else (f"main_shape: call {len(calls)}",)

    monkeypatch.setattr(checks, "adherence_mismatches", scorer)
    out = tmp_path / "rows.json"
    main(["--prompt", "a red circle on a blue background", "--prompt", "a crimson disc on a navy field",
          "--seeds", "4,9", "--steps", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert [(r["prompt"], r["right"], r["seeds"]) for r in doc["rows"]] == [
        ("a red circle on a blue background", 1, 2), ("a crimson disc on a navy field", 0, 2)]
    assert doc["rows"][0]["wrong"] == {"9": ["main_shape: call 2"]}
    assert doc["rows"][1]["wrong"] == {"4": ["main_shape: call 3"], "9": ["main_shape: call 4"]}
    assert [p for _, p in calls] == ["a red circle on a blue background"] * 2 + ["a crimson disc on a navy field"] * 2
    assert all(shape == (3, 32, 32) for shape, _ in calls)
    assert doc["command"].startswith("python -m training.adherence --prompt")
