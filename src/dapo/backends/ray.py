"""The Ray backend (`trainer.backend=ray`): this process is the single controller; the policy update,
generation and scoring run in Ray actors (`dapo.cluster`).

The driver (`dapo train`) owns what decides the run: the sampler, the collector (dynamic sampling),
advantages, logging and checkpoint orchestration. The loop is `dapo.trainer`'s, unchanged; `RayBackend`
gives it these parts:

- a trainer group of `trainer.world_size` `TrainerRank` actors, one placement-group bundle each: one
  torch.distributed world (gloo on CPU, NCCL on CUDA; rank 0 chooses the address and port) running the
  FSDP2 update of `dapo.distributed` with `dapo.train.Actor` (one rank: the single-process update, no
  FSDP). Every rank receives the whole batch (one object in Ray's store) and trains its share, as under
  torchrun; checkpoints are written by the ranks (`dapo.backends.policy.Policy.save`), with the
  driver's state;
- `RolloutPool`, the driver's `RolloutEngine`: `rollout.num_workers` `RolloutWorker` actors, each with
  full weights and its own engine (`dapo.rollout.make_engine`: native or vLLM), on bundles of their own or
  on the trainer ranks' (`rollout.colocate`). A round's prompts are split into contiguous shares by prompt
  index, each with the seed `dapo.distributed.shard_requests` gives it, and the completions are put back
  in prompt order: the kept set never depends on which worker finished first, and one worker samples
  what `dapo train` samples in one process (two workers what two torchrun ranks sample);
- `RayScorer`: `RewardScorer` actors, each a `dapo.rewards.RewardPool` with the verifier timeouts of
  `reward.timeout_s`, scoring contiguous shares of the responses.

Weights: after every update the ranks gather their shards into rank 0's full-weight copy, and rank 0
broadcasts it to every worker through a group of its own (`dapo.distributed.weight_group`: NCCL when
every member has a GPU of its own, else gloo through host memory; on a TCPStore served by rank 0),
never through the driver; each sync has a version (`rollout/weights_version`).

Faults: every remote call waits at most `trainer.collective_timeout_s` (a timeout is logged, then the run
stops with `ClusterError`). A rollout worker that dies is restarted by Ray (`max_restarts`), the weight
group is formed anew, the worker gets the current weights, and its share of the round is generated again
with the same seed (`rollout/worker_restarts`). A trainer rank that dies stops the run with a message
naming it; `--resume auto` continues from the last checkpoint.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dapo import distributed, preempt
from dapo.cluster import RewardScorer, RolloutWorker, StaleWeightsError, TrainerRank
from dapo.config import Config
from dapo.errors import UserError
from dapo.logger import PhasePeaks
from dapo.models import kernels, load_tokenizer
from dapo.models.load import resolve_model_path
from dapo.plan import ray_layout
from dapo.rewards import ScoreBatch
from dapo.rollout.base import Completion, SamplingParams
from dapo.train import TrainBatch

POLL_S = 0.5
"""How often a wait on actors asks whether to give up (`dapo.preempt.poll`)."""

WORKER_RESTARTS = 4
"""Times Ray restarts a rollout worker that died (its share is generated again each time)."""


class ClusterError(UserError, RuntimeError):
    """A remote call timed out, a trainer rank died, or the cluster lacks the resources the run asks for."""


_started_here = False
"""Whether `connect` started the Ray cluster (a local one: its resources never grow)."""


def connect(cfg: Config) -> None:
    """Join the Ray cluster at `trainer.ray_address` (else $RAY_ADDRESS), or start a private local one with
    this machine's CPUs (never a cluster some other program runs here); nothing when this process is
    connected already. A cluster that cannot be joined is a `ClusterError` naming the address."""
    global _started_here
    if ray.is_initialized():
        return
    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address == "local":
        kwargs["num_cpus"] = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
    else:
        reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot join the Ray cluster at {address}: {reason}; {_JOIN_HINT}") from None
    _started_here = address == "local"


_JOIN_HINT = (
    "check trainer.ray_address / RAY_ADDRESS (the head's GCS address, host:6379 by default), and that this "
    "process has the cluster's authentication: a head started with RAY_AUTH_MODE=token needs "
    "RAY_AUTH_MODE=token and its token here too"
)


def reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail at once when nothing listens at a ``host:port`` address (Ray itself retries for minutes);
    other forms (``auto``, ``ray://``) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ClusterError(f"cannot join the Ray cluster at {address}: {reason}; {_JOIN_HINT}") from None


def check_fits(need: dict[str, float], have: dict[str, float], local: bool) -> None:
    """Fail at once when a cluster whose resources never grow (one this process started) has fewer in all
    than the run asks for: waiting for placement could only time out, `trainer.collective_timeout_s` later.
    A cluster joined by address may be scaling up, so it is waited for."""
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if local and short:
        wants = ", ".join(f"{v:g} {k} (it has {h:g})" for k, (v, h) in short.items())
        raise ClusterError(
            f"the run needs {wants} on the local Ray cluster this process started; lower "
            "trainer.world_size / rollout.num_workers / trainer.ray_cpus_per_actor, or start a larger "
            "cluster (`ray start --head --num-cpus N`) and pass its trainer.ray_address"
        )


def wait(refs: Sequence[ray.ObjectRef[Any]], names: Sequence[str], timeout_s: float, what: str) -> list[Any]:
    """The results of ``refs`` (the calls ``what`` on ``names``), in order, within ``timeout_s``. A
    timeout is printed (stderr) and raises `ClusterError`; a dead actor raises `ActorLostError` naming
    it. While waiting, `dapo.preempt.poll` is asked twice a second (a stop abandons a collection here)."""
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        left = deadline - time.monotonic()
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(max(left, 0.0), POLL_S))
        if not ready and left > POLL_S:
            preempt.poll()
            continue
        if not ready:
            late = ", ".join(names[i] for i in sorted(pending.values()))
            limit = f"{timeout_s:.0f} s (trainer.collective_timeout_s)"
            message = f"remote call {what} timed out after {limit} on {late}"
            print(f"dapo: {message}", file=sys.stderr, flush=True)
            raise ClusterError(message)
        for ref in ready:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except (RayActorError, StaleWeightsError) as e:  # dead, or restarted by Ray since the last call
                raise ActorLostError(names[i], i, e) from e
    return [results[i] for i in range(len(refs))]


class ActorLostError(RuntimeError):
    """An actor died during a call, or Ray restarted it since the last (a worker's
    `StaleWeightsError`): `name` and `index` say which."""

    def __init__(self, name: str, index: int, cause: BaseException) -> None:
        super().__init__(f"{name} died: {type(cause).__name__}")
        self.name, self.index = name, index


def _ready(pg: PlacementGroup, what: str, timeout_s: float) -> None:
    if pg.wait(timeout_seconds=int(timeout_s)):
        return
    remove_placement_group(pg)
    raise ClusterError(
        f"the Ray cluster cannot place {what} (bundles {pg.bundle_specs}; cluster: "
        f"{ray.cluster_resources()}); add nodes, or lower trainer.world_size / rollout.num_workers / "
        "trainer.ray_cpus_per_actor"
    )


def _uses_cuda(cfg: Config) -> bool:
    return cfg.model.device.startswith("cuda") or (
        cfg.model.device == "auto" and bool(ray.cluster_resources().get("GPU"))
    )


class RayBackend:
    """The parts of `dapo.trainer`'s loop on a Ray cluster (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        connect(cfg)
        self.cfg = cfg
        self.timeout_s = cfg.trainer.collective_timeout_s
        self.model_dir = resolve_model_path(cfg.model.path)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.ranks: list[Any] = []
        self.workers: list[Any] = []
        self.scorers: list[Any] = []
        self.pgs: list[PlacementGroup] = []
        self.peaks = PhasePeaks(None)  # generation and update run on the actors
        self.restarts = 0
        self.secret = secrets.token_bytes(32)
        """The run's secret: members of the trainer world and the weight group prove they hold it
        (`distributed.authenticate`); it reaches them through Ray, never through a store."""
        self.nodes: dict[str, str] = {}
        """The Ray node id of each trainer rank and rollout worker."""
        try:
            self._start(run_dir)
        except BaseException:
            self.close()  # nothing stays placed when the start fails
            raise

    def _start(self, run_dir: Path) -> None:
        cfg = self.cfg
        ranks, workers = cfg.trainer.world_size or 1, cfg.rollout.num_workers
        self.layout = f", Ray: {ranks} trainer rank(s), {workers} rollout worker(s)"
        lay = ray_layout(cfg, cuda=_uses_cuda(cfg))
        check_fits(lay.total, ray.cluster_resources(), _started_here)
        self.pgs = [placement_group(lay.trainer_bundles, strategy="PACK")]
        _ready(self.pgs[0], f"{ranks} trainer rank(s)", self.timeout_s)
        # fault injection reaches the ranks (`rank_update`, see TrainerRank.update); the driver's kernel
        # overrides reach every actor (each times its own choices otherwise: `dapo.models.kernels`)
        env = {
            "OMP_NUM_THREADS": str(cfg.trainer.ray_cpus_per_actor),
            "DAPO_SIGNAL_AT": os.environ.get("DAPO_SIGNAL_AT", ""),
        }
        if kernels.ENV in os.environ:
            env[kernels.ENV] = os.environ[kernels.ENV]
        trainer_cls = ray.remote(TrainerRank)
        self.ranks = [
            trainer_cls.options(
                num_cpus=lay.rank_cpus,
                num_gpus=lay.rank_gpus,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pgs[0], placement_group_bundle_index=r
                ),
                runtime_env={"env_vars": {**env, "RANK": str(r)}},
            ).remote(cfg, str(run_dir.resolve()), r, ranks)
            for r in range(ranks)
        ]
        self.rank_names = [f"trainer rank {r}" for r in range(ranks)]
        if cfg.rollout.colocate:
            worker_pg, bundle_of = self.pgs[0], [i % ranks for i in range(workers)]
        else:
            worker_pg = placement_group(lay.worker_bundles, strategy="PACK")
            self.pgs.append(worker_pg)
            _ready(worker_pg, f"{workers} rollout worker(s)", self.timeout_s)
            bundle_of = list(range(workers))
        worker_cls = ray.remote(RolloutWorker)
        self.workers = [
            worker_cls.options(
                num_cpus=lay.worker_cpus,
                num_gpus=lay.worker_gpus,
                max_restarts=WORKER_RESTARTS,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    worker_pg, placement_group_bundle_index=bundle_of[i]
                ),
                runtime_env={"env_vars": env},
            ).remote(cfg, i)
            for i in range(workers)
        ]
        self.worker_names = [f"rollout worker {i}" for i in range(workers)]
        self.trainers = TrainerGroup(self)
        self.weights = WeightSync(self)
        self.engine = RolloutPool(self)
        self.scorers = [ray.remote(RewardScorer).options(num_cpus=0).remote(cfg) for _ in range(workers)]
        self.score = RayScorer(self)
        self.actor = self.trainers
        self.weights.form_group()

    def call_ranks(self, what: str, call: Callable[[Any], ray.ObjectRef[Any]]) -> list[Any]:
        """``call`` on every trainer rank; a rank that dies stops the run, named."""
        try:
            return wait([call(r) for r in self.ranks], self.rank_names, self.timeout_s, what)
        except ActorLostError as e:
            raise ClusterError(
                f"{e.name} of {len(self.ranks)} died during {what}; the run stops (continue from the last "
                "checkpoint with: dapo train ... --resume auto)"
            ) from e

    def sync_weights(self) -> dict[str, float]:
        return self.weights.push(gather=True)

    def step_metrics(self) -> dict[str, float]:
        restarts, self.restarts = self.restarts, 0
        return {
            "rollout/worker_restarts": float(restarts),
            "rollout/weights_version": float(self.weights.version),
        }

    def save(self, step: int, state: dict[str, Any]) -> None:
        state = {**state, "driver_rng": {"torch": torch.get_rng_state().tolist()}}
        self.call_ranks(f"save(step {step})", lambda r: r.save.remote(step, state))

    def restore(self) -> dict[str, Any] | None:
        state = self.call_ranks("restore", lambda r: r.restore.remote())[0]
        if state is None:
            return None
        print(f"resumed from {state.pop('path')} (step {state['step']})", flush=True)
        self.weights.version = (
            int(state["step"]) - 1
        )  # the workers then hold version `step`, as before the stop
        self.weights.push(gather=False)
        return dict(state)

    def checksums(self) -> tuple[str, list[str]]:
        """(trainer rank 0's full weights, each worker's weights) as digests."""
        want = wait([self.ranks[0].checksum.remote()], self.rank_names[:1], self.timeout_s, "checksum")[0]
        got = wait([w.checksum.remote() for w in self.workers], self.worker_names, self.timeout_s, "checksum")
        return want, got

    def close(self) -> None:
        for handle in [*self.workers, *self.ranks, *self.scorers]:
            ray.kill(handle, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)
        self.workers, self.ranks, self.scorers, self.pgs = [], [], [], []


