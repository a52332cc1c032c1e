"""Score many responses in worker processes, with a wall-clock timeout per response.

Design. Each worker is a process with its own pipe; the parent hands an idle worker one item at a time
and notes its deadline (now + timeout_s). The parent then waits on all pipes at once until a reply
arrives or the earliest deadline passes. A worker still busy at its deadline is killed (SIGKILL: hung
native code may ignore gentler signals) and replaced, and only its item scores "[TIMEOUT]"; the other
workers never stop, so a hung item delays a batch by about timeout_s at most. Replacements first load
the reward function and say "ready"; only ready workers get items, so start-up never eats into an
item's deadline. A reward function that raises scores "[ERROR]" (the worker lives on); one that kills
its process scores "[ERROR]" too and the worker is replaced. Responses longer than max_response_chars
are never sent ("[OVERSIZED]"). All of these score -1.0, are counted in ScoreBatch, and never raise.

Per-item timeouts add up when many items hang (150 hung items on 2 workers at 10 s take 750 s), so a
whole call has a deadline too (``batch_timeout_s``): past it, the items in flight and those not yet sent
score "[TIMEOUT]" as well. The training run sets it below its collective timeout, so a batch of hung
verifiers never stops the run.

A worker dies with the process that started it: an idle one reads the end of its pipe and exits; one
scoring an item has a hard limit of its own (`hard_limit_s`, past the parent's kill at timeout_s), kept by
faulthandler's watchdog thread, which needs no GIL, so a trainer killed with SIGKILL leaves no worker
spinning on a hung item, even one stuck in native code. A worker ignores SIGTERM / SIGINT (the parent
decides when it stops) and is reaped by ``close()``, by the pool's finalizer, or at interpreter exit.

Workers start with "forkserver" (or "spawn" where that is missing): forking the trainer, which holds
torch threads, is unsafe. They import the reward function from its spec string, so user functions need
not be picklable, but their module must be importable from the parent's sys.path. As with any
"spawn"/"forkserver" use, a script that creates a pool needs the ``if __name__ == "__main__":`` guard.

The pool is not thread-safe: call score() from one thread at a time.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import multiprocessing as mp
import signal
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from dapo.rewards.base import RewardFn, RewardResult
from dapo.rewards.load import load_reward_fn

if TYPE_CHECKING:
    from dapo.config import RewardConfig

logger = logging.getLogger(__name__)

TIMEOUT = RewardResult(-1.0, False, "[TIMEOUT]")
ERROR = RewardResult(-1.0, False, "[ERROR]")
OVERSIZED = RewardResult(-1.0, False, "[OVERSIZED]")
STARTUP_TIMEOUT_S = 120.0
"""A worker that has not loaded the reward function after this long is a broken setup, not a slow item."""


@dataclass
class ScoreBatch:
    """The results of one RewardPool.score call, in input order, with counts of what went wrong."""

    results: list[RewardResult]
    num_timeouts: int = 0
    num_errors: int = 0
    num_oversized: int = 0

    def metrics(self) -> dict[str, float]:
        """Counts for the metrics logger."""
        return {
            "reward/verifier_timeouts": float(self.num_timeouts),
            "reward/verifier_errors": float(self.num_errors),
            "reward/verifier_oversized": float(self.num_oversized),
        }


@dataclass
class _Worker:
    """One worker process as the parent sees it."""

    process: BaseProcess
    conn: Connection
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    item: int | None = None  # index of the item being scored, None when idle
    deadline: float = math.inf


class RewardPool:
    """A reusable pool of reward workers; see the module docstring for the timeout design."""

    def __init__(
        self,
        reward_fn: str = "math_dapo",
        *,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        max_response_chars: int = 500_000,
        batch_timeout_s: float = math.inf,
    ) -> None:
        """Start ``num_workers`` processes scoring with the function named by ``reward_fn``.

        ``num_workers=0`` scores in this process: exceptions and oversized responses are still handled,
        but a hung reward function cannot be interrupted (timeout_s is not enforced).
        ``batch_timeout_s`` bounds one `score` call (see the module docstring).
        """
        # bool is an int; a True here is a mistake, not one worker.
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        if not (isinstance(batch_timeout_s, (int, float)) and batch_timeout_s > 0):
            raise ValueError(f"batch_timeout_s must be a number > 0, got {batch_timeout_s!r}")
        if (
            isinstance(max_response_chars, bool)
            or not isinstance(max_response_chars, int)
            or max_response_chars < 1
        ):
            raise ValueError(f"max_response_chars must be an int >= 1, got {max_response_chars!r}")
        # Load here too: a bad spec fails now with a clear message instead of in every worker.
        self._fn: RewardFn = load_reward_fn(reward_fn)
        self._spec = reward_fn
        self._timeout_s = float(timeout_s)
        self._batch_timeout_s = float(batch_timeout_s)
        self._max_chars = max_response_chars
        self._closed = False
        use_forkserver = "forkserver" in mp.get_all_start_methods()
        self._ctx = mp.get_context("forkserver") if use_forkserver else mp.get_context("spawn")
        self._workers: list[_Worker] = [self._start_worker(i) for i in range(num_workers)]
        # Stop the workers if the pool is dropped without close(); the list is shared, not copied.
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        self._closed = True
        self._finalizer()

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> ScoreBatch:
        """Score ``responses[i]`` against ``ground_truths[i]``; results keep the input order."""
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        for name, values in (("responses", responses), ("ground_truths", ground_truths)):
            for i, value in enumerate(values):
                # A non-str would reach the verifier and come back as an anonymous "[ERROR]".
                if not isinstance(value, str):
                    raise TypeError(f"{name}[{i}] is a {type(value).__name__}, expected str")
        batch = ScoreBatch(results=[ERROR] * len(responses))
        todo: deque[int] = deque()
        for i, response in enumerate(responses):
            if len(response) > self._max_chars:
                batch.results[i] = OVERSIZED
                batch.num_oversized += 1
            else:
                todo.append(i)
        if self._workers:
            self._score_in_workers(todo, responses, ground_truths, batch)
        else:
            self._score_in_process(todo, responses, ground_truths, batch)
        if batch.num_timeouts or batch.num_errors or batch.num_oversized:
            logger.warning(
                "reward %r: %d timeouts, %d errors, %d oversized responses of %d (all scored -1.0)",
                self._spec,
                batch.num_timeouts,
                batch.num_errors,
                batch.num_oversized,
                len(responses),
            )
        return batch

    def _score_in_process(
        self, todo: deque[int], responses: Sequence[str], ground_truths: Sequence[str], batch: ScoreBatch
    ) -> None:
        for i in todo:
            try:
                batch.results[i] = self._fn(responses[i], ground_truths[i])
            except Exception as exc:  # any failure of the verifier is a wrong answer, never a crash
                logger.debug("reward function raised on item %d: %r", i, exc)
                batch.num_errors += 1

    def _score_in_workers(
        self, todo: deque[int], responses: Sequence[str], ground_truths: Sequence[str], batch: ScoreBatch
    ) -> None:
        try:
            self._run(todo, responses, ground_truths, batch)
        finally:
            # Only after an exception (e.g. Ctrl-C) can items still be in flight; their late replies would
            # reach the next call, so those workers are replaced.
            for slot, w in enumerate(self._workers):
                if w.item is not None:
                    self._replace(slot)

    def _run(
        self, todo: deque[int], responses: Sequence[str], ground_truths: Sequence[str], batch: ScoreBatch
    ) -> None:
        """Hand items to ready workers, collect replies, and replace workers past their deadline; past the
        call's deadline, every item left scores "[TIMEOUT]"."""
        batch_deadline = time.monotonic() + self._batch_timeout_s
        while todo or any(w.item is not None for w in self._workers):
            if time.monotonic() >= batch_deadline:
                self._give_up(todo, batch)
                return
            for slot, w in enumerate(self._workers):
                if w.ready and w.item is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send((i, responses[i], ground_truths[i]))
                    except OSError:  # died while idle (e.g. killed from outside): retry the item elsewhere
                        todo.appendleft(i)
                        self._replace(slot)
                        continue
                    w.item, w.deadline = i, time.monotonic() + self._timeout_s
            deadlines = [w.deadline for w in self._workers if w.item is not None]
            # With nothing in flight we are only waiting for workers to start; wake up now and then to
            # check STARTUP_TIMEOUT_S.
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
            wait_s = min(wait_s, max(0.0, batch_deadline - time.monotonic()))
            readable = wait([w.conn for w in self._workers], timeout=wait_s)
            for slot, w in enumerate(self._workers):
                if w.conn in readable:
                    self._receive(slot, batch)
            now = time.monotonic()
            for slot, w in enumerate(self._workers):
                if w.item is not None and now >= w.deadline:
                    logger.debug("reward worker timed out on item %d; replacing it", w.item)
                    batch.results[w.item] = TIMEOUT
                    batch.num_timeouts += 1
                    self._replace(slot)
                elif not w.ready and now - w.started_at > STARTUP_TIMEOUT_S:
                    self.close()
                    raise RuntimeError(
                        f"reward worker did not load {self._spec!r} within {STARTUP_TIMEOUT_S:.0f} s"
                    )

    def _give_up(self, todo: deque[int], batch: ScoreBatch) -> None:
        """The call's deadline passed: the items in flight (their workers replaced) and those never sent
        score "[TIMEOUT]"."""
        late = [w.item for w in self._workers if w.item is not None] + list(todo)
        todo.clear()
        for slot, w in enumerate(self._workers):
            if w.item is not None:
                self._replace(slot)
        for i in late:
            batch.results[i] = TIMEOUT
        batch.num_timeouts += len(late)
        logger.warning(
            "reward %r: the batch's scoring passed its %.0f s deadline; %d responses left scored -1.0",
            self._spec, self._batch_timeout_s, len(late),
        )  # fmt: skip

    def _receive(self, slot: int, batch: ScoreBatch) -> None:
        """Handle one message from a worker: ready, a result, an error, or its death."""
        w = self._workers[slot]
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            # The process died: mid-item it is that item's fault; before ready, the setup is broken.
            if not w.ready:
                self.close()
                raise RuntimeError(f"reward worker died while loading {self._spec!r}") from None
            if w.item is not None:
                logger.debug("reward worker died on item %d; replacing it", w.item)
                batch.num_errors += 1
            self._replace(slot)
            return
        kind = message[0]
        if kind == "ready":
            w.ready = True
        elif kind == "fatal":
            self.close()
            raise RuntimeError(f"reward worker could not load {self._spec!r}: {message[1]}")
        elif kind == "ok" and message[1] == w.item:
            batch.results[message[1]] = message[2]
            w.item = None
        elif kind == "error" and message[1] == w.item:
            logger.debug("reward function raised on item %d: %s", message[1], message[2])
            batch.num_errors += 1
            w.item = None
        else:  # the protocol is ours; anything else is a bug worth stopping for
            raise RuntimeError(f"unexpected message from reward worker: {message!r} (item {w.item})")

    def _start_worker(self, slot: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._spec, hard_limit_s(self._timeout_s)),
            name=f"dapo-reward-{slot}",
            daemon=True,
        )
        process.start()
        child_conn.close()  # the child holds its own copy; closing ours lets us see EOF when it dies
        return _Worker(process, parent_conn)

    def _replace(self, slot: int) -> None:
        _stop(self._workers[slot], graceful=False)
        self._workers[slot] = self._start_worker(slot)


