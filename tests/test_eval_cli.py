"""`dapo eval`'s protocol: the documented `dapo eval --model DIR --data FILE` evaluates as the paper does
(k 32, temperature 1.0, top-p 0.7, 20,480 response tokens, every row) and prints that protocol before the
scores; `dapo --version`; `python -m dapo` is `dapo`. No model is built or loaded: the model, engine and
scorer are stand-ins, and the tests check what `dapo eval` hands them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dapo
from dapo import evaluate
from dapo.cli import EVAL_PRESET, eval_config_name, main
from dapo.config import load_config
from dapo.data.dataset import Example, Message, prompt_uid
from dapo.data.prompts import PromptSet
from dapo.rollout.base import SamplingParams

SRC = Path(dapo.__file__).resolve().parents[1]


def test_a_data_file_without_config_resolves_the_papers_protocol() -> None:
    assert eval_config_name(None, ["aime-2024.parquet"]) == EVAL_PRESET
    cfg = load_config(EVAL_PRESET)
    ev = cfg.evaluation
    assert (ev.k, ev.temperature, ev.top_p, ev.max_response_length, ev.max_prompts) == (
        32,
        1.0,
        0.7,
        20480,
        0,
    )
    assert cfg.data.max_prompt_length == 2048 and cfg.rollout.engine == "native"


def test_the_builtin_task_keeps_the_default_and_config_wins() -> None:
    assert eval_config_name(None, ["arithmetic"]) == "tiny"
    assert load_config(eval_config_name(None, ["arithmetic"])).evaluation.k == 8
    # one data file among the inputs: the paper's protocol for all of them
    assert eval_config_name(None, ["arithmetic", "x.parquet"]) == EVAL_PRESET
    assert eval_config_name("tiny", ["aime-2024.parquet"]) == "tiny"
    assert eval_config_name("my.yaml", ["arithmetic"]) == "my.yaml"


class _Tokenizer:
    eos_token_id = 0
    unk_token_id = None

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return None


def _examples(rows: int) -> list[Example]:
    messages = (Message("user", "What is 1 + 1?"),)
    return [Example(prompt_uid(messages), messages, "2", "math_dapo", "x.parquet", i) for i in range(rows)]


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`dapo eval` with the model, engine, scorer and evaluation loop replaced; records what they get."""
    seen: dict[str, Any] = {}

    def load_policy(cfg: Any, *, path: str | None = None, device: Any = None) -> tuple[Any, Any, Path]:
        seen["dtype"] = cfg.dtype
        return object(), _Tokenizer(), Path("DIR")

    def load_eval_set(cfg: Any, tokenizer: Any, files: list[str] | None = None) -> PromptSet:
        examples = _examples(960 if not cfg.evaluation.max_prompts else cfg.evaluation.max_prompts)
        return PromptSet(examples=examples, prompt_ids=[[1, 2]] * len(examples), num_too_long=3)

    def fake_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        sampling: SamplingParams = args[-1]
        seen["sampling"] = sampling
        print("generating")
        k = sampling.n
        return {
            f"eval/math_dapo/avg@{k}": 0.5,
            f"eval/math_dapo/pass@{k}": 0.9,
            f"eval/math_dapo/maj@{k}": 0.6,
        }

    monkeypatch.setattr(evaluate, "load_policy", load_policy)
    monkeypatch.setattr(evaluate, "make_engine", lambda *a, **k: object())
    monkeypatch.setattr(
        evaluate, "make_reward_pool", lambda cfg: contextlib.nullcontext(SimpleNamespace(score=None))
    )
    monkeypatch.setattr(evaluate, "load_eval_set", load_eval_set)
    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    return seen


def _aime_like(path: Path) -> Path:
    table = pa.table(
        {
            "prompt": [[{"role": "user", "content": "What is 1 + 1?"}]] * 4,
            "reward_model": [{"ground_truth": "2"}] * 4,
            "data_source": ["math_dapo"] * 4,
        }
    )
    pq.write_table(table, path)
    return path


def test_the_documented_command_evaluates_with_the_papers_protocol_and_prints_it_first(
    stand_ins: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _aime_like(tmp_path / "aime-2024.parquet")
    assert main(["eval", "--model", "tiny", "--data", str(data)]) == 0
    sampling: SamplingParams = stand_ins["sampling"]
    assert (sampling.n, sampling.temperature, sampling.top_p, sampling.max_tokens) == (32, 1.0, 0.7, 20480)
    lines = capsys.readouterr().out.splitlines()
    protocol = next(i for i, line in enumerate(lines) if line.startswith("protocol"))
    assert lines[protocol] == (
        f"protocol ({EVAL_PRESET}): k=32 samples per row, temperature 1.0, top-p 0.7, response budget 20,480 "
        "tokens; rows: all 960, prompts <= 2,048 tokens (3 longer ones skipped)"
    )
    scores = next(i for i, line in enumerate(lines) if "math_dapo/avg@32" in line)
    assert protocol < lines.index("generating") < scores
    assert "DIR: 960 prompt rows x k=32 samples" in lines


def test_the_protocol_line_follows_config_and_overrides(
    stand_ins: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", "tiny", "--data", "arithmetic", "--k", "4", "evaluation.max_prompts=12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "protocol (tiny): k=4 samples per row, temperature 1.0, top-p 1.0, response budget 64 tokens; "
        "rows: the first 12 (evaluation.max_prompts), prompts <= 128 tokens (3 longer ones skipped)"
    ) in out
    assert stand_ins["sampling"].max_tokens == 64


def _python_m_dapo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COLUMNS": "100",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "dapo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_version_and_python_m_dapo_is_dapo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"dapo {dapo.__version__}\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: dapo ") and "--version" in help_text
    version = _python_m_dapo("--version")
    assert (version.returncode, version.stdout) == (0, f"dapo {dapo.__version__}\n"), version.stderr
    helped = _python_m_dapo("--help")
    assert (helped.returncode, helped.stdout) == (0, help_text), helped.stderr
