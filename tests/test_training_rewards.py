"""Similarity rewards: closed-form values of the pixel measures, the model-based measures on tiny
random-config models saved to a temporary folder, and clear errors for missing weights."""

import pytest
import torch

from training.rewards import (
    DepthSimilarity,
    RewardWeightsMissing,
    get_similarity,
    gms,
    gradient_mse,
    h1_psnr,
    ms_ssim,
    psnr,
    ssim,
)


def _images(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, 3, size, size)
    for i in range(b):  # a coloured square on a coloured background
        x[i] = torch.rand(3, 1, 1, generator=g)
        lo = int(torch.randint(2, size // 2, (1,), generator=g))
        x[i, :, lo : lo + size // 3, lo : lo + size // 3] = torch.rand(3, 1, 1, generator=g)
    return x


def _blur(x):
    k = torch.ones(3, 1, 3, 3) / 9
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)


def test_psnr_closed_form_and_identity():
    x = _images()
    assert torch.allclose(psnr(x, (x + 0.1)), torch.full((4,), 20.0), atol=1e-3)
    assert torch.allclose(psnr(x, x), torch.full((4,), 100.0))


def test_structure_measures_see_edges_not_flat_colour():
    x = _images()
    for fn in (ssim, ms_ssim, gms):
        assert torch.allclose(fn(x, x), torch.ones(4), atol=5e-4), fn.__name__
        assert (fn(x, _blur(x)) < 0.99).all(), fn.__name__
    shifted = (x + 0.05).clamp(0, 1)
    assert torch.allclose(gms(x, (x + 0.05)), torch.ones(4), atol=1e-6)  # a flat colour shift keeps every edge
    assert (psnr(x, shifted) < 30).all()


def test_h1_psnr_adds_the_gradient_error_to_psnr():
    x = _images()
    # a constant shift has no gradient error: H1 PSNR equals PSNR
    assert torch.allclose(h1_psnr(x, x + 0.1), psnr(x, x + 0.1), atol=1e-4)
    # a blur moves edges: H1 PSNR is strictly below PSNR
    assert (h1_psnr(x, _blur(x)) < psnr(x, _blur(x)) - 0.5).all()
    # its gradient term, in closed form: a unit step edge of one column, moved by one pixel
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    moved = torch.roll(step, 1, dims=-1)
    moved[..., 0] = 0.0
    # Sobel /8 of a unit step is 1/2 on the two columns either side of it (every row, replicate padding):
    # moved one column, the two overlap on one, which leaves 2 columns of |1/2| error in x and none in y
    torch.testing.assert_close(gradient_mse(step, moved), torch.tensor([2 * 8 * 0.25 / 64]))
    torch.testing.assert_close(gradient_mse(step, step + 0.3), torch.zeros(1))


def test_weighted_sum_and_group_features():
    x, y = _images(seed=1), _blur(_images(seed=1))
    sim = get_similarity("psnr + 10*gms")
    assert torch.allclose(sim(x, y), psnr(x, y) + 10 * gms(x, y), atol=1e-4)
    # one target featurised once, expanded to its previews, gives the same scores as pairs
    ft = sim.features(x[:1])
    scores = sim.compare(sim.select(ft, torch.zeros(4, dtype=torch.long)), sim.features(y))
    assert torch.allclose(scores, sim(x[:1].expand(4, -1, -1, -1), y), atol=1e-4)
    for bad in ("", "psnr+", "psnr*2", "lpips", "0*psnr"):
        with pytest.raises(ValueError, match="reward"):
            get_similarity(bad)


# --- model-based measures on tiny random-config models ------------------------------------------
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        Dinov2Model,
        DPTImageProcessor,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("reward_models")
    vit = dict(image_size=28, patch_size=7, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    size = {"height": 28, "width": 28}
    models = {
        "depth": (
            DepthAnythingForDepthEstimation(DepthAnythingConfig(
                backbone_config=Dinov2Config(num_hidden_layers=2, out_features=["stage1", "stage2"],
                                             reshape_hidden_states=False, **vit),
                reassemble_hidden_size=16, neck_hidden_sizes=[8, 8], fusion_hidden_size=8, head_hidden_size=8,
                reassemble_factors=[1.0, 0.5], patch_size=7)),
            DPTImageProcessor(size=size),
        ),
        "dino": (Dinov2Model(Dinov2Config(num_hidden_layers=1, **vit)), BitImageProcessor(size=size, crop_size=size)),
        "clip": (
            CLIPModel(CLIPConfig(
                text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                vision_config=dict(num_hidden_layers=1, **vit), projection_dim=8)),
            CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=size),
        ),
        "segformer": (
            SegformerForSemanticSegmentation(SegformerConfig(
                num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                decoder_hidden_size=16, num_labels=5, patch_sizes=[7, 3], strides=[4, 2])),
            SegformerImageProcessor(size=size),
        ),
    }
    paths = {}
    for name, (model, processor) in models.items():
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        processor.save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("name,perfect", [("depth", 100.0), ("depth_aligned", 100.0), ("dino", 100.0),
                                          ("clip", 100.0), ("segformer", 100.0)])
def test_model_measures_load_by_path_and_score(tiny_weights, name, perfect):
    path = tiny_weights["depth" if name.startswith("depth") else name]
    sim = get_similarity(name, weights={name: path})
    x = _images(b=3)
    same = sim(x, x)
    assert same.shape == (3,) and torch.allclose(same, torch.full((3,), perfect), atol=1e-3)
    # a measure stuck at its maximum fails here: noise scores strictly below perfect, and below a blur
    other = sim(x, torch.rand(x.shape, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(other).all() and (other < perfect - 0.1).all(), other
    assert (sim(x, _blur(x)) > other).all()


def test_depth_alignment_removes_scale_and_shift(tiny_weights):
    plain = get_similarity("depth", weights={"depth": tiny_weights["depth"]})
    aligned = get_similarity("depth_aligned", weights={"depth_aligned": tiny_weights["depth"]})
    assert isinstance(aligned, DepthSimilarity) and aligned.aligned
    t = torch.rand(2, 64)
    p = 0.5 * t + 0.2  # the same relative depth up to scale and shift
    assert (aligned.compare(t, p) > 90).all()
    assert (plain.compare(t, p) < 20).all()


def test_missing_weights_fail_clearly_before_compute(tmp_path, monkeypatch):
    with pytest.raises(RewardWeightsMissing, match="depth.*no model weights"):
        get_similarity("depth", weights={"depth": str(tmp_path / "nowhere")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RewardWeightsMissing, match="not in the local Hugging Face cache"):
        get_similarity("dino")


def _scene(shape="diamond", background="blue", colour="red"):
    from models.embedded.scenes import Scene, SceneObject, render

    objects = () if shape is None else (SceneObject(shape, colour, 0.6, 0.5, 0.5),)
    return torch.from_numpy(render(Scene(background, objects)).copy()).permute(2, 0, 1).float()[None] / 255


def test_readings_reward_scores_each_analyzer_field_and_the_margin_for_the_targets_shape():
    """``readings`` is the mean of +-1 for the main colour and the background and the preview's clipped margin for
    the shape read in the *target*: one wrong field costs 2/3, and a preview drifting toward another shape scores
    less before its reading flips."""
    from models.embedded.analyzer import read_scene
    from models.embedded.scenes import SHAPES

    sim = get_similarity("readings")
    diamond = _scene("diamond")
    assert sim(diamond, diamond).item() == 1.0
    assert sim(diamond, _scene("diamond", background="green")).item() == pytest.approx(1 / 3)
    assert sim(diamond, _scene("circle")).item() == pytest.approx(1 / 3)  # shape term -1: it reads a circle
    assert sim(diamond, _scene(None)).item() == pytest.approx(-1 / 3)  # no object: colour and shape both wrong
    assert sim(_scene(None), _scene(None)).item() == 1.0
    # a preview between a diamond and a circle: still read as a diamond, but by a margin under tau
    between = 0.8 * diamond + 0.2 * _scene("circle")
    reading, ious = read_scene(between[0])
    assert reading.main_shape == "diamond"
    d = SHAPES.index("diamond")
    margin = (ious[d] - max(v for i, v in enumerate(ious) if i != d)) / 0.05
    assert 0 < margin < 1
    assert sim(diamond, between).item() == pytest.approx((2 + margin) / 3, abs=1e-6)
    # the margin is for the target's shape: against a circle target the same preview's shape term is negative
    c = SHAPES.index("circle")
    against_circle = max(-1.0, (ious[c] - max(v for i, v in enumerate(ious) if i != c)) / 0.05)
    assert against_circle < 0
    assert sim(_scene("circle"), between).item() == pytest.approx((2 + against_circle) / 3, abs=1e-6)
    # as a PPO reward: one target's features expand to its group's previews (training.ppo.PPOTrainer.score)
    both = get_similarity("h1_psnr+3*readings")
    targets = torch.cat([diamond, _scene("circle")])
    feats = both.select(both.features(targets), torch.tensor([0, 0, 1]))
    previews = torch.cat([diamond, between, between])
    expected = h1_psnr(targets[[0, 0, 1]], previews) + 3 * sim(targets[[0, 0, 1]], previews)
    assert torch.allclose(both.compare(feats, both.features(previews)), expected)


def test_readings_reward_is_refused_for_a_model_the_analyzer_cannot_read():
    from training.rewards import check_reward_for_model

    check_reward_for_model("h1_psnr+3*readings", "embedded")
    check_reward_for_model("psnr+10*gms", "stable-diffusion-v1-5")
    with pytest.raises(ValueError, match="reward: readings .* 'stable-diffusion-v1-5' is not the embedded model"):
        check_reward_for_model("h1_psnr+3*readings", "stable-diffusion-v1-5")
