"""Reward functions by name or import path.

The built-ins are named ``"math_dapo"`` (the reference DAPO verifier), ``"math_verify"`` (the symbolic
one) and ``"countdown"`` (the built-in Countdown task's); anything else is given as
``"package.module:function"`` and imported, so worker processes can load it from the string alone. User
functions are wrapped so they always return a `RewardResult`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from dapo.rewards.base import RewardFn, RewardResult, to_reward_result

BUILTIN_REWARD_FNS = ("math_dapo", "math_verify", "countdown")


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
    if spec == "countdown":
        from dapo.rewards import countdown

        return countdown.compute_score
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
