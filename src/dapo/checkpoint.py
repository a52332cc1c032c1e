"""Checkpoints: everything a run needs to continue exactly, written atomically.

Layout of `<run_dir>/checkpoints/step_000020/`:
- `model/`: a Hugging Face-format directory (config.json, model.safetensors, tokenizer files) that
  transformers, `dapo eval` and `dapo.models.load_pretrained` load; with LoRA (`actor.lora.rank` > 0)
  `adapter/` in its place: the adapters in PEFT's format (`adapter_config.json`,
  `adapter_model.safetensors`, naming the base model), plus the tokenizer files (the base is unchanged);
- `optimizer.pt`: the optimizer and schedule state (tensors and numbers only; loaded with
  `weights_only=True`, so loading never unpickles arbitrary objects);
- `state.json`: step counters, the collector's carried groups, keep-rate estimate and sampler position,
  the RNG state and the kernel choices (`dapo.models.kernels`) the run made;
- `sharded/` (data-parallel runs only): the sharded model and optimizer state written by every rank with
  torch.distributed.checkpoint (DCP); `optimizer.pt` then holds the schedule only. DCP reshards on load, so
  a checkpoint resumes on a different number of ranks. `state.json` holds each rank's RNG state;
- `COMPLETE`: written last, after every other file is flushed to disk (fsync). A directory is built as
  `.tmp-step_…` and renamed into place, so a crash or a power cut leaves either a complete checkpoint or a
  temporary directory that is ignored (and removed by the next save). Older checkpoints are deleted
  (`keep_last`) only once the new one is durable.
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
from safetensors import SafetensorError
from torch import nn

from dapo.distributed import World
from dapo.errors import UserError
from dapo.models import kernels

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message names it."""


class CheckpointLayoutError(CheckpointError):
    """A complete checkpoint written in another mode: by a single process and resumed by data-parallel ranks,
    or the reverse. Never skipped for an older one (that would restart the run); the message says what to
    do."""


# what reading a partial or corrupt checkpoint's files raises (a truncated safetensors file, a torn
# optimizer.pt, unparsable JSON); anything else is a bug and keeps its traceback
_READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: the directory, the trainer state, the optimizer state."""

    path: Path
    state: dict[str, Any]
    optimizer: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        """The weights: `model/`, or `adapter/` in a LoRA run's checkpoint."""
        adapter = self.path / "adapter"
        return adapter if adapter.is_dir() else self.path / "model"


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
    lora_base: str | None = None,
) -> Path:
    """Write step `step`'s checkpoint atomically, then delete all but the newest `keep_last`.

    ``model`` holds the full weights (written by rank 0; None on a rank without a copy); ``sharded``
    (data-parallel) is written by every rank with DCP. Every rank calls this; it returns when the checkpoint
    is complete on all of them. With ``lora_base`` (a LoRA run: the base model's path) the adapters go to
    `adapter/` in PEFT's format instead of the full weights to `model/`.
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
        weights = tmp / ("model" if lora_base is None else "adapter")
        if lora_base is None:
            save_pretrained(model, weights)
        else:
            from dapo.models.lora import save_adapter

            save_adapter(model, weights, lora_base)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(weights))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        state = {**state, "step": step, "rng": rngs[0], "rng_ranks": rngs, "kernels": kernels.decisions()}
        (tmp / "state.json").write_text(json.dumps(state))
        _fsync_tree(tmp)  # every file on disk before the marker that says they are
        (tmp / COMPLETE).write_text("ok\n")
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        # re-saving the same step (e.g. after a resume): the old copy is moved aside, not deleted, until
        # the new one is in place (the next save removes it if we crash in between)
        replaced = root / f".tmp-replaced-step_{step:06d}"
        if final.exists():
            final.replace(replaced)
        tmp.replace(final)
        _fsync(root)
        # only now, with the new checkpoint durable, the ones it supersedes go
        shutil.rmtree(replaced, ignore_errors=True)
        prune(run_dir, step, keep_last)
    world.barrier()
    return final


def prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints up to step `step` (the one just written). Newer ones
    are kept: a run resumed from an older checkpoint (a newer one did not load) must not delete them; the
    next save of their step replaces them."""
    steps = [p for p in list_checkpoints(run_dir) if int(p.name.removeprefix("step_")) <= step]
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def sharded_checkpoint(path: Path) -> Path:
    """The DCP directory of a data-parallel checkpoint. Raises CheckpointLayoutError when it has none (a
    single-process checkpoint), CheckpointError when it is partial."""
    sharded = path / "sharded"
    if path.name.startswith(".tmp-"):
        return sharded
    check_layout(path, sharded=True)
    if not (sharded / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path} is corrupt: {sharded}/.metadata is missing")
    return sharded


def check_layout(path: Path, *, sharded: bool) -> None:
    """Raise CheckpointLayoutError unless `path` was written in the mode that resumes it: by data-parallel
    ranks (``sharded``: it has `sharded/`) or by a single process (it has none)."""
    if sharded and not (path / "sharded").is_dir():
        raise CheckpointLayoutError(
            f"checkpoint {path} was written by a single-process run and has no sharded state: resume it "
            "without torchrun, or start a new data-parallel run from its weights with "
            f"model.path={path / 'model'}"
        )
    if not sharded and (path / "sharded").is_dir():
        raise CheckpointLayoutError(
            f"checkpoint {path} was written by a data-parallel run (its optimizer state is in sharded/): "
            "resume it with torchrun and the same or another number of ranks, or start a new run from its "
            f"weights with model.path={path / 'model'}"
        )


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
    except _READ_ERRORS as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from e
    weights = path / "model" / "model.safetensors"
    adapter = path / "adapter" / "adapter_model.safetensors"
    if (path / "adapter").is_dir():
        if not adapter.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {adapter} is missing")
    elif not weights.is_file() and not (path / "model" / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"checkpoint {path} is corrupt: {weights} is missing")
    return Checkpoint(path=path, state=state, optimizer=optimizer)


def latest_checkpoint(run_dir: Path, load_model: Any) -> tuple[Checkpoint, Any] | None:
    """The newest checkpoint that loads, with `load_model(model_dir)`'s result; None when the run has none.

    A partial or corrupt one (unreadable or truncated files) is reported by name and skipped in favour of
    the previous one. A complete one written in another mode (`CheckpointLayoutError`) is raised: skipping
    it would restart the run. So is finding checkpoints of which none loads: a fresh start in their run
    directory would overwrite its logs and, by rotation, delete them.
    """
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path)
            model = load_model(ckpt.model_dir)
        except CheckpointLayoutError:
            raise
        except (CheckpointError, *_READ_ERRORS) as e:  # unreadable: use the previous one, reported by name
            warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
            continue
        return ckpt, model
    if found:
        raise CheckpointError(
            f"no checkpoint of {run_dir} loads (each is reported above): repair one and resume it by path, "
            "or start over with checkpoint.resume=none (a new run directory beside this one)"
        )
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


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` (files first, then the directories that name them)."""
    found = sorted(path.rglob("*"))
    for p in found:
        if p.is_file():
            _fsync(p)
    for p in found:
        if p.is_dir():
            _fsync(p)
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries so a rename survives a power cut (best effort: not all
    filesystems allow it on directories)."""
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
