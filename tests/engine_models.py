"""Tiny random-weight denoisers for the engine tests (no download, milliseconds per call)."""

from __future__ import annotations

import hashlib
import threading
from typing import Sequence

import pytest
import torch

from models.base import Conditioning, Denoiser
from solver.schedules import VPSchedule

_BUILD_LOCK = threading.Lock()
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


class TinyUNetDenoiser(Denoiser):
    """A pixel-space text-to-image denoiser: a tiny diffusers UNet2DConditionModel with random weights.

    The "text encoder" is a fixed random embedding of hashed words, padded to ``tokens`` positions,
    so an encoding never depends on the other prompts of a batch.
    """

    def __init__(self, size: int = 16, seed: int = 0, tokens: int = 8, dim: int = 32, delay: float = 0.0) -> None:
        with _BUILD_LOCK:  # the global RNG seeds the weights; workers may build models concurrently
            self._build(size, seed, tokens, dim, delay)

    def _build(self, size: int, seed: int, tokens: int, dim: int, delay: float) -> None:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        self.model_id = f"tiny-unet-{seed}"
        self.scheduler_config = dict(SCHEDULER_CONFIG)
        self.schedule = VPSchedule.from_config(self.scheduler_config)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.size_multiple = 4
        self.default_size = (size, size)
        self.max_size = 64
        self.default_guidance = 3.0
        self.tokens, self.dim, self.delay = tokens, dim, delay
        self.unet = UNet2DConditionModel(
            sample_size=size, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=dim, attention_head_dim=4, norm_num_groups=8,
        ).eval()
        # make the output depend visibly on the input (random init is close to zero at the output)
        with torch.no_grad():
            self.unet.conv_out.weight.mul_(20.0)
        self.table = torch.randn(512, dim)
        self.calls: list[int] = []  # batch size of each model call

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (3, height, width)

    def _embed(self, text: str) -> torch.Tensor:
        out = torch.zeros(self.tokens, self.dim)
        for i, word in enumerate(text.lower().split()[: self.tokens]):
            out[i] = self.table[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 512]
        return out

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str = "") -> Conditioning:
        negs = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        return Conditioning(
            cond=torch.stack([self._embed(p) for p in prompts]),
            uncond=torch.stack([self._embed(n) for n in negs]),
            prompts=list(prompts),
            negative_prompts=negs,
        )

    @torch.no_grad()
    def model_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        if self.delay:
            import time

            time.sleep(self.delay)
        return self.unet(x, t.to(torch.float32), context).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1).cpu()


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """One intra-op thread while an engine test runs: on these shared 2-core machines OpenMP spinning
    under contention makes a tiny model call 50x slower; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path):
    from store import open_store

    s = open_store(tmp_path / "engine.db")
    yield s
    s.close()


def row_counts(store) -> dict[str, int]:
    tables = ("noise", "generations", "previews", "refine_jobs", "finals", "consistency")
    return {t: store.query_one(f"SELECT count(*) AS n FROM {t}")["n"] for t in tables}