class TrainerGroup:
    """The trainer ranks as the loop's actor: `update(batch)` runs `Actor.update` on every rank."""

    def __init__(self, backend: RayBackend) -> None:
        self.backend = backend
        rank0 = backend.ranks[0]
        master = wait([rank0.address.remote()], ["trainer rank 0"], backend.timeout_s, "address")[0]
        placed = backend.call_ranks("setup", lambda r: r.setup.remote(master, backend.secret))
        backend.nodes.update({name: node for name, (_, node) in zip(backend.rank_names, placed, strict=True)})

    def update(self, batch: TrainBatch) -> dict[str, float]:
        ref = ray.put(batch)  # once in the object store, read by every rank
        self.backend.weights.moved = True  # before any rank changes them (see `RolloutPool.revive`)
        results = self.backend.call_ranks("update", lambda r: r.update.remote(ref))
        metrics, old = results[0]
        batch.old_logprobs = old
        return dict(metrics)


class WeightSync:
    """Versioned weights from trainer rank 0 to every rollout worker, through the weight group."""

    def __init__(self, backend: RayBackend) -> None:
        self.backend = backend
        self.version = 0
        self.generation = 0
        self.regroup = False
        """A worker restarted and took its weights from a peer: the next push forms a new group first."""
        self.moved = False
        """The trainer's weights changed since the last push (an update ran or runs): the workers' version
        is no longer on trainer rank 0."""

    def form_group(self) -> None:
        """(Re)form the weight group: rank 0 and every worker (after a worker restarted: a new one)."""
        b = self.backend
        self.generation += 1
        size = 1 + len(b.workers)
        address = wait([b.ranks[0].weight_store.remote()], b.rank_names[:1], b.timeout_s, "weight_store")[0]
        refs = [b.ranks[0].join_weight_group.remote(size, self.generation, b.secret)]
        refs += [
            w.join_weight_group.remote(address, i + 1, size, self.generation, b.secret)
            for i, w in enumerate(b.workers)
        ]
        wait(refs, [b.rank_names[0], *b.worker_names], b.timeout_s, "join_weight_group")

    def push(self, *, gather: bool) -> dict[str, float]:
        """The trainer's current weights to every worker as a new version (``gather``: after an update,
        the ranks first gather their shards)."""
        b = self.backend
        t0 = time.perf_counter()
        if self.regroup:
            self.form_group()
            self.regroup = False
        self.version += 1
        published = [r.publish.remote(self.version, gather) for r in b.ranks]
        received = [w.receive.remote() for w in b.workers]
        try:
            results = wait(
                [*published, *received], [*b.rank_names, *b.worker_names], b.timeout_s, "weight sync"
            )
        except ActorLostError as e:
            if e.index < len(b.ranks):
                raise ClusterError(f"{e.name} died during the weight sync; the run stops") from e
            b.engine.revive(e.index - len(b.ranks))  # a worker died: it gets the weights on its return
            return self.push(gather=False)
        except RayTaskError:
            # a worker that died while idle (during the update) broke the group: rank 0's send failed,
            # and its full copy holds the whole update; the restarted workers join a new group for it
            restarted = b.engine.restarted()
            if not restarted:
                raise
            print(f"dapo: {', '.join(b.worker_names[i] for i in restarted)} restarted; weights sent again",
                  file=sys.stderr)  # fmt: skip
            self.regroup = True
            return self.push(gather=False)
        versions = results[len(b.ranks) :]
        if any(v != self.version for v in versions):
            raise ClusterError(f"weight sync: workers hold versions {versions}, expected {self.version}")
        self.moved = False
        metrics = dict(results[0])
        metrics["time/weight_sync_s"] = time.perf_counter() - t0
        metrics["rollout/weights_version"] = float(self.version)
        return metrics

    def resend(self) -> None:
        """After a worker restarted: a new group, and the current version again to everyone."""
        self.form_group()
        self.version -= 1
        self.push(gather=False)


