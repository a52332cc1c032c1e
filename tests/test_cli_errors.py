"""User errors on the command line: one line `dapo: error: ...` naming the file, row or key, exit status 2,
a traceback only with --debug / DAPO_DEBUG=1; the checks that need no model run before any model is built."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo.cli import main
from dapo.config import ConfigError
from dapo.errors import UserError
from dapo.models.tiny import TinyRecipe, ensure_tiny_model

REPO = Path(__file__).resolve().parents[1]
# a few steps of a small run, should an error not stop it
QUICK = ["trainer.total_steps=1", "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(autouse=True)
def empty_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DAPO_CACHE: a test that reached the model would build it there (and fail the check below)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DAPO_CACHE", str(cache))
    monkeypatch.delenv("DAPO_DEBUG", raising=False)
    return cache


def dapo_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `dapo ARGS`; assert it failed as a user error (status 2, one line on stderr); return that line."""
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("dapo: warning:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dapo: error: "), err
    return lines[0]


def train_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    line = dapo_error(["train", *QUICK, f"trainer.output_dir={tmp_path / 'runs'}", *args], capsys)
    assert not (tmp_path / "cache" / "tiny").exists(), "the tiny model was built before the error was found"
    return line


def reference_parquet(path: Path, rows: int = 50) -> Path:
    table = pa.table(
        {
            "prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(rows)],
            "reward_model": [{"ground_truth": str(i + 1)} for i in range(rows)],
            "data_source": ["t"] * rows,
        }
    )
    pq.write_table(table, path)
    return path


def test_data_file_errors_name_the_file_before_any_model_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = reference_parquet(tmp_path / "good.parquet")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.parquet"
    text.write_text("problem,answer\n1+1,2\n")
    columns = tmp_path / "columns.parquet"
    pq.write_table(pa.table({"question": ["1+1"], "answer": ["2"]}), columns)
    directory = tmp_path / "dir.parquet"
    directory.mkdir()
    cases = {
        empty: "cannot read parquet file",
        truncated: "cannot read parquet file",
        text: "cannot read parquet file",
        columns: "key 'prompt'",  # and the columns that are there
        directory: "not a regular file",
        tmp_path / "missing.parquet": "no such file",
        tmp_path / "data.csv": "unknown file extension '.csv'; allowed: .parquet, .jsonl, .json",
    }
    for path, reason in cases.items():
        line = train_error(tmp_path, capsys, f"data.train_files=[{path}]")
        assert f"data.train_files: {path}: " in line and reason in line, line
    line = train_error(tmp_path, capsys, f"evaluation.files=[{tmp_path / 'missing.jsonl'}]")
    assert "evaluation.files: " in line and "missing.jsonl: no such file" in line
    assert "'question'" in train_error(tmp_path, capsys, f"data.train_files=[{columns}]")


