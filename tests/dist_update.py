"""One `Actor.update` of a fixed batch on every rank: run by tests/test_distributed.py as
`torchrun --nproc-per-node 2 -m tests.dist_update OUT`.

Writes `<out>/<case>.pt` from rank 0: the full parameters after the update, for each loss aggregation and
micro-batch size, for a per-rank-normalised negative control (each rank divides by its own count), under
`actor.precision=bf16-mixed` (FSDP2-sharded float32 masters, bf16 autocast compute), and with the memory
settings on (`MEMORY`: activation checkpointing inside FSDP2, the chunked LM head, token-budget
micro-batches, whose counts differ between the ranks' shares), for the other objectives (`OBJECTIVES`), and
with LoRA (`LORA`: frozen base, sharded adapters, the adapters alone synced to the full copy).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from dapo import distributed
from dapo.config import ActorConfig, AlgorithmConfig
from dapo.models.lora import LoRASpec
from dapo.train import Actor
from tests.test_train import random_batch, tiny_model

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
BATCH, MINI = 10, 5  # two mini-batches of 5 responses: shares of 3 and 2 rows on 2 ranks
LR = 1e-6  # the paper's learning rate
MEMORY = {"activation_checkpointing": True, "logits_chunk_tokens": 5, "max_tokens_per_micro_batch": 14}
OBJECTIVES: dict[str, dict[str, Any]] = {
    "cispo": {"policy_loss": "cispo", "dual_clip_c": None, "eps_low": 1.0},
    "gspo": {"ratio_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
    # the batch's engine log-probs are 0, so the ratios are π_old: the band keeps short responses and masks
    # long ones (a product of ~0.02 per token)
    "sequence-is-mask": {"rollout_is_cap": 1e6, "rollout_is_level": "sequence", "rollout_is_mode": "mask"},
    "rloo": {"advantage": "rloo"},
}
"""The other objectives (`AlgorithmConfig` settings beside the aggregation), each on 2 ranks."""
LORA = LoRASpec(4, 8.0, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
"""LoRA's case: adapters on every projection, the base frozen."""


class PerRankWorld(distributed.World):
    """The negative control: sums are this rank's own values (per-rank normalisation)."""

    def sum(self, values):  # type: ignore[no-untyped-def]
        return [float(v) for v in values]


def update(
    world: distributed.World,
    aggregation: str,
    micro: int,
    precision: str = "model",
    algorithm: dict[str, Any] | None = None,
    lora: bool = False,
    **settings: Any,
) -> dict[str, torch.Tensor]:
    checkpointing = bool(settings.get("activation_checkpointing", False))
    model = tiny_model()
    if lora:  # rank-4 adapters on every projection, B nonzero so that A has gradients too
        LORA.add_to(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    train_model, plain = distributed.parallelize(model, world, activation_checkpointing=checkpointing)
    cfg = ActorConfig(
        lr=LR,
        warmup_steps=0,
        mini_batch_size=MINI,
        micro_batch_size=micro,
        weight_decay=0.1,
        precision=precision,  # type: ignore[arg-type]
        **settings,
    )
    actor = Actor(
        train_model,
        cfg,
        AlgorithmConfig(loss_aggregation=aggregation, **(algorithm or {})),  # type: ignore[arg-type]
        temperature=1.0,
        max_response_length=8,
        world=world,
    )
    batch = random_batch(BATCH)
    grads: list[dict[str, torch.Tensor]] = []  # the summed gradient of each mini-batch, before its step
    step = actor.optimizer.step

    def record_then_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        grads.append(
            {n: _full(p.grad).clone() for n, p in train_model.named_parameters() if p.grad is not None}
        )
        return step(*args, **kwargs)

    actor.optimizer.step = record_then_step  # type: ignore[method-assign]
    actor.update(batch)
    distributed.sync_weights(train_model, plain)
    weights = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    weights["old_logprobs"] = batch.old_logprobs.clone()  # type: ignore[union-attr]
    for i, g in enumerate(grads):
        weights.update({f"grad{i}.{n}": t for n, t in g.items()})
    return weights


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    out = Path(sys.argv[1])
    world = distributed.init_world(device="cpu")
    results = {}
    for aggregation in AGGREGATIONS:
        for micro in (1, MINI):
            results[f"{aggregation}-{micro}"] = update(world, aggregation, micro)
    control = PerRankWorld(**{f: getattr(world, f) for f in world.__dataclass_fields__})
    results["per-rank-token-mean-1"] = update(control, "token-mean", 1)
    results["bf16-mixed-token-mean-1"] = update(world, "token-mean", 1, "bf16-mixed")
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        results[f"memory-{aggregation}"] = update(world, aggregation, MINI, **MEMORY)
    for name, algorithm in OBJECTIVES.items():
        results[f"objective-{name}"] = update(world, "seq-mean-token-mean", 1, algorithm=algorithm)
    results["lora"] = update(world, "token-mean", 1, lora=True)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(results, out / "updates.pt")
    world.close()


if __name__ == "__main__":
    main()