def make_reward_pool(cfg: RewardConfig, collective_timeout_s: float | None = None) -> RewardPool:
    """The pool the `reward` section describes: its function, workers, per-response timeout and a batch's
    deadline (`reward.batch_timeout_s`; 0: half of ``collective_timeout_s``, the longest any rank or the
    driver waits for the others, when given)."""
    batch = cfg.batch_timeout_s or (collective_timeout_s / 2 if collective_timeout_s else math.inf)
    return RewardPool(
        cfg.function, num_workers=cfg.num_workers, timeout_s=cfg.timeout_s, batch_timeout_s=batch
    )


def _stop(w: _Worker, *, graceful: bool) -> None:
    """Stop one worker: ask it to exit if ``graceful``, kill it if it does not (or at once otherwise)."""
    if graceful and w.process.is_alive():
        try:
            w.conn.send(None)
            w.process.join(timeout=1.0)
        except OSError:  # already gone
            pass
    if w.process.is_alive():
        w.process.kill()
        w.process.join(timeout=5.0)
    w.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    """Stop every worker (close() and the finalizer)."""
    for w in workers:
        _stop(w, graceful=True)
    workers.clear()


def hard_limit_s(timeout_s: float) -> float:
    """How long a worker lets itself score one item before it exits by itself: later than the parent's
    kill at ``timeout_s``, so it only acts when the parent is gone (or hung)."""
    return 1.5 * timeout_s + 5.0


def _worker_main(conn: Connection, spec: str, limit_s: float) -> None:
    """Worker loop: load the reward function, say ready, then score items until told to stop."""
    # Ctrl-C (and a cluster's SIGTERM) reach the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        fn = load_reward_fn(spec)
    except Exception as exc:
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        index, response, ground_truth = message
        reply: tuple[str, int, object]
        # past the limit, a C thread (no GIL needed) prints where the item hung and exits the process
        faulthandler.dump_traceback_later(limit_s, exit=True)
        try:
            reply = ("ok", index, fn(response, ground_truth))
        except Exception as exc:  # reported to the parent, which counts it; the worker lives on
            reply = ("error", index, f"{type(exc).__name__}: {exc}")
        finally:
            faulthandler.cancel_dump_traceback_later()
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            return
        except Exception as exc:  # the result could not be pickled: report it like any other error
            conn.send(("error", index, f"cannot send the result: {type(exc).__name__}: {exc}"))
