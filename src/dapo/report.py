"""`dapo report RUN_DIR [RUN_DIR ...] [--out DIR]`: the paper's training-dynamics figures, a summary table and
health notes, from runs' `metrics.jsonl`, as `DIR/index.html` with one PNG per panel beside it.

Runs are overlaid on every panel (one colour per run, named in the legend), so ablations compare on one panel
as in the paper's figures; a panel of several quantities tells them apart by line style. The panels follow
what the paper watches (§4.3) and what dapo logs: held-out avg@k (with its 95% bootstrap interval as a band),
pass@k and maj@k per data source; reward and accuracy before/after the dynamic-sampling filter; entropy and
mean token probability; response length and the truncated fraction; clip fractions; the dynamic-sampling
picture; the train/rollout mismatch KL; time per stage and throughput. Every other logged quantity is drawn
too, in a grid per namespace, so nothing logged is hidden. A panel whose quantities no run logged is left out
and listed under "Not shown" (old runs lack some metrics); a run still being written is read up to its last
complete line.

Health notes (`health_notes`) flag, with the step where each began; the thresholds are module constants,
explained in docs/runs.md ("dapo report"):
- entropy collapse: entropy below `ENTROPY_COLLAPSE_FRACTION` of its start for `SUSTAIN` evaluations in a row;
- entropy explosion: entropy above `ENTROPY_EXPLOSION_FACTOR` x its start, sustained the same way;
- truncation: the truncated fraction at or above `TRUNCATED_FRACTION`, sustained;
- mismatch-KL spikes: above `KL_SPIKE_FACTOR` x the median of the previous `KL_WINDOW` steps and above
  `KL_SPIKE_FLOOR`;
- skipped updates (too few informative groups, or a non-finite loss), verifier timeouts and errors, data
  exhausted: any occurrence.
"""

from __future__ import annotations

import html
import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ENTROPY_COLLAPSE_FRACTION = 0.25
ENTROPY_EXPLOSION_FACTOR = 3.0
TRUNCATED_FRACTION = 0.5
KL_SPIKE_FACTOR = 10.0
KL_SPIKE_FLOOR = 1e-3
KL_WINDOW = 20
SUSTAIN = 3  # consecutive logged values a level condition must hold (or up to the run's end) to be noted
START_POINTS = 3  # the "start" of a quantity is the mean of its first this many logged values


class ReportError(ValueError):
    """A run directory cannot be reported on (one line, naming the directory)."""


