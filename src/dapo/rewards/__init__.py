"""Rewards: the reference ``math_dapo`` verifier, a symbolic one (``math_verify``), user reward functions
loaded by import path, and a process pool that scores batches with per-response timeouts."""

from dapo.rewards.base import RewardFn, RewardResult, to_reward_result
from dapo.rewards.load import load_reward_fn
from dapo.rewards.math_dapo import compute_score
from dapo.rewards.pool import RewardPool, ScoreBatch

__all__ = [
    "RewardFn",
    "RewardPool",
    "RewardResult",
    "ScoreBatch",
    "compute_score",
    "load_reward_fn",
    "to_reward_result",
]
