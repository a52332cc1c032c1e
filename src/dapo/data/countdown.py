"""The built-in Countdown task: reach a target from a few numbers with ``+``, ``-`` and ``×``.

A problem gives three or four small numbers and a target ("Use 3, 7, 2 to make 20."); a solution is one line
per operation, each taking two of the numbers still available (the given ones and earlier results, each
used at most once) and adding its result to them, then the line the DAPO template asks for::

    7 + 3 = 10
    10 × 2 = 20
    Answer: 20

Unlike the arithmetic task, most problems have several correct solutions (other orders, other operations,
other subsets of the numbers), so a policy has real choices to make and to lose (entropy at the forking
steps), and a wrong solution can run on for many lines. The ``countdown`` verifier
(`dapo.rewards.countdown`) checks every line, not only the answer.

Levels (the difficulty mix): 1: three numbers, the target made from two of them; 2: three numbers, all
used; 3: four numbers, three or four used. Numbers are 1-10; every intermediate value is an integer in
[0, 200] (a subtraction takes the larger first). The held-out split is a fixed SHA-256 bucket of the
canonical problem (the sorted numbers and the target), disjoint from training by construction, as in
`dapo.data.synthetic`.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dapo.data.dataset import Example, Message, prompt_uid
from dapo.data.templates import apply_dapo_template
from dapo.rewards.countdown import OPS, apply

__all__ = [
    "DATA_SOURCE",
    "LEVELS",
    "CountdownProblem",
    "CountdownTask",
    "ground_truth",
    "solutions",
    "trace",
]

DATA_SOURCE = "countdown"
"""The ``data_source`` of every example this task produces (and the name in ``data.train_files``)."""

LEVELS: tuple[int, ...] = (1, 2, 3)
HELDOUT_PERCENT = 10
NUMBER_RANGE = (1, 10)
MAX_VALUE = 200
"""Largest intermediate value a generated solution reaches."""
_PHRASINGS = ("Use {numbers} to make {target}.", "Make {target} from {numbers}.")

Step = tuple[int, str, int, int]
"""One line of a solution: (left, operator, right, result)."""


@dataclass(frozen=True)
class CountdownProblem:
    level: int
    numbers: tuple[int, ...]
    target: int
    prompt: str
    """The problem in the DAPO prompt template (the user message)."""
    answer: str
    """The ground truth the verifier reads: `ground_truth` of the numbers and the target."""
    solution: str
    """One correct solution: the chain of operations the target was made by (`solutions` finds the
    others)."""

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def ground_truth(numbers: Sequence[int], target: int) -> str:
    """The ground-truth string of a problem: ``"20 from 3 7 2"`` (the `countdown` verifier parses it)."""
    return f"{target} from {' '.join(map(str, numbers))}"


def _steps_from(pool: tuple[int, ...]) -> Iterator[tuple[Step, tuple[int, ...]]]:
    """Every line one step can write from ``pool`` (a commutative operation once per pair, larger first),
    with the pool after it."""
    for i, j in itertools.combinations(range(len(pool)), 2):
        a, b = max(pool[i], pool[j]), min(pool[i], pool[j])
        rest = tuple(v for k, v in enumerate(pool) if k not in (i, j))
        for op in OPS:
            value = apply(a, op, b)
            if 0 <= value <= MAX_VALUE:
                yield (a, op, b, value), (*rest, value)


def solutions(numbers: Sequence[int], target: int, *, limit: int = 64) -> list[list[Step]]:
    """Up to ``limit`` distinct solutions (lists of lines) that reach ``target`` from ``numbers``, shortest
    first; a solution stops at its first line whose result is the target."""
    found: list[list[Step]] = []
    frontier: list[tuple[tuple[int, ...], list[Step]]] = [(tuple(numbers), [])]
    while frontier and len(found) < limit:
        nxt: list[tuple[tuple[int, ...], list[Step]]] = []
        for pool, lines in frontier:
            for step, after in _steps_from(pool):
                if step[3] == target:
                    found.append([*lines, step])
                    if len(found) == limit:
                        return found
                elif len(after) > 1:
                    nxt.append((after, [*lines, step]))
        frontier = nxt
    return found


def render(lines: Sequence[Step], target: int) -> str:
    """A solution's text: its lines, then ``Answer: target``."""
    return "\n".join([*(f"{a} {op} {b} = {c}" for a, op, b, c in lines), f"Answer: {target}"])


