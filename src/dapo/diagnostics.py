"""What shows each of DAPO's effects in a run's metrics: pure functions over tokens and responses.

=================================  ==========================================================================
function                           what it shows
=================================  ==========================================================================
``entropy_histogram``,             entropy collapse concentrates on the forking tokens: the mean entropy of
``top_fraction_mean``              the top 20% highest-entropy tokens (Wang et al. 2025, arXiv 2506.01939),
                                   from a histogram that sums exactly over micro-batches and ranks
``token_covariance``               the entropy change's driver, ΔH ≈ −Cov(log π, A), read over a batch's
                                   tokens (Cui et al. 2025, arXiv 2505.22617)
``loops``                          degenerate repetition: a response whose tail is one block of tokens
                                   repeated back to back
``distinct_correct``               exploration: how many different correct responses a group holds
=================================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["distinct_correct", "entropy_histogram", "loops", "token_covariance", "top_fraction_mean"]

ENTROPY_BINS = 512
"""Bins of `entropy_histogram` over [0, log V]: for V = 152k a bin is 0.023 nats wide."""


def entropy_histogram(entropy: Tensor, mask: Tensor, vocab_size: int, bins: int = ENTROPY_BINS) -> Tensor:
    """``[2, bins]`` float64: the count and the sum of the masked tokens' entropies per bin of equal width
    over [0, log ``vocab_size``] (the largest entropy a token can have). Histograms of parts of a batch add
    up to the batch's; `top_fraction_mean` reads one."""
    values = entropy.detach()[mask.bool()].double()  # [N]
    high = math.log(vocab_size)
    index = (values / high * bins).long().clamp(0, bins - 1)  # [N]
    out = torch.zeros(2, bins, dtype=torch.float64, device=values.device)
    out[0].index_add_(0, index, torch.ones_like(values))
    out[1].index_add_(0, index, values)
    return out


def top_fraction_mean(histogram: Tensor, fraction: float = 0.2) -> float:
    """The mean entropy of the ``fraction`` of tokens with the highest entropy, from an `entropy_histogram`:
    whole bins from the top, then the share of the bin that the fraction ends in at that bin's mean. Exact
    when that bin's tokens share one value; otherwise off by at most a bin's width. 0 with no tokens."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    counts: list[float] = histogram[0].tolist()
    sums: list[float] = histogram[1].tolist()
    want = fraction * sum(counts)
    if want <= 0:
        return 0.0
    taken, total = 0.0, 0.0
    for count, value_sum in zip(reversed(counts), reversed(sums), strict=True):
        if count == 0:
            continue
        share = min(count, want - taken)
        total += value_sum * share / count
        taken += share
        if taken >= want:
            break
    return total / want


def token_covariance(x: Tensor, y: Tensor, mask: Tensor) -> float:
    """Cov(x, y) over the masked entries of ``[B, T]`` ``x`` and ``y`` (``y`` may be ``[B]``: one value for
    every token of a row), E[xy] − E[x]E[y] in float64; 0 with no tokens."""
    valid = mask.bool()
    if y.dim() == 1:
        y = y[:, None].expand_as(x)
    xs, ys = x[valid].double(), y[valid].double()
    if xs.numel() == 0:
        return 0.0
    return float((xs * ys).mean() - xs.mean() * ys.mean())


def loops(tokens: Sequence[int], *, max_period: int = 32, min_repeats: int = 3, min_span: int = 16) -> bool:
    """Whether the response ends in a loop: its last ``k·p`` tokens are one block of ``p ≤ max_period``
    tokens repeated ``k ≥ min_repeats`` times back to back, covering at least ``min_span`` tokens (so a
    number that ends in "000" is not a loop)."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = max(min_repeats * p, min_span)
        if span > n:
            break
        tail = tokens[n - span :]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return True
    return False


def distinct_correct(responses: Sequence[Sequence[int]], acc: Sequence[bool]) -> int:
    """The number of different correct responses (token for token) among a group's."""
    return len({tuple(r) for r, ok in zip(responses, acc, strict=True) if ok})
