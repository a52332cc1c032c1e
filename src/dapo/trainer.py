"""The DAPO training loop.

One step = collect a batch with dynamic sampling → advantages → policy update → weights to the engine →
(periodic) evaluation → log → (periodic) checkpoint. A step is one policy-update round; generation rounds are
counted separately (`filter/rounds`), so warm-up, progress and resume count updates, not generation batches.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dapo import algo, components, distributed
from dapo.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    sharded_checkpoint,
)
from dapo.collect import (
    AheadCollector,
    Collected,
    Collector,
    CollectSettings,
    Group,
    Scorer,
    make_train_batch,
)
from dapo.config import Config, ConfigError, Precision, dump_config
from dapo.data import PromptSampler
from dapo.evaluate import eval_sampling, evaluate, format_eval, load_eval_set
from dapo.logger import NullLogger, RunLogger, environment_info, peak_rss_mb
from dapo.models import kernels
from dapo.preempt import Stopped, StopSignal, fault_point, stop_message
from dapo.rollout.base import RolloutEngine, SamplingParams, WeightSyncedEngine
from dapo.train import Actor, TrainBatch


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]


def train(cfg: Config) -> TrainResult:
    """Run `cfg`: in this process, as one rank of a torchrun launch (see `dapo.distributed`), or as the
    single controller of a Ray cluster (`trainer.backend=ray`, see `dapo.cluster`).

    Raises `dapo.preempt.Stopped` after SIGTERM / SIGINT, once the checkpoint is written."""
    if cfg.trainer.backend == "ray":  # the driver is one process; the ranks are Ray actors
        return run(cfg, distributed.World.single())
    world = distributed.init_world(device=cfg.model.device, timeout_s=cfg.trainer.collective_timeout_s)
    try:
        check_world_size(cfg, world)
        return run(cfg, world)
    except Exception as e:
        if world.distributed:  # name this rank: torchrun's summary then says which rank failed first
            print(f"dapo: rank {world.rank} of {world.size} stops: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    finally:
        world.close()


def run(cfg: Config, world: distributed.World) -> TrainResult:
    run_dir = make_run_dir(cfg, world)
    decide_precision(cfg, world, run_dir)
    # where the update, generation and scoring run: here (or on torchrun's ranks), or on Ray actors
    backend = make_backend(cfg, world, run_dir)
    try:
        return drive(cfg, world, run_dir, backend)
    finally:
        backend.close()


def drive(cfg: Config, world: distributed.World, run_dir: Path, backend: Backend) -> TrainResult:
    """The loop; `backend` says where each part runs."""
    tokenizer = backend.tokenizer
    train_set = components.tokenize_prompts(
        components.load_examples_for(cfg.data.train_files, cfg.data, split="train", dedup=cfg.data.dedup),
        tokenizer,
        cfg.data.max_prompt_length,
    )
    eval_set = load_eval_set(cfg, tokenizer)
    engine, score, actor = backend.engine, backend.score, backend.actor
    # trainer.async_rollout_steps=1: step k+1's batch is collected during update k (`collector.ahead`)
    collector = AheadCollector(
        make_collector(cfg, engine, train_set, tokenizer, score), cfg.trainer.async_rollout_steps
    )
    start_step, history = resume(backend.restore(), collector, world)
    log: RunLogger | NullLogger = NullLogger()
    if world.is_main:
        log = RunLogger(
            run_dir,
            total_steps=cfg.trainer.total_steps,
            start_step=start_step,
            tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress_bar,
            every_steps=cfg.logging.every_steps,
        )
    log.message(
        f"run directory: {run_dir}  (model {backend.model_dir}, {len(train_set)} training prompts"
        f"{backend.layout})"
    )

    def run_eval(step: int) -> dict[str, float]:
        fault_point("eval", step)
        t0 = time.perf_counter()
        metrics = evaluate(
            engine, eval_set.prompt_ids, eval_set.answers, eval_set.data_sources, score,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True), eval_sampling(cfg, tokenizer),
        )  # fmt: skip
        metrics["time/eval_s"] = time.perf_counter() - t0
        log.log(step, metrics, advance=False)
        log.message(f"step {step}: " + format_eval(metrics))
        return metrics

    def save(step: int, state: dict[str, Any]) -> None:
        fault_point("checkpoint", step)
        backend.save(step, state)

    def generate(step: int) -> Collected:
        fault_point("generate", step)
        return collector.collect(step)

    # SIGTERM / SIGINT: the step in flight is finished (or, in one process, abandoned while generating),
    # saved, then we stop. With several ranks every rank takes the decision together (`stop_requested`).
    stop, saved, abandoned = StopSignal(abandon=not world.distributed), start_step, None
    interrupted = False

    def stop_requested() -> bool:
        return world.sum([float(stop.requested())])[0] > 0

    with stop.installed():
        if start_step == 0 and cfg.evaluation.before_training:
            history["eval_before"] = run_eval(0)

        for step in range(start_step + 1, cfg.trainer.total_steps + 1):
            before = {"collector": collector.state_dict(), "history": dict(history)}  # if abandoned
            t_step = time.perf_counter()
            if world.distributed:  # abandoning mid-collective would leave the other ranks waiting
                collected: Collected | None = generate(step)
            else:
                collected = stop.abandonable(lambda: generate(step))  # noqa: B023 (called at once)
            if collected is None:  # stopped while generating: nothing of this step is kept
                if saved < step - 1:
                    save(step - 1, before)
                    saved = step - 1
                abandoned, interrupted = step, True
                break
            fault_point("update", step)
            metrics = dict(collected.metrics)
            metrics["time/collect_s"] = time.perf_counter() - t_step
            if collected.skipped:
                log.message(
                    f"step {step}: too few informative groups ({len(collected.groups)}); update skipped"
                )
            else:
                t0 = time.perf_counter()
                with collector.ahead(step + 1, last_step=cfg.trainer.total_steps):
                    metrics.update(update_policy(cfg, actor, collected.groups, tokenizer))
                    metrics["time/update_s"] = time.perf_counter() - t0
                metrics.update(backend.sync_weights())  # the new weights to every engine
            metrics.update(backend.step_metrics())
            metrics["time/step_s"] = time.perf_counter() - t_step
            metrics["perf/tokens_per_s"] = metrics.get("rollout/tokens", 0.0) / metrics["time/step_s"]
            metrics["perf/peak_rss_mb"] = peak_rss_mb()
            if (
                cfg.evaluation.every_steps
                and step % cfg.evaluation.every_steps == 0
                and step < cfg.trainer.total_steps
            ):
                run_eval(step)
            log.log(step, metrics)
            if step == start_step + 1:  # the kernels the first step chose (`dapo.models.kernels`)
                log.message(f"kernels: {kernels.describe()}")
            stopping = stop_requested()
            if (
                (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
                or step == cfg.trainer.total_steps
                or stopping
            ):
                save(step, {"collector": collector.state_dict(), "history": history})
                saved = step
                stopping = stopping or stop_requested()  # a signal during the write: it completes, we stop
            if stopping:
                interrupted = True
                break
    if interrupted:
        log.close()
        message = stop_message(run_dir, saved, abandoned)
        if stop.requested():
            raise stop.stopped(message)
        raise Stopped(signal.SIGTERM, f"dapo: stopped with the other ranks: {message}")

    history["eval_after"] = run_eval(cfg.trainer.total_steps)
    log.close()
    before, after = history.get("eval_before", {}), history["eval_after"]
    if world.is_main:
        if before:
            print(format_before_after(before, after, cfg.evaluation.k))
        print(f"peak memory (RSS): {peak_rss_mb():.0f} MiB; run directory: {run_dir}")
        print(f"figures and health notes: dapo report {run_dir}")
    return TrainResult(run_dir, cfg.trainer.total_steps, before, after)


# ----------------------------------------------------------------------------------------------------
# The loop's helpers


def make_run_dir(cfg: Config, world: distributed.World | None = None) -> Path:
    """The run directory, holding the resolved config.yaml and env.json.

    `<output_dir>/<run_name>`; a fresh run never writes into a directory that already holds checkpoints
    (nothing saved is lost): it takes `<run_name>-2`, `-3`, …; `checkpoint.resume=auto` continues the newest
    of them. With several ranks, rank 0 chooses and creates it (on a filesystem all ranks share).
    """
    world = world or distributed.World.single()
    run_dir = _choose_run_dir(cfg) if world.is_main else None
    return Path(world.broadcast(str(run_dir)))


def decide_precision(cfg: Config, world: distributed.World, run_dir: Path) -> None:
    """`actor.precision=auto` decided once, by rank 0 (`components.resolve_precision`; a resumed run
    adopts its checkpoint's kernel choices first), for every rank and actor; config.yaml then records it."""
    if cfg.actor.precision != "auto":
        return
    chosen: Precision = cfg.actor.precision
    if world.is_main:
        mode = cfg.checkpoint.resume
        found = list_checkpoints(run_dir)[-1:] if mode == "auto" else [] if mode == "none" else [Path(mode)]
        saved: dict[str, str] = {}
        for path in found:
            with contextlib.suppress(OSError, ValueError):
                saved = dict(json.loads((path / "state.json").read_text()).get("kernels", {}))
        chosen = components.resolve_precision(cfg, saved)
        print(f"actor.precision=auto: {chosen} on this machine ({kernels.describe()})")
    cfg.actor.precision = world.broadcast(chosen)
    if world.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))


