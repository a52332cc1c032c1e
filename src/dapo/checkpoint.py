"""Checkpoints: everything a run needs to continue exactly, written atomically.

Layout of `<run_dir>/checkpoints/step_000020/`:
- `model/`: a Hugging Face-format directory (config.json, model.safetensors, tokenizer files) that
  transformers, `dapo eval` and `dapo.models.load_pretrained` load;
- `optimizer.pt`: the optimizer and schedule state (tensors and numbers only; loaded with
  `weights_only=True`, so loading never unpickles arbitrary objects);
- `state.json`: step counters, the collector's carried groups, keep-rate estimate and sampler position,
  the RNG state and the kernel choices (`dapo.models.kernels`) the run made;
- `sharded/` (data-parallel runs only): the sharded model and optimizer state written by every rank with
  torch.distributed.checkpoint (DCP); `optimizer.pt` then holds the schedule only. DCP reshards on load, so
  a checkpoint resumes on a different number of ranks. `state.json` holds each rank's RNG state;
- `COMPLETE`: written last. A directory is built as `.tmp-step_…` and renamed into place, so a crash
  leaves either a complete checkpoint or a temporary directory that is ignored (and removed by the next
  save).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapo.distributed import World
from dapo.errors import UserError
from dapo.models import kernels

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message names it."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: the directory, the trainer state, the optimizer state."""

    path: Path
    state: dict[str, Any]
    optimizer: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module | None,
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    *,
    keep_last: int,
    world: World | None = None,
    sharded: dict[str, Any] | None = None,
) -> Path:
    """Write step `step`'s checkpoint atomically, then delete all but the newest `keep_last`.

    ``model`` holds the full weights (written by rank 0; None on a rank without a copy); ``sharded``
    (data-parallel) is written by every rank with DCP. Every rank calls this; it returns when the checkpoint
    is complete on all of them.
    """
    from dapo.models import save_pretrained

    world = world or World.single()
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    if sharded is not None:
        from torch.distributed.checkpoint.state_dict_saver import save

        save(sharded, checkpoint_id=str(sharded_checkpoint(tmp)))
    rngs = world.gather(_rng_state())
    if world.is_main:
        if model is None:
            raise ValueError("rank 0 writes the full weights: it needs a model")
        save_pretrained(model, tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "model"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        state = {**state, "step": step, "rng": rngs[0], "rng_ranks": rngs, "kernels": kernels.decisions()}
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        tmp.replace(final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def sharded_checkpoint(path: Path) -> Path:
    """The DCP directory of a data-parallel checkpoint; raises CheckpointError when it has none."""
    sharded = path / "sharded"
    if path.name.startswith(".tmp-"):
        return sharded
    if not (sharded / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {path} has no sharded state ({sharded}/.metadata): it was written by a single-"
            "process run; start a data-parallel run from its weights with model.path=" + str(path / "model")
        )
    return sharded


def check_complete(path: Path) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint directory (reads no weights)."""
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path}: no such directory; allowed: a checkpoint directory "
            "(<run directory>/checkpoints/step_NNNNNN) or 'auto'"
        )
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is partial (no {COMPLETE} marker)")


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint directory; raises CheckpointError naming what is missing or unreadable."""
    check_complete(path)
    try:
        state = json.loads((path / "state.json").read_text())
        optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from e
    weights = path / "model" / "model.safetensors"
    if not weights.is_file() and not (path / "model" / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"checkpoint {path} is corrupt: {weights} is missing")
    return Checkpoint(path=path, state=state, optimizer=optimizer)


def latest_checkpoint(run_dir: Path, load_model: Any) -> tuple[Checkpoint, Any] | None:
    """The newest checkpoint that loads, with `load_model(model_dir)`'s result; corrupt ones are reported by
    name and skipped in favour of the previous one. None when there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = load_checkpoint(path)
            model = load_model(ckpt.model_dir)
        except Exception as e:  # any failure to read means "use the previous one", reported by name
            warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
            continue
        return ckpt, model
    return None


def restore_rng(state: dict[str, Any], rank: int = 0) -> None:
    """Restore the torch RNG state saved with a checkpoint (rank ``rank``'s, when it was saved by as many
    ranks; else rank 0's) and adopt its kernel choices."""
    kernels.adopt(state.get("kernels", {}))
    ranks = state.get("rng_ranks") or []
    rng = ranks[rank] if rank < len(ranks) else state.get("rng")
    if rng is not None:
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist()}


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a power cut (best effort: not all filesystems allow
    it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
