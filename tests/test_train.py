"""The actor's update: exact micro-batch invariance, the schedule, non-finite guards, update direction."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dapo.config import ActorConfig, AlgorithmConfig
from dapo.models import CausalLM, HFCausalLM, ModelArgs, load_pretrained, save_pretrained
from dapo.train import Actor, TrainBatch, warmup_constant


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    args = ModelArgs(
        architecture="Qwen2ForCausalLM",
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        qkv_bias=True,
        tie_word_embeddings=True,
    )
    return CausalLM(args).float()


def random_batch(b: int = 8, seed: int = 1) -> TrainBatch:
    """Groups of two responses per prompt, of different prompt and response lengths."""
    g = torch.Generator().manual_seed(seed)
    n = (b + 1) // 2
    prompt_lens = torch.randint(2, 6, (n,), generator=g)
    resp_lens = torch.randint(1, 9, (b,), generator=g)
    p, r = int(prompt_lens.max()), int(resp_lens.max())
    prompt_mask = (torch.arange(p) >= p - prompt_lens[:, None]).long()  # left-padded
    prompt_ids = torch.randint(1, 48, (n, p), generator=g) * prompt_mask
    response_mask = (torch.arange(r) < resp_lens[:, None]).float()
    return TrainBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_index=torch.arange(b) // 2,
        response_ids=torch.randint(1, 48, (b, r), generator=g) * response_mask.long(),
        response_lengths=resp_lens,
        response_mask=response_mask,
        advantages=torch.randn(b, generator=g),
        rollout_logprobs=torch.zeros((b, r)),
    )


def make_actor(
    model: CausalLM, micro: int, mini: int = 4, aggregation: str = "token-mean", lr: float = 1e-2
) -> Actor:
    cfg = ActorConfig(lr=lr, warmup_steps=0, mini_batch_size=mini, micro_batch_size=micro, weight_decay=0.1)
    algo_cfg = AlgorithmConfig(loss_aggregation=aggregation)  # type: ignore[arg-type]
    return Actor(model, cfg, algo_cfg, temperature=1.0, max_response_length=8)


class PerMicroBatchNormalisedActor(Actor):
    """verl's default: each micro-batch divided by its OWN token count (what the global count fixes)."""

    def _micro_loss(
        self, mb: TrainBatch, denominator: float, **kw: Any
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        share = float(mb.response_mask.sum()) / denominator  # fraction of the mini-batch's tokens in this one
        n_micro = -(-self.cfg.mini_batch_size // self.cfg.micro_batch_size)
        return super()._micro_loss(mb, denominator * share * n_micro, **kw)


def run_update(
    base: CausalLM, batch: TrainBatch, micro: int, aggregation: str, cls: type[Actor] = Actor
) -> dict:
    """A real update (two mini-batches of 4: two AdamW steps) at the paper's lr 1e-6; the weights."""
    model = copy.deepcopy(base)
    cfg = ActorConfig(lr=1e-6, warmup_steps=0, mini_batch_size=4, micro_batch_size=micro, weight_decay=0.1)
    actor = cls(
        model, cfg, AlgorithmConfig(loss_aggregation=aggregation), temperature=1.0, max_response_length=8
    )  # type: ignore[arg-type]
    # old log-probs perturbed so that ratios differ from 1 and some tokens clip
    noise = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(5))
    batch.old_logprobs = actor.compute_logprobs(batch) + 0.3 * batch.response_mask * noise
    assert actor.update(batch)["actor/updates"] == 2
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_update_is_identical_for_any_micro_batch_size(aggregation: str) -> None:
    base, batch = tiny_model(), random_batch()
    whole = run_update(base, batch, micro=4, aggregation=aggregation)
    moved = max(float((whole[k] - v).abs().max()) for k, v in base.state_dict().items())
    assert moved > 1e-7  # the update really changed the weights (AdamW's first step moves them by ~lr)
    for micro in (1, 3):
        params = run_update(base, batch, micro=micro, aggregation=aggregation)
        for name in whole:
            # atol 3% of lr: AdamW's first steps are ~lr * sign(g), so an element whose gradient is ~0 may
            # move by a few % of lr either way with float summation order (a prompt's gradient sums over
            # its responses in one or several micro-batches). A wrong normaliser moves ~20k elements ~4e-6.
            torch.testing.assert_close(params[name], whole[name], rtol=1e-6, atol=3e-8)


class GradientRecorder(Actor):
    """Records each mini-batch's accumulated gradient (before clipping and the optimizer step)."""

    def _clip_gradients(self) -> float:
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.recorded = [*getattr(self, "recorded", []), grads]
        return super()._clip_gradients()


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gradient_is_identical_for_any_micro_batch_size(aggregation: str) -> None:
    """The invariant itself, on the gradients (lr 0 keeps the weights, so both mini-batches compare): a
    prompt shared by responses in one micro-batch or split across several gives the same gradient."""
    assert_gradients_invariant(AlgorithmConfig(loss_aggregation=aggregation))


@pytest.mark.parametrize(
    "objective",
    [
        {"policy_loss": "cispo", "dual_clip_c": None, "eps_low": 1.0},
        {
            "ratio_level": "sequence",
            "loss_aggregation": "seq-mean-token-mean",
            "eps_low": 3e-4,
            "eps_high": 4e-4,
        },
        {"rollout_is_cap": 1.5, "rollout_is_level": "sequence", "rollout_is_mode": "mask"},
        {"rollout_is_cap": 1.2, "rollout_is_level": "token", "rollout_is_mode": "truncate"},
    ],
    ids=["cispo", "gspo", "sequence-is-mask", "token-is-truncate"],
)
def test_other_objectives_give_the_same_gradient_for_any_micro_batch_size(objective: dict[str, Any]) -> None:
    assert_gradients_invariant(AlgorithmConfig(**objective))


def assert_gradients_invariant(algorithm: AlgorithmConfig) -> None:
    """Each mini-batch's gradient is the same with micro-batches of 4, 3 and 1 responses."""
    base, batch = tiny_model(), random_batch()
    grads = []
    for micro in (4, 3, 1):
        model = copy.deepcopy(base)
        cfg = ActorConfig(lr=0.0, warmup_steps=0, mini_batch_size=4, micro_batch_size=micro)
        actor = GradientRecorder(model, cfg, algorithm, temperature=1.0, max_response_length=8)  # type: ignore[arg-type]
        noise = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(5))
        batch.old_logprobs = actor.compute_logprobs(batch) + 0.3 * batch.response_mask * noise
        # an engine's log-probs a little off the trainer's (for the mismatch corrections)
        engine_noise = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(6))
        batch.rollout_logprobs = batch.old_logprobs + 0.1 * batch.response_mask * engine_noise
        actor.update(batch)
        grads.append(actor.recorded)
    for other in grads[1:]:
        for mini, expected in zip(other, grads[0], strict=True):
            assert mini.keys() == expected.keys()
            for name, g in mini.items():  # float32 summation order: 1e-5 of the tensor's largest entry
                scale = float(expected[name].abs().max())
                torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-5 * scale)