def _choose_run_dir(cfg: Config) -> Path:
    name = cfg.trainer.run_name or "run"
    root = Path(cfg.trainer.output_dir)
    candidates = [root / name] + [root / f"{name}-{i}" for i in range(2, 10_000)]
    existing = [p for p in candidates[: 1 + len(list(root.glob(f"{name}-*")))] if p.is_dir()]
    if cfg.checkpoint.resume == "auto" and existing:
        run_dir = existing[-1]
    else:
        run_dir = next(p for p in candidates if not list_checkpoints(p))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "env.json").write_text(json.dumps(environment_info(), indent=2))
    return run_dir


def make_actor(cfg: Config, model: torch.nn.Module, world: distributed.World | None = None) -> Actor:
    """The policy's optimizer and update, at the sampling temperature (log-probs of what was sampled)."""
    return Actor(
        model,
        cfg.actor,
        cfg.algorithm,
        temperature=cfg.rollout.temperature,
        max_response_length=cfg.rollout.max_response_length,
        world=world,
    )


def check_world_size(cfg: Config, world: distributed.World) -> None:
    """`trainer.world_size`, when set, must be what the launcher started; vLLM engines on data-parallel ranks
    are one per rank (no tensor parallelism across ranks)."""
    tp = cfg.rollout.vllm.tensor_parallel_size
    if world.distributed and cfg.rollout.engine == "vllm" and tp > 1:
        raise ConfigError(
            f"rollout.vllm.tensor_parallel_size: invalid value {tp} with {world.size} torchrun ranks; "
            "allowed: 1 (each data-parallel rank runs its own vLLM engine on its own device)"
        )
    want = cfg.trainer.world_size
    if want and want != world.size:
        how = f"torchrun started {world.size}" if world.distributed else "not launched by torchrun"
        raise ConfigError(
            f"trainer.world_size: invalid value {want}; allowed: the launched world size ({how}); start "
            f"{want} ranks with `torchrun --nproc-per-node {want} -m dapo train ...` or set it to 0"
        )


