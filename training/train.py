"""Command line of the PPO trainer: ``python -m training.train --dataset DIR [--out DIR] [options]``.

Every option is a field of :class:`training.config.TrainConfig` (``--help`` prints their docs). Under
``accelerate launch`` each process rolls out its own groups and gradients are averaged. Bad input
(a dataset of another model or reference sampler, missing reward weights, a step range outside
1..50, a checkpoint of another order or schema) stops with one message before any rollout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

import torch

from training.config import TrainConfig, add_dataclass_arguments, config_from_args

logger = logging.getLogger(__name__)


def prepare(config: TrainConfig, model: Any = None, store: Any = None, accelerator: Any = None, progress: bool = True,
            model_args: argparse.Namespace | None = None):
    """Validate everything cheap first, then load model, dataset and reward; returns a PPOTrainer.

    ``model_args``: the parsed shared model options (``runtime.cli``) to load ``config.model`` with."""
    from refine.full_step import FULL_STEP_SOLVER
    from solver.policy import ConsistencyPolicy
    from training.dataset import DatasetIndex, load_dataset
    from training.ppo import PPOTrainer
    from training.rewards import check_reward_for_model, default_reward, get_similarity

    config.validate()
    index = DatasetIndex.read(config.dataset)  # unreadable / foreign folder: fails here
    if config.reward is not None:
        check_reward_for_model(config.reward, index.model_id)
    if index.reference_solver != FULL_STEP_SOLVER:
        index.check_compatible(index.model_id, FULL_STEP_SOLVER)
    policy = ConsistencyPolicy.load(config.init_from, order=config.order) if config.init_from else None
    if model is None:
        from models.registry import load_model
        from runtime.cli import model_from_args

        device = accelerator.device if accelerator is not None and torch.cuda.is_available() else None
        model = load_model(config.model, device=device) if model_args is None else model_from_args(model_args, device=device)
    dataset = load_dataset(config.dataset, model_id=model.model_id, reference_solver=FULL_STEP_SOLVER)
    if config.reward is None:
        config.reward = default_reward(model.model_id)
    device = str(model.device)
    similarity = get_similarity(config.reward, weights=config.reward_weights, allow_download=config.allow_download,
                                device=device)
    return PPOTrainer(config, model, dataset, similarity, policy=policy, store=store, accelerator=accelerator,
                      progress=progress)


def main(argv: Sequence[str] | None = None, model: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=TrainConfig.__doc__)
    add_dataclass_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(TrainConfig, args)
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    store = None
    if accelerator.is_main_process and config.store != "":
        from store import open_store

        store = open_store(config.store)
    trainer = prepare(config, model=model, store=store, accelerator=accelerator,
                      progress=accelerator.is_local_main_process, model_args=args)
    metrics = trainer.train()
    if accelerator.is_main_process:
        keep = ("update", "reward_mean", "reward_std", "approx_kl", "clip_frac", "entropy", "deterministic_reward",
                "final_dir", "checkpoint_id")
        print(json.dumps({k: metrics.get(k) for k in keep}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
