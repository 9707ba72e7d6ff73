"""Adherence by prompt category: the prompts are of their category, and the position and count checks
pass on the rendered scene and fail on a scene that shows another position or count."""

import pytest

from models.embedded.adherence import (CATEGORIES, adherence_mismatches, category_prompts, layout_mismatches,
                                       parse_position, position_ok)
from models.embedded.parse import parse_prompt
from models.embedded.scenes import Scene, SceneObject, render


@pytest.mark.parametrize("category", CATEGORIES, ids=lambda c: c.name)
def test_category_prompts_are_of_their_category_and_deterministic(category):
    items = category_prompts(category, 12, seed=3)
    assert items == category_prompts(category, 12, seed=3) and len({t for t, _ in items}) == 12
    for text, scene in items:
        parsed = parse_prompt(text)
        assert (parsed.background is not None) == category.background, text
        assert (parse_position(text) is not None) == category.position, text
        assert (parsed.count > 1) == category.count, text
        assert (scene is not None) == category.in_grammar, text


@pytest.mark.parametrize("category", [c for c in CATEGORIES if c.in_grammar], ids=lambda c: c.name)
def test_checks_pass_on_most_rendered_scenes(category):
    items = category_prompts(category, 40, seed=5)
    right = sum(not adherence_mismatches(render(scene), text) for text, scene in items)
    assert right >= 36  # touching copies of a count can merge into one region; the rest must read right


def _one(shape="square", colour="yellow", cx=0.5, cy=0.5, extent=0.3):
    return SceneObject(shape, colour, extent, cx, cy)


def test_position_check_fails_on_the_wrong_position():
    top = render(Scene("blue", (_one(cy=0.25),)))
    bottom = render(Scene("blue", (_one(cy=0.75),)))
    prompt = "a yellow square at the top on a blue background"
    assert layout_mismatches(top, prompt) == ()
    assert layout_mismatches(bottom, prompt) and layout_mismatches(bottom, prompt)[0].startswith("position")
    assert layout_mismatches(bottom, "a yellow square at the bottom on a blue background") == ()


def test_count_check_fails_on_the_wrong_count():
    two = render(Scene("blue", (_one(cx=0.25), _one(cx=0.75)), count=2))
    one = render(Scene("blue", (_one(cx=0.25),)))
    prompt = "two yellow squares on a blue background"
    assert layout_mismatches(two, prompt) == ()
    assert layout_mismatches(one, prompt) == ("count: expected 2, found 1",)
    assert layout_mismatches(two, "three yellow squares on a blue background") == ("count: expected 3, found 2",)


def test_a_flat_field_fails_a_prompt_without_background():
    flat = render(Scene("yellow", (_one(colour="yellow"),)))  # the object is invisible on its own colour
    assert adherence_mismatches(flat, "two small yellow squares at the top")


def test_position_words():
    assert parse_position("a red box in the top left corner, navy wall") == "top left"
    assert parse_position("a red box at the top on a navy wall") == "top"
    assert parse_position("a red box on a navy wall") is None
    assert position_ok("top left", 0.3, 0.3) and not position_ok("top left", 0.7, 0.3)
    assert position_ok("centre", 0.5, 0.55) and not position_ok("centre", 0.3, 0.5)


def test_unknown_grammar_is_refused():
    with pytest.raises(ValueError, match="grammar"):
        category_prompts(CATEGORIES[0], 1, grammar="other")

