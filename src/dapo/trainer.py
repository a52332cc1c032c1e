"""The DAPO training loop.

One step = collect a batch with dynamic sampling → advantages → policy update → weights to the engine →
(periodic) evaluation → log → (periodic) checkpoint. A step is one policy-update round; generation rounds are
counted separately (`filter/rounds`), so warm-up, progress and resume count updates, not generation batches.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dapo import algo, components
from dapo.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from dapo.collect import Collector, CollectSettings, Group, Scorer, make_train_batch
from dapo.config import Config, dump_config
from dapo.data import PromptSampler
from dapo.evaluate import eval_sampling, evaluate, format_eval, load_eval_set
from dapo.logger import RunLogger, environment_info, peak_rss_mb
from dapo.rollout.base import RolloutEngine, SamplingParams, WeightSyncedEngine
from dapo.train import Actor


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]


def train(cfg: Config) -> TrainResult:
    torch.manual_seed(cfg.trainer.seed)
    run_dir = make_run_dir(cfg)
    model, tokenizer, model_dir = components.load_policy(cfg.model)
    train_set = components.tokenize_prompts(
        components.load_examples_for(cfg.data.train_files, cfg.data, split="train", dedup=cfg.data.dedup),
        tokenizer,
        cfg.data.max_prompt_length,
    )
    eval_set = load_eval_set(cfg, tokenizer)
    engine = components.make_engine(cfg.rollout, model, tokenizer)
    scorer = components.make_reward_pool(cfg.reward)
    actor = make_actor(cfg, model)
    collector = make_collector(cfg, engine, train_set, tokenizer, scorer.score)
    start_step, history = resume(cfg, run_dir, model, actor, collector)
    if start_step:
        sync_engine_weights(engine, model)
    log = RunLogger(
        run_dir,
        total_steps=cfg.trainer.total_steps,
        start_step=start_step,
        tensorboard=cfg.logging.tensorboard,
        progress=cfg.logging.progress_bar,
    )
    log.message(f"run directory: {run_dir}  (model {model_dir}, {len(train_set)} training prompts)")

    def run_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = evaluate(
            engine, eval_set.prompt_ids, eval_set.answers, eval_set.data_sources, scorer.score,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True), eval_sampling(cfg, tokenizer),
        )  # fmt: skip
        metrics["time/eval_s"] = time.perf_counter() - t0
        log.log(step, metrics, advance=False)
        log.message(f"step {step}: " + format_eval(metrics))
        return metrics

    if start_step == 0 and cfg.evaluation.before_training:
        history["eval_before"] = run_eval(0)

    for step in range(start_step + 1, cfg.trainer.total_steps + 1):
        t_step = time.perf_counter()
        collected = collector.collect(step)
        _kill_point(step)
        metrics = dict(collected.metrics)
        metrics["time/collect_s"] = time.perf_counter() - t_step
        if collected.skipped:
            log.message(f"step {step}: too few informative groups ({len(collected.groups)}); update skipped")
        else:
            t0 = time.perf_counter()
            metrics.update(update_policy(cfg, actor, collected.groups, tokenizer))
            metrics["time/update_s"] = time.perf_counter() - t0
            metrics.update(sync_engine_weights(engine, model))  # no-op for the native engine (shared)
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
        if (
            cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        ) or step == cfg.trainer.total_steps:
            state = {"collector": collector.state_dict(), "history": history}
            save_checkpoint(
                run_dir, step, model, tokenizer, actor.state_dict(), state, keep_last=cfg.checkpoint.keep_last
            )

    history["eval_after"] = run_eval(cfg.trainer.total_steps)
    log.close()
    scorer.close()
    before, after = history.get("eval_before", {}), history["eval_after"]
    if before:
        print(format_before_after(before, after, cfg.evaluation.k))
    print(f"peak memory (RSS): {peak_rss_mb():.0f} MiB; run directory: {run_dir}")
    return TrainResult(run_dir, cfg.trainer.total_steps, before, after)


# ----------------------------------------------------------------------------------------------------
# The loop's helpers


def make_run_dir(cfg: Config) -> Path:
    """The run directory, holding the resolved config.yaml and env.json.

    `<output_dir>/<run_name>`; a fresh run never writes into a directory that already holds checkpoints
    (nothing saved is lost): it takes `<run_name>-2`, `-3`, …; `checkpoint.resume=auto` continues the newest
    of them.
    """
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


def make_actor(cfg: Config, model: torch.nn.Module) -> Actor:
    """The policy's optimizer and update, at the sampling temperature (log-probs of what was sampled)."""
    return Actor(
        model,
        cfg.actor,
        cfg.algorithm,
        temperature=cfg.rollout.temperature,
        max_response_length=cfg.rollout.max_response_length,
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


def update_policy(cfg: Config, actor: Actor, groups: list[Group], tokenizer: Any) -> dict[str, float]:
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


def resume(
    cfg: Config, run_dir: Path, model: torch.nn.Module, actor: Actor, collector: Collector
) -> tuple[int, dict[str, Any]]:
    """Restore weights, optimizer, collector and RNG from a checkpoint; returns (step, history)."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return 0, {}
    from dapo.models import load_pretrained

    def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
        loaded = load_pretrained(model_dir, dtype=cfg.model.dtype, device="cpu")
        return loaded.state_dict()

    if mode == "auto":
        found = latest_checkpoint(run_dir, load_weights)
        if found is None:
            return 0, {}
        ckpt, weights = found
    else:
        ckpt = load_checkpoint(Path(mode))
        weights = load_weights(ckpt.model_dir)
    model.load_state_dict(weights)
    actor.load_state_dict(ckpt.optimizer)
    collector.load_state_dict(ckpt.state["collector"])
    restore_rng(ckpt.state)
    print(f"resumed from {ckpt.path} (step {ckpt.state['step']})")
    return int(ckpt.state["step"]), dict(ckpt.state.get("history", {}))


def _kill_point(step: int) -> None:
    """Fault injection for the resume test: DAPO_KILL_AT_STEP=N kills the process in the middle of step N."""
    if os.environ.get("DAPO_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def format_before_after(before: dict[str, float], after: dict[str, float], k: int) -> str:
    lines = ["held-out accuracy before -> after training:"]
    for key in sorted(after):
        if key in before and "@" in key:
            lines.append(f"  {key.removeprefix('eval/'):<32} {before[key]:.3f} -> {after[key]:.3f}")
    return "\n".join(lines)
