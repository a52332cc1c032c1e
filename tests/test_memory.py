"""The update's memory settings are exact: activation checkpointing, the chunked LM head and token-budget
micro-batches each leave the log-probs and the gradient what they are without them."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dapo import algo, distributed
from dapo.config import ActorConfig, AlgorithmConfig
from dapo.models import HFCausalLM, load_pretrained, save_pretrained
from dapo.train import Actor, TrainBatch, micro_batch_plan
from tests.test_train import GradientRecorder, random_batch, tiny_model


def test_chunked_head_of_zero_hidden_states_is_uniform() -> None:
    """Hand-valued: zero hidden states give zero logits, so over V = 5 every token has log-prob -log 5 and
    the entropy is log 5; the gradient of log p_k with respect to logit j is onehot(k) - 1/5, so with the
    hidden state h = 0 the weight's gradient is 0 and the hidden state's is (W_k - mean_j W_j)."""
    weight = torch.arange(10.0).view(5, 2).requires_grad_(True)  # [V=5, D=2]
    hidden = torch.zeros(3, 2, requires_grad=True)
    tokens = torch.tensor([0, 4, 2])
    stats = algo.token_stats_from_hidden(hidden, weight, tokens, chunk_size=2)
    torch.testing.assert_close(stats.logprobs, torch.full((3,), -math.log(5)))
    torch.testing.assert_close(stats.entropy, torch.full((3,), math.log(5)))
    stats.logprobs.sum().backward()
    assert hidden.grad is not None and weight.grad is not None
    # mean row of W is [4, 5]: token 0 → [0, 1] - [4, 5], token 4 → [8, 9] - [4, 5], token 2 → [0, 0]
    torch.testing.assert_close(hidden.grad, torch.tensor([[-4.0, -4.0], [4.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(weight.grad, torch.zeros(5, 2))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_head_equals_the_full_logits(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 40, (2, 7), generator=g)
    upstream = torch.randn(2, 7, generator=g, dtype=torch.float64)
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if chunked:
            stats = algo.token_stats_from_hidden(h, w, tokens, temperature=0.7, chunk_size=chunk)
            logp = algo.logprobs_from_hidden(h, w, tokens, temperature=0.7, chunk_size=chunk)
            torch.testing.assert_close(logp, stats.logprobs)
        else:
            stats = algo.token_stats_from_logits(h @ w.T, tokens, temperature=0.7)
        (stats.logprobs * upstream).sum().backward()
        results.append((stats.logprobs, stats.entropy, h.grad, w.grad))
    for full, split in zip(*results, strict=True):
        torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)


def test_chunked_head_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must be"):
        algo.token_stats_from_hidden(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))


def test_token_budget_plan_by_hand() -> None:
    """Prompts of 4 and 3 real tokens, two responses each of 5, 2 | 6, 1 tokens; a budget of 12 tokens:
    [row 0: 4 + 5 = 9, row 1 would add 2 → 11] → rows 0-1 (11); row 2: 3 + 6 = 9, row 3 adds 1 → 10."""
    batch = random_batch(4)
    batch.prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    batch.response_lengths = torch.tensor([5, 2, 6, 1])
    assert micro_batch_plan(batch, range(4), 8, max_tokens=12) == [range(0, 2), range(2, 4)]
    # a budget of 10: rows 0-1 cost 11 > 10, so row 1 opens a micro-batch paying its prompt again (4 + 2)
    assert micro_batch_plan(batch, range(4), 8, max_tokens=10) == [range(0, 1), range(1, 2), range(2, 4)]
    # a response alone over the budget goes alone; the count cap still applies
    assert micro_batch_plan(batch, range(4), 8, max_tokens=3) == [range(i, i + 1) for i in range(4)]
    assert micro_batch_plan(batch, range(4), 1, max_tokens=100) == [range(i, i + 1) for i in range(4)]
    assert micro_batch_plan(batch, range(1, 3), 3) == [range(1, 3)]  # by count alone
    assert micro_batch_plan(batch, range(2, 2), 8, max_tokens=12) == []


SETTINGS: dict[str, dict[str, Any]] = {
    "checkpointing": {"activation_checkpointing": True},
    "chunked-head": {"logits_chunk_tokens": 5},
    "token-budget": {"max_tokens_per_micro_batch": 12},
    "all": {"activation_checkpointing": True, "logits_chunk_tokens": 3, "max_tokens_per_micro_batch": 20},
}


def recorded_update(base: Any, batch: TrainBatch, aggregation: str, **settings: Any) -> GradientRecorder:
    """lr 0 (the weights stay, so both mini-batches compare); old log-probs perturbed so that some clip."""
    model = copy.deepcopy(base)
    checkpointing = bool(settings.get("activation_checkpointing", False))
    model, _ = distributed.parallelize(
        model, distributed.World.single(), activation_checkpointing=checkpointing
    )
    cfg = ActorConfig(lr=0.0, warmup_steps=0, mini_batch_size=4, micro_batch_size=4, **settings)
    actor = GradientRecorder(
        model, cfg, AlgorithmConfig(loss_aggregation=aggregation), temperature=0.9, max_response_length=8
    )  # type: ignore[arg-type]
    noise = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(5))
    batch.old_logprobs = actor.compute_logprobs(batch) + 0.3 * batch.response_mask * noise
    actor.update(batch)
    return actor


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_memory_settings_leave_the_gradient_unchanged(setting: str, aggregation: str) -> None:
    """float32, each mini-batch's gradient to 1e-6 of the tensor's largest entry (float summation order)."""
    base, batch = tiny_model(), random_batch()
    plain = recorded_update(base, batch, aggregation)
    plain_old = batch.old_logprobs
    other = recorded_update(base, batch, aggregation, **SETTINGS[setting])
    torch.testing.assert_close(batch.old_logprobs, plain_old, rtol=1e-6, atol=1e-6)
    assert len(other.recorded) == len(plain.recorded) == 2
    for got, want in zip(other.recorded, plain.recorded, strict=True):
        assert got.keys() == want.keys()
        for name, g in got.items():
            scale = float(want[name].abs().max())
            assert scale > 0, name
            torch.testing.assert_close(g, want[name], rtol=1e-6, atol=1e-6 * scale)


def test_token_budget_changes_the_micro_batches() -> None:
    """The budget really packs differently from the count (else the test above proves nothing)."""
    batch = random_batch()
    by_count = micro_batch_plan(batch, range(8), 4)
    by_tokens = micro_batch_plan(batch, range(8), 4, max_tokens=12)
    assert by_count == [range(0, 4), range(4, 8)] and len(by_tokens) > len(by_count)


def test_activation_checkpointing_recomputes_in_the_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """With checkpointing each layer's training forward runs twice per micro-batch (once more in the
    backward); without, once."""
    calls = {"n": 0}
    model = tiny_model()
    layer_cls = type(model.model.layers[0])
    original = layer_cls.forward_shared

    def counted(self: Any, *args: Any) -> torch.Tensor:
        calls["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(layer_cls, "forward_shared", counted)
    for checkpointing, per_layer in ((False, 1), (True, 2)):
        calls["n"] = 0
        recorded_update(model, random_batch(4), "token-mean", activation_checkpointing=checkpointing)
        # one no-grad log-prob pass (forward only) + one update pass of one micro-batch
        assert calls["n"] == 2 * (1 + per_layer), checkpointing


def test_transformers_model_with_memory_settings(tmp_path: Path) -> None:
    """`model.implementation=hf`: transformers' own gradient checkpointing and the chunked head give the
    plain update's gradient."""
    save_pretrained(tiny_model(), tmp_path)
    batch = random_batch()
    grads = []
    for settings in ({}, SETTINGS["all"]):
        hf = load_pretrained(tmp_path, implementation="hf")
        assert isinstance(hf, HFCausalLM)
        grads.append(recorded_update(hf, batch, "token-mean", **settings).recorded)
    for got, want in zip(grads[1], grads[0], strict=True):
        for name, g in got.items():
            torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6 * float(want[name].abs().max()))


