"""Rollout engines on a tiny random Qwen2 (float32): greedy parity with transformers, log-probs equal to the
trainer-side recomputation, stops, padding invariance, seeding, weight updates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from dapo.models import CausalLM, HFCausalLM, load_pretrained
from dapo.rollout import Completion, HFEngine, NativeEngine, RolloutEngine, SamplingParams, sample_tokens
from dapo.rollout import native as native_module

pytestmark = pytest.mark.usefixtures("kernel_path")  # every test on every kernel path (conftest)

PAD = 0
PROMPTS = [[5, 17, 99, 3, 64, 8, 120], [7, 31], [88, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12], [42, 43, 44, 45]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        intermediate_size=96, rope_theta=5000.0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights large enough for peaked, tie-free next-token distributions
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if "norm" in name
                else 0.15 * torch.randn(p.shape, generator=g)
            )
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def native(ckpt: Path) -> CausalLM:
    model = load_pretrained(ckpt)
    assert isinstance(model, CausalLM)
    return model


@pytest.fixture(scope="module")
def hf(ckpt: Path) -> HFCausalLM:
    model = load_pretrained(ckpt, implementation="hf")
    assert isinstance(model, HFCausalLM)
    return model


@pytest.fixture(params=["native", "hf"])
def engine(request: pytest.FixtureRequest, native: CausalLM, hf: HFCausalLM) -> RolloutEngine:
    if request.param == "native":
        return NativeEngine(native, pad_token_id=PAD)
    return HFEngine(hf, pad_token_id=PAD)


def _hf_greedy(hf: HFCausalLM, prompt: list[int], steps: int) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt: the reference."""
    out = hf.hf.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=PAD
    )
    return list(out[0, len(prompt) :].tolist())


def test_greedy_equals_transformers_generate(engine: RolloutEngine, hf: HFCausalLM) -> None:
    got = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    assert [c.prompt_index for c in got] == [0, 1, 2, 3]
    for c, prompt in zip(got, PROMPTS, strict=True):
        assert c.token_ids == _hf_greedy(hf, prompt, 12)
        assert c.finish_reason == "length" and len(c.logprobs) == 12


def _recompute(model: Any, prompt: list[int], c: Completion, temperature: float) -> torch.Tensor:
    """Trainer side: one forward over prompt + completion, no cache; log_softmax(logits / T) at the tokens."""
    ids = torch.tensor([prompt + c.token_ids])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : -1]  # [L, V], position t predicts token t + 1
    return (logits / temperature).log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)


def test_logprobs_equal_trainer_recomputation_at_batch_size_16_and_more(native: CausalLM) -> None:
    """From 16 rows on, decode matmuls run with prepacked weights and oneDNN post-ops (`packed_weights`)."""
    sp = SamplingParams(n=6, temperature=1.0, max_tokens=16, seed=5)
    got = NativeEngine(native, pad_token_id=PAD).generate(PROMPTS, sp)
    assert len(got) == 24
    for c in got:
        expected = _recompute(native, PROMPTS[c.prompt_index], c, 1.0)
        assert (torch.tensor(c.logprobs) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, -1), (0.7, 0.9, -1), (1.3, 0.8, 20)])
def test_logprobs_equal_trainer_recomputation(
    engine: RolloutEngine, native: CausalLM, hf: HFCausalLM, temperature: float, top_p: float, top_k: int
) -> None:
    sp = SamplingParams(n=2, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=16, seed=3)
    got = engine.generate(PROMPTS, sp)
    model = native if isinstance(engine, NativeEngine) else hf
    assert [c.prompt_index for c in got] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert got[0].token_ids != got[1].token_ids  # the n samples of a prompt are distinct draws
    for c in got:
        expected = _recompute(model, PROMPTS[c.prompt_index], c, temperature)
        assert (torch.tensor(c.logprobs) - expected).abs().max() <= 1e-5


def test_stop_tokens_and_length(engine: RolloutEngine) -> None:
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    stop = (free[0].token_ids[3], free[2].token_ids[7])
    got = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=stop))
    for c, ref in zip(got, free, strict=True):
        cut = next((i + 1 for i, t in enumerate(ref.token_ids) if t in stop), None)
        assert c.token_ids == ref.token_ids[:cut]  # a prefix of the free run, stop token included
        assert c.logprobs == pytest.approx(ref.logprobs[:cut], abs=1e-5)
        assert c.finish_reason == ("length" if cut is None else "stop")
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 4
    short = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3))
    assert len(short[0].token_ids) == 3 and short[0].finish_reason == "length"


