"""The embedded model behind the Denoiser contract: tiny random weights (fast) and the shipped weights."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.embedded.config import SCHEDULER_CONFIG, UNET_CONFIG, WEIGHTS_DIR, WEIGHTS_FILE
from models.embedded.model import EmbeddedDenoiser
from models.embedded.network import PatchUNet
from models.embedded.text import TextEncoder

TINY = dict(UNET_CONFIG, block_out_channels=(32, 32, 32), norm_num_groups=8, attention_head_dim=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder()


@pytest.fixture(scope="module")
def tiny(text_encoder):
    torch.manual_seed(0)
    return EmbeddedDenoiser(PatchUNet(TINY), text_encoder, SCHEDULER_CONFIG)


def test_sizes(tiny):
    assert tiny.latent_shape(32, 32) == (3, 32, 32)
    for h, w in ((64, 64), (32, 64), (16, 16)):
        with pytest.raises(ValueError, match="height|width"):
            tiny.latent_shape(h, w)
    with pytest.raises(ValueError, match="height"):
        tiny.check_size(32.0, 32)  # type: ignore[arg-type]


def test_encode_prompts_shapes_masks_and_empty_prompt(tiny):
    c = tiny.encode_prompts(["a crimson disc on a navy field", ""], negative_prompts="")
    assert c.cond.shape == (2, 32, 384) and c.cond.dtype == torch.float32
    assert c.cond_mask.shape == (2, 32) and c.uncond_mask.shape == (2, 32)
    assert int(c.cond_mask[1].sum()) == 2  # "" = [CLS] [SEP]: the unconditional input
    torch.testing.assert_close(c.cond[1], c.uncond[0])
    assert c.prompts == ["a crimson disc on a navy field", ""] and c.negative_prompts == ["", ""]


def test_bad_prompts_and_overlong_prompt(tiny, caplog):
    with pytest.raises(ValueError, match="prompts"):
        tiny.encode_prompts("a red circle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        tiny.encode_prompts([])
    with pytest.raises(ValueError, match="negative_prompts"):
        tiny.encode_prompts(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="prompts must hold strings"):
        tiny.encode_prompts([None])  # type: ignore[list-item]
    long = "a red circle " + "and a blue square " * 20
    with caplog.at_level(logging.WARNING, logger="models.embedded.text"):
        c = tiny.encode_prompts([long])
    assert "truncated to 32" in caplog.text
    assert c.cond.shape == (1, 32, 384) and int(c.cond_mask.sum()) == 32


def test_guided_eps_and_decode(tiny):
    c = tiny.encode_prompts(["a red star on a blue background", "a green ring"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eps = tiny.guided_eps(x, 500, c, 3.0)
    assert eps.shape == (2, 3, 32, 32) and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    alpha, sigma = (v.item() for v in tiny.schedule.alpha_sigma(500))
    assert tiny.schedule.prediction_type == "v_prediction"
    eps_c = sigma * x + alpha * tiny.model_output(x, torch.tensor(500), c.cond, c.cond_mask)  # eps = sigma x + alpha v
    eps_u = sigma * x + alpha * tiny.model_output(x, torch.tensor(500), c.uncond, c.uncond_mask)
    torch.testing.assert_close(eps, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny.guided_eps(x, 500, c, 1.0), eps_c)
    # padding never leaks: the same prompt alone or next to a longer one gives the same output
    alone = tiny.encode_prompts(["a green ring"])
    torch.testing.assert_close(tiny.guided_eps(x[1:], 500, alone, 1.0), eps_c[1:], rtol=1e-4, atol=1e-4)
    img = tiny.decode(torch.tensor([[[[-1.5, -1.0], [0.0, 1.0]]]]).expand(1, 3, 2, 2))
    assert img.dtype == torch.float32 and img.min() == 0.0 and img.max() == 1.0 and img[0, 0, 1, 0] == 0.5
    with pytest.raises(ValueError, match="x must have shape"):
        tiny.model_output(torch.zeros(1, 3, 64, 64), torch.tensor(1), c.cond[:1], c.cond_mask[:1])


def test_schedule_matches_config(tiny):
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    torch.testing.assert_close(tiny.schedule.alphas_cumprod, ddpm.alphas_cumprod.double())
    assert tiny.schedule.final_alpha_cumprod == 1.0  # set_alpha_to_one: DDIM ends on the data


def test_training_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from models.embedded.train import main

    common = ["--bank", "24", "--batch", "4", "--cache-dir", str(tmp_path / "cache"), "--ckpt-every", "2",
              "--unet-config", json.dumps({"block_out_channels": [32, 32, 32], "norm_num_groups": 8, "attention_head_dim": 2})]
    main(["--steps", "4", "--out", str(tmp_path / "a"), "--ckpt", str(tmp_path / "ca")] + common)
    main(["--steps", "2", "--out", str(tmp_path / "b0"), "--ckpt", str(tmp_path / "cb")] + common)
    main(["--steps", "4", "--out", str(tmp_path / "b"), "--ckpt", str(tmp_path / "cb")] + common)  # resumes at 2
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_FILE)), load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    b0 = load_file(str(tmp_path / "b0" / WEIGHTS_FILE))
    assert any(not torch.equal(a[k], b0[k]) for k in a)  # the two extra steps changed the weights


def test_bank_does_not_depend_on_worker_count(monkeypatch):
    import models.embedded.train as train

    monkeypatch.setattr(train, "BANK_CHUNK", 6)  # 14 scenes = chunks of 6, 6, 2
    one, two = train.build_bank(14, seed=3, workers=1), train.build_bank(14, seed=3, workers=2)
    for key in ("images", "states", "masks", "flip_ok"):
        assert torch.equal(one[key], two[key]), key
    images = np.concatenate([train.render_chunk(3, i, n)[0] for i, n in enumerate((6, 6, 2))])
    assert torch.equal(one["images"], torch.from_numpy(images).permute(0, 3, 1, 2))
    assert not torch.equal(one["images"][:6], one["images"][6:12])  # each chunk has its own generator


def test_minutes_budget_replaces_steps(tmp_path):
    import time

    from models.embedded.train import main

    t0 = time.time()
    main(["--steps", "100000", "--minutes", "0.02", "--bank", "24", "--batch", "2", "--workers", "1",
          "--out", str(tmp_path / "w"),
          "--unet-config", json.dumps({"block_out_channels": [32, 32, 32], "norm_num_groups": 8, "attention_head_dim": 2})])
    steps = json.loads((tmp_path / "w" / "config.json").read_text())["training"]["steps"]
    assert 1 <= steps < 1000  # the budget (1.2 s of training), not --steps, decided the count
    assert time.time() - t0 < 120


@pytest.mark.skipif(not os.path.exists(os.path.join(WEIGHTS_DIR, WEIGHTS_FILE)), reason="weights not trained yet")
def test_shipped_weights_load_offline():
    size = os.path.getsize(os.path.join(WEIGHTS_DIR, WEIGHTS_FILE))
    assert size <= 30 * 2**20
    code = (
        "import torch\n"
        "from models.embedded import load_embedded\n"
        "d = load_embedded()\n"
        "c = d.encode_prompts(['a yellow star on a purple background', ''])\n"
        "x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))\n"
        "e1 = d.guided_eps(x, 999, c, d.default_guidance); e2 = d.guided_eps(x, 999, c, d.default_guidance)\n"
        "assert e1.dtype == torch.float32 and e1.shape == (2, 3, 32, 32) and torch.equal(e1, e2)\n"
        "assert d.device.type == 'cpu' and next(d.network.parameters()).dtype == torch.float32\n"
        "print('ok', float(e1.std()))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME="/nonexistent-hf-home")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    std = float(r.stdout.split()[-1])
    assert 0.5 < std < 1.5  # at t = 999 the trained model predicts unit-variance noise