def make_collector(
    cfg: Config,
    engine: RolloutEngine,
    prompts: components.PromptSet,
    tokenizer: Any,
    score: Scorer,
    sampler: PromptSampler | None = None,
) -> Collector:
    """The step's batch collector over `prompts` (sampled by `sampler`, default: the config's shuffle)."""
    return Collector(
        engine,
        prompts.prompt_ids,
        prompts.answers,
        prompts.data_sources,
        sampler or PromptSampler(len(prompts), seed=cfg.trainer.seed, shuffle=cfg.data.shuffle),
        score,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        SamplingParams(
            n=cfg.rollout.n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_tokens=cfg.rollout.max_response_length,
            stop_token_ids=components.stop_token_ids(tokenizer),
        ),
        collect_settings(cfg),
        seed=cfg.trainer.seed,
    )


def update_policy(cfg: Config, actor: PolicyUpdater, groups: list[Group], tokenizer: Any) -> dict[str, float]:
    """Advantages, then the policy update on the kept groups; `actor/` metrics and the mismatch KL.

    Old log-probs are the engine's when `algorithm.use_rollout_logprobs`, else the update computes them
    (see `Actor.update`: no extra pass for the on-policy first mini-batch).
    """
    batch = make_train_batch(
        groups,
        pad_token_id=components.pad_token_id(tokenizer),
        std_normalize=cfg.algorithm.advantage_std_normalize,
        overlong_filter=cfg.algorithm.overlong_filter,
    )
    if cfg.algorithm.use_rollout_logprobs:
        batch.old_logprobs = batch.rollout_logprobs
    metrics = actor.update(batch)
    assert batch.old_logprobs is not None
    metrics["rollout/mismatch_kl"] = float(
        algo.mismatch_kl(batch.rollout_logprobs, batch.old_logprobs, batch.response_mask)
    )
    return metrics


