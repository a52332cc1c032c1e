"""Rollout engines: the `RolloutEngine` protocol, the native KV-cache engine, and transformers' generate."""

from dapo.rollout.base import Completion, RolloutEngine, SamplingParams, check_prompts
from dapo.rollout.hf import HFEngine
from dapo.rollout.native import NativeEngine, sample_tokens

__all__ = [
    "Completion",
    "HFEngine",
    "NativeEngine",
    "RolloutEngine",
    "SamplingParams",
    "check_prompts",
    "sample_tokens",
]