@pytest.mark.parametrize(("n", "check_every"), [(1, None), (3, None), (3, 8)])
def test_finished_rows_are_dropped_without_changing_results(
    native: CausalLM, monkeypatch: pytest.MonkeyPatch, n: int, check_every: int | None
) -> None:
    """Greedy with stop tokens on many rows: the batch compacts as rows finish, and every row still equals
    the no-stop run truncated at its first stop token (n = 3: the samples of a prompt share its cached prefix,
    and whole groups leave the grid of the cascade attention; check_every = 8: the accelerator cadence, where
    finished rows decode up to 7 more steps before they are found)."""
    prompts = [[(7 * i + j) % 128 for j in range(3 + i % 5)] for i in range(16)]
    engine = NativeEngine(native, pad_token_id=PAD, check_every=check_every)
    free = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    counts: dict[int, int] = {}
    for c in free:
        for t in set(c.token_ids):
            counts[t] = counts.get(t, 0) + 1
    stop = tuple(sorted(counts, key=lambda t: -counts[t])[:3])  # the most common tokens: rows stop early
    sizes: list[int] = []
    real_select = native_module.KVCache.select

    def spy(cache: Any, rows: torch.Tensor) -> None:
        sizes.append(len(rows))
        real_select(cache, rows)

    monkeypatch.setattr(native_module.KVCache, "select", spy)
    got = engine.generate(prompts, SamplingParams(n=n, temperature=0, max_tokens=24, stop_token_ids=stop))
    assert len(sizes) >= 1 and all(s < 16 * n for s in sizes)  # compaction happened
    assert [c.prompt_index for c in got] == [i for i in range(16) for _ in range(n)]
    for c in got:
        ref = free[c.prompt_index]
        cut = next((i + 1 for i, t in enumerate(ref.token_ids) if t in stop), None)
        assert c.token_ids == ref.token_ids[:cut]
        assert c.logprobs == pytest.approx(ref.logprobs[: len(c.token_ids)], abs=1e-5)


def test_batched_equals_one_at_a_time(native: CausalLM) -> None:
    sp = SamplingParams(temperature=0, max_tokens=10)
    engine = NativeEngine(native, pad_token_id=PAD)
    alone = [engine.generate([p], sp)[0].token_ids for p in PROMPTS]
    assert [c.token_ids for c in engine.generate(PROMPTS, sp)] == alone
    chunked = NativeEngine(native, pad_token_id=PAD, max_batch_size=3)
    assert [c.token_ids for c in chunked.generate(PROMPTS, sp)] == alone
    # the same prompts padded differently (another batch-mate, longer than all) decode the same
    longer = [*PROMPTS, list(range(1, 30))]
    assert [c.token_ids for c in engine.generate(longer, sp)][:4] == alone


def test_one_prompt_shared_by_all_rows(native: CausalLM) -> None:
    """A single prompt with n samples (one shared prefix for every row: a data-parallel rank's share can
    be one prompt) decodes like the prompt alone."""
    engine = NativeEngine(native, pad_token_id=PAD)
    alone = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10))[0].token_ids
    group = engine.generate([PROMPTS[0]], SamplingParams(n=4, temperature=0, max_tokens=10))
    assert [c.token_ids for c in group] == [alone] * 4


def test_seed_reproducibility(engine: RolloutEngine) -> None:
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=11)
    first = engine.generate(PROMPTS, sp)
    torch.manual_seed(1234)  # the global RNG does not matter
    again = engine.generate(PROMPTS, sp)
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=12))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.logprobs for c in first] == [c.logprobs for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_weight_updates_are_visible(ckpt: Path) -> None:
    model = load_pretrained(ckpt)
    assert isinstance(model, CausalLM)
    engine = NativeEngine(model, pad_token_id=PAD)
    sp = SamplingParams(n=5, temperature=0, max_tokens=8)  # 20 rows: decode reads prepacked weights
    before = [c.token_ids for c in engine.generate(PROMPTS, sp)]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # an optimizer step on the shared module
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    changed = [c.token_ids for c in engine.generate(PROMPTS, sp)]
    assert changed != before
    engine.load_weights(original)
    assert [c.token_ids for c in engine.generate(PROMPTS, sp)] == before
    with pytest.raises(ValueError, match="unexpected"):
        engine.load_weights({**original, "model.bogus": torch.zeros(1)})


def test_bf16_sampling_from_float32_weights(ckpt: Path) -> None:
    """``dtype=bfloat16`` on a float32 policy (``actor.precision=bf16-mixed``) samples exactly as the policy
    cast to bf16 would, from its current weights at every `generate`, and leaves the float32 weights as
    they are."""
    model = load_pretrained(ckpt)
    assert isinstance(model, CausalLM)
    engine = NativeEngine(model, pad_token_id=PAD, dtype=torch.bfloat16)
    sp = SamplingParams(n=5, temperature=1.0, max_tokens=8, seed=4)
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def as_bf16() -> list[Completion]:
        cast = load_pretrained(ckpt, dtype="bfloat16")
        cast.load_state_dict(model.state_dict())
        return NativeEngine(cast, pad_token_id=PAD).generate(PROMPTS, sp)  # type: ignore[arg-type]

    got, expected = engine.generate(PROMPTS, sp), as_bf16()
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.logprobs for c in got] == [c.logprobs for c in expected]
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # an optimizer step on the float32 masters reaches the next generate
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    changed = engine.generate(PROMPTS, sp)
    assert [c.token_ids for c in changed] != [c.token_ids for c in got]
    assert [c.token_ids for c in changed] == [c.token_ids for c in as_bf16()]


