"""Native Llama / Qwen2 / Qwen3 against transformers on tiny random checkpoints built locally (float32 unless
noted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dapo.models import (
    CausalLM,
    HFCausalLM,
    KVCache,
    ModelArgs,
    UnsupportedModelError,
    apply_chat_template,
    forward_responses_unshared,
    load_pretrained,
    load_tokenizer,
    resolve_dtype,
    save_pretrained,
)
from dapo.models.transformer import _FUSABLE, _onednn, _packed

pytestmark = pytest.mark.usefixtures("kernel_path")  # every test on every kernel path (conftest)

COMMON: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 128, "intermediate_size": 96, "max_position_embeddings": 256,
}  # fmt: skip
FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    # Qwen2: q/k/v bias, tied embeddings; Qwen3: q/k norms, head_dim != hidden / heads; Llama: untied
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {"rope_theta": 5000.0, "tie_word_embeddings": True},
    ),
    "qwen3": (
        transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"rope_theta": 20000.0, "head_dim": 24}
    ),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_theta": 30000.0}),
    "llama3_rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            "rope_theta": 50000.0,
            "attention_bias": True,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
}  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every parameter visibly moves the logits (HF's std 0.02 barely does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra))
    _randomize(model, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def _hf(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, attn_implementation="eager"
    ).eval()


def _native(path: Path, dtype: str = "float32") -> CausalLM:
    model = load_pretrained(path, dtype=dtype)
    assert isinstance(model, CausalLM)
    return model


SEQS = [[5, 17, 99, 3, 64, 8, 120, 45, 2], [7, 7, 31], [88, 1, 2, 3, 4, 5]]


def _pad(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def test_logits_equal_transformers(hf_dir: Path) -> None:
    ref, ours = _hf(hf_dir), _native(hf_dir)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    expected = ref(ids).logits
    assert expected.std() > 0.5  # the random weights make the comparison meaningful
    assert (ours(ids) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_batch_equals_unpadded_transformers(hf_dir: Path, side: str) -> None:
    ref, ours = _hf(hf_dir), _native(hf_dir)
    ids, mask = _pad(SEQS, side)
    logits = ours(ids, attention_mask=mask)  # [B, T, V]
    assert torch.isfinite(logits).all()  # padding rows stay finite too
    for i, s in enumerate(SEQS):
        expected = ref(torch.tensor([s])).logits[0]  # [t, V]
        assert (logits[i][mask[i].bool()] - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_bfloat16_close_to_transformers(hf_dir: Path) -> None:
    """bf16 tolerance: the implementations round differently (ours: one rounding in RMSNorm and rope, HF two),
    so compare each with the float32 logits (std ~1.3 here): ours must be no less accurate than transformers'
    bf16 on average (measured mean error 0.015 vs 0.017; max ~0.17 vs ~0.23), and the two within 0.25 max."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _hf(hf_dir, torch.bfloat16)(ids).logits.float()
    ours = _native(hf_dir, "bfloat16")(ids)
    assert ours.dtype == torch.bfloat16
    exact = _native(hf_dir)(ids)
    assert (ours.float() - exact).abs().mean() <= 1.2 * (ref - exact).abs().mean()
    assert (ours.float() - ref).abs().max() <= 0.25


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward(hf_dir: Path) -> None:
    """Prefill a left-padded batch into the cache, then feed one token at a time: same logits as no cache."""
    ours = _native(hf_dir)
    ids, mask = _pad(SEQS, "left")
    full_ids = torch.cat([ids, torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))], 1)
    full_mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.long)], 1)
    expected = ours(full_ids, attention_mask=full_mask)
    cache = KVCache(ours.args, 3, 20, dtype=torch.float32, device=torch.device("cpu"))
    got = [ours(ids, attention_mask=mask, cache=cache)]
    for t in range(ids.shape[1], full_ids.shape[1]):
        got.append(ours(full_ids[:, t : t + 1], cache=cache))
    logits = torch.cat(got, 1)
    real = full_mask.bool()
    assert (logits[real] - expected[real]).abs().max() <= 1e-5
    assert cache.length == full_ids.shape[1] and cache.pos.tolist() == [14, 8, 11]


