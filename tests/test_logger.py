"""The run logger: plain progress lines when the output is not a terminal; metrics.jsonl on resume."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dapo.logger import RunLogger


def test_plain_lines_every_few_steps_when_not_a_terminal(tmp_path: Path) -> None:
    out = io.StringIO()
    log = RunLogger(tmp_path, total_steps=25, start_step=0, tensorboard=False, progress=True,
                    every_steps=10, interactive=False, stream=out)  # fmt: skip
    for step in range(1, 26):
        log.log(step, {"reward/acc": step / 100, "actor/entropy": 0.5})
        if step == 12:
            log.message("step 12: eval/arithmetic/avg@8=0.500")
    log.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    progress = [ln.split()[1] for ln in lines if ln.startswith("step ") and "/25" in ln]
    assert progress == ["10/25", "20/25", "25/25"]
    assert lines[0].startswith("step 10/25  acc=0.1  ent=0.5  ") and lines[0].endswith(" left"), lines[0]
    assert lines[1] == "step 12: eval/arithmetic/avg@8=0.500"
    assert len(lines) == 4
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 26)
    )


def test_no_progress_lines_when_progress_is_off(tmp_path: Path) -> None:
    out = io.StringIO()
    log = RunLogger(tmp_path, total_steps=5, start_step=0, tensorboard=False, progress=False,
                    every_steps=1, interactive=False, stream=out)  # fmt: skip
    for step in range(1, 6):
        log.log(step, {"reward/acc": 0.5})
    log.close()
    assert out.getvalue() == ""


def test_resume_truncates_lines_after_the_checkpoint_and_a_fresh_start_drops_them_all(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 3)))
    RunLogger(tmp_path, total_steps=5, start_step=2, tensorboard=False, progress=False).close()
    assert (tmp_path / "metrics.jsonl").read_text().count("step") == 3
    RunLogger(tmp_path, total_steps=5, start_step=0, tensorboard=False, progress=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resume_skips_a_torn_last_line_and_rewrites_the_file_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "reward/acc": 0.5}) + "\n" for s in (1, 2, 3))
    path.write_text(whole + '{"step": 4, "reward/ac')  # a power cut mid-append
    renamed: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renamed.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: line 4 is not JSON .*skipped"):
        RunLogger(tmp_path, total_steps=5, start_step=3, tensorboard=False, progress=False).close()
    assert path.read_text() == whole
    assert [dst for _, dst in renamed] == ["metrics.jsonl"]  # written beside it, then renamed over it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_phase_peaks_reset_per_phase_and_the_run_peak_is_kept() -> None:
    """A phase that holds 256 MiB peaks that much above one that holds nothing; the run's peak
    (`peak_rss_mb`) still counts the first phase after the second one reset the kernel's high-water mark.
    In a fresh process: in a long one, memory the C allocator kept from earlier tests is resident already."""
    script = """
import json, torch
from dapo.logger import PhasePeaks, peak_rss_mb
peaks, metrics = PhasePeaks(torch.device("cpu")), {}
with peaks.phase("big", metrics):
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    del block
with peaks.phase("small", metrics):
    torch.ones(16).sum()
with PhasePeaks(None).phase("none", metrics):  # off where the phases run in other processes
    pass
print(json.dumps({**metrics, "run_gib": peak_rss_mb() / 1024}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads(run.stdout)
    assert metrics["perf/peak_mem_gib_big"] - metrics["perf/peak_mem_gib_small"] > 0.2, metrics
    assert metrics["run_gib"] >= metrics["perf/peak_mem_gib_big"] - 1e-3
    assert "perf/peak_mem_gib_none" not in metrics


def test_a_resume_with_a_pending_evaluation_drops_that_steps_evaluation_lines(tmp_path: Path) -> None:
    """A stop skipped step 4's evaluation; a resumed run that evaluated it and was killed left its line: the
    next resume from step 4 evaluates again, so that line goes (and step 4's training line stays)."""
    rows = [
        {"step": 2, "time/eval_s": 1.0}, {"step": 4, "loss": 0.5}, {"step": 4, "time/eval_s": 1.0},
        {"step": 5, "loss": 0.4},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    RunLogger(
        tmp_path, total_steps=6, start_step=4, tensorboard=False, progress=False, eval_pending=True
    ).close()
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:2]