def test_training_after_generation(ckpt: Path) -> None:
    """Generation (inference mode, cached rotary tables) leaves the shared model trainable."""
    model = load_pretrained(ckpt)
    assert isinstance(model, CausalLM)
    NativeEngine(model, pad_token_id=PAD).generate(PROMPTS, SamplingParams(max_tokens=4, seed=0))
    loss = model(torch.tensor(PROMPTS[:1])).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_hf_engine_load_weights(ckpt: Path) -> None:
    model = load_pretrained(ckpt, implementation="hf")
    engine = HFEngine(model, pad_token_id=PAD)
    sp = SamplingParams(temperature=0, max_tokens=8)
    before = [c.token_ids for c in engine.generate(PROMPTS, sp)]
    state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    state["model.layers.1.mlp.down_proj.weight"] *= -3.0
    engine.load_weights(state)
    assert [c.token_ids for c in engine.generate(PROMPTS, sp)] != before


def test_sample_tokens_distribution() -> None:
    """Empirical frequencies over 40,000 rows match the truncated, renormalised distribution."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(40_000, 1)  # [N, V]
    gen = torch.Generator().manual_seed(0)
    uniforms = torch.rand(len(logits), dtype=torch.float64, generator=gen)
    for sp, kept in [
        (SamplingParams(), probs),
        (SamplingParams(top_k=2), probs[:2]),
        (SamplingParams(top_p=0.75), probs[:3]),  # 0.4 + 0.25 < 0.75 ≤ 0.4 + 0.25 + 0.15
        (SamplingParams(top_p=0.75, top_k=2), probs[:2]),
    ]:
        tok, lp = sample_tokens(logits, sp, uniforms)
        freq = torch.bincount(tok, minlength=6).float() / len(tok)
        expected = torch.zeros(6)
        expected[: len(kept)] = kept / kept.sum()
        assert (freq - expected).abs().max() < 0.01  # ~4 standard errors at N = 40,000
        assert torch.allclose(lp, probs.log()[tok])  # log-probs before truncation
    tok, lp = sample_tokens(logits[:3] * 2, SamplingParams(temperature=0), uniforms[:3])
    assert tok.tolist() == [0, 0, 0] and torch.allclose(lp, (logits[:3] * 2).log_softmax(-1)[:, 0])


def _splitmix(x: int) -> int:
    """splitmix64's finaliser on Python integers mod 2**64: the reference for the tensor version."""
    m = 2**64 - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_row_streams_are_splitmix64_of_seed_prompt_sample_and_position() -> None:
    """The tensor hash (int64, wrapping) equals exact 64-bit arithmetic, and its uniforms look uniform."""
    m, golden = 2**64 - 1, 0x9E3779B97F4A7C15
    seed, prompts, samples = 2**40 + 7, [0, 3, 3, 1_000_000], [0, 0, 5, 15]
    streams = native_module.row_streams(seed, prompts, samples, torch.device("cpu"))
    for i, (p, s) in enumerate(zip(prompts, samples, strict=True)):
        key = _splitmix((_splitmix((_splitmix((seed + golden) & m) + p * golden) & m) + s * golden) & m)
        assert streams[i].item() & m == key
        for t in (0, 1, 63, 20_479):
            want = (_splitmix((key + (t + 1) * golden) & m) >> 11) * 2.0**-53
            assert native_module.stream_uniforms(streams[i : i + 1], t).item() == want
    u = native_module.stream_uniforms(
        native_module.row_streams(1, list(range(20_000)), [0] * 20_000, torch.device("cpu")), 0
    )
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01  # ~5 standard errors
    assert torch.histc(u.float(), bins=10, min=0, max=1).sub(2_000).abs().max() < 250  # ~5.6 s.e. per bin


