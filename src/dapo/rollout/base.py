"""The rollout interface: `SamplingParams` in, `Completion`s out, behind the `RolloutEngine` protocol.

Log-probabilities returned by an engine (``rollout_logprobs`` downstream) are those of the sampled token
under ``log_softmax(logits / T)`` BEFORE top-k / top-p truncation, which is the quantity the trainer
recomputes; greedy decoding (T = 0) reports them at T = 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "WeightSyncedEngine", "check_prompts"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample responses."""

    n: int = 1
    """Responses per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = -1
    """Sample from the k most probable tokens (-1 = off)."""
    max_tokens: int = 256
    """Maximum number of generated tokens per response."""
    stop_token_ids: tuple[int, ...] = ()
    """A response ends after producing any of these (the stop token is part of the response)."""
    seed: int | None = None
    """Seed of the round's random numbers; None draws one from torch's global generator."""
    first_prompt_index: int = 0
    """Index of ``prompts[0]`` in the round this call is part of (a rank's or rollout worker's share, an
    evaluation batch). The native engine draws each row's random numbers from a stream keyed on (seed,
    prompt index in the round, sample index, token position) only, so a share samples exactly what the
    whole round samples for its prompts, in any batch layout; an engine with one generator per call seeds
    it from `call_seed`."""

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(
                f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1)):
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        stops = tuple(self.stop_token_ids)
        if not all(isinstance(t, int) and t >= 0 for t in stops):
            raise ValueError(
                f"SamplingParams.stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}"
            )
        object.__setattr__(self, "stop_token_ids", stops)  # accept any sequence, store a hashable tuple
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        if not (isinstance(self.first_prompt_index, int) and self.first_prompt_index >= 0):
            raise ValueError(
                f"SamplingParams.first_prompt_index must be an integer >= 0, got {self.first_prompt_index!r}"
            )

    @property
    def call_seed(self) -> int | None:
        """The seed of one generator for the whole call (engines without per-row streams: hf, vllm): the
        round's seed for a call that starts the round, else one derived from where the call starts (shares
        of a round must not repeat each other's random numbers)."""
        if self.seed is None or self.first_prompt_index == 0:
            return self.seed
        return (self.seed + 1_000_033 * self.first_prompt_index) % (2**31)


@dataclass
class Completion:
    """One generated response."""

    prompt_index: int
    """Index of its prompt in the list given to `RolloutEngine.generate`."""
    token_ids: list[int] = field(default_factory=list)
    """Generated tokens, including the stop token when one was produced."""
    logprobs: list[float] = field(default_factory=list)
    """Log-prob of each generated token under log_softmax(logits / T), before top-k/top-p truncation."""
    finish_reason: str = "length"
    """"stop" (a stop token was produced) or "length" (max_tokens reached)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates responses with the current policy weights."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` completions per prompt, ordered prompt 0 (n of them), prompt 1, …"""
        ...

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy new policy weights into the engine's model, in place."""
        ...


@runtime_checkable
class WeightSyncedEngine(RolloutEngine, Protocol):
    """An engine holding its own copy of the policy's weights (vLLM), synced with `load_weights` after every
    update; the native engine shares the policy's parameters instead."""

    weights_version: int
    """Weight loads so far."""


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int | None = None) -> None:
    """Raise ValueError naming the first bad prompt (empty, non-integer or out-of-vocabulary token)."""
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if not all(isinstance(t, int) for t in p):
            raise ValueError(f"prompt {i} holds non-integer token ids: {list(p)[:8]}")
        if min(p) < 0 or (vocab_size is not None and max(p) >= vocab_size):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {list(p)[:8]}")