class RolloutPool:
    """The driver's `RolloutEngine`: each round sharded across the workers by prompt index, completions
    back in prompt order."""

    def __init__(self, backend: RayBackend) -> None:
        self.backend = backend
        b = backend
        ready = wait([w.ready.remote() for w in b.workers], b.worker_names, b.timeout_s, "ready")
        self.pids: list[int] = [int(pid) for pid, _, _ in ready]
        b.nodes.update({name: node for name, (_, node, _) in zip(b.worker_names, ready, strict=True)})

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        b = self.backend
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**31, ()).item())
        shares = distributed.shard_requests(len(prompts), len(b.workers), sampling, seed)

        def submit(i: int) -> ray.ObjectRef[Any]:
            share, share_sampling = shares[i]
            ref: ray.ObjectRef[Any] = b.workers[i].generate.remote(
                prompts[share.start : share.stop], share_sampling, b.weights.version
            )
            return ref

        refs = {i: submit(i) for i, (share, _) in enumerate(shares) if len(share)}
        done: dict[int, list[Completion]] = {}
        while refs:
            try:
                names = [b.worker_names[i] for i in refs]
                done.update(zip(refs, wait(list(refs.values()), names, b.timeout_s, "generate"), strict=True))
                refs = {}
            except ActorLostError as e:
                lost = list(refs)[e.index]
                print(
                    f"dapo: {e.name} died (or was restarted); its prompts are generated again",
                    file=sys.stderr,
                )
                self.revive(lost)
                refs[lost] = submit(lost)  # the same share and seed: the same samples
        return distributed.gather_shares([(shares[i][0], done[i]) for i in sorted(done)])

    def revive(self, index: int) -> None:
        """Wait for Ray to restart worker ``index``, then give it the weights the round samples with: the
        current version from trainer rank 0, or, once the ranks have begun the next update (an async ahead
        collection samples the weights before it), a live peer's copy through the object store, worker to
        worker. With no peer, rank 0's weights after the update: that share is then less stale, and truncated
        importance sampling against the engine's log-probs keeps the update exact for it too."""
        b = self.backend
        self.await_restart(index)
        peers = [j for j in range(len(b.workers)) if j != index]
        for j in peers if b.weights.moved else []:
            try:
                wait(
                    [b.workers[index].copy_weights.remote(b.workers[j].weights.remote())],
                    [f"{b.worker_names[index]} (copying {b.worker_names[j]})"],
                    b.timeout_s,
                    "copy_weights",
                )
            except ActorLostError:
                continue  # that peer died too: try the next
            b.weights.regroup = True
            return
        b.weights.resend()

    def await_restart(self, index: int) -> int:
        """Wait for Ray to restart worker ``index`` (counted in `rollout/worker_restarts`); its process id."""
        b = self.backend
        b.restarts += 1
        deadline = time.monotonic() + b.timeout_s
        while True:
            try:
                self.pids[index] = int(
                    wait(
                        [b.workers[index].ready.remote()],
                        [b.worker_names[index]],
                        max(deadline - time.monotonic(), 1.0),
                        "ready",
                    )[0][0]
                )
                return self.pids[index]
            except ActorLostError:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"{b.worker_names[index]} did not come back within {b.timeout_s:.0f} s"
                    ) from None
                time.sleep(0.5)

    def restarted(self) -> list[int]:
        """The workers Ray restarted since they last reported (a new process id), each waited for."""
        b = self.backend
        found = []
        for i in range(len(b.workers)):
            try:
                ready = wait([b.workers[i].ready.remote()], [b.worker_names[i]], b.timeout_s, "ready")
                pid = int(ready[0][0])
            except ActorLostError:  # dead, not back yet
                self.await_restart(i)
                found.append(i)
                continue
            if pid != self.pids[i]:
                self.pids[i] = pid
                b.restarts += 1
                found.append(i)
        return found

    def load_weights(self, state_dict: Any) -> None:
        """Weights given by the caller, to every worker through Ray's object store (the trainer's own
        go through the weight group)."""
        b = self.backend
        ref = ray.put(dict(state_dict))
        wait([w.load_weights.remote(ref) for w in b.workers], b.worker_names, b.timeout_s, "load_weights")


class RayScorer:
    """The collector's scorer: contiguous shares of the responses on the `RewardScorer` actors."""

    def __init__(self, backend: RayBackend) -> None:
        self.backend = backend

    def __call__(self, texts: Sequence[str], truths: Sequence[str]) -> ScoreBatch:
        b = self.backend
        world = distributed.World(size=len(b.scorers))
        shares = [distributed.shard_range(len(texts), world, rank=i) for i in range(world.size)]
        refs = [
            s.score.remote(list(texts[r.start : r.stop]), list(truths[r.start : r.stop]))
            for s, r in zip(b.scorers, shares, strict=True)
        ]
        names = [f"reward scorer {i}" for i in range(world.size)]
        return distributed.merge_scores(wait(refs, names, b.timeout_s, "score"))
