"""Data-parallel scaling: the RL step of one process against the same step on 2 torchrun ranks.

    python bench/scaling.py [--size 25m|tiny] [--steps 5] [--warmup 1] [--threads 2]

Both sides run the real `dapo train` loop (its own fresh process or processes) on `bench/rl_step.py`'s
workload (8 arithmetic prompts x G = 8 responses of at most 128 tokens, dynamic sampling off, one AdamW step
per RL step, float32 on the CPU): one process with ``--threads`` torch threads, against ``--threads`` ranks
launched by torchrun with one thread each (gloo; FSDP2 shards; each rank generates and scores half of the
prompts and trains half of the responses, and gathers the full weights into its engine after the update).
The MEDIAN over the timed steps of each is printed from the runs' metrics.jsonl: seconds per step, its split
(generate / score / update / weight gather), generated tokens per second, and the ratio of step times.

On a GPU machine the same script measures N ranks on N GPUs (``--device cuda``, one GPU per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rl_step import OVERRIDES, model_dir

KEYS = {
    "step s": "time/step_s",
    "generate s": "time/generate_s",
    "score s": "time/score_s",
    "update s": "time/update_s",
    "weight gather s": "time/weight_sync_s",
    "tokens/s": "perf/tokens_per_s",
}


def run(ranks: int, threads: int, model: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median metrics of the timed steps of one `dapo train` run on `ranks` processes."""
    device = [o for o in OVERRIDES if not o.startswith("model.device=")] + [f"model.device={args.device}"]
    overrides = [
        *device,
        f"model.path={model}",
        f"trainer.total_steps={args.warmup + args.steps}",
        "evaluation.before_training=false",
        "evaluation.every_steps=0",
        "evaluation.max_prompts=1",
        "evaluation.k=1",
        "checkpoint.every_steps=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"trainer.output_dir={out}",
        f"trainer.run_name=ranks{ranks}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        cmd = [sys.executable, "-m", "dapo", "train", *overrides]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        cmd = [*launcher, "-m", "dapo", "train", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(ln) for ln in (out / f"ranks{ranks}" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "time/step_s" in r][args.warmup :]
    return {name: statistics.median(r.get(key, 0.0) for r in timed) for name, key in KEYS.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "25m"], default="25m")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="threads of the single process = ranks")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(args.size, Path(tmp))
        one = run(1, args.threads, model, Path(tmp), args)
        many = run(args.threads, 1, model, Path(tmp), args)
    print(f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; model {args.size}")
    print(f"device {args.device}; median of {args.steps} steps after {args.warmup} warm-up")
    one_rank, ranks = f"1 rank x {args.threads} thr", f"{args.threads} ranks x 1 thr"
    print(f"{'':18} {one_rank:>16} {ranks:>16}")
    for name in KEYS:
        print(f"{name:18} {one[name]:16.3f} {many[name]:16.3f}")
    print(f"step time ratio (1 rank / {args.threads} ranks): {one['step s'] / many['step s']:.2f}x")


if __name__ == "__main__":
    main()
