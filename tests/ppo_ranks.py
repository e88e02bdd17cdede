"""A launch entry for tests/test_deepspeed.py: one PPO update of a saved rollout batch, as one of N ranks."""

from pathlib import Path

import torch

from infra.deepspeed_config import DeepSpeedConfig
from rlhf_core.config import PPOConfig
from rlhf_core.engine import Optimization
from rlhf_core.modeling import load_policy, load_scorer
from rlhf_core.ppo import PPOModels, advantages_and_returns, ppo_update
from tasks.common import make_engine


def update_saved_rollout(
    sft_dir: Path,
    rollout_file: Path,
    out_file: Path,
    *,
    config: PPOConfig,
    deepspeed: DeepSpeedConfig,
    on_metrics: object = None,
) -> dict[str, float]:
    """Policy and critic from ``sft_dir`` (a fresh value head, seed 0) updated on the rollout in ``rollout_file``;
    rank 0 saves both models' weights to ``out_file``; returns the update's statistics."""
    policy = load_policy(sft_dir)
    torch.manual_seed(0)
    critic = load_scorer(sft_dir)
    optimization = Optimization(lr=config.lr, total_steps=100, max_grad_norm=config.max_grad_norm, min_lr_ratio=1.0)
    engines = [make_engine(m, optimization, deepspeed, config.minibatch_size) for m in (policy, critic)]
    models = PPOModels(*engines, reference=policy, reward=None)  # type: ignore[arg-type]  # neither is used
    rollout = torch.load(rollout_file, weights_only=False)
    _, _, advantages, returns = advantages_and_returns(rollout, config, kl_coef=config.kl_coef)
    generator = torch.Generator().manual_seed(0)
    stats = ppo_update(models, rollout, advantages=advantages, returns=returns, config=config, generator=generator)
    weights = {"policy": engines[0].full_state_dict(), "critic": engines[1].full_state_dict()}
    if engines[0].rank == 0:
        torch.save(weights, out_file)
    return stats