@dataclass
class Run:
    """One run's logged metrics: `rows` in file order, one JSON object per line (`step` plus metrics)."""

    name: str
    path: Path
    rows: list[dict[str, float]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of every row that logged `key`."""
        pairs = [(r["step"], r[key]) for r in self.rows if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def logged(self) -> set[str]:
        """The names of every quantity the run logged."""
        return {k for r in self.rows for k in r if k != "step"}


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Read `RUN_DIR/metrics.jsonl`. A run still in progress may end in a partly written line: it is
    ignored; any other unreadable line is an error naming the file and line."""
    path = Path(run_dir)
    file = path / "metrics.jsonl"
    if not file.is_file():
        raise ReportError(f"{path}: no metrics.jsonl (not a dapo run directory, or nothing logged yet)")
    lines = file.read_text().splitlines()
    rows: list[dict[str, float]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # the writer may be mid-line
                break
            raise ReportError(f"{file}: line {i} is not JSON") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ReportError(f"{file}: line {i} has no 'step'")
        rows.append({str(k): float(v) for k, v in row.items() if isinstance(v, int | float)})
    return Run(name or path.name, path, rows)


# ----------------------------------------------------------------------------------------------------
# Panels


@dataclass(frozen=True)
class Panel:
    """One figure: the quantities `keys` against step, every run overlaid."""

    slug: str
    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    band: tuple[str, str] | None = None  # lower / upper keys drawn as a shaded interval around keys[0]
    logy: bool = False


@dataclass
class Family:
    title: str
    panels: list[Panel]
    grid: bool = False  # the panels are drawn as one figure of small multiples


TRAINING_FAMILIES = [
    Family("Reward and accuracy", [
        Panel("reward-mean", "reward mean (trained groups)", ("reward/mean",), "reward"),
        Panel("accuracy-filter", "accuracy before / after the dynamic-sampling filter",
              ("filter/acc_before", "reward/acc"), "accuracy"),
        Panel("pass-train", "training groups: pass@1, pass@n", ("rollout/pass_at_1", "rollout/pass_at_n"),
              "fraction"),
        Panel("distinct-correct", "distinct correct responses per solved group",
              ("rollout/distinct_correct",), "responses"),
    ]),
    Family("Entropy and token probability", [
        Panel("entropy", "entropy of generated tokens (all, top 20%)",
              ("actor/entropy", "actor/entropy_top20"), "nats / token"),
        Panel("cov-logp-adv", "Cov(log π, A) over tokens (entropy falls when positive)",
              ("actor/cov_logp_adv",), "covariance"),
        Panel("token-prob", "mean token probability", ("actor/token_prob",), "probability"),
    ]),
    Family("Response length", [
        Panel("length", "response length (mean, max)",
              ("rollout/response_length_mean", "rollout/response_length_max"), "tokens"),
        Panel("length-correct-wrong", "response length of correct / wrong responses",
              ("rollout/correct_length_mean", "rollout/wrong_length_mean"), "tokens"),
        Panel("truncated", "truncated fraction", ("rollout/truncated_frac",), "fraction"),
        Panel("loops", "responses ending in a repetition loop", ("rollout/loop_frac",), "fraction"),
    ]),
    Family("Clipping", [
        Panel("clip", "clip fractions (upper, lower, dual)",
              ("actor/clip_frac_upper", "actor/clip_frac_lower", "actor/dual_clip_frac"), "token fraction"),
        Panel("clip-old-prob", "old probability of upper-clipped tokens (mean)",
              ("actor/clip_upper_old_prob",), "probability"),
        Panel("seq-clip", "responses clipped (GSPO's sequence ratio)", ("actor/seq_clip_frac",), "fraction"),
    ]),
    Family("Dynamic sampling", [
        Panel("filter-fractions", "groups kept / all correct / all wrong",
              ("filter/kept_frac", "filter/all_correct_frac", "filter/all_wrong_frac"), "group fraction"),
        Panel("rollouts-per-kept", "rollouts per kept group", ("filter/rollouts_per_kept_group",),
              "responses"),
        Panel("rounds", "generation rounds per step", ("filter/rounds",), "rounds"),
        Panel("carried", "carried groups (in, out)", ("filter/carried_in", "filter/carried_out"), "groups"),
    ]),
    Family("Train / rollout mismatch", [
        Panel("mismatch-kl", "mismatch KL (rollout vs trainer log-probs)", ("rollout/mismatch_kl",), "KL"),
    ]),
    Family("Time and throughput", [
        Panel("time", "time per stage", ("time/generate_s", "time/score_s", "time/update_s", "time/step_s",
                                          "time/eval_s"), "seconds"),
        Panel("tokens-per-s", "generated tokens per second", ("perf/tokens_per_s",), "tokens / s"),
    ]),
]  # fmt: skip

EVAL_KEY = re.compile(r"^eval/(?P<source>.+)/(?P<metric>(avg|pass|maj)@(?P<k>\d+)|response_length)$")
CI_SUFFIXES = ("_ci95_low", "_ci95_high")


def eval_family(keys: set[str]) -> Family:
    """Held-out evaluation panels per data source: avg@k (with its interval), pass@j, maj@k, length."""
    order = {"avg": 0, "pass": 1, "maj": 2}
    found = []
    for key in keys:
        m = EVAL_KEY.match(key)
        if m:
            kind = m["metric"].split("@")[0]
            found.append((m["source"], order.get(kind, 3), int(m["k"] or 0), key))
    panels = []
    for source, _, _, key in sorted(found):
        metric = key.rsplit("/", 1)[1]
        band = (key + CI_SUFFIXES[0], key + CI_SUFFIXES[1]) if metric.startswith("avg@") else None
        slug = "eval-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{source}-{metric}").strip("-")
        ylabel = "tokens" if metric == "response_length" else "accuracy"
        panels.append(Panel(slug, f"held-out {metric} ({source})", (key,), ylabel, band=band))
    return Family("Held-out evaluation", panels)


def other_families(keys: set[str], shown: set[str]) -> list[Family]:
    """Every logged quantity no other panel shows, one grid per namespace."""
    by_space: dict[str, list[str]] = {}
    for key in sorted(keys - shown):
        if key.startswith("eval/"):
            continue  # rows / problems counts, interval bounds: in the summary table and the avg@k bands
        by_space.setdefault(key.split("/", 1)[0] if "/" in key else "other", []).append(key)
    return [
        Family(
            f"More {space}/ metrics", [Panel(f"more-{space}-{i}", k, (k,)) for i, k in enumerate(ks)], True
        )
        for space, ks in by_space.items()
    ]


def families_for(runs: Sequence[Run]) -> list[Family]:
    keys = set().union(*(r.logged() for r in runs))
    families = [eval_family(keys), *TRAINING_FAMILIES]
    shown = {k for f in families for p in f.panels for k in (*p.keys, *(p.band or ()))}
    return families + other_families(keys, shown)


# ----------------------------------------------------------------------------------------------------
# Health notes


@dataclass(frozen=True)
class Note:
    run: str
    step: int
    text: str


def _sustained(steps: list[float], flags: list[bool]) -> int | None:
    """The first step from which `flags` holds for SUSTAIN values in a row (or to the end of the run)."""
    for i in range(len(flags)):
        window = flags[i : i + SUSTAIN]
        if window and all(window):
            return int(steps[i])
    return None


def _start(values: list[float]) -> float:
    return statistics.mean(values[:START_POINTS])


def health_notes(run: Run) -> list[Note]:
    """What in a run needs a look, each with the step where it began (see the module docstring)."""
    notes: list[Note] = []
    steps, ent = run.series("actor/entropy")
    if len(ent) > START_POINTS:
        start = _start(ent)
        low = _sustained(steps, [v < ENTROPY_COLLAPSE_FRACTION * start for v in ent])
        if low is not None:
            notes.append(Note(run.name, low, f"entropy collapse: below {ENTROPY_COLLAPSE_FRACTION:.0%} of "
                              f"its start ({start:.3g}) from step {low}; last {ent[-1]:.3g}"))  # fmt: skip
        high = _sustained(steps, [v > ENTROPY_EXPLOSION_FACTOR * start for v in ent])
        if high is not None:
            notes.append(Note(run.name, high, f"entropy explosion: above {ENTROPY_EXPLOSION_FACTOR:g}x its "
                              f"start ({start:.3g}) from step {high}; last {ent[-1]:.3g}"))  # fmt: skip
    steps, trunc = run.series("rollout/truncated_frac")
    at = _sustained(steps, [v >= TRUNCATED_FRACTION for v in trunc])
    if at is not None:
        notes.append(Note(run.name, at, f"truncation: at least {TRUNCATED_FRACTION:.0%} of responses hit the "
                          f"length limit from step {at}; last {trunc[-1]:.0%}"))  # fmt: skip
    steps, kl = run.series("rollout/mismatch_kl")
    baseline = [statistics.median(kl[max(0, i - KL_WINDOW) : i]) if i else 0.0 for i in range(len(kl))]
    spikes = [
        int(s)
        for i, (s, v) in enumerate(zip(steps, kl, strict=True))
        if i > 0 and v > max(KL_SPIKE_FLOOR, KL_SPIKE_FACTOR * baseline[i])
    ]
    if spikes:
        notes.append(Note(run.name, spikes[0], f"mismatch-KL spike at step {spikes[0]} "
                          f"({len(spikes)} spike(s) in all; steps {_list(spikes)})"))  # fmt: skip
    events = [
        ("filter/skipped_step", "update skipped (too few informative groups)"),
        ("actor/skipped_updates", "gradient update skipped (non-finite loss or gradient)"),
        ("reward/verifier_timeouts", "verifier timeouts"),
        ("reward/verifier_errors", "verifier errors"),
        ("filter/data_exhausted", "training data exhausted"),
    ]
    for key, what in events:
        steps, values = run.series(key)
        hit = [(int(s), v) for s, v in zip(steps, values, strict=True) if v > 0]
        if hit:
            total = sum(v for _, v in hit)
            notes.append(Note(run.name, hit[0][0], f"{what}: first at step {hit[0][0]}; {total:g} in "
                              f"{len(hit)} step(s) ({_list([s for s, _ in hit])})"))  # fmt: skip
    return sorted(notes, key=lambda n: n.step)


def _list(steps: list[int], most: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:most])
    return shown + (", ..." if len(steps) > most else "")