def sync_engine_weights(engine: RolloutEngine, model: torch.nn.Module) -> dict[str, float]:
    """Copy the policy's weights into an engine that keeps its own copy (vLLM); `rollout/weights_version`."""
    if not isinstance(engine, WeightSyncedEngine):
        return {}  # the native and HF engines hold the policy module itself
    engine.load_weights(model.state_dict())
    return {"rollout/weights_version": float(engine.weights_version)}


def collect_settings(cfg: Config) -> CollectSettings:
    return CollectSettings(
        groups_per_step=cfg.trainer.prompts_per_step,
        dynamic_sampling=cfg.algorithm.dynamic_sampling,
        max_rounds=cfg.algorithm.max_rounds,
        max_oversample=cfg.algorithm.max_oversample,
        min_keep_fraction=cfg.algorithm.min_keep_fraction,
        soft_overlong_punishment=cfg.reward.soft_overlong_punishment,
        max_response_length=cfg.rollout.max_response_length,
        overlong_cache_length=cfg.reward.overlong_cache_length,
        overlong_penalty_factor=cfg.reward.overlong_penalty_factor,
    )


def save_checkpoint_of(
    cfg: Config,
    run_dir: Path,
    step: int,
    actor: Actor,
    state: dict[str, Any],
    full_model: torch.nn.Module,
    tokenizer: Any,
    world: distributed.World,
) -> None:
    """Step `step`'s checkpoint: full weights (`model/`), and with several ranks the sharded model and
    optimizer (DCP, `sharded/`) in place of `optimizer.pt`'s optimizer state."""
    sharded: dict[str, Any] | None
    optimizer_state: dict[str, Any]
    if world.distributed:
        sharded = distributed.training_state(actor.model, actor.optimizer)
        optimizer_state = {"scheduler": actor.scheduler.state_dict()}
    else:
        sharded, optimizer_state = None, actor.state_dict()
    save_checkpoint(
        run_dir, step, full_model, tokenizer, optimizer_state, state,
        keep_last=cfg.checkpoint.keep_last, world=world, sharded=sharded,
    )  # fmt: skip


def restore_policy(
    cfg: Config,
    run_dir: Path,
    actor: Actor,
    world: distributed.World | None = None,
    full_model: torch.nn.Module | None = None,
) -> Checkpoint | None:
    """Restore weights, optimizer and this rank's RNG from `checkpoint.resume` (None: nothing to resume).

    With several ranks, rank 0 picks the checkpoint; each rank reads its shards of the model and optimizer
    (DCP reshards a checkpoint written by a different number of ranks) and its own RNG state.
    """
    world = world or distributed.World.single()
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    from dapo.models import load_pretrained

    def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
        loaded = load_pretrained(model_dir, dtype=cfg.model.dtype, device="cpu")
        return loaded.state_dict()

    if world.distributed:
        found: Path | None = Path(mode) if mode != "auto" else None
        if mode == "auto" and world.is_main:
            newest = latest_checkpoint(run_dir, lambda d: sharded_checkpoint(d.parent))
            found = newest[0].path if newest else None
        found = world.broadcast(found)
        if found is None:
            return None
        ckpt = load_checkpoint(found)
        distributed.load_training_state(actor.model, actor.optimizer, sharded_checkpoint(ckpt.path))
        actor.scheduler.load_state_dict(ckpt.optimizer["scheduler"])
        if full_model is not None:
            distributed.sync_weights(actor.model, full_model)
    else:
        if mode == "auto":
            newest = latest_checkpoint(run_dir, load_weights)
            if newest is None:
                return None
            ckpt, weights = newest
        else:
            ckpt = load_checkpoint(Path(mode))
            weights = load_weights(ckpt.model_dir)
        actor.model.load_state_dict(weights)
        actor.load_state_dict(ckpt.optimizer)
    restore_rng(ckpt.state, world.rank)
    if world.is_main:
        print(f"resumed from {ckpt.path} (step {ckpt.state['step']})")
    return ckpt


def resume(
    state: dict[str, Any] | None, collector: Collector | AheadCollector, world: distributed.World
) -> tuple[int, dict[str, Any]]:
    """(step, history) of a restored checkpoint's `state` (after `Backend.restore`), with the collector
    restored; (0, {}) for a fresh run."""
    if state is None:
        return 0, {}
    collector.load_state_dict(state["collector"])
    if "driver_rng" in state:  # the Ray driver's own stream (its ranks restored theirs)
        restore_rng({"rng": state["driver_rng"]})
    return int(state["step"]), dict(state.get("history", {}))


# ----------------------------------------------------------------------------------------------------
# Backends: where the policy update, generation and scoring run


