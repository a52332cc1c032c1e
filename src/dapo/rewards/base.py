"""The reward result type and the coercion of user return values into it.

A reward function is any callable ``fn(response, ground_truth)`` returning a `RewardResult` (the
built-in verifiers) or something `to_reward_result` accepts (user functions); `dapo.rewards.load` finds
one by name or import path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardResult:
    """The verdict on one response."""

    score: float
    """The reward (±1.0 for the built-in verifiers)."""
    acc: bool
    """Whether the response is counted as correct (the dynamic-sampling filter and accuracy use this)."""
    pred: str
    """The extracted prediction, for logs ("[INVALID]" when none was found)."""


RewardFn = Callable[[str, str], RewardResult]


def to_reward_result(value: object, source: str = "reward function") -> RewardResult:
    """Coerce what a reward function returned into a RewardResult.

    Accepted: a RewardResult (unchanged); a bool (score ±1.0, acc = the bool); a real number (score, acc =
    score > 0, pred = ""); a mapping with "score" and optionally "acc" (default score > 0) and "pred"
    (default ""). ``source`` names the function in error messages.
    """
    if isinstance(value, RewardResult):
        return value
    # bool before numbers: bool is an int, but True means "correct", not a score of 1 by accident.
    if isinstance(value, bool):
        return RewardResult(1.0 if value else -1.0, value, "")
    if isinstance(value, numbers.Real):
        score = _finite_score(value, source)
        return RewardResult(score, score > 0, "")
    if isinstance(value, Mapping):
        if "score" not in value:
            raise TypeError(
                f"{source} returned a mapping without a 'score' key (keys: {sorted(map(str, value))})"
            )
        raw_score = value["score"]
        # A bool score is accepted like a bool return; anything else must be a real number.
        if isinstance(raw_score, bool) or not isinstance(raw_score, numbers.Real):
            raise TypeError(
                f"{source} returned 'score' of type {type(raw_score).__name__}; expected a real number"
            )
        score = _finite_score(raw_score, source)
        raw_acc = value.get("acc", score > 0)
        # bool("False") is True: a string here is a bug in the user function, not a verdict.
        if isinstance(raw_acc, str):
            raise TypeError(f"{source} returned 'acc' as a str ({raw_acc!r}); expected a bool")
        acc = bool(raw_acc)
        pred = value.get("pred", "")
        return RewardResult(score, acc, pred if isinstance(pred, str) else str(pred))
    raise TypeError(
        f"{source} returned {type(value).__name__}; expected RewardResult, bool, a real number, "
        "or a mapping with 'score' (and optionally 'acc', 'pred')"
    )


def _finite_score(value: numbers.Real, source: str) -> float:
    """float(value), refusing NaN and infinities: one such reward would poison the group's advantages."""
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"{source} returned a non-finite score ({score})")
    return score
