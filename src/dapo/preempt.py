"""Preemption: SIGTERM or SIGINT stop a training run cleanly, with a checkpoint to resume from.

Clusters preempt with SIGTERM and, after a grace period, SIGKILL (Slurm, Kubernetes); Ctrl-C sends SIGINT.
While `StopSignal.installed()` is active, the first such signal is only recorded, and the loop acts on it at
its safe points:

- a signal while the step's batch is being generated (`StopSignal.abandonable`) abandons the step: nothing
  of it is kept, the checkpoint holds the state before it (the update had not started, so the weights are
  those of the previous step); a batch being collected ahead (`trainer.async_rollout_steps=1`) is
  abandoned the same way;
- a signal during the update, logging or a checkpoint write lets the step finish; its checkpoint is then
  written (unless it just was);
- a periodic evaluation that is due, or running, when the signal comes is skipped: the checkpoint says so,
  and the resumed run evaluates first;
- then training raises `Stopped`; `dapo train` prints its message and exits with 128 + the signal number
  (143 for SIGTERM, 130 for SIGINT). `dapo train --resume auto` continues exactly where it stopped.

A second signal exits at once (the process dies of it): checkpoints are written to a temporary directory
and renamed when complete, so the previous complete checkpoint is intact.

The loop asks `StopSignal.requested()` at its safe points; with several ranks that decision must be the
same on every rank (a collective). Raising from the signal handler wherever the main thread is only suits
one process (`StopSignal(abandon=False)` turns it off); work that can be abandoned on several ranks, or in
a thread, asks `poll()` at its own points instead: the native engine at every decode step, the Ray driver
while it waits on its actors, and `dapo.distributed.ShardedEngine` makes the ranks agree (a rank whose share
was abandoned tells the others in the gather that follows it, and all abandon together).

Torchrun forwards SIGTERM to every rank and kills them `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds later (30 by
default); Slurm may signal every process as well, so a second signal within `SECOND_SIGNAL_AFTER_S` of the
first is the same stop, not "exit now".
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT)

SECOND_SIGNAL_AFTER_S = 1.0
"""A signal within this many seconds of the first is the same stop (a launcher forwarding what the cluster
sent every process too); a later one exits at once."""

_local = threading.local()
"""`poll`'s question for the current thread (`should_stop`), set by `StopSignal.abandonable` or `polled`."""


class Stopped(Exception):  # noqa: N818 (a requested stop, not an error)
    """Training stopped on a signal (after writing its checkpoint, if there was anything to save)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + self.signum


class Abandoned(BaseException):
    """Work given up on a stop: raised from the signal handler inside `StopSignal.abandonable`, or by `poll`
    (a BaseException, so no `except Exception` in between swallows it)."""


def poll() -> None:
    """Raise `Abandoned` when the work running in this thread is to be given up (a stop was requested
    inside `StopSignal.abandonable`, or the `polled` condition holds); nothing otherwise."""
    should_stop = getattr(_local, "should_stop", None)
    if should_stop is not None and should_stop():
        raise Abandoned


def stop_due() -> bool:
    """Whether `poll` would raise now (a rank reports this to the others before they agree)."""
    should_stop = getattr(_local, "should_stop", None)
    return should_stop is not None and bool(should_stop())


@contextlib.contextmanager
def polled(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Inside the block, `poll` in this thread raises `Abandoned` once ``should_stop()`` is true."""
    previous = getattr(_local, "should_stop", None)
    _local.should_stop = should_stop
    try:
        yield
    finally:
        _local.should_stop = previous


class StopSignal:
    """Records SIGTERM / SIGINT for the training loop; see the module docstring."""

    def __init__(self, *, abandon: bool = True) -> None:
        self.abandon = abandon
        self.signum: int | None = None
        self._first_at = 0.0
        self._abandonable = False
        self._previous: dict[int, object] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Handle the signals inside the block (main thread only); the previous handlers come back after."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]

    def requested(self) -> bool:
        """Whether a stop was requested: the loop's safe points ask this."""
        return self.signum is not None

    def abandonable(self, fn: Callable[[], T]) -> T | None:
        """`fn()`, or None when a stop is requested before or while it runs (it is then abandoned)."""
        if self.requested():
            return None
        self._abandonable = self.abandon
        try:
            with polled(self.requested):
                return fn()
        except Abandoned:
            return None
        finally:
            # no call or backward jump before this store: CPython runs no signal handler in between
            self._abandonable = False

    def stopped(self, message: str) -> Stopped:
        """The exception that ends training after a stop (call when `requested()`)."""
        assert self.signum is not None
        return Stopped(self.signum, f"dapo: stopped by {signal.Signals(self.signum).name}: {message}")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self._first_at < SECOND_SIGNAL_AFTER_S:  # the same stop, sent twice
                return
            # the second signal: exit at once, as its default action does
            _say(f"dapo: second signal ({name}): exiting now; the newest complete checkpoint is kept\n")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first_at = signum, time.monotonic()
        polled_here = getattr(_local, "should_stop", None) is not None  # given up at its next `poll`
        if self._abandonable or polled_here:
            _say(
                f"dapo: {name}: abandoning this step, then saving a checkpoint (a second signal exits now)\n"
            )
        if self._abandonable:
            self._abandonable = False
            raise Abandoned
        if polled_here:
            return
        _say(f"dapo: {name}: finishing this step, then saving a checkpoint (a second one exits now)\n")


def _say(text: str) -> None:
    """Write from a signal handler: unbuffered (the interrupted code may be inside a buffered write)."""
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), text.encode())


def fault_point(phase: str, step: int) -> None:
    """Fault injection for the preemption tests: `DAPO_SIGNAL_AT=PHASE:STEP[:SIGNAL[:RANK]]` (several
    separated by commas; SIGNAL a name such as TERM, INT or KILL, default TERM) sends that signal to this
    process when the loop reaches PHASE ("generate", "update", "eval" or "checkpoint") of step STEP; with
    RANK, only on that data-parallel rank (torchrun's RANK)."""
    for spec in os.environ.get("DAPO_SIGNAL_AT", "").split(","):
        parts = spec.split(":")
        if len(parts) > 3 and parts[3] != os.environ.get("RANK", "0"):
            continue
        if len(parts) >= 2 and parts[0] == phase and parts[1] == str(step):
            name = parts[2] if len(parts) > 2 else "TERM"
            os.kill(os.getpid(), signal.Signals[f"SIG{name}"])


def stop_message(run_dir: Path, saved_step: int, abandoned_step: int | None) -> str:
    """What `Stopped` says: what was kept and how to continue."""
    what = f"step {abandoned_step} abandoned; " if abandoned_step is not None else ""
    if saved_step == 0:
        return f"{what}nothing to save yet (no step finished); run again to start over"
    return (
        f"{what}checkpoint of step {saved_step} in {run_dir / 'checkpoints'}; "
        "continue with: dapo train ... --resume auto"
    )
