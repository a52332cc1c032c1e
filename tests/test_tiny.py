"""The tiny default model: tokenizer, HF checkpoint, reproducible cached builds, and (slow) its accuracy."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dapo.models.tiny as tiny
from dapo.cache import default_cache_dir
from dapo.data.synthetic import ArithmeticTask
from dapo.models import kernels
from dapo.models.tiny import (
    DEFAULT_RECIPE,
    EOS_TOKEN,
    PAD_TOKEN,
    TinyRecipe,
    build_tiny_tokenizer,
    ensure_tiny_model,
    evaluate_tiny_model,
    recipe_key,
)

# Small enough to build in about a second: the behaviour under test does not depend on size.
SMALL = TinyRecipe(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    sft_steps=4,
    batch_size=4,
    tokenizer_corpus=300,
    warmup_steps=2,
    val_problems=8,
)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(SMALL, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_tokenizer_round_trips_task_text_and_splits_digits() -> None:
    tok = build_tiny_tokenizer(SMALL)
    task = ArithmeticTask(seed=5)
    texts = [t for p in task.train_problems(100) + task.heldout_problems(30) for t in (p.prompt, p.solution)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        # Every digit is a token of its own, so numbers are spelled digit by digit.
        pieces = tok.convert_ids_to_tokens(ids)
        assert all(sum(c.isdigit() for c in piece) <= 1 for piece in pieces)
    assert tok.decode(tok("Answer: 1234", add_special_tokens=False)["input_ids"]) == "Answer: 1234"


def test_chat_template_renders_user_message_with_generation_prompt() -> None:
    tok = build_tiny_tokenizer(SMALL)
    messages = ArithmeticTask(seed=0).train_problems(1)[0].messages()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # The chat markers are single special tokens.
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ids.count(tok.convert_tokens_to_ids(EOS_TOKEN)) == 1
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN


def test_default_tokenizer_keeps_prompts_and_responses_short() -> None:
    tok = build_tiny_tokenizer(TinyRecipe())
    assert len(tok) <= TinyRecipe().vocab_size
    for p in ArithmeticTask(seed=2).heldout_problems(60):
        text = tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 80
        assert len(tok(p.solution, add_special_tokens=False)["input_ids"]) < 40


def test_saved_dir_loads_with_transformers(small_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "recipe.json",
    ):
        assert (small_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(small_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(small_dir, local_files_only=True)
    assert model.config.model_type == "qwen2"
    assert model.config.tie_word_embeddings
    assert model.config.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    assert model.config.vocab_size == len(tok)
    # The reloaded tokenizer encodes exactly like the one the model was trained with.
    fresh = build_tiny_tokenizer(SMALL)
    for p in ArithmeticTask(seed=9).train_problems(20):
        text = fresh.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
        assert tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False) == text
        assert (
            tok(text, add_special_tokens=False)["input_ids"]
            == fresh(text, add_special_tokens=False)["input_ids"]
        )
    meta = json.loads((small_dir / "recipe.json").read_text())
    assert meta["key"] == recipe_key(SMALL) == small_dir.name
    assert TinyRecipe(**{**meta["recipe"], "levels": tuple(meta["recipe"]["levels"])}) == SMALL
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 7]])).logits  # [1, 3, V]
    assert torch.isfinite(logits).all()


def test_two_builds_are_bitwise_identical(tmp_path: Path) -> None:
    a = ensure_tiny_model(SMALL, cache_dir=tmp_path / "a", progress=False)
    b = ensure_tiny_model(SMALL, cache_dir=tmp_path / "b", progress=False)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    # And the warm-up did train: a different seed gives different weights.
    c = ensure_tiny_model(
        TinyRecipe(**{**SMALL.__dict__, "seed": 1}), cache_dir=tmp_path / "a", progress=False
    )
    wc = load_file(c / "model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_the_warm_up_takes_the_machines_precision_choice(tmp_path: Path) -> None:
    """The warm-up trains in bf16 autocast where the ``precision`` kernel choice says so (the choice
    `actor.precision=auto` takes), else in float32: the report says which, and the two differ."""
    reports, weights = {}, {}
    for choice in ("model", "bf16-mixed"):
        with kernels.forced(precision=choice):
            reports[choice] = tiny.build_tiny_model(SMALL, tmp_path / choice)
        weights[choice] = load_file(tmp_path / choice / "model.safetensors")
    assert reports["model"].precision == "float32" and reports["bf16-mixed"].precision == "bf16-mixed"
    assert not all(torch.equal(weights["model"][k], weights["bf16-mixed"][k]) for k in weights["model"])


def test_cache_hit_does_not_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_tiny_model(SMALL, cache_dir=tmp_path, progress=False)
    assert first == tmp_path / "tiny" / recipe_key(SMALL)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be rebuilt")

    monkeypatch.setattr(tiny, "build_tiny_model", no_build)
    assert ensure_tiny_model(SMALL, cache_dir=tmp_path, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # No temporary build directories are left behind.
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted([first.name, f"{first.name}.lock"])


def test_incomplete_cache_dir_is_rebuilt(tmp_path: Path) -> None:
    broken = tmp_path / "tiny" / recipe_key(SMALL)
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    path = ensure_tiny_model(SMALL, cache_dir=tmp_path, progress=False)
    assert path == broken
    assert (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2"


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_build = tiny.build_tiny_model

    def counting_build(recipe: TinyRecipe, out_dir: Path, *, progress: bool = False) -> tiny.TinyBuildReport:
        calls.append(1)
        return real_build(recipe, out_dir, progress=progress)

    monkeypatch.setattr(tiny, "build_tiny_model", counting_build)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_tiny_model(SMALL, cache_dir=tmp_path, progress=False))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 2 and results[0] == results[1]


def test_recipe_key_tracks_the_recipe() -> None:
    key = recipe_key(SMALL)
    assert len(key) == 12 and int(key, 16) >= 0
    assert recipe_key(TinyRecipe(**SMALL.__dict__)) == key
    for change in ({"seed": 1}, {"sft_steps": 5}, {"lr": 3e-3}, {"levels": (1, 2)}, {"hidden_size": 64}):
        assert recipe_key(TinyRecipe(**{**SMALL.__dict__, **change})) != key, change


def test_warmup_stops_once_the_validation_target_is_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation results in order: before training, then after steps 2, 4, 6, ...
    values = iter([0.0, 0.1, 0.5, 0.9, 0.9, 0.9])
    monkeypatch.setattr(tiny, "_reference_probability", lambda model, batch: next(values))
    recipe = TinyRecipe(**{**SMALL.__dict__, "sft_steps": 10, "val_every": 2, "target_accuracy": 0.4})
    report = tiny.build_tiny_model(recipe, tmp_path)
    assert report.steps == 4
    assert report.val_accuracy == 0.5
    # With the target disabled every step runs.
    values = iter([0.0, 0.1, 0.5, 0.9, 0.9, 0.9])
    report = tiny.build_tiny_model(TinyRecipe(**{**recipe.__dict__, "target_accuracy": 0.0}), tmp_path / "b")
    assert report.steps == 10


def test_reference_probability_is_the_exact_sequence_probability() -> None:
    tok = build_tiny_tokenizer(SMALL)
    torch.manual_seed(0)
    model = tiny._make_model(SMALL, tok)
    problems = ArithmeticTask(seed=4).train_problems(3)
    eos, pad = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
    batch = tiny._sft_batch(tok, problems, eos, pad)
    # Keep the first two response tokens of each row labelled: an untrained model gives a whole solution a
    # probability below float32's range, two tokens stay measurable.
    labels = batch.labels.clone()  # [B, T]
    for row in labels:
        row[(row != -100).nonzero()[2:, 0]] = -100
    batch = dataclasses.replace(batch, labels=labels)
    expected = []
    with torch.no_grad():
        for p in problems:
            prompt = tiny._prompt_ids(tok, p)
            response = tok(p.solution, add_special_tokens=False)["input_ids"][:2]
            logits = model(torch.tensor([prompt + response]))[0]  # [T, V]
            logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [2, V]
            expected.append(logprobs[torch.arange(2), torch.tensor(response)].sum().exp())
    want = float(torch.stack(expected).mean())
    assert 1e-8 < want < 1e-2
    assert tiny._reference_probability(model, batch) == pytest.approx(want, rel=1e-4)


def test_recipe_validation() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        TinyRecipe(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyRecipe(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="target_accuracy"):
        TinyRecipe(target_accuracy=1.5)


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DAPO_CACHE", str(tmp_path / "d"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "d"
    monkeypatch.delenv("DAPO_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "dapo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "dapo"


def test_shared_prefix_loss_equals_full_forward() -> None:
    tok = build_tiny_tokenizer(SMALL)
    torch.manual_seed(0)
    model = tiny._make_model(SMALL, tok)
    problems = ArithmeticTask(seed=4).train_problems(6)
    eos, pad = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
    batch = tiny._sft_batch(tok, problems, eos, pad)
    assert batch.prefix.numel() > 20  # the template's opening words are shared by every prompt
    shared = tiny._sft_loss(model, batch)
    # Reference: each full sequence on its own, mean over all response tokens of the batch.
    total, count = torch.zeros(()), 0
    for p in problems:
        prompt = tiny._prompt_ids(tok, p)
        response = [*tok(p.solution, add_special_tokens=False)["input_ids"], eos]
        ids = torch.tensor([prompt + response])  # [1, T]
        logits = model(ids)[0, len(prompt) - 1 : -1]  # [R, V]
        total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum")
        count += len(response)
    torch.testing.assert_close(shared, total / count, rtol=1e-5, atol=1e-5)


def test_evaluate_scores_a_model(small_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(small_dir, local_files_only=True)
    problems = ArithmeticTask(seed=0).heldout_problems(6)
    report = evaluate_tiny_model(model, tok, problems, samples_per_problem=2, max_new_tokens=8)
    assert report.samples == 12
    assert set(report.per_level) == {1, 2, 3}
    assert 0.0 <= report.accuracy <= 1.0
    # An untrained-for-long model cannot finish a solution in 8 tokens, so nothing is correct.
    assert report.accuracy == 0.0
    assert report.mean_response_tokens <= 8


@pytest.mark.slow
def test_default_recipe_builds_fast_and_lands_in_the_accuracy_band() -> None:
    """The default model in the default cache: built here if the cache is empty (as in CI), else the build
    the other tests use (its recipe.json keeps the build's report; the cache key is the recipe's hash)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model(progress=False)
    # "Fast" as work, not wall time (speed is measured by benchmarks, not timed tests): the warm-up reaches
    # its target before the step cap.
    built = json.loads((path / "recipe.json").read_text())["report"]
    assert built["steps"] < DEFAULT_RECIPE.sft_steps, built
    assert built["val_accuracy"] >= DEFAULT_RECIPE.target_accuracy, built
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    problems = ArithmeticTask(seed=0).heldout_problems(64)
    report = evaluate_tiny_model(model, tok, problems, samples_per_problem=8, temperature=1.0)
    assert 0.15 <= report.accuracy <= 0.65, report
