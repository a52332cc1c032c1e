"""The policy a `model` config section names: its checkpoint directory (``tiny``: built on first use), the
model on its device and in its dtype, and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapo.config import ModelConfig
from dapo.errors import UserError
from dapo.models.hub import load_pretrained
from dapo.models.tokenizer import load_tokenizer
from dapo.runtime import resolve_device, retain_freed_memory


def resolve_model_path(path: str, *, progress: bool = True) -> Path:
    """A checkpoint directory; "tiny" builds (once, then cached) the built-in tiny model."""
    if path == "tiny":
        from dapo.models.tiny import ensure_tiny_model

        return ensure_tiny_model(progress=progress, isolated=True)  # a run must not depend on the build
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "no such directory" if not p.exists() else "no config.json there"
        raise UserError(
            f"model path {path!r}: {what}; allowed: a Hugging Face checkpoint directory "
            "(config.json, *.safetensors, tokenizer files) or 'tiny'"
        )
    return p


def load_policy(
    cfg: ModelConfig, *, path: str | None = None, device: torch.device | None = None
) -> tuple[nn.Module, Any, Path]:
    """The policy model (on its device, in its dtype), its tokenizer, and the checkpoint directory.
    ``device`` overrides `model.device` (a data-parallel rank's own GPU)."""
    model_dir = resolve_model_path(path or cfg.path)
    device = device or resolve_device(cfg.device)
    if device.type == "cpu":
        retain_freed_memory()
    model = load_pretrained(model_dir, dtype=cfg.dtype, device=device, implementation=cfg.implementation)
    tokenizer = load_tokenizer(model_dir)
    return model, tokenizer, model_dir