# ----------------------------------------------------------------------------------------------------
# Summary table


def summarize_run(run: Run) -> dict[str, float]:
    """The summary table's row of one run: its last step, totals, and the last logged value of the
    headline quantities (the first and last held-out evaluation of each avg@k / pass@k / maj@k)."""
    train = [r for r in run.rows if "rollout/responses" in r or "time/step_s" in r]
    out: dict[str, float] = {"steps": max((r["step"] for r in train), default=0.0)}
    if any("rollout/responses" in r for r in train):
        out["responses generated"] = sum(r.get("rollout/responses", 0.0) for r in train)
    if any("time/step_s" in r for r in train):
        out["training seconds"] = sum(r.get("time/step_s", 0.0) for r in train)
    for key in sorted(run.logged()):
        m = EVAL_KEY.match(key)
        if m and m["metric"] != "response_length" and not key.endswith(CI_SUFFIXES):
            _, values = run.series(key)
            name = key.removeprefix("eval/")
            if m["metric"].startswith("avg@"):
                out[f"{name} first"] = values[0]
            out[f"{name} last"] = values[-1]
            for suffix in CI_SUFFIXES:
                if key + suffix in run.logged():
                    out[f"{name} last{suffix.replace('_', ' ')}"] = run.series(key + suffix)[1][-1]
    for key in (
        "actor/entropy",
        "actor/token_prob",
        "rollout/response_length_mean",
        "rollout/truncated_frac",
    ):
        _, values = run.series(key)
        if values:
            out[f"{key} last"] = values[-1]
    return out


