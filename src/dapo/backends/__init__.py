"""Backends: where a step's parts (generation, scoring, the policy update, weight sync, checkpoints) run.

The loop (`dapo.trainer`) talks only to the `Backend` protocol (`base`). `local`: this process, or each
rank torchrun started; `ray`: the single controller of a Ray cluster, with the actors of `dapo.cluster`.
Both hold the policy the same way (`policy`). `make_backend`, the one place that names them, sits above
both, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from dapo import distributed
from dapo.backends.base import Backend, PolicyUpdater
from dapo.config import Config

__all__ = ["Backend", "PolicyUpdater", "make_backend"]


def make_backend(cfg: Config, world: distributed.World, run_dir: Path) -> Backend:
    """The backend `trainer.backend` names."""
    if cfg.trainer.backend == "ray":
        from dapo.backends.ray import RayBackend  # Ray is an optional extra: imported only in this mode

        return RayBackend(cfg, run_dir)
    from dapo.backends.local import LocalBackend

    return LocalBackend(cfg, world, run_dir)
