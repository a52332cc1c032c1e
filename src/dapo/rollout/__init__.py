"""Rollout engines: the `RolloutEngine` protocol, the native KV-cache engine, transformers' generate, and
`make_engine` (the one `rollout.engine` names; vLLM is imported from `dapo.rollout.vllm` only when named)."""

from dapo.rollout.base import Completion, RolloutEngine, SamplingParams, check_prompts
from dapo.rollout.factory import make_engine
from dapo.rollout.hf import HFEngine
from dapo.rollout.native import NativeEngine, sample_tokens

__all__ = [
    "Completion",
    "HFEngine",
    "NativeEngine",
    "RolloutEngine",
    "SamplingParams",
    "check_prompts",
    "make_engine",
    "sample_tokens",
]
