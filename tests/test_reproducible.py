"""A run's results do not depend on whether the tiny model was just built or came from the cache.

The default model takes ~2.5 minutes to build on 2 CPU cores, so this builds a smaller recipe through the
same code path (`model.path=tiny` with `dapo.models.tiny.DEFAULT_RECIPE` replaced), in a fresh cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_e2e import REPO, SHORT
from tests.test_preempt import eval_lines, training_lines

SMALLER = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
           "sft_steps": 60, "target_accuracy": 0.0, "tokenizer_corpus": 500, "val_problems": 16}  # fmt: skip

DAPO_WITH_SMALLER_TINY = """\
import json, sys
import dapo.models.tiny as tiny
tiny.DEFAULT_RECIPE = tiny.TinyRecipe(**json.loads(sys.argv[1]))
from dapo.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_run_that_builds_the_model_equals_one_that_finds_it_cached(tmp_path: Path) -> None:
    env = {**os.environ, "DAPO_CACHE": str(tmp_path / "cache")}
    # without dynamic sampling every step trains (the smaller model is rarely right: its groups are all wrong,
    # and the soft overlong punishment still gives them advantages)
    args = [*SHORT, "trainer.total_steps=3", "algorithm.dynamic_sampling=false"]
    args.append(f"trainer.output_dir={tmp_path}")
    runs = {}
    for name in ("built", "cached"):
        runs[name] = subprocess.run(
            [sys.executable, "-c", DAPO_WITH_SMALLER_TINY, json.dumps(SMALLER), "train", *args,
             f"trainer.run_name={name}"],
            env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
        )  # fmt: skip
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert "building the tiny default model" in runs["built"].stderr
    assert "building" not in runs["cached"].stderr
    built, cached = tmp_path / "built", tmp_path / "cached"
    lines = training_lines(built)
    assert sorted(lines) == [1, 2, 3] and all(line["actor/updates"] >= 1 for line in lines.values())
    assert training_lines(built) == training_lines(cached)
    assert eval_lines(built) == eval_lines(cached) and len(eval_lines(built)) == 2
