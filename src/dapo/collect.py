"""Dynamic sampling (paper §3.2): collect a step's batch of N groups that each have 0 < correct < G.

How this differs from verl's DAPO recipe:
- a round generates only what is still needed, sized from the keep rate measured so far (bounded by
  `max_oversample`), and collection stops as soon as N groups are kept;
- surplus kept groups are carried into the next step instead of being discarded (at most one step stale;
  their age is logged), and they are part of the checkpoint;
- when the data runs out or `max_rounds` is reached, the step trains on what was kept if that is at least
  `min_keep_fraction` of N, else it skips the update; it never raises;
- the pre-filter picture is logged every step (accuracy before filtering, all-correct / all-wrong / kept
  fractions, rollouts per kept group, rounds, carried groups).

The keep filter looks at correctness (`acc`), not at the shaped reward, as the reference does: a correct but
overlong response still counts as correct there, so soft overlong punishment alone never makes a group
"mixed".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dapo import algo, diagnostics, preempt
from dapo.data.sampler import PromptSampler
from dapo.rewards import ScoreBatch
from dapo.rollout.base import Completion, RolloutEngine, SamplingParams
from dapo.train import TrainBatch


@dataclass
class Group:
    """G scored responses to one prompt."""

    example_index: int
    data_source: str
    prompt_ids: list[int]
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    truncated: list[bool]
    acc: list[bool]
    rewards: list[float]  # verifier score + soft overlong punishment
    step: int  # the step whose policy generated it

    @property
    def num_correct(self) -> int:
        return sum(self.acc)


@dataclass
class CollectSettings:
    """What the collector needs from the config (kept small so it is testable without a whole Config)."""

    groups_per_step: int
    dynamic_sampling: bool = True
    max_rounds: int = 10
    max_oversample: float = 3.0
    min_keep_fraction: float = 0.5
    soft_overlong_punishment: bool = True
    max_response_length: int = 20480
    overlong_cache_length: int = 4096
    overlong_penalty_factor: float = 1.0


@dataclass
class Collected:
    """A step's batch (empty when the update is skipped) and the step's `filter/`, `reward/`, `rollout/`
    metrics."""

    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return not self.groups


Scorer = Callable[[Sequence[str], Sequence[str]], ScoreBatch]


class Collector:
    """Generates, scores and filters groups until a step's batch is full."""

    def __init__(
        self,
        engine: RolloutEngine,
        prompts: Sequence[list[int]],  # token ids of each example's chat-templated prompt
        answers: Sequence[str],
        data_sources: Sequence[str],
        sampler: PromptSampler,
        scorer: Scorer,
        decode: Callable[[list[int]], str],
        sampling: SamplingParams,
        settings: CollectSettings,
        seed: int,
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.answers = answers
        self.data_sources = data_sources
        self.sampler = sampler
        self.scorer = scorer
        self.decode = decode
        self.sampling = sampling
        self.s = settings
        self.seed = seed
        self.carried: list[Group] = []
        # decayed counts of generated and kept groups: the keep-rate estimate that sizes each round
        self.generated_estimate = 0.0
        self.kept_estimate = 0.0
        self.seconds = {"generate": 0.0, "score": 0.0}  # this step's time in the engine and the verifier

    def keep_rate(self) -> float:
        """Estimated fraction of generated groups that pass the filter (1.0 until measured)."""
        return self.kept_estimate / self.generated_estimate if self.generated_estimate > 0 else 1.0

    def round_size(self, need: int) -> int:
        """Prompts to generate for `need` more groups: need / keep rate, at most need x max_oversample."""
        rate = max(self.keep_rate(), 1.0 / self.s.max_oversample)
        return max(need, math.ceil(need / rate - 1e-9))

    def collect(self, step: int) -> Collected:
        n = self.s.groups_per_step
        # carried groups are at most one step stale; older ones (possible only if more than N were carried) go
        carried = [g for g in self.carried if step - g.step <= 1]
        kept, self.carried = carried[:n], carried[n:]
        counts = {"groups": 0, "responses": 0, "correct": 0, "all_correct": 0, "all_wrong": 0, "kept": 0}
        self.seconds = {"generate": 0.0, "score": 0.0}
        generated: list[Group] = []
        rounds = 0
        exhausted = False
        while len(kept) < n and rounds < (self.s.max_rounds if self.s.dynamic_sampling else 1):
            need = n - len(kept)
            indices = self.sampler.next_indices(self.round_size(need) if self.s.dynamic_sampling else need)
            if not indices:
                exhausted = True
                break
            groups, verifier = self._generate(indices, step, rounds)
            rounds += 1
            generated += groups
            round_kept = 0
            for g in groups:
                c = g.num_correct
                counts["all_correct"] += c == len(g.acc)
                counts["all_wrong"] += c == 0
                counts["correct"] += c
                counts["responses"] += len(g.acc)
                if not self.s.dynamic_sampling or 0 < c < len(g.acc):
                    kept.append(g)
                    round_kept += 1
            counts["groups"] += len(groups)
            counts["kept"] += round_kept
            self.generated_estimate = 0.7 * self.generated_estimate + len(groups)
            self.kept_estimate = 0.7 * self.kept_estimate + round_kept
            for k, v in verifier.items():
                counts[k] = counts.get(k, 0) + int(v)
            if len(indices) < need:
                exhausted = True
                break

        batch, surplus = kept[:n], kept[n:]
        enough = len(batch) >= n or (len(batch) > 0 and len(batch) >= self.s.min_keep_fraction * n)
        if not enough:
            surplus, batch = batch + surplus, []
        self.carried += surplus
        metrics = self._metrics(counts, generated, batch, rounds, len(carried[:n]), step, exhausted)
        return Collected(groups=batch, metrics=metrics)

    def _generate(
        self, indices: list[int], step: int, round_index: int
    ) -> tuple[list[Group], dict[str, int]]:
        # the seed is a function of (run seed, step, round) only, so a resumed run samples exactly the same
        seed = (self.seed * 1_000_003 + step * 1_009 + round_index) % (2**31)
        sampling = dataclasses.replace(self.sampling, seed=seed)
        t0 = time.perf_counter()
        completions = self.engine.generate([self.prompts[i] for i in indices], sampling)
        t1 = time.perf_counter()
        texts = [self.decode(c.token_ids) for c in completions]
        truths = [self.answers[indices[c.prompt_index]] for c in completions]
        scored = self.scorer(texts, truths)
        self.seconds["generate"] += t1 - t0
        self.seconds["score"] += time.perf_counter() - t1
        rewards = self._shape_rewards(completions, [r.score for r in scored.results])
        g = sampling.n
        groups = []
        for j, idx in enumerate(indices):
            part = slice(j * g, (j + 1) * g)
            cs = completions[part]
            groups.append(
                Group(
                    example_index=idx,
                    data_source=self.data_sources[idx],
                    prompt_ids=list(self.prompts[idx]),
                    responses=[c.token_ids for c in cs],
                    rollout_logprobs=[c.logprobs for c in cs],
                    truncated=[c.finish_reason == "length" for c in cs],
                    acc=[r.acc for r in scored.results[part]],
                    rewards=rewards[part],
                    step=step,
                )
            )
        verifier = {
            "verifier_timeouts": scored.num_timeouts,
            "verifier_errors": scored.num_errors,
            "verifier_oversized": scored.num_oversized,
        }
        return groups, verifier

    def _shape_rewards(self, completions: list[Completion], scores: list[float]) -> list[float]:
        """Correctness reward (Eq. 7) plus the soft overlong punishment (Eq. 13) when enabled."""
        if not self.s.soft_overlong_punishment:
            return list(scores)
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        penalty = algo.soft_overlong_penalty(
            lengths, max_length=self.s.max_response_length, cache_length=self.s.overlong_cache_length
        )
        return [s + self.s.overlong_penalty_factor * float(p) for s, p in zip(scores, penalty, strict=True)]

    def _metrics(
        self,
        counts: dict[str, int],
        generated: list[Group],
        batch: list[Group],
        rounds: int,
        carried_in: int,
        step: int,
        exhausted: bool,
    ) -> dict[str, float]:
        groups = max(counts["groups"], 1)
        new_kept = sum(1 for g in batch if g.step == step)
        m = {
            "filter/acc_before": counts["correct"] / max(counts["responses"], 1),
            "filter/all_correct_frac": counts["all_correct"] / groups,
            "filter/all_wrong_frac": counts["all_wrong"] / groups,
            "filter/kept_frac": counts["kept"] / groups,
            "filter/rollouts_per_kept_group": counts["responses"] / max(counts["kept"], 1),
            "filter/rounds": float(rounds),
            "filter/groups_generated": float(counts["groups"]),
            "filter/carried_in": float(carried_in),
            "filter/carried_out": float(len(self.carried)),
            "filter/batch_groups": float(len(batch)),
            "filter/new_groups": float(new_kept),
            "filter/carried_age_mean": (sum(step - g.step for g in batch) / len(batch) if batch else 0.0),
            "filter/skipped_step": float(not batch),
            "filter/data_exhausted": float(exhausted),
            "filter/keep_rate_estimate": self.keep_rate(),
            "time/generate_s": self.seconds["generate"],
            "time/score_s": self.seconds["score"],
        }
        for key in ("verifier_timeouts", "verifier_errors", "verifier_oversized"):
            m[f"reward/{key}"] = float(counts.get(key, 0))
        lengths = [len(r) for g in generated for r in g.responses]
        if lengths:
            m["rollout/response_length_mean"] = sum(lengths) / len(lengths)
            m["rollout/response_length_max"] = float(max(lengths))
            m["rollout/truncated_frac"] = sum(t for g in generated for t in g.truncated) / len(lengths)
            m["rollout/responses"] = float(len(lengths))
            m["rollout/tokens"] = float(sum(lengths))
            m.update(response_metrics(generated))
        if batch:
            rewards = [r for g in batch for r in g.rewards]
            m["reward/mean"] = sum(rewards) / len(rewards)
            m["reward/acc"] = sum(a for g in batch for a in g.acc) / len(rewards)
        return m

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: carried groups, keep-rate estimate, sampler position."""
        return {
            "carried": [asdict(g) for g in self.carried],
            "generated_estimate": self.generated_estimate,
            "kept_estimate": self.kept_estimate,
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried = [Group(**g) for g in state["carried"]]
        self.generated_estimate = float(state["generated_estimate"])
        self.kept_estimate = float(state["kept_estimate"])
        self.sampler.load_state_dict(state["sampler"])


def response_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """What the step's generated responses (before the filter) show of DAPO's effects: the mean length of
    correct and of wrong responses (`rollout/correct_length_mean`, `rollout/wrong_length_mean`; a side with
    no response is left out), the fraction that ends in a repetition loop (`rollout/loop_frac`,
    `diagnostics.loops`), the mean number of distinct correct responses in a group with one
    (`rollout/distinct_correct`), and the groups' pass@1 and pass@n (`rollout/pass_at_1`,
    `rollout/pass_at_n`: at least one of the n correct)."""
    correct = [len(r) for g in groups for r, ok in zip(g.responses, g.acc, strict=True) if ok]
    wrong = [len(r) for g in groups for r, ok in zip(g.responses, g.acc, strict=True) if not ok]
    solved = [g for g in groups if g.num_correct > 0]
    responses = max(len(correct) + len(wrong), 1)
    m = {
        "rollout/loop_frac": sum(diagnostics.loops(r) for g in groups for r in g.responses) / responses,
        "rollout/pass_at_1": len(correct) / responses,
        "rollout/pass_at_n": len(solved) / max(len(groups), 1),
    }
    if correct:
        m["rollout/correct_length_mean"] = sum(correct) / len(correct)
        m["rollout/distinct_correct"] = sum(
            diagnostics.distinct_correct(g.responses, g.acc) for g in solved
        ) / len(solved)
    if wrong:
        m["rollout/wrong_length_mean"] = sum(wrong) / len(wrong)
    return m


def make_train_batch(
    groups: Sequence[Group],
    *,
    pad_token_id: int,
    std_normalize: bool = True,
    overlong_filter: bool = False,
    estimator: algo.AdvantageEstimator | str = algo.AdvantageEstimator.GRPO,
) -> TrainBatch:
    """Pack groups into a `TrainBatch` (each group's prompt once, left-padded; responses right-padded) with
    group-relative advantages (Eq. 9; another ``estimator``: `dapo.algo.advantages`).

    With `overlong_filter` (§3.4), truncated responses leave the loss's numerator and denominator: their
    response mask is zero, and their rewards still take part in their group's mean and std (as in the
    reference).
    """
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [N, G]
    advantages = algo.advantages(rewards, estimator, scale_by_std=std_normalize).reshape(-1)  # [N*G]
    n, p = len(groups), max(len(g.prompt_ids) for g in groups)
    prompt_ids = torch.full((n, p), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, p), dtype=torch.long)
    for i, g in enumerate(groups):
        prompt_ids[i, p - len(g.prompt_ids) :] = torch.tensor(g.prompt_ids, dtype=torch.long)
        prompt_mask[i, p - len(g.prompt_ids) :] = 1
    rows = [
        (i, r, lp, t)
        for i, g in enumerate(groups)
        for r, lp, t in zip(g.responses, g.rollout_logprobs, g.truncated, strict=True)
    ]
    b, length = len(rows), max(max(len(r) for _, r, _, _ in rows), 1)
    response_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((b, length), dtype=torch.float32)
    rollout_logprobs = torch.zeros((b, length), dtype=torch.float32)
    for j, (_, response, logprobs, truncated) in enumerate(rows):
        r = len(response)
        response_ids[j, :r] = torch.tensor(response, dtype=torch.long)
        rollout_logprobs[j, :r] = torch.tensor(logprobs, dtype=torch.float32)
        if not (overlong_filter and truncated):
            response_mask[j, :r] = 1.0
    return TrainBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_index=torch.tensor([i for i, _, _, _ in rows], dtype=torch.long),
        response_ids=response_ids,
        response_lengths=torch.tensor([len(r) for _, r, _, _ in rows], dtype=torch.long),
        response_mask=response_mask,
        advantages=advantages,
        rollout_logprobs=rollout_logprobs,
    )


class AheadCollector:
    """`trainer.async_rollout_steps` (beyond the paper): with 1, step k+1's batch is collected in a thread
    while step k updates (`ahead`), one-step-off-policy as in verl's and prime-rl's async modes; with 0,
    `collect` is the collector's own, unchanged.

    The thread is joined before the weights move, so every round of step k+1 samples with the weights
    before update k (staleness exactly 1 for its new groups, logged as `rollout/staleness`), whatever the
    timing. A batch collected ahead is part of the checkpoint (`state_dict`), so a resumed run trains on
    the same batches.
    """

    def __init__(self, collector: Collector, steps: int) -> None:
        if steps not in (0, 1):
            raise ValueError(f"async rollout steps must be 0 or 1, got {steps!r}")
        self.collector = collector
        self.steps = steps
        self.pending: tuple[int, Collected] | None = None

    def collect(self, step: int) -> Collected:
        if self.pending is not None and self.pending[0] == step:
            collected, self.pending = self.pending[1], None
            collected.metrics["rollout/staleness"] = 1.0
            return collected
        collected = self.collector.collect(step)
        if self.steps:
            collected.metrics["rollout/staleness"] = 0.0
        return collected

    @contextlib.contextmanager
    def ahead(self, step: int, last_step: int, stop: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Collect step ``step``'s batch while the body runs (nothing with 0, or past ``last_step``).

        The collection is abandoned (`dapo.preempt.poll` in the engines it drives) when the body raises, whose
        error then comes first, or once ``stop()`` is true (a stop signal): the collector is put back as it
        was before the collection began, so a checkpoint written next resumes to the same batches."""
        if not self.steps or step > last_step:
            yield
            return
        before = self.collector.state_dict()
        failed = threading.Event()

        def collect() -> Collected:
            with preempt.polled(lambda: failed.is_set() or stop()):
                return self.collector.collect(step)

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dapo-ahead") as pool:
            future = pool.submit(collect)
            try:
                yield
            except BaseException:
                failed.set()  # the collection stops at its next poll; the body's error is raised
                concurrent.futures.wait([future])
                self.collector.load_state_dict(before)
                raise
            try:
                collected = future.result()  # joined before the caller moves the weights
            except preempt.Abandoned:
                self.collector.load_state_dict(before)
                return
        self.pending = (step, collected)

    def state_dict(self) -> dict[str, Any]:
        state = self.collector.state_dict()
        if self.pending is not None:
            step, collected = self.pending
            state["ahead"] = {
                "step": step,
                "groups": [asdict(g) for g in collected.groups],
                "metrics": collected.metrics,
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collector.load_state_dict(state)
        ahead = state.get("ahead")
        self.pending = None
        if ahead is not None:
            groups = [Group(**g) for g in ahead["groups"]]
            self.pending = (int(ahead["step"]), Collected(groups=groups, metrics=dict(ahead["metrics"])))