def test_bf16_mixed_chunked_head_matches_the_full_head() -> None:
    """Under bf16-mixed the chunked head runs its matmuls in bf16 as autocast runs the full one: the
    gradients agree to bf16 rounding (1% of the norm)."""
    base, batch = tiny_model(), random_batch()
    runs = []
    for chunk in (0, 3):
        model = copy.deepcopy(base)
        cfg = ActorConfig(
            lr=0.0,
            warmup_steps=0,
            mini_batch_size=8,
            micro_batch_size=8,
            precision="bf16-mixed",
            logits_chunk_tokens=chunk,
        )
        actor = GradientRecorder(model, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=8)
        batch.old_logprobs = None
        actor.update(batch)
        runs.append(actor.recorded[0])
    for name, g in runs[1].items():
        assert g.dtype == torch.float32
        assert (g - runs[0][name]).norm() <= 0.01 * runs[0][name].norm(), name


def test_optimizer_offload_leaves_the_update_unchanged() -> None:
    """`actor.offload=optimizer`: AdamW's states live in host memory between updates and come back for the
    next; two updates in a row equal those without offload (on CPU the move is in place; the CUDA path runs
    in `make gpu-check`)."""
    base, batch = tiny_model(), random_batch()
    weights = []
    for offload in ("none", "optimizer"):
        model = copy.deepcopy(base)
        cfg = ActorConfig(lr=1e-3, warmup_steps=0, mini_batch_size=4, micro_batch_size=4)
        cfg.offload = offload  # type: ignore[assignment]
        actor = Actor(model, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=8)
        for _ in range(2):
            batch.old_logprobs = None
            actor.update(batch)
        states = [
            v for s in actor.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ]
        assert states and all(v.device.type == "cpu" for v in states)
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)


def test_parameter_offload_needs_ranks(tmp_path: Path) -> None:
    from dapo.backends.policy import Policy
    from dapo.config import load_config
    from dapo.errors import UserError

    save_pretrained(tiny_model(), tmp_path / "model")
    cfg = load_config(None, [f"model.path={tmp_path / 'model'}", "actor.offload=optimizer+params"])
    with pytest.raises(UserError, match=r"actor.offload=optimizer\+params: needs data-parallel ranks"):
        Policy(cfg, distributed.World.single(), tmp_path / "run")