# ----------------------------------------------------------------------------------------------------
# Drawing and the page


@dataclass
class Written:
    """What `write_report` wrote."""

    index: Path
    pngs: list[Path] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


LineStyle = Literal["-", "--", ":", "-."] | tuple[float, tuple[float, ...]]
STYLES: tuple[LineStyle, ...] = ("-", "--", ":", "-.", (0.0, (5.0, 1.0, 1.0, 1.0)))
Color = tuple[float, float, float, float]


def _draw(ax: object, panel: Panel, runs: Sequence[Run], colors: dict[str, Color], legend: bool) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    for run in runs:
        for key, style in zip(panel.keys, STYLES, strict=False):
            steps, values = run.series(key)
            if not steps:
                continue
            label = run.name if len(panel.keys) == 1 else None  # several keys: runs by colour, keys by style
            marker = "o" if len(steps) < 30 else None
            ax.plot(steps, values, linestyle=style, color=colors[run.name], label=label, marker=marker,
                    markersize=3, linewidth=1.2)  # fmt: skip
        if panel.band:
            lows, highs = run.series(panel.band[0]), run.series(panel.band[1])
            if lows[0] and len(lows[0]) == len(highs[0]):
                ax.fill_between(lows[0], lows[1], highs[1], color=colors[run.name], alpha=0.15, linewidth=0)
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel, fontsize=8)
    if panel.logy:
        ax.set_yscale("log")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if legend and len(panel.keys) > 1:
        from matplotlib.lines import Line2D

        drawn = [r for r in runs if any(k in r.logged() for k in panel.keys)]
        handles = [Line2D([], [], color=colors[r.name], label=r.name) for r in drawn]
        styles = zip(panel.keys, STYLES, strict=False)
        handles += [Line2D([], [], color="0.4", linestyle=st, label=k) for k, st in styles]
        ax.legend(handles=handles, fontsize=6, loc="best")
    elif legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def _figure(
    family: Family, panels: list[Panel], runs: Sequence[Run], colors: dict[str, Color], path: Path
) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if family.grid:
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            _draw(ax, panel, runs, colors, legend=False)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        handles = [Line2D([], [], color=colors[r.name], label=r.name) for r in runs]
        fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=min(4, len(runs)),
                   bbox_to_anchor=(0.5, 0.0))  # fmt: skip
        fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(runs) // 4), 1, 1))
    else:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _draw(ax, panels[0], runs, colors, legend=True)
        fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _names(run_dirs: Sequence[Path]) -> list[str]:
    """Legend names: the directory name, or parent/name where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def _column_rank(name: str) -> tuple[int, str, int, int, str]:
    """Summary columns: totals, then each source's avg@k (first, last, interval), pass@j by j, maj@k, then
    the rest."""
    totals = ["steps", "responses generated", "training seconds"]
    if name in totals:
        return (0, "", totals.index(name), 0, "")
    m = re.match(r"^(?P<source>.+)/(?P<kind>avg|pass|maj)@(?P<k>\d+) (?P<rest>.+)$", name)
    if m:
        kind = {"avg": 0, "pass": 1, "maj": 2}[m["kind"]]
        return (
            1,
            m["source"],
            kind,
            int(m["k"]),
            {"first": "0", "last": "1"}.get(m["rest"], "2" + m["rest"]),
        )
    return (2, name, 0, 0, "")


def _fmt(value: float) -> str:
    return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"


def write_report(runs: Sequence[Run], out: Path) -> Written:
    """Draw every panel for `runs` into `out` (one PNG each); write `out/index.html`, `out/summary.json`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ReportError("no runs to report on")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a report written before may have panels this one has not
        old.unlink()
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    colors: dict[str, Color] = {r.name: cmap(i % cmap.N) for i, r in enumerate(runs)}
    written = Written(out / "index.html")
    sections = []
    for family in families_for(runs):
        present = [p for p in family.panels if any(k in r.logged() for r in runs for k in p.keys)]
        written.skipped += [f"{p.title} (no run logged {', '.join(p.keys)})" for p in family.panels
                            if p not in present]  # fmt: skip
        if not present:
            continue
        figures = [(present, present[0].slug)] if family.grid else [([p], p.slug) for p in present]
        parts = [f"<h2>{html.escape(family.title)}</h2>"]
        for panels, slug in figures:
            png = out / f"{len(written.pngs):02d}-{slug}.png"
            _figure(family, panels, runs, colors, png)
            written.pngs.append(png)
            missing = sorted(
                {r.name for r in runs for p in panels if not any(k in r.logged() for k in p.keys)}
            )
            note = f"<p class='note'>not logged by: {html.escape(', '.join(missing))}</p>" if missing else ""
            title = html.escape(", ".join(p.title for p in panels) if family.grid else panels[0].title)
            parts.append(f"<figure><img src='{png.name}' alt='{title}'>{note}</figure>")
        sections.append("\n".join(parts))
    written.notes = [n for r in runs for n in health_notes(r)]
    summaries = {r.name: summarize_run(r) for r in runs}
    (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    written.index.write_text(_page(runs, written, summaries, sections))
    return written


NO_NOTES = "<p>none: no entropy collapse or explosion, truncation, KL spike, skip, timeout or exhaustion.</p>"


def _page(
    runs: Sequence[Run], written: Written, summaries: dict[str, dict[str, float]], sections: list[str]
) -> str:
    esc = html.escape
    notes = "".join(f"<li><b>{esc(n.run)}</b>, step {n.step}: {esc(n.text)}</li>" for n in written.notes)
    columns = sorted({k for s in summaries.values() for k in s}, key=_column_rank)
    head = "".join(f"<th>{esc(c)}</th>" for c in ["run", *columns])
    body = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{_fmt(s[c]) if c in s else ''}</td>" for c in columns)
        + "</tr>"
        for name, s in summaries.items()
    )  # fmt: skip
    runs_list = "".join(
        f"<li>{esc(r.name)}: <code>{esc(str(r.path))}</code> ({len(r.rows)} lines)</li>" for r in runs
    )
    skipped = "".join(f"<li>{esc(s)}</li>" for s in written.skipped)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dapo report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1400px; }}
table {{ border-collapse: collapse; font-size: 12px; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
td {{ text-align: right; }} td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.4em; vertical-align: top; }} img {{ max-width: 100%; }}
.note {{ color: #a60; font-size: 12px; margin: 0; }} .health li {{ color: #a00; }}
</style></head><body>
<h1>dapo report</h1>
<ul>{runs_list}</ul>
<h2>Health notes</h2>
{f"<ul class='health'>{notes}</ul>" if notes else NO_NOTES}
<h2>Summary</h2>
<table id="summary"><tr>{head}</tr>{body}</table>
{chr(10).join(sections)}
{f"<h2>Not shown</h2><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""


def default_out(run_dirs: Sequence[Path], out: Path | None) -> Path:
    if out is not None:
        return out
    if len(run_dirs) > 1:
        raise ReportError("several runs: give --out DIR for the combined report")
    return run_dirs[0] / "report"


def report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Written:
    """`dapo report`: load the runs, write the report; the default directory is RUN_DIR/report for one run."""
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, _names(paths), strict=True)]
    return write_report(runs, default_out(paths, None if out is None else Path(out)))
