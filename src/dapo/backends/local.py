"""The local backend: every part of a step in this process, or on each rank torchrun started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dapo import distributed
from dapo.backends.base import PolicyUpdater
from dapo.backends.policy import Policy, sync_engine_weights
from dapo.collect import Scorer
from dapo.config import Config
from dapo.logger import PhasePeaks
from dapo.rewards.pool import make_reward_pool
from dapo.rollout import make_engine
from dapo.rollout.base import RolloutEngine


class LocalBackend:
    """This process (or each torchrun rank): the policy, an engine on its full weights, the reward pool."""

    def __init__(self, cfg: Config, world: distributed.World, run_dir: Path) -> None:
        self.policy = Policy(cfg, world, run_dir)
        self.tokenizer, self.model_dir = self.policy.tokenizer, self.policy.model_dir
        self.layout = f", {world.size} data-parallel ranks" if world.distributed else ""
        self.local_engine = make_engine(
            cfg.rollout, self.policy.full, self.tokenizer, precision=cfg.actor.precision
        )
        self.engine: RolloutEngine = distributed.ShardedEngine(self.local_engine, world)
        self.pool = make_reward_pool(cfg.reward)
        self.score: Scorer = distributed.ShardedScorer(self.pool.score, world)
        self.actor: PolicyUpdater = self.policy.actor
        self.peaks = PhasePeaks(next(self.policy.full.parameters()).device)

    def sync_weights(self) -> dict[str, float]:
        # in one process the engine shares the policy's parameters; ranks gather the new full weights
        metrics = self.policy.gather_weights()
        metrics.update(sync_engine_weights(self.local_engine, self.policy.full))  # vLLM: its own copy
        return metrics

    def step_metrics(self) -> dict[str, float]:
        return {}

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.policy.save(step, state)

    def restore(self) -> dict[str, Any] | None:
        ckpt = self.policy.restore()
        if ckpt is None:
            return None
        # an engine with its own copy of the weights (vLLM) was built before they were loaded
        sync_engine_weights(self.local_engine, self.policy.full)
        return dict(ckpt.state)

    def close(self) -> None:
        self.pool.close()
