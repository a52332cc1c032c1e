"""The built-in Countdown task (`dapo.data.countdown`) and its verifier (`dapo.rewards.countdown`)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from dapo.config import ConfigError, load_config
from dapo.data.countdown import CountdownTask, ground_truth, is_heldout, render, solutions, trace
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


def test_warm_up_traces_are_diverse_and_wrong_at_the_asked_share() -> None:
    rng = random.Random(0)
    problems = CountdownTask(seed=3).train_problems(400)
    results = [(p, trace(p, rng, wrong_fraction=0.25)) for p in problems]
    wrong = [t for p, t in results if not compute_score(t, p.answer).acc]
    assert 0.18 < len(wrong) / len(results) < 0.32
    assert all(t.splitlines()[-1].startswith("Answer: ") for _, t in results)
    # a wrong attempt is valid work that misses: only its answer fails the verifier's checks
    p = problems[0]
    again = {trace(p, random.Random(s)) for s in range(40)}
    assert len({t for t in again if compute_score(t, p.answer).acc}) >= 2  # several solutions drawn


def test_the_tiny_recipe_builds_a_countdown_model(tmp_path: Path) -> None:
    from dapo.models import tiny

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    small = tiny.TinyRecipe(
        task="countdown", wrong_fraction=0.2, sft_steps=3, batch_size=4, tokenizer_corpus=200,
        warmup_steps=1, val_problems=4, target_accuracy=0.0, **sizes,
    )  # fmt: skip
    as_arithmetic = dataclasses.replace(small, task="arithmetic", wrong_fraction=0.0)
    assert tiny.recipe_key(small) != tiny.recipe_key(as_arithmetic)
    report = tiny.build_tiny_model(small, tmp_path)
    assert report.steps == 3 and report.max_response_tokens > 10
    stream = tiny._warmup_stream(small)
    texts = [next(stream).solution for _ in range(50)]
    assert any("×" in t for t in texts) and len(set(texts)) >= 45
    assert tiny.RECIPES["tiny-countdown"].task == "countdown"
    with pytest.raises(ValueError, match="wrong_fraction"):
        tiny.TinyRecipe(wrong_fraction=0.2)  # arithmetic has one solution: no wrong traces
    with pytest.raises(ValueError, match="task"):
        tiny.TinyRecipe(task="chess")
