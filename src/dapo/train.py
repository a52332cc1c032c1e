"""The actor: log-probabilities in micro-batches and the DAPO policy update.

One `Actor.update(batch)` is one training step's optimisation: the step's responses are split into
mini-batches (`actor.mini_batch_size` responses, one optimizer step each) and each mini-batch into
micro-batches (memory only). The loss of a mini-batch uses ONE global denominator computed from the whole
mini-batch's mask (`algo.loss_denominator`), so summing the micro-batch losses gives exactly the mini-batch
loss and the gradient does not depend on the micro-batch size nor on the number of data-parallel ranks.
verl divides each micro-batch by its own token count instead (the DAPO authors confirmed their run had
this).

Data-parallel (`dapo.distributed`): every rank holds the whole step's batch and trains its contiguous share
of each mini-batch's responses. The denominator is the sum over ranks of each share's count (one all-reduce
before the first backward); gradients are summed across ranks, so the update equals the single-process one.
Every rank runs the same number of micro-batches (a short share is padded with empty ones: FSDP's
collectives would otherwise deadlock), and metrics are reduced with the single-process weights.

Memory at long lengths (docs/memory.md), each exact: micro-batches by a token budget
(`actor.max_tokens_per_micro_batch`, `micro_batch_plan`; ranks pad to the largest count), log-probs and
entropy from the final hidden states through the LM head in chunks (`actor.logits_chunk_tokens`,
`algo.token_stats_from_hidden`), and activation checkpointing (applied by `dapo.distributed.parallelize`).

The schedule is the paper's: linear warm-up over `warmup_steps` training steps, then constant. A non-finite
loss or gradient skips that optimizer step and leaves the weights unchanged.

``actor.precision=bf16-mixed``: the model's forward (and so its backward) runs under bf16 autocast on the
float32 parameters, which stay the master weights that AdamW (float32 moments) updates; the logits are cast
to float32 before any `dapo.algo` maths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from dapo import algo, diagnostics
from dapo.config import ActorConfig, AlgorithmConfig
from dapo.distributed import World, shard_range


@dataclass
class TrainBatch:
    """A step's responses, each group's prompt stored once.

    Token-aligned tensors are `[B, R]`, aligned with `response_ids`: position j is response token j. The
    model computes a prompt once for all the responses that continue it (`CausalLM.forward_responses`).
    """

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P] 1 = real token
    prompt_index: Tensor  # [B] the prompt row each response continues
    response_ids: Tensor  # [B, R] right-padded
    response_lengths: Tensor  # [B] real tokens per response
    response_mask: Tensor  # [B, R] 1 = a response token that enters the loss
    advantages: Tensor  # [B] one value per response (Eq. 9)
    rollout_logprobs: Tensor  # [B, R] the engine's log-probs of the sampled tokens (0 elsewhere)
    old_logprobs: Tensor | None = None  # [B, R] the trainer's log-probs before the update

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    def rows(self, index: slice) -> TrainBatch:
        """A slice of responses with only the prompts they continue, trimmed to the longest prompt and
        response in it (less padding to compute on)."""
        used, prompt_index = torch.unique(self.prompt_index[index], return_inverse=True)
        prompt_mask = self.prompt_mask[used]
        p = max(int(prompt_mask.sum(1).max()), 1)  # left-padded: keep the last p columns
        r = max(int(self.response_lengths[index].max()), 1)
        old = self.old_logprobs
        return TrainBatch(
            prompt_ids=self.prompt_ids[used, -p:],
            prompt_mask=prompt_mask[:, -p:],
            prompt_index=prompt_index,
            response_ids=self.response_ids[index, :r],
            response_lengths=self.response_lengths[index],
            response_mask=self.response_mask[index, :r],
            advantages=self.advantages[index],
            rollout_logprobs=self.rollout_logprobs[index, :r],
            old_logprobs=None if old is None else old[index, :r],
        )

    def to(self, device: torch.device) -> TrainBatch:
        moved: dict[str, Tensor] = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        return dataclasses.replace(self, **moved)


class ResponseModel(Protocol):
    """What the actor needs of a policy (`CausalLM` and `HFCausalLM` have it)."""

    def forward_responses(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        prompt_index: Tensor,
        response_ids: Tensor,
        response_lengths: Tensor | None = None,
        *,
        return_hidden: bool = False,
    ) -> Tensor: ...

    @property
    def lm_head_weight(self) -> Tensor: ...


_STAT_KEYS = (
    "entropy",
    "token_prob",
    "clip_frac_upper",
    "clip_frac_lower",
    "dual_clip_frac",
    "approx_kl",
    "ratio_mean",
)
"""The token-weighted `actor/` statistics of `Actor._micro_loss`, in a fixed order (reduced over ranks)."""


def micro_batch_plan(batch: TrainBatch, rows: range, max_count: int, *, max_tokens: int = 0) -> list[range]:
    """``rows`` cut, in order, into micro-batches of at most ``max_count`` responses and, when
    ``max_tokens`` > 0, at most ``max_tokens`` tokens: each distinct prompt's real tokens once (its group's
    responses share one prompt computation) plus every response's. A response that alone exceeds the budget
    gets a micro-batch of its own. Deterministic: it depends on the lengths only."""
    if max_tokens <= 0:
        return [range(lo, min(lo + max_count, rows.stop)) for lo in range(rows.start, rows.stop, max_count)]
    prompt_lengths = batch.prompt_mask.sum(1).tolist()  # [N]
    response_lengths = batch.response_lengths.tolist()  # [B]
    prompt_of = batch.prompt_index.tolist()  # [B]
    plan: list[range] = []
    lo, tokens, prompts = rows.start, 0, set[int]()
    for i in rows:
        p = prompt_of[i]
        cost = int(response_lengths[i]) + (0 if p in prompts else int(prompt_lengths[p]))
        if i > lo and (tokens + cost > max_tokens or i - lo >= max_count):
            plan.append(range(lo, i))
            lo, tokens, prompts = i, 0, set()
            cost = int(response_lengths[i]) + int(prompt_lengths[p])
        tokens += cost
        prompts.add(p)
    if len(rows):
        plan.append(range(lo, rows.stop))
    return plan


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """The paper's schedule as a LambdaLR factor: linear warm-up over `warmup_steps` steps, then 1."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor


