"""`dapo report`: every PNG is referenced, a panel per metric family present, the summary equals the metrics
file, health notes start where the trouble starts, runs in progress and old runs are read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dapo.cli import main
from dapo.report import (
    ENTROPY_COLLAPSE_FRACTION,
    TRAINING_FAMILIES,
    ReportError,
    health_notes,
    load_run,
    report,
)

REPO = Path(__file__).resolve().parents[1]


def train_row(step: int, **over: float) -> dict[str, float]:
    """A training step's metrics with every key dapo logs (healthy values unless overridden)."""
    row = {
        "step": step, "actor/entropy": 0.5, "actor/token_prob": 0.8, "actor/clip_frac_upper": 0.01,
        "actor/clip_frac_lower": 0.002, "actor/dual_clip_frac": 0.0, "actor/skipped_updates": 0.0,
        "actor/grad_norm": 0.4, "filter/acc_before": 0.4, "reward/acc": 0.5, "reward/mean": 0.0,
        "filter/kept_frac": 0.7, "filter/all_correct_frac": 0.1, "filter/all_wrong_frac": 0.2,
        "filter/rollouts_per_kept_group": 11.0, "filter/rounds": 2.0, "filter/carried_in": 1.0,
        "filter/carried_out": 2.0, "filter/skipped_step": 0.0, "filter/data_exhausted": 0.0,
        "reward/verifier_timeouts": 0.0, "reward/verifier_errors": 0.0, "rollout/mismatch_kl": 1e-8,
        "rollout/response_length_mean": 20.0 + step, "rollout/response_length_max": 30.0 + step,
        "rollout/truncated_frac": 0.0, "rollout/responses": 256.0, "rollout/tokens": 5000.0,
        "time/generate_s": 0.5, "time/score_s": 0.01, "time/update_s": 1.0, "time/step_s": 1.6 + step / 100,
        "perf/tokens_per_s": 3000.0, "actor/entropy_top20": 1.5, "actor/cov_logp_adv": 0.01,
        "actor/clip_upper_old_prob": 0.15, "actor/seq_clip_frac": 0.1, "rollout/pass_at_1": 0.4,
        "rollout/pass_at_n": 0.8, "rollout/distinct_correct": 2.0, "rollout/correct_length_mean": 20.0,
        "rollout/wrong_length_mean": 25.0, "rollout/loop_frac": 0.0,
    }  # fmt: skip
    row.update(over)
    return row


def eval_row(step: int, avg: float) -> dict[str, float]:
    return {
        "step": step, "eval/arithmetic/avg@8": avg, "eval/arithmetic/avg@8_ci95_low": avg - 0.05,
        "eval/arithmetic/avg@8_ci95_high": avg + 0.05, "eval/arithmetic/pass@8": 0.8,
        "eval/arithmetic/pass@2": 0.6, "eval/arithmetic/maj@8": avg + 0.1,
        "eval/arithmetic/response_length": 21.0, "eval/arithmetic/rows": 100.0, "time/eval_s": 1.0,
    }  # fmt: skip


