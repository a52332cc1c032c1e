"""Preemption: SIGTERM / SIGINT finish (or abandon) the step, checkpoint and exit 143 / 130; a second signal
exits at once; SIGKILL at random moments; every resume continues bit-identically to an uninterrupted run.

The end-to-end tests (slow) run the tiny default model on a short config, each run in its own process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapo.checkpoint import list_checkpoints, load_checkpoint
from dapo.preempt import Abandoned, Stopped, StopSignal, poll, polled, stop_due
from tests.test_e2e import SHORT as E2E_SHORT
from tests.test_e2e import dapo_train

REPO = Path(__file__).resolve().parents[1]

# test_e2e's short run, made 6 steps; checkpoints every 2 steps, evaluations at steps 2 and 4 (the kill
# test checkpoints every step); progress as plain lines (the output is a pipe)
SHORT = [
    *E2E_SHORT,
    "trainer.total_steps=6",
    "evaluation.every_steps=2",
    "checkpoint.keep_last=10",
    "logging.progress_bar=true",
    "logging.every_steps=1",
]


# ------------------------------------------------------------------------------------------- the mechanism


def test_a_signal_is_recorded_and_the_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal()
    with stop.installed():
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGTERM
        err = stop.stopped("checkpoint of step 3")
    assert signal.getsignal(signal.SIGTERM) is before
    assert isinstance(err, Stopped) and err.exit_status == 143
    assert str(err) == "dapo: stopped by SIGTERM: checkpoint of step 3"
    assert Stopped(signal.SIGINT, "").exit_status == 130


def busy_then_signal(signum: int) -> Callable[[], str]:
    def work() -> str:
        os.kill(os.getpid(), signum)
        total = 0
        for i in range(100_000):  # the handler runs at the first check inside this loop
            total += i
        return "finished"

    return work


def test_abandonable_work_is_abandoned_on_a_signal_and_finished_otherwise() -> None:
    stop = StopSignal()
    with stop.installed():
        assert stop.abandonable(lambda: "done") == "done"
        assert stop.abandonable(busy_then_signal(signal.SIGINT)) is None
        assert stop.signum == signal.SIGINT
        called = []
        assert stop.abandonable(lambda: called.append(1)) is None  # already stopping: not even started
        assert not called
    keep = StopSignal(abandon=False)  # (several ranks: stop only where all ranks agree)
    with keep.installed():
        assert keep.abandonable(busy_then_signal(signal.SIGTERM)) == "finished"
        assert keep.requested()


def test_polled_work_is_abandoned_where_it_asks() -> None:
    """Several ranks, or a thread: no exception from the handler, `poll` raises at the work's own points."""
    stop = StopSignal(abandon=False)
    asked: list[int] = []

    def work() -> str:
        for i in range(3):
            asked.append(i)
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            poll()
        return "finished"

    with stop.installed():
        assert not stop_due()
        assert stop.abandonable(work) is None
    assert asked == [0, 1] and stop.requested()
    poll()  # outside abandonable work: nothing
    flag = threading.Event()
    with polled(flag.is_set):
        poll()
        flag.set()
        assert stop_due()
        with pytest.raises(Abandoned):
            poll()


def test_a_signal_sent_twice_at_once_is_one_stop() -> None:
    """torchrun forwards the SIGTERM Slurm also sent to every process: the copy is not "exit now"."""
    stop = StopSignal()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()


