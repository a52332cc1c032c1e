"""`model.path` as a Hugging Face Hub id: found in a local cache laid out as the Hub's, offline; an id that is
not there is a one-line error naming it. No test here reaches the network: the Hub is switched off, or
pointed at a closed local port."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import load_file

from dapo.config import ModelConfig
from dapo.errors import UserError
from dapo.models import CausalLM, ModelArgs, save_pretrained
from dapo.models.load import is_hub_id, load_policy, resolve_model_path
from dapo.plan import model_shape

REPO_ID = "dapo-tests/tiny-qwen"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_checkpoint(path: Path) -> None:
    """A tiny Qwen2 checkpoint: config.json, model.safetensors and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    args = ModelArgs(
        architecture="Qwen2ForCausalLM", vocab_size=48, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=True,
        tie_word_embeddings=True,
    )  # fmt: skip
    save_pretrained(CausalLM(args).float(), path)
    words = ["<pad>", "<|im_end|>", "1", "+", "2", "=", "3"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[:2])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>"
    )
    fast.save_pretrained(path)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub cache holding `REPO_ID` at `COMMIT` (named by ``refs/main``), as `hf download` does.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, so its constants are set as well
    as the environment (which a subprocess would read)."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    write_checkpoint(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_and_local_directories_are_told_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert is_hub_id("Qwen/Qwen2.5-7B") and is_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    for local in ("tiny", "gpt2", "/abs/dir", "./org/name", "a/b/c", "org/../name", "org--x/name", "org/"):
        assert not is_hub_id(local), local
    # an existing directory spelt like an id stays a directory, exactly as before
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "org" / "name")
    assert not is_hub_id("org/name")
    assert resolve_model_path("org/name") == Path("org/name")


def test_cached_hub_id_resolves_and_loads_offline(hub_cache: Path) -> None:
    snapshot = hub_cache / "models--dapo-tests--tiny-qwen" / "snapshots" / COMMIT
    assert resolve_model_path(REPO_ID) == snapshot

    cfg = ModelConfig(path=REPO_ID, dtype="float32", device="cpu")
    model, tokenizer, model_dir = load_policy(cfg)
    assert model_dir == snapshot
    saved = load_file(str(snapshot / "model.safetensors"))
    loaded = dict(model.named_parameters())
    assert torch.equal(loaded["model.embed_tokens.weight"], saved["model.embed_tokens.weight"])
    assert tokenizer("1 + 2 = 3", add_special_tokens=False)["input_ids"] == [2, 3, 4, 5, 6]


def test_model_shape_reads_a_cached_hub_config(hub_cache: Path) -> None:
    args, source = model_shape(REPO_ID)
    assert args is not None and (args.hidden_size, args.num_hidden_layers, args.vocab_size) == (32, 2, 48)
    assert source.startswith(str(hub_cache)) and source.endswith("config.json")
    # an id not in the cache: the table of published shapes, without a download
    args, source = model_shape("Qwen/Qwen2.5-7B")
    assert args is not None and args.hidden_size == 3584 and "published shape of qwen2.5-7b" in source


def test_unknown_hub_id_offline_is_one_line_naming_it(hub_cache: Path) -> None:
    with pytest.raises(UserError) as e:
        resolve_model_path("dapo-tests/not-cached")
    message = str(e.value)
    assert "'dapo-tests/not-cached'" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_partial_snapshot_is_not_a_checkpoint(hub_cache: Path) -> None:
    """A snapshot with config.json alone (a shape lookup's download) is not taken for the checkpoint."""
    repo = hub_cache / "models--dapo-tests--config-only"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    with pytest.raises(UserError, match="'dapo-tests/config-only'"):
        resolve_model_path("dapo-tests/config-only")


def test_unreachable_hub_is_one_line_naming_the_id(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, but the Hub does not answer (here: a closed local port): the id and the reason, one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError) as e:
        resolve_model_path("dapo-tests/not-cached")
    message = str(e.value)
    assert "'dapo-tests/not-cached'" in message and "Hugging Face Hub" in message and "\n" not in message
