"""The built-in Countdown task (`dapo.data.countdown`) and its verifier (`dapo.rewards.countdown`)."""

from __future__ import annotations

import pytest

from dapo.config import ConfigError, load_config
from dapo.data.countdown import CountdownTask, ground_truth, is_heldout, render, solutions
from dapo.data.prompts import load_examples_for
from dapo.rewards.countdown import compute_score

TRUTH = ground_truth([3, 7, 2], 20)  # "20 from 3 7 2"


@pytest.mark.parametrize(
    ("response", "correct"),
    [
        ("7 + 3 = 10\n10 × 2 = 20\nAnswer: 20", True),
        ("3 - 2 = 1\n7 × 3 = 21\n21 - 1 = 20\nAnswer: 20", False),  # 3 used twice
        ("7 × 3 = 21\n21 - 2 = 19\nAnswer: 20", False),  # the work does not reach the answer
        ("7 + 3 = 11\n11 × 2 = 22\nAnswer: 20", False),  # wrong arithmetic
        ("7 + 3 = 10\n10 × 2 = 20", False),  # no answer line
        ("Answer: 20", False),  # no work
        ("5 × 4 = 20\nAnswer: 20", False),  # numbers not given
        ("7 + 3 = 10\nso far so good\n10 × 2 = 20\nAnswer: 20", False),  # a stray line
        ("7 + 3 = 10\n10 * 2 = 20\nAnswer: 20", True),  # * for ×
        ("  7 + 3 = 10\n\n10 × 2 = 20 \nAnswer: 20\n", True),  # spaces and blank lines
        ("10 × 2 = 20\nAnswer: 20", False),  # 10 is made, not given
    ],
)
def test_the_verifier_checks_every_line(response: str, correct: bool) -> None:
    result = compute_score(response, TRUTH)
    assert result.acc is correct and result.score == (1.0 if correct else -1.0)


def test_a_bad_ground_truth_is_one_line() -> None:
    with pytest.raises(ValueError, match="TARGET from N1 N2"):
        compute_score("Answer: 1", "20")


def test_problems_are_solved_by_their_reference_and_often_otherwise() -> None:
    task = CountdownTask(seed=0)
    problems = task.train_problems(200)
    assert problems == CountdownTask(seed=0).train_problems(200)  # deterministic
    assert {p.level for p in problems} == {1, 2, 3}
    assert all(compute_score(p.solution, p.answer).acc for p in problems)
    assert all(len(p.numbers) == (4 if p.level == 3 else 3) for p in problems)
    counts = [len(solutions(p.numbers, p.target)) for p in problems[:50]]
    assert all(c >= 1 for c in counts)
    assert sum(c > 1 for c in counts) >= 25  # most have several solutions: real choices
    for p in problems[:50]:  # every solution the search finds is correct
        assert all(compute_score(render(s, p.target), p.answer).acc for s in solutions(p.numbers, p.target))


def test_the_held_out_split_is_disjoint_and_distinct() -> None:
    task = CountdownTask(seed=0)
    held = task.heldout_problems(60)
    keys = {ground_truth(sorted(p.numbers), p.target) for p in held}
    assert len(keys) == 60 and all(is_heldout(p.numbers, p.target) for p in held)
    assert not any(is_heldout(p.numbers, p.target) for p in task.train_problems(300))
    assert [p.level for p in held[:6]] == [1, 2, 3, 1, 2, 3]


def test_countdown_is_a_built_in_data_file_with_its_verifier() -> None:
    countdown = ["data.train_files=[countdown]", "evaluation.files=[countdown]", "reward.function=countdown"]
    cfg = load_config(None, countdown)
    examples = load_examples_for(["countdown"], cfg.data, split="test", dedup=True)
    assert len(examples) == 300 and {e.data_source for e in examples} == {"countdown"}
    assert all(" from " in e.answer for e in examples)
    with pytest.raises(ConfigError, match=r"reward\.function"):
        load_config(None, ["data.train_files=[countdown]"])  # math_dapo cannot read its answers
    with pytest.raises(ConfigError, match=r"evaluation\.files are all the built-in countdown task"):
        load_config(
            None,
            ["data.train_files=[countdown]", "reward.function=countdown", "evaluation.files=[arithmetic]"],
        )