def test_a_second_signal_exits_at_once() -> None:
    script = (
        "import os, signal, time\n"
        "from dapo.preempt import StopSignal\n"
        "stop = StopSignal()\n"
        "with stop.installed():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('first', stop.requested(), flush=True)\n"
        "    time.sleep(1.2)  # later than a duplicate of the first\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "    print('not reached')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGTERM, run.stderr
    assert run.stdout == "first True\n"
    assert "second signal (SIGTERM): exiting now" in run.stderr


# ------------------------------------------------------------------------------------------- end to end


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = list_checkpoints(run_dir)[-1]
    assert newest.name == "step_000006", newest
    return load_file(str(newest / "model" / "model.safetensors"))


def training_lines(run_dir: Path) -> dict[int, dict[str, float]]:
    """Each step's training metrics (timings and memory left out: they differ between any two runs)."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r]
    assert len({r["step"] for r in steps}) == len(steps), "a step was logged twice"
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in steps}


def eval_lines(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("eval/") and "@" in k} | {"step": r["step"]}
            for r in rows if "time/eval_s" in r]  # fmt: skip


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].equal(wb[name]), name
    assert training_lines(a) == training_lines(b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    from dapo.models.tiny import ensure_tiny_model

    ensure_tiny_model(progress=False)
    out = tmp_path_factory.mktemp("runs")
    run = dapo_train([*SHORT, f"trainer.output_dir={out}", "trainer.run_name=straight"])
    assert run.returncode == 0, run.stderr[-3000:]
    # not a terminal: plain progress lines, no carriage-return stream
    assert "\r" not in run.stdout + run.stderr
    progress = [ln for ln in run.stdout.splitlines() if ln.startswith("step ") and "/6 " in ln]
    assert [ln.split()[1] for ln in progress] == [f"{i}/6" for i in range(1, 7)], run.stdout
    assert " s/step, " in progress[0] and " left" in progress[0]
    return out / "straight"


def watch_for_checkpoint_write(ckpt_root: Path, proc: subprocess.Popen[str], signum: int) -> threading.Thread:
    """Send `signum` to `proc` as soon as a checkpoint is being written (its temporary directory exists)."""

    def watch() -> None:
        while proc.poll() is None:
            if ckpt_root.is_dir() and any(p.name.startswith(".tmp-") for p in ckpt_root.iterdir()):
                proc.send_signal(signum)
                return
            time.sleep(0.0005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigterm_and_sigint_at_each_phase_then_resume_is_bit_identical(
    straight: Path, tmp_path: Path
) -> None:
    """One run stopped five times (during generation, the update, an evaluation, a checkpoint write, and by
    a second signal during a write), each time resumed: the weights and step metrics of `straight`."""
    common = [*SHORT, f"trainer.output_dir={tmp_path}", "trainer.run_name=stopped"]
    run_dir = tmp_path / "stopped"

    def stopped_at(where: str, status: int, resume: bool = True) -> subprocess.CompletedProcess[str]:
        run = dapo_train([*common, *(["--resume", "auto"] if resume else [])], {"DAPO_SIGNAL_AT": where})
        assert run.returncode == status, (where, run.returncode, run.stderr[-3000:])
        return run

    def newest() -> str:
        return list_checkpoints(run_dir)[-1].name

    # generating step 2: the step is abandoned, step 1 (not a periodic checkpoint) is saved
    run = stopped_at("generate:2", 143, resume=False)
    assert "dapo: SIGTERM: abandoning this step" in run.stderr
    assert "dapo: stopped by SIGTERM: step 2 abandoned; checkpoint of step 1 in " in run.stderr
    assert newest() == "step_000001"
    # the update of step 3 has started: it finishes, step 3 is saved; SIGINT exits 130
    run = stopped_at("update:3:INT", 130)
    assert "dapo: SIGINT: finishing this step" in run.stderr and newest() == "step_000003"
    # during the evaluation at step 4: it is abandoned, the step-4 checkpoint says so, and the resumed run
    # evaluates step 4 first (logged once, however many times it is resumed)
    run = stopped_at("eval:4", 143)
    assert "abandoning this step" in run.stderr
    assert newest() == "step_000004"
    assert [e["step"] for e in eval_lines(run_dir)] == [0, 2]
    # a first signal in the update of step 5, a second one while step 5's checkpoint is being written:
    # the process dies at once, step 4's checkpoint is intact (the write follows the first signal within
    # the second that counts a repeat as the same stop, so that window is closed in this process)
    no_window = (
        "import sys, dapo.preempt; dapo.preempt.SECOND_SIGNAL_AFTER_S = 0.0; from dapo.cli import main; "
        "sys.exit(main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", no_window, "train", *common, "--resume", "auto"],
        env={**os.environ, "DAPO_SIGNAL_AT": "update:5"}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watch_for_checkpoint_write(run_dir / "checkpoints", proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGTERM, err[-3000:]
    assert "second signal (SIGTERM): exiting now" in err
    assert load_checkpoint(run_dir / "checkpoints" / "step_000004").state["step"] == 4
    # a signal as the last step's checkpoint write begins: the write completes, the run stops
    stopped_at("checkpoint:6", 143)
    assert newest() == "step_000006"
    # the final resume has only the last evaluation left
    run = dapo_train([*common, "--resume", "auto"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(straight, run_dir)
    assert eval_lines(run_dir) == eval_lines(straight)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(straight: Path, tmp_path: Path) -> None:
    """SIGKILL at random wall-clock moments of the training loop (generation, update, checkpoint writes:
    every step is checkpointed) and once certainly inside a checkpoint write; each time resumed."""
    common = [*SHORT, "checkpoint.every_steps=1", f"trainer.output_dir={tmp_path}", "trainer.run_name=killed"]
    run_dir = tmp_path / "killed"
    rng = random.Random()
    delays: list[float] = []
    for attempt in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "dapo.cli", "train", *common, *(["--resume", "auto"] if attempt else [])],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        if attempt == 3:  # inside a checkpoint write for sure
            watch_for_checkpoint_write(run_dir / "checkpoints", proc, signal.SIGKILL)
        else:
            for line in proc.stdout:  # the loop has started once the first step is reported
                if line.startswith("step "):
                    break
            delays.append(rng.uniform(0.0, 1.5))
            time.sleep(delays[-1])
            proc.kill()
        proc.communicate(timeout=600)
        assert proc.returncode in (-signal.SIGKILL, 0), (attempt, delays, proc.returncode)
    run = dapo_train([*common, "--resume", "auto"])
    assert run.returncode == 0, (delays, run.stderr[-3000:])
    assert_same_run(straight, run_dir)