class Actor:
    """Owns the policy's optimizer and schedule; computes log-probs and applies the DAPO update."""

    def __init__(
        self,
        model: nn.Module,
        cfg: ActorConfig,
        algorithm: AlgorithmConfig,
        *,
        temperature: float,
        max_response_length: int,
        world: World | None = None,
    ) -> None:
        self.model = model
        self.world = world or World.single()
        self.cfg = cfg
        self.algorithm = algorithm
        # log-probs are those of the sampling distribution: logits / T (greedy sampling has no T; use 1)
        self.temperature = temperature if temperature > 0 else 1.0
        self.max_response_length = max_response_length
        self.aggregation = algo.LossAggregation(algorithm.loss_aggregation)
        self.policy_loss = algo.cispo_loss if algorithm.policy_loss == "cispo" else algo.policy_loss
        # the largest entropy a token can have is the log of this
        self.lm_head_vocab = int(cast(ResponseModel, model).lm_head_weight.shape[0])
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.precision == "bf16-mixed" and any(p.dtype != torch.float32 for p in params):
            raise ValueError("actor.precision=bf16-mixed needs float32 parameters (the master weights)")
        # the fused kernel: one pass over all parameters (100 -> 12 ms a step for a 25M model, 2 CPU cores)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8, fused=fused or None
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_constant(cfg.warmup_steps))

    @property
    def device(self) -> torch.device:
        """Where the model computes: the rank's device (FSDP2 may keep the shards in host memory), else the
        parameters'."""
        return self.world.device if self.world.distributed else next(self.model.parameters()).device

    def _share(self, batch: TrainBatch, start: int, stop: int) -> tuple[range, list[range], int]:
        """This rank's rows of the mini-batch ``[start, stop)``, its micro-batches over them, and the number
        of micro-batches every rank runs (that of the rank with the most)."""
        rows = shard_range(stop - start, self.world)
        rows = range(start + rows.start, start + rows.stop)
        plan = micro_batch_plan(
            batch, rows, self.cfg.micro_batch_size, max_tokens=self.cfg.max_tokens_per_micro_batch
        )
        if self.cfg.max_tokens_per_micro_batch > 0:  # counts depend on each share's lengths
            return rows, plan, max(1, *self.world.gather(len(plan)))
        largest = len(shard_range(stop - start, self.world, rank=0))
        return rows, plan, max(1, -(-largest // self.cfg.micro_batch_size))

    def _micro_batches(
        self, batch: TrainBatch, rows: range, plan: list[range], count: int
    ) -> Iterator[tuple[int, TrainBatch]]:
        """``count`` micro-batches, ``plan``'s then empty ones: (first row, micro-batch); row -1 marks an
        empty one (one response with nothing in the loss, so every rank runs the same forwards and
        backwards)."""
        for i in range(count):
            if i < len(plan):
                yield plan[i].start, batch.rows(slice(plan[i].start, plan[i].stop)).to(self.device)
            else:
                first = rows.start if len(rows) else 0
                empty = batch.rows(slice(first, first + 1))
                empty.response_mask = torch.zeros_like(empty.response_mask)
                empty.advantages = torch.zeros_like(empty.advantages)
                yield -1, empty.to(self.device)

    def _forward(self, mb: TrainBatch, *, hidden: bool) -> Tensor:
        """The model's output at every response position: logits `[b, r, V]` in float32, or with
        ``hidden`` the final hidden states `[b, r, D]` in the compute dtype."""
        model = cast(ResponseModel, self.model)
        mixed = self.cfg.precision == "bf16-mixed"
        compute = torch.autocast(self.device.type, torch.bfloat16) if mixed else contextlib.nullcontext()
        with compute:
            out = model.forward_responses(
                mb.prompt_ids,
                mb.prompt_mask,
                mb.prompt_index,
                mb.response_ids,
                mb.response_lengths,
                return_hidden=hidden,
            )
        return out.to(self._head_dtype()) if hidden else out.float()

    def _head_dtype(self) -> torch.dtype:
        """The dtype of the LM head's matmul: bf16 under bf16-mixed (as autocast casts it), else the
        weight's (FSDP2's bf16 compute copy on CUDA)."""
        weight = cast(ResponseModel, self.model).lm_head_weight
        return torch.bfloat16 if self.cfg.precision == "bf16-mixed" else weight.dtype

    def _head_weight(self) -> Tensor:
        """The LM head ``[V, D]`` in the head's compute dtype (read after the forward: under FSDP2 the
        head's group stays unsharded from its forward until the backward)."""
        return cast(ResponseModel, self.model).lm_head_weight.to(self._head_dtype())

    def _logprobs(self, mb: TrainBatch) -> Tensor:
        chunk, tokens, t = self.cfg.logits_chunk_tokens, mb.response_ids, self.temperature
        if chunk > 0:
            hidden, weight = self._forward(mb, hidden=True), self._head_weight()
            return algo.logprobs_from_hidden(hidden, weight, tokens, temperature=t, chunk_size=chunk)
        return algo.logprobs_from_logits(self._forward(mb, hidden=False), tokens, temperature=t)

    def _casts_kept(self) -> contextlib.AbstractContextManager[object]:
        """Around the micro-batches of one set of weights (a log-prob pass, a mini-batch before its
        optimizer step). Under bf16-mixed: a disabled autocast region, which keeps autocast's nesting above
        zero, so the bf16 copies of the weights that the first micro-batch's forward casts (autocast's cache)
        serve the later ones instead of being cast again; the cache empties when it exits, before the
        optimizer moves the weights. The backward passes inside it run with autocast off, as outside.

        Not with FSDP2 (`World.distributed`): it gathers each layer's weights again for every micro-batch
        and hooks their gradients there, which a cached cast of an earlier gather bypasses (the gradients of
        the sharded layers came out 15-33% off, tests/test_distributed.py)."""
        if self.cfg.precision != "bf16-mixed" or self.world.distributed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def _token_stats(self, mb: TrainBatch) -> algo.TokenStats:
        chunk, tokens, t = self.cfg.logits_chunk_tokens, mb.response_ids, self.temperature
        if chunk > 0:
            hidden = self._forward(mb, hidden=True)
            weight = self._head_weight()
            return algo.token_stats_from_hidden(hidden, weight, tokens, temperature=t, chunk_size=chunk)
        return algo.token_stats_from_logits(self._forward(mb, hidden=False), tokens, temperature=t)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> Tensor:
        """The trainer's log-probs of every response token, `[B, R]` (0 outside the loss mask), in
        micro-batches; with several ranks, each computes its share of each mini-batch (rows of the others
        stay 0)."""
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        with self._casts_kept():  # one set of weights for the whole pass
            for start in range(0, len(batch), self.cfg.mini_batch_size):
                stop = min(start + self.cfg.mini_batch_size, len(batch))
                rows, plan, count = self._share(batch, start, stop)
                for lo, mb in self._micro_batches(batch, rows, plan, count):
                    lp = self._logprobs(mb)
                    if lo >= 0:
                        out[lo : lo + len(mb), : lp.shape[1]] = (lp * mb.response_mask).cpu()
        return out

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One training step: `epochs` passes of mini-batch updates. Returns `actor/` metrics.

        With `batch.old_logprobs` None, the update fills them in: the first mini-batch of the first epoch is
        exactly on-policy, so its old log-probs are the detached log-probs of its own forward pass (ratio 1,
        no extra pass); only the later mini-batches get a no-grad pass before the first optimizer step.
        On return `batch.old_logprobs` holds every row (summed over the ranks that computed them).
        """
        self._optimizer_to(next(self.model.parameters()).device)  # actor.offload: states back for the update
        on_policy_rows = 0
        if batch.old_logprobs is None:
            on_policy_rows = min(self.cfg.mini_batch_size, len(batch))
            batch.old_logprobs = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
            if on_policy_rows < len(batch):
                rest = batch.rows(slice(on_policy_rows, len(batch)))
                old = self.compute_logprobs(rest)
                batch.old_logprobs[on_policy_rows:, : old.shape[1]] = old
        self.model.train()
        sums = dict.fromkeys(_STAT_KEYS, 0.0)  # token-weighted sums of this rank's micro-batch statistics
        tokens_seen, pg_loss = 0.0, 0.0
        clipped_sequences, responses = 0.0, 0.0  # counts of this rank's micro-batches (GSPO's clip fraction)
        upper_old_prob, upper_tokens = 0.0, 0.0  # π_old summed over the upper-clipped tokens, their count
        entropy_hist = torch.zeros(2, diagnostics.ENTROPY_BINS, dtype=torch.float64)  # counts, sums
        grad_norms: list[float] = []
        skipped = 0
        n = len(batch)
        for _ in range(self.cfg.epochs):
            for start in range(0, n, self.cfg.mini_batch_size):
                stop = min(start + self.cfg.mini_batch_size, n)
                rows, plan, count = self._share(batch, start, stop)
                local = algo.denominator_count(
                    self.aggregation,
                    batch.response_mask[rows.start : rows.stop],
                    max_response_length=self.max_response_length,
                )
                denom = algo.safe_denominator(self.world.sum([local])[0])
                self.optimizer.zero_grad(set_to_none=True)
                loss_total = 0.0
                with self._casts_kept():
                    for lo, mb in self._micro_batches(batch, rows, plan, count):
                        fill = batch.old_logprobs if 0 <= lo < on_policy_rows else None
                        loss, stats, hist = self._micro_loss(mb, denom, fill_old=fill, row=lo)
                        entropy_hist += hist.cpu()
                        loss.backward()
                        loss_total += float(loss.detach())
                        w = stats.pop("tokens")
                        clipped_sequences += stats.pop("clipped_sequences")
                        responses += stats.pop("responses")
                        upper_old_prob += stats.pop("upper_old_prob")
                        upper_tokens += stats["clip_frac_upper"] * w
                        if w > 0:
                            tokens_seen += w
                            for k, v in stats.items():
                                sums[k] += v * w
                on_policy_rows = 0  # filled in: later epochs read them like any other mini-batch
                loss_total = self.world.sum([loss_total])[0]  # every rank takes the same skip decision
                gnorm = self._clip_gradients()
                if not (math.isfinite(loss_total) and math.isfinite(gnorm)):
                    # a non-finite loss or gradient would corrupt the weights and the Adam moments: skip the
                    # step
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                self.optimizer.step()
                grad_norms.append(gnorm)
                pg_loss += loss_total
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.offload != "none":  # host memory until the next update (generation has the device)
            self._optimizer_to(torch.device("cpu"))
        if self.world.size > 1:  # each row was filled by exactly one rank, 0 elsewhere
            batch.old_logprobs = self.world.sum_tensor(batch.old_logprobs)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # the schedule counts training steps, also one whose updates were all skipped (torch warns then)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        counts = [tokens_seen, clipped_sequences, responses, upper_old_prob, upper_tokens]
        totals = self.world.sum([*counts, *sums.values()])
        tokens_seen, clipped_sequences, responses, upper_old_prob, upper_tokens = totals[: len(counts)]
        sums = dict(zip(sums, totals[len(counts) :], strict=True))
        entropy_hist = self.world.sum_tensor(entropy_hist)
        updates = len(grad_norms)
        metrics = {f"actor/{k}": v / max(tokens_seen, 1.0) for k, v in sums.items()}
        # the entropy of the forking tokens, and how likely the tokens that Clip-Higher lets rise were
        metrics["actor/entropy_top20"] = diagnostics.top_fraction_mean(entropy_hist, 0.2)
        if upper_tokens > 0:
            metrics["actor/clip_upper_old_prob"] = upper_old_prob / upper_tokens
        if self.algorithm.ratio_level == "sequence":  # GSPO's clip fraction: of the responses
            metrics["actor/seq_clip_frac"] = clipped_sequences / max(responses, 1.0)
        metrics["actor/pg_loss"] = pg_loss / max(updates, 1)
        metrics["actor/grad_norm"] = sum(grad_norms) / max(updates, 1)
        metrics["actor/lr"] = float(lr)
        metrics["actor/updates"] = float(updates)
        metrics["actor/skipped_updates"] = float(skipped)
        return metrics

    def _micro_loss(
        self, mb: TrainBatch, denominator: float, *, fill_old: Tensor | None = None, row: int = 0
    ) -> tuple[Tensor, dict[str, float], Tensor]:
        """The micro-batch's share of the mini-batch loss, its statistics and its tokens' entropy histogram
        (`diagnostics.entropy_histogram`). With `fill_old` (the batch's old log-probs, rows
        from `row` on), the micro-batch is on-policy: its old log-probs are this forward's, written there."""
        stats = self._token_stats(mb)
        mask = mb.response_mask
        if fill_old is not None:
            mb.old_logprobs = (stats.logprobs.detach() * mask).float()
            fill_old[row : row + len(mb), : mask.shape[1]] = mb.old_logprobs.cpu()
        assert mb.old_logprobs is not None
        is_weights = None
        if self.algorithm.rollout_is_cap is not None:
            is_weights = algo.rollout_is_weights(
                mb.old_logprobs, mb.rollout_logprobs, mask, cap=self.algorithm.rollout_is_cap,
                sequence=self.algorithm.rollout_is_level == "sequence",
                masking=self.algorithm.rollout_is_mode == "mask",
            )  # fmt: skip
        out = self.policy_loss(
            stats.logprobs,
            mb.old_logprobs,
            mb.advantages,
            mask,
            eps_low=self.algorithm.eps_low,
            eps_high=self.algorithm.eps_high,
            dual_clip_c=self.algorithm.dual_clip_c,
            is_weights=is_weights,
            sequence_ratio=self.algorithm.ratio_level == "sequence",
        )
        loss = algo.aggregate_loss(out.token_loss, mask, self.aggregation, denominator)
        with torch.no_grad():
            metrics = {
                "tokens": float(mask.sum()),
                "entropy": float(algo.masked_mean(stats.entropy, mask)),
                "token_prob": float(algo.masked_mean(stats.probs, mask)),
                "clip_frac_upper": float(out.clip_frac_upper),
                "clip_frac_lower": float(out.clip_frac_lower),
                "dual_clip_frac": float(out.dual_clip_frac),
                "approx_kl": float(out.approx_kl),
                "ratio_mean": float(out.ratio_mean),
                "clipped_sequences": float(out.clipped_sequences),
                "responses": float(mask.bool().any(1).sum()),
                "upper_old_prob": float(out.upper_old_prob),
            }
            hist = diagnostics.entropy_histogram(stats.entropy, mask, self.lm_head_vocab)
        return loss, metrics, hist

    def _optimizer_to(self, device: torch.device) -> None:
        """Move AdamW's state tensors (moments, step counts) to ``device``; a no-op where they are."""
        pin = device.type == "cpu" and torch.cuda.is_available()  # page-locked: copies at full PCIe speed
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if not isinstance(value, Tensor) or value.device == device:
                    continue
                if pin:
                    host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
                    state[key] = host.copy_(value, non_blocking=True)
                else:
                    state[key] = value.to(device, non_blocking=device.type == "cuda")
        if device.type == "cpu" and self.device.type == "cuda":
            torch.cuda.synchronize()  # the copies have landed before the device memory is reused

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2): the norm over all ranks' shards
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def state_dict(self) -> dict[str, object]:
        """Optimizer and schedule state (the weights are saved by the checkpoint module)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
