"""`HFEngine`: the `RolloutEngine` protocol on transformers' ``generate``, for architectures the native
model does not cover (and as a reference in tests and benchmarks).

Log-probs come from the raw logits (``output_logits=True``), as log_softmax(logits / T) at the sampled
token, because the scores transformers returns have already been through its top-k / top-p processors.
The checkpoint's generation defaults (``generation_config.json``: eos tokens, repetition penalty, ...) are
ignored: only `SamplingParams` decides how to sample and when to stop. Seeded runs fork the global torch
RNG, which ``generate`` samples from, so they leave it untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dapo.models.hub import HFCausalLM
from dapo.rollout.base import Completion, SamplingParams, check_prompts

__all__ = ["HFEngine"]


class HFEngine:
    """`RolloutEngine` on a transformers ``*ForCausalLM`` (or a `dapo.models.HFCausalLM` wrapping one)."""

    def __init__(self, model: nn.Module, *, pad_token_id: int, max_batch_size: int | None = None) -> None:
        hf = model.hf if isinstance(model, HFCausalLM) else model
        if not hasattr(hf, "generate"):
            raise TypeError(f"HFEngine needs a transformers generation model, got {type(model).__name__}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.model: Any = hf
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy ``state_dict`` into the model's parameters, in place (transformers' parameter names)."""
        result = self.model.load_state_dict(dict(state_dict), strict=False)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied heads need no entry
        if missing or result.unexpected_keys:
            raise ValueError(f"load_weights: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` completions per prompt, ordered prompt 0 (n of them), prompt 1, …"""
        check_prompts(prompts, int(self.model.config.get_text_config().vocab_size))
        chunk = max(1, (self.max_batch_size or len(prompts) * sampling.n) // sampling.n)
        dev = next(self.model.parameters()).device
        seeds = [sampling.call_seed] if sampling.call_seed is not None else []
        out: list[Completion] = []
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], enabled=bool(seeds)):
            if seeds:
                torch.manual_seed(seeds[0])
            for start in range(0, len(prompts), chunk):
                out.extend(self._generate_chunk(prompts[start : start + chunk], start, sampling, dev))
        return out

    def _generate_chunk(
        self, prompts: list[list[int]], first: int, sp: SamplingParams, dev: torch.device
    ) -> list[Completion]:
        from transformers import GenerationConfig

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)  # [B, P]
        mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, P]
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        greedy = sp.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sp.temperature,
            top_k=None if greedy else max(sp.top_k, 0),  # transformers: 0 = off
            top_p=None if greedy else sp.top_p,
            max_new_tokens=sp.max_tokens,
            min_new_tokens=0,
            num_return_sequences=sp.n,
            eos_token_id=list(sp.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig()  # keep the checkpoint's defaults out
        try:
            with torch.inference_mode():
                result = self.model.generate(
                    input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config
                )
        finally:
            self.model.generation_config = saved
        new = result.sequences[:, width:].cpu()  # [B * n, S]
        logits = torch.stack(result.logits, 1).float()  # [B * n, S, V]
        logp = (logits if greedy else logits / sp.temperature).log_softmax(-1)
        token_lp = logp.gather(2, new.to(logp.device)[..., None]).squeeze(2).cpu()  # [B * n, S]
        is_stop = torch.isin(new, torch.tensor(sp.stop_token_ids, dtype=torch.long))  # [B * n, S]
        stopped = is_stop.any(1).tolist()
        length = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, new.shape[1]).tolist()
        rows, lps = new.tolist(), token_lp.tolist()
        return [
            Completion(
                prompt_index=first + i // sp.n,
                token_ids=rows[i][: length[i]],
                logprobs=lps[i][: length[i]],
                finish_reason="stop" if stopped[i] else "length",
            )
            for i in range(len(rows))
        ]
