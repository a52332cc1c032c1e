"""The DAPO training loop.

One step = collect a batch with dynamic sampling → advantages → policy update → weights to the engine →
(periodic) evaluation → log → (periodic) checkpoint. A step is one policy-update round; generation rounds are
counted separately (`filter/rounds`), so warm-up, progress and resume count updates, not generation batches.

The loop (`drive`) knows nothing of where it runs: it is handed a `dapo.backends.Backend` (this process or
torchrun's ranks, or a Ray cluster) and calls the stages of `dapo.stages`.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapo import distributed
from dapo.backends import Backend, make_backend
from dapo.collect import AheadCollector, Collected
from dapo.config import Config
from dapo.data.prompts import load_examples_for, tokenize_prompts
from dapo.evaluate import eval_sampling, evaluate, format_eval, load_eval_set
from dapo.logger import NullLogger, RunLogger, peak_rss_mb, wandb_settings
from dapo.models import kernels
from dapo.preempt import Stopped, StopSignal, fault_point, stop_message
from dapo.run import check_world_size, decide_precision, make_run_dir
from dapo.stages import make_collector, resume, update_policy


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]


def train(cfg: Config) -> TrainResult:
    """Run `cfg`: in this process, as one rank of a torchrun launch (see `dapo.distributed`), or as the
    single controller of a Ray cluster (`trainer.backend=ray`, see `dapo.backends.ray`).

    Raises `dapo.preempt.Stopped` after SIGTERM / SIGINT, once the checkpoint is written."""
    if cfg.trainer.backend == "ray":  # the driver is one process; the ranks are Ray actors
        return run(cfg, distributed.World.single())
    world = distributed.init_world(device=cfg.model.device, timeout_s=cfg.trainer.collective_timeout_s)
    try:
        check_world_size(cfg, world)
        return run(cfg, world)
    except Exception as e:
        if world.distributed and not isinstance(e, Stopped):  # name the rank that failed first
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
    train_set = tokenize_prompts(
        load_examples_for(cfg.data.train_files, cfg.data, split="train", dedup=cfg.data.dedup),
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
            wandb=wandb_settings(cfg),
            eval_pending="eval_pending" in history,
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

    phase_metrics: dict[str, float] = {}  # peak memory of the step's phases (this process's)

    def generate(step: int) -> Collected:
        fault_point("generate", step)
        with backend.peaks.phase("generate", phase_metrics):
            return collector.collect(step)

    # SIGTERM / SIGINT: generation in flight is abandoned (the ranks agree in `ShardedEngine`), an update
    # in flight finishes, a due evaluation is left for the resumed run, the step is saved, then we stop.
    # With several ranks every rank takes each decision together (`stop_requested`).
    stop, saved, abandoned = StopSignal(abandon=not world.distributed), start_step, None
    interrupted = False

    def stop_requested() -> bool:
        return world.sum([float(stop.requested())])[0] > 0

    with stop.installed():
        if start_step == 0 and cfg.evaluation.before_training:
            history["eval_before"] = run_eval(0)
        if "eval_pending" in history:  # skipped by the stop that wrote the checkpoint
            run_eval(history.pop("eval_pending"))

        for step in range(start_step + 1, cfg.trainer.total_steps + 1):
            before = {"collector": collector.state_dict(), "history": dict(history)}  # if abandoned
            t_step = time.perf_counter()
            collected: Collected | None = stop.abandonable(lambda: generate(step))  # noqa: B023 (called now)
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
                with (
                    collector.ahead(step + 1, last_step=cfg.trainer.total_steps, stop=stop.requested),
                    backend.peaks.phase("update", phase_metrics),
                ):
                    metrics.update(update_policy(cfg, actor, collected.groups, tokenizer))
                    metrics["time/update_s"] = time.perf_counter() - t0
                metrics.update(backend.sync_weights())  # the new weights to every engine
            metrics.update(backend.step_metrics())
            metrics["time/step_s"] = time.perf_counter() - t_step
            metrics["perf/tokens_per_s"] = metrics.get("rollout/tokens", 0.0) / metrics["time/step_s"]
            metrics["perf/peak_rss_mb"] = peak_rss_mb()
            metrics.update(phase_metrics)
            phase_metrics.clear()
            stopping = stop_requested()
            every = cfg.evaluation.every_steps
            if every and step % every == 0 and step < cfg.trainer.total_steps:
                evaluated = None if stopping else stop.abandonable(lambda: run_eval(step))  # noqa: B023
                if evaluated is None:  # the resumed run evaluates this step's weights first
                    history["eval_pending"] = step
                    stopping = True
            log.log(step, metrics)
            if step == start_step + 1:  # the kernels the first step chose (`dapo.models.kernels`)
                log.message(f"kernels: {kernels.describe()}")
            stopping = stopping or stop_requested()
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


def format_before_after(before: dict[str, float], after: dict[str, float], k: int) -> str:
    lines = ["held-out accuracy before -> after training:"]
    for key in sorted(after):
        if key in before and "@" in key:
            lines.append(f"  {key.removeprefix('eval/'):<32} {before[key]:.3f} -> {after[key]:.3f}")
    return "\n".join(lines)
