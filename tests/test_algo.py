"""Tests for dapo.algo: hand-computed values (arithmetic in the comments) and equivalence checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from dapo.algo import (
    AdvantageEstimator,
    GroupFilter,
    LossAggregation,
    PolicyLoss,
    advantages,
    aggregate_loss,
    apply_sample_mask,
    cispo_loss,
    entropy_from_logits,
    group_advantages,
    keep_groups,
    logprobs_from_logits,
    loss_denominator,
    masked_mean,
    masked_sum,
    mismatch_kl,
    overlong_filter_mask,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    rollout_is_weights,
    soft_overlong_penalty,
    token_stats_from_logits,
    truncated_is_weights,
)

# ---------------------------------------------------------------------------------------------------- helpers


def test_masked_helpers_hand_values() -> None:
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # float 0/1 mask; padding holds inf / NaN
    # sum over valid = 1 + 2 = 3; mean = 3 / 2 = 1.5; row means [1.5, 0 (empty row)]
    assert masked_sum(x, mask).item() == 3.0
    assert masked_mean(x, mask.bool()).item() == 1.5
    assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 0.0]))
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0  # empty mask -> 0, not NaN


# ---------------------------------------------------------------------------------------- advantages (Eq. 9)


def test_group_advantages_hand_values() -> None:
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])
    adv = group_advantages(rewards)
    # group 0: mean -0.5, deviations [1.5, -0.5, -0.5, -0.5], unbiased var = (2.25 + 3·0.25) / 3 = 1, std 1
    # group 1: mean = 0, unbiased var = 4 / 3, std = 1.1547 -> ±1 / 1.1547 = ±0.8660
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.8660254, -0.8660254, -0.8660254, 0.8660254]])
    assert_close(adv, expected, atol=1e-5, rtol=0)
    # Dr. GRPO: no division by the std
    assert_close(
        group_advantages(rewards, scale_by_std=False),
        torch.tensor([[1.5, -0.5, -0.5, -0.5], [1, -1, -1, 1.0]]),
    )


def test_rloo_advantages_hand_values() -> None:
    # A_i = R_i − mean of the others: [1, 0, 0, 1] -> 1 − 1/3 = 2/3, 0 − 2/3 = −2/3;
    # [1, −1, 1] -> 1 − 0 = 1, −1 − 1 = −2; a constant group -> 0
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert_close(rloo_advantages(r), torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    assert_close(rloo_advantages(torch.tensor([[1.0, -1.0, 1.0]])), torch.tensor([[1.0, -2.0, 1.0]]))
    assert rloo_advantages(torch.full((2, 3), 0.9)).abs().max().item() == 0.0
    assert rloo_advantages(torch.tensor([[1.0]])).item() == 0.0


def test_reinforce_pp_advantages_hand_values() -> None:
    # group means 0.5, 1, 0.25 -> centred [0.5, −0.5], [0, 0], [0.25, −0.25]; one std over all six values
    # (Bessel): sqrt(0.625 / 5) = 0.353553 -> ±1.414214, 0, ±0.707107
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.5, 0.0]])
    want = torch.tensor([[1.414214, -1.414214], [0.0, 0.0], [0.707107, -0.707107]])
    assert_close(reinforce_pp_advantages(r), want, atol=1e-5, rtol=0)
    assert reinforce_pp_advantages(torch.ones(3, 4)).abs().max().item() == 0.0  # nothing to learn: 0


def test_advantages_by_estimator() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert_close(advantages(r), group_advantages(r))
    assert_close(advantages(r, "grpo", scale_by_std=False), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    assert_close(advantages(r, AdvantageEstimator.RLOO), rloo_advantages(r))
    assert_close(advantages(r, "reinforce_plus_plus"), reinforce_pp_advantages(r))
    with pytest.raises(ValueError, match="'ppo' is not a valid AdvantageEstimator"):
        advantages(r, "ppo")


def test_group_advantages_constant_group_and_single_sample() -> None:
    # 16 × 0.9 in fp32: the mean is off by 1 ulp (6e-8), so a naive (R − mean) / (std + 1e-6) gives ±0.056.
    adv = group_advantages(torch.full((2, 16), 0.9))
    assert torch.equal(adv, torch.zeros(2, 16))
    single = group_advantages(torch.tensor([[1.0], [-1.0]]))  # G = 1: no baseline, Bessel std would be NaN
    assert torch.equal(single, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.ones(4))


# --------------------------------------------------------------------------------------- policy loss (Eq. 8)


def _loss(
    log_ratio: list[float],
    adv: list[float],
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, PolicyLoss]:
    """policy_loss on one sequence with old log-probs 0, so the log-ratio is the log-prob itself."""
    lp = torch.tensor([log_ratio], requires_grad=True)  # [1, T]
    adv_t = torch.tensor([adv])  # [1, T]
    out = policy_loss(
        lp,
        torch.zeros_like(lp),
        adv_t,
        torch.ones_like(lp),
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip_c=dual_clip_c,
    )
    return lp, out


def test_policy_loss_decoupled_clip_hand_values() -> None:
    lp, out = _loss([0.5, -0.5, -0.5, 0.2, 0.0], [1.0, 1.0, -1.0, 1.0, -1.0])
    # tok 0: A=+1, r = e^0.5 = 1.6487 > 1.28 -> clipped: loss = -1.28, no gradient
    # tok 1: A=+1, r = e^-0.5 = 0.6065; min(0.6065, 0.8) = 0.6065 (lower clip ignored for A>0) -> loss -0.6065
    # tok 2: A=-1, r = 0.6065 < 0.8; min(-0.6065, -0.8) = -0.8 -> loss 0.8, clipped, no gradient
    # tok 3: A=+1, r = e^0.2 = 1.2214 <= 1.28 -> unclipped with Clip-Higher, loss -1.2214
    # tok 4: A=-1, r = 1 -> loss 1
    assert_close(out.token_loss, torch.tensor([[-1.28, -0.60653, 0.8, -1.22140, 1.0]]), atol=1e-5, rtol=0)
    # upper clip on tok 0 of 5 tokens = 0.2; lower clip on tok 2 = 0.2
    assert out.clip_frac_upper.item() == pytest.approx(0.2)
    assert out.clip_frac_lower.item() == pytest.approx(0.2)
    # ratio mean = (1.6487 + 0.6065 + 0.6065 + 1.2214 + 1) / 5 = 5.0832 / 5 = 1.01663
    assert out.ratio_mean.item() == pytest.approx(1.01663, abs=1e-4)
    # k3 = (r − 1) − log r: 0.1487, 0.1065, 0.1065, 0.0214, 0 -> mean 0.38318 / 5 = 0.07664
    assert out.approx_kl.item() == pytest.approx(0.07664, abs=1e-4)
    # d loss / d logprob = −A·r where unclipped: tok 1 -> -0.6065, tok 3 -> -1.2214, tok 4 -> +1
    out.token_loss.sum().backward()
    assert lp.grad is not None
    assert_close(lp.grad, torch.tensor([[0.0, -0.60653, 0.0, -1.22140, 1.0]]), atol=1e-5, rtol=0)


def test_the_old_probability_of_upper_clipped_tokens_is_summed() -> None:
    # π_old 0.1, 0.5, 0.4; ratios 2, 2, 1 with A > 0: tokens 0 and 1 are clipped above (1.28), token 2 not
    ln = math.log
    old = torch.tensor([[ln(0.1), ln(0.5), ln(0.4)]])
    lp = torch.tensor([[ln(0.2), ln(1.0), ln(0.4)]])
    mask = torch.ones(1, 3)
    for loss in (policy_loss, cispo_loss):
        out = loss(lp, old, torch.ones(1), mask)
        assert out.upper_old_prob.item() == pytest.approx(0.6), loss  # 0.1 + 0.5: mean 0.3 over 2 tokens
        assert out.clip_frac_upper.item() == pytest.approx(2 / 3), loss


def test_policy_loss_symmetric_clip_is_grpo() -> None:
    # r = e^0.2 = 1.2214, A=+1: DAPO's eps_high 0.28 leaves it unclipped (-1.2214); GRPO's 0.2 clips it at 1.2
    _, dapo = _loss([0.2], [1.0])
    _, grpo = _loss([0.2], [1.0], eps_low=0.2, eps_high=0.2)
    assert dapo.token_loss.item() == pytest.approx(-1.22140, abs=1e-5)
    assert grpo.token_loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert grpo.clip_frac_upper.item() == 1.0 and dapo.clip_frac_upper.item() == 0.0


def test_policy_loss_dual_clip() -> None:
    # tok 0: A=-1, r = e^3 = 20.0855: loss = −min(-20.09, -1.28) = 20.09; dual clip c=10 caps it at −c·A = 10
    # tok 1: A=-1, r = e^0.5 = 1.6487: loss 1.6487 < 10, not capped
    # tok 2: A=+2, r = e^3: upper clip, loss = −1.28·2 = −2.56; the cap only concerns A < 0
    lp, out = _loss([3.0, 0.5, 3.0], [-1.0, -1.0, 2.0], dual_clip_c=10.0)
    assert_close(out.token_loss, torch.tensor([[10.0, 1.64872, -2.56]]), atol=1e-5, rtol=0)
    assert out.dual_clip_frac.item() == pytest.approx(1 / 3)
    out.token_loss.sum().backward()
    assert lp.grad is not None  # the cap is a constant: zero gradient on tok 0; tok 1: −A·r = 1.6487
    assert_close(lp.grad, torch.tensor([[0.0, 1.64872, 0.0]]), atol=1e-5, rtol=0)
    _, plain = _loss([3.0], [-1.0])
    assert plain.token_loss.item() == pytest.approx(20.08554, abs=1e-4)
    with pytest.raises(ValueError, match="dual_clip_c"):
        _loss([0.0], [1.0], dual_clip_c=1.0)


def test_policy_loss_is_weights_mask_and_padding() -> None:
    # tok 0: A=+1, r=1 -> loss −1 · w(0.5) = −0.5; grad −A·r·w = −0.5. Tok 1 is padding with −inf log-probs.
    inf = float("inf")
    lp = torch.tensor([[0.0, -inf]], requires_grad=True)
    old = torch.tensor([[0.0, -inf]])
    w = torch.tensor([[0.5, float("nan")]], requires_grad=True)  # detached inside; NaN at padding is ignored
    out = policy_loss(lp, old, torch.tensor([1.0]), torch.tensor([[True, False]]), is_weights=w)
    assert_close(out.token_loss, torch.tensor([[-0.5, 0.0]]))
    out.token_loss.sum().backward()
    assert lp.grad is not None and w.grad is None
    assert_close(lp.grad, torch.tensor([[-0.5, 0.0]]))  # finite, and zero at padding
    assert out.ratio_mean.item() == 1.0  # mean over the one valid token only


# ------------------------------------------------------------------------------------ loss aggregation (§3.3)


def test_token_mean_differs_from_seq_mean_hand_values() -> None:
    token_loss = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # lengths 1 and 3

    def loss(mode: LossAggregation) -> float:
        return aggregate_loss(
            token_loss, mask, mode, loss_denominator(mode, mask, max_response_length=3)
        ).item()

    assert loss(LossAggregation.TOKEN_MEAN) == pytest.approx(1.75)  # (4 + 3) / 4 tokens
    assert loss(LossAggregation.SEQ_MEAN_TOKEN_MEAN) == pytest.approx(2.5)  # (4/1 + 3/3) / 2 sequences
    assert loss(LossAggregation.SEQ_MEAN_TOKEN_SUM) == pytest.approx(3.5)  # (4 + 3) / 2 sequences
    assert loss(LossAggregation.SEQ_MEAN_TOKEN_SUM_NORM) == pytest.approx(7 / 6)  # (4 + 3) / (2 · 3)


def test_loss_denominator_counts_and_errors() -> None:
    mask = torch.tensor(
        [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    )  # 3 tokens, 2 non-empty sequences
    assert loss_denominator("token-mean", mask) == 3.0
    assert loss_denominator(LossAggregation.SEQ_MEAN_TOKEN_MEAN, mask) == 2.0
    assert loss_denominator("seq-mean-token-sum-norm", mask, max_response_length=8) == 16.0  # 2 · 8
    assert loss_denominator("token-mean", torch.zeros(2, 3)) == 1.0  # all masked: 1, so the loss is 0 not NaN
    with pytest.raises(ValueError, match="max_response_length"):
        loss_denominator("seq-mean-token-sum-norm", mask)
    with pytest.raises(ValueError, match="allowed: token-mean"):
        loss_denominator("token-avg", mask)
    with pytest.raises(ValueError, match="denominator"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "token-mean", 0.0)


@pytest.mark.parametrize("mode", list(LossAggregation))
def test_micro_batch_split_gives_same_loss_and_gradient(mode: LossAggregation) -> None:
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    lengths = torch.tensor([5, 1, 0, 3, 2, 4])  # includes an empty sequence
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    old = -torch.rand(B, T, generator=g)
    base = old + 0.4 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip range
    adv = torch.randn(B, generator=g)
    denom = loss_denominator(mode, mask, max_response_length=T)

    def run(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        lp = base.clone().requires_grad_(True)  # leaf [B, T]
        total = torch.zeros(())
        for s in range(0, B, micro):
            out = policy_loss(lp[s : s + micro], old[s : s + micro], adv[s : s + micro], mask[s : s + micro])
            loss = aggregate_loss(out.token_loss, mask[s : s + micro], mode, denom)
            loss.backward()  # gradient accumulation, as the actor does
            total = total + loss.detach()
        assert lp.grad is not None
        return total, lp.grad

    full_loss, full_grad = run(B)
    assert full_grad.abs().sum() > 0  # the comparison below is not between zeros
    for micro in (1, 2, 4):
        loss, grad = run(micro)
        assert_close(loss, full_loss, atol=1e-6, rtol=0)
        assert_close(grad, full_grad, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- overlong shaping (§3.4)


def test_soft_overlong_penalty_hand_values() -> None:
    # L_max = 20, L_cache = 4: free up to 16; 17 -> (16 − 17)/4 = −0.25; 20 -> −4/4 = −1; 21 > L_max -> −1
    out = soft_overlong_penalty(torch.tensor([10, 16, 17, 20, 21]), max_length=20, cache_length=4)
    assert_close(out, torch.tensor([0.0, 0.0, -0.25, -1.0, -1.0]))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="cache_length=30, max_length=20"):
        soft_overlong_penalty(torch.tensor([1]), max_length=20, cache_length=30)
    with pytest.raises(ValueError, match="cache_length=0"):
        soft_overlong_penalty(torch.tensor([1]), max_length=20, cache_length=0)


def test_overlong_filter_removes_samples_from_numerator_and_denominator() -> None:
    keep = overlong_filter_mask(torch.tensor([False, True, False]))
    assert keep.tolist() == [True, False, True]
    mask = torch.ones(3, 2, dtype=torch.bool)
    filtered = apply_sample_mask(mask, keep)
    assert filtered.tolist() == [[True, True], [False, False], [True, True]]
    assert apply_sample_mask(mask.float(), keep).tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    # token losses 1, 100 (truncated), 3 per token: token-mean over the kept 4 tokens = (2·1 + 2·3) / 4 = 2
    token_loss = torch.tensor([[1.0, 1.0], [100.0, 100.0], [3.0, 3.0]])
    denom = loss_denominator("token-mean", filtered)
    assert denom == 4.0
    assert aggregate_loss(token_loss, filtered, "token-mean", denom).item() == 2.0


# ---------------------------------------------------------------------------------- dynamic sampling (§3.2)


def test_keep_groups_reasons() -> None:
    correct = torch.tensor([[True, True, True], [False, False, False], [True, False, False]])
    keep, reasons = keep_groups(correct)
    assert keep.tolist() == [False, False, True]
    assert reasons == [GroupFilter.ALL_CORRECT, GroupFilter.ALL_WRONG, GroupFilter.KEPT]
    assert [r.value for r in reasons] == ["all-correct", "all-wrong", "kept"]


# ------------------------------------------------------------------------------------- logits -> token stats


def _reference_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_chunked_logprobs_equal_full_log_softmax_with_gradient(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(7, 11, generator=g)).requires_grad_(True)  # N = 7 rows, V = 11
    tokens = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, generator=g)  # arbitrary weights so each row's gradient differs
    ref = _reference_logprobs(logits, tokens, 0.7)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), logits)
    out = logprobs_from_logits(logits, tokens, temperature=0.7, chunk_size=chunk_size)
    assert_close(out, ref, atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad((out * upstream).sum(), logits)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


def test_logprobs_3d_and_bf16() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=g).to(torch.bfloat16)  # [B, T, V]
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    out = logprobs_from_logits(logits, tokens, chunk_size=2)
    assert out.shape == (2, 3) and out.dtype == torch.float32  # computed in fp32 from bf16 logits
    assert_close(out, _reference_logprobs(logits, tokens, 1.0), atol=1e-6, rtol=1e-6)


def test_entropy_hand_values() -> None:
    # uniform over V = 4: H = log 4 = 1.3863; one-hot-ish [50, 0, 0, 0]: H ≈ 3·e^-50·50 ≈ 3e-20 ≈ 0
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [1.0, 1.0, -math.inf, -math.inf]])
    # row 2: two entries masked to −inf, uniform over the other two: H = log 2 = 0.6931 (no NaN from 0·−inf)
    ent = entropy_from_logits(logits.requires_grad_(True), chunk_size=2)
    assert_close(ent, torch.tensor([1.38629, 0.0, 0.69315]), atol=1e-5, rtol=0)
    assert not ent.requires_grad
    # temperature 2 on logits [ln 9, 0]: p ∝ [3, 1] = [0.75, 0.25]; H = −(.75 ln .75 + .25 ln .25) = 0.56234
    hot = entropy_from_logits(torch.tensor([[math.log(9.0), 0.0]]), temperature=2.0)
    assert hot.item() == pytest.approx(0.56234, abs=1e-5)


def test_token_stats_one_pass() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]], requires_grad=True)  # p = [3, 1, 1, 1] / 6
    stats = token_stats_from_logits(logits, torch.tensor([0]))
    # log p(0) = ln 0.5 = −0.6931; H = −(0.5 ln 0.5 + 3 · (1/6) ln(1/6)) = 0.34657 + 0.89588 = 1.24245
    assert_close(stats.logprobs, torch.tensor([-0.69315]), atol=1e-5, rtol=0)
    assert_close(stats.probs, torch.tensor([0.5]), atol=1e-6, rtol=0)
    assert_close(stats.entropy, torch.tensor([1.24245]), atol=1e-5, rtol=0)
    assert stats.logprobs.requires_grad and not stats.entropy.requires_grad and not stats.probs.requires_grad
    stats.logprobs.sum().backward()
    assert logits.grad is not None  # d log p_0 / d x = onehot − p = [0.5, −1/6, −1/6, −1/6]
    assert_close(logits.grad, torch.tensor([[0.5, -1 / 6, -1 / 6, -1 / 6]]))


# ------------------------------------------------------------------------------------ train/rollout mismatch


def test_mismatch_kl_hand_values() -> None:
    rollout = torch.tensor([[-1.0, -2.0, -math.inf]])
    trainer = torch.tensor([[-1.0, -1.5, -math.inf]])
    mask = torch.tensor([[1, 1, 0]])  # third token is padding
    # log r = trainer − rollout = [0, 0.5]; k3 = (r − 1) − log r = [0, 1.64872 − 1 − 0.5 = 0.14872];
    # mean 0.07436
    assert mismatch_kl(rollout, trainer, mask).item() == pytest.approx(0.07436, abs=1e-5)
    assert mismatch_kl(rollout, rollout, mask).item() == 0.0


def test_truncated_is_weights_hand_values() -> None:
    trainer = torch.tensor([[0.0, -math.log(2.0), 3.0, 200.0]], requires_grad=True)
    rollout = torch.zeros(1, 4)
    # exp([0, −ln 2, 3, 200]) = [1, 0.5, 20.09, inf] -> min(·, 2) = [1, 0.5, 2, 2]
    w = truncated_is_weights(trainer, rollout, cap=2.0)
    assert_close(w, torch.tensor([[1.0, 0.5, 2.0, 2.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(trainer, rollout, cap=0.0)


# ---------------------------------------------------------------------------- other objectives (GSPO, CISPO)


def test_cispo_keeps_a_gradient_on_clipped_tokens_hand_values() -> None:
    # π = [0.5, 0.2], π_old = [0.25, 0.2] -> r = [2, 1]; A = 1; weights clip(r, 0.8, 1.28) = [1.28, 1]
    # loss_t = −w·A·log π = [−1.28·ln 0.5, −ln 0.2] = [0.887228, 1.609438]; d loss / d log π = −w·A
    lp = torch.tensor([[math.log(0.5), math.log(0.2)]], requires_grad=True)
    old = torch.tensor([[math.log(0.25), math.log(0.2)]])
    mask = torch.ones(1, 2)
    out = cispo_loss(lp, old, torch.ones(1), mask, eps_low=0.2, eps_high=0.28)
    assert_close(out.token_loss.detach(), torch.tensor([[0.887228, 1.609438]]), atol=1e-5, rtol=0)
    out.token_loss.sum().backward()
    assert lp.grad is not None
    assert_close(lp.grad, torch.tensor([[-1.28, -1.0]]))
    assert out.clip_frac_upper.item() == 0.5 and out.clip_frac_lower.item() == 0.0
    # the clipped surrogate gives the clipped token no gradient
    lp2 = lp.detach().clone().requires_grad_(True)
    policy_loss(lp2, old, torch.ones(1), mask, eps_low=0.2, eps_high=0.28).token_loss.sum().backward()
    assert lp2.grad is not None and lp2.grad[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="no dual clip"):
        cispo_loss(lp, old, torch.ones(1), mask, dual_clip_c=10.0)


def test_gspo_sequence_ratio_hand_values() -> None:
    # token log-ratios [ln 2, 0] -> sequence ratio exp(ln 2 / 2) = √2 = 1.414214 on both tokens
    lp = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]], requires_grad=True)
    old = torch.tensor([[math.log(0.25), math.log(0.2), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # padding takes no part
    # A = 1: clipped at 1.28, loss −1.28 per token, no gradient
    up = policy_loss(lp, old, torch.ones(1), mask, eps_low=0.2, eps_high=0.28, sequence_ratio=True)
    assert_close(up.token_loss.detach(), torch.tensor([[-1.28, -1.28, 0.0]]))
    assert up.clip_frac_upper.item() == 1.0
    # A = −1: loss = s = √2 per token; d s / d log π_t = s / |o| = 0.707107 on each real token
    down = policy_loss(lp, old, -torch.ones(1), mask, eps_low=0.2, eps_high=0.28, sequence_ratio=True)
    assert_close(down.token_loss.detach(), torch.tensor([[1.414214, 1.414214, 0.0]]), atol=1e-5, rtol=0)
    down.token_loss[0, 0].backward()
    assert lp.grad is not None
    assert_close(lp.grad, torch.tensor([[0.707107, 0.707107, 0.0]]), atol=1e-5, rtol=0)


def test_gspo_counts_clipped_responses() -> None:
    # response 0: token log-ratios [ln 2, 0] -> s = √2 (clipped above with A > 0); response 1: three of
    # ln 1.1 -> s = 1.1, inside [0.8, 1.28]. Tokens clipped: 2 of 5; responses clipped: 1 of 2.
    ln = math.log
    lp = torch.tensor([[ln(0.5), ln(0.2), 0.0], [ln(0.11), ln(0.22), ln(0.33)]])
    old = torch.tensor([[ln(0.25), ln(0.2), 0.0], [ln(0.1), ln(0.2), ln(0.3)]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = policy_loss(lp, old, torch.ones(2), mask, eps_low=0.2, eps_high=0.28, sequence_ratio=True)
    assert out.clipped_sequences.item() == 1.0
    assert_close(out.clip_frac_upper, torch.tensor(0.4))
    # the advantage's sign decides: with A < 0 an upper excursion is not clipped
    assert policy_loss(lp, old, -torch.ones(2), mask, sequence_ratio=True).clipped_sequences.item() == 0.0
    token_level = policy_loss(lp, old, torch.ones(2), mask)
    assert token_level.clipped_sequences.item() == 0.0  # not counted at the token level


def test_rollout_is_weights_per_token_and_per_response_truncated_and_masked() -> None:
    # token ratios π_trainer / π_rollout: row 0 [2, 1, (pad)], row 1 [0.5, 1, 2]; responses' products 2 and 1
    ln = math.log
    trainer = torch.tensor([[ln(0.5), ln(0.3), 0.0], [ln(0.1), ln(0.4), ln(0.2)]])
    rollout = torch.tensor([[ln(0.25), ln(0.3), -9.0], [ln(0.2), ln(0.4), ln(0.1)]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    cases = {  # cap 1.5; the mask's band is [1/1.5, 1.5]
        (False, False): [[1.5, 1.0, 0.0], [0.5, 1.0, 1.5]],
        (False, True): [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
        (True, False): [[1.5, 1.5, 0.0], [1.0, 1.0, 1.0]],
        (True, True): [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
    }
    for (sequence, masking), want in cases.items():
        got = rollout_is_weights(trainer, rollout, mask, cap=1.5, sequence=sequence, masking=masking)
        assert_close(got, torch.tensor(want), atol=1e-6, rtol=0, msg=f"{sequence=} {masking=}")
    assert_close(  # the token-level truncation is the TIS of `truncated_is_weights`
        rollout_is_weights(trainer, rollout, mask, cap=1.5) * mask,
        truncated_is_weights(trainer, rollout, cap=1.5) * mask,
    )
