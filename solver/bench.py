"""Cost of one ConsistencySolver scheduler step against one diffusers DDIM step, same run.

    python -m solver.bench [--device cpu|cuda] [--steps 8] [--reps 200]

Both schedulers run full K-step loops on a batch of 8 latents of 4x64x64 (float32) with a fixed
model output (no model), alternating run by run; the figure is the ratio of the median per-step
times. ConsistencySolver uses order 4 with a non-zero policy, so steady-state steps combine all
four past epsilons (the most expensive case).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from solver.policy import ConsistencyPolicy
from solver.scheduler import ConsistencySolverScheduler

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False}


def time_loop(scheduler, eps: torch.Tensor, x: torch.Tensor, num_steps: int, device: torch.device) -> float:
    """Seconds per step of one full sampling loop (set_timesteps excluded)."""
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = list(scheduler.timesteps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in timesteps:
        x = scheduler.step(eps, t, x).prev_sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / num_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    policy = ConsistencyPolicy(order=4)
    torch.nn.init.normal_(policy.net[-1].weight, std=0.05)  # all four coefficients in use
    consistency = ConsistencySolverScheduler(**SD_SCHEDULE, solver_order=4, policy=policy)
    ddim = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing", clip_sample=False)
    eps = torch.randn(8, 4, 64, 64, device=device)
    x = torch.randn(8, 4, 64, 64, device=device)

    for scheduler in (ddim, consistency):  # warm-up
        for _ in range(5):
            time_loop(scheduler, eps, x, args.steps, device)
    ddim_times, cs_times = [], []
    for _ in tqdm(range(args.reps), desc="bench"):
        ddim_times.append(time_loop(ddim, eps, x, args.steps, device))
        cs_times.append(time_loop(consistency, eps, x, args.steps, device))
    t_ddim, t_cs = statistics.median(ddim_times), statistics.median(cs_times)
    print(f"device={device} batch=8x4x64x64 float32 steps={args.steps} reps={args.reps} threads={torch.get_num_threads()}")
    print(f"DDIM step:             {t_ddim * 1e6:8.1f} us (median)")
    print(f"ConsistencySolver step:{t_cs * 1e6:8.1f} us (median, order 4)")
    print(f"ratio ConsistencySolver / DDIM = {t_cs / t_ddim:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