def trace(problem: CountdownProblem, rng: random.Random, wrong_fraction: float = 0.0) -> str:
    """A worked attempt at ``problem`` for a warm-up: with probability ``1 - wrong_fraction`` one of its
    solutions chosen uniformly (`solutions`), else a wrong attempt: one to all-but-one random valid lines
    that never reach the target, answered with the last line's value."""
    if rng.random() >= wrong_fraction:
        return render(rng.choice(solutions(problem.numbers, problem.target, limit=16)), problem.target)
    pool, lines = tuple(problem.numbers), []
    for _ in range(rng.randint(1, len(pool) - 1)):
        steps = [(step, after) for step, after in _steps_from(pool) if step[3] != problem.target]
        if not steps:
            break
        step, pool = rng.choice(steps)
        lines.append(step)
    if not lines:  # every first line reaches the target: no wrong attempt to make
        return render(rng.choice(solutions(problem.numbers, problem.target, limit=16)), problem.target)
    return render(lines, lines[-1][3])


def is_heldout(numbers: Sequence[int], target: int) -> bool:
    """True iff the problem (its sorted numbers and target) is in the held-out split's hash bucket."""
    key = ground_truth(sorted(numbers), target).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100 < HELDOUT_PERCENT


def _draw(rng: random.Random, level: int) -> CountdownProblem | None:
    """One problem of ``level``, or None where the draw made no usable target."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level}; known levels are {LEVELS}")
    count = 4 if level == 3 else 3
    numbers = tuple(rng.randint(*NUMBER_RANGE) for _ in range(count))
    uses = {1: 2, 2: 3, 3: rng.choice((3, 4))}[level]
    pool = list(numbers[:uses])
    value = pool[0]
    lines: list[Step] = []
    for v in pool[1:]:  # a random chain over the numbers it uses
        choices = [(max(value, v), op, min(value, v)) for op in OPS]
        a, op, b = rng.choice(choices)
        value = apply(a, op, b)
        if not 0 <= value <= MAX_VALUE:
            return None
        lines.append((a, op, b, value))
    if value in numbers or value == 0:  # no problem whose answer is given, or trivially 0
        return None
    shuffled = rng.sample(numbers, len(numbers))
    text = rng.choice(_PHRASINGS).format(numbers=", ".join(map(str, shuffled)), target=value)
    return CountdownProblem(
        level=level,
        numbers=tuple(shuffled),
        target=value,
        prompt=apply_dapo_template(text),
        answer=ground_truth(shuffled, value),
        solution=render(lines, value),
    )


class CountdownTask:
    """Deterministic generator of Countdown problems with disjoint training and held-out splits (the
    interface of `dapo.data.synthetic.ArithmeticTask`)."""

    def __init__(self, seed: int = 0, levels: tuple[int, ...] = LEVELS) -> None:
        if not levels or any(lv not in LEVELS for lv in levels):
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels!r}")
        self.seed, self.levels = seed, tuple(levels)

    def _stream(self, name: str, heldout: bool) -> Iterator[CountdownProblem]:
        rng = random.Random(f"dapo-countdown-{name}-{self.seed}")
        turn = 0
        while True:
            level = rng.choice(self.levels) if not heldout else self.levels[turn % len(self.levels)]
            p = _draw(rng, level)
            if p is not None and is_heldout(p.numbers, p.target) == heldout:
                turn += 1
                yield p

    def iter_train(self) -> Iterator[CountdownProblem]:
        """Endless stream of training problems (never held-out ones); repeats are possible."""
        return self._stream("train", heldout=False)

    def train_problems(self, n: int) -> list[CountdownProblem]:
        stream = self.iter_train()
        return [next(stream) for _ in range(n)]

    def heldout_problems(self, n: int) -> list[CountdownProblem]:
        """``n`` distinct held-out problems, levels in rotation; the same for the same seed and levels."""
        seen: set[str] = set()
        out: list[CountdownProblem] = []
        for p in self._stream("heldout", heldout=True):
            key = ground_truth(sorted(p.numbers), p.target)
            if key not in seen:
                seen.add(key)
                out.append(p)
                if len(out) == n:
                    break
        return out

    @staticmethod
    def to_examples(problems: Sequence[CountdownProblem], split: str = "train") -> list[Example]:
        """Dataset rows: ``data_source`` "countdown", ``source`` "countdown:<split>", the answer the verifier
        reads."""
        out = []
        for i, p in enumerate(problems):
            messages = tuple(Message(role=m["role"], content=m["content"]) for m in p.messages())
            out.append(Example(uid=prompt_uid(messages), messages=messages, answer=p.answer,
                               data_source=DATA_SOURCE, source=f"{DATA_SOURCE}:{split}", row=i))  # fmt: skip
        return out
