"""The rollout engine `rollout.engine` names, built on the policy's model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dapo.config import ConfigError, RolloutConfig
from dapo.models.tokenizer import pad_token_id
from dapo.rollout.base import RolloutEngine


def make_engine(
    cfg: RolloutConfig, model: nn.Module, tokenizer: Any, *, precision: str = "model", longest: int = 0
) -> RolloutEngine:
    """The rollout engine named by `rollout.engine`, sharing the policy's weights where it can;
    ``precision`` is `actor.precision` (``bf16-mixed``: the native engine samples in bf16). ``longest``
    (`Config.longest_sequence`): the longest prompt + response it will be asked for; an engine with a
    shorter context (vLLM's `max_model_len`) is a `ConfigError` now, on every rank alike, rather than an
    error in generation on the ranks whose share holds a long prompt while the others wait."""
    if cfg.engine == "native":
        from dapo.rollout.native import NativeEngine

        return NativeEngine(
            model,  # type: ignore[arg-type]
            pad_token_id=pad_token_id(tokenizer),
            max_batch_size=cfg.max_batch_size or None,
            dtype=torch.bfloat16 if precision == "bf16-mixed" else None,
            kv_budget_bytes=cfg.kv_cache_gib * 2**30 or None,
        )
    if cfg.engine == "hf":
        from dapo.rollout.hf import HFEngine

        return HFEngine(model, pad_token_id=pad_token_id(tokenizer))
    if cfg.engine == "vllm":
        from dapo.rollout.vllm import VLLMEngine, context_length

        v = cfg.vllm
        context = v.max_model_len or context_length(model)
        if longest > context:
            given = v.max_model_len or f"0, the model's max_position_embeddings {context}"
            raise ConfigError(
                f"rollout.vllm.max_model_len: {given} is shorter than the longest prompt + response, "
                f"{longest} (data.max_prompt_length + rollout/evaluation.max_response_length); allowed: "
                "lower those, or a model (and max_model_len) with a longer context"
            )
        return VLLMEngine(
            model,
            kv_cache_gib=v.kv_cache_gib,
            enforce_eager=v.enforce_eager,
            tensor_parallel_size=v.tensor_parallel_size,
            max_model_len=v.max_model_len,
            sleep_mode=v.sleep_mode,
            handoff=cfg.handoff,
        )
    raise ValueError(f"rollout.engine {cfg.engine!r}: allowed 'native', 'hf', 'vllm'")
