"""The policy on one rank, as every backend holds it: the module it trains and the full weights its engines
read, the actor that updates it, its checkpoint written and restored, its weights copied into an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dapo import distributed
from dapo.checkpoint import (
    Checkpoint,
    check_layout,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    sharded_checkpoint,
)
from dapo.config import Config
from dapo.errors import UserError
from dapo.models import load_pretrained
from dapo.models.load import is_hub_id, load_policy, resolve_model_path
from dapo.models.lora import ADAPTER_WEIGHTS, LoRASpec, has_lora, merged_state_dict, read_adapter_weights
from dapo.models.tokenizer import load_tokenizer
from dapo.rollout.base import RolloutEngine, WeightSyncedEngine
from dapo.train import Actor


class Policy:
    """The policy as the update sees it: the module to train, the full-weight module the engines read (the
    same module in one process), the actor; its checkpoint written and restored. One per rank: built by
    `LocalBackend`, and by each Ray trainer rank (`dapo.cluster.TrainerRank`).

    ``keep_full``: whether this rank keeps the full-weight copy (every rank that generates; of the Ray trainer
    ranks only rank 0, which writes the checkpoint's `model/` and broadcasts the weights). ``full_on_host``:
    keep that copy in host memory, off the device (a rank whose engine holds weights of its own, vLLM, or
    that does not generate): it is read for checkpoints and to feed the engine, never computed with.
    Under a launcher the native model is loaded sharded (`distributed.load_sharded`): no rank ever holds
    the whole model as training weights.

    The hand-off (`rollout.handoff`): `release_full` frees the copy's storage for the update and
    `gather_weights` allocates it again and gathers the new weights into it."""

    def __init__(
        self,
        cfg: Config,
        world: distributed.World,
        run_dir: Path,
        *,
        keep_full: bool = True,
        full_on_host: bool = False,
    ) -> None:
        self.cfg, self.world, self.run_dir = cfg, world, run_dir
        checkpointing = cfg.actor.activation_checkpointing
        offload = cfg.actor.offload == "optimizer+params"
        if offload and not world.distributed:
            raise UserError(
                "actor.offload=optimizer+params: needs data-parallel ranks (FSDP2 shards; in one process the "
                "engine generates from the parameters themselves); allowed here: none, optimizer"
            )
        self.full_model: torch.nn.Module | None
        self.lora = LoRASpec.of(cfg.actor.lora, cfg.trainer.seed)
        if world.distributed and cfg.model.implementation == "native":
            self.model_dir = resolve_model_path(cfg.model.path)
            self.tokenizer = load_tokenizer(self.model_dir)
            self.train_model, self.full_model = distributed.load_sharded(
                self.model_dir,
                cfg.model.dtype,
                world,
                activation_checkpointing=checkpointing,
                full_copy=keep_full,
                full_copy_device=torch.device("cpu") if full_on_host else None,
                offload_params=offload,
                lora=self.lora,
            )
        else:
            model, self.tokenizer, self.model_dir = load_policy(
                cfg.model, device=world.device if world.distributed else None
            )
            if self.lora is not None:
                self.lora.add_to(model)  # the base frozen; before the copy an engine gets
            # one module in one process (FSDP2 shards and a full copy under a launcher, for the hf model)
            self.train_model, self.full_model = distributed.parallelize(
                model, world, activation_checkpointing=checkpointing, offload_params=offload
            )
        self._released: list[tuple[torch.Size, torch.dtype]] = []
        torch.manual_seed(
            cfg.trainer.seed
        )  # after the policy: however it was loaded (or built), the same state
        self.actor = make_actor(cfg, self.train_model, world)

    @property
    def full(self) -> torch.nn.Module:
        """The full-weight copy (a rank built with ``keep_full``)."""
        if self.full_model is None:
            raise RuntimeError(f"rank {self.world.rank} keeps no full copy of the weights")
        return self.full_model

    def gather_weights(self) -> dict[str, float]:
        """The updated shards into the full-weight copy (ranks; its storage first, if `release_full` freed
        it); nothing in one process."""
        released = bool(self._released)
        if released:
            with torch.no_grad():
                for p, (shape, dtype) in zip(self.full.parameters(), self._released, strict=True):
                    p.data = torch.empty(shape, dtype=dtype, device=p.device)
            self._released = []
        # a released copy takes every weight back (with LoRA too: its frozen base went with it)
        return distributed.sync_weights(self.train_model, self.full_model, everything=released)

    def release_full(self) -> int:
        """Free the full-weight copy's storage (ranks with one; the parameter objects stay, so an engine
        that holds the module sees the weights `gather_weights` brings back); the bytes freed. Nothing in
        one process, where the copy is the trained module itself."""
        if self.full_model is None or self.full_model is self.train_model or self._released:
            return 0
        params = list(self.full_model.parameters())
        self._released = [(p.shape, p.dtype) for p in params]
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        return sum(s.numel() * d.itemsize for s, d in self._released)

    def save(self, step: int, state: dict[str, Any]) -> None:
        save_checkpoint_of(
            self.cfg, self.run_dir, step, self.actor, state, self.full_model, self.tokenizer, self.world,
            lora_base=None if self.lora is None else adapter_base(self.cfg.model.path, self.model_dir),
        )  # fmt: skip

    def restore(self) -> Checkpoint | None:
        return restore_policy(self.cfg, self.run_dir, self.actor, self.world, self.full_model)


def make_actor(cfg: Config, model: torch.nn.Module, world: distributed.World | None = None) -> Actor:
    """The policy's optimizer and update, at the sampling temperature (log-probs of what was sampled)."""
    return Actor(
        model,
        cfg.actor,
        cfg.algorithm,
        temperature=cfg.rollout.temperature,
        max_response_length=cfg.rollout.max_response_length,
        world=world,
    )


