"""LoRA (`dapo.models.lora`, ``actor.lora.*``): the adapters start as the base model, only they train, the
update keeps its invariances, the adapter's files are PEFT's, merging equals the adapted model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dapo.config import ActorConfig, AlgorithmConfig, ConfigError, LoRAConfig, load_config
from dapo.models import load_pretrained, save_pretrained
from dapo.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    LoRASpec,
    adapter_names,
    load_adapter,
    merge_lora,
    save_adapter,
)
from dapo.train import Actor
from tests.test_train import random_batch, tiny_model

SPEC = LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"))  # fmt: skip


def logits(model: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(1, 48, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def trained(model: torch.nn.Module) -> None:
    """Give every adapter factor nonzero values (as training would)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_first_forward_is_the_base_models_and_only_adapters_train() -> None:
    base = tiny_model()
    model = copy.deepcopy(base)
    assert SPEC.add_to(model) == 2 * 7  # two layers x seven projections
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == adapter_names(model) and len(trainable) == 2 * 7 * 2
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and float(q.lora_B.weight.detach().abs().sum()) == 0.0
    assert float(q.lora_A.weight.detach().abs().sum()) > 0 and q.scaling == 2.0
    # drawn from (seed, name) alone: the same on another copy, another seed differs
    other = copy.deepcopy(base)
    SPEC.add_to(other)
    torch.testing.assert_close(other.model.layers[0].self_attn.q_proj.lora_A.weight, q.lora_A.weight)
    LoRASpec(4, 8.0, 0.0, SPEC.targets, seed=1).add_to(third := copy.deepcopy(base))
    assert not torch.equal(third.model.layers[0].self_attn.q_proj.lora_A.weight, q.lora_A.weight)
    # the optimizer holds the adapters only: no state for the frozen base
    actor = Actor(model, ActorConfig(lr=1e-2, warmup_steps=0, mini_batch_size=4, micro_batch_size=4),
                  AlgorithmConfig(), temperature=1.0, max_response_length=8)  # fmt: skip
    held = {id(p) for group in actor.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    actor.update(random_batch())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n
    assert float(q.lora_B.weight.detach().abs().sum()) > 0  # the adapters moved
    assert all(state for state in actor.optimizer.state.values())


def test_merging_folds_the_adapters_into_the_weights() -> None:
    model = tiny_model()
    SPEC.add_to(model)
    trained(model)
    merged = copy.deepcopy(model)
    assert merge_lora(merged) == 14
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model), logits(tiny_model()), atol=1e-3)  # the adapters matter


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_the_lora_update_is_identical_for_any_micro_batch_size(aggregation: str) -> None:
    base = tiny_model()
    SPEC.add_to(base)
    trained(base)
    batch = random_batch()
    results = []
    for micro in (4, 1, 3):
        model = copy.deepcopy(base)
        cfg = ActorConfig(lr=1e-3, warmup_steps=0, mini_batch_size=4, micro_batch_size=micro)
        actor = Actor(model, cfg, AlgorithmConfig(loss_aggregation=aggregation), temperature=1.0,
                      max_response_length=8)  # type: ignore[arg-type]  # fmt: skip
        noise = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(5))
        batch.old_logprobs = actor.compute_logprobs(batch) + 0.3 * batch.response_mask * noise
        actor.update(batch)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    moved = max(float((results[0][n] - p).abs().max()) for n, p in base.named_parameters() if "lora_" in n)
    assert moved > 1e-4
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-6, atol=3e-8 * 1e3)


def test_the_adapter_is_peft_format_and_loads_back(tmp_path: Path) -> None:
    model = tiny_model()
    SPEC.add_to(model)
    trained(model)
    save_adapter(model, tmp_path / "adapter", base="some/base")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == "some/base" and len(config["target_modules"]) == 7
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


def test_peft_loads_the_adapter_on_the_transformers_model(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="PEFT (the test extra) checks the adapter's format")
    from transformers import AutoModelForCausalLM

    base = tiny_model()
    save_pretrained(base, tmp_path / "base")
    model = copy.deepcopy(base)
    SPEC.add_to(model)
    trained(model)
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    ids = torch.randint(1, 48, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, logits(model), rtol=1e-4, atol=1e-4)


def test_the_transformers_implementation_takes_the_same_adapters(tmp_path: Path) -> None:
    """transformers' modules call `LoRALinear.forward`; the native model's projections add the adapter
    around their own kernels (`_project`, `_project_then`): the same logits."""
    native = tiny_model()
    save_pretrained(native, tmp_path)
    hf = load_pretrained(tmp_path, implementation="hf")
    for m in (native, hf):
        SPEC.add_to(m)
        trained(m)
    assert adapter_names(hf) and len(adapter_names(hf)) == len(adapter_names(native))
    torch.testing.assert_close(logits(hf), logits(native), rtol=1e-4, atol=1e-4)


def test_lora_settings_are_validated() -> None:
    assert load_config("tiny", ["actor.lora.rank=8"]).actor.lora == LoRAConfig(rank=8)
    for override, key in [
        ("actor.lora.rank=-1", "actor.lora.rank"),
        ("actor.lora.alpha=0", "actor.lora.alpha"),
        ("actor.lora.dropout=1.5", "actor.lora.dropout"),
        ("actor.lora.target_modules=[q_proj,embed_tokens]", "actor.lora.target_modules"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config("tiny", [override])
