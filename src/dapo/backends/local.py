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
from dapo.rollout.base import RolloutEngine, WeightSyncedEngine
from dapo.train import TrainBatch


class LocalBackend:
    """This process (or each torchrun rank): the policy, an engine on its full weights, the reward pool.

    With vLLM the rank's full copy stays in host memory (vLLM keeps weights of its own on the device);
    with `rollout.handoff` the update starts by handing the device over (`HandOff`)."""

    def __init__(self, cfg: Config, world: distributed.World, run_dir: Path) -> None:
        self.policy = Policy(cfg, world, run_dir, full_on_host=cfg.rollout.engine == "vllm")
        self.tokenizer, self.model_dir = self.policy.tokenizer, self.policy.model_dir
        self.layout = f", {world.size} data-parallel ranks" if world.distributed else ""
        self.local_engine = make_engine(
            cfg.rollout, self.policy.full, self.tokenizer, precision=cfg.actor.precision,
            longest=cfg.longest_sequence(),
        )  # fmt: skip
        self.engine: RolloutEngine = distributed.ShardedEngine(self.local_engine, world)
        self.pool = make_reward_pool(cfg.reward, cfg.trainer.collective_timeout_s)
        self.score: Scorer = distributed.ShardedScorer(self.pool.score, world)
        self.actor: PolicyUpdater = (
            HandOff(self.policy, self.local_engine) if cfg.rollout.handoff else self.policy.actor
        )
        device = world.device if world.distributed else next(self.policy.train_model.parameters()).device
        self.peaks = PhasePeaks(device)

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


class HandOff:
    """`Actor.update` after the engine gave the device back (`rollout.handoff`): the native engine's
    full-weight copy is freed (`Policy.release_full`; `sync_weights` gathers it again after the update),
    with its bf16 sampling copy if it keeps one (its KV cache lives only inside `generate`); vLLM sleeps at
    level 2 (`VLLMEngine.release`) until `sync_weights` loads the new weights into it."""

    def __init__(self, policy: Policy, engine: RolloutEngine) -> None:
        self.policy, self.engine = policy, engine

    def update(self, batch: TrainBatch) -> dict[str, float]:
        release = getattr(self.engine, "release", None)
        if release is not None:  # NativeEngine, VLLMEngine
            release()
        freed = 0
        if not isinstance(self.engine, WeightSyncedEngine):  # vLLM's weights are its own, not the copy
            freed = self.policy.release_full()
        metrics = self.policy.actor.update(batch)
        metrics["rollout/handoff_freed_mb"] = freed / 2**20
        return metrics
