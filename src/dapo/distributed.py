"""Data-parallel training on torch.distributed: the ranks, FSDP2 applied in one place, global reductions,
full weights for the engines, and sharded generation and scoring.

`dapo train` in one process uses `World.single()`: every reduction is the identity and nothing here touches
torch.distributed. Under `torchrun` (SPMD, one process per rank), `init_world` joins the process group
(gloo on CPU, NCCL on CUDA, one GPU per rank) and:

- `parallelize` shards the policy with FSDP2 (`fully_shard` per decoder layer, the embedding (tied head
  included) as one group, then the root) and keeps a plain, unsharded copy for generation: an engine never
  decodes through FSDP-wrapped modules, whose hooks would all-gather every layer at every token.
  Gradients are SUMMED across ranks (divide factor 1, sum reduction on every FSDP module): the actor divides
  by one global token count per mini-batch, so the sum is exactly the single-process gradient.
- `sync_weights` streams the updated shards parameter by parameter (`full_tensor()`) into that copy.
- `ShardedEngine` generates each rank's contiguous share of a round's prompts and gathers the completions in
  prompt order; `ShardedScorer` scores each rank's share of the responses. So the collector (dynamic
  sampling), advantages and evaluation run unchanged on every rank, on identical gathered data, and decide
  the same kept set everywhere.

A share keeps the round's seed and says where it starts (`SamplingParams.first_prompt_index`), never which
rank it is: the native engine keys each row's random numbers on its prompt's index in the round, so the
samples, like greedy decoding and the update, are the same on any number of ranks (the hf and vLLM engines
seed one generator per share from where it starts: their samples depend on the world size).

Every collective has the process group's timeout (`trainer.collective_timeout_s`): a rank that dies or
hangs makes the others fail within that time with an error naming their rank, never a silent hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dapo import preempt
from dapo.rewards import ScoreBatch
from dapo.rollout.base import Completion, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from dapo.models.lora import LoRASpec

__all__ = [
    "ShardedEngine",
    "ShardedScorer",
    "World",
    "broadcast_weights",
    "gather_shares",
    "init_world",
    "launched_world_size",
    "load_training_state",
    "merge_scores",
    "parallelize",
    "shard_range",
    "shard_requests",
    "sync_weights",
    "training_state",
    "weight_group",
    "weight_sync_device",
    "weights_checksum",
]

T = TypeVar("T")


def launched_world_size() -> int | None:
    """The launcher's world size (torchrun sets WORLD_SIZE), None when not launched by one."""
    size = os.environ.get("WORLD_SIZE")
    return int(size) if size else None


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks, and the reductions the loop needs."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    """True when torch.distributed is initialised (under a launcher), even with one rank."""

    @staticmethod
    def single(device: torch.device | None = None) -> World:
        return World(device=device or torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks, in float64 (identity in one process)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu().tolist()]

    def sum_tensor(self, t: Tensor) -> Tensor:
        """``t`` summed over ranks (a new tensor on ``t``'s device; ``t`` itself in one process)."""
        if not self.distributed:
            return t
        out = t.to(self._comm_device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (picklable objects)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[no-any-return]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo CPU tensors
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_world(*, device: str = "auto", timeout_s: float = 600.0, store: Any = None) -> World:
    """Join the launcher's process group (torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, or
    ``store`` in place of MASTER_ADDR), or `World.single()` when not launched by one. CUDA ranks use NCCL
    and GPU ``LOCAL_RANK``; CPU ranks gloo, each with ``max(1, cores // local ranks)`` threads."""
    size = launched_world_size()
    if size is None:
        return World.single()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_size))
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=dev if use_cuda else None,
        **({"store": store, "rank": rank, "world_size": size} if store is not None else {}),
    )
    return World(rank, size, local_rank, local_size, dev, distributed=True)


# ----------------------------------------------------------------------------------------------------
# FSDP2: the one place where parallelism is applied to the model


