"""Dynamic sampling with a scripted engine: what is kept, how rounds are sized, carry-over, exhaustion."""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytest
import torch

from dapo.collect import (
    AheadCollector,
    Collected,
    Collector,
    CollectSettings,
    Group,
    make_train_batch,
    response_metrics,
)
from dapo.data import PromptSampler
from dapo.rewards import RewardPool
from dapo.rollout.base import Completion, SamplingParams

CORRECT, WRONG = 1, 2  # token ids the fake decode turns into a right / wrong final answer


class ScriptedEngine:
    """Prompt `[e]` (example e) gets `correct[e]` correct responses out of n; records each round's prompts."""

    def __init__(self, correct: list[int], length: int = 3) -> None:
        self.correct = correct
        self.length = length
        self.rounds: list[list[int]] = []

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        self.rounds.append([p[0] for p in prompts])
        out = []
        for i, p in enumerate(prompts):
            for j in range(sampling.n):
                tok = CORRECT if j < self.correct[p[0]] else WRONG
                ids = [tok] * self.length
                out.append(Completion(i, ids, [-0.5] * self.length, "stop"))
        return out

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        pass


def decode(ids: list[int]) -> str:
    return "Answer: 7" if ids and ids[0] == CORRECT else "Answer: 8"


def make_collector(
    correct: list[int], n: int, *, g: int = 4, max_epochs: int | None = None, **settings: object
) -> tuple[Collector, ScriptedEngine]:
    engine = ScriptedEngine(correct)
    pool = RewardPool("math_dapo", num_workers=0)
    collector = Collector(
        engine,
        prompts=[[e] for e in range(len(correct))],
        answers=["7"] * len(correct),
        data_sources=["toy"] * len(correct),
        sampler=PromptSampler(len(correct), seed=0, shuffle=False, max_epochs=max_epochs),
        scorer=pool.score,
        decode=decode,
        sampling=SamplingParams(n=g, max_tokens=8),
        settings=CollectSettings(
            groups_per_step=n,
            **{"soft_overlong_punishment": False, **settings},  # type: ignore[arg-type]
        ),
        seed=0,
    )
    return collector, engine


def test_keeps_only_mixed_groups_and_reports_the_prefilter_picture() -> None:
    # examples 0..5 with 4, 0, 2, 1, 4, 3 correct of G=4: mixed are 2, 3, 5
    collector, engine = make_collector([4, 0, 2, 1, 4, 3], n=2, max_oversample=3.0)
    out = collector.collect(step=1)
    # round 1: keep-rate estimate 1.0 → 2 prompts (0, 1): both unanimous, nothing kept
    # round 2: measured rate 0/2 → bounded by max_oversample: 2 x 3 = 6 prompts; 4 are left this epoch
    #          and the sampler wraps: 2, 3, 4, 5, 0, 1 → keeps 2, 3, 5 → 2 in the batch, 1 carried
    assert engine.rounds == [[0, 1], [2, 3, 4, 5, 0, 1]]
    assert [g.example_index for g in out.groups] == [2, 3]
    assert [g.example_index for g in collector.carried] == [5]
    m = out.metrics
    assert m["filter/rounds"] == 2 and m["filter/groups_generated"] == 8
    # all-correct: 0, 4, 0 → 3/8; all-wrong: 1, 1 → 2/8; kept 3/8
    assert m["filter/all_correct_frac"] == pytest.approx(3 / 8)
    assert m["filter/all_wrong_frac"] == pytest.approx(2 / 8)
    assert m["filter/kept_frac"] == pytest.approx(3 / 8)
    # accuracy before filtering: (4+0+2+1+4+3+4+0)/32
    assert m["filter/acc_before"] == pytest.approx(18 / 32)
    assert m["filter/rollouts_per_kept_group"] == pytest.approx(32 / 3)
    assert m["filter/carried_out"] == 1 and m["filter/skipped_step"] == 0


def test_surplus_is_carried_into_the_next_step_and_sizes_rounds_from_the_keep_rate() -> None:
    collector, engine = make_collector([4, 0, 2, 1, 4, 3], n=2)
    collector.collect(step=1)
    out = collector.collect(step=2)
    # the carried group 5 (from step 1, age 1) fills one slot; one more is needed
    assert out.groups[0].example_index == 5 and out.groups[0].step == 1
    assert out.metrics["filter/carried_in"] == 1
    assert out.metrics["filter/carried_age_mean"] == pytest.approx(0.5)
    # keep-rate estimate after step 1: decayed counts 0.7*2 + 6 = 7.4 generated, 0.7*0 + 3 = 3 kept
    # → rate 3/7.4 = 0.405 → ceil(1 / 0.405) = 3 prompts: 2, 3, 4 (2 and 3 are kept)
    assert engine.rounds[-1] == [2, 3, 4]
    assert [g.example_index for g in out.groups] == [5, 2]
    assert [g.example_index for g in collector.carried] == [3]


