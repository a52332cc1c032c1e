"""`dapo.diagnostics`: the metrics that show DAPO's effects, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dapo.diagnostics import distinct_correct, entropy_histogram, loops, token_covariance, top_fraction_mean


def test_top_20_percent_entropy_from_histograms_of_parts() -> None:
    # 10 tokens (one padded away): the top 20% are the two largest, 2.0 and 1.5 -> mean 1.75
    entropy = torch.tensor([[0.1, 0.2, 2.0, 0.3, 9.9], [0.4, 1.5, 0.5, 0.6, 0.7]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    whole = entropy_histogram(entropy, mask, vocab_size=400)  # bins of log(400) / 512 = 0.0117 nats
    parts = entropy_histogram(entropy[:1], mask[:1], 400) + entropy_histogram(entropy[1:], mask[1:], 400)
    assert torch.equal(whole, parts)
    assert whole[0].sum().item() == 9
    # 20% of 9 tokens = 1.8 tokens: 2.0 whole, then 0.8 of the 1.5 -> (2.0 + 0.8 * 1.5) / 1.8
    assert top_fraction_mean(whole, 0.2) == pytest.approx((2.0 + 0.8 * 1.5) / 1.8)
    assert top_fraction_mean(whole, 1.0) == pytest.approx(6.3 / 9)  # everything: the plain mean
    assert top_fraction_mean(torch.zeros(2, 8), 0.2) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mean(whole, 0.0)
    # the largest entropy, log V, lands in the top bin
    top = entropy_histogram(torch.tensor([[math.log(400)]]), torch.ones(1, 1), 400)
    assert top[0, -1].item() == 1


def test_token_covariance_by_hand() -> None:
    # tokens (x, y): (1, 1), (3, 1), (2, -1) and a padded one: E[xy] = (1 + 3 - 2) / 3 = 2/3, E[x] = 2,
    # E[y] = 1/3 -> Cov = 2/3 - 2/3 = 0; per-row y [B] spreads to the row's tokens
    x = torch.tensor([[1.0, 3.0], [2.0, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert token_covariance(x, torch.tensor([1.0, -1.0]), mask) == pytest.approx(0.0, abs=1e-12)
    # y = x: the variance of 1, 3, 2 = 2/3
    assert token_covariance(x, x, mask) == pytest.approx(2 / 3)
    assert token_covariance(x, x, torch.zeros(2, 2)) == 0.0


def test_a_loop_is_a_repeated_block_at_the_end() -> None:
    assert loops([5, 6, 7] * 6)  # period 3, 18 tokens
    assert loops([1, 2, 3, 4] + [9] * 16)  # period 1 over 16 tokens
    assert not loops([1, 2, 3, 4] + [9] * 15)  # too short a span
    assert not loops([5, 6, 7] * 6 + [8])  # it must reach the end
    assert not loops(list(range(40)))
    assert not loops([])
    assert loops([1, 2] * 3, min_span=6)  # the span and the repeats are settings
    assert not loops([1, 2] * 3, min_span=6, min_repeats=4)


def test_distinct_correct_responses() -> None:
    responses = [[1, 2], [1, 2], [3], [4], [1, 2, 0]]
    assert distinct_correct(responses, [True, True, True, False, True]) == 3  # [1, 2], [3], [1, 2, 0]
    assert distinct_correct(responses, [False] * 5) == 0
