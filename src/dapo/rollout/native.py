"""`NativeEngine`: batched generation with the native `CausalLM` and a preallocated KV cache.

The engine holds the policy module itself, so a weight update is visible to the next `generate`; on CPU
each `generate` runs inside `CausalLM.packed_weights` (a copy of the linear weights in oneDNN's blocked
layout, taken on entry: the decode matmuls no longer repack their weight on every call).
Per chunk of at most ``max_batch_size`` sequences:

1. prefill each distinct prompt once (left-padded, one batched forward); with n > 1 its keys and values
   become a prefix shared by its n samples (`KVCache.share_prefix`): encoded once, stored once, and read once
   per decode step for the whole group (cascade attention) instead of once per sample;
2. decode one token per step for the whole batch, appending into preallocated ``[max_tokens, B]`` buffers;
3. when a quarter of the active rows have produced a stop token, drop them from the batch (gather the
   cache rows of the others), so finished sequences stop costing compute.

Sampling is reproducible: one ``torch.Generator`` on the engine's device, seeded from ``SamplingParams.seed``;
the same seed, prompts, sampling parameters and ``max_batch_size`` give the same samples. On CPU the
finished-ness check is a cheap host read done every step; on accelerators it is done every 8 steps to avoid
stalling the device queue (``check_every``; the same seed and a different ``check_every`` may give different
samples when rows stop, because compaction reorders the rows that draw random numbers).

Speed notes (2 CPU cores, tiny models, batch 64: see ``bench/rollout.py``): the decode step is bound by the
matmuls and SDPA's attention kernel, not by Python. Sampling uses a two-level inverse CDF (one uniform per
row) instead of ``torch.multinomial``'s per-token exponential race, which costs ~10 ms per step at V = 8192 on
CPU. Tried and not kept: ``torch.compile`` of the decode step (29 s to compile, 12% faster steps in session
1; 42 s and 4% in session 4), a float32 KV cache for bf16 models (bf16 SDPA is slower than float32 SDPA on
CPU, but the casts ate the gain), two threads each decoding half the batch on one core (no faster).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from dapo.models.transformer import CausalLM, KVCache
from dapo.rollout.base import Completion, SamplingParams, check_prompts

__all__ = ["NativeEngine", "sample_tokens"]

_COMPACT_FRACTION = 0.25
"""Compact the batch once this fraction of its rows has finished (a compaction copies the KV cache once)."""


class NativeEngine:
    """`RolloutEngine` on the native model; runs on whatever device the model's parameters are on."""

    def __init__(
        self,
        model: CausalLM,
        *,
        pad_token_id: int,
        device: torch.device | str | None = None,
        max_batch_size: int | None = None,
        check_every: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``check_every``: decode steps between reads of which rows have finished (a host sync); None = every
        step on CPU, every 8 steps on accelerators. ``dtype``: sample in this dtype (None = the model's);
        another than the model's samples from a copy of its current weights cast to it, refreshed at every
        `generate` (``actor.precision=bf16-mixed``: float32 master weights, bf16 sampling)."""
        if not isinstance(model, CausalLM):
            raise TypeError(f"NativeEngine needs a dapo CausalLM, got {type(model).__name__}; use HFEngine")
        param_device = model.lm_head_weight.device
        if device is not None and torch.device(device) != param_device:
            raise ValueError(
                f"NativeEngine shares the model's parameters, which are on {param_device}, not {device}; "
                "move the model first"
            )
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every must be >= 1 or None, got {check_every}")
        if not 0 <= pad_token_id < model.args.vocab_size:
            raise ValueError(
                f"pad_token_id {pad_token_id} is outside the vocabulary [0, {model.args.vocab_size})"
            )
        self.model = model
        self.device = param_device
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.check_every = check_every or (1 if param_device.type == "cpu" else 8)
        self.dtype = dtype or model.lm_head_weight.dtype
        self._copy: CausalLM | None = None

    def _sampler(self) -> CausalLM:
        """The module to sample with: the policy, or its weights copied into a module in `dtype` (made on
        first use, overwritten in place after that: a cast of every weight per `generate`)."""
        if self.dtype == self.model.lm_head_weight.dtype:
            return self.model
        with torch.no_grad():
            if self._copy is None:
                self._copy = copy.deepcopy(self.model).to(self.dtype).requires_grad_(False)
            else:
                torch._foreach_copy_(list(self._copy.parameters()), list(self.model.parameters()))
        return self._copy

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy ``state_dict`` (names as in ``model.state_dict()``) into the parameters, in place."""
        own = self.model.state_dict()
        if self.model.args.tie_word_embeddings:
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(f"load_weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
        bad = [k for k, v in state_dict.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"load_weights: wrong shapes for {bad[:5]}")
        with torch.no_grad():
            for k, v in state_dict.items():
                own[k].copy_(v)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` completions per prompt, ordered prompt 0 (n of them), prompt 1, …"""
        check_prompts(prompts, self.model.args.vocab_size)
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        gen = torch.Generator(self.device).manual_seed(seed)
        total = len(prompts) * sampling.n
        chunk = self.max_batch_size or total
        out: list[Completion] = []
        model = self._sampler()
        with torch.inference_mode(), model.packed_weights(min(chunk, total)):
            for start in range(0, total, chunk):
                owners = [r // sampling.n for r in range(start, min(start + chunk, total))]
                out.extend(self._generate_chunk(model, prompts, owners, sampling, gen))
        return out

    def _generate_chunk(
        self,
        model: CausalLM,
        prompts: list[list[int]],
        owners: list[int],
        sp: SamplingParams,
        gen: torch.Generator,
    ) -> list[Completion]:
        """Completions of the sequences whose prompts are ``prompts[owners[i]]`` (repeats consecutive)."""
        dev, steps = self.device, sp.max_tokens
        distinct = sorted(set(owners))
        width = max(len(prompts[p]) for p in distinct)
        ids = torch.full((len(distinct), width), self.pad_token_id, dtype=torch.long)  # [U, P]
        mask = torch.zeros(len(distinct), width, dtype=torch.long)  # [U, P]
        for i, p in enumerate(distinct):
            ids[i, width - len(prompts[p]) :] = torch.tensor(prompts[p])
            mask[i, width - len(prompts[p]) :] = 1
        dtype, shared = model.lm_head_weight.dtype, len(distinct) < len(owners)
        # with samples sharing prompts the cache holds just the prompts, then becomes their shared prefix
        cache = KVCache(model.args, len(distinct), width + (0 if shared else steps), dtype=dtype, device=dev)
        hidden = model(ids.to(dev), attention_mask=mask.to(dev), cache=cache, return_hidden=True)[:, -1]
        logits = F.linear(hidden, model.lm_head_weight)  # [U, V]
        if shared:  # each sample continues its prompt's cache rows, stored and read once per prompt
            where = {p: i for i, p in enumerate(distinct)}
            expand = torch.tensor([where[p] for p in owners], device=dev)
            cache.share_prefix(expand, max(steps - 1, 1))
            logits = logits.index_select(0, expand)

        B = len(owners)
        tokens = torch.empty(steps, B, dtype=torch.long, device=dev)  # [S, B]
        logprobs = torch.empty(steps, B, dtype=torch.float32, device=dev)  # [S, B]
        stops = torch.tensor(sp.stop_token_ids, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # [b], over active rows
        active: Tensor | None = None  # [b] output column of each active row; None = all, in order
        for step in range(steps):
            tok, lp = sample_tokens(logits.float(), sp, gen)  # [b], [b]
            if active is None:
                tokens[step], logprobs[step] = tok, lp
            else:
                tokens[step].index_copy_(0, active, tok)
                logprobs[step].index_copy_(0, active, lp)
            if step + 1 == steps:
                break
            if len(sp.stop_token_ids) > 0:
                done |= torch.isin(tok, stops)
                if (step + 1) % self.check_every == 0:
                    n_done = int(done.sum())
                    if n_done == done.shape[0]:
                        break
                    if n_done >= _COMPACT_FRACTION * done.shape[0]:
                        keep = (~done).nonzero().squeeze(1)  # [b']
                        cache.select(keep)
                        active = keep if active is None else active.index_select(0, keep)
                        tok, done = tok.index_select(0, keep), done.index_select(0, keep)
            logits = model(tok[:, None], cache=cache)[:, 0]  # [b, V]
        return self._completions(tokens[: step + 1].T.cpu(), logprobs[: step + 1].T.cpu(), owners, sp)

    def _completions(
        self, tokens: Tensor, logprobs: Tensor, owners: list[int], sp: SamplingParams
    ) -> list[Completion]:
        """Cut each row (``[B, S]`` on CPU) after its first stop token."""
        S = tokens.shape[1]
        is_stop = torch.isin(tokens, torch.tensor(sp.stop_token_ids, dtype=torch.long))  # [B, S]
        # Rows that stopped hold garbage after the stop token (they kept decoding until the next compaction).
        length = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, S).tolist()
        stopped = is_stop.any(1).tolist()
        tok_rows, lp_rows = tokens.tolist(), logprobs.tolist()
        return [
            Completion(
                prompt_index=owners[i],
                token_ids=tok_rows[i][: length[i]],
                logprobs=lp_rows[i][: length[i]],
                finish_reason="stop" if stopped[i] else "length",
            )
            for i in range(len(owners))
        ]


def sample_tokens(logits: Tensor, sp: SamplingParams, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sample one token per row of ``logits`` [B, V] (float32); returns (tokens [B], logprobs [B]).

    Log-probs are ``log_softmax(logits / T)`` at the sampled token, before top-k / top-p truncation (T = 1
    when greedy).
    """
    if sp.temperature == 0:
        tok = logits.argmax(-1)  # [B]
        return tok, logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
    scaled = logits if sp.temperature == 1 else logits / sp.temperature
    logp = scaled.log_softmax(-1)  # [B, V]
    if sp.top_k == -1 and sp.top_p == 1:
        tok = _inverse_cdf(logp.exp(), gen)
    else:
        sorted_logp, order = logp.sort(-1, descending=True)  # [B, V]
        probs = sorted_logp.exp()
        drop = torch.zeros_like(probs, dtype=torch.bool)
        if sp.top_k != -1:
            drop[:, sp.top_k :] = True
        if sp.top_p < 1:  # keep the shortest prefix whose mass reaches top_p (its first token always)
            drop |= (probs.cumsum(-1) - probs) >= sp.top_p
        pick = _inverse_cdf(probs.masked_fill(drop, 0), gen)
        tok = order.gather(1, pick[:, None]).squeeze(1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


_BLOCK = 64


def _inverse_cdf(probs: Tensor, gen: torch.Generator) -> Tensor:
    """Token ``i`` of each row of ``probs`` [B, V] (non-negative, any total) with probability p_i / sum(p).

    Inverse-CDF sampling with one uniform draw per row, in two levels (blocks of 64 tokens, then tokens
    within the chosen block) so that no full-vocabulary cumsum or per-token random number is needed: on CPU a
    per-token exponential race (what ``torch.multinomial`` does) costs ~10 ms per step at V = 8192, this
    ~0.2 ms. Cumulative sums and the draw are float64, so no token with p_i > 0 is lost to rounding.
    """
    B, V = probs.shape
    nb = -(-V // _BLOCK)
    if nb * _BLOCK != V:
        probs = F.pad(probs, (0, nb * _BLOCK - V))
    blocks = probs.view(B, nb, _BLOCK)
    block_mass = blocks.sum(-1, dtype=torch.float64)  # [B, nb]
    block_cdf = block_mass.cumsum(-1)  # [B, nb]
    total = block_cdf[:, -1:]  # [B, 1]
    u = torch.rand(B, 1, dtype=torch.float64, generator=gen, device=probs.device) * total
    # u * total can round up to total; stay strictly below it so the search lands on a block of positive mass
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    b = torch.searchsorted(block_cdf, u, right=True)  # [B, 1], first block whose cdf exceeds u
    inner_cdf = blocks.gather(1, b[:, :, None].expand(B, 1, _BLOCK)).squeeze(1).double().cumsum(-1)  # [B, 64]
    rest = u - (block_cdf.gather(1, b) - block_mass.gather(1, b))  # [B, 1], mass to cover inside the block
    # the block's two cumsums may differ in the last bit: clamp into [0, inner total) for the same reason
    last = inner_cdf[:, -1:]
    rest = torch.minimum(rest.clamp(min=0), torch.nextafter(last, torch.zeros_like(last)))
    return (b * _BLOCK + torch.searchsorted(inner_cdf, rest, right=True)).squeeze(1)  # [B]
