"""The policy a `model` config section names: its checkpoint directory (``tiny``: built on first use; a
Hugging Face Hub id: from the local Hub cache, else downloaded), the model on its device and in its dtype,
and its tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapo.config import ModelConfig
from dapo.errors import UserError
from dapo.models.hub import load_pretrained
from dapo.models.tokenizer import load_tokenizer
from dapo.runtime import resolve_device, retain_freed_memory

# `org/name` as the Hub spells it (the rule of huggingface_hub's `validate_repo_id`, with the org required:
# a bare name is read as a local directory)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

# what loading needs from a Hub repository: the config, the weights and the tokenizer (not other formats'
# weights, which would multiply the download)
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
]


TINY_MODELS = ("tiny", "tiny-countdown")
"""Names of the built-in models (`dapo.models.tiny.RECIPES`): the arithmetic and the Countdown warm-up."""


def is_hub_id(path: str) -> bool:
    """``org/name`` that names no local directory: a Hugging Face Hub repository id."""
    well_formed = bool(HUB_ID.fullmatch(path)) and len(path) <= 96 and ".." not in path and "--" not in path
    return well_formed and not Path(path).exists()


def cached_hub_config(repo_id: str, cache_dir: str | Path | None = None) -> Path | None:
    """The config.json of Hub repository ``repo_id`` in the local Hub cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError:  # an id huggingface_hub rejects
        return None
    return Path(found) if isinstance(found, str) else None


def resolve_model_path(path: str, *, progress: bool = True) -> Path:
    """A checkpoint directory; "tiny" / "tiny-countdown" build (once, then cached) a built-in
    tiny model; a Hub id
    (``Qwen/Qwen2.5-7B``) is found in the local Hub cache or downloaded into it (`hub_snapshot`)."""
    if path in TINY_MODELS:
        from dapo.models.tiny import RECIPES, ensure_tiny_model

        # a run must not depend on the build
        return ensure_tiny_model(RECIPES[path], progress=progress, isolated=True)
    if is_hub_id(path):
        return hub_snapshot(path)
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "no such directory" if not p.exists() else "no config.json there"
        raise UserError(
            f"model path {path!r}: {what}; allowed: a Hugging Face checkpoint directory "
            "(config.json, *.safetensors, tokenizer files), a Hub id (org/name), 'tiny' or 'tiny-countdown'"
        )
    return p


def hub_snapshot(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint directory of Hub repository ``repo_id``: its snapshot in the local cache
    (``HF_HUB_CACHE``; no network) when it holds the weights, else downloaded (the config, safetensors and
    tokenizer files only). Offline (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, an id not in the
    cache is a one-line `UserError`."""
    from huggingface_hub import constants, snapshot_download

    def complete(d: Path) -> bool:  # a partial snapshot (say config.json alone) is not a checkpoint
        return (d / "config.json").is_file() and any(d.glob("*.safetensors"))

    try:
        local = Path(
            snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=HUB_FILES, local_files_only=True)
        )
        if complete(local):
            return local
    except (OSError, ValueError):  # not cached (or cached incompletely): download below
        pass
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"model path {repo_id!r}: not a local directory, and not in the Hugging Face Hub cache "
            f"({cache_dir or constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1; download it where the Hub is "
            f"reachable (`hf download {repo_id}`), or give a checkpoint directory"
        )
    try:
        local = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=HUB_FILES))
    except (OSError, ValueError) as e:  # not found, gated, unreachable (huggingface_hub raises OSErrors)
        cause = e.__cause__ if isinstance(e.__cause__, Exception) else e  # the connection error, if one
        lines = str(cause).strip().splitlines()
        reason = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
        raise UserError(
            f"model path {repo_id!r}: not a local directory, and the Hugging Face Hub gave no checkpoint "
            f"({reason}); check the id, the network, or HF_TOKEN for a gated model"
        ) from e
    if not complete(local):
        raise UserError(
            f"model path {repo_id!r}: the Hub repository has no config.json and *.safetensors weights; "
            "allowed: a transformers checkpoint in safetensors"
        )
    return local


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