def write_run(path: Path, rows: list[dict[str, float]], tail: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def healthy_rows(steps: int = 12) -> list[dict[str, float]]:
    rows = [eval_row(0, 0.3)]
    for s in range(1, steps + 1):
        if s % 6 == 0:
            rows.append(eval_row(s, 0.3 + s / 100))
        rows.append(train_row(s))
    return rows


def referenced_pngs(index: Path) -> set[str]:
    return set(re.findall(r"<img src='([^']+\.png)'", index.read_text()))


def test_html_references_every_png_and_a_panel_per_family(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", healthy_rows())
    b = write_run(tmp_path / "b", healthy_rows(6))
    written = report([a, b], tmp_path / "out")
    on_disk = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert on_disk == {p.name for p in written.pngs} == referenced_pngs(written.index)
    page = written.index.read_text()
    for family in TRAINING_FAMILIES:  # every family's quantities were logged: each has its heading and panels
        assert f"<h2>{family.title}</h2>" in page, family.title
        for panel in family.panels:
            assert any(p.name.endswith(f"-{panel.slug}.png") for p in written.pngs), panel.slug
    for metric in ("avg-8", "pass-2", "pass-8", "maj-8", "response-length"):
        assert any(p.name.endswith(f"eval-arithmetic-{metric}.png") for p in written.pngs), metric
    assert "More actor/ metrics" in page  # actor/grad_norm has no curated panel: it is still drawn
    assert written.skipped == [] and "Not shown" not in page
    # legends name the runs
    assert "Health notes" in page and "none:" in page


def test_old_run_missing_metrics_skips_panels_with_a_note(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if not k.startswith(("actor/token_prob", "filter/", "rollout/mis"))}
            for r in healthy_rows()]  # fmt: skip
    written = report([write_run(tmp_path / "old", rows)], None)
    assert written.index == tmp_path / "old" / "report" / "index.html"
    page = written.index.read_text()
    assert "Not shown" in page and "mean token probability" in page
    assert not any("token-prob" in p.name or "mismatch" in p.name for p in written.pngs)
    assert any("filter/rounds" in s for s in written.skipped)
    assert referenced_pngs(written.index) == {p.name for p in written.pngs}


def test_summary_numbers_equal_the_metrics_file(tmp_path: Path) -> None:
    rows = healthy_rows(12)
    run = write_run(tmp_path / "r", rows)
    written = report([run], None)
    train = [r for r in rows if "rollout/responses" in r]
    evals = [r for r in rows if "eval/arithmetic/avg@8" in r]
    expected = {
        "steps": 12.0,
        "responses generated": sum(r["rollout/responses"] for r in train),
        "training seconds": sum(r["time/step_s"] for r in train),
        "arithmetic/avg@8 first": evals[0]["eval/arithmetic/avg@8"],
        "arithmetic/avg@8 last": evals[-1]["eval/arithmetic/avg@8"],
        "arithmetic/avg@8 last ci95 low": evals[-1]["eval/arithmetic/avg@8_ci95_low"],
        "arithmetic/maj@8 last": evals[-1]["eval/arithmetic/maj@8"],
        "arithmetic/pass@2 last": 0.6,
        "actor/entropy last": train[-1]["actor/entropy"],
        "rollout/response_length_mean last": train[-1]["rollout/response_length_mean"],
    }
    summary = json.loads((written.index.parent / "summary.json").read_text())["r"]
    page = written.index.read_text()
    header = re.findall(r"<th>([^<]*)</th>", page)
    cells = re.findall(r"<td>([^<]*)</td>", page.split('id="summary"')[1].split("</table>")[0])
    table = dict(zip(header, cells, strict=True))
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key
        assert float(table[key]) == pytest.approx(value, rel=1e-5), key  # printed to 6 significant digits


def test_health_notes_name_the_step_where_each_began(tmp_path: Path) -> None:
    rows = [eval_row(0, 0.3)]
    for s in range(1, 41):
        over: dict[str, float] = {}
        if s >= 20:  # entropy falls to a tenth of its start from step 20 on (a one-step dip at 10 is noise)
            over["actor/entropy"] = 0.05
        if s == 10:
            over["actor/entropy"] = 0.05
        if s >= 30:
            over["rollout/truncated_frac"] = 0.6 + s / 100  # rising toward 1
        if s == 25:
            over["rollout/mismatch_kl"] = 0.05  # a spike over a baseline of 1e-8
        if s in (12, 13):
            over["filter/skipped_step"] = 1.0
        if s == 33:
            over["reward/verifier_timeouts"] = 3.0
        if s == 40:
            over["filter/data_exhausted"] = 1.0
        rows.append(train_row(s, **over))
    notes = health_notes(load_run(write_run(tmp_path / "sick", rows)))
    starts = {n.text.split(":")[0]: n.step for n in notes}
    assert starts == {
        "entropy collapse": 20,
        "truncation": 30,
        "mismatch-KL spike at step 25 (1 spike(s) in all; steps 25)": 25,
        "update skipped (too few informative groups)": 12,
        "verifier timeouts": 33,
        "training data exhausted": 40,
    }
    assert f"below {ENTROPY_COLLAPSE_FRACTION:.0%}" in next(n.text for n in notes if "collapse" in n.text)
    assert "3 in 1 step(s)" in next(n.text for n in notes if "timeouts" in n.text)
    assert [n.step for n in notes] == sorted(n.step for n in notes)
    explode = [train_row(s, **{"actor/entropy": 0.5 if s < 8 else 2.0}) for s in range(1, 12)]
    notes = health_notes(load_run(write_run(tmp_path / "hot", explode)))
    assert [(n.text.split(":")[0], n.step) for n in notes] == [("entropy explosion", 8)]
    assert health_notes(load_run(write_run(tmp_path / "well", healthy_rows()))) == []


def test_run_in_progress_bad_lines_and_missing_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = write_run(tmp_path / "live", healthy_rows(3), tail='{"step": 4, "actor/entr')
    assert [r["step"] for r in load_run(live).rows][-1] == 3  # the partly written last line is ignored
    broken = write_run(tmp_path / "broken", healthy_rows(3), tail='{"step": 4, "actor/entr\n{"step": 5}\n')
    with pytest.raises(ReportError, match=r"broken/metrics.jsonl: line 5 is not JSON"):
        load_run(broken)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'empty'}: no metrics.jsonl" in err
    assert main(["report", str(live)]) == 0
    assert "report: " in capsys.readouterr().out and (live / "report" / "index.html").is_file()


@pytest.mark.slow
def test_report_of_a_real_training_run(tmp_path: Path) -> None:
    """A 3-step `dapo train` of the tiny default: it prints the report command, and the report draws the
    families every run logs (~15 s)."""
    from dapo.models.tiny import ensure_tiny_model

    ensure_tiny_model(progress=False)
    args = ["trainer.total_steps=3", "trainer.prompts_per_step=8", "rollout.n=4", "evaluation.max_prompts=8",
            "evaluation.k=4", "evaluation.every_steps=0", "checkpoint.every_steps=0",
            "logging.progress_bar=false", "logging.tensorboard=false", f"trainer.output_dir={tmp_path}",
            "trainer.run_name=r", "actor.mini_batch_size=32", "actor.micro_batch_size=32"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "dapo.cli", "train", *args], capture_output=True, text=True,
                         timeout=600, cwd=REPO)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"dapo report {tmp_path / 'r'}" in run.stdout
    written = report([tmp_path / "r"])
    page = written.index.read_text()
    for family in TRAINING_FAMILIES:
        assert f"<h2>{family.title}</h2>" in page, family.title
    assert "held-out avg@4 (arithmetic)" in page and referenced_pngs(written.index) == {
        p.name for p in written.pngs
    }
