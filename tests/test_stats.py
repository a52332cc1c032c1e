"""Evaluation statistics by hand: the unbiased pass@k estimator and the bootstrap interval over problems."""

from __future__ import annotations

import math

import pytest

from dapo.evaluate import RowScores, format_eval, summarize
from dapo.rewards import RewardResult
from dapo.stats import bootstrap_mean_ci, pass_at_k, problem_means


def test_pass_at_k_by_hand() -> None:
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=8, c=4, k=2: 1 - C(4,2)/C(8,2) = 1 - 6/28
    assert pass_at_k(8, 4, 2) == pytest.approx(1 - 6 / 28)
    # n=32, c=3, k=8: 1 - C(29,8)/C(32,8)
    assert pass_at_k(32, 3, 8) == pytest.approx(1 - math.comb(29, 8) / math.comb(32, 8))
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # k=1 is the mean accuracy
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # only one wrong sample: every pair holds a correct one
    assert pass_at_k(8, 1, 8) == 1.0  # k=n: any correct
    # not the plug-in 1 - (1 - c/n)^k (sampling with replacement): 1 - (3/4)^2 = 0.4375 for n=4, c=1, k=2
    assert pass_at_k(4, 1, 2) != pytest.approx(1 - (3 / 4) ** 2)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_bootstrap_interval_by_hand() -> None:
    # values 0, 0, 1, 1: a resampled mean is Binomial(4, 1/2) / 4, P = 1/16, 4/16, 6/16, 4/16, 1/16 for
    # 0, .25, .5, .75, 1. The 2.5% and 97.5% quantiles fall inside the masses at 0 and 1 (6.25% each);
    # the 25% and 75% ones inside those at .25 (6.25%-31.25%) and .75 (68.75%-93.75%).
    assert bootstrap_mean_ci([0, 0, 1, 1], level=0.95, resamples=20_000) == (0.0, 1.0)
    assert bootstrap_mean_ci([0, 0, 1, 1], level=0.5, resamples=20_000) == (0.25, 0.75)
    assert bootstrap_mean_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4))


def test_bootstrap_interval_matches_the_normal_approximation_and_is_seeded() -> None:
    values = [1.0] * 120 + [0.0] * 280  # mean 0.3, standard error sqrt(.3 * .7 / 400) = 0.0229
    low, high = bootstrap_mean_ci(values, resamples=4000, seed=3)
    se = math.sqrt(0.3 * 0.7 / 400)
    assert low == pytest.approx(0.3 - 1.96 * se, abs=0.006)
    assert high == pytest.approx(0.3 + 1.96 * se, abs=0.006)
    assert bootstrap_mean_ci(values, seed=3) == bootstrap_mean_ci(values, seed=3)
    assert bootstrap_mean_ci(values, seed=3) != bootstrap_mean_ci(values, seed=4)


def test_problem_means_groups_copies_in_first_seen_order() -> None:
    assert problem_means([1, 0, 0.5, 1, 0], ["b", "a", "b", "c", "a"]) == [0.75, 0.0, 1.0]


def r(acc: bool) -> RewardResult:
    return RewardResult(1.0 if acc else -1.0, acc, "1" if acc else "2")


def test_summary_resamples_problems_not_rows_and_estimates_pass_at_j() -> None:
    # two problems, each given as 3 copies (rows): problem A always right, problem B right 1 in 4
    a = [RowScores("s", [r(True)] * 4, [1] * 4, problem="A") for _ in range(3)]
    b = [RowScores("s", [r(True)] + [r(False)] * 3, [1] * 4, problem="B") for _ in range(3)]
    m = summarize(a + b, k=4)
    assert m["eval/s/avg@4"] == pytest.approx((1 + 0.25) / 2) and m["eval/s/problems"] == 2
    # by problem: two values, 1 and .25 -> resampled means .25, .625, 1 (P 1/4, 1/2, 1/4)
    assert (m["eval/s/avg@4_ci95_low"], m["eval/s/avg@4_ci95_high"]) == (0.25, 1.0)
    assert (m["eval/s/avg@4_ci95_low"], m["eval/s/avg@4_ci95_high"]) == bootstrap_mean_ci([1.0, 0.25])
    # as 6 independent rows the interval would be narrower
    rows_low, rows_high = bootstrap_mean_ci([1.0] * 3 + [0.25] * 3)
    assert rows_high - rows_low < 0.75
    # pass@1 = avg; pass@2 of B: 1 - C(3,2)/C(4,2) = 1/2
    assert m["eval/s/pass@1"] == pytest.approx(0.625)
    assert m["eval/s/pass@2"] == pytest.approx((1 + 0.5) / 2)
    assert m["eval/s/pass@4"] == 1.0 and "eval/s/pass@8" not in m
    line = format_eval(m)
    assert line == "s/avg@4=0.625 [0.250, 1.000]  s/pass@4=1.000  s/maj@4=0.500"
