"""The Ray actors of the cluster mode (`trainer.backend=ray`): the trainer ranks, the rollout workers and
the reward scorers. Their classes are plain; `dapo.backends.ray`, the driver's side, applies `ray.remote`
where it places them and drives them (see its docstring for the whole picture).
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from dapo import distributed
from dapo.backends.policy import Policy, sync_engine_weights
from dapo.config import Config
from dapo.models.load import load_policy
from dapo.models.lora import LoRASpec, synced_names
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


class StaleWeightsError(RuntimeError):
    """A rollout worker was asked to sample or receive with weights it does not hold (Ray restarted it
    between calls): the driver gives it the current weights first (`RolloutPool.revive` in
    `dapo.backends.ray`)."""


class TrainerRank:
    """One rank of the trainer group: a `dapo.backends.policy.Policy` in the group's torch.distributed
    world, and (rank 0) the sender of the weight group."""

    def __init__(self, cfg: Config, run_dir: str, rank: int, size: int) -> None:
        _threads(cfg.trainer.ray_cpus_per_actor)
        self.cfg, self.run_dir, self.rank, self.size = cfg, Path(run_dir), rank, size
        self.updates = 0
        self.store: Any = None
        self.world_store: Any = None
        self.group: Any = None
        self.sync_device = torch.device("cpu")
        self.version = 0

    def address(self) -> tuple[str, int]:
        """Rank 0: serve the world's store on this node's address (`distributed.serve_store`); where."""
        timeout_s = self.cfg.trainer.collective_timeout_s
        self.world_store = distributed.serve_store(ray.util.get_node_ip_address(), timeout_s)
        return ray.util.get_node_ip_address(), int(self.world_store.port)

    def setup(self, master: tuple[str, int], secret: bytes) -> tuple[int, str]:
        """Join the world (several ranks; every rank proves it holds the run's ``secret``) and build the
        policy; (process id, node id)."""
        world = distributed.World.single()
        if self.size > 1:
            os.environ.update(
                RANK=str(self.rank), WORLD_SIZE=str(self.size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1"
            )
            timeout_s = self.cfg.trainer.collective_timeout_s
            store = self.world_store or TCPStore(
                master[0], master[1], None, False, datetime.timedelta(seconds=timeout_s)
            )
            world = distributed.init_world(device=self.cfg.model.device, timeout_s=timeout_s, store=store)
            device = world.device if world.device.type == "cuda" else torch.device("cpu")
            distributed.authenticate(dist.group.WORLD, self.rank, self.size, secret, device)
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
        """Rank 0: serve the weight group's store (once) on this node's address; where."""
        host = ray.util.get_node_ip_address()
        if self.store is None:
            self.store = distributed.serve_store(host, self.cfg.trainer.collective_timeout_s)
        return host, int(self.store.port)

    def join_weight_group(self, size: int, generation: int, secret: bytes) -> None:
        self.sync_device = distributed.weight_sync_device(self.policy.world.device, self.cfg.rollout.colocate)
        self.group = None  # a group of an earlier generation closes its connections
        self.group = distributed.weight_group(
            self.store, 0, size, generation, self.cfg.trainer.collective_timeout_s, self.sync_device, secret
        )

    def publish(self, version: int, gather: bool) -> dict[str, float]:
        """Rank 0 broadcasts the weights as ``version``, in buckets (`rollout.weight_sync_bucket_mb`). With
        ``gather`` (after an update) every rank gathers the updated shards one tensor at a time and rank 0
        sends each bucket as soon as it is complete, keeping them in its full copy as well; without, rank 0
        sends its full copy. `rollout/weight_sync_mb` per receiver."""
        t0 = time.perf_counter()
        sharded = self.policy.train_model is not self.policy.full_model  # one rank: the same module
        adapters = synced_names(self.policy.train_model)  # LoRA: the adapters only (the base is frozen)
        gathered = (
            distributed.gathered_weights(self.policy.train_model, adapters) if gather and sharded else None
        )
        if self.rank != 0 or self.group is None:
            for _ in gathered or ():  # the other ranks' part of each all-gather
                pass
            return {}
        try:
            self.version, sent = distributed.broadcast_weights(
                self.group, self.policy.full, version, self.sync_device,
                bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb << 20, source=gathered, names=adapters,
            )  # fmt: skip
        except Exception:
            # a receiver is gone (e.g. restarted): drop the group, closing its connections, so the other
            # receivers fail now rather than at the timeout; the full copy takes the rest of the update
            # (the other ranks' all-gathers go on to the end), so the driver can push it to a new group
            self.group = None
            full = dict(self.policy.full.named_parameters())
            with torch.no_grad():
                for name, value in gathered or ():
                    full[name].copy_(value)
            raise
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
        lora = LoRASpec.of(cfg.actor.lora, cfg.trainer.seed)
        if lora is not None:  # the trainer's initial adapters (drawn from the seed alone)
            lora.add_to(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.engine = make_engine(
            cfg.rollout, self.model, tokenizer, precision=cfg.actor.precision, longest=cfg.longest_sequence()
        )
        self.group: Any = None
        self.sync_device = torch.device("cpu")
        self.version = 0

    def ready(self) -> tuple[int, str, int]:
        """(process id, node id, weights version)."""
        return os.getpid(), ray.get_runtime_context().get_node_id(), self.version

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, version: int) -> list[Completion]:
        """The engine's completions, sampled with weights ``version``; a worker holding another (one Ray
        restarted between calls holds the model's initial weights) raises `StaleWeightsError` instead."""
        if self.version != version:
            raise StaleWeightsError(
                f"rollout worker {self.index} holds weights version {self.version}, not {version}"
            )
        return self.engine.generate(prompts, sampling)

    def join_weight_group(
        self, address: tuple[str, int], rank: int, size: int, generation: int, secret: bytes
    ) -> None:
        timeout = datetime.timedelta(seconds=self.cfg.trainer.collective_timeout_s)
        store = TCPStore(address[0], address[1], None, False, timeout)
        self.sync_device = distributed.weight_sync_device(
            next(self.model.parameters()).device, self.cfg.rollout.colocate
        )
        self.group = None
        self.group = distributed.weight_group(
            store, rank, size, generation, self.cfg.trainer.collective_timeout_s, self.sync_device, secret
        )

    def receive(self) -> int:
        """The weights rank 0 broadcasts, into this worker's model (and its engine's own copy)."""
        if self.group is None:
            raise StaleWeightsError(f"rollout worker {self.index} is in no weight group (restarted)")
        self.version, _ = distributed.broadcast_weights(
            self.group, self.model, 0, self.sync_device, names=synced_names(self.model)
        )
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
