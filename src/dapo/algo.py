"""The DAPO maths as pure tensor functions (no config objects, no models, no processes).

Equation and section numbers are those of the paper (arXiv 2503.14476).

=====================================  =====================================================================
function                               implements
=====================================  =====================================================================
``group_advantages``                   Eq. 9, group-relative advantage (GRPO/DAPO); Dr. GRPO without the std
``rloo_advantages``, ``reinforce_pp_advantages``, ``advantages``
                                       the estimators users compare with (RLOO, REINFORCE++), not in the paper
``policy_loss``                        Eq. 8/10, per-token decoupled-clip surrogate (Clip-Higher, §3.1);
                                       GSPO's sequence-level ratio as a setting
``cispo_loss``                         CISPO's clipped, detached importance weight (not in the paper)
``LossAggregation``, ``loss_denominator``, ``aggregate_loss``
                                       §3.3, token-level loss 1/Σ|o_i| and GRPO's per-sample mean, with one
                                       global denominator per mini-batch
``soft_overlong_penalty``              Eq. 13, soft overlong punishment (§3.4)
``overlong_filter_mask``, ``apply_sample_mask``
                                       §3.4, overlong filtering (truncated samples leave the loss)
``GroupFilter``, ``keep_groups``       §3.2, dynamic-sampling constraint 0 < #correct < G
``logprobs_from_logits``, ``entropy_from_logits``, ``token_stats_from_logits``
                                       r_it of Eq. 8 needs log π(o_it); entropy and probability are the
                                       training dynamics of §4.3. Chunked over rows.
``token_stats_from_hidden``, ``logprobs_from_hidden``
                                       the same from the final hidden states and the output projection,
                                       a chunk of tokens at a time: never a [tokens x vocabulary] tensor
``mismatch_kl``, ``truncated_is_weights``, ``rollout_is_ratios``, ``rollout_is_weights``
                                       train/rollout mismatch (per token or per response, truncated or
                                       masked), not in the paper
``masked_sum``, ``masked_mean``        helpers
=====================================  =====================================================================

Where we deviate from or extend the paper:

- Dual clip (``dual_clip_c``, off by default): the reference scripts cap the loss of negative-advantage
  tokens at −c·A (c = 10) so that a hugely off-policy token cannot dominate the update. Not in Eq. 8.
- Truncated importance-sampling weights (``is_weights``): multiply the per-token loss to correct for numerical
  differences between the rollout engine and the trainer. Not in the paper.
- Dr. GRPO variants: ``group_advantages(scale_by_std=False)`` and the constant normaliser
  ``SEQ_MEAN_TOKEN_SUM_NORM``. GRPO itself is ``eps_low == eps_high`` with ``SEQ_MEAN_TOKEN_MEAN``.
- The denominator of the loss is passed in explicitly (computed once per mini-batch), so the gradient does not
  depend on how the mini-batch is split into micro-batches or ranks (verl's default path does depend on it).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, cast

import torch
from torch import Tensor

# A log-ratio beyond ±20 (ratio e^20 ≈ 4.9e8) means the token is hopelessly off-policy; clamping keeps exp()
# finite in fp32/bf16. Past the clamp the gradient is 0, which only affects such tokens.
_MAX_LOG_RATIO = 20.0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set (bool or 0/1 float), over ``dim`` or over everything."""
    # Select instead of multiplying: padding may hold inf/NaN (e.g. −inf log-probs) and inf·0 = NaN.
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is set, over ``dim`` or over everything. An empty mask gives 0."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    # An empty mask has sum 0; dividing by max(count, 1) returns 0 instead of 0/0 = NaN.
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def group_advantages(rewards: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages, Eq. 9: Â_i = (R_i − mean_j R_j) / (std_j R_j + eps).

    ``rewards`` is ``[num_groups, G]``; the result has the same shape. The std is Bessel-corrected
    (``torch.std`` default), as in the reference implementation. ``scale_by_std=False`` gives Dr. GRPO's
    R_i − mean_j R_j.
    A group of one sample, or whose rewards are all equal, gets advantage exactly 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # [N, G]
    if r.shape[1] < 2:
        # One sample has no baseline to compare with, and the Bessel-corrected std of one value is NaN.
        return torch.zeros_like(r)
    adv = r - r.mean(dim=-1, keepdim=True)  # [N, G]
    if scale_by_std:
        # eps keeps the division finite when all rewards of a group are equal (std = 0).
        adv = adv / (r.std(dim=-1, keepdim=True) + eps)
    # Rounding in the mean leaves ±1 ulp in a constant group (16 × 0.9 → 6e-8), which /eps turns into ±0.06.
    constant = (r == r[:, :1]).all(dim=-1, keepdim=True)  # [N, 1]
    return torch.where(constant, torch.zeros_like(adv), adv)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO's leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740):
    Â_i = R_i − 1/(G−1) Σ_{j≠i} R_j = G/(G−1) · (R_i − mean_j R_j), unscaled.

    ``rewards`` ``[num_groups, G]`` -> the same shape; a group of one sample, or of equal rewards, gets 0."""
    r = _group_rewards(rewards)  # [N, G]
    G = r.shape[1]
    if G < 2:
        return torch.zeros_like(r)
    adv = (r - r.mean(dim=-1, keepdim=True)) * (G / (G - 1))  # [N, G]
    constant = (r == r[:, :1]).all(dim=-1, keepdim=True)  # [N, 1]
    return torch.where(constant, torch.zeros_like(adv), adv)


def reinforce_pp_advantages(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ with a group baseline (Hu et al. 2025, arXiv 2501.03262; verl's
    ``reinforce_plus_plus_baseline``): each reward minus its group's mean, then divided by the standard
    deviation of those differences over the whole batch (every group of the step), not per group.

    ``rewards`` ``[num_groups, G]`` -> the same shape. Groups of equal rewards get 0; a batch whose
    differences are all 0 gets 0 everywhere. The std is Bessel-corrected, as `group_advantages`'."""
    r = _group_rewards(rewards)  # [N, G]
    if r.shape[1] < 2:
        return torch.zeros_like(r)
    centred = r - r.mean(dim=-1, keepdim=True)  # [N, G]
    constant = (r == r[:, :1]).all(dim=-1, keepdim=True)  # [N, 1]
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if centred.numel() < 2 or not bool(centred.ne(0).any()):
        return torch.zeros_like(centred)
    return centred / (centred.std() + eps)


class AdvantageEstimator(str, enum.Enum):
    """``algorithm.advantage``: how a group's rewards become advantages."""

    GRPO = "grpo"  # Eq. 9 (DAPO's); Dr. GRPO without the std
    RLOO = "rloo"
    REINFORCE_PLUS_PLUS = "reinforce_plus_plus"


def advantages(
    rewards: Tensor,
    estimator: AdvantageEstimator | str = AdvantageEstimator.GRPO,
    *,
    scale_by_std: bool = True,
) -> Tensor:
    """The advantages of ``rewards`` ``[num_groups, G]`` (one step's batch) by ``estimator``;
    ``scale_by_std`` is GRPO's (Dr. GRPO: false)."""
    kind = AdvantageEstimator(estimator)
    if kind is AdvantageEstimator.RLOO:
        return rloo_advantages(rewards)
    if kind is AdvantageEstimator.REINFORCE_PLUS_PLUS:
        return reinforce_pp_advantages(rewards)
    return group_advantages(rewards, scale_by_std=scale_by_std)


def _group_rewards(rewards: Tensor) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """Per-token policy loss and its diagnostics (all diagnostics are 0-dim, without gradient)."""

    token_loss: Tensor  # [B, T], zero where the mask is 0
    clip_frac_upper: Tensor  # fraction of valid tokens with A > 0 and ratio > 1 + eps_high
    clip_frac_lower: Tensor  # fraction of valid tokens with A < 0 and ratio < 1 − eps_low
    dual_clip_frac: Tensor  # fraction of valid tokens with A < 0 and the dual-clip cap active
    approx_kl: Tensor  # k3 estimate of KL(π_old ‖ π_θ), mean over valid tokens
    ratio_mean: Tensor  # mean of r = π_θ / π_old over valid tokens
    clipped_sequences: Tensor  # with a sequence-level ratio (GSPO): responses clipped (count); else 0
    upper_old_prob: Tensor  # sum of π_old over the tokens counted in clip_frac_upper


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = None,
    is_weights: Tensor | None = None,
    sequence_ratio: bool = False,
) -> PolicyLoss:
    """Per-token decoupled-clip loss, Eq. 8 / Eq. 10 (Clip-Higher); GRPO's clip when eps_low == eps_high.

    ``sequence_ratio`` (GSPO, Zheng et al. 2025, arXiv 2507.18071): every token of response i takes the
    sequence's ratio s_i = exp(1/|o_i| · Σ_t log r_t), the geometric mean of its token ratios, so a whole
    response is clipped or not (GSPO's ranges are of order 3e-4 / 4e-4); aggregate with
    ``seq-mean-token-mean`` for GSPO's mean over responses. ``clipped_sequences`` then counts the responses
    clipped where the clip acts (A > 0 above 1 + eps_high, A < 0 below 1 − eps_low): over the number of
    responses, GSPO's clip fraction.

    loss_t = −min(r_t·A, clip(r_t, 1 − eps_low, 1 + eps_high)·A) with r_t = exp(logprobs − old_logprobs).
    With ``dual_clip_c`` = c > 1 (reference scripts: 10), tokens with A < 0 are further capped: loss_t ≤ −c·A.
    ``is_weights`` (truncated importance-sampling weights, treated as constants) multiply loss_t.

    Shapes: ``logprobs``, ``old_logprobs``, ``mask`` ``[B, T]``; ``advantages`` ``[B]`` (one value for every
    token of a response, Eq. 9) or ``[B, T]``; ``is_weights`` ``[B, T]``. Aggregate with ``aggregate_loss``.

    ``approx_kl`` estimates KL(π_old ‖ π_θ) on tokens sampled from π_old with k3 = (r − 1) − log r,
    r = π_θ / π_old (unbiased and never negative).
    """
    if not 0.0 <= eps_low < 1.0 or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low=}, {eps_high=}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    advantages = _token_advantages(logprobs, old_logprobs, advantages, mask)  # [B, T]
    valid = mask.bool()  # [B, T]
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Padding may hold arbitrary values (−inf − −inf = NaN); select it away before any arithmetic so that it
    # reaches neither the loss nor its gradient. π_old is a constant in Eq. 8, hence the detach.
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), zero)  # [B, T]
    if sequence_ratio:  # GSPO: the length-normalised log of the sequence's ratio, on each of its tokens
        per_response = log_ratio.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        log_ratio = torch.where(valid, per_response.expand_as(log_ratio), zero)  # [B, T]
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # see _MAX_LOG_RATIO
    adv = torch.where(valid, advantages.detach().to(logprobs.dtype), zero)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B, T]
    loss = torch.maximum(-adv * ratio, -adv * clipped)  # [B, T], = −min(r·A, clip(r)·A)
    if dual_clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip_c * adv), loss)
    if is_weights is not None:
        loss = loss * _checked_weights(is_weights, valid, loss)
    token_loss = torch.where(valid, loss, zero)  # [B, T]

    with torch.no_grad():
        upper = (adv > 0) & (ratio > 1.0 + eps_high)  # [B, T]
        lower = (adv < 0) & (ratio < 1.0 - eps_low)  # [B, T]
        dual = (adv < 0) & (ratio > dual_clip_c) if dual_clip_c is not None else torch.zeros_like(valid)
        k3 = (ratio - 1.0) - log_ratio  # [B, T]
        zero_count = torch.zeros((), device=logprobs.device)
        return PolicyLoss(
            token_loss=token_loss,
            clip_frac_upper=masked_mean(upper.float(), valid),
            clip_frac_lower=masked_mean(lower.float(), valid),
            dual_clip_frac=masked_mean(dual.float(), valid),
            approx_kl=masked_mean(k3.float(), valid),
            ratio_mean=masked_mean(ratio.float(), valid),
            # every token of a response holds its sequence's ratio: a response is clipped where any token is
            clipped_sequences=(upper | lower).any(1).sum().float() if sequence_ratio else zero_count,
            upper_old_prob=torch.where(upper, old_logprobs.detach().float().exp(), 0.0).sum(),
        )


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = None,
    is_weights: Tensor | None = None,
    sequence_ratio: bool = False,
) -> PolicyLoss:
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE with a clipped, detached importance weight,
    loss_t = −sg(clip(r_t, 1 − eps_low, 1 + eps_high)) · A · log π_θ(o_t). Every token keeps a gradient
    (−clip(r_t)·A·∇log π_θ), where the clipped surrogate of `policy_loss` gives a clipped token none.

    Same arguments and diagnostics as `policy_loss` (``clip_frac_upper`` / ``clip_frac_lower``: tokens whose
    weight was clipped, whatever the advantage's sign; eps_low may be 1: no lower bound); no dual clip and no
    sequence-level ratio (both raise)."""
    if dual_clip_c is not None or sequence_ratio:
        raise ValueError("CISPO has no dual clip and no sequence-level ratio")
    if not 0.0 <= eps_low <= 1.0 or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low <= 1 and eps_high >= 0, got {eps_low=}, {eps_high=}")
    advantages = _token_advantages(logprobs, old_logprobs, advantages, mask)  # [B, T]
    valid = mask.bool()  # [B, T]
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    with torch.no_grad():  # the weight is a constant (sg)
        log_ratio = torch.where(valid, logprobs - old_logprobs, zero).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        ratio = torch.exp(log_ratio)  # [B, T]
        weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B, T]
        if is_weights is not None:
            weight = weight * _checked_weights(is_weights, valid, weight)
        adv = torch.where(valid, advantages.to(logprobs.dtype), zero)  # [B, T]
    token_loss = torch.where(valid, -weight * adv * torch.where(valid, logprobs, zero), zero)  # [B, T]
    with torch.no_grad():
        return PolicyLoss(
            token_loss=token_loss,
            clip_frac_upper=masked_mean((ratio > 1.0 + eps_high).float(), valid),
            clip_frac_lower=masked_mean((ratio < 1.0 - eps_low).float(), valid),
            dual_clip_frac=torch.zeros((), device=logprobs.device),
            approx_kl=masked_mean(((ratio - 1.0) - log_ratio).float(), valid),
            ratio_mean=masked_mean(ratio.float(), valid),
            clipped_sequences=torch.zeros((), device=logprobs.device),
            upper_old_prob=torch.where(valid & (ratio > 1.0 + eps_high), old_logprobs.exp(), 0.0).sum(),
        )


def _token_advantages(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Shape checks of a policy loss's inputs; the advantages as ``[B, T]``."""
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, old_logprobs and mask must share one [B, T] shape, got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        return advantages[:, None].expand_as(logprobs)  # [B] -> [B, T]
    if advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be [B] or [B, T] for logprobs {tuple(logprobs.shape)}")
    return advantages


def _checked_weights(is_weights: Tensor, valid: Tensor, like: Tensor) -> Tensor:
    """Importance-sampling weights as constants, zero on padding."""
    if is_weights.shape != valid.shape:
        raise ValueError(f"is_weights must be {tuple(valid.shape)}, got {tuple(is_weights.shape)}")
    return torch.where(
        valid, is_weights.detach().to(like.dtype), torch.zeros((), dtype=like.dtype, device=like.device)
    )


class LossAggregation(str, enum.Enum):
    """How per-token losses become one number (§3.3). The denominator always covers the whole mini-batch."""

    TOKEN_MEAN = "token-mean"  # DAPO: Σ_i Σ_t l_it / Σ_i |o_i|
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"  # GRPO: (1/G) Σ_i (1/|o_i|) Σ_t l_it
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"  # (1/G) Σ_i Σ_t l_it
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"  # Dr. GRPO: Σ_i Σ_t l_it / (G · L_max)


def _as_aggregation(mode: LossAggregation | str) -> LossAggregation:
    try:
        return LossAggregation(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in LossAggregation)
        raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {allowed}") from None


def denominator_count(
    mode: LossAggregation | str, mask: Tensor, *, max_response_length: int | None = None
) -> float:
    """The raw count behind a mini-batch's loss denominator (§3.3), from a response mask ``[B, T]``.

    token-mean: number of valid tokens; seq-mean-*: number of sequences with at least one valid token;
    seq-mean-token-sum-norm: that number × ``max_response_length``. Additive over rows, so the count of a
    mini-batch split across micro-batches or data-parallel ranks is the sum of the parts' counts.
    """
    mode = _as_aggregation(mode)
    valid = mask.bool()  # [B, T]
    if mode is LossAggregation.TOKEN_MEAN:
        return float(valid.sum().item())
    count = float(valid.any(dim=-1).sum().item())
    if mode is LossAggregation.SEQ_MEAN_TOKEN_SUM_NORM:
        if max_response_length is None or max_response_length <= 0:
            raise ValueError(f"{mode.value!r} needs max_response_length > 0, got {max_response_length}")
        count *= max_response_length
    return count


def safe_denominator(count: float) -> float:
    """``count``, or 1.0 when it is 0: an all-masked mini-batch (e.g. every sample overlong-filtered) has a
    zero numerator, and 1.0 makes its loss 0 instead of 0/0 = NaN."""
    return count if count > 0 else 1.0


def loss_denominator(
    mode: LossAggregation | str, mask: Tensor, *, max_response_length: int | None = None
) -> float:
    """The global denominator of the loss of one mini-batch (§3.3), from its whole response mask ``[B, T]``
    (see `denominator_count`). With several data-parallel ranks, sum the per-rank `denominator_count`s and
    apply `safe_denominator` instead, so every rank divides by the same number."""
    return safe_denominator(denominator_count(mode, mask, max_response_length=max_response_length))


def aggregate_loss(
    token_loss: Tensor, mask: Tensor, mode: LossAggregation | str, denominator: float
) -> Tensor:
    """The loss of ONE micro-batch, 0-dim, divided by the mini-batch's global ``denominator`` (§3.3).

    ``token_loss`` and ``mask`` are ``[b, T]``. Summing the results over the micro-batches of a mini-batch
    gives the mini-batch loss (and gradient) whatever the split. token-mean and seq-mean-token-sum(-norm)
    divide Σ l·m; seq-mean-token-mean divides Σ_i (Σ_t l·m / Σ_t m) (a sequence without valid tokens adds 0).
    """
    mode = _as_aggregation(mode)
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator} (use loss_denominator)")
    if mode is LossAggregation.SEQ_MEAN_TOKEN_MEAN:
        total = masked_mean(token_loss, mask, dim=-1).sum()  # Σ_i of per-sequence means [b] -> []
    else:
        total = masked_sum(token_loss, mask)
    return total / denominator


