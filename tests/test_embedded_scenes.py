"""The embedded model's data: renderer, captions, prompt parser, held-out split, scene analyzer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from models.embedded.analyzer import analyze, judge
from models.embedded.captions import (
    HELDOUT_COMBOS,
    HELDOUT_PROMPTS_FILE,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    caption,
    heldout_scenes,
)
from models.embedded.parse import parse_prompt
from models.embedded.scenes import COLOURS, SHAPES, Scene, SceneObject, render, sample_scene


def test_render_is_deterministic_and_antialiased():
    a = [render(sample_scene(np.random.default_rng(7))) for _ in range(2)]
    assert a[0].dtype == np.uint8 and a[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(a[0], a[1])
    scene = Scene("blue", (SceneObject("circle", "yellow", 0.6, 0.5, 0.5),))
    img = render(scene)
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(colours) > 2  # edge pixels are mixtures: supersampled, not aliased
    assert tuple(img[16, 16]) == (245, 225, 40) and tuple(img[0, 0]) == (30, 55, 200)


def test_main_object_is_largest():
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = sample_scene(rng)
        assert all(o.extent <= s.main.extent + 1e-9 for o in s.objects)
        assert s.main.colour != s.background


def test_captions_parse_back():
    rng = np.random.default_rng(11)
    for _ in range(500):
        s = sample_scene(rng)
        p = parse_prompt(caption(s, rng, TRAIN_TEMPLATES + HELDOUT_TEMPLATES))
        assert (p.main_colour, p.main_shape, p.background, p.count) == (s.main.colour, s.main.shape, s.background, s.count)
    p = parse_prompt("a crimson disc on a navy field")
    assert (p.main_colour, p.main_shape, p.background) == ("red", "circle", "blue")
    p = parse_prompt("two small yellow squares at the top")
    assert (p.main_colour, p.main_shape, p.background, p.count) == ("yellow", "square", None, 2)


def test_heldout_split_is_disjoint_from_training():
    assert 0.05 < len(HELDOUT_COMBOS) / (len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES)) < 0.15
    rng = np.random.default_rng(0)
    for _ in range(2000):
        s = sample_scene(rng, exclude=set(HELDOUT_COMBOS))
        assert (s.main.colour, s.main.shape, s.background) not in HELDOUT_COMBOS
    path = os.path.join(os.path.dirname(__file__), "..", "models", "embedded", HELDOUT_PROMPTS_FILE)
    with open(path) as f:
        committed = [line.strip() for line in f if line.strip()]
    generated = heldout_scenes()
    assert committed == [c for _, c in generated]  # the committed file is the generator's output
    assert len(set(committed)) >= 200
    for scene, text in generated:
        assert (scene.main.colour, scene.main.shape, scene.background) in HELDOUT_COMBOS


@pytest.mark.parametrize("source", ["random", "heldout"])
def test_analyzer_reads_rendered_scenes(source):
    if source == "random":
        rng = np.random.default_rng(123)
        scenes = [sample_scene(rng) for _ in range(200)]
    else:
        scenes = [s for s, _ in heldout_scenes()][:120]
    correct = 0
    for s in scenes:
        r = analyze(render(s))
        correct += (r.main_colour, r.main_shape, r.background) == (s.main.colour, s.main.shape, s.background)
    assert correct / len(scenes) >= 0.98


def test_judge_accepts_the_right_prompt_and_rejects_swaps():
    img = render(Scene("blue", (SceneObject("star", "red", 0.62, 0.5, 0.5),)))
    assert judge(img, "a crimson star on a navy field").ok
    swapped = judge(img, "a blue star on a red background")
    assert not swapped.ok and len(swapped.mismatches) == 2
    assert not judge(img, "a red circle on a blue background").ok
    # float (3, H, W) images in [0, 1] (what Denoiser.decode returns) read the same
    assert judge(img.transpose(2, 0, 1) / 255.0, "a red star on a blue background").ok
