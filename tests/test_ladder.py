"""bench/ladder.py: each row is the embedded default plus exactly its ladder config's algorithm settings, and
a row is read at its equal-sample-budget evaluation."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from dapo.config import load_config
from dapo.report import load_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ladder


@pytest.mark.parametrize("row", [name for name, _ in ladder.ROWS])
def test_rows_take_their_ladder_configs_settings_and_nothing_else(row: str, tmp_path: Path) -> None:
    tiny = load_config("tiny", ladder.TASK)
    ours = load_config("tiny", ladder.overrides(row, seed=1, steps=7, out=tmp_path))
    paper = load_config(row)  # the preset: the paper's scale, the row's algorithm
    assert ours.algorithm == paper.algorithm
    assert ours.reward.soft_overlong_punishment == paper.reward.soft_overlong_punishment
    # everything else is the embedded default with the ladder's task settings
    for section in ("model", "data", "rollout", "actor", "evaluation", "logging", "checkpoint"):
        assert getattr(ours, section) == getattr(tiny, section), section
    assert dataclasses.replace(ours.reward, soft_overlong_punishment=True) == tiny.reward
    assert (ours.trainer.seed, ours.trainer.total_steps, ours.trainer.run_name) == (1, 7, f"{row}-s1")
    assert ours.rollout.max_response_length == 26 and ours.reward.overlong_cache_length == 4


def test_naive_grpo_and_dapo_rows_by_hand(tmp_path: Path) -> None:
    first = load_config("tiny", ladder.overrides(ladder.ROWS[0][0], 0, 5, tmp_path)).algorithm
    assert (first.eps_low, first.eps_high, first.loss_aggregation) == (0.2, 0.2, "seq-mean-token-mean")
    assert not first.dynamic_sampling and not first.overlong_filter and first.dual_clip_c is None
    last = load_config("tiny", ladder.overrides(ladder.ROWS[-1][0], 0, 5, tmp_path)).algorithm
    assert (last.eps_high, last.loss_aggregation, last.dynamic_sampling) == (0.28, "token-mean", True)


def test_budget_point_is_the_evaluation_closest_to_the_sample_budget(tmp_path: Path) -> None:
    rows: list[dict[str, float]] = [{"step": 0, ladder.EVAL_KEY: 0.3}]
    for s in range(1, 31):
        if s % 10 == 0:
            rows.append({"step": s, ladder.EVAL_KEY: 0.3 + s / 100})
        rows.append({"step": s, "rollout/responses": 320.0, "time/step_s": 2.0, "rollout/truncated_frac": 0.1,
                     "rollout/response_length_mean": 20.0})  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # budget 20 steps x 256 = 5,120 responses; at 320 per step: step 10 has 3,200, step 20 6,400 -> step 20
    p = ladder.budget_point(load_run(tmp_path), budget=20 * 256)
    assert (p.step, p.samples, p.start, p.final, p.seconds) == (20, 6400, 0.3, 0.5, 40.0)
    assert "| naive GRPO | 0.300 (0.300) | 0.500 (0.500) | 20 (20) | 6,400 (6,400) |" in ladder.table(
        {ladder.ROWS[0][0]: [p]}, 5120
    )