def test_per_micro_batch_normalisation_would_be_caught() -> None:
    """The invariance test above can fail: verl's per-micro-batch token-mean changes the update."""
    base, batch = tiny_model(), random_batch()
    whole = run_update(base, batch, micro=4, aggregation="token-mean", cls=PerMicroBatchNormalisedActor)
    split = run_update(base, batch, micro=1, aggregation="token-mean", cls=PerMicroBatchNormalisedActor)
    worst = max(float(((split[k] - whole[k]).abs() / whole[k].abs().clamp_min(1e-9)).max()) for k in whole)
    assert worst > 1e-4


def test_update_without_old_logprobs_fills_them_in_on_policy() -> None:
    """No separate pass for the first mini-batch: its old log-probs are its own forward's (ratio exactly 1);
    the second mini-batch's come from a pass before the first optimizer step. Same result as precomputing."""
    base, batch = tiny_model(), random_batch()
    precomputed = make_actor(copy.deepcopy(base), micro=3, mini=4, lr=1e-3)
    batch.old_logprobs = precomputed.compute_logprobs(batch)
    expected_old = batch.old_logprobs.clone()
    precomputed.update(batch)
    fused_model = copy.deepcopy(base)
    fused = make_actor(fused_model, micro=3, mini=4, lr=1e-3)
    batch.old_logprobs = None
    fused.update(batch)
    assert batch.old_logprobs is not None
    torch.testing.assert_close(batch.old_logprobs, expected_old, rtol=1e-6, atol=1e-6)
    for k, v in precomputed.model.state_dict().items():
        torch.testing.assert_close(fused_model.state_dict()[k], v, rtol=1e-5, atol=1e-6)  # 0.1% of lr
    single = make_actor(copy.deepcopy(base), micro=8, mini=8)
    batch.old_logprobs = None
    metrics = single.update(batch)
    assert metrics["actor/ratio_mean"] == 1.0 and metrics["actor/approx_kl"] == 0.0


