"""`logging.wandb`: the metrics a `RunLogger` writes also go to a Weights & Biases run named after the run
directory, carrying the resolved config. Offline only (``WANDB_MODE=offline``): nothing is sent."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from dapo.config import load_config
from dapo.errors import UserError
from dapo.logger import RunLogger, WandbSettings, wandb_settings


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B in offline mode, its files under tmp_path, and its server a closed local port (were anything
    to be sent, it would fail, not leave this machine)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


def test_settings_from_the_config() -> None:
    assert wandb_settings(load_config("tiny")) is None  # off by default
    cfg = load_config("tiny", ["logging.wandb=true", "logging.wandb_tags=[dapo, tiny]"])
    s = wandb_settings(cfg)
    assert s is not None and s.project == "dapo" and s.tags == ["dapo", "tiny"]
    assert s.config["logging"]["wandb"] is True and s.config["model"]["path"] == cfg.model.path


def test_run_logger_logs_to_an_offline_wandb_run(tmp_path: Path, wandb_offline: Path) -> None:
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    settings = WandbSettings(project="dapo-test", tags=["t"], config={"algorithm": {"clip_high": 0.28}})
    log = RunLogger(run_dir, total_steps=3, start_step=0, tensorboard=False, progress=False, wandb=settings)
    run = log.wandb_run
    assert run.name == "my-run" and run.settings.mode == "offline"
    assert run.config["algorithm"]["clip_high"] == 0.28
    for step in (1, 2, 3):
        log.log(step, {"reward/acc": 0.25 * step, "actor/entropy": float("nan")})
    log.close()
    assert log.wandb_run is None

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = list((wandb_offline / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1, list((wandb_offline / "wandb").iterdir())
    record = offline[0] / f"run-{run_id}.wandb"  # what `wandb sync` would upload
    # W&B's service process writes the record: finish() can return before its last block is on disk. The
    # last step's row (reward/acc = 0.75) is written last: W&B commits a step when the next one begins, or
    # at finish.
    deadline = time.monotonic() + 30
    while b"0.75" not in record.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    data = record.read_bytes()
    assert b"my-run" in data and b"reward/acc" in data and b"0.75" in data
    assert b"actor/entropy" not in data  # non-finite values are dropped, as from metrics.jsonl
    assert (run_dir / "metrics.jsonl").read_text().count("reward/acc") == 3

    # resumed from a checkpoint in the same run directory: the same W&B run continues; started afresh
    # there (no checkpoint, step 0): a new W&B run, whose steps W&B would otherwise drop as already seen
    log = RunLogger(run_dir, total_steps=4, start_step=3, tensorboard=False, progress=False, wandb=settings)
    assert log.wandb_run.id == run_id
    log.log(4, {"reward/acc": 1.0})
    log.close()
    log = RunLogger(run_dir, total_steps=4, start_step=0, tensorboard=False, progress=False, wandb=settings)
    new_id = log.wandb_run.id
    log.close()
    assert new_id != run_id and (run_dir / "wandb_run_id").read_text().strip() == new_id


def test_missing_wandb_package_is_one_line_saying_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError) as e:
        RunLogger(
            tmp_path, total_steps=1, start_step=0, tensorboard=False, progress=False, wandb=WandbSettings()
        )
    message = str(e.value)
    assert "logging.wandb" in message and "pip install 'dapo[wandb]'" in message and "\n" not in message


def test_a_missing_wandb_package_is_caught_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from dapo.config import ConfigError
    from dapo.preflight import check_wandb

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"logging\.wandb: true needs the wandb package"):
        check_wandb(True)
    check_wandb(False)