class PolicyUpdater(Protocol):
    """What the loop needs of the trainer: `Actor.update` (an `Actor`, or the Ray trainer group)."""

    def update(self, batch: TrainBatch) -> dict[str, float]: ...


class Backend(Protocol):
    """The parts the loop drives: built here (`LocalBackend`) or on a Ray cluster (`dapo.cluster`)."""

    tokenizer: Any
    model_dir: Path
    layout: str
    """How the parts are laid out, for the run's first line (", 2 data-parallel ranks")."""

    @property
    def engine(self) -> RolloutEngine: ...

    @property
    def score(self) -> Scorer: ...

    @property
    def actor(self) -> PolicyUpdater: ...

    def sync_weights(self) -> dict[str, float]:
        """After an update: the new weights to every engine; `time/weight_sync_s` and friends."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """The step's figures of the layout itself (Ray: worker restarts, remote timeouts)."""
        ...

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write step `step`'s checkpoint with the driver's `state` (collector, history)."""
        ...

    def restore(self) -> dict[str, Any] | None:
        """Restore the policy from `checkpoint.resume` and sync the engines; the checkpoint's state."""
        ...

    def close(self) -> None: ...


def make_backend(cfg: Config, world: distributed.World, run_dir: Path) -> Backend:
    if cfg.trainer.backend == "ray":
        from dapo.cluster import RayBackend  # Ray is an optional extra: imported only in this mode

        return RayBackend(cfg, run_dir)
    return LocalBackend(cfg, world, run_dir)


class Policy:
    """The policy as the update sees it: the module to train, the full-weight module the engines read (the
    same module in one process), the actor; its checkpoint written and restored. One per rank: built by
    `LocalBackend` here, and by each Ray trainer rank (`dapo.cluster`)."""

    def __init__(self, cfg: Config, world: distributed.World, run_dir: Path) -> None:
        self.cfg, self.world, self.run_dir = cfg, world, run_dir
        model, self.tokenizer, self.model_dir = components.load_policy(
            cfg.model, device=world.device if world.distributed else None
        )
        torch.manual_seed(
            cfg.trainer.seed
        )  # after the policy: however it was loaded (or built), the same state
        # one module in one process; FSDP2 shards to train and a full copy to generate with on each rank
        self.train_model, self.full_model = distributed.parallelize(
            model, world, activation_checkpointing=cfg.actor.activation_checkpointing
        )
        self.actor = make_actor(cfg, self.train_model, world)

    def gather_weights(self) -> dict[str, float]:
        """The updated shards into the full-weight copy (ranks); nothing in one process."""
        return distributed.sync_weights(self.train_model, self.full_model)

    def save(self, step: int, state: dict[str, Any]) -> None:
        save_checkpoint_of(
            self.cfg, self.run_dir, step, self.actor, state, self.full_model, self.tokenizer, self.world
        )

    def restore(self) -> Checkpoint | None:
        return restore_policy(self.cfg, self.run_dir, self.actor, self.world, self.full_model)


class LocalBackend:
    """This process (or each torchrun rank): the policy, an engine on its full weights, the reward pool."""

    def __init__(self, cfg: Config, world: distributed.World, run_dir: Path) -> None:
        self.policy = Policy(cfg, world, run_dir)
        self.tokenizer, self.model_dir = self.policy.tokenizer, self.policy.model_dir
        self.layout = f", {world.size} data-parallel ranks" if world.distributed else ""
        self.local_engine = components.make_engine(
            cfg.rollout, self.policy.full_model, self.tokenizer, precision=cfg.actor.precision
        )
        self.engine: RolloutEngine = distributed.ShardedEngine(self.local_engine, world)
        self.pool = components.make_reward_pool(cfg.reward)
        self.score: Scorer = distributed.ShardedScorer(self.pool.score, world)
        self.actor: PolicyUpdater = self.policy.actor

    def sync_weights(self) -> dict[str, float]:
        # in one process the engine shares the policy's parameters; ranks gather the new full weights
        metrics = self.policy.gather_weights()
        metrics.update(sync_engine_weights(self.local_engine, self.policy.full_model))  # vLLM: its own copy
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
        sync_engine_weights(self.local_engine, self.policy.full_model)
        return dict(ckpt.state)

    def close(self) -> None:
        self.pool.close()


def format_before_after(before: dict[str, float], after: dict[str, float], k: int) -> str:
    lines = ["held-out accuracy before -> after training:"]
    for key in sorted(after):
        if key in before and "@" in key:
            lines.append(f"  {key.removeprefix('eval/'):<32} {before[key]:.3f} -> {after[key]:.3f}")
    return "\n".join(lines)