def test_positive_advantage_raises_the_sampled_tokens_probability() -> None:
    model = tiny_model()
    batch = random_batch(b=2)
    batch.advantages = torch.tensor([1.0, -1.0])
    actor = make_actor(model, micro=2, mini=2)
    batch.old_logprobs = actor.compute_logprobs(batch)
    before = batch.old_logprobs.clone()
    actor.update(batch)
    after = actor.compute_logprobs(batch)
    mask = batch.response_mask.bool()
    assert after[0][mask[0]].sum() > before[0][mask[0]].sum()
    assert after[1][mask[1]].sum() < before[1][mask[1]].sum()


def test_non_finite_loss_skips_the_step_and_keeps_the_weights() -> None:
    model = tiny_model()
    batch = random_batch(b=4)
    actor = make_actor(model, micro=2, mini=4)
    batch.old_logprobs = actor.compute_logprobs(batch)
    batch.advantages = torch.tensor([1.0, float("nan"), -1.0, 0.5])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = actor.update(batch)
    assert metrics["actor/skipped_updates"] == 1 and metrics["actor/updates"] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not actor.optimizer.state  # Adam's moments were not touched either


def test_linear_warmup_then_constant() -> None:
    f = warmup_constant(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_constant(0)(0) == 1.0
    model = tiny_model()
    cfg = ActorConfig(lr=1e-3, warmup_steps=2, mini_batch_size=4, micro_batch_size=4)
    actor = Actor(model, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=8)
    batch = random_batch(b=4)
    batch.old_logprobs = actor.compute_logprobs(batch)
    lrs = [actor.update(batch)["actor/lr"] for _ in range(3)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])


def test_compute_logprobs_matches_a_direct_forward() -> None:
    """Against the plain computation: each response as its own right-padded row prompt + response."""
    model = tiny_model()
    batch = random_batch(b=5)
    actor = make_actor(model, micro=2)  # micro-batches cut through a group: its prompt is computed twice
    actor.temperature = 0.7
    got = actor.compute_logprobs(batch)
    for i in range(len(batch)):
        prompt = batch.prompt_ids[batch.prompt_index[i]][batch.prompt_mask[batch.prompt_index[i]].bool()]
        response = batch.response_ids[i, : batch.response_lengths[i]]
        with torch.no_grad():
            logits = model(torch.cat([prompt, response])[None])[0, len(prompt) - 1 : -1]  # [r, V]
        expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, response[:, None])[:, 0]
        torch.testing.assert_close(got[i, : len(response)], expected, rtol=1e-5, atol=1e-5)
        assert not got[i, len(response) :].any()


def test_rows_keep_only_the_prompts_they_use_trimmed() -> None:
    batch = random_batch(b=8)
    part = batch.rows(slice(3, 6))  # responses 3, 4, 5 continue prompts 1, 2, 2
    assert part.prompt_index.tolist() == [0, 1, 1]
    p = int(batch.prompt_mask[1:3].sum(1).max())
    assert torch.equal(part.prompt_ids, batch.prompt_ids[1:3, -p:])
    assert part.response_ids.shape[1] == int(batch.response_lengths[3:6].max())


