"""Run logging: `metrics.jsonl` (one JSON object per step), TensorBoard scalars and a console progress bar.

Metric names are namespaced: `reward/`, `filter/`, `rollout/`, `actor/`, `eval/`, `perf/`, `time/`.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# the figures shown beside the progress bar
CONSOLE_KEYS = {
    "reward/acc": "acc",
    "filter/acc_before": "acc_pre",
    "filter/kept_frac": "kept",
    "actor/entropy": "ent",
    "rollout/response_length_mean": "len",
    "perf/tokens_per_s": "tok/s",
}


class RunLogger:
    """Writes each step's metrics to the run directory and shows progress."""

    def __init__(
        self, run_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool, progress: bool
    ) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True
        )

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be logged again)."""
        if not self.path.is_file():
            return
        keep = [
            ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        clean = {k: float(v) for k, v in sorted(metrics.items()) if math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        shown = {short: f"{clean[k]:.3g}" for k, short in CONSOLE_KEYS.items() if k in clean}
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        if advance:
            self.bar.update(1)

    def message(self, text: str) -> None:
        """A line printed above the progress bar."""
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class NullLogger:
    """`RunLogger`'s interface, writing nothing (data-parallel ranks other than 0)."""

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (0 where the platform does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def environment_info() -> dict[str, Any]:
    """What the run ran on (written to `env.json` in the run directory)."""
    import transformers

    from dapo import __version__

    return {
        "dapo": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