@torch.no_grad()
def test_shared_prefix_decode_equals_full_forward(hf_dir: Path) -> None:
    """Prefill 3 prompts once, share them with 6 rows (cascade attention), decode 5 tokens per row, dropping
    a row midway (uneven groups): each row's logits equal a full forward of its prompt + tokens."""
    ours = _native(hf_dir)
    ids, mask = _pad(SEQS, "left")
    owners = torch.tensor([0, 0, 1, 2, 2, 2])
    new = torch.randint(0, 128, (6, 5), generator=torch.Generator().manual_seed(5))
    cache = KVCache(ours.args, 3, ids.shape[1], dtype=torch.float32, device=torch.device("cpu"))
    ours(ids, attention_mask=mask, cache=cache)
    cache.share_prefix(owners, 5)
    with pytest.raises(ValueError, match="one token at a time"):
        ours(new[:, :2], cache=cache)
    rows = torch.arange(6)
    got = torch.zeros(6, 5, 128)
    for t in range(5):
        if t == 2:  # row 1 finishes: prompt 0 keeps one row, the grid becomes uneven
            keep = torch.tensor([0, 2, 3, 4, 5])
            cache.select(keep)
            rows = rows[keep]
        got[rows, t] = ours(new[rows, t : t + 1], cache=cache)[:, 0]
    for i in range(6):
        n = 2 if i == 1 else 5
        seq = torch.cat([torch.tensor(SEQS[int(owners[i])]), new[i, :n]])[None]
        expected = ours(seq)[0, -n:]
        assert (got[i, :n] - expected).abs().max() <= 1e-5