def test_stale_carried_groups_are_dropped() -> None:
    collector, _ = make_collector([2, 2, 2, 2], n=1)
    collector.carried = [
        Group(0, "toy", [0], [[1]], [[0.0]], [False], [True], [1.0], step=1),
    ]
    out = collector.collect(step=3)  # two steps later: too stale, regenerated instead
    assert all(g.step == 3 for g in out.groups)


def test_data_exhaustion_trains_on_a_partial_batch_or_skips_without_raising() -> None:
    # one epoch of 4 examples, only 2 informative; N = 3
    collector, _ = make_collector([2, 4, 1, 0], n=3, max_epochs=1, min_keep_fraction=0.5)
    out = collector.collect(step=1)
    assert len(out.groups) == 2 and out.metrics["filter/data_exhausted"] == 1
    out = collector.collect(step=2)  # nothing left at all
    assert out.skipped and out.metrics["filter/skipped_step"] == 1

    collector, _ = make_collector([2, 4, 4, 0], n=3, max_epochs=1, min_keep_fraction=0.5)
    out = collector.collect(step=1)  # 1 of 3 < 0.5 x 3: skip the update, keep the group for later
    assert out.skipped and [g.example_index for g in collector.carried] == [0]


def test_max_rounds_bounds_generation() -> None:
    collector, engine = make_collector([0, 4, 0, 4], n=2, max_rounds=3)
    out = collector.collect(step=1)
    assert len(engine.rounds) == 3 and out.skipped


def test_without_dynamic_sampling_every_group_is_kept() -> None:
    collector, engine = make_collector([4, 0, 2, 1], n=3, dynamic_sampling=False)
    out = collector.collect(step=1)
    assert engine.rounds == [[0, 1, 2]] and [g.example_index for g in out.groups] == [0, 1, 2]


def test_soft_overlong_punishment_shapes_the_reward_but_not_the_filter() -> None:
    collector, _ = make_collector([4, 2], n=1, soft_overlong_punishment=True)
    collector.s.max_response_length = 4
    collector.s.overlong_cache_length = 2  # length 3 is 1 token into the buffer: penalty (2 - 3) / 2 = -0.5
    out = collector.collect(step=1)
    (group,) = out.groups
    assert group.example_index == 1  # the all-correct group 0 is filtered on acc although its rewards are 0.5
    assert group.rewards == [0.5, 0.5, -1.5, -1.5]


def test_collector_state_round_trip_continues_exactly() -> None:
    a, _ = make_collector([4, 0, 2, 1, 4, 3], n=2)
    a.collect(step=1)
    b, _ = make_collector([4, 0, 2, 1, 4, 3], n=2)
    b.load_state_dict(a.state_dict())
    for step in (2, 3, 4):
        ga, gb = a.collect(step), b.collect(step)
        untimed = [{k: v for k, v in g.metrics.items() if not k.startswith("time/")} for g in (ga, gb)]
        assert ga.groups == gb.groups and untimed[0] == untimed[1]


def test_make_train_batch_packs_prompts_once_and_responses_and_advantages() -> None:
    g1 = Group(
        0, "toy", [5, 6], [[7], [8, 9]], [[-0.1], [-0.2, -0.3]], [False, True], [True, False], [1.0, -1.0], 1
    )
    g2 = Group(1, "toy", [4], [[3], [2]], [[-0.4], [-0.5]], [False, False], [True, False], [1.0, 0.0], 1)
    batch = make_train_batch([g1, g2], pad_token_id=0, overlong_filter=False)
    assert batch.prompt_ids.tolist() == [[5, 6], [0, 4]]  # one row per group, left-padded
    assert batch.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert batch.response_ids.tolist() == [[7, 0], [8, 9], [3, 0], [2, 0]]  # right-padded
    assert batch.response_lengths.tolist() == [1, 2, 1, 1]
    assert batch.response_mask.tolist() == [[1, 0], [1, 1], [1, 0], [1, 0]]  # position j = response token j
    torch.testing.assert_close(
        batch.rollout_logprobs, torch.tensor([[-0.1, 0], [-0.2, -0.3], [-0.4, 0], [-0.5, 0]])
    )
    # rewards (1, -1): mean 0, Bessel std sqrt(2) → ±1/sqrt(2) (eps 1e-6 is negligible)
    assert batch.advantages.tolist() == pytest.approx([0.7071063, -0.7071063] * 2, abs=1e-6)
    filtered = make_train_batch([g1], pad_token_id=0, overlong_filter=True)
    assert filtered.response_mask.tolist() == [[1, 0], [0, 0]]  # the truncated response leaves the loss