def parallelize(
    model: nn.Module, world: World, *, activation_checkpointing: bool = False, offload_params: bool = False
) -> tuple[nn.Module, nn.Module]:
    """(the module to train, the module to generate with).

    One process: the same module twice (the engine shares the policy's parameters). Under a launcher: the
    policy sharded with FSDP2, and a plain deep copy of the full weights for the engine. CUDA shards keep
    float32 master weights and compute in bfloat16 with float32 gradient reduction; CPU (gloo has no bf16
    reductions) stays float32. The order is torchtitan's: activation checkpointing inside, FSDP outside (in
    the backward FSDP gathers a layer's weights, then the layer is recomputed with them).
    """
    if not world.distributed:
        if activation_checkpointing:
            checkpoint_layers(model)
        return model, model
    from dapo.models import CausalLM

    if not isinstance(model, CausalLM):
        raise ValueError(
            f"data-parallel training needs model.implementation=native (got {type(model).__name__})"
        )
    # the actor never changes the logits in place (FSDP warns that an in-place op on them would skip its
    # pre-backward hook)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    rollout_model = _plain_copy(model)
    if activation_checkpointing:  # after the copy: the engine's layers stay plain
        checkpoint_layers(model)
    if world.device.type == "cuda":
        model.float()  # master weights; the engine's copy keeps the checkpoint dtype
    mixed = rollout_model.lm_head_weight.dtype != torch.float32
    _fully_shard(model, world, mixed=mixed, offload=offload_params)
    return model, rollout_model


