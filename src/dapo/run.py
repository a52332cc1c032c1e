"""What a run settles before its first step: the run directory, the precision ``actor.precision=auto``
decides on this machine, and the launched world checked against the config."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from dapo import distributed
from dapo.checkpoint import list_checkpoints
from dapo.config import Config, ConfigError, Precision, dump_config
from dapo.logger import environment_info
from dapo.models import kernels
from dapo.plan import model_shape
from dapo.runtime import resolve_device


def make_run_dir(cfg: Config, world: distributed.World | None = None) -> Path:
    """The run directory, holding the resolved config.yaml and env.json.

    `<output_dir>/<run_name>`; a fresh run never writes into a directory that already holds checkpoints
    (nothing saved is lost): it takes `<run_name>-2`, `-3`, …; `checkpoint.resume=auto` continues the newest
    of them. With several ranks, rank 0 chooses and creates it (on a filesystem all ranks share).
    """
    world = world or distributed.World.single()
    run_dir = _choose_run_dir(cfg) if world.is_main else None
    return Path(world.broadcast(str(run_dir)))


def decide_precision(cfg: Config, world: distributed.World, run_dir: Path) -> None:
    """`actor.precision=auto` decided once, by rank 0 (`resolve_precision`; a resumed run
    adopts its checkpoint's kernel choices first), for every rank and actor; config.yaml then records it."""
    if cfg.actor.precision != "auto":
        return
    chosen: Precision = cfg.actor.precision
    if world.is_main:
        mode = cfg.checkpoint.resume
        found = list_checkpoints(run_dir)[-1:] if mode == "auto" else [] if mode == "none" else [Path(mode)]
        saved: dict[str, str] = {}
        for path in found:
            with contextlib.suppress(OSError, ValueError):
                saved = dict(json.loads((path / "state.json").read_text()).get("kernels", {}))
        chosen = resolve_precision(cfg, saved)
        print(f"actor.precision=auto: {chosen} on this machine ({kernels.describe()})")
    cfg.actor.precision = world.broadcast(chosen)
    if world.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))


def _choose_run_dir(cfg: Config) -> Path:
    name = cfg.trainer.run_name or "run"
    root = Path(cfg.trainer.output_dir)
    candidates = [root / name] + [root / f"{name}-{i}" for i in range(2, 10_000)]
    existing = [p for p in candidates[: 1 + len(list(root.glob(f"{name}-*")))] if p.is_dir()]
    if cfg.checkpoint.resume == "auto" and existing:
        run_dir = existing[-1]
    else:
        run_dir = next(p for p in candidates if not list_checkpoints(p))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "env.json").write_text(json.dumps(environment_info(), indent=2))
    return run_dir


def check_world_size(cfg: Config, world: distributed.World) -> None:
    """`trainer.world_size`, when set, must be what the launcher started; vLLM engines on data-parallel ranks
    are one per rank (no tensor parallelism across ranks)."""
    tp = cfg.rollout.vllm.tensor_parallel_size
    if world.distributed and cfg.rollout.engine == "vllm" and tp > 1:
        raise ConfigError(
            f"rollout.vllm.tensor_parallel_size: invalid value {tp} with {world.size} torchrun ranks; "
            "allowed: 1 (each data-parallel rank runs its own vLLM engine on its own device)"
        )
    want = cfg.trainer.world_size
    if want and want != world.size:
        how = f"torchrun started {world.size}" if world.distributed else "not launched by torchrun"
        raise ConfigError(
            f"trainer.world_size: invalid value {want}; allowed: the launched world size ({how}); start "
            f"{want} ranks with `torchrun --nproc-per-node {want} -m dapo train ...` or set it to 0"
        )


def resolve_precision(cfg: Config, saved_kernels: dict[str, str] | None = None) -> Precision:
    """`actor.precision` with ``auto`` decided: ``bf16-mixed`` where it can run (a float32 model on CPU, the
    native engine) and this machine's timing of the model's MLP says it is faster (`dapo.models.kernels`,
    the ``precision`` choice, cached per machine), else ``model``. ``saved_kernels``: a checkpoint's kernel
    choices, adopted first, so a resumed run keeps the precision it started with. Off CPU: ``model``."""
    if cfg.actor.precision != "auto":
        return cfg.actor.precision
    args, _ = model_shape(cfg.model.path)
    mixable = cfg.model.dtype == "float32" and cfg.rollout.engine == "native"
    if args is None or not mixable or resolve_device(cfg.model.device).type != "cpu":
        return "model"
    kernels.adopt(saved_kernels or {})
    return "bf16-mixed" if kernels.mixed_precision_wins(args.hidden_size, args.intermediate_size) else "model"
