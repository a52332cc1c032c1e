"""The statistics of evaluation: the unbiased pass@k estimator and a bootstrap confidence interval for a mean
over problems.

- `pass_at_k(n, c, k)`: the probability that at least one of k samples drawn without replacement from n
  samples, c of them correct, is correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large
  Language Models Trained on Code", Eq. 1). With k = n it is 1 if any sample is correct; with k = 1 it is
  c / n. Averaged over problems it is an unbiased estimate of pass@k, unlike the plug-in 1 - (1 - c/n)^k.
- `bootstrap_mean_ci(values)`: the percentile bootstrap interval of the mean of `values`, resampling them
  with replacement, seeded so that the same values always give the same interval. Evaluation passes one
  value per *problem* (`problem_means`): AIME 2024's reference file repeats each of its 30 problems 32
  times, and those copies are not independent, so resampling rows would understate the uncertainty.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (requires 1 <= k <= n, 0 <= c <= n)."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): a product of c terms in (0, 1], no big integers
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def problem_means(values: Sequence[float], problems: Sequence[Hashable]) -> list[float]:
    """The mean of `values` per problem key, in order of first appearance."""
    sums: dict[Hashable, list[float]] = {}
    for v, p in zip(values, problems, strict=True):
        sums.setdefault(p, []).append(v)
    return [sum(vs) / len(vs) for vs in sums.values()]


def bootstrap_mean_ci(
    values: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval (lower, upper) of the mean of `values` at confidence `level`:
    `resamples` means of len(values) draws with replacement, and their (1 - level) / 2 and (1 + level) / 2
    quantiles (linear interpolation). Deterministic for a given `seed`."""
    if not values:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_mean_ci: level must be in (0, 1), got {level}")
    x = torch.tensor(values, dtype=torch.float64)  # [P]
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(values), (resamples, len(values)), generator=gen)  # [resamples, P]
    means = x[draws].mean(dim=1)  # [resamples]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return float(lo), float(hi)
