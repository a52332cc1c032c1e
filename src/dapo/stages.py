"""The loop's stages, built from the config: the collector of a step's batch, the policy update on the kept
groups (advantages first), and the step and history a restored checkpoint resumes from. `dapo.trainer`
calls them in order; each can be run alone (the benchmarks do)."""

from __future__ import annotations

from typing import Any

import torch

from dapo import algo, diagnostics, distributed
from dapo.backends.base import PolicyUpdater
from dapo.checkpoint import restore_rng
from dapo.collect import AheadCollector, Collector, CollectSettings, Group, Scorer, make_train_batch
from dapo.config import Config
from dapo.data import PromptSampler
from dapo.data.prompts import PromptSet
from dapo.models.tokenizer import pad_token_id, stop_token_ids
from dapo.rollout.base import RolloutEngine, SamplingParams
from dapo.train import TrainBatch


def make_collector(
    cfg: Config,
    engine: RolloutEngine,
    prompts: PromptSet,
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
            stop_token_ids=stop_token_ids(tokenizer),
        ),
        collect_settings(cfg),
        seed=cfg.trainer.seed,
    )


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


def update_policy(cfg: Config, actor: PolicyUpdater, groups: list[Group], tokenizer: Any) -> dict[str, float]:
    """Advantages, then the policy update on the kept groups; `actor/` metrics and the mismatch KL.

    Old log-probs are the engine's when `algorithm.use_rollout_logprobs`, else the update computes them
    (see `Actor.update`: no extra pass for the on-policy first mini-batch).
    """
    batch = make_train_batch(
        groups,
        pad_token_id=pad_token_id(tokenizer),
        std_normalize=cfg.algorithm.advantage_std_normalize,
        overlong_filter=cfg.algorithm.overlong_filter,
        estimator=cfg.algorithm.advantage,
    )
    if cfg.algorithm.use_rollout_logprobs:
        batch.old_logprobs = batch.rollout_logprobs
    metrics = actor.update(batch)
    assert batch.old_logprobs is not None
    metrics["rollout/mismatch_kl"] = float(
        algo.mismatch_kl(batch.rollout_logprobs, batch.old_logprobs, batch.response_mask)
    )
    metrics.update(mismatch_ratio_metrics(cfg, batch))
    # what drives entropy down (ΔH ≈ −Cov(log π, A)): positive when likely tokens get positive advantages
    metrics["actor/cov_logp_adv"] = diagnostics.token_covariance(
        batch.old_logprobs, batch.advantages, batch.response_mask
    )
    return metrics


def mismatch_ratio_metrics(cfg: Config, batch: TrainBatch) -> dict[str, float]:
    """Percentiles of π_trainer / π_rollout over the batch's tokens (or responses, with
    `algorithm.rollout_is_level=sequence`), and with `algorithm.rollout_is_cap` the fraction truncated or
    masked: `rollout/is_ratio_p05`, `_p50`, `_p95`, `rollout/is_truncated_fraction` or
    `rollout/is_masked_fraction`."""
    assert batch.old_logprobs is not None
    a, mask = cfg.algorithm, batch.response_mask.bool()
    sequence = a.rollout_is_level == "sequence"
    ratio = algo.rollout_is_ratios(batch.old_logprobs, batch.rollout_logprobs, mask, sequence=sequence)
    values = ratio[:, 0][mask.any(1)] if sequence else ratio[mask]  # one per response, or per token
    if values.numel() == 0:
        return {}
    q = torch.quantile(values.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    out = {"rollout/is_ratio_p05": float(q[0]), "rollout/is_ratio_p50": float(q[1]),
           "rollout/is_ratio_p95": float(q[2])}  # fmt: skip
    if a.rollout_is_cap is not None:
        cap = a.rollout_is_cap
        if a.rollout_is_mode == "mask":
            out["rollout/is_masked_fraction"] = float(((values < 1 / cap) | (values > cap)).double().mean())
        else:
            out["rollout/is_truncated_fraction"] = float((values > cap).double().mean())
    return out


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