def test_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = train_error(tmp_path, capsys, "actor.lrr=1e-6")
    assert "unknown key 'actor.lrr'" in line and "did you mean 'lr'" in line
    line = train_error(tmp_path, capsys, "rollout.n=0")
    assert "rollout.n: invalid value 0; allowed: an integer >= 1" in line
    line = train_error(tmp_path, capsys, "algorithm.loss_aggregation=token_mean")
    assert "allowed: 'token-mean'" in line
    line = dapo_error(["train", "--config", "tinyy"], capsys)
    assert "config 'tinyy' is neither a file nor a preset (did you mean 'tiny'?)" in line
    line = dapo_error(["config", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert "config file not found" in line and "missing.yaml" in line
    line = train_error(tmp_path, capsys, "reward.function=math_dap")
    assert line.startswith("dapo: error: reward.function: unknown reward function 'math_dap'"), line
    line = train_error(tmp_path, capsys, "reward.function=no_such_module_xyz:score")
    assert "cannot import module 'no_such_module_xyz'" in line
    if importlib.util.find_spec("vllm") is None:
        line = train_error(tmp_path, capsys, "rollout.engine=vllm")
        assert "rollout.engine: 'vllm' needs vLLM" in line


def test_model_checkpoint_and_output_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = train_error(tmp_path, capsys, f"model.path={tmp_path / 'nope'}")
    assert f"model path '{tmp_path / 'nope'}': no such directory; allowed: a Hugging Face" in line
    (tmp_path / "empty_model").mkdir()
    line = train_error(tmp_path, capsys, f"model.path={tmp_path / 'empty_model'}")
    assert "no config.json there" in line
    line = train_error(tmp_path, capsys, "--resume", str(tmp_path / "step_000002"))
    assert f"checkpoint {tmp_path / 'step_000002'}: no such directory" in line
    partial = tmp_path / "checkpoints" / "step_000004"
    partial.mkdir(parents=True)
    line = train_error(tmp_path, capsys, "--resume", str(partial))
    assert "is partial (no COMPLETE marker)" in line
    # a path under a regular file cannot be created (permissions would not do: tests may run as root)
    (tmp_path / "a_file").write_text("")
    line = dapo_error(["train", *QUICK, f"trainer.output_dir={tmp_path / 'a_file' / 'runs'}"], capsys)
    assert f"trainer.output_dir '{tmp_path / 'a_file' / 'runs'}': not writable (" in line
    assert not (tmp_path / "cache").exists()
    line = dapo_error(["eval", "--model", str(tmp_path / "nope"), "--data", "arithmetic"], capsys)
    assert "model path" in line and "no such directory" in line
    line = dapo_error(["eval", "--model", "tiny", "--data", str(tmp_path / "x.jsonl")], capsys)
    assert f"--data: {tmp_path / 'x.jsonl'}: no such file" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = dapo_error(["train", *QUICK, f"trainer.output_dir={ro}"], capsys)
    finally:
        ro.chmod(0o700)
    assert "not writable (Permission denied)" in line


def test_bad_rows_with_strict_and_files_without_usable_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row problems are found when the rows are read (after the model loads): the same one-line error."""
    small = TinyRecipe(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                       sft_steps=0, tokenizer_corpus=300, val_problems=8)  # fmt: skip
    model = ensure_tiny_model(small, cache_dir=tmp_path / "models", progress=False)
    rows = tmp_path / "rows.jsonl"
    ok = {"prompt": "What is 1 + 1?", "reward_model": {"ground_truth": "2"}}
    rows.write_text(json.dumps(ok) + "\n" + json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    args = [f"model.path={model}", f"data.train_files=[{rows}]"]
    line = train_error(tmp_path, capsys, *args, "data.strict=true")
    reason = "row 1 (0-based, line 2): missing key 'reward_model.ground_truth'"
    assert line == f"dapo: error: {rows}: {reason}", line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = train_error(tmp_path, capsys, f"model.path={model}", f"data.train_files=[{empty}]")
    assert "no usable examples" in line and "empty.jsonl" in line
    # without data.strict bad rows are skipped with a one-line warning; with none left, that is an error
    rows.write_text(json.dumps({"prompt": "What is 2 + 2?", "reward_model": {"ground_truth": [4]}}) + "\n")
    code = main(["train", *QUICK, f"trainer.output_dir={tmp_path / 'runs'}", *args])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 2, err
    assert err[0].startswith(f"dapo: warning: {rows}: skipped 1 of 1 rows; first: row 0"), err
    assert err[1].startswith("dapo: error: no usable examples in "), err


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"rollout\.n"):
        main(["--debug", "train", "rollout.n=0"])
    with pytest.raises(ConfigError, match=r"rollout\.n"):
        main(["train", "--debug", "rollout.n=0"])
    monkeypatch.setenv("DAPO_DEBUG", "1")
    with pytest.raises(UserError, match="model path"):
        main(["train", *QUICK, f"trainer.output_dir={tmp_path}", f"model.path={tmp_path / 'nope'}"])


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "DAPO_CACHE": str(tmp_path / "cache")}
    env.pop("DAPO_DEBUG", None)
    args = [sys.executable, "-m", "dapo.cli", "train", f"trainer.output_dir={tmp_path}"]
    run = subprocess.run(
        [*args, f"data.train_files=[{tmp_path / 'missing.parquet'}]"],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr == f"dapo: error: data.train_files: {tmp_path / 'missing.parquet'}: no such file\n"
    debug = subprocess.run(
        [*args, "--debug", f"model.path={tmp_path / 'nope'}"],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_overrides_may_follow_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", "tiny", "rollout.n=4", "--debug", "actor.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "  n: 4\n" in out and "  lr: 0.5\n" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "rollout.n=3", "--nope"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err
