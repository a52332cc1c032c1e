"""`rollout.vllm.*` settings and the trainer's weight-sync hook: no vLLM needed (these run in .venv too)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from dapo.backends.policy import sync_engine_weights
from dapo.config import ConfigError, RolloutConfig, load_config
from dapo.models import CausalLM
from dapo.models.config import ModelArgs
from dapo.rollout import NativeEngine, make_engine
from dapo.rollout.base import WeightSyncedEngine
from dapo.rollout.vllm import vllm_available


def small_model() -> CausalLM:
    torch.manual_seed(0)
    args = ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                     qkv_bias=True, tie_word_embeddings=True)  # fmt: skip
    return CausalLM(args)


def test_vllm_settings_load_and_are_validated() -> None:
    settings = ["kv_cache_gib=0.5", "enforce_eager=false", "max_model_len=512"]
    cfg = load_config("tiny", ["rollout.engine=vllm", *(f"rollout.vllm.{s}" for s in settings)])
    v = cfg.rollout.vllm
    assert (v.kv_cache_gib, v.enforce_eager, v.max_model_len, v.tensor_parallel_size) == (0.5, False, 512, 1)
    assert not v.sleep_mode
    bad = {
        "rollout.vllm.kv_cache_gib=0": "rollout.vllm.kv_cache_gib",
        "rollout.vllm.tensor_parallel_size=0": "rollout.vllm.tensor_parallel_size",
        "rollout.vllm.max_model_len=-1": "rollout.vllm.max_model_len",
        "rollout.vllm.max_model_len=100": r"the longest of rollout/evaluation.max_response_length \(192\)",
        "rollout.vllm.enforce_eager=maybe": "rollout.vllm.enforce_eager",
        "rollout.vllm.kv_cache=1": "did you mean 'kv_cache_gib'",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", ["rollout.engine=vllm", override])
    # max_model_len only constrains the vLLM engine
    assert load_config("tiny", ["rollout.vllm.max_model_len=100"]).rollout.engine == "native"


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_without_vllm_the_engine_names_the_install_command() -> None:
    model = small_model()
    with pytest.raises(ImportError, match="make setup-vllm"):
        make_engine(RolloutConfig(engine="vllm"), model, tokenizer=None)


class CountingEngine:
    """An engine with its own weights: records what the trainer's hook copies into it."""

    def __init__(self) -> None:
        self.weights_version = 0
        self.loaded: dict[str, Tensor] = {}

    def generate(self, prompts: list[list[int]], sampling: object) -> list[object]:
        raise AssertionError("not called")

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        self.loaded = {k: v.clone() for k, v in state_dict.items()}
        self.weights_version += 1


def test_the_trainer_syncs_engines_that_copy_weights_and_not_the_native_one() -> None:
    model = small_model()
    native = NativeEngine(model, pad_token_id=0)
    assert not isinstance(native, WeightSyncedEngine)
    assert sync_engine_weights(native, model) == {}  # shares the parameters: nothing to copy, nothing logged
    copying = CountingEngine()
    assert isinstance(copying, WeightSyncedEngine)
    with torch.no_grad():
        model.lm_head_weight.add_(1.0)
    assert sync_engine_weights(copying, model) == {"rollout/weights_version": 1.0}
    assert sync_engine_weights(copying, model) == {"rollout/weights_version": 2.0}
    assert copying.loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(copying.loaded[k], v) for k, v in model.state_dict().items())


def test_data_parallel_ranks_refuse_vllm_tensor_parallelism() -> None:
    """Under torchrun each rank runs its own vLLM engine: tensor_parallel_size > 1 is a config error."""
    from dapo.distributed import World
    from dapo.run import check_world_size

    ranks = World(rank=0, size=2, distributed=True)
    cfg = load_config("tiny", ["rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2"])
    with pytest.raises(
        ConfigError, match=r"rollout.vllm.tensor_parallel_size: invalid value 2 with 2 torchrun"
    ):
        check_world_size(cfg, ranks)
    check_world_size(cfg, World.single())  # one process: vLLM's own tensor parallelism is allowed
    check_world_size(load_config("tiny", ["rollout.engine=vllm"]), ranks)


def test_a_context_shorter_than_the_longest_sequence_fails_before_generation_on_every_rank() -> None:
    """With rollout.vllm.max_model_len=0 (the model's context) the check happens when the engine is built,
    on every rank alike, before vLLM starts (so it holds without vLLM installed too)."""
    model = small_model()
    context = model.args.max_position_embeddings
    message = f"rollout.vllm.max_model_len: 0, the model's max_position_embeddings {context} is shorter"
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_engine(RolloutConfig(engine="vllm"), model, None, longest=context + 1)
    cfg = load_config("tiny", ["rollout.engine=vllm", "evaluation.max_response_length=4096"])
    assert cfg.longest_sequence() == cfg.data.max_prompt_length + 4096
