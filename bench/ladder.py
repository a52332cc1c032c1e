"""Table 1's ablation ladder on a built-in task, several seeds each, with DAPO against the field's objectives.

    python bench/ladder.py [--task countdown] [--rows 1-6] [--seeds 3] [--steps 40] [--out runs/ladder]
                           [--aggregate] [--figure docs/ladder.png]

Rows 1-6 are the embedded default (`configs/tiny.yaml`) plus the task's settings below, plus exactly the
settings that Table 1's ladder configs (`configs/ablation_1_naive_grpo.yaml` ... `ablation_6_dynamic_sampling
.yaml`) set on their way up from the paper's run: read from those files (each row's chain of `base:` files,
stopping at the paper's config), so the rows cannot drift from the presets. Rows 7-8 are DAPO (row 6) with
the paper's 16 gradient updates per rollout step, and with one (the on-policy control: every ratio is 1, so
no clip acts and Clip-Higher cannot matter). Rows 9-12 are the objectives' presets (`gspo`, `cispo`, `rloo`,
`reinforce_plus_plus`) with the task's settings. Every run starts from the same built model; seed s of every
row uses `trainer.seed=s` (the same data order, sampling seeds and held-out evaluation samples).

Tasks:
- `countdown` (the default): `model.path=tiny-countdown` (the tiny model warmed up on diverse Countdown
  traces, a fifth of them wrong), the `countdown` data and verifier; the paper's off-policy regime: 32
  prompts x 8 responses per step in mini-batches of 32 responses, 8 gradient updates per rollout step (the
  paper: 512 x 16 in 512s, 16 updates); a 40-token response budget with an 8-token punishment buffer (a
  three-line solution is ~32 tokens).
- `arithmetic`: the embedded default's model and task, on-policy as the default runs it (2 updates per step),
  with a 26-token budget and a 4-token buffer (so ~10% of responses truncate at the start).

Equal budget of generated samples: rows without dynamic sampling generate N x G = 32 x 8 responses per step,
so `--steps` fixes their budget (steps x 256). Dynamic sampling generates more per step (it over-samples and
drops all-correct / all-wrong groups), so its row reaches the same budget in fewer steps, as in the paper; it
runs `--steps` steps too, and its table row is read at the held-out evaluation whose cumulative generated
samples are closest to the budget (the table shows the samples actually spent). Held-out evaluation: k = 8,
the first 200 held-out problems, temperature 1.0, every 10 steps. Each run is a `dapo train` subprocess
writing `OUT/<row>-s<seed>/`; a completed run directory is reused, so the ladder can be run a row per
invocation (`--rows 3`) and aggregated at the end (`--aggregate`: only reads run directories), which writes
`OUT/ladder.md` (the table with bootstrap intervals over seeds, and the effect metrics), `OUT/report/`
(`dapo report` of every run, overlaid) and, with `--figure`, the GRPO-vs-DAPO figure (held-out accuracy
against samples generated, entropy against step).
"""

from __future__ import annotations

import argparse
import random
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


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    preset: str = "tiny"
    ladder: str = ""
    """The ablation config whose settings the row takes ("" = none: the preset as it is)."""
    extra: tuple[str, ...] = ()