class StepCollector:
    """A stand-in collector: step k's batch is one group tagged k; records which thread collected it."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.position = 0

    def collect(self, step: int) -> Collected:
        import threading

        self.calls.append((step, threading.current_thread().name))
        self.position += 1
        group = Group(step, "s", [1], [[2]], [[-0.5]], [False], [True], [1.0], step)
        return Collected(groups=[group], metrics={"filter/rounds": 1.0})

    def state_dict(self) -> dict[str, object]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.position = int(state["position"])  # type: ignore[call-overload]


def test_ahead_collector_off_is_the_collector_itself() -> None:
    inner = StepCollector()
    ahead = AheadCollector(inner, 0)  # type: ignore[arg-type]
    for step in (1, 2):
        collected = ahead.collect(step)
        assert collected.groups[0].step == step and "rollout/staleness" not in collected.metrics
        with ahead.ahead(step + 1, last_step=3):
            pass
    assert [s for s, _ in inner.calls] == [1, 2]  # nothing collected ahead
    assert all(name == "MainThread" for _, name in inner.calls)
    assert ahead.state_dict() == inner.state_dict()


def test_ahead_collector_collects_the_next_step_during_the_body_and_checkpoints_it() -> None:
    inner = StepCollector()
    ahead = AheadCollector(inner, 1)  # type: ignore[arg-type]
    first = ahead.collect(1)
    assert first.metrics["rollout/staleness"] == 0.0
    with ahead.ahead(2, last_step=2):
        pass  # the update would run here
    assert inner.calls[-1][0] == 2 and inner.calls[-1][1].startswith("dapo-ahead")
    state = ahead.state_dict()
    assert state["ahead"]["step"] == 2  # type: ignore[index]
    restored = AheadCollector(StepCollector(), 1)  # type: ignore[arg-type]
    restored.load_state_dict(state)
    second = restored.collect(2)
    assert second.metrics["rollout/staleness"] == 1.0 and second.groups[0].step == 2
    with ahead.ahead(3, last_step=2):  # past the last step: nothing ahead
        pass
    assert [s for s, _ in inner.calls] == [1, 2]


class PollingCollector(StepCollector):
    """A collection that never ends by itself: it asks `dapo.preempt.poll` every millisecond, as the engines
    do, and raises its own error when given up (which must not mask the body's)."""

    def collect(self, step: int) -> Collected:
        from dapo import preempt

        self.position += 1  # the collection has moved the collector on
        try:
            for _ in range(60_000):
                preempt.poll()
                time.sleep(0.001)
        except preempt.Abandoned:
            raise
        raise AssertionError("the collection was never abandoned")


def test_an_update_error_abandons_the_ahead_collection_and_comes_first() -> None:
    inner = PollingCollector()
    ahead = AheadCollector(inner, 1)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="the update failed"), ahead.ahead(2, last_step=3):
        raise ValueError("the update failed")
    assert time.monotonic() - t0 < 5  # not the collection's minute
    assert inner.position == 0 and ahead.pending is None  # the collector as before the collection


def test_a_stop_abandons_the_ahead_collection_and_the_checkpoint_resumes_before_it() -> None:
    inner = PollingCollector()
    ahead = AheadCollector(inner, 1)  # type: ignore[arg-type]
    stop_at = time.monotonic() + 0.2
    t0 = time.monotonic()
    with ahead.ahead(2, last_step=3, stop=lambda: time.monotonic() > stop_at):
        pass  # the update finishes; the stop came during it
    assert time.monotonic() - t0 < 5
    assert ahead.pending is None and ahead.state_dict() == {"position": 0}


def test_response_metrics_by_hand() -> None:
    """Group a: correct [1, 2] twice (1 distinct), wrong [7] * 20 (a loop); group b: all wrong, lengths 3
    and 5. Correct lengths 2, 2; wrong 20, 3, 5; 1 of 5 responses loops; 1 of 2 groups solved."""
    loop = [7] * 20
    a = Group(0, "s", [1], [[1, 2], [1, 2], loop], [[0.0] * 2, [0.0] * 2, [0.0] * 20], [False] * 3,
              [True, True, False], [1.0, 1.0, -1.0], 1)  # fmt: skip
    b = Group(1, "s", [1], [[3, 4, 5], [3, 4, 5, 6, 7]], [[0.0] * 3, [0.0] * 5], [False] * 2, [False, False],
              [-1.0, -1.0], 1)  # fmt: skip
    m = response_metrics([a, b])
    assert m == {
        "rollout/loop_frac": 1 / 5,
        "rollout/pass_at_1": 2 / 5,
        "rollout/pass_at_n": 1 / 2,
        "rollout/correct_length_mean": 2.0,
        "rollout/distinct_correct": 1.0,
        "rollout/wrong_length_mean": 28 / 3,
    }
    assert "rollout/correct_length_mean" not in response_metrics([b])  # no correct response: left out
