"""A tiny analytic denoiser for the training tests: prompt-dependent Gaussian data, exact epsilon.

Data for prompt c: x0 ~ N(mu_c, s^2 I) with mu_c a coloured square whose colour and place come from
the prompt's hash. For Gaussian data the exact eps is sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2),
so few-step solvers have real, learnable truncation error while every call costs microseconds.
"""

from __future__ import annotations

import hashlib

import torch

from models.base import Conditioning, Denoiser
from solver.schedules import VPSchedule

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "clip_sample": False,
}


class GaussianDenoiser(Denoiser):
    size_multiple = 4
    default_size = (12, 12)
    default_guidance = 2.0

    def __init__(self, model_id: str = "fake-gaussian", s: float = 0.3):
        self.model_id = model_id
        self.scheduler_config = dict(SCHEDULER_CONFIG)
        self.schedule = VPSchedule.from_config(self.scheduler_config)
        self.device, self.dtype, self.s = torch.device("cpu"), torch.float32, s
        self.calls = 0

    def latent_shape(self, height, width):
        return (3, height, width)

    def _mu(self, prompt: str, h: int = 12, w: int = 12) -> torch.Tensor:
        if not prompt:
            return torch.zeros(3, h, w)
        d = hashlib.sha256(prompt.encode()).digest()
        mu = torch.tensor([d[0], d[1], d[2]], dtype=torch.float32).view(3, 1, 1).expand(3, h, w) / 128 - 1
        mu = mu.clone()
        r, c = d[3] % (h // 2), d[4] % (w // 2)
        mu[:, r : r + h // 2, c : c + w // 2] = torch.tensor([d[5], d[6], d[7]], dtype=torch.float32).view(3, 1, 1) / 128 - 1
        return mu

    def encode_prompts(self, prompts, negative_prompts=""):
        negs = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        cond = torch.stack([self._mu(p).flatten() for p in prompts]).unsqueeze(1)
        uncond = torch.stack([self._mu(n).flatten() for n in negs]).unsqueeze(1)
        return Conditioning(cond=cond, uncond=uncond, prompts=list(prompts), negative_prompts=negs)

    def model_output(self, x, t, context, mask):
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t).round().long())
        view = (-1, 1, 1, 1)
        alpha = alpha.float().reshape(-1).view(view) if alpha.ndim else alpha.float()
        sigma = sigma.float().reshape(-1).view(view) if sigma.ndim else sigma.float()
        mu = context.view(x.shape)
        return sigma * (x - alpha * mu) / (alpha**2 * self.s**2 + sigma**2)

    def decode(self, latents):
        return ((latents.float() + 1) / 2).clamp(0, 1).cpu()


def write_prompts(path, n: int = 4):
    path.write_text("\n".join(f"a test scene number {i}" for i in range(n)) + "\n")
    return path
