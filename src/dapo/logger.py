"""Run logging: `metrics.jsonl` (one JSON object per step), TensorBoard scalars, Weights & Biases (opt-in:
`logging.wandb`) and the console.

Metric names are namespaced: `reward/`, `filter/`, `rollout/`, `actor/`, `eval/`, `perf/`, `time/`.

On a terminal the console shows a progress bar with the key figures; when the output goes to a file or a
pipe (a cluster job's log), a bar would be one endless line of carriage returns, so the logger prints one
plain line every `logging.every_steps` steps instead (and at the last step).
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from dapo.config import Config, config_to_dict
from dapo.errors import UserError

# the figures shown beside the progress bar
CONSOLE_KEYS = {
    "reward/acc": "acc",
    "filter/acc_before": "acc_pre",
    "filter/kept_frac": "kept",
    "actor/entropy": "ent",
    "rollout/response_length_mean": "len",
    "perf/tokens_per_s": "tok/s",
}


@dataclass
class WandbSettings:
    """The Weights & Biases run a `RunLogger` also logs to (named after the run directory)."""

    project: str = "dapo"
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config, as plain data."""


def wandb_settings(cfg: Config) -> WandbSettings | None:
    """`logging.wandb`'s settings with the resolved config; None when it is off."""
    if not cfg.logging.wandb:
        return None
    return WandbSettings(cfg.logging.wandb_project, list(cfg.logging.wandb_tags), config_to_dict(cfg))


def start_wandb(run_dir: Path, settings: WandbSettings, start_step: int = 0) -> Any:
    """A W&B run named after the run directory. Its id is kept in the run directory (`wandb_run_id`), so a
    run resumed from a checkpoint (``start_step`` > 0) continues the same W&B run (W&B drops the steps it
    already has: those after the checkpoint that are logged again); a run starting at step 0 is a new W&B
    run. Its local files go to `WANDB_DIR` when set, else into the run directory; `WANDB_MODE=offline` keeps
    them there for `wandb sync`."""
    try:
        import wandb
    except ImportError:
        raise UserError(
            "logging.wandb=true needs the wandb package: pip install 'dapo[wandb]' (or pip install wandb), "
            "or set logging.wandb=false"
        ) from None
    id_file = run_dir / "wandb_run_id"
    resumed = start_step > 0 and id_file.is_file()
    run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=settings.project,
        name=run_dir.name,
        id=run_id,
        resume="allow",
        tags=settings.tags,
        config=settings.config,
        dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
    )


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class RunLogger:
    """Writes each step's metrics to the run directory and shows progress.

    `progress`: show it at all; `interactive` (default: stdout and stderr are terminals) chooses the bar
    over plain lines every `every_steps` steps, written to `stream` (default stdout). `wandb`: also log
    to Weights & Biases (`start_wandb`).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        progress: bool,
        every_steps: int = 10,
        interactive: bool | None = None,
        stream: TextIO | None = None,
        wandb: WandbSettings | None = None,
        eval_pending: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step, eval_pending)
        self.writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.wandb_run: Any = start_wandb(run_dir, wandb, start_step) if wandb is not None else None
        self.stream = stream
        if interactive is None:
            interactive = is_terminal(sys.stdout) and is_terminal(sys.stderr)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (progress and interactive),
            unit="step",
            dynamic_ncols=True,
        )
        plain = progress and not interactive
        self.lines = _PlainProgress(total_steps, start_step, every_steps) if plain else None

    def _truncate_after(self, step: int, eval_pending: bool = False) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be logged again), and with
        ``eval_pending`` (a stop skipped the checkpoint's evaluation; it runs now) that step's evaluation
        lines; starting at step 0 (no checkpoint: a run stopped before its first step ended), drop them
        all. A line that is not a JSON object (torn by a full disk or a power cut mid-append) is dropped
        with a warning. The file is rewritten beside itself and renamed over the old one, so a crash now
        leaves one or the other."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines() if step > 0 else []
        keep = []
        for i, ln in enumerate(lines, start=1):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except (ValueError, RecursionError):
                row = None
            if not isinstance(row, dict):
                warnings.warn(f"{self.path}: line {i} is not JSON (a torn write); skipped", stacklevel=3)
                continue
            at = row.get("step", 0)
            if at < step or (at == step and not (eval_pending and "time/eval_s" in row)):
                keep.append(ln)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as f:
            f.write("".join(ln + "\n" for ln in keep))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        clean = {k: float(v) for k, v in sorted(metrics.items()) if math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)
        shown = {short: f"{clean[k]:.3g}" for k, short in CONSOLE_KEYS.items() if k in clean}
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        if advance:
            self.bar.update(1)
            if self.lines is not None and self.lines.due(step):
                self.message(self.lines.line(step, shown))

    def message(self, text: str) -> None:
        """A line printed above the progress bar (or among the plain progress lines)."""
        self.bar.write(text, file=self.stream)
        if self.lines is not None:
            (self.stream or sys.stdout).flush()  # a log file shows each line as it happens

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class NullLogger:
    """`RunLogger`'s interface, writing nothing (data-parallel ranks other than 0)."""

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _PlainProgress:
    """One line of progress every `every` steps and at the last: step, the key figures, rate, ETA."""

    def __init__(self, total_steps: int, start_step: int, every: int) -> None:
        self.total, self.every = total_steps, max(every, 1)
        self.t0, self.step0 = time.perf_counter(), start_step

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def line(self, step: int, shown: dict[str, str]) -> str:
        per_step = (time.perf_counter() - self.t0) / max(step - self.step0, 1)
        figures = "  ".join(f"{k}={v}" for k, v in shown.items())
        eta = _duration(per_step * (self.total - step))
        return f"step {step}/{self.total}  {figures}  {per_step:.2f} s/step, {eta} left"


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m{s:02d}s" if hours else f"{m}m{s:02d}s"


_run_peak_mb = 0.0
"""The process's peak before the last `PhasePeaks` reset of the kernel's high-water mark."""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (0 where the platform does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return max(_run_peak_mb, peak / 2**20 if sys.platform == "darwin" else peak / 2**10)


class PhasePeaks:
    """The peak memory of each phase of a step, as ``perf/peak_mem_gib_<phase>``: on CUDA the caching
    allocator's peak on the device, on CPU the process's peak resident set (Linux: VmHWM, whose high-water
    mark is reset at each phase's start through /proc/self/clear_refs; `peak_rss_mb` keeps the run's peak
    across the resets). ``device`` None: nothing is measured (the phases run on other processes)."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        self.cpu_ok = device is not None and device.type == "cpu" and Path("/proc/self/clear_refs").exists()

    @contextmanager
    def phase(self, name: str, metrics: dict[str, float]) -> Iterator[None]:
        """Measure the block's peak into ``metrics``."""
        global _run_peak_mb
        if self.device is None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            metrics[f"perf/peak_mem_gib_{name}"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            return
        if not self.cpu_ok:
            yield
            return
        _run_peak_mb = peak_rss_mb()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not permitted here: no per-phase figure
            self.cpu_ok = False
            yield
            return
        yield
        metrics[f"perf/peak_mem_gib_{name}"] = _vm_hwm_kib() / 2**20


def _vm_hwm_kib() -> float:
    """The process's peak resident set since the last reset (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return 0.0


def environment_info() -> dict[str, Any]:
    """What the run ran on (written to `env.json` in the run directory)."""
    import transformers

    from dapo import __version__
    from dapo.models import kernels

    return {
        "dapo": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu": kernels.cpu_info(),
        "kernels": kernels.describe(),  # the mode and cache file; the first step's choices are logged
        "argv": sys.argv,
    }
