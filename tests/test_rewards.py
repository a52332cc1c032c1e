"""Tests for dapo.rewards: the reference verifier, the symbolic one, user functions, and the scoring pool."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dapo.config import RewardConfig
from dapo.rewards import RewardPool, RewardResult, ScoreBatch, compute_score, load_reward_fn, symbolic
from dapo.rewards.base import to_reward_result
from dapo.rewards.math_dapo import extract_answer, normalize_answer
from dapo.rewards.pool import hard_limit_s, make_reward_pool

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
USER_FN = "tests.reward_fns:misbehaving"
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- math_dapo


def test_math_dapo_matches_every_reference_example() -> None:
    path = DATA / "reward_examples.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is missing (the shared data folder beside the repository)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 150
    mismatches = []
    for i, row in enumerate(rows):
        got = compute_score(row["response"], row["ground_truth"])
        want = RewardResult(row["score"], row["acc"], row["pred"])
        if got != want:
            mismatches.append((i, row["response"][-80:], row["ground_truth"], got, want))
    assert not mismatches, mismatches


# (rule, raw answer text, normalised); worked out by hand from the reference verifier (verl's math_dapo.py).
NORMALISATION_CASES = [
    ("last '='", "x = 5", "5"),
    ("last '=' of several", "a=b=7", "7"),
    ("'=' split before unwrapping", "\\text{x=5}", "5}"),
    ("'an ' removed", "an 809", "809"),
    ("'a ' removed", "a 116", "116"),
    ("'a ' cut out of words", "banana split", "banansplit"),
    ("'an ' before 'a '", "can do", "cdo"),
    ("'.$' -> '$'", "$5.$", "5"),
    ("'\\$' removed", "\\$5", "5"),
    ("'\\ ' removed", "1\\ 000", "1000"),
    ("spaces removed", "The answer is 5", "Theansweris5"),
    ("mbox -> text, then unwrapped", "\\mbox{5}", "5"),
    (",\\text{and} -> ,", "x,\\text{and}y", "x,y"),
    ("\\text{and} -> ,", "x\\text{and}y", "x,y"),
    ("\\text{m} -> \\text{} -> removed", "5\\text{m}", "5"),
    ("\\text{m}^2 -> \\text{}^2 -> removed", "5\\text{m}^2", "5"),
    ("unit word removed", "12 degrees", "12"),
    ("unit word removed inside \\text", "5\\text{cm}", "5"),
    ("removals are substrings", "issue", "is"),
    ("removal order: square before units", "squareunits", ""),
    ("\\ldots removed, then commas of digits", "1,2,\\ldots", "12"),
    ("\\text{s} removed", "3\\text{s}", "3"),
    ("\\text{<newline>s} removed", "3\\text{\ns}", "3"),
    ("\\text{<newline>} removed", "3\\text{\n}", "3"),
    ("\\text{s} needs the literal s", "3\\text{ns}", "3ns"),
    ("\\mathrm{th} removed", "5\\mathrm{th}", "5"),
    ("^\\circ removed", "30^\\circ", "30"),
    ("^{\\circ} removed", "30^{\\circ}", "30"),
    ("\\; removed", "1\\;000", "1000"),
    (",\\! removed", "1,\\!000", "1000"),
    ("{,} removed", "1{,}000", "1000"),
    ("double quote removed", '"5"', "5"),
    ("\\dots removed", "1,2,\\dots", "12"),
    ("first $...$ span kept", "$5$ or $6$", "5"),
    ("text before the span dropped", "so$7$", "7"),
    ("lone $ dropped", "5$", "5"),
    ("empty span", "5$$", ""),
    ("\\text unwrapped, all matches", "\\text{5}\\text{6}", "56"),
    ("\\text unwrap is shortest", "\\text{\\frac{1}{2}}", "\\frac{1{2}}"),
    ("\\textbf unwrapped", "\\textbf{7}", "7"),
    ("\\overline unwrap is shortest", "\\overline{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}{2}}"),
    ("\\boxed unwrap is longest", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed longest across two boxes", "\\boxed{1}+\\boxed{2}", "1}+\\boxed{2"),
    ("unclosed \\boxed kept", "\\boxed{5", "\\boxed{5"),
    ("frac12 -> frac{1}{2}", "\\frac12", "\\frac{1}{2}"),
    ("dfrac34 -> dfrac{3}{4}", "\\dfrac34", "\\dfrac{3}{4}"),
    ("frac with one braced part", "\\frac1{2}", "\\frac{1}{{}2}"),
    ("frac{ untouched", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("sqrt3 -> sqrt{3}", "2\\sqrt3", "2\\sqrt{3}"),
    ("sqrt{ untouched", "\\sqrt{3}", "\\sqrt{3}"),
    ("digit commas removed", "1,000,000", "1000000"),
    ("commas kept when not all digits", "1,000.5", "1,000.5"),
    ("commas kept in tuples", "(1,2)", "(1,2)"),
    ("leading zero kept", "0116", "0116"),
    ("other white space stripped", "\t9\n", "9"),
    ("[INVALID] passes through", "[INVALID]", "[INVALID]"),
]


@pytest.mark.parametrize(
    ("rule", "raw", "expected"), NORMALISATION_CASES, ids=[c[0] for c in NORMALISATION_CASES]
)
def test_math_dapo_normalisation_rules(rule: str, raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected, rule


EXTRACTION_CASES = [
    ("plain", "work\nAnswer: 5", "5"),
    ("case-insensitive, spaces around colon", "ANSWER :  7", "7"),
    ("last match wins", "Answer: 1\nAnswer: 2", "2"),
    ("stops at the newline", "Answer: 3\nthanks", "3"),
    ("newline after the colon is skipped", "Answer:\n113", "113"),
    ("Final Answer: also matches", "Final Answer: 8", "8"),
    ("no match", "The answer is 9", "[INVALID]"),
    ("only whitespace after the colon", "Answer: ", " "),
    ("'Answer' cut off by the 300-char tail", "Answer: 5\n" + "x" * 291, "[INVALID]"),
    ("'Answer' just inside the tail", "Answer: 5\n" + "x" * 290, "5"),
]


@pytest.mark.parametrize(
    ("case", "response", "expected"), EXTRACTION_CASES, ids=[c[0] for c in EXTRACTION_CASES]
)
def test_math_dapo_extraction(case: str, response: str, expected: str) -> None:
    assert extract_answer(response) == expected, case


@pytest.mark.parametrize(
    ("response", "ground_truth", "correct"),
    [
        ("Answer: 104", "104", True),
        ("Answer: 104", "104 degrees", True),  # the ground truth is normalised too
        ("Answer: 104", "$104$", True),
        ("Answer: \\frac12", "\\frac{1}{2}", True),
        ("Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
        ("Answer: 1/2", "\\frac{1}{2}", False),  # no symbolic maths
        ("Answer: 0.5", "\\frac{1}{2}", False),
        ("\\boxed{104}", "104", False),  # no "Answer:" line
        ("Answer: 1,000", "1000", True),
    ],
)
def test_math_dapo_score(response: str, ground_truth: str, correct: bool) -> None:
    result = compute_score(response, ground_truth)
    assert result.acc is correct
    assert result.score == (1.0 if correct else -1.0)


def test_math_dapo_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="str response and ground_truth"):
        compute_score("Answer: 5", 5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- symbolic


@pytest.mark.parametrize(
    ("response", "ground_truth", "correct"),
    [
        ("so the result is \\boxed{\\frac{1}{2}}", "0.5", True),
        ("Answer: 0.5", "\\frac{1}{2}", True),
        ("Answer: 1/2", "\\frac{1}{2}", True),
        ("Answer: $\\frac{1}{2}$", "1/2", True),
        ("Answer: 3\\sqrt{3}", "3\\sqrt{3}", True),  # undelimited LaTeX after "Answer:"
        ("Answer: 3\\sqrt{3}", "3", False),
        ("Answer: \\dfrac{3}{4}.", "0.75", True),
        ("Answer: 3", "\\frac{1}{2}", False),
        ("Answer: 104\nAnswer: 577", "104", False),  # the last answer counts
    ],
)
def test_symbolic_equivalence(response: str, ground_truth: str, correct: bool) -> None:
    result = symbolic.compute_score(response, ground_truth)
    assert (result.acc, result.score) == (correct, 1.0 if correct else -1.0)
    assert result.pred not in ("", "[INVALID]")


@pytest.mark.parametrize("response", ["", "I think it is 7 or so.", "x = 7 and y = 3"])
def test_symbolic_no_answer(response: str) -> None:
    assert symbolic.compute_score(response, "7") == RewardResult(-1.0, False, "[INVALID]")


def test_symbolic_pred_is_the_parsed_answer() -> None:
    assert symbolic.compute_score("Answer: 1/2", "0.5").pred == "1/2"


def test_symbolic_works_off_the_main_thread() -> None:
    # math-verify's signal-based timeouts raise outside the main thread unless turned off.
    results: list[RewardResult] = []
    thread = threading.Thread(target=lambda: results.append(symbolic.compute_score("Answer: 1/2", "0.5")))
    thread.start()
    thread.join()
    assert results == [RewardResult(1.0, True, "1/2")]


def test_symbolic_unparseable_ground_truth_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot parse the ground truth"):
        symbolic.compute_score("Answer: 1", "")


# ------------------------------------------------------------------------------------------ user functions


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (RewardResult(0.3, True, "p"), RewardResult(0.3, True, "p")),
        (True, RewardResult(1.0, True, "")),
        (False, RewardResult(-1.0, False, "")),
        (0.5, RewardResult(0.5, True, "")),
        (0, RewardResult(0.0, False, "")),
        ({"score": -1}, RewardResult(-1.0, False, "")),
        ({"score": 1.0, "acc": False, "pred": 3}, RewardResult(1.0, False, "3")),
    ],
)
def test_to_reward_result(value: object, expected: RewardResult) -> None:
    assert to_reward_result(value) == expected


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([1.0], TypeError, "my_fn returned list"),
        (None, TypeError, "my_fn returned NoneType"),
        ({"pred": "5"}, TypeError, "without a 'score' key"),
        ({"score": "1"}, TypeError, "'score' of type str"),
        ({"score": 1.0, "acc": "no"}, TypeError, "'acc' as a str"),
        (math.nan, ValueError, "non-finite score"),
    ],
)
def test_to_reward_result_rejects(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        to_reward_result(value, source="my_fn")


def test_load_builtin_and_user_functions() -> None:
    assert load_reward_fn("math_dapo") is compute_score
    assert load_reward_fn("math_verify") is symbolic.compute_score
    assert load_reward_fn("tests.reward_fns:returns_float")("a", "a") == RewardResult(0.5, True, "")
    assert load_reward_fn("tests.reward_fns:returns_bool")("a", "b") == RewardResult(-1.0, False, "")
    with pytest.raises(TypeError, match=re.escape("'tests.reward_fns:returns_list' returned list")):
        load_reward_fn("tests.reward_fns:returns_list")("a", "a")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("math-dapo", "math_dapo, math_verify, countdown or an import path of the form 'package.module:"),
        ("tests.reward_fns:", "package.module:function"),
        ("no_such_module_for_dapo:fn", "cannot import module 'no_such_module_for_dapo'"),
        ("tests.reward_fns:missing", "has no attribute 'missing'"),
        ("tests.reward_fns:NOT_CALLABLE", "not callable"),
    ],
)
def test_load_reward_fn_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_reward_fn(spec)


# ---------------------------------------------------------------------------------------------- pool

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pool() -> Iterator[RewardPool]:
    with RewardPool(USER_FN, num_workers=2, timeout_s=TIMEOUT_S, max_response_chars=500_000) as p:
        yield p


def _check(batch: ScoreBatch, responses: list[str], ground_truths: list[str], bad: dict[int, str]) -> None:
    """Items listed in ``bad`` carry that pred and -1.0; every other item is scored by misbehaving()."""
    assert len(batch.results) == len(responses)
    for i, (response, truth) in enumerate(zip(responses, ground_truths, strict=True)):
        if i in bad:
            assert batch.results[i] == RewardResult(-1.0, False, bad[i]), i
        else:
            correct = response == truth
            assert batch.results[i] == RewardResult(1.0 if correct else -1.0, correct, response), i


def test_pool_survives_hangs_errors_and_oversize(pool: RewardPool) -> None:
    responses = [f"r{i}" for i in range(12)]
    truths = [r if i % 2 == 0 else "other" for i, r in enumerate(responses)]
    responses[3], responses[5], responses[7], responses[9] = "hang", "raise", "x" * 1_000_000, "exit"
    start = time.monotonic()
    batch = pool.score(responses, truths)
    elapsed = time.monotonic() - start
    _check(batch, responses, truths, {3: "[TIMEOUT]", 5: "[ERROR]", 7: "[OVERSIZED]", 9: "[ERROR]"})
    assert (batch.num_timeouts, batch.num_errors, batch.num_oversized) == (1, 2, 1)
    assert batch.metrics() == {
        "reward/verifier_timeouts": 1.0,
        "reward/verifier_errors": 2.0,
        "reward/verifier_oversized": 1.0,
    }
    # One hung item costs about one timeout, not more (the other worker keeps going meanwhile).
    assert elapsed < TIMEOUT_S + 4.0


def test_pool_replaces_stuck_workers(pool: RewardPool) -> None:
    # Two hangs occupy both workers; unless both are killed and replaced, nothing else gets scored.
    responses = ["hang", "hang"] + [f"q{i}" for i in range(20)]
    truths = [f"q{i}" if i % 3 else "no" for i in range(len(responses))]
    batch = pool.score(responses, truths)
    _check(batch, responses, truths, {0: "[TIMEOUT]", 1: "[TIMEOUT]"})
    assert batch.num_timeouts == 2
    # A later call on the same pool runs at full speed, in order, with nothing counted.
    responses = [f"s{i}" for i in range(200)]
    truths = [r if i % 2 else "no" for i, r in enumerate(responses)]
    start = time.monotonic()
    batch = pool.score(responses, truths)
    assert time.monotonic() - start < 3 * TIMEOUT_S
    _check(batch, responses, truths, {})
    assert (batch.num_timeouts, batch.num_errors, batch.num_oversized) == (0, 0, 0)


def test_many_hung_items_end_at_the_batch_deadline() -> None:
    """40 hung items on 2 workers at 1 s each would take 20 s; the batch's 3 s deadline scores every one
    left as a timeout (counted), and the items scored before it keep their scores."""
    responses = ["r0", "r1"] + ["hang"] * 40
    truths = ["r0", "no"] + ["x"] * 40
    with RewardPool(USER_FN, num_workers=2, timeout_s=TIMEOUT_S, batch_timeout_s=3.0) as p:
        start = time.monotonic()
        batch = p.score(responses, truths)
        assert time.monotonic() - start < 3.0 + 2.0
        _check(batch, responses, truths, dict.fromkeys(range(2, 42), "[TIMEOUT]"))
        assert batch.num_timeouts == 40
        assert p.score(["a"], ["a"]).results[0].score == 1.0  # the workers were replaced, the pool works
    assert make_reward_pool(RewardConfig(), collective_timeout_s=600)._batch_timeout_s == 300
    assert make_reward_pool(RewardConfig(batch_timeout_s=20))._batch_timeout_s == 20


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """A trainer killed with SIGKILL while its workers are stuck on hung items (30 s each) leaves no worker
    behind: each exits by itself at its hard limit (1.5 x 2 s + 5 s of starting the item)."""
    script = (
        "import os, sys, threading\n"
        "from dapo.rewards.pool import RewardPool\n"
        "if __name__ == '__main__':\n"
        f"    p = RewardPool({USER_FN!r}, num_workers=2, timeout_s=2)\n"
        "    threading.Thread(target=p.score, args=(['hang', 'hang'], ['a', 'b']), daemon=True).start()\n"
        "    import time; time.sleep(1)\n"
        "    print(' '.join(str(w.process.pid) for w in p._workers), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout is not None
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + hard_limit_s(2) + 3
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_pool_empty_and_bad_input(pool: RewardPool) -> None:
    assert pool.score([], []).results == []
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        pool.score(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"responses\[1\] is a int"):
        pool.score(["a", 1], ["a", "b"])  # type: ignore[list-item]


def test_pool_builtin_verifiers_in_workers() -> None:
    responses = ["Answer: 1/2", "Answer: 3", "\\boxed{0.5}"]
    truths = ["\\frac{1}{2}", "\\frac{1}{2}", "1/2"]
    before = set(mp.active_children())
    with RewardPool("math_verify", num_workers=2, timeout_s=20.0) as p:
        assert len(set(mp.active_children()) - before) == 2
        batch = p.score(responses, truths)
    assert [r.acc for r in batch.results] == [True, False, True]
    assert batch.num_errors == 0
    # close() stopped the workers.
    assert not set(mp.active_children()) - before
    with pytest.raises(RuntimeError, match="after close"):
        p.score(["a"], ["a"])


def test_pool_in_process() -> None:
    pool = RewardPool(USER_FN, num_workers=0, max_response_chars=10)
    responses = ["a", "raise", "x" * 11, "b"]
    batch = pool.score(responses, ["a", "a", "a", "a"])
    _check(batch, responses, ["a"] * 4, {1: "[ERROR]", 2: "[OVERSIZED]"})
    assert (batch.num_timeouts, batch.num_errors, batch.num_oversized) == (0, 1, 1)
    pool.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reward_fn": "nope"}, "unknown reward function 'nope'"),
        ({"num_workers": -1}, "num_workers must be an int >= 0"),
        ({"timeout_s": 0.0}, "timeout_s must be a finite number > 0"),
        ({"max_response_chars": 0}, "max_response_chars must be an int >= 1"),
    ],
)
def test_pool_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardPool(**kwargs)  # type: ignore[arg-type]
