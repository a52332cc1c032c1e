"""The built-in arithmetic-reasoning task used by the embedded default run.

Problems are short integer expressions phrased as text ("Compute 17 + 8 - 12."), with a target solution of
one line per operation, then the line the DAPO template asks for::

    17 + 8 = 25
    25 - 12 = 13
    Answer: 13

so the ``math_dapo`` verifier scores a correct solution 1.0. Operands are small (``OPERAND_RANGE``, 0-20;
factors 2-9), so a model of a few million parameters learns the single steps in a couple of minutes
of supervised warm-up. Three difficulty levels give a spread of accuracy, so that RL sees groups with
0 < correct < G at every level:

- level 1: ``a + b`` or ``a - b`` (one line of work);
- level 2: three operands joined by ``+`` and ``-`` (two lines; the second step may reach 40);
- level 3: ``a × b`` of one-digit factors, then ``+`` or ``-`` an operand (two lines; up to 81 + 20).

Every intermediate and final value is a non-negative integer: a first subtraction takes the larger operand
first, and a second one that would go below zero becomes an addition.

The held-out split is disjoint from the training split by construction: a problem is held out iff a stable
hash (SHA-256) of its canonical expression falls in a fixed bucket (``HELDOUT_PERCENT`` of 100), whatever the
seed or phrasing; the training stream skips those problems. Held-out problems are unseen as a whole, but
their single steps (``17 + 8 = 25``) also occur inside training problems, so a model can solve them by
composing what it learned. Generation is deterministic: the same seed and levels give the same problems, in
the same order.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dapo.data.dataset import Example, Message, prompt_uid
from dapo.data.templates import apply_dapo_template
from dapo.rewards.countdown import TIMES, apply

__all__ = [
    "DATA_SOURCE",
    "FACTOR_RANGE",
    "HELDOUT_PERCENT",
    "LEVELS",
    "OPERAND_RANGE",
    "ArithmeticProblem",
    "ArithmeticTask",
    "is_heldout",
]

DATA_SOURCE = "arithmetic"
"""The ``data_source`` of every example this task produces."""

LEVELS: tuple[int, ...] = (1, 2, 3)
"""The difficulty levels this task knows."""

HELDOUT_PERCENT = 10
"""Percentage of the problem space (by hash bucket) reserved for the held-out split."""

# Phrasings of the problem text; the canonical expression (what the split hashes) does not depend on them.
_PHRASINGS: tuple[str, ...] = ("Compute {expr}.", "What is {expr}?", "Calculate {expr}.")

OPERAND_RANGE = (0, 20)
"""Inclusive range of every added or subtracted operand."""
FACTOR_RANGE = (2, 9)
"""Inclusive range of the two factors of level 3."""

# Consecutive draws without a new held-out problem after which the held-out space counts as exhausted.
_MAX_HELDOUT_MISSES = 50_000


@dataclass(frozen=True)
class ArithmeticProblem:
    """One arithmetic problem with its templated prompt and its reference solution."""

    level: int
    """Difficulty level (1 = easiest)."""
    expression: str
    """Canonical expression, e.g. ``"17 + 8 - 12"``; the held-out split hashes this."""
    problem: str
    """Problem text, e.g. ``"Compute 17 + 8 - 12."``."""
    prompt: str
    """The problem wrapped in the DAPO prompt template (the user message)."""
    answer: str
    """Ground-truth answer, an integer as a string."""
    solution: str
    """Target response: one line per operation, then ``Answer: N``."""

    def messages(self) -> list[dict[str, str]]:
        """Chat messages for this problem: a single user message holding the templated prompt."""
        return [{"role": "user", "content": self.prompt}]


def is_heldout(expression: str) -> bool:
    """True iff the canonical ``expression`` belongs to the held-out split (a fixed SHA-256 bucket)."""
    digest = hashlib.sha256(expression.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def _draw_terms(rng: random.Random, level: int) -> tuple[list[int], list[str]]:
    """Draw the operands and operators of one problem of ``level`` (values stay non-negative)."""
    if level == 1:
        values, ops = [rng.randint(*OPERAND_RANGE), rng.randint(*OPERAND_RANGE)], [rng.choice("+-")]
    elif level == 2:
        values = [rng.randint(*OPERAND_RANGE), rng.randint(*OPERAND_RANGE), rng.randint(*OPERAND_RANGE)]
        ops = [rng.choice("+-"), rng.choice("+-")]
    elif level == 3:
        values = [rng.randint(*FACTOR_RANGE), rng.randint(*FACTOR_RANGE), rng.randint(*OPERAND_RANGE)]
        ops = [TIMES, rng.choice("+-")]
    else:
        raise ValueError(f"unknown level {level}; known levels are {LEVELS}")
    # Guard against negative values: a first subtraction takes the larger operand first, a later one that
    # would go below zero becomes an addition.
    if ops[0] == "-" and values[1] > values[0]:
        values[0], values[1] = values[1], values[0]
    if len(ops) > 1 and ops[1] == "-" and values[2] > apply(values[0], ops[0], values[1]):
        ops[1] = "+"
    return values, ops


def _solve(values: Sequence[int], ops: Sequence[str]) -> tuple[int, list[str]]:
    """Evaluate left to right, returning the result and one ``x op y = z`` line per operation."""
    acc = values[0]
    lines: list[str] = []
    for op, v in zip(ops, values[1:], strict=True):
        nxt = apply(acc, op, v)
        lines.append(f"{acc} {op} {v} = {nxt}")
        acc = nxt
    return acc, lines


def _make_problem(level: int, values: Sequence[int], ops: Sequence[str], phrasing: int) -> ArithmeticProblem:
    """Assemble the problem text, prompt, answer and solution for one expression."""
    parts = [str(values[0])]
    for op, v in zip(ops, values[1:], strict=True):
        parts += [op, str(v)]
    expression = " ".join(parts)
    problem = _PHRASINGS[phrasing].format(expr=expression)
    result, lines = _solve(values, ops)
    answer = str(result)
    solution = "\n".join([*lines, f"Answer: {answer}"])
    return ArithmeticProblem(
        level=level,
        expression=expression,
        problem=problem,
        prompt=apply_dapo_template(problem),
        answer=answer,
        solution=solution,
    )


def _draw_problem(rng: random.Random, level: int) -> ArithmeticProblem:
    """Draw one problem of ``level`` (either split)."""
    values, ops = _draw_terms(rng, level)
    return _make_problem(level, values, ops, rng.randrange(len(_PHRASINGS)))


class ArithmeticTask:
    """Deterministic generator of arithmetic problems with disjoint training and held-out splits.

    The training stream and the held-out set come from separate random streams seeded by ``seed``; levels are
    drawn uniformly for training and in rotation for the held-out set (each level equally represented, up to
    level 1's few dozen held-out problems).
    """

    def __init__(self, seed: int = 0, levels: tuple[int, ...] = LEVELS) -> None:
        """Create the task; ``levels`` is a non-empty subset of :data:`LEVELS`."""
        # Guard: an empty or unknown level would make every draw fail much later with a less useful message.
        if not levels or any(lv not in LEVELS for lv in levels):
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels!r}")
        self.seed = seed
        self.levels = tuple(levels)

    def iter_train(self) -> Iterator[ArithmeticProblem]:
        """Endless stream of training problems (never held-out ones); repeats are possible."""
        rng = random.Random(f"dapo-arithmetic-train-{self.seed}")
        while True:
            p = _draw_problem(rng, rng.choice(self.levels))
            if not is_heldout(p.expression):
                yield p

    def train_problems(self, n: int) -> list[ArithmeticProblem]:
        """The first ``n`` problems of :meth:`iter_train` (so a longer list extends a shorter one)."""
        stream = self.iter_train()
        return [next(stream) for _ in range(n)]

    def heldout_problems(self, n: int) -> list[ArithmeticProblem]:
        """``n`` distinct held-out problems, levels in rotation; the same for the same seed and levels.

        A level whose held-out space runs out (level 1 has a few hundred problems) leaves the rotation and the
        others fill the rest; ``ValueError`` if all of them run out.
        """
        rng = random.Random(f"dapo-arithmetic-heldout-{self.seed}")
        seen: set[str] = set()
        out: list[ArithmeticProblem] = []
        rotation = list(self.levels)
        misses = 0
        while len(out) < n:
            level = rotation[len(out) % len(rotation)]
            p = _draw_problem(rng, level)
            # Keep only held-out expressions, each once (a repeat would overweight it in an average).
            if is_heldout(p.expression) and p.expression not in seen:
                seen.add(p.expression)
                out.append(p)
                misses = 0
                continue
            misses += 1
            # A level that yields nothing new for this long has no held-out problem left: drop it.
            if misses > _MAX_HELDOUT_MISSES:
                rotation.remove(level)
                misses = 0
                # Guard: with every level exhausted the loop would never end.
                if not rotation:
                    raise ValueError(f"the held-out split has only {len(out)} problems; asked for {n}")
        return out

    @staticmethod
    def to_examples(problems: Sequence[ArithmeticProblem], split: str = "train") -> list[Example]:
        """Convert problems to dataset :class:`~dapo.data.dataset.Example` rows.

        ``data_source`` is "arithmetic", ``source`` is "arithmetic:<split>" (there is no file) and ``row`` is
        the index in ``problems``; the uid is the dataset's prompt hash, so equal prompts deduplicate as in
        files.
        """
        out: list[Example] = []
        for i, p in enumerate(problems):
            messages = tuple(Message(role=m["role"], content=m["content"]) for m in p.messages())
            out.append(
                Example(
                    uid=prompt_uid(messages),
                    messages=messages,
                    answer=p.answer,
                    data_source=DATA_SOURCE,
                    source=f"{DATA_SOURCE}:{split}",
                    row=i,
                )
            )
        return out