def test_samples_do_not_depend_on_the_layout(native: CausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same seed samples the same tokens whether the round is one batch, 5 or 2 slots refilled as rows
    finish (continuous batching, the cache's own slots moved back when full), the slots a KV budget allows,
    or two shares (two ranks or rollout workers) keyed by where they start in the round."""
    rebased: list[int] = []
    real_rebase = native_module.KVCache.rebase

    def rebase(self: Any, shift: int) -> None:
        rebased.append(shift)
        real_rebase(self, shift)

    monkeypatch.setattr(native_module.KVCache, "rebase", rebase)
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5, stop_token_ids=(3,))
    whole = NativeEngine(native, pad_token_id=PAD).generate(PROMPTS, sp)
    assert len({tuple(c.token_ids) for c in whole}) > len(PROMPTS)  # sampled: a group's samples differ
    a = native.args
    budget = 2 * (12 + 12) * 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 4  # 2 rows, fp32
    layouts = {
        "5 slots": NativeEngine(native, pad_token_id=PAD, max_batch_size=5).generate(PROMPTS, sp),
        "2 slots": NativeEngine(native, pad_token_id=PAD, max_batch_size=2).generate(PROMPTS, sp),
        "KV budget": NativeEngine(native, pad_token_id=PAD, kv_budget_bytes=budget).generate(PROMPTS, sp),
    }
    from dapo.distributed import gather_shares, shard_requests

    shares = shard_requests(len(PROMPTS), 2, sp, 5)
    engine = NativeEngine(native, pad_token_id=PAD)
    layouts["two shares"] = gather_shares(
        [(r, engine.generate(PROMPTS[r.start : r.stop], s)) for r, s in shares]
    )
    assert rebased and min(rebased) > 0  # the slots' window filled up and moved back
    for name, got in layouts.items():
        assert [c.prompt_index for c in got] == [c.prompt_index for c in whole], name
        assert [c.token_ids for c in got] == [c.token_ids for c in whole], name
        for a, b in zip(got, whole, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5), name
    other = NativeEngine(native, pad_token_id=PAD).generate(
        PROMPTS, SamplingParams(**{**sp.__dict__, "seed": 6})
    )
    assert [c.token_ids for c in other] != [c.token_ids for c in whole]


def test_a_kv_budget_bounds_the_cache_a_call_holds(native: CausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget of three full-length rows (two with the refill's slack, `continuous_window`), the
    cache never holds more than the budget, as finished rows' slots take new rows."""
    a = native.args
    per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 4
    budget = 3 * per_token * (12 + 10)
    sizes: list[int] = []
    real_init, real_share = native_module.KVCache.__init__, native_module.KVCache.share_prefix
    real_extend = native_module.KVCache.extend

    def size(cache: Any) -> int:
        prefix = (
            0
            if cache.prefix is None
            else sum(t.numel() * t.element_size() for t in cache.prefix.k + cache.prefix.v)
        )
        return prefix + sum(t.numel() * t.element_size() for t in cache.k + cache.v)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        sizes.append(size(self))

    def share(self: Any, *args: Any) -> None:
        real_share(self, *args)
        sizes.append(size(self))

    extended: list[int] = []

    def extend(self: Any, *args: Any) -> None:
        real_extend(self, *args)
        sizes.append(size(self))
        extended.append(self.batch_size)

    monkeypatch.setattr(native_module.KVCache, "__init__", init)
    monkeypatch.setattr(native_module.KVCache, "share_prefix", share)
    monkeypatch.setattr(native_module.KVCache, "extend", extend)
    engine = NativeEngine(native, pad_token_id=PAD, kv_budget_bytes=budget)
    sp = SamplingParams(n=4, max_tokens=10, seed=0, stop_token_ids=tuple(range(1, 128, 8)))  # varied lengths
    assert native_module.continuous_window(10) == 18
    assert engine.rows_per_chunk(PROMPTS, sp) == 2  # 12 + 18 slots per row
    got = engine.generate(PROMPTS, sp)
    assert len({len(c.token_ids) for c in got}) > 3
    assert len(got) == 16 and len(extended) >= 3 and max(extended) <= 2  # refilled, never above 2 rows
    assert max(sizes) <= budget, (max(sizes), budget)
    with pytest.raises(ValueError, match="kv_budget_bytes"):
        NativeEngine(native, pad_token_id=PAD, kv_budget_bytes=0)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"\bn\b"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(-1,))


def test_bad_prompts(native: CausalLM) -> None:
    engine = NativeEngine(native, pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 has token ids outside"):
        engine.generate([[1, 128]], SamplingParams())
    with pytest.raises(ValueError, match="non-empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(TypeError, match="HFEngine"):
        NativeEngine(torch.nn.Linear(2, 2), pad_token_id=PAD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="check_every"):
        NativeEngine(native, pad_token_id=PAD, check_every=0)
