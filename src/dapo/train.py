"""The actor: log-probabilities in micro-batches and the DAPO policy update.

One `Actor.update(batch)` is one training step's optimisation: the step's responses are split into
mini-batches (`actor.mini_batch_size` responses, one optimizer step each) and each mini-batch into
micro-batches (memory only). The loss of a mini-batch uses ONE global denominator computed from the whole
mini-batch's mask (`algo.loss_denominator`), so summing the micro-batch losses gives exactly the mini-batch
loss and the gradient does not depend on the micro-batch size (nor, later, on the number of data-parallel
ranks). verl divides each micro-batch by its own token count instead; see paper.md, "What the public
implementations got wrong".

The schedule is the paper's: linear warm-up over `warmup_steps` training steps, then constant. A non-finite
loss or gradient skips that optimizer step and leaves the weights unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from dapo import algo
from dapo.config import ActorConfig, AlgorithmConfig


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
    ) -> Tensor: ...


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
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.algorithm = algorithm
        # log-probs are those of the sampling distribution: logits / T (greedy sampling has no T; use 1)
        self.temperature = temperature if temperature > 0 else 1.0
        self.max_response_length = max_response_length
        self.aggregation = algo.LossAggregation(algorithm.loss_aggregation)
        params = [p for p in model.parameters() if p.requires_grad]
        # the fused kernel: one pass over all parameters (100 -> 12 ms a step for a 25M model, 2 CPU cores)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8, fused=fused or None
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_constant(cfg.warmup_steps))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _micro_batches(self, batch: TrainBatch, start: int, stop: int) -> Iterator[tuple[int, TrainBatch]]:
        for lo in range(start, stop, self.cfg.micro_batch_size):
            yield lo, batch.rows(slice(lo, min(lo + self.cfg.micro_batch_size, stop))).to(self.device)

    def _logits(self, mb: TrainBatch) -> Tensor:
        """Logits of every response position, `[b, r, V]` in float32."""
        model = cast(ResponseModel, self.model)
        logits = model.forward_responses(
            mb.prompt_ids, mb.prompt_mask, mb.prompt_index, mb.response_ids, mb.response_lengths
        )
        return logits.float()

    def _token_stats(self, mb: TrainBatch) -> algo.TokenStats:
        return algo.token_stats_from_logits(self._logits(mb), mb.response_ids, temperature=self.temperature)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> Tensor:
        """The trainer's log-probs of every response token, `[B, R]` (0 outside the loss mask), in
        micro-batches."""
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        for lo in range(0, len(batch), self.cfg.micro_batch_size):
            mb = batch.rows(slice(lo, lo + self.cfg.micro_batch_size)).to(self.device)
            lp = algo.logprobs_from_logits(self._logits(mb), mb.response_ids, temperature=self.temperature)
            out[lo : lo + len(mb), : lp.shape[1]] = (lp * mb.response_mask).cpu()
        return out

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One training step: `epochs` passes of mini-batch updates. Returns `actor/` metrics.

        With `batch.old_logprobs` None, the update fills them in: the first mini-batch of the first epoch is
        exactly on-policy, so its old log-probs are the detached log-probs of its own forward pass (ratio 1,
        no extra pass); only the later mini-batches get a no-grad pass before the first optimizer step.
        """
        on_policy_rows = 0
        if batch.old_logprobs is None:
            on_policy_rows = min(self.cfg.mini_batch_size, len(batch))
            batch.old_logprobs = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
            if on_policy_rows < len(batch):
                rest = batch.rows(slice(on_policy_rows, len(batch)))
                old = self.compute_logprobs(rest)
                batch.old_logprobs[on_policy_rows:, : old.shape[1]] = old
        self.model.train()
        sums: dict[str, float] = {}
        tokens_seen = 0.0
        grad_norms: list[float] = []
        skipped = 0
        n = len(batch)
        for _ in range(self.cfg.epochs):
            for start in range(0, n, self.cfg.mini_batch_size):
                stop = min(start + self.cfg.mini_batch_size, n)
                denom = algo.loss_denominator(
                    self.aggregation,
                    batch.response_mask[start:stop],
                    max_response_length=self.max_response_length,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss_total = 0.0
                for lo, mb in self._micro_batches(batch, start, stop):
                    fill = batch.old_logprobs if lo < on_policy_rows else None
                    loss, stats = self._micro_loss(mb, denom, fill_old=fill, row=lo)
                    loss.backward()
                    loss_total += float(loss.detach())
                    w = float(stats.pop("tokens"))
                    tokens_seen += w
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v * w
                on_policy_rows = 0  # filled in: later epochs read them like any other mini-batch
                gnorm = self._clip_gradients()
                if not (math.isfinite(loss_total) and math.isfinite(gnorm)):
                    # a non-finite loss or gradient would corrupt the weights and the Adam moments: skip the
                    # step
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                self.optimizer.step()
                grad_norms.append(gnorm)
                sums["pg_loss"] = sums.get("pg_loss", 0.0) + loss_total
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # the schedule counts training steps, also one whose updates were all skipped (torch warns then)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        updates = len(grad_norms)
        metrics = {f"actor/{k}": v / max(tokens_seen, 1.0) for k, v in sums.items() if k != "pg_loss"}
        metrics["actor/pg_loss"] = sums.get("pg_loss", 0.0) / max(updates, 1)
        metrics["actor/grad_norm"] = sum(grad_norms) / max(updates, 1)
        metrics["actor/lr"] = float(lr)
        metrics["actor/updates"] = float(updates)
        metrics["actor/skipped_updates"] = float(skipped)
        return metrics

    def _micro_loss(
        self, mb: TrainBatch, denominator: float, *, fill_old: Tensor | None = None, row: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        """The micro-batch's share of the mini-batch loss. With `fill_old` (the batch's old log-probs, rows
        from `row` on), the micro-batch is on-policy: its old log-probs are this forward's, written there."""
        stats = self._token_stats(mb)
        mask = mb.response_mask
        if fill_old is not None:
            mb.old_logprobs = (stats.logprobs.detach() * mask).float()
            fill_old[row : row + len(mb), : mask.shape[1]] = mb.old_logprobs.cpu()
        assert mb.old_logprobs is not None
        is_weights = None
        if self.algorithm.rollout_is_cap is not None:
            is_weights = algo.truncated_is_weights(
                mb.old_logprobs, mb.rollout_logprobs, cap=self.algorithm.rollout_is_cap
            )
        out = algo.policy_loss(
            stats.logprobs,
            mb.old_logprobs,
            mb.advantages,
            mask,
            eps_low=self.algorithm.eps_low,
            eps_high=self.algorithm.eps_high,
            dual_clip_c=self.algorithm.dual_clip_c,
            is_weights=is_weights,
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
            }
        return loss, metrics

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def state_dict(self) -> dict[str, object]:
        """Optimizer and schedule state (the weights are saved by the checkpoint module)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
