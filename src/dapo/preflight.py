"""Checks of a run's inputs that need no model, made before anything is built or loaded.

A mistyped path should fail in a second with one line naming it, not after minutes of building the tiny
model: the output directory must be writable, the model and checkpoint paths must exist, the data files
must exist and have a readable format (for parquet: a readable footer with the configured columns), and the
reward function must load. Each failure raises a `UserError` that names the config key, the value and what
is allowed. What needs the rows themselves (a bad row with `data.strict=true`, a file with no usable row)
is reported when the data is read, in the same way.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dapo.checkpoint import check_complete
from dapo.config import Config, ConfigError, DataConfig
from dapo.data.dataset import DataError, check_file
from dapo.data.prompts import BUILTIN_TASKS, reader_settings
from dapo.errors import UserError
from dapo.models import kernels
from dapo.models.load import resolve_model_path


def check_train(cfg: Config) -> None:
    """Everything `dapo train` reads or writes, checked before the model is built (the output directory,
    which this creates, last)."""
    check_model_path(cfg.model.path)
    if cfg.checkpoint.resume not in ("none", "auto"):
        check_complete(Path(cfg.checkpoint.resume))
    check_data_files(cfg.data.train_files, cfg.data, "data.train_files")
    check_data_files(cfg.evaluation.files, cfg.data, "evaluation.files")
    check_reward_function(cfg.reward.function)
    check_engine(cfg.rollout.engine)
    check_backend(cfg.trainer.backend)
    check_wandb(cfg.logging.wandb)
    kernels.mode()  # a bad DAPO_KERNELS environment variable: one line now, not in the first forward
    check_output_dir(cfg.trainer.output_dir)


def check_eval(cfg: Config, model_path: str, data_files: Sequence[str], adapter: str | None = None) -> None:
    """Everything `dapo eval` reads, checked before the model is loaded."""
    check_model_path(model_path)
    if adapter is not None:
        check_adapter(adapter)
    check_data_files(data_files, cfg.data, "--data")
    check_reward_function(cfg.reward.function)


def check_adapter(path: str) -> None:
    """A LoRA adapter directory in PEFT's format that dapo can apply."""
    from dapo.models.lora import read_adapter_config

    try:
        read_adapter_config(Path(path))
    except ValueError as e:
        raise UserError(f"--adapter: {e}") from e


def check_output_dir(output_dir: str) -> None:
    """Create `output_dir` if needed and write (then remove) a probe file in it."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".dapo-write-check-"):
            pass
    except OSError as e:
        raise UserError(
            f"trainer.output_dir {output_dir!r}: not writable ({e.strerror or e}); "
            "allowed: a directory this user can create and write"
        ) from e


def check_model_path(path: str) -> None:
    """A Hugging Face checkpoint directory, or a built-in model name (built on first use)."""
    from dapo.models.load import TINY_MODELS

    if path not in TINY_MODELS:
        resolve_model_path(path)


def check_data_files(files: Sequence[str], data: DataConfig, key: str) -> None:
    """Each file exists, has a known format and (parquet) the configured columns; the built-in tasks pass."""
    settings = reader_settings(data, dedup=False)
    for f in files:
        if f in BUILTIN_TASKS:
            continue
        try:
            check_file(f, settings)
        except DataError as e:
            raise DataError(f"{key}: {e}") from e


def check_engine(engine: str) -> None:
    """An engine from an optional extra needs that extra installed."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.engine: 'vllm' needs vLLM, which is not installed here (CPU: make setup-vllm, then "
            ".venv-vllm/bin/dapo; CUDA: pip install -e '.[vllm]'); allowed here: 'native', 'hf'"
        )


def check_backend(backend: str) -> None:
    """The cluster mode needs Ray (the `ray` extra)."""
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "trainer.backend: 'ray' needs Ray, which is not installed here (make setup installs it; or "
            "pip install -e '.[ray]'); allowed here: 'local'"
        )


def check_wandb(on: bool) -> None:
    """`logging.wandb=true` needs the wandb package (the `wandb` extra)."""
    if on and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.wandb: true needs the wandb package, which is not installed here (pip install "
            "'dapo[wandb]'); allowed here: false"
        )


def check_reward_function(spec: str) -> None:
    """The reward function named by `reward.function` imports and is callable."""
    from dapo.rewards.load import load_reward_fn

    try:
        load_reward_fn(spec)
    except ValueError as e:
        raise ConfigError(f"reward.function: {e}") from e
