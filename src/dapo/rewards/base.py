"""The reward result type, coercion of user return values, and loading reward functions by name or path.

A reward function is any callable ``fn(response, ground_truth)``. The built-ins are named ``"math_dapo"``
(the reference DAPO verifier) and ``"math_verify"`` (the symbolic one); anything else is given as
``"package.module:function"`` and imported, so worker processes can load it from the string alone.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

BUILTIN_REWARD_FNS = ("math_dapo", "math_verify")


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


def load_reward_fn(spec: str) -> RewardFn:
    """Return the reward function named by ``spec``.

    ``spec`` is "math_dapo", "math_verify", or "package.module:function" (a dotted attribute path after the
    colon is allowed). User functions are wrapped so they always return a RewardResult.
    """
    if not isinstance(spec, str):
        raise TypeError(f"reward function spec must be a str, got {type(spec).__name__}")
    if spec == "math_dapo":
        from dapo.rewards import math_dapo

        return math_dapo.compute_score
    if spec == "math_verify":
        from dapo.rewards import symbolic

        return symbolic.compute_score
    module_name, sep, attr_path = spec.partition(":")
    # Both halves are needed: a bare name is most likely a mistyped built-in.
    if not sep or not module_name.strip() or not attr_path.strip():
        raise ValueError(
            f"unknown reward function {spec!r}: expected one of {', '.join(BUILTIN_REWARD_FNS)} "
            "or an import path of the form 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: object = module
    for part in attr_path.split("."):
        # getattr with a default so a missing name is reported as such, not as an AttributeError trace.
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            raise ValueError(
                f"reward function {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            )
    if not callable(obj):
        raise ValueError(f"reward function {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return _wrap(obj, spec)


_MISSING = object()


def _wrap(fn: Callable[..., object], spec: str) -> RewardFn:
    """Wrap a user function so its return value is coerced to a RewardResult."""

    def reward_fn(response: str, ground_truth: str) -> RewardResult:
        return to_reward_result(fn(response, ground_truth), source=f"reward function {spec!r}")

    reward_fn.__name__ = getattr(fn, "__name__", "reward_fn")
    reward_fn.__doc__ = getattr(fn, "__doc__", None)
    return reward_fn
