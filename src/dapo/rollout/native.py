"""`NativeEngine`: batched generation with the native `CausalLM` and a preallocated KV cache.

The engine holds the policy module itself, so a weight update is visible to the next `generate`; on CPU
each `generate` runs inside `CausalLM.packed_weights` (a copy of the linear weights in oneDNN's blocked
layout, taken on entry: the decode matmuls no longer repack their weight on every call).
When every row of a call fits at once (no ``max_batch_size`` or KV budget below the call's rows):

1. prefill each distinct prompt once (left-padded, one batched forward); with n > 1 its keys and values
   become a prefix shared by its n samples (`KVCache.share_prefix`): encoded once, stored once, and read once
   per decode step for the whole group (cascade attention) instead of once per sample;
2. decode one token per step for the whole batch, appending into preallocated ``[max_tokens, B]`` buffers;
3. when a quarter of the active rows have produced a stop token, drop them from the batch (gather the
   cache rows of the others), so finished sequences stop costing compute.

With fewer slots than rows (`_Continuous`, continuous batching), rows enter in order and, each time a
quarter of the slots have finished, the finished rows leave and the next rows from the queue take their
slots: their prompts join the shared prefix (prefilled then, or already there while an earlier sample of
the prompt runs; `KVCache.extend`), their first tokens are sampled from the prompt's last logits, and they
decode from the shared write cursor on, their earlier own slots masked out. Prompts no row continues leave
the prefix (`KVCache.drop_prompts`); when the cursor reaches the end of the rows' own window
(`continuous_window`: ``max_tokens`` plus a quarter), every row's slots move back to the oldest running
row's start (`KVCache.rebase`).

Samples do not depend on the layout: the uniform that picks row r's token at position t is a counter-based
hash of (``SamplingParams.seed``, the row's prompt index in the round, its sample index, t) only
(`row_streams`, `stream_uniforms`: splitmix64), never of which rows share a batch, a slot or a rank. The same
seed gives the same samples for any ``max_batch_size``, KV budget, compaction or refill schedule, or split of
the round into shares (``SamplingParams.first_prompt_index``), up to the last-bit differences batched kernels
may make in the logits. On CPU the finished-ness check is a cheap host read done every step; on accelerators
it is done every 8 steps to avoid stalling the device queue (``check_every``).

Memory: ``kv_budget_bytes`` bounds the KV cache in flight: at most as many slots as the budget holds with
every row at full length (its prompt counted whole, though samples share theirs, plus its own window), and
at most ``max_batch_size``.

Speed notes (2 CPU cores, tiny models, batch 64: see ``bench/rollout.py``): the decode step is bound by the
matmuls and SDPA's attention kernel, not by Python. Sampling uses a two-level inverse CDF (one uniform per
row) instead of ``torch.multinomial``'s per-token exponential race, which costs ~10 ms per step at V = 8192 on
CPU. Tried and not kept: ``torch.compile`` of the decode step (29-42 s to compile for 4-12% faster steps,
depending on the machine), a float32 KV cache for bf16 models (bf16 SDPA is slower than float32 SDPA on
CPU, but the casts ate the gain), two threads each decoding half the batch on one core (no faster).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from dapo.models.transformer import CausalLM, KVCache
from dapo.preempt import poll
from dapo.rollout.base import Completion, SamplingParams, check_prompts

__all__ = ["NativeEngine", "row_streams", "sample_tokens", "stream_uniforms"]

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
        kv_budget_bytes: float | None = None,
    ) -> None:
        """``check_every``: decode steps between reads of which rows have finished (a host sync); None = every
        step on CPU, every 8 steps on accelerators. ``dtype``: sample in this dtype (None = the model's);
        another than the model's samples from a copy of its current weights cast to it, refreshed at every
        `generate` (``actor.precision=bf16-mixed``: float32 master weights, bf16 sampling).
        ``kv_budget_bytes``: the most KV cache a call holds at once (None = no bound; see the module
        docstring)."""
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
        if kv_budget_bytes is not None and not kv_budget_bytes > 0:
            raise ValueError(f"kv_budget_bytes must be > 0 or None, got {kv_budget_bytes}")
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
        self.kv_budget_bytes = kv_budget_bytes
        self._copy: CausalLM | None = None

    def rows_per_chunk(self, prompts: list[list[int]], sp: SamplingParams) -> int:
        """Most rows decoded at once: ``max_batch_size``, and what the KV budget holds with every row at its
        full length (its prompt, counted whole, plus ``max_tokens``; with fewer rows than the call has,
        plus the refill's slack, `continuous_window`)."""
        total = len(prompts) * sp.n
        rows = min(self.max_batch_size or total, total)
        if self.kv_budget_bytes is not None:
            per_token = self.model.args.kv_bytes_per_token(self.dtype.itemsize)
            width = max(len(p) for p in prompts)
            rows = min(rows, max(1, int(self.kv_budget_bytes // (per_token * (width + sp.max_tokens)))))
            if rows < total:
                window = continuous_window(sp.max_tokens)
                rows = max(1, int(self.kv_budget_bytes // (per_token * (width + window))))
        return rows

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

    def release(self) -> None:
        """Free the sampling copy (a ``dtype`` other than the model's); the next `generate` makes it again.
        The KV cache needs no release: it lives only inside `generate`."""
        self._copy = None

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
        total, n = len(prompts) * sampling.n, sampling.n
        slots = self.rows_per_chunk(prompts, sampling)
        model = self._sampler()
        with torch.inference_mode(), model.packed_weights(min(slots, total)):
            if slots < total:  # fewer slots than rows: finished rows' slots take the next rows
                return _Continuous(self, model, prompts, sampling, seed, slots).run()
            owners = [r // n for r in range(total)]
            streams = row_streams(
                seed,
                [sampling.first_prompt_index + p for p in owners],
                [r % n for r in range(total)],
                self.device,
            )
            return self._generate_chunk(model, prompts, owners, sampling, streams)

    def _generate_chunk(
        self,
        model: CausalLM,
        prompts: list[list[int]],
        owners: list[int],
        sp: SamplingParams,
        streams: Tensor,
    ) -> list[Completion]:
        """Completions of the sequences whose prompts are ``prompts[owners[i]]`` (repeats consecutive), row i
        drawing from random stream ``streams[i]``."""
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
            poll()  # a stop abandons generation between decode steps (`dapo.preempt`)
            tok, lp = sample_tokens(logits.float(), sp, stream_uniforms(streams, step))  # [b], [b]
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
                        streams = streams.index_select(0, keep)
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


def continuous_window(max_tokens: int) -> int:
    """Own KV slots per row under continuous batching: ``max_tokens`` and a slack of a quarter of it (at
    least 8). Rows join at the shared write cursor, so the cursor runs ahead of the oldest row's start; once
    it reaches the window's end every row's slots move back to the oldest row's start (`KVCache.rebase`),
    at most once every slack's worth of steps."""
    return max_tokens + max(max_tokens // 4, 8)


class _Continuous:
    """One `NativeEngine.generate` call with fewer slots than rows: continuous batching. Rows enter in order;
    the slots that finished rows free take the next rows from the queue (their prompts prefilled then, or
    still in the shared prefix while an earlier sample of the prompt runs). Row r samples its token at
    position t from its own stream at t (`stream_uniforms` with per-row positions), so the tokens are those
    of one batch whatever the slots."""

    def __init__(
        self, engine: NativeEngine, model: CausalLM, prompts: list[list[int]], sp: SamplingParams, seed: int,
        slots: int,
    ) -> None:  # fmt: skip
        self.engine, self.model, self.prompts, self.sp, self.seed = engine, model, prompts, sp, seed
        self.slots, self.dev, self.n, self.steps = slots, engine.device, sp.n, sp.max_tokens
        self.width = max(len(p) for p in prompts)
        self.stops = torch.tensor(sp.stop_token_ids, dtype=torch.long, device=self.dev)
        total = len(prompts) * sp.n
        self.queue = list(range(total))[::-1]  # popped from the end: row 0 first
        self.tokens = torch.zeros(total, self.steps, dtype=torch.long, device=self.dev)  # [R, S]
        self.logprobs = torch.zeros(total, self.steps, dtype=torch.float32, device=self.dev)  # [R, S]
        self.cache: KVCache | None = None
        self.prompt_of: list[int] = []  # the shared prefix's prompts, in order
        self.first = torch.empty(0, device=self.dev)  # [U, V] each shared prompt's next-token logits
        self.rows: list[int] = []  # the active rows (round indices), in slot order
        self.joined: list[int] = []  # the write cursor at which each active row joined
        self.streams = torch.empty(0, dtype=torch.long, device=self.dev)  # [b]
        self.position = torch.empty(0, dtype=torch.long, device=self.dev)  # [b] next token's position
        self.done = torch.empty(0, dtype=torch.bool, device=self.dev)  # [b]
        self.feed = torch.empty(0, dtype=torch.long, device=self.dev)  # [b] the tokens the next step reads

    def run(self) -> list[Completion]:
        self._admit(self.slots)
        while self.rows:
            assert self.cache is not None
            logits = self.model(self.feed[:, None], cache=self.cache)[:, 0]  # [b, V]
            poll()  # a stop abandons generation between decode steps (`dapo.preempt`)
            self.feed = self._sample(logits, torch.tensor(self.rows, device=self.dev))
            full = self.cache.length >= self.cache.max_len
            if full or self.cache.length % self.engine.check_every == 0:
                finished = int(self.done.sum())
                if finished == len(self.rows) and not self.queue:
                    break
                if full or finished >= max(1.0, _COMPACT_FRACTION * len(self.rows)):
                    self._free()
                    if full and self.rows:
                        self._rebase()
                    self._admit(self.slots - len(self.rows))
        owners = [r // self.n for r in range(self.tokens.shape[0])]
        return self.engine._completions(self.tokens.cpu(), self.logprobs.cpu(), owners, self.sp)

    def _sample(self, logits: Tensor, rows: Tensor) -> Tensor:
        """Sample the next tokens of the last ``len(rows)`` active rows (all of them, or the new ones from
        `_admit`) and record them; returns them."""
        n = len(rows)
        tok, lp = sample_tokens(
            logits.float(), self.sp, stream_uniforms(self.streams[-n:], self.position[-n:])
        )
        at, done = self.position[-n:].clamp(max=self.steps - 1), self.done[-n:]
        # a row that is done records nothing more (its slot decodes on until it is freed)
        self.tokens[rows, at] = torch.where(done, self.tokens[rows, at], tok)
        self.logprobs[rows, at] = torch.where(done, self.logprobs[rows, at], lp)
        self.done[-n:] |= torch.isin(tok, self.stops) | (self.position[-n:] + 1 >= self.steps)
        self.position[-n:] += 1
        return tok

    def _free(self) -> None:
        """Drop the finished rows, and the shared prompts no row continues or will continue."""
        assert self.cache is not None
        keep = (~self.done).nonzero().squeeze(1)  # [b']
        kept = keep.tolist()
        self.rows, self.joined = [self.rows[i] for i in kept], [self.joined[i] for i in kept]
        if not self.rows:  # start again from the next rows' prompts
            self.cache, self.prompt_of, self.first = None, [], self.first[:0]
        else:
            self.cache.select(keep)
            upcoming = self.queue[-1] // self.n if self.queue else -1
            wanted = {r // self.n for r in self.rows} | {upcoming}
            keep_u = [i for i, p in enumerate(self.prompt_of) if p in wanted]
            if len(keep_u) < len(self.prompt_of):
                index = torch.tensor(keep_u, device=self.dev)
                self.cache.drop_prompts(index)
                self.first = self.first.index_select(0, index)
                self.prompt_of = [self.prompt_of[i] for i in keep_u]
        self.streams, self.position = self.streams.index_select(0, keep), self.position.index_select(0, keep)
        self.done, self.feed = self.done.index_select(0, keep), self.feed.index_select(0, keep)

    def _rebase(self) -> None:
        """Move the rows' own slots back to the oldest running row's start (see `continuous_window`)."""
        assert self.cache is not None
        shift = min(self.joined)
        self.cache.rebase(shift)
        self.joined = [j - shift for j in self.joined]

    def _admit(self, count: int) -> None:
        """Take up to ``count`` rows from the queue: their prompts into the shared prefix (prefilled where
        not there), their first tokens sampled; the next step reads those."""
        take = [self.queue.pop() for _ in range(min(count, len(self.queue)))]
        if not take:
            return
        owners = [r // self.n for r in take]
        new = sorted(set(owners) - set(self.prompt_of))
        prompts = self._prefill(new) if new else None
        self.prompt_of += new
        where = {p: i for i, p in enumerate(self.prompt_of)}
        index = torch.tensor([where[p] for p in owners], device=self.dev)
        if self.cache is None:
            assert prompts is not None
            prompts.share_prefix(index, continuous_window(self.steps))
            self.cache = prompts
        else:
            self.cache.extend(prompts, index)
        self.joined += [self.cache.length] * len(take)
        first = [self.sp.first_prompt_index + p for p in owners]
        self.streams = torch.cat(
            [self.streams, row_streams(self.seed, first, [r % self.n for r in take], self.dev)]
        )
        self.position = torch.cat([self.position, torch.zeros(len(take), dtype=torch.long, device=self.dev)])
        self.done = torch.cat([self.done, torch.zeros(len(take), dtype=torch.bool, device=self.dev)])
        self.rows += take
        rows = torch.tensor(take, device=self.dev)
        self.feed = torch.cat([self.feed, self._sample(self.first.index_select(0, index), rows)])

    def _prefill(self, prompts: list[int]) -> KVCache:
        """A cache of ``prompts`` (left-padded to the call's longest prompt); their next-token logits are
        appended to `first`."""
        ids = torch.full((len(prompts), self.width), self.engine.pad_token_id, dtype=torch.long)  # [m, W]
        mask = torch.zeros(len(prompts), self.width, dtype=torch.long)  # [m, W]
        for i, p in enumerate(prompts):
            ids[i, self.width - len(self.prompts[p]) :] = torch.tensor(self.prompts[p])
            mask[i, self.width - len(self.prompts[p]) :] = 1
        model, dtype = self.model, self.model.lm_head_weight.dtype
        cache = KVCache(model.args, len(prompts), self.width, dtype=dtype, device=self.dev)
        hidden = model(ids.to(self.dev), attention_mask=mask.to(self.dev), cache=cache, return_hidden=True)[
            :, -1
        ]
        logits = F.linear(hidden, model.lm_head_weight)  # [m, V]
        self.first = torch.cat([self.first.to(logits.dtype), logits]) if len(self.first) else logits
        return cache


def sample_tokens(logits: Tensor, sp: SamplingParams, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Sample one token per row of ``logits`` [B, V] (float32), row i by inverse CDF at ``uniforms[i]``
    ([B] float64 in [0, 1)); returns (tokens [B], logprobs [B]).

    Log-probs are ``log_softmax(logits / T)`` at the sampled token, before top-k / top-p truncation (T = 1
    when greedy).
    """
    if sp.temperature == 0:
        tok = logits.argmax(-1)  # [B]
        return tok, logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
    scaled = logits if sp.temperature == 1 else logits / sp.temperature
    logp = scaled.log_softmax(-1)  # [B, V]
    if sp.top_k == -1 and sp.top_p == 1:
        tok = _inverse_cdf(logp.exp(), uniforms)
    else:
        sorted_logp, order = logp.sort(-1, descending=True)  # [B, V]
        probs = sorted_logp.exp()
        drop = torch.zeros_like(probs, dtype=torch.bool)
        if sp.top_k != -1:
            drop[:, sp.top_k :] = True
        if sp.top_p < 1:  # keep the shortest prefix whose mass reaches top_p (its first token always)
            drop |= (probs.cumsum(-1) - probs) >= sp.top_p
        pick = _inverse_cdf(probs.masked_fill(drop, 0), uniforms)
        tok = order.gather(1, pick[:, None]).squeeze(1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


_BLOCK = 64


def _inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Token ``i`` of each row of ``probs`` [B, V] (non-negative, any total) with probability p_i / sum(p),
    for ``uniforms`` [B] (float64, uniform in [0, 1)).

    Inverse-CDF sampling with one uniform per row, in two levels (blocks of 64 tokens, then tokens
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
    u = uniforms[:, None] * total
    # u * total can round up to total; stay strictly below it so the search lands on a block of positive mass
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    b = torch.searchsorted(block_cdf, u, right=True)  # [B, 1], first block whose cdf exceeds u
    inner_cdf = blocks.gather(1, b[:, :, None].expand(B, 1, _BLOCK)).squeeze(1).double().cumsum(-1)  # [B, 64]
    rest = u - (block_cdf.gather(1, b) - block_mass.gather(1, b))  # [B, 1], mass to cover inside the block
    # the block's two cumsums may differ in the last bit: clamp into [0, inner total) for the same reason
    last = inner_cdf[:, -1:]
    rest = torch.minimum(rest.clamp(min=0), torch.nextafter(last, torch.zeros_like(last)))
    return (b * _BLOCK + torch.searchsorted(inner_cdf, rest, right=True)).squeeze(1)  # [B]


def _int64(x: int) -> int:
    """``x`` mod 2**64 as a signed 64-bit value (what an int64 tensor holds)."""
    return (x + 2**63) % 2**64 - 2**63


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MUL1 = _int64(0xBF58476D1CE4E5B9)
_MUL2 = _int64(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 ``x`` (torch shifts signed values arithmetically)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps mod 2**64): a bijection whose
    outputs for consecutive inputs look independent."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def row_streams(seed: int, prompt_index: list[int], sample_index: list[int], device: torch.device) -> Tensor:
    """int64 [B]: the random stream of each row, a function of (seed, the row's prompt index in the round,
    its sample index among the prompt's n) only."""
    key = _mix(torch.tensor([_int64(seed)], dtype=torch.long, device=device) + _GOLDEN)
    key = _mix(key + torch.tensor(prompt_index, dtype=torch.long, device=device) * _GOLDEN)
    return _mix(key + torch.tensor(sample_index, dtype=torch.long, device=device) * _GOLDEN)


def stream_uniforms(streams: Tensor, position: int | Tensor) -> Tensor:
    """float64 [B] in [0, 1): the uniform of each stream at token ``position`` (one for all, or ``[B]``: each
    row's own; 53 random bits)."""
    if isinstance(position, Tensor):  # int64 arithmetic wraps mod 2**64, as `_int64` does
        offset = (position + 1) * _GOLDEN
    else:
        offset = torch.tensor(_int64((position + 1) * _GOLDEN), dtype=torch.long, device=streams.device)
    return _shr(_mix(streams + offset), 11).double() * 2.0**-53
