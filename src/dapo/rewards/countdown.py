"""The Countdown task's verifier (``reward.function: countdown``): every line of the work is checked.

A response is correct (score 1.0) when its lines before ``Answer:`` are each ``a op b = c`` with ``a`` and
``b`` among the numbers still available (the problem's, then earlier results; each used at most once),
``c`` the operation's value, and the answer is the target and the result of the last line. Anything else is
wrong (score -1.0): an unknown number, a number used twice, wrong arithmetic, a stray line, no answer line,
an answer that the work does not reach. The ground truth is `dapo.data.countdown.ground_truth`'s
``"TARGET from N1 N2 ..."``.
"""

from __future__ import annotations

import re
from collections import Counter

from dapo.rewards.base import RewardResult

__all__ = ["OPS", "TIMES", "apply", "compute_score"]

TIMES = "×"
OPS = ("+", "-", TIMES)

_LINE = re.compile(r"^\s*(\d+)\s*([-+×*x])\s*(\d+)\s*=\s*(\d+)\s*$")
_ANSWER = re.compile(r"^\s*Answer:\s*(-?\d+)\s*$")
_TRUTH = re.compile(r"^\s*(\d+)\s+from\s+(\d+(?:\s+\d+)*)\s*$")
_INVALID = "[INVALID]"


def apply(a: int, op: str, b: int) -> int:
    """One operation as written in a solution line."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == TIMES:
        return a * b
    raise ValueError(f"unknown operator {op!r}; allowed: {', '.join(OPS)}")


def compute_score(response: str, ground_truth: str) -> RewardResult:
    """Score a Countdown response against ``"TARGET from N1 N2 ..."``."""
    truth = _TRUTH.match(ground_truth)
    if truth is None:
        raise ValueError(f"countdown ground truth {ground_truth!r}: expected 'TARGET from N1 N2 ...'")
    target, available = int(truth.group(1)), Counter(int(n) for n in truth.group(2).split())
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if not lines or (answer := _ANSWER.match(lines[-1])) is None:
        return RewardResult(-1.0, False, _INVALID)
    pred = answer.group(1)
    last = None
    for line in lines[:-1]:
        step = _LINE.match(line)
        if step is None:
            return RewardResult(-1.0, False, pred)
        a, op, b, c = int(step.group(1)), step.group(2), int(step.group(3)), int(step.group(4))
        op = {"*": "×", "x": "×"}.get(op, op)
        if op not in OPS or apply(a, op, b) != c:
            return RewardResult(-1.0, False, pred)
        available[a] -= 1
        available[b] -= 1
        if available[a] < 0 or available[b] < 0:  # not given, not made, or used up
            return RewardResult(-1.0, False, pred)
        available[c] += 1
        last = c
    correct = last is not None and last == target == int(pred)
    return RewardResult(1.0 if correct else -1.0, correct, pred)
