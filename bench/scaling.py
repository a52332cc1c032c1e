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

    python bench/scaling.py --ray [--size 25m|tiny] [--steps 5] [--warmup 1]

The cluster mode (`trainer.backend=ray`) on the same workload, on a local Ray head started for the
measurement with 4 logical CPUs (`ray start --head`): one process (local) against Ray with 1 trainer rank
and 1 or 2 rollout workers, synchronous and with `trainer.async_rollout_steps=1` (every actor one torch
thread). The split: generate / score / weight sync / update / idle (the rest of the step: the driver's
own work and waiting; with async on, generation overlaps the update and its time is not on the step's path).
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
RAY_KEYS = {
    "step s": "time/step_s",
    "generate s": "time/generate_s",
    "score s": "time/score_s",
    "weight sync s": "time/weight_sync_s",
    "update s": "time/update_s",
    "idle s": "",
    "tokens/s": "perf/tokens_per_s",
}


def overrides_for(model: Path, out: Path, name: str, args: argparse.Namespace) -> list[str]:
    device = [o for o in OVERRIDES if not o.startswith("model.device=")] + [f"model.device={args.device}"]
    return [
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
        f"trainer.run_name={name}",
    ]


def timed_rows(out: Path, name: str, args: argparse.Namespace) -> list[dict[str, float]]:
    rows = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step_s" in r][args.warmup :]


def run_ray(
    name: str, extra: list[str], model: Path, out: Path, address: str, args: argparse.Namespace
) -> dict[str, float]:
    """Median split of one run: `dapo train` in one process (no ``address``) or in Ray mode."""
    cmd = [sys.executable, "-m", "dapo", "train", *overrides_for(model, out, name, args), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if address else "2", "RAY_AUTH_MODE": "token"}
    if address:
        cmd += ["trainer.backend=ray", f"trainer.ray_address={address}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    timed = timed_rows(out, name, args)
    for r in timed:
        busy = sum(r.get(k, 0.0) for k in ("time/update_s", "time/weight_sync_s"))
        busy += (
            0.0 if r.get("rollout/staleness") else r.get("time/generate_s", 0.0) + r.get("time/score_s", 0.0)
        )
        r["idle"] = max(r["time/step_s"] - busy, 0.0)
    return {
        name: statistics.median(r.get(key or "idle", 0.0) for r in timed) for name, key in RAY_KEYS.items()
    }


def ray_main(model: Path, out: Path, args: argparse.Namespace) -> None:
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = [ray_bin, "start", "--head", "--num-cpus=4", "--include-dashboard=false"]
    # token authentication on both sides (the head generates ~/.ray/auth_token, the drivers read it)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        raise SystemExit(f"ray start failed:\n{started.stderr[-3000:]}")
    address = next(ln.split("'")[1] for ln in started.stdout.splitlines() if "ray start --address=" in ln)
    layouts = {
        "local (1 process x 2 thr)": ("local", [], ""),
        "Ray 1 worker": ("ray1", ["rollout.num_workers=1"], address),
        "Ray 2 workers": ("ray2", ["rollout.num_workers=2"], address),
        "Ray 2 workers, async": ("ray2async", ["rollout.num_workers=2", "trainer.async_rollout_steps=1",
                                               "algorithm.rollout_is_cap=2.0"], address),
    }  # fmt: skip
    try:
        results = {
            label: run_ray(name, extra, model, out, addr, args)
            for label, (name, extra, addr) in layouts.items()
        }
    finally:
        subprocess.run([ray_bin, "stop"], env=env, capture_output=True, timeout=300)
    print(f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; model {args.size}")
    print(
        f"device {args.device}; median of {args.steps} steps after {args.warmup} warm-up; Ray: 4 logical CPUs"
    )
    print(f"{'':14}" + "".join(f"{label:>28}" for label in results))
    for key in RAY_KEYS:
        print(f"{key:14}" + "".join(f"{r[key]:28.3f}" for r in results.values()))


def run(ranks: int, threads: int, model: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median metrics of the timed steps of one `dapo train` run on `ranks` processes."""
    overrides = overrides_for(model, out, f"ranks{ranks}", args)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        cmd = [sys.executable, "-m", "dapo", "train", *overrides]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        cmd = [*launcher, "-m", "dapo", "train", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-3000:]}")
    timed = timed_rows(out, f"ranks{ranks}", args)
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
    parser.add_argument("--ray", action="store_true", help="local against the Ray mode (see above)")
    args = parser.parse_args()
    if args.ray:
        with tempfile.TemporaryDirectory() as tmp:
            ray_main(model_dir(args.size, Path(tmp)), Path(tmp), args)
        return
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