def soft_overlong_penalty(lengths: Tensor, *, max_length: int, cache_length: int) -> Tensor:
    """Soft overlong punishment R_length, Eq. 13 (§3.4), added to the correctness reward.

    0 if len ≤ L_max − L_cache; ((L_max − L_cache) − len) / L_cache inside the buffer; −1 if len > L_max.
    ``lengths`` is any shape (``[B]`` typically); the result is float32 of the same shape.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max_length={max_length}"
        )
    n = lengths.to(torch.float32)
    expected = float(max_length - cache_length)
    penalty = ((expected - n) / cache_length).clamp(max=0.0)
    return torch.where(n > max_length, torch.full_like(n, -1.0), penalty)


def overlong_filter_mask(truncated: Tensor) -> Tensor:
    """Overlong filtering (§3.4): bool ``[B]``, True = keep the sample (it was not truncated)."""
    return ~truncated.bool()


def apply_sample_mask(mask: Tensor, keep: Tensor) -> Tensor:
    """Zero the response mask ``[B, T]`` of samples whose ``keep`` ``[B]`` is False (they leave numerator
    AND denominator of the loss)."""
    if keep.shape != mask.shape[:1]:
        raise ValueError(f"keep must be [B] = {tuple(mask.shape[:1])}, got {tuple(keep.shape)}")
    k = keep.bool()[:, None]  # [B, 1]
    return mask & k if mask.dtype == torch.bool else mask * k.to(mask.dtype)


class GroupFilter(str, enum.Enum):
    """Why dynamic sampling kept or dropped a group (§3.2)."""

    ALL_CORRECT = "all-correct"
    ALL_WRONG = "all-wrong"
    KEPT = "kept"


def keep_groups(correct: Tensor) -> tuple[Tensor, list[GroupFilter]]:
    """Dynamic-sampling filter (§3.2, constraint of Eq. 8): keep a group iff 0 < #correct < G.

    ``correct`` is bool ``[num_groups, G]``: correctness (acc), not the shaped reward, as the reference does;
    with the soft overlong penalty two wrong answers can differ in reward yet carry no correctness signal.
    Returns ``keep`` bool ``[num_groups]`` and the reason for each group.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be [num_groups, G], got shape {tuple(correct.shape)}")
    group_size = correct.shape[1]
    n_correct = correct.bool().sum(dim=-1)  # [num_groups]
    keep = (n_correct > 0) & (n_correct < group_size)
    reasons = [
        GroupFilter.ALL_CORRECT if k == group_size else GroupFilter.ALL_WRONG if k == 0 else GroupFilter.KEPT
        for k in n_correct.tolist()
    ]
    return keep, reasons


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of sampled tokens, shaped like ``tokens``."""

    logprobs: Tensor  # log π(token), differentiable
    entropy: Tensor  # entropy of π at the position, no gradient
    probs: Tensor  # π(token) = exp(logprobs), no gradient


def _chunked_forward(
    logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns log π(tokens) ``[N]``, logsumexp ``[N]`` and entropy ``[N]`` (``[0]`` if not wanted)."""
    # At least fp32: a bf16 log-softmax loses about 3 digits; upcasting one chunk at a time bounds the copy.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    n = logits.shape[0]
    logp = torch.empty(n, dtype=dtype, device=logits.device)
    lse = torch.empty(n, dtype=dtype, device=logits.device)
    entropy = torch.empty(n if with_entropy else 0, dtype=dtype, device=logits.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        x = logits[rows].to(dtype) / temperature  # [c, V]
        chunk_lse = torch.logsumexp(x, dim=-1)  # [c]
        lse[rows] = chunk_lse
        logp[rows] = x.gather(-1, tokens[rows, None]).squeeze(-1) - chunk_lse
        if with_entropy:
            p = torch.exp(x - chunk_lse[:, None])  # [c, V] softmax
            # H = lse − Σ p·x. Vocabulary entries masked to −inf have p = 0 and add 0, not 0·(−inf) = NaN.
            px = torch.where(p > 0, p * x, torch.zeros((), dtype=dtype, device=x.device))  # [c, V]
            entropy[rows] = chunk_lse - px.sum(dim=-1)
    return logp, lse, entropy


class _ChunkedLogprob(torch.autograd.Function):
    """log π(token) with a chunked backward: saves only the logits (no copy) and the log-sum-exp ``[N]``.

    Plain autograd would keep every chunk's upcast, temperature-scaled logits for backward, a full ``[N, V]``
    fp32 copy; here the softmax is recomputed chunk by chunk in backward instead.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int, with_entropy: bool
    ) -> tuple[Tensor, Tensor]:
        logp, lse, entropy = _chunked_forward(logits, tokens, temperature, chunk_size, with_entropy)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        logits, tokens, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(logits)  # [N, V]
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            g = grad_logp[rows, None].to(lse.dtype)  # [c, 1]
            p = torch.exp(logits[rows].to(lse.dtype) / temperature - lse[rows, None])  # [c, V] softmax
            # d log p_k / d x = onehot(k) − p, and x = logits / temperature.
            d = (-p * g).scatter_add_(-1, tokens[rows, None], g)  # [c, V]
            grad[rows] = (d / temperature).to(grad.dtype)
        return grad, None, None, None, None


def _token_pass(
    logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need temperature > 0 and chunk_size >= 1, got {temperature}, {chunk_size}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must match logits {tuple(logits.shape)} without V")
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [N, V]; a view when logits are contiguous
    flat_tokens = tokens.reshape(-1).long()  # [N]
    out = _ChunkedLogprob.apply(flat_logits, flat_tokens, temperature, chunk_size, with_entropy)
    logp, entropy = cast(tuple[Tensor, Tensor], out)
    return logp.view(tokens.shape), entropy.view(tokens.shape) if with_entropy else entropy


class _ChunkedHead(torch.autograd.Function):
    """log π(token) and entropy from hidden states ``[N, D]`` and the output projection ``[V, D]``, a chunk of
    rows at a time, in forward and backward: only one chunk's logits ``[c, V]`` ever exist.

    Saves the hidden states, the weight (both held anyway) and the log-sum-exp ``[N]``; backward recomputes
    each chunk's logits and softmax, then d hidden = d logits @ W and d W += d logitsᵀ @ hidden. The logits
    are computed in the inputs' dtype (bf16 under mixed precision, as the unchunked head's matmul) and the
    softmax maths in at least fp32, as `_chunked_forward`; the weight's gradient sums the chunks in fp32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        tokens: Tensor,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logp = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows] @ weight.T  # [c, V]
            lp, ls, ent = _chunked_forward(logits, tokens[rows], temperature, chunk_size, with_entropy)
            logp[rows], lse[rows] = lp, ls
            if with_entropy:
                entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, tokens, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # [N, D]
        grad_weight = None  # [V, D], the chunks summed in fp32
        if want_weight:
            grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]  # [c, D]
            g = grad_logp[rows, None].to(lse.dtype)  # [c, 1]
            p = torch.exp((h @ weight.T).to(lse.dtype) / temperature - lse[rows, None])  # [c, V] softmax
            # d log p_k / d x = onehot(k) − p, and x = h Wᵀ / temperature
            d = ((-p * g).scatter_add_(-1, tokens[rows, None], g) / temperature).to(h.dtype)  # [c, V]
            if grad_hidden is not None:
                grad_hidden[rows] = d @ weight
            if grad_weight is not None:
                grad_weight += d.T @ h
        out_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, out_weight, None, None, None, None


