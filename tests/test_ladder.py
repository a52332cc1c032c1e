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


@pytest.mark.parametrize("row", [name for name, _ in ladder.LADDER])
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
    first = load_config("tiny", ladder.overrides(ladder.ROWS[0].name, 0, 5, tmp_path)).algorithm
    assert (first.eps_low, first.eps_high, first.loss_aggregation) == (0.2, 0.2, "seq-mean-token-mean")
    assert not first.dynamic_sampling and not first.overlong_filter and first.dual_clip_c is None
    last = load_config("tiny", ladder.overrides(ladder.DAPO, 0, 5, tmp_path)).algorithm
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
    text = ladder.table({ladder.ROWS[0].name: [p]}, 5120)
    assert "| naive GRPO | 0.300 (0.300) | 0.500 (0.500) | [0.500, 0.500] | 20 (20) | 6,400 (6,400) |" in text


def test_countdown_rows_run_off_policy_and_the_control_on_policy(tmp_path: Path) -> None:
    """The countdown ladder: its model, data and verifier; 8 updates per step (32 of 256 responses), 16 in
    the paper's row, 1 in the control; the objectives' rows are their presets with the task's settings."""
    config = {r.name: load_config(r.preset, ladder.overrides(r.name, 2, 9, tmp_path, "countdown"))
              for r in ladder.ROWS}  # fmt: skip
    for name, cfg in config.items():
        assert cfg.model.path == "tiny-countdown" and cfg.data.train_files == ["countdown"], name
        assert cfg.reward.function == "countdown" and cfg.evaluation.files == ["countdown"], name
        assert (cfg.trainer.seed, cfg.trainer.total_steps, cfg.trainer.prompts_per_step) == (2, 9, 32), name
        assert cfg.rollout.max_response_length == 40 and cfg.reward.overlong_cache_length == 8, name
    updates = {n: cfg.trainer.prompts_per_step * cfg.rollout.n // cfg.actor.mini_batch_size
               for n, cfg in config.items()}  # fmt: skip
    assert updates[ladder.DAPO] == 8 and updates["dapo_16_updates"] == 16 and updates["dapo_1_update"] == 1
    assert config["dapo_1_update"].algorithm == config[ladder.DAPO].algorithm
    assert config["gspo"].algorithm == load_config("gspo").algorithm


def test_the_interval_widens_with_the_spread_between_seeds() -> None:
    def point(final: float) -> ladder.Point:
        nan = float("nan")
        return ladder.Point(0.1, final, 0.01, 40, 10240, 1.0, 0.0, 20.0, *[nan] * 8)

    low, high = ladder.bootstrap_interval([point(0.2)] * 3)
    assert low < 0.2 < high and high - low < 0.05  # the evaluations' own uncertainty only
    wide = ladder.bootstrap_interval([point(0.1), point(0.2), point(0.3)])
    assert wide[0] < low and wide[1] > high