def test_transformers_model_gives_the_same_update(tmp_path: Path) -> None:
    """`model.implementation=hf`: the actor runs transformers' model one prompt + response row per response;
    its log-probs and its update equal the native model's (shared prompts) to float tolerance."""
    native = tiny_model()
    save_pretrained(native, tmp_path)
    hf = load_pretrained(tmp_path, implementation="hf")
    assert isinstance(hf, HFCausalLM)
    batch = random_batch()
    actors = [make_actor(m, micro=3, lr=1e-3) for m in (native, hf)]
    old = [a.compute_logprobs(batch) for a in actors]
    torch.testing.assert_close(old[1], old[0], rtol=1e-5, atol=1e-5)
    for actor in actors:
        batch.old_logprobs = None
        actor.update(batch)
    hf_state, before = hf.hf.state_dict(), tiny_model().state_dict()
    moved = max(float((v - before[k]).abs().max()) for k, v in native.state_dict().items())
    assert moved > 5e-4  # AdamW's first step moves weights by ~lr = 1e-3
    for name, value in native.state_dict().items():
        # all but a few elements equal to 1% of lr (an element whose gradient is ~0 may take Adam's
        # ~lr * sign(g) step either way with another CPU's rounding); a wrong gradient moves most of them
        off = (hf_state[name] - value).abs() > 1e-5
        assert float(off.float().mean()) < 0.01, name


def weight_casts(run: Callable[[], object], params: list[torch.Tensor]) -> int:
    """How many casts (``aten::_to_copy``, autocast's) ``run()`` makes of float32 tensors shaped as ``params``
    (the bf16 gradients' casts back, one per backward, are not counted)."""
    shapes = [list(p.shape) for p in params if p.dim() == 2]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    return sum(
        e.name == "aten::_to_copy" and e.input_shapes[0] in shapes and e.input_dtypes[0] == "float"
        for e in prof.events()
    )


def test_bf16_mixed_casts_each_weight_once_per_mini_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16-mixed the micro-batches of a mini-batch (and of a log-prob pass) share the first one's
    bf16 weight copies (autocast's cache, kept by `Actor._casts_kept`): 4 micro-batches cast each weight
    once, not 4 times, and the update is bit for bit the one that casts every time."""
    base, batch = tiny_model(), random_batch()
    cfg = ActorConfig(
        lr=1e-3,
        warmup_steps=0,
        mini_batch_size=8,
        micro_batch_size=2,
        weight_decay=0.0,
        precision="bf16-mixed",
    )
    weights, casts = {}, {}
    for kept in (True, False):
        model = copy.deepcopy(base)
        actor = Actor(model, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=8)
        if not kept:
            monkeypatch.setattr(actor, "_casts_kept", contextlib.nullcontext)

        def run(actor: Actor = actor) -> None:
            actor.compute_logprobs(batch)
            actor.update(copy.deepcopy(batch))

        casts[kept] = weight_casts(run, list(model.parameters()))
        weights[kept] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False], strict=True))
    assert casts[True] > 0 and casts[False] == 4 * casts[True]


@pytest.mark.usefixtures("kernel_path")
def test_bf16_mixed_keeps_float32_masters_and_matches_the_float32_update() -> None:
    """`actor.precision=bf16-mixed`: the forward runs in bf16 (log-probs differ from float32 by bf16
    rounding only: <= 0.05 nats here), the loss within 2% of float32's, gradients within 10% (relative
    norm); parameters, gradients and AdamW's moments stay float32, and the step moves the weights as
    float32's does (the same sign of change on >= 95% of the entries)."""
    base, batch = tiny_model(), random_batch()
    ref, mixed = copy.deepcopy(base), copy.deepcopy(base)
    cfg = ActorConfig(lr=1e-3, warmup_steps=0, mini_batch_size=8, micro_batch_size=3, weight_decay=0.0)
    actors = {
        "model": Actor(ref, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=8),
        "bf16-mixed": Actor(
            mixed,
            dataclasses.replace(cfg, precision="bf16-mixed"),
            AlgorithmConfig(),
            temperature=1.0,
            max_response_length=8,
        ),
    }
    lp = {k: a.compute_logprobs(batch) for k, a in actors.items()}
    assert not torch.equal(lp["model"], lp["bf16-mixed"])  # bf16 compute really ran
    assert (lp["model"] - lp["bf16-mixed"]).abs().max() <= 0.05
    batch.old_logprobs = lp["model"] + 0.1 * torch.randn(
        lp["model"].shape, generator=torch.Generator().manual_seed(2)
    )
    grads, losses = {}, {}
    for name, actor in actors.items():
        mb = batch.rows(slice(0, 8))
        loss, _, _ = actor._micro_loss(mb, float(mb.response_mask.sum()))
        loss.backward()
        losses[name] = float(loss.detach())
        grads[name] = torch.cat([p.grad.flatten() for p in actor.model.parameters() if p.grad is not None])
        actor.optimizer.zero_grad(set_to_none=True)
    assert losses["bf16-mixed"] == pytest.approx(losses["model"], rel=0.02)
    assert grads["bf16-mixed"].dtype == torch.float32
    assert (grads["bf16-mixed"] - grads["model"]).norm() <= 0.1 * grads["model"].norm()
    before = torch.cat([p.detach().flatten() for p in base.parameters()])
    for actor in actors.values():
        assert actor.update(batch)["actor/updates"] == 1
    after = {k: torch.cat([p.detach().flatten() for p in a.model.parameters()]) for k, a in actors.items()}
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    state = [t for s in actors["bf16-mixed"].optimizer.state.values() for t in s.values() if t.numel() > 1]
    assert len(state) == 2 * len(list(mixed.parameters())) and all(t.dtype == torch.float32 for t in state)
    moved = (after["model"] - before).sign() == (after["bf16-mixed"] - before).sign()
    assert moved.float().mean() >= 0.95