LADDER = [
    ("ablation_1_naive_grpo", "naive GRPO"),
    ("ablation_2_overlong_filtering", "+ overlong filtering"),
    ("ablation_3_clip_higher", "+ Clip-Higher"),
    ("ablation_4_soft_overlong_punishment", "+ soft overlong punishment"),
    ("ablation_5_token_level_loss", "+ token-level loss"),
    ("ablation_6_dynamic_sampling", "+ dynamic sampling (DAPO)"),
]
DAPO = LADDER[-1][0]
ROWS: list[Row] = [
    *(Row(name, label, ladder=name) for name, label in LADDER),
    Row("dapo_16_updates", "DAPO, 16 updates per step", ladder=DAPO, extra=("actor.mini_batch_size=16",)),
    Row(
        "dapo_1_update",
        "DAPO, 1 update per step (control)",
        ladder=DAPO,
        extra=("actor.mini_batch_size=256",),
    ),
    Row("gspo", "GSPO", preset="gspo"),
    Row("cispo", "CISPO", preset="cispo"),
    Row("rloo", "RLOO", preset="rloo"),
    Row("reinforce_plus_plus", "REINFORCE++", preset="reinforce_plus_plus"),
]
PROMPTS, G, K = 32, 8, 8  # the embedded default's N, G and evaluation k
COMMON = [
    "evaluation.max_prompts=200",
    "evaluation.every_steps=10",
    "checkpoint.every_steps=0",
    "checkpoint.keep_last=1",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
TASKS: dict[str, list[str]] = {
    "countdown": [
        "model.path=tiny-countdown",
        "data.train_files=[countdown]",
        "evaluation.files=[countdown]",
        "reward.function=countdown",
        "rollout.max_response_length=40",
        "reward.overlong_cache_length=8",
        "actor.mini_batch_size=32",
        *COMMON,
    ],
    "arithmetic": ["rollout.max_response_length=26", "reward.overlong_cache_length=4", *COMMON],
}
TASK = TASKS["arithmetic"]


def eval_key(task: str) -> str:
    return f"eval/{task}/avg@{K}"


EVAL_KEY = eval_key("arithmetic")


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


def find_row(name: str) -> Row:
    return next(r for r in ROWS if r.name == name)


def overrides(row: str, seed: int, steps: int, out: Path, task: str = "arithmetic") -> list[str]:
    spec = find_row(row)
    settings = row_settings(spec.ladder) if spec.ladder else {}
    ladder = [f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
              for k, v in settings.items()]  # fmt: skip
    run = [f"trainer.total_steps={steps}", f"trainer.seed={seed}", f"trainer.output_dir={out}",
           f"trainer.run_name={row}-s{seed}"]  # fmt: skip
    return [*TASKS[task], *ladder, *spec.extra, *run]


def is_complete(run_dir: Path, steps: int, key: str = EVAL_KEY) -> bool:
    """The run logged its final evaluation at `steps`."""
    if not (run_dir / "metrics.jsonl").is_file():
        return False
    return any(r["step"] == steps and key in r for r in load_run(run_dir).rows)


def train(row: str, seed: int, steps: int, out: Path, task: str = "arithmetic") -> float:
    """One `dapo train` subprocess; returns its wall-clock seconds."""
    run_dir = out / f"{row}-s{seed}"
    if run_dir.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run_dir)
    preset = find_row(row).preset
    cmd = [
        sys.executable,
        "-m",
        "dapo.cli",
        "train",
        "--config",
        preset,
        *overrides(row, seed, steps, out, task),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


@dataclass
class Point:
    """A run read at its equal-budget evaluation, with the effect metrics of its training steps."""

    start: float  # held-out avg@k before training
    final: float  # held-out avg@k at the budget point
    final_sd: float  # its standard error (from the evaluation's 95% interval over prompts)
    step: int
    samples: int  # responses generated up to that step
    seconds: float  # training seconds up to that step (evaluations excluded)
    truncated: float  # truncated fraction of the responses generated in the last 10 steps
    length: float  # mean response length over the same steps
    entropy_start: float  # mean token entropy of the first 5 steps
    entropy_end: float  # ... of the last 5 steps up to the budget point
    clip_upper: float  # fraction of tokens at the upper clip, mean over the steps
    clip_lower: float
    upper_old_prob: float  # mean old probability of the tokens at the upper clip
    kl: float  # approximate KL between old and new policy, mean over the steps
    wrong_length_start: float  # mean length of wrong responses, first 5 / last 5 steps
    wrong_length_end: float


def _mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.mean(values) if values else float("nan")


def budget_point(run: Run, budget: int, key: str = EVAL_KEY) -> Point:
    train_rows = [r for r in run.rows if "rollout/responses" in r]
    evals = [r for r in run.rows if key in r]
    if not evals or not train_rows:
        raise ValueError(f"{run.path}: no evaluations or no training steps in metrics.jsonl")

    def samples_at(step: float) -> int:
        return int(sum(r["rollout/responses"] for r in train_rows if r["step"] <= step))

    best = min(evals, key=lambda r: abs(samples_at(r["step"]) - budget))
    step = int(best["step"])
    used = [r for r in train_rows if r["step"] <= step]
    last = [r for r in used if step - 10 < r["step"]]
    first5, last5 = used[:5], used[-5:]
    low, high = best.get(f"{key}_ci95_low"), best.get(f"{key}_ci95_high")
    return Point(
        start=evals[0][key],
        final=best[key],
        final_sd=(high - low) / 3.92 if low is not None and high is not None else 0.0,
        step=step,
        samples=samples_at(step),
        seconds=sum(r.get("time/step_s", 0.0) for r in used),
        truncated=_mean(last, "rollout/truncated_frac"),
        length=_mean(last, "rollout/response_length_mean"),
        entropy_start=_mean(first5, "actor/entropy"),
        entropy_end=_mean(last5, "actor/entropy"),
        clip_upper=_mean(used, "actor/clip_frac_upper"),
        clip_lower=_mean(used, "actor/clip_frac_lower"),
        upper_old_prob=_mean(used, "actor/clip_upper_old_prob"),
        kl=_mean(used, "actor/approx_kl"),
        wrong_length_start=_mean(first5, "rollout/wrong_length_mean"),
        wrong_length_end=_mean(last5, "rollout/wrong_length_mean"),
    )


def bootstrap_interval(points: list[Point], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean final accuracy over seeds: seeds resampled with replacement, each one's
    value redrawn within its own evaluation's uncertainty (normal, the evaluation's standard error over
    prompts), so both the spread between seeds and the held-out sample's size count."""
    rng = random.Random(seed)
    means = sorted(
        statistics.mean(rng.gauss(p.final, p.final_sd) for p in rng.choices(points, k=len(points)))
        for _ in range(draws)
    )
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def table(points: dict[str, list[Point]], budget: int) -> str:
    """The ladder as Markdown tables: accuracy (means over seeds, each seed's figure in brackets, the
    bootstrap interval), then the effect metrics (means over seeds)."""

    def fmt(values: list[float], spec: str) -> str:
        each = ", ".join(format(v, spec) for v in values)
        return f"{format(statistics.mean(values), spec)} ({each})"

    def avg(values: list[float], spec: str) -> str:
        return format(statistics.mean(values), spec)

    lines = [
        f"| row | held-out avg@{K} start | avg@{K} at {budget:,} samples | 95% interval | steps | samples "
        "| train s | truncated | length |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    effects = [
        "| row | entropy first 5 → last 5 steps | clipped above / below (tokens) | old p of clipped-above "
        "| KL(old, new) | wrong length first 5 → last 5 |",
        "|---|---|---|---|---|---|",
    ]
    for spec_row in ROWS:
        if spec_row.name not in points:
            continue
        ps, label = points[spec_row.name], spec_row.label
        low, high = bootstrap_interval(ps)
        lines.append(
            f"| {label} | {fmt([p.start for p in ps], '.3f')} | {fmt([p.final for p in ps], '.3f')} "
            f"| [{low:.3f}, {high:.3f}] | {fmt([p.step for p in ps], '.0f')} "
            f"| {fmt([p.samples for p in ps], ',.0f')} | {fmt([p.seconds for p in ps], '.0f')} "
            f"| {fmt([p.truncated for p in ps], '.3f')} | {fmt([p.length for p in ps], '.1f')} |"
        )
        effects.append(
            f"| {label} | {avg([p.entropy_start for p in ps], '.3f')} → "
            f"{fmt([p.entropy_end for p in ps], '.3f')} "
            f"| {avg([p.clip_upper for p in ps], '.4f')} / {avg([p.clip_lower for p in ps], '.4f')} "
            f"| {avg([p.upper_old_prob for p in ps], '.2f')} | {avg([p.kl for p in ps], '.4f')} "
            f"| {avg([p.wrong_length_start for p in ps], '.1f')} → "
            f"{avg([p.wrong_length_end for p in ps], '.1f')} |"
        )
    return "\n".join([*lines, "", *effects])


PANELS = [
    ("held-out accuracy (at equal samples)", "samples", ["ablation_1_naive_grpo", DAPO]),
    ("entropy of generated tokens (nats/token)", "actor/entropy",
     ["ablation_2_overlong_filtering", "ablation_3_clip_higher", DAPO]),
    ("mean length of wrong responses (tokens)", "rollout/wrong_length_mean",
     ["ablation_4_soft_overlong_punishment", "ablation_5_token_level_loss"]),
]  # fmt: skip
COLORS = ["tab:blue", "tab:orange", "tab:red"]


def figure(runs: dict[str, list[Run]], path: Path, key: str = EVAL_KEY) -> None:
    """Three panels, every seed a line: held-out accuracy against samples generated (naive GRPO vs DAPO);
    entropy against step (symmetric clip vs Clip-Higher vs DAPO); wrong responses' length against step
    (sample-level vs token-level loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 3.8))
    for ax, (title, metric, names) in zip(axes, PANELS, strict=True):
        for name, color in zip(names, COLORS, strict=False):
            for i, run in enumerate(runs.get(name, [])):
                style = {"color": color, "alpha": 0.9 if i == 0 else 0.5,
                         "label": find_row(name).label if i == 0 else None}  # fmt: skip
                if metric == "samples":
                    train_rows = [r for r in run.rows if "rollout/responses" in r]
                    steps, values = run.series(key)
                    samples = [
                        sum(r["rollout/responses"] for r in train_rows if r["step"] <= s) for s in steps
                    ]
                    ax.plot(samples, values, marker="o", markersize=3, **style)
                else:
                    ax.plot(*run.series(metric), linewidth=1, **style)
        ax.set(title=title, xlabel="responses generated" if metric == "samples" else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_rows(text: str) -> list[str]:
    """'1-6', '1,3,6' or '4' -> row names."""
    numbers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        numbers += range(int(lo), int(hi or lo) + 1)
    if not numbers or any(not 1 <= n <= len(ROWS) for n in numbers):
        raise SystemExit(f"--rows {text!r}: rows are numbered 1 to {len(ROWS)}")
    return [ROWS[n - 1].name for n in sorted(set(numbers))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="countdown", help="the built-in task")
    parser.add_argument("--rows", default="1-12", help="rows to run, e.g. 1-6, 1,6 or 3")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per row")
    parser.add_argument("--steps", type=int, default=40, help="steps of the rows without dynamic sampling")
    parser.add_argument("--out", type=Path, default=Path("runs/ladder"), help="parent of the run directories")
    parser.add_argument("--aggregate", action="store_true", help="only read finished runs and write results")
    parser.add_argument("--train-only", action="store_true", help="run the missing runs, write no results")
    parser.add_argument("--figure", type=Path, default=None, help="also write the figure here")
    args = parser.parse_args()
    rows = parse_rows(args.rows)
    seeds = range(args.seeds)
    key = eval_key(args.task)
    if not args.aggregate:
        for seed in seeds:  # seed by seed: a partial ladder has every row
            for row in rows:
                run_dir = args.out / f"{row}-s{seed}"
                if is_complete(run_dir, args.steps, key):
                    print(f"{row} seed {seed}: done already ({run_dir})")
                    continue
                settings = " ".join(overrides(row, seed, args.steps, args.out, args.task))
                print(f"{row} seed {seed}: --config {find_row(row).preset} {settings}", flush=True)
                print(f"  {train(row, seed, args.steps, args.out, args.task):.0f} s", flush=True)
    if args.train_only:
        return
    budget = args.steps * PROMPTS * G
    runs = {
        row: [
            load_run(args.out / f"{row}-s{s}")
            for s in seeds
            if is_complete(args.out / f"{row}-s{s}", args.steps, key)
        ]
        for row in rows
    }
    runs = {row: rs for row, rs in runs.items() if rs}
    if not runs:
        raise SystemExit(f"{args.out}: no finished ladder runs of {args.steps} steps")
    text = table({row: [budget_point(r, budget, key) for r in rs] for row, rs in runs.items()}, budget)
    print(text)
    (args.out / "ladder.md").write_text(text + "\n")
    from dapo.report import write_report

    report = write_report([r for rs in runs.values() for r in rs], args.out / "report")
    print(f"report: {report.index} ({len(report.pngs)} figures, {len(report.notes)} health notes)")
    if args.figure:
        figure(runs, args.figure, key)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
