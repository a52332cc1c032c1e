"""The Ray actors of the cluster mode (`trainer.backend=ray`): the trainer ranks, the rollout workers and
the reward scorers. Their classes are plain; `dapo.backends.ray`, the driver's side, applies `ray.remote`
where it places them and drives them (see its docstring for the whole picture).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import ray
import torch
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from dapo import distributed
from dapo.backends.policy import Policy, sync_engine_weights
from dapo.config import Config
from dapo.models.load import load_policy
from dapo.preempt import fault_point
from dapo.rewards import ScoreBatch
from dapo.rewards.pool import make_reward_pool
from dapo.rollout import make_engine
from dapo.rollout.base import Completion, SamplingParams
from dapo.train import TrainBatch


def _threads(count: int) -> None:
    """One process's torch threads (an actor's logical CPUs)."""
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class TrainerRank:
    """One rank of the trainer group: a `dapo.backends.policy.Policy` in the group's torch.distributed
    world, and (rank 0) the sender of the weight group."""

    def __init__(self, cfg: Config, run_dir: str, rank: int, size: int) -> None:
        _threads(cfg.trainer.ray_cpus_per_actor)
        self.cfg, self.run_dir, self.rank, self.size = cfg, Path(run_dir), rank, size
        self.updates = 0
        self.store: Any = None
        self.group: Any = None
        self.sync_device = torch.device("cpu")
        self.version = 0

    def address(self) -> tuple[str, int]:
        """Where the group's world meets (rank 0's node and a free port there)."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master: tuple[str, int]) -> tuple[int, str]:
        """Join the world (several ranks) and build the policy; (process id, node id)."""
        world = distributed.World.single()
        if self.size > 1:
            os.environ.update(
                RANK=str(self.rank), WORLD_SIZE=str(self.size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
            )  # fmt: skip
            world = distributed.init_world(
                device=self.cfg.model.device, timeout_s=self.cfg.trainer.collective_timeout_s
            )
            _threads(self.cfg.trainer.ray_cpus_per_actor)
        # only rank 0 keeps the full weights, in host memory: it writes the checkpoint's model/ and sends
        # them to a restarted worker; the sync itself streams the gathered shards
        self.policy = Policy(self.cfg, world, self.run_dir, keep_full=self.rank == 0, full_on_host=True)
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def update(self, batch: TrainBatch) -> tuple[dict[str, float], torch.Tensor | None]:
        """`Actor.update` of the step's batch; rank 0 also returns the old log-probs it filled in."""
        self.updates += 1
        fault_point("rank_update", self.updates)
        metrics = self.policy.actor.update(batch)
        return metrics, batch.old_logprobs if self.rank == 0 else None

    def weight_store(self) -> tuple[str, int]:
        """Rank 0: serve the weight group's store (once); its address."""
        if self.store is None:
            import datetime

            self.store = TCPStore(
                "0.0.0.0", 0, None, True, datetime.timedelta(seconds=self.cfg.trainer.collective_timeout_s),
                wait_for_workers=False,
            )  # fmt: skip
        return ray.util.get_node_ip_address(), int(self.store.port)

    def join_weight_group(self, size: int, generation: int) -> None:
        self.sync_device = distributed.weight_sync_device(self.policy.world.device, self.cfg.rollout.colocate)
        self.group = distributed.weight_group(
            self.store, 0, size, generation, self.cfg.trainer.collective_timeout_s, self.sync_device
        )

    def publish(self, version: int, gather: bool) -> dict[str, float]:
        """Rank 0 broadcasts the weights as ``version``, in buckets (`rollout.weight_sync_bucket_mb`). With
        ``gather`` (after an update) every rank gathers the updated shards one tensor at a time and rank 0
        sends each bucket as soon as it is complete, keeping them in its full copy as well; without, rank 0
        sends its full copy. `rollout/weight_sync_mb` per receiver."""
        t0 = time.perf_counter()
        sharded = self.policy.train_model is not self.policy.full_model  # one rank: the same module
        gathered = distributed.gathered_weights(self.policy.train_model) if gather and sharded else None
        if self.rank != 0 or self.group is None:
            for _ in gathered or ():  # the other ranks' part of each all-gather
                pass
            return {}
        self.version, sent = distributed.broadcast_weights(
            self.group, self.policy.full, version, self.sync_device,
            bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb << 20, source=gathered,
        )  # fmt: skip
        return {"rollout/weight_sync_mb": sent / 2**20, "time/weight_broadcast_s": time.perf_counter() - t0}

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.policy.save(step, state)

    def restore(self) -> dict[str, Any] | None:
        ckpt = self.policy.restore()
        if ckpt is None:
            return None
        self.updates = int(ckpt.state["step"])
        return dict(ckpt.state) | {"path": str(ckpt.path)}

    def checksum(self) -> str:
        """Rank 0: the digest of the full weights the workers should hold."""
        return distributed.weights_checksum(self.policy.full)


class RolloutWorker:
    """A rollout worker: full weights and an engine (`dapo.rollout.make_engine`), a receiver of the weight
    group. Its process title reads `ray::RolloutWorker`."""

    def __init__(self, cfg: Config, index: int) -> None:
        _threads(cfg.trainer.ray_cpus_per_actor)
        self.cfg, self.index = cfg, index
        # vLLM keeps weights of its own on the device: this copy (a peer's source after a restart, the
        # checksum) stays in host memory
        host = torch.device("cpu") if cfg.rollout.engine == "vllm" else None
        self.model, tokenizer, _ = load_policy(cfg.model, device=host)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.engine = make_engine(cfg.rollout, self.model, tokenizer, precision=cfg.actor.precision)
        self.group: Any = None
        self.sync_device = torch.device("cpu")
        self.version = 0

    def ready(self) -> tuple[int, str, int]:
        """(process id, node id, weights version)."""
        return os.getpid(), ray.get_runtime_context().get_node_id(), self.version

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        return self.engine.generate(prompts, sampling)

    def join_weight_group(self, address: tuple[str, int], rank: int, size: int, generation: int) -> None:
        import datetime

        timeout = datetime.timedelta(seconds=self.cfg.trainer.collective_timeout_s)
        store = TCPStore(address[0], address[1], None, False, timeout)
        self.sync_device = distributed.weight_sync_device(
            next(self.model.parameters()).device, self.cfg.rollout.colocate
        )
        self.group = distributed.weight_group(
            store, rank, size, generation, self.cfg.trainer.collective_timeout_s, self.sync_device
        )

    def receive(self) -> int:
        """The weights rank 0 broadcasts, into this worker's model (and its engine's own copy)."""
        self.version, _ = distributed.broadcast_weights(self.group, self.model, 0, self.sync_device)
        sync_engine_weights(self.engine, self.model)
        return self.version

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.engine.load_weights(state_dict)

    def weights(self) -> tuple[dict[str, torch.Tensor], int]:
        """(full weights, version): what a restarted peer copies while the trainer is mid-update."""
        return self.model.state_dict(), self.version

    def copy_weights(self, weights: tuple[dict[str, torch.Tensor], int]) -> int:
        """A peer's `weights` into this worker's model and engine; their version."""
        state_dict, self.version = weights
        self.model.load_state_dict(state_dict)
        sync_engine_weights(self.engine, self.model)
        return self.version

    def checksum(self) -> str:
        return distributed.weights_checksum(self.model)


class RewardScorer:
    """A `dapo.rewards.RewardPool` in an actor (its verifier processes and timeouts as configured)."""

    def __init__(self, cfg: Config) -> None:
        _threads(1)
        self.pool = make_reward_pool(cfg.reward, cfg.trainer.collective_timeout_s)

    def score(self, texts: list[str], truths: list[str]) -> ScoreBatch:
        return self.pool.score(texts, truths)
