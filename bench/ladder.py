"""Table 1's ablation ladder on the built-in task: six variants of the embedded default, several seeds each.

    python bench/ladder.py [--rows 1-6] [--seeds 2] [--steps 60] [--out runs/ladder] [--aggregate]
                           [--figure docs/ladder.png]

Each row is the embedded default (`configs/tiny.yaml`) plus the ladder's task settings below, plus exactly the
settings that Table 1's ladder configs (`configs/ablation_1_naive_grpo.yaml` ... `ablation_6_dynamic_sampling
.yaml`) set on their way up from the paper's run: read from those files (each row's chain of `base:` files,
stopping at the paper's config), so the rows cannot drift from the presets. Every run starts from the same
built tiny model; seed s of every row uses `trainer.seed=s` (the same data order, sampling seeds and held-out
evaluation samples).

Equal budget of generated samples: rows without dynamic sampling generate N x G = 32 x 8 responses per step,
so `--steps` fixes their budget (steps x 256). Dynamic sampling generates more per step (it over-samples and
drops all-correct / all-wrong groups), so its row reaches the same budget in fewer steps, as in the paper; it
runs `--steps` steps too, and its table row is read at the held-out evaluation whose cumulative generated
samples are closest to the budget (evaluations every 10 steps; the table shows the samples actually spent).

The ladder's task settings, and why: the embedded default's responses are ~25 tokens against a 64-token budget
and none is truncated, so overlong filtering and the soft overlong punishment would be no-ops. The ladder uses
a 26-token response budget (`rollout.max_response_length=26`) with a 4-token punishment buffer
(`reward.overlong_cache_length=4`): the tiny model's responses are bimodal (one-line problems ~15 tokens, the
two-line ones 25-27), so about 10% of its responses at the start are truncated (and then wrong) and the long
tail falls into the buffer (Eq. 13: 23 tokens -0.25 ... 26 tokens -1). Held-out evaluation uses the same
budget (k = 8, the first 200 held-out problems, temperature 1.0). Each run is a `dapo train` subprocess
writing `OUT/<row>-s<seed>/`; a completed run directory is reused, so the ladder can be run one row per
invocation (`--rows 3`) and aggregated at the end (`--aggregate`: only reads run directories), which writes
`OUT/ladder.md` (the table), `OUT/report/` (`dapo report` of every run, overlaid) and, with `--figure`, the
GRPO-vs-DAPO figure (held-out accuracy against samples generated, entropy against step).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dapo.config import PRESETS_DIR
from dapo.report import Run, load_run

ROWS = [
    ("ablation_1_naive_grpo", "naive GRPO"),
    ("ablation_2_overlong_filtering", "+ overlong filtering"),
    ("ablation_3_clip_higher", "+ Clip-Higher"),
    ("ablation_4_soft_overlong_punishment", "+ soft overlong punishment"),
    ("ablation_5_token_level_loss", "+ token-level loss"),
    ("ablation_6_dynamic_sampling", "+ dynamic sampling (DAPO)"),
]
PROMPTS, G, K = 32, 8, 8  # the embedded default's N, G and evaluation k
TASK = [
    "rollout.max_response_length=26",
    "reward.overlong_cache_length=4",
    "evaluation.max_prompts=200",
    "evaluation.every_steps=10",
    "checkpoint.every_steps=0",
    "checkpoint.keep_last=1",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
EVAL_KEY = f"eval/arithmetic/avg@{K}"


def row_settings(name: str) -> dict[str, Any]:
    """The dotted settings a ladder config sets, following its `base:` chain through the ladder configs only
    (a base that is not an `ablation_*` file is the paper's run, whose scale settings the ladder does not
    take)."""
    data = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text()) or {}
    base = str(data.pop("base", ""))
    settings = row_settings(Path(base).stem) if base.startswith("ablation_") else {}
    for section, values in data.items():
        for key, value in values.items():
            settings[f"{section}.{key}"] = value
    return settings


def overrides(row: str, seed: int, steps: int, out: Path) -> list[str]:
    ladder = [f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
              for k, v in row_settings(row).items()]  # fmt: skip
    run = [f"trainer.total_steps={steps}", f"trainer.seed={seed}", f"trainer.output_dir={out}",
           f"trainer.run_name={row}-s{seed}"]  # fmt: skip
    return [*TASK, *ladder, *run]


def is_complete(run_dir: Path, steps: int) -> bool:
    """The run logged its final evaluation at `steps`."""
    if not (run_dir / "metrics.jsonl").is_file():
        return False
    return any(r["step"] == steps and EVAL_KEY in r for r in load_run(run_dir).rows)


def train(row: str, seed: int, steps: int, out: Path) -> float:
    """One `dapo train` subprocess; returns its wall-clock seconds."""
    run_dir = out / f"{row}-s{seed}"
    if run_dir.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "dapo.cli", "train", "--config", "tiny", *overrides(row, seed, steps, out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


@dataclass
class Point:
    """A run read at its equal-budget evaluation."""

    start: float  # held-out avg@k before training
    final: float  # held-out avg@k at the budget point
    step: int
    samples: int  # responses generated up to that step
    seconds: float  # training seconds up to that step (evaluations excluded)
    truncated: float  # truncated fraction of the responses generated in the last 10 steps
    length: float  # mean response length over the same steps


def budget_point(run: Run, budget: int) -> Point:
    train_rows = [r for r in run.rows if "rollout/responses" in r]
    evals = [r for r in run.rows if EVAL_KEY in r]
    if not evals or not train_rows:
        raise ValueError(f"{run.path}: no evaluations or no training steps in metrics.jsonl")

    def samples_at(step: float) -> int:
        return int(sum(r["rollout/responses"] for r in train_rows if r["step"] <= step))

    best = min(evals, key=lambda r: abs(samples_at(r["step"]) - budget))
    step = int(best["step"])
    last = [r for r in train_rows if step - 10 < r["step"] <= step]
    return Point(
        start=evals[0][EVAL_KEY],
        final=best[EVAL_KEY],
        step=step,
        samples=samples_at(step),
        seconds=sum(r.get("time/step_s", 0.0) for r in train_rows if r["step"] <= step),
        truncated=statistics.mean(r.get("rollout/truncated_frac", 0.0) for r in last),
        length=statistics.mean(r.get("rollout/response_length_mean", 0.0) for r in last),
    )


def table(points: dict[str, list[Point]], budget: int) -> str:
    """The ladder as a Markdown table: means over seeds, with each seed's figure in brackets."""

    def fmt(values: list[float], spec: str) -> str:
        each = ", ".join(format(v, spec) for v in values)
        return f"{format(statistics.mean(values), spec)} ({each})"

    lines = [
        f"| row | held-out avg@{K} start | avg@{K} at {budget:,} samples | steps | samples | train s "
        "| truncated | length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, label in ROWS:
        if row not in points:
            continue
        ps = points[row]
        lines.append(
            f"| {label} | {fmt([p.start for p in ps], '.3f')} | {fmt([p.final for p in ps], '.3f')} "
            f"| {fmt([p.step for p in ps], '.0f')} | {fmt([p.samples for p in ps], ',.0f')} "
            f"| {fmt([p.seconds for p in ps], '.0f')} | {fmt([p.truncated for p in ps], '.3f')} "
            f"| {fmt([p.length for p in ps], '.1f')} |"
        )
    return "\n".join(lines)


def figure(runs: dict[str, list[Run]], path: Path) -> None:
    """Held-out accuracy against samples generated, and entropy against step: naive GRPO vs DAPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, ent) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (row, label), color in zip((ROWS[0], ROWS[-1]), ("tab:blue", "tab:red"), strict=True):
        for i, run in enumerate(runs.get(row, [])):
            train_rows = [r for r in run.rows if "rollout/responses" in r]
            steps, values = run.series(EVAL_KEY)
            samples = [sum(r["rollout/responses"] for r in train_rows if r["step"] <= s) for s in steps]
            style = {"color": color, "alpha": 0.9 if i == 0 else 0.55, "label": label if i == 0 else None}
            acc.plot(samples, values, marker="o", markersize=3, **style)
            ent.plot(*run.series("actor/entropy"), linewidth=1, **style)
    acc.set(xlabel="responses generated", ylabel=f"held-out avg@{K}", title="held-out accuracy")
    ent.set(xlabel="step", ylabel="entropy (nats/token)", title="entropy of generated tokens")
    for ax in (acc, ent):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_rows(text: str) -> list[str]:
    """'1-6', '1,3,6' or '4' -> ladder config names."""
    numbers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        numbers += range(int(lo), int(hi or lo) + 1)
    if not numbers or any(not 1 <= n <= len(ROWS) for n in numbers):
        raise SystemExit(f"--rows {text!r}: rows are numbered 1 to {len(ROWS)}")
    return [ROWS[n - 1][0] for n in sorted(set(numbers))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1-6", help="ladder rows to run, e.g. 1-6, 1,6 or 3")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1 per row")
    parser.add_argument("--steps", type=int, default=60, help="steps of the rows without dynamic sampling")
    parser.add_argument("--out", type=Path, default=Path("runs/ladder"), help="parent of the run directories")
    parser.add_argument("--aggregate", action="store_true", help="only read finished runs and write results")
    parser.add_argument("--train-only", action="store_true", help="run the missing runs, write no results")
    parser.add_argument("--figure", type=Path, default=None, help="also write the GRPO-vs-DAPO figure here")
    args = parser.parse_args()
    rows = parse_rows(args.rows)
    seeds = range(args.seeds)
    if not args.aggregate:
        for row in rows:
            for seed in seeds:
                if is_complete(args.out / f"{row}-s{seed}", args.steps):
                    print(f"{row} seed {seed}: done already ({args.out / f'{row}-s{seed}'})")
                    continue
                print(
                    f"{row} seed {seed}: {' '.join(overrides(row, seed, args.steps, args.out))}", flush=True
                )
                print(f"  {train(row, seed, args.steps, args.out):.0f} s", flush=True)
    if args.train_only:
        return
    budget = args.steps * PROMPTS * G
    runs = {
        row: [
            load_run(args.out / f"{row}-s{s}")
            for s in seeds
            if is_complete(args.out / f"{row}-s{s}", args.steps)
        ]
        for row in rows
    }
    runs = {row: rs for row, rs in runs.items() if rs}
    if not runs:
        raise SystemExit(f"{args.out}: no finished ladder runs of {args.steps} steps")
    text = table({row: [budget_point(r, budget) for r in rs] for row, rs in runs.items()}, budget)
    print(text)
    (args.out / "ladder.md").write_text(text + "\n")
    from dapo.report import write_report

    report = write_report([r for rs in runs.values() for r in rs], args.out / "report")
    print(f"report: {report.index} ({len(report.pngs)} figures, {len(report.notes)} health notes)")
    if args.figure:
        figure(runs, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
