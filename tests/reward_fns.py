"""Reward functions for tests/test_rewards.py, loaded by import path ("tests.reward_fns:...") in workers."""

from __future__ import annotations

import os
import time

HANG_S = 30.0
"""Far beyond any test's timeout_s: the pool must kill the worker; one that does not fails a time check."""


def misbehaving(response: str, ground_truth: str) -> dict[str, object]:
    """Correct iff response == ground_truth; but "hang" sleeps, "raise" raises, "exit" kills the worker."""
    if response == "hang":
        time.sleep(HANG_S)
    if response == "raise":
        raise RuntimeError("boom")
    if response == "exit":
        os._exit(3)
    return {"score": 1.0 if response == ground_truth else -1.0, "pred": response}


def returns_float(response: str, ground_truth: str) -> float:
    """0.5 when equal, else -0.5."""
    return 0.5 if response == ground_truth else -0.5


def returns_bool(response: str, ground_truth: str) -> bool:
    """True when equal."""
    return response == ground_truth


def returns_list(response: str, ground_truth: str) -> list[float]:
    """A return type the coercion must refuse."""
    return [1.0]


NOT_CALLABLE = 3
