"""What the loop needs of where it runs: the `Backend` protocol and the `PolicyUpdater` it hands out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from dapo.collect import Scorer
from dapo.logger import PhasePeaks
from dapo.rollout.base import RolloutEngine
from dapo.train import TrainBatch


class PolicyUpdater(Protocol):
    """What the loop needs of the trainer: `Actor.update` (an `Actor`, or the Ray trainer group)."""

    def update(self, batch: TrainBatch) -> dict[str, float]: ...


class Backend(Protocol):
    """The parts the loop drives: built in this process (`dapo.backends.local`) or on a Ray cluster
    (`dapo.backends.ray`)."""

    tokenizer: Any
    model_dir: Path
    layout: str
    """How the parts are laid out, for the run's first line (", 2 data-parallel ranks")."""
    peaks: PhasePeaks
    """The peak memory of generation and update, where they run in this process."""

    @property
    def engine(self) -> RolloutEngine: ...

    @property
    def score(self) -> Scorer: ...

    @property
    def actor(self) -> PolicyUpdater: ...

    def sync_weights(self) -> dict[str, float]:
        """After an update: the new weights to every engine; `time/weight_sync_s` and friends."""
        ...

    def step_metrics(self) -> dict[str, float]:
        """The step's figures of the layout itself (Ray: worker restarts, remote timeouts)."""
        ...

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write step `step`'s checkpoint with the driver's `state` (collector, history)."""
        ...

    def restore(self) -> dict[str, Any] | None:
        """Restore the policy from `checkpoint.resume` and sync the engines; the checkpoint's state."""
        ...

    def close(self) -> None: ...