def _fully_shard(model: Any, world: World, *, mixed: bool, offload: bool = False) -> None:
    """FSDP2 on a `CausalLM`: each decoder layer, the embedding (+ head), the root; gradients summed. With
    ``offload`` (CUDA) the shards, their gradients and so the optimizer live in host memory (FSDP2's CPU
    offload: each layer is copied to the GPU for its all-gather, and the optimizer steps on the CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(world.device.type, (world.size,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if world.device.type == "cuda" and mixed:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if world.device.type == "cuda" and offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
        # the prefix-shared training forward calls the layers' `forward_shared`, not `forward`
        register_fsdp_forward_method(layer, "forward_shared")
    head: list[nn.Module] = [model.model.embed_tokens]
    if not model.args.tie_word_embeddings:
        head.append(model.lm_head)
    # the head reads its weight outside a module call (`_linear(h, lm_head_weight)`): keep the group
    # unsharded from the embedding's forward until the backward
    fully_shard(head, reshard_after_forward=False, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "forward_responses")
    for m in model.modules():
        if isinstance(m, FSDPModule):  # neither call is recursive
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def load_sharded(
    model_dir: Any,
    dtype: str,
    world: World,
    *,
    activation_checkpointing: bool = False,
    full_copy: bool = True,
    full_copy_device: torch.device | None = None,
    offload_params: bool = False,
    lora: LoRASpec | None = None,
) -> tuple[nn.Module, nn.Module | None]:
    """`parallelize` of a checkpoint directory without ever holding the whole model as training weights:
    the model is built on the meta device, sharded, and each rank reads only its rows of each tensor from
    the safetensors files (memory-mapped, one tensor at a time) into its shard. With ``full_copy`` the
    plain full copy an engine needs is loaded at the checkpoint's dtype (``dtype``, as `load_pretrained`),
    on ``full_copy_device`` (default the rank's device; the host for a copy no engine computes with), else
    None (a rank that never generates nor broadcasts). ``lora`` (the run's `LoRASpec`) adds adapters to
    both, drawn identically on every rank. The weights equal `parallelize`'s of `load_pretrained`'s
    model."""
    import json
    import math
    from pathlib import Path

    from dapo.models import CausalLM, ModelArgs, load_pretrained
    from dapo.models.hub import checkpoint_files, read_rows, resolve_dtype

    path = Path(model_dir)
    config = json.loads((path / "config.json").read_text())
    load_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = CausalLM(ModelArgs.from_hf_config(config))
    model.to(torch.float32 if world.device.type == "cuda" else load_dtype)  # master weights on CUDA
    if lora is not None:
        lora.add_to(model)  # meta adapters, drawn below once the shards exist
    full = None
    if full_copy:
        full = load_pretrained(path, dtype=load_dtype, device=full_copy_device or world.device)
        if lora is not None:
            lora.add_to(full)
        for p in full.parameters():
            p.requires_grad_(False)
    if activation_checkpointing:
        checkpoint_layers(model)
    _fully_shard(model, world, mixed=load_dtype != torch.float32, offload=offload_params)
    on_host = offload_params and world.device.type == "cuda"
    model.to_empty(device="cpu" if on_host else world.device)
    files = checkpoint_files(path)
    from dapo.models.lora import adapter_names, init_adapters

    adapters = set(adapter_names(model))
    missing = sorted(
        name for name, _ in model.named_parameters() if name not in files and name not in adapters
    )
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors {missing[:5]}")
    if lora is not None:
        init_adapters(model, lora.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapters:
                continue
            local = p.to_local() if hasattr(p, "to_local") else p  # this rank's rows (torch.chunk of dim 0)
            if local.shape[0] == 0:
                continue
            start = world.rank * math.ceil(p.shape[0] / world.size)
            local.copy_(read_rows(files[name], name, start, start + local.shape[0]))
    return model, full


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing per decoder layer, non-reentrant: a layer's training forward keeps only its
    inputs, and the backward recomputes the layer (same values: the recompute runs the same kernels on the
    same inputs, RNG and autocast state restored). The native model's layers are wrapped where the update
    calls them (`forward_shared`, the prefix-shared forward; generation's `forward` stays plain); a
    transformers model uses its own gradient checkpointing, which applies in training mode."""
    from torch.utils.checkpoint import checkpoint

    from dapo.models import CausalLM

    if not isinstance(model, CausalLM):
        hf: Any = getattr(model, "hf", None)
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.20
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(hf, "gradient_checkpointing_enable"):
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(f"actor.activation_checkpointing: not supported for {type(model).__name__}")
        return

    def recomputed(inner: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Any) -> Tensor:
            out: Tensor = checkpoint(inner, *args, use_reentrant=False)
            return out

        return run

    for layer in model.model.layers:  # an instance attribute: FSDP2's forward-method hooks wrap this one
        plain: Any = layer
        plain.forward_shared = recomputed(plain.forward_shared)


def _plain_copy(model: nn.Module) -> Any:
    import copy

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


@torch.no_grad()
def sync_weights(
    sharded: nn.Module, plain: nn.Module | None, *, everything: bool = False
) -> dict[str, float]:
    """Copy the full weights of ``sharded`` into ``plain``, one parameter at a time (`gathered_weights`: a
    rank without a copy, ``plain`` None, takes part and drops what it gathered; a copy in host memory takes
    each as it comes); with LoRA only the adapters (`lora.synced_names`: the frozen base is there already),
    unless ``everything``.
    `time/weight_sync_s` and `rollout/weight_sync_mb` (bytes gathered per rank); nothing when both are the
    same module."""
    from dapo.models.lora import synced_names

    if sharded is plain:
        return {}
    t0, moved = time.perf_counter(), 0
    target = dict(plain.named_parameters()) if plain is not None else {}
    for name, full in gathered_weights(sharded, None if everything else synced_names(sharded)):
        if plain is not None:
            target[name].copy_(full)
        moved += full.numel() * full.element_size()
    return {"time/weight_sync_s": time.perf_counter() - t0, "rollout/weight_sync_mb": moved / 2**20}


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The sharded model and optimizer state for torch.distributed.checkpoint (keys are parameter names, so
    a checkpoint loads on any number of ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # frozen parameters (a LoRA run's base) are the model it started from: not part of the run's state
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: Any) -> None:
    """Read this rank's shards of a `training_state` saved under ``path`` (resharded when the checkpoint
    was written by a different number of ranks)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    state = training_state(model, optimizer)
    load(state, checkpoint_id=str(path))
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())  # not in the checkpoint: not loaded
    options = StateDictOptions(ignore_frozen_params=True, strict=not frozen)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )


# ----------------------------------------------------------------------------------------------------
# Sharded generation and scoring


def shard_range(n: int, world: World, rank: int | None = None) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items: the first ``n % size`` ranks take one more."""
    r = world.rank if rank is None else rank
    q, extra = divmod(n, world.size)
    lo = r * q + min(r, extra)
    return range(lo, lo + q + (r < extra))


def shard_requests(
    n: int, parts: int, sampling: SamplingParams, seed: int
) -> list[tuple[range, SamplingParams]]:
    """Each of ``parts`` contiguous shares of a round of ``n`` prompts (`shard_range`), with its sampling
    parameters (the round's ``seed``, and where the share starts in the round): what rank (or rollout
    worker) i generates. Shares may be empty when there are more parts than prompts."""
    world = World(size=parts)
    shares = [shard_range(n, world, rank=i) for i in range(parts)]
    first = sampling.first_prompt_index
    return [(r, dataclasses.replace(sampling, seed=seed, first_prompt_index=first + r.start)) for r in shares]


def gather_shares(shares: Sequence[tuple[range, list[Completion]]]) -> list[Completion]:
    """The completions of every share, in prompt order (each share's prompt indices made global)."""
    out: list[Completion] = []
    for share, completions in sorted(shares, key=lambda s: s[0].start):
        for c in completions:
            c.prompt_index += share.start
        out += completions
    return out


def merge_scores(parts: Sequence[ScoreBatch]) -> ScoreBatch:
    """Scores of consecutive shares as one batch, in order."""
    return ScoreBatch(
        results=[r for p in parts for r in p.results],
        num_timeouts=sum(p.num_timeouts for p in parts),
        num_errors=sum(p.num_errors for p in parts),
        num_oversized=sum(p.num_oversized for p in parts),
    )


class ShardedEngine:
    """`RolloutEngine` over the ranks: each generates its share of the prompts with its own engine, and
    every rank gets all completions, ordered by prompt index.

    A stop (`dapo.preempt`) is agreed on here: a rank whose share was abandoned (`preempt.poll` inside its
    engine), or that was signalled while generating, says so in the gather, and then every rank raises
    `preempt.Abandoned` together; the ranks never part ways mid-collective."""

    def __init__(self, engine: RolloutEngine, world: World) -> None:
        self.engine = engine
        self.world = world

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        if not self.world.distributed:
            return self.engine.generate(prompts, sampling)
        seed = sampling.seed
        if seed is None:  # one draw, on rank 0, for all ranks
            seed = self.world.broadcast(int(torch.randint(2**31, ()).item()))
        share, share_sampling = shard_requests(len(prompts), self.world.size, sampling, seed)[self.world.rank]
        local: list[Completion] = []
        abandoned = False
        try:
            if len(share) > 0:
                local = self.engine.generate(prompts[share.start : share.stop], share_sampling)
        except preempt.Abandoned:
            abandoned = True
        parts = self.world.gather((abandoned or preempt.stop_due(), local))
        if any(stop for stop, _ in parts):
            raise preempt.Abandoned
        shares = [shard_range(len(prompts), self.world, rank=r) for r in range(self.world.size)]
        return gather_shares(list(zip(shares, [part for _, part in parts], strict=True)))

    def load_weights(self, state_dict: Any) -> None:
        self.engine.load_weights(state_dict)


class ShardedScorer:
    """A scorer over the ranks: each scores its contiguous share of the responses; all get all results."""

    def __init__(self, score: Callable[[Sequence[str], Sequence[str]], ScoreBatch], world: World) -> None:
        self.score = score
        self.world = world

    def __call__(self, texts: Sequence[str], truths: Sequence[str]) -> ScoreBatch:
        if not self.world.distributed:
            return self.score(texts, truths)
        share = shard_range(len(texts), self.world)
        part = (
            self.score(texts[share.start : share.stop], truths[share.start : share.stop])
            if len(share) > 0
            else ScoreBatch(results=[])
        )
        return merge_scores(self.world.gather(part))


# ----------------------------------------------------------------------------------------------------
# Weights to rollout workers (Ray mode): a gloo group of its own, trainer rank 0 and the workers


def serve_store(host: str, timeout_s: float) -> Any:
    """A TCPStore server listening on ``host`` only (the address its members reach it at, not every
    interface), on a port the kernel picks as it binds: no probe for a free port that another process may
    take before the bind. Its port is ``.port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    port = int(sock.getsockname()[1])
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(  # type: ignore[attr-defined]
        host, port, None, True, timeout, wait_for_workers=False, master_listen_fd=sock.detach()
    )


def authenticate(group: Any, rank: int, size: int, secret: bytes, device: torch.device) -> None:
    """Every member proves to every other that it holds ``secret`` (given to the members through Ray, never
    through the store, which anyone who reaches it can read): member 0 sends a fresh nonce, each member
    sends HMAC-SHA256(secret, nonce, its rank), and each checks them all. A member without the secret (a
    stranger that took a member's place in the rendezvous) fails the check on every honest member, before
    any weight is sent or taken."""
    nonce = torch.frombuffer(bytearray(secrets.token_bytes(16)), dtype=torch.uint8).to(device)
    group.broadcast(nonce, 0).wait()  # rank 0's, on every member

    def tag(of: int) -> torch.Tensor:
        mac = hmac.new(secret, bytes(nonce.cpu().tolist()) + of.to_bytes(4, "big"), hashlib.sha256).digest()
        return torch.frombuffer(bytearray(mac), dtype=torch.uint8).to(device)

    tags = [torch.empty(32, dtype=torch.uint8, device=device) for _ in range(size)]
    group.allgather([tags], [tag(rank)]).wait()
    strangers = [r for r in range(size) if not hmac.compare_digest(bytes(tags[r].cpu().tolist()),
                                                                   bytes(tag(r).cpu().tolist()))]  # fmt: skip
    if strangers:
        raise RuntimeError(f"weight group: member(s) {strangers} failed authentication; nothing was sent")


def weight_group(
    store: Any, rank: int, size: int, generation: int, timeout_s: float, device: torch.device, secret: bytes
) -> Any:
    """A group of ``size`` members outside the trainer ranks' world: member 0 is trainer rank 0 (it holds
    ``store``'s server, `serve_store`), the rollout workers follow. Every member calls this together with the
    run's ``secret`` (`authenticate`); a new ``generation`` (after a worker restarted) forms a new group on
    the same store. ``device``: the group's, from `weight_sync_device`: CUDA forms an NCCL group, the CPU a
    gloo one."""
    prefixed = dist.PrefixStore(f"dapo-weights-{generation}", store)  # type: ignore[attr-defined]
    timeout = datetime.timedelta(seconds=timeout_s)
    group: Any
    if device.type == "cuda":
        nccl: Any = getattr(dist, "ProcessGroupNCCL")  # noqa: B009 (absent from CPU builds of torch)
        options = nccl.Options()
        options._timeout = timeout
        group = nccl(prefixed, rank, size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
    authenticate(group, rank, size, secret, device)
    return group


def weight_sync_device(weights: torch.device, colocated: bool) -> torch.device:
    """The weight group's device: the weights' own GPU when every member has one to itself (NCCL), else
    the CPU (gloo; colocated members share a GPU, which NCCL refuses)."""
    return weights if weights.type == "cuda" and not colocated else torch.device("cpu")


def weight_buckets(params: Sequence[Tensor], bucket_bytes: int) -> list[range]:
    """Consecutive runs of ``params`` (indices) of one dtype and at most ``bucket_bytes`` together; a
    tensor larger than a bucket is one alone. Sender and receivers cut the same list of tensors the same
    way."""
    buckets: list[range] = []
    start, size = 0, 0
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if i > start and (size + nbytes > bucket_bytes or p.dtype != params[start].dtype):
            buckets.append(range(start, i))
            start, size = i, 0
        size += nbytes
    if params:
        buckets.append(range(start, len(params)))
    return buckets


@torch.no_grad()
def gathered_weights(sharded: nn.Module, names: set[str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """(name, the whole tensor) of each parameter of ``sharded`` (of those in ``names``, if given), one at a
    time in `named_parameters` order (each `full_tensor()` an all-gather: every rank iterates to the end
    together)."""
    for name, p in sharded.named_parameters():
        if names is None or name in names:
            yield name, p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


@torch.no_grad()
def broadcast_weights(
    group: Any,
    module: nn.Module,
    version: int,
    device: torch.device | None = None,
    *,
    bucket_bytes: int = 512 << 20,
    source: Iterable[tuple[str, Tensor]] | None = None,
    names: set[str] | None = None,
) -> tuple[int, int]:
    """Member 0 sends every parameter of ``module`` (in `named_parameters` order) and the others receive
    them in place; a header first (version, parameter count, bucket size), so a receiver with another model
    fails instead of loading garbage. The tensors travel in buckets of about ``bucket_bytes``
    (`weight_buckets`), each flattened into one buffer on ``device`` (the group's, default CPU) for one
    broadcast: the extra memory on the device is one bucket. ``source`` (member 0): the values to send, in
    parameter order, instead of ``module``'s own (the shards gathered as they are sent,
    `gathered_weights`); they are also copied into ``module``. ``names``: only these parameters (a LoRA
    run's adapters, `lora.synced_names`). Returns (version, bytes per receiver)."""
    device = device or torch.device("cpu")
    named = [(n, p) for n, p in module.named_parameters() if names is None or n in names]
    names_sent, params = zip(*named, strict=True)
    header = torch.tensor([version, len(params), bucket_bytes], dtype=torch.int64, device=device)
    group.broadcast(header, 0).wait()
    if int(header[1]) != len(params):
        raise RuntimeError(
            f"weight sync: the sender has {int(header[1])} parameters, this model {len(params)}"
        )
    values = iter(source) if source is not None else None
    sent = 0
    for bucket in weight_buckets(params, int(header[2])):
        members = [params[i] for i in bucket]
        buf = torch.empty(sum(p.numel() for p in members), dtype=members[0].dtype, device=device)
        views = buf.split([p.numel() for p in members])
        if group.rank() == 0:
            for i, view, p in zip(bucket, views, members, strict=True):
                value = p
                if values is not None:
                    name, value = next(values)
                    if name != names_sent[i]:
                        raise RuntimeError(f"weight sync: source sends {name} where {names_sent[i]} is due")
                    p.copy_(value)
                view.copy_(value.reshape(-1))
        group.broadcast(buf, 0).wait()
        if group.rank() != 0:
            for view, p in zip(views, members, strict=True):
                p.copy_(view.view_as(p))
        sent += buf.numel() * buf.element_size()
    return int(header[0]), sent


@torch.no_grad()
def weights_checksum(module: nn.Module) -> str:
    """SHA-256 of every parameter's name and bytes (`named_parameters` order): equal digests, equal
    weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
