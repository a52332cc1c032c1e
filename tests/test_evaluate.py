"""avg@k / pass@k / maj@k, hand-valued, and evaluation over repeated rows (AIME's 32 copies)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from dapo.evaluate import RowScores, evaluate, summarize
from dapo.rewards import RewardPool, RewardResult
from dapo.rollout.base import Completion, SamplingParams


def r(pred: str, acc: bool) -> RewardResult:
    return RewardResult(1.0 if acc else -1.0, acc, pred)


def test_row_metrics_by_hand() -> None:
    # 4 samples: predictions 5, 7, 7, 9 with truth 5 → avg 1/4, pass 1, majority "7" is wrong → maj 0
    row = RowScores("s", [r("5", True), r("7", False), r("7", False), r("9", False)], [1, 2, 3, 4])
    assert (row.avg(), row.passed(), row.majority()) == (0.25, 1.0, 0.0)
    # tie between "5" (seen first, correct) and "7": the first seen wins
    tie = RowScores("s", [r("5", True), r("7", False), r("7", False), r("5", True)], [1, 1, 1, 1])
    assert tie.majority() == 1.0


def test_summary_per_source_and_overall() -> None:
    rows = [
        RowScores("a", [r("1", True), r("1", True)], [2, 4]),  # avg 1, pass 1, maj 1
        RowScores("a", [r("1", False), r("2", False)], [6, 8]),  # avg 0, pass 0, maj 0
        RowScores("b", [r("1", True), r("2", False)], [10, 10]),  # avg .5, pass 1, maj 1 (first seen)
    ]
    m = summarize(rows, k=2)
    assert m["eval/a/avg@2"] == 0.5 and m["eval/a/pass@2"] == 0.5 and m["eval/a/maj@2"] == 0.5
    assert m["eval/a/response_length"] == 5.0 and m["eval/a/rows"] == 2
    assert m["eval/b/avg@2"] == 0.5 and m["eval/b/pass@2"] == 1.0
    assert m["eval/all/avg@2"] == pytest.approx(1.5 / 3) and m["eval/all/rows"] == 3


class CountingEngine:
    """Row i's sample j is correct iff j < i; records prompt batches."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        self.calls.append(len(prompts))
        return [
            Completion(i, [1 if j < p[0] else 2], [0.0], "stop")
            for i, p in enumerate(prompts)
            for j in range(sampling.n)
        ]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        pass


def test_every_row_gets_k_samples_and_repeated_rows_are_kept() -> None:
    engine = CountingEngine()
    prompts = [
        [0],
        [1],
        [2],
        [2],
    ]  # the last two rows are copies of one problem (as in AIME's file): both count
    m = evaluate(
        engine, prompts, ["7"] * 4, ["x"] * 4, RewardPool(num_workers=0).score,
        lambda ids: "Answer: 7" if ids[0] == 1 else "Answer: 8",
        SamplingParams(n=4, seed=0), prompts_per_batch=3,
    )  # fmt: skip
    assert engine.calls == [3, 1]
    # avg: (0 + 1/4 + 2/4 + 2/4) / 4 rows; pass: (0 + 1 + 1 + 1) / 4
    # maj: row 0 all wrong, row 1 three of four wrong → 0; rows 2, 3 tie 2:2, correct "7" seen first → 1
    assert m["eval/x/avg@4"] == pytest.approx(1.25 / 4)
    assert m["eval/x/pass@4"] == 0.75 and m["eval/x/rows"] == 4
    assert m["eval/x/maj@4"] == 0.5