def test_inference_and_training_paths_agree(hf_dir: Path) -> None:
    """Without grad, float32 matmuls go through oneDNN instead of MKL: same logits up to summation order."""
    ours = _native(hf_dir)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = ours(ids)
    train = ours(ids)
    assert train.requires_grad and (fast - train.detach()).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_weights_change_summation_order_only(hf_dir: Path, dtype: str) -> None:
    """Inside `packed_weights` no-grad matmuls read prepacked copies; gradients and later updates are
    unaffected."""
    ours = _native(hf_dir, dtype)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))  # 128 rows per matmul
    with torch.no_grad():
        plain = ours(ids).float()
        with ours.packed_weights(ids.numel()):
            packed = ours(ids).float()
            w = ours.model.layers[0].self_attn.q_proj.weight
            x = torch.ones(ids.numel(), w.shape[1], dtype=w.dtype)
            if w.dtype in _FUSABLE:  # a copy exactly where its matmul (16+ rows) was measured faster
                assert not _onednn(x[:15], w, packed=True)
                copy = _packed(w)
                assert (copy is not None and copy.is_mkldnn) == _onednn(x, w, packed=True)
    tol = 1e-4 if dtype == "float32" else 0.1 * plain.abs().max().item()
    assert (packed - plain).abs().max() <= tol
    with ours.packed_weights(ids.numel()):  # with gradients the parameters themselves are used
        ours(ids).float().square().mean().backward()
    grads = {k: p.grad.clone() for k, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    ours(ids).float().square().mean().backward()
    assert len(grads) == len(list(ours.parameters()))
    for k, p in ours.named_parameters():
        assert p.grad is not None and torch.equal(grads[k], p.grad), k
    with torch.no_grad():  # an update outside the context is seen at the next entry
        ours.model.layers[0].mlp.down_proj.weight.mul_(-2.0)
        with ours.packed_weights(ids.numel()):
            after = ours(ids).float()
        assert (after - ours(ids).float()).abs().max() <= tol
        assert (after - plain).abs().max() > 10 * tol


@pytest.mark.parametrize("unpadded", [False, True])
def test_shared_prompt_forward_equals_one_row_per_response(hf_dir: Path, unpadded: bool) -> None:
    """forward_responses computes each prompt once for its responses (and, given the response lengths, skips
    response padding in the linear layers): the same logits and gradients as one left-padded row prompt +
    response per response, natively and through transformers (fp32, all families)."""
    ours, ref = _native(hf_dir), HFCausalLM(_hf(hf_dir))
    prompt_ids, prompt_mask = _pad(SEQS, "left")  # 3 prompts of 9, 3, 6 tokens
    prompt_index = torch.tensor([0, 0, 1, 2, 2, 2])
    response_ids = torch.randint(0, 128, (6, 7), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([7, 3, 1, 5, 7, 2]) if unpadded else torch.full((6,), 7)
    real = torch.arange(7) < lengths[:, None]  # [6, 7]
    args = (prompt_ids, prompt_mask, prompt_index, response_ids)
    got = ours.forward_responses(*args, lengths if unpadded else None)  # [6, 7, V]
    expected = ref.forward_responses(*args)  # one row per response, transformers
    assert got.shape == (6, 7, 128) and expected.std() > 0.5
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    got[real].square().mean().backward()
    shared = {k: p.grad.clone() for k, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    forward_responses_unshared(ours, *args)[real].square().mean().backward()
    assert len(shared) == len(list(ours.parameters()))
    for name, param in ours.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(shared[name], param.grad, rtol=1e-4, atol=1e-6)
    # one-token responses: only the prompt's last position is needed
    one = ours.forward_responses(*args[:3], response_ids[:, :1], torch.ones(6, dtype=torch.long))
    torch.testing.assert_close(one, expected[:, :1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_shared_prompt_forward_without_prompt_padding(hf_dir: Path) -> None:
    """Prompts of equal length: the responses' attention is causal aligned to the bottom right (no mask)."""
    ours = _native(hf_dir)
    prompt_ids = torch.tensor([SEQS[0][:6], SEQS[2]])  # 6 tokens each
    prompt_index, lengths = torch.tensor([0, 1, 1]), torch.tensor([5, 2, 5])
    response_ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(6))
    args = (prompt_ids, torch.ones_like(prompt_ids), prompt_index, response_ids)
    got = ours.forward_responses(*args, lengths)
    expected = forward_responses_unshared(ours, *args)
    real = torch.arange(5) < lengths[:, None]
    assert (got[real] - expected[real]).abs().max() <= 1e-4


@torch.no_grad()
def test_hidden_states_and_lm_head(hf_dir: Path) -> None:
    ours = _native(hf_dir)
    ids = torch.tensor([SEQS[0]])
    hidden = ours(ids, return_hidden=True)  # [1, T, D]
    assert torch.equal(torch.nn.functional.linear(hidden, ours.lm_head_weight), ours(ids))


def test_save_load_round_trip_and_transformers_reads_it(hf_dir: Path, tmp_path: Path) -> None:
    ours = _native(hf_dir)
    save_pretrained(ours, tmp_path)
    again = _native(tmp_path)
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(ref).__name__ == ours.args.architecture
    hf_sd = ref.state_dict()
    if ours.args.tie_word_embeddings:
        assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # stored once
        hf_sd.pop("lm_head.weight")
    assert {k: v.shape for k, v in hf_sd.items()} == {k: v.shape for k, v in a.items()}
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        assert (ref.eval()(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_sharded_checkpoint(hf_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    sharded, single = _native(tmp_path).state_dict(), _native(hf_dir).state_dict()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_missing_and_unexpected_tensors_are_named(hf_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    tensors.pop("model.norm.weight")
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*model\.layers\.9\.extra\.weight"):
        load_pretrained(tmp_path)


def test_hf_implementation_wrapper(hf_dir: Path) -> None:
    wrapped = load_pretrained(hf_dir, implementation="hf")
    assert isinstance(wrapped, HFCausalLM)
    ids, mask = _pad(SEQS, "left")
    with torch.no_grad():
        expected = _native(hf_dir)(ids, attention_mask=mask)
        got = wrapped(ids, attention_mask=mask)
        hidden = wrapped(ids, attention_mask=mask, return_hidden=True)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    assert torch.allclose(torch.nn.functional.linear(hidden, wrapped.lm_head_weight), got, atol=1e-5)


def test_unsupported_architecture(tmp_path: Path) -> None:
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError, match=r"GPT2LMHeadModel.*Qwen2ForCausalLM.*implementation='hf'"
    ):
        load_pretrained(tmp_path)


def test_config_errors_and_round_trip() -> None:
    base = {"architectures": ["Qwen3ForCausalLM"], **COMMON, "head_dim": 24, "rope_theta": 7.0}
    args = ModelArgs.from_hf_config(base)
    assert args.qk_norm and not args.qkv_bias and args.rope_theta == 7.0
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args
    # the transformers 5.x dialect reads the same
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    del v5["rope_theta"]
    assert ModelArgs.from_hf_config(v5) == args
    with pytest.raises(UnsupportedModelError, match=r"'yarn'.*llama3"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelArgs.from_hf_config({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelArgs.from_hf_config({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="dtype 'float8'"):
        resolve_dtype("float8")


def test_chat_template(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "there", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    tok.add_special_tokens(words[:3])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    fast.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(load_tokenizer(tmp_path), [{"role": "user", "content": "hi"}])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(tmp_path)
    ids = apply_chat_template(load_tokenizer(tmp_path), [{"role": "user", "content": "hi"}])
    assert ids == [1, 3, 7, 5, 2, 1, 4, 7]
    with pytest.raises(ValueError, match="message 0"):
        apply_chat_template(load_tokenizer(tmp_path), [{"role": "user"}])
