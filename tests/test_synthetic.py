"""The built-in arithmetic task: determinism, disjoint splits, correct answers and verifiable solutions."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from dapo.data.dataset import Example
from dapo.data.synthetic import (
    DATA_SOURCE,
    HELDOUT_PERCENT,
    LEVELS,
    OPERAND_RANGE,
    ArithmeticProblem,
    ArithmeticTask,
    is_heldout,
)
from dapo.data.templates import apply_dapo_template, strip_dapo_template
from dapo.rewards.math_dapo import compute_score

_TOKEN = re.compile(r"\d+|[+\-×]")


def _evaluate(expression: str) -> int:
    """Evaluate an expression of the task independently of the generator: × binds tighter than + and -."""
    tokens = _TOKEN.findall(expression)
    assert " ".join(tokens) == expression, f"unexpected characters in {expression!r}"
    # Fold products first, then sum the signed terms.
    terms: list[int] = []
    signs: list[int] = [1]
    current = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        if op == "×":
            current *= int(num)
        else:
            terms.append(current)
            signs.append(1 if op == "+" else -1)
            current = int(num)
    terms.append(current)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def test_same_seed_same_problems_and_other_seed_differs() -> None:
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert a.train_problems(200) == b.train_problems(200)
    assert a.heldout_problems(50) == b.heldout_problems(50)
    other = ArithmeticTask(seed=4)
    assert other.train_problems(200) != a.train_problems(200)
    assert other.heldout_problems(50) != a.heldout_problems(50)


def test_train_list_is_a_prefix_of_a_longer_list() -> None:
    task = ArithmeticTask(seed=0)
    assert task.train_problems(300)[:120] == task.train_problems(120)


def test_heldout_and_train_are_disjoint() -> None:
    task = ArithmeticTask(seed=0)
    train = {p.expression for p in task.train_problems(20_000)}
    heldout = task.heldout_problems(600)
    held = {p.expression for p in heldout}
    assert len(held) == 600, "held-out problems are distinct"
    assert not train & held
    assert all(is_heldout(e) for e in held)
    assert not any(is_heldout(e) for e in train)
    # Disjoint across seeds too: the split is a property of the expression, not of the seed.
    assert not {p.expression for p in ArithmeticTask(seed=7).train_problems(5_000)} & held


def test_heldout_bucket_is_about_ten_percent() -> None:
    # All level-1 additions (90 x 90); the hash bucket should hold close to HELDOUT_PERCENT of them.
    expressions = [f"{a} + {b}" for a in range(10, 100) for b in range(10, 100)]
    fraction = sum(map(is_heldout, expressions)) / len(expressions)
    assert abs(fraction - HELDOUT_PERCENT / 100) < 0.02


@pytest.mark.parametrize("level", LEVELS)
def test_answers_and_solutions_are_correct(level: int) -> None:
    task = ArithmeticTask(seed=0, levels=(level,))
    for p in task.train_problems(300) + task.heldout_problems(40):
        assert p.level == level
        value = _evaluate(p.expression)
        assert value >= 0
        assert p.answer == str(value)
        assert p.expression in p.problem
        assert p.solution.endswith(f"\nAnswer: {value}")
        # Every work line is a true equation, and each line continues from the previous result.
        lines = p.solution.split("\n")[:-1]
        previous = None
        for line in lines:
            lhs, rhs = line.split(" = ")
            assert _evaluate(lhs) == int(rhs)
            if previous is not None:
                assert lhs.startswith(previous + " ")
            previous = rhs
        assert previous == p.answer
        score = compute_score(p.solution, p.answer)
        assert score.score == 1.0 and score.acc
        assert compute_score(p.solution, str(value + 1)).score == -1.0


def test_prompt_is_the_dapo_template_and_messages_hold_it() -> None:
    p = ArithmeticTask(seed=0).train_problems(1)[0]
    assert p.prompt == apply_dapo_template(p.problem)
    assert strip_dapo_template(p.prompt) == p.problem
    assert p.messages() == [{"role": "user", "content": p.prompt}]


def test_levels_differ_in_shape() -> None:
    task = ArithmeticTask(seed=0)
    by_level: dict[int, list[ArithmeticProblem]] = {}
    for p in task.train_problems(900):
        by_level.setdefault(p.level, []).append(p)
    assert set(by_level) == set(LEVELS)
    # Level 1: one operation, level 2: two of + / -, level 3: a product then + / -.
    assert all(p.solution.count("\n") == 1 for p in by_level[1])
    assert all(p.solution.count("\n") == 2 and "×" not in p.expression for p in by_level[2])
    assert all(p.solution.count("\n") == 2 and "×" in p.expression for p in by_level[3])
    # Levels are drawn uniformly: each is roughly a third of the stream.
    counts = Counter(p.level for p in task.train_problems(900))
    assert all(200 < c < 400 for c in counts.values())


def test_heldout_rotates_levels() -> None:
    held = ArithmeticTask(seed=0, levels=(1, 3)).heldout_problems(10)
    assert [p.level for p in held] == [1, 3] * 5


def test_exhausted_heldout_level_leaves_the_rotation() -> None:
    # Level 1's whole held-out space, enumerated independently of the generator.
    lo, hi = OPERAND_RANGE
    space = {f"{a} + {b}" for a in range(lo, hi + 1) for b in range(lo, hi + 1)}
    space |= {f"{a} - {b}" for a in range(lo, hi + 1) for b in range(lo, a + 1)}
    level1_heldout = {e for e in space if is_heldout(e)}
    assert 30 < len(level1_heldout) < 150
    with pytest.raises(ValueError, match="held-out split has only"):
        ArithmeticTask(levels=(1,)).heldout_problems(len(level1_heldout) + 1)
    held = ArithmeticTask(levels=(1, 2)).heldout_problems(2 * len(level1_heldout) + 50)
    assert {p.expression for p in held if p.level == 1} == level1_heldout
    assert len({p.expression for p in held}) == len(held)


def test_bad_levels_rejected() -> None:
    with pytest.raises(ValueError, match="levels"):
        ArithmeticTask(levels=(4,))
    with pytest.raises(ValueError, match="levels"):
        ArithmeticTask(levels=())


def test_to_examples() -> None:
    problems = ArithmeticTask(seed=0).heldout_problems(5)
    examples = ArithmeticTask.to_examples(problems, "heldout")
    assert all(isinstance(e, Example) for e in examples)
    assert [e.answer for e in examples] == [p.answer for p in problems]
    assert [e.prompt_text for e in examples] == [p.prompt for p in problems]
    assert {e.data_source for e in examples} == {DATA_SOURCE}
    assert [e.row for e in examples] == list(range(5))
    assert examples[0].chat_messages() == problems[0].messages()
    assert len({e.uid for e in examples}) == 5
    # The uid depends only on the prompt: the same problem converted again has the same uid.
    assert ArithmeticTask.to_examples(problems[:1], "train")[0].uid == examples[0].uid