def token_stats_from_hidden(
    hidden: Tensor, weight: Tensor, tokens: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> TokenStats:
    """`token_stats_from_logits` of the logits ``hidden @ weight.T``, computed ``chunk_size`` tokens at a
    time in forward and backward, so no ``[tokens x vocabulary]`` tensor is ever held whole.

    ``hidden`` ``[B, T, D]`` or ``[N, D]``, ``weight`` ``[V, D]`` (the LM head), ``tokens`` ``[B, T]`` or
    ``[N]``; differentiable in ``hidden`` and ``weight``. The logits are computed in the dtype of ``hidden``
    and ``weight`` (cast them both first, e.g. to bf16 for mixed precision).
    """
    logp, entropy = _head_pass(hidden, weight, tokens, temperature, chunk_size, with_entropy=True)
    return TokenStats(logprobs=logp, entropy=entropy, probs=torch.exp(logp.detach()))


def logprobs_from_hidden(
    hidden: Tensor, weight: Tensor, tokens: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """`logprobs_from_logits` of ``hidden @ weight.T``, chunked as `token_stats_from_hidden` (no entropy)."""
    return _head_pass(hidden, weight, tokens, temperature, chunk_size, with_entropy=False)[0]


def _head_pass(
    hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float, chunk_size: int, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need temperature > 0 and chunk_size >= 1, got {temperature}, {chunk_size}")
    if tokens.shape != hidden.shape[:-1] or weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)}, hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
            "must be [...], [..., D] and [V, D]"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    flat_tokens = tokens.reshape(-1).long()  # [N]
    out = _ChunkedHead.apply(flat_hidden, weight, flat_tokens, temperature, chunk_size, with_entropy)
    logp, entropy = cast(tuple[Tensor, Tensor], out)
    return logp.view(tokens.shape), entropy.view(tokens.shape) if with_entropy else entropy


def logprobs_from_logits(
    logits: Tensor, tokens: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """log softmax(logits / temperature) at ``tokens``, differentiable; r_it of Eq. 8 is built from it.

    ``logits`` ``[N, V]`` or ``[B, T, V]``, ``tokens`` ``[N]`` or ``[B, T]``; computed as gathered logit −
    logsumexp over chunks of ``chunk_size`` rows, in at least fp32. The result has the shape of ``tokens``.
    """
    return _token_pass(logits, tokens, temperature, chunk_size, with_entropy=False)[0]


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Entropy of softmax(logits / temperature) per row (§4.3 training dynamics), without gradient.

    ``logits`` ``[N, V]`` or ``[B, T, V]``; the result is ``[N]`` or ``[B, T]``.
    """
    with torch.no_grad():
        tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        return _token_pass(logits, tokens, temperature, chunk_size, with_entropy=True)[1]


def token_stats_from_logits(
    logits: Tensor, tokens: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> TokenStats:
    """Log-prob (differentiable), entropy and probability of ``tokens``: one chunked pass over ``logits``."""
    logp, entropy = _token_pass(logits, tokens, temperature, chunk_size, with_entropy=True)
    return TokenStats(logprobs=logp, entropy=entropy, probs=torch.exp(logp.detach()))


def mismatch_kl(rollout_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL(π_rollout ‖ π_trainer) on the sampled tokens: train/rollout mismatch diagnostic, 0-dim, no gradient.

    Tokens were sampled by the rollout engine, so with r = π_trainer / π_rollout the k3 estimator
    (r − 1) − log r is unbiased and never negative; the result is its mean over valid tokens of ``[B, T]``.
    """
    with torch.no_grad():
        valid = mask.bool()  # [B, T]
        zero = torch.zeros((), dtype=trainer_logprobs.dtype, device=trainer_logprobs.device)
        # Padding is selected away (−inf − −inf = NaN); the clamp is the one of _MAX_LOG_RATIO.
        log_r = torch.where(valid, trainer_logprobs - rollout_logprobs, zero)  # [B, T]
        log_r = log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).float()
        return masked_mean(torch.exp(log_r) - 1.0 - log_r, valid)


def rollout_is_ratios(
    trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, sequence: bool
) -> Tensor:
    """π_trainer / π_rollout of the sampled tokens, ``[B, T]``, detached, 0 on padding: per token, or with
    ``sequence`` the whole response's ratio (the product of its tokens', exp of the sum of the log-ratios)
    on each of its tokens."""
    with torch.no_grad():
        valid = mask.bool()
        zero = torch.zeros((), dtype=torch.float32, device=trainer_logprobs.device)
        log_r = torch.where(valid, (trainer_logprobs - rollout_logprobs).float(), zero)  # [B, T]
        if sequence:
            log_r = log_r.sum(1, keepdim=True).expand_as(log_r)
        ratio = torch.exp(log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        return torch.where(valid, ratio, zero)


def rollout_is_weights(
    trainer_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    cap: float,
    sequence: bool = False,
    masking: bool = False,
) -> Tensor:
    """Importance weights for the train/rollout mismatch, ``[B, T]``, detached (not in the paper). The ratio
    (`rollout_is_ratios`: per token, or per response with ``sequence``) truncated at ``cap`` (TIS:
    min(ratio, cap)), or with ``masking`` kept where it lies in [1/cap, cap] and 0 outside (the token, or
    with ``sequence`` the whole response, leaves the loss). Pass them as ``policy_loss(is_weights=...)``."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    ratio = rollout_is_ratios(trainer_logprobs, rollout_logprobs, mask, sequence=sequence)
    if masking:
        return torch.where((ratio >= 1.0 / cap) & (ratio <= cap), ratio, torch.zeros_like(ratio))
    return ratio.clamp(max=cap)


def truncated_is_weights(trainer_logprobs: Tensor, rollout_logprobs: Tensor, *, cap: float = 2.0) -> Tensor:
    """Truncated importance-sampling weights min(π_trainer / π_rollout, cap), ``[B, T]``, detached ("TIS").

    Pass them as ``policy_loss(is_weights=...)`` to correct for rollout/trainer numerical mismatch. Values at
    padding positions are meaningless (``policy_loss`` ignores them).
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    # exp() of a large log-ratio overflows to inf, which the clamp maps to cap: no separate guard is needed.
    return torch.exp(trainer_logprobs.detach() - rollout_logprobs.detach()).clamp(max=cap)