def adapter_base(path: str, model_dir: Path) -> str:
    """The base model a LoRA checkpoint names (PEFT's ``base_model_name_or_path``): a Hub id as given, else
    the checkpoint directory it was loaded from."""
    return path if is_hub_id(path) else str(Path(model_dir).resolve())


def sync_engine_weights(engine: RolloutEngine, model: torch.nn.Module) -> dict[str, float]:
    """Copy the policy's weights into an engine that keeps its own copy (vLLM); `rollout/weights_version`."""
    if not isinstance(engine, WeightSyncedEngine):
        return {}  # the native and HF engines hold the policy module itself
    engine.load_weights(merged_state_dict(model) if has_lora(model) else model.state_dict())
    return {"rollout/weights_version": float(engine.weights_version)}


def save_checkpoint_of(
    cfg: Config,
    run_dir: Path,
    step: int,
    actor: Actor,
    state: dict[str, Any],
    full_model: torch.nn.Module | None,
    tokenizer: Any,
    world: distributed.World,
    lora_base: str | None = None,
) -> None:
    """Step `step`'s checkpoint: full weights (`model/`), and with several ranks the sharded model and
    optimizer (DCP, `sharded/`) in place of `optimizer.pt`'s optimizer state. ``lora_base``: a LoRA run's base
    model (the checkpoint holds the adapters, `adapter/`)."""
    sharded: dict[str, Any] | None
    optimizer_state: dict[str, Any]
    if world.distributed:
        sharded = distributed.training_state(actor.model, actor.optimizer)
        optimizer_state = {"scheduler": actor.scheduler.state_dict()}
    else:
        sharded, optimizer_state = None, actor.state_dict()
    save_checkpoint(
        run_dir, step, full_model, tokenizer, optimizer_state, state,
        keep_last=cfg.checkpoint.keep_last, world=world, sharded=sharded, lora_base=lora_base,
    )  # fmt: skip


def restore_policy(
    cfg: Config,
    run_dir: Path,
    actor: Actor,
    world: distributed.World | None = None,
    full_model: torch.nn.Module | None = None,
) -> Checkpoint | None:
    """Restore weights, optimizer and this rank's RNG from `checkpoint.resume` (None: nothing to resume).

    With several ranks, rank 0 picks the checkpoint; each rank reads its shards of the model and optimizer
    (DCP reshards a checkpoint written by a different number of ranks) and its own RNG state.
    """
    world = world or distributed.World.single()
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None

    def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
        if (model_dir / ADAPTER_WEIGHTS).is_file():  # a LoRA run's checkpoint: the adapters
            return read_adapter_weights(model_dir, actor.model)
        loaded = load_pretrained(model_dir, dtype=cfg.model.dtype, device="cpu")
        return loaded.state_dict()

    if world.distributed:
        found: Path | None = Path(mode) if mode != "auto" else None
        error: str | None = None
        if mode == "auto" and world.is_main:
            try:
                newest = latest_checkpoint(run_dir, lambda d: sharded_checkpoint(d.parent))
            except UserError as e:  # every rank raises it (the others would wait in the broadcast)
                newest, error = None, str(e)
            found = newest[0].path if newest else None
        found, error = world.broadcast((found, error))
        if error is not None:
            raise UserError(error)
        if found is None:
            return None
        ckpt = load_checkpoint(found)
        distributed.load_training_state(actor.model, actor.optimizer, sharded_checkpoint(ckpt.path))
        actor.scheduler.load_state_dict(ckpt.optimizer["scheduler"])
        distributed.sync_weights(actor.model, full_model)  # every rank gathers, with a copy or not
    else:

        def load_single(model_dir: Path) -> dict[str, torch.Tensor]:
            check_layout(model_dir.parent, sharded=False)  # a data-parallel one holds no optimizer state here
            return load_weights(model_dir)

        if mode == "auto":
            newest = latest_checkpoint(run_dir, load_single)
            if newest is None:
                return None
            ckpt, weights = newest
        else:
            ckpt = load_checkpoint(Path(mode))
            weights = load_single(ckpt.model_dir)
        lora = has_lora(actor.model)
        if lora != (ckpt.model_dir.name == "adapter"):
            raise UserError(
                f"checkpoint {ckpt.path} was written by a run {'without' if lora else 'with'} LoRA: "
                f"resume it with actor.lora.rank {'0' if lora else 'as it was written'}"
            )
        actor.model.load_state_dict(weights, strict=not lora)  # LoRA: the adapters (all of them: checked)
        actor.load_state_dict(ckpt.optimizer)
    restore_rng(ckpt.state, world.rank)
    if world.is_main:
        print(f"resumed from {ckpt.path} (step {ckpt.state['step']})")
    return ckpt