def test_the_effect_metrics_do_not_depend_on_the_micro_batch_split() -> None:
    """`actor/entropy_top20` (from histograms summed over micro-batches) and `actor/clip_upper_old_prob`
    are the same for any micro-batch size; the top 20% hold more entropy than the mean token."""
    base, batch = tiny_model(), random_batch()
    batch.old_logprobs = -10.0 * batch.response_mask  # π_old = e^-10: every ratio far above 1 + eps_high
    batch.advantages = batch.advantages.abs()
    metrics = {}
    for micro in (1, 4):
        model = tiny_model()
        model.load_state_dict(base.state_dict())
        metrics[micro] = make_actor(model, micro).update(dataclasses.replace(batch))
    for key in ("actor/entropy_top20", "actor/clip_upper_old_prob", "actor/entropy"):
        assert metrics[1][key] == pytest.approx(metrics[4][key], rel=1e-5), key
    assert metrics[4]["actor/entropy_top20"] > metrics[4]["actor/entropy"]
    assert metrics[4]["actor/clip_frac_upper"] == 1.0  # A > 0 everywhere: every token is clipped above
    assert metrics[4]["actor/clip_upper_old_prob"] == pytest.approx(math.exp(-10.0), rel=1e-5)


def test_bf16_mixed_needs_float32_parameters() -> None:
    cfg = ActorConfig(precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"actor\.precision=bf16-mixed needs float32 parameters"):
        Actor(tiny_model().bfloat16(), cfg, AlgorithmConfig(), temperature=1.0, max_response_length=8)


def test_mismatch_ratio_metrics_hand_values() -> None:
    """Every token's π_trainer / π_rollout is 2: the percentiles are 2; with cap 1.5 every token is
    truncated; per response (a response of L tokens: 2^L) with the mask's band [1/1.5, 1.5] all are masked."""
    from dapo.config import load_config
    from dapo.stages import mismatch_ratio_metrics

    batch = random_batch()
    batch.old_logprobs = batch.rollout_logprobs + math.log(2.0) * batch.response_mask
    cfg = load_config(None, ["algorithm.rollout_is_cap=1.5"])
    m = mismatch_ratio_metrics(cfg, batch)
    assert (m["rollout/is_ratio_p05"], m["rollout/is_ratio_p50"], m["rollout/is_ratio_p95"]) == (
        2.0,
        2.0,
        2.0,
    )
    assert m["rollout/is_truncated_fraction"] == 1.0
    cfg = load_config(None, ["algorithm.rollout_is_cap=1.5", "algorithm.rollout_is_level=sequence",
                             "algorithm.rollout_is_mode=mask"])  # fmt: skip
    m = mismatch_ratio_metrics(cfg, batch)
    assert m["rollout/is_masked_fraction"] == 1.0 and m["rollout/is_ratio_p05"] >= 2.0
