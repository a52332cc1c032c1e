"""`dapo export`: a checkpoint's weights as a Hugging Face model directory, a LoRA adapter merged or not."""

from __future__ import annotations

import shutil
from pathlib import Path

from dapo.errors import UserError

__all__ = ["export_checkpoint"]


def _weights_dir(checkpoint: Path) -> Path:
    """The weights a checkpoint (or a weights directory given directly) holds: `adapter/` or `model/`."""
    for name in ("adapter", "model"):
        if (checkpoint / name).is_dir():
            return checkpoint / name
    if (checkpoint / "adapter_config.json").is_file() or (checkpoint / "config.json").is_file():
        return checkpoint
    raise UserError(
        f"{checkpoint}: neither a checkpoint (with model/ or adapter/) nor a model or adapter directory"
    )


def export_checkpoint(checkpoint: Path, out: Path, *, merge: bool = False, base: str | None = None) -> Path:
    """Write ``checkpoint``'s weights to ``out``: a full-weights checkpoint's model as it is; a LoRA
    adapter as it is (PEFT's format) or, with ``merge``, folded into its base model (``base``, default
    the adapter's ``base_model_name_or_path``) and saved in Hugging Face format with the tokenizer."""
    from dapo.models.lora import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config

    if out.exists():
        raise UserError(f"{out}: exists already; allowed: a path that does not exist yet")
    weights = _weights_dir(checkpoint)
    is_adapter = (weights / ADAPTER_CONFIG).is_file()
    if merge and not is_adapter:
        raise UserError(
            f"--merge: {checkpoint} holds full weights, not a LoRA adapter; export it without --merge"
        )
    if not merge:
        shutil.copytree(weights, out)
        return out
    import json

    import torch

    from dapo.config import ModelConfig
    from dapo.models import save_pretrained
    from dapo.models.load import load_policy

    try:
        config = read_adapter_config(weights)
    except ValueError as e:
        raise UserError(str(e)) from e
    base_path = base or str(config.get("base_model_name_or_path") or "")
    if not base_path:
        raise UserError(f"{weights}: the adapter names no base model; give it with --base")
    # merged in float32, saved in the base checkpoint's dtype
    model, tokenizer, base_dir = load_policy(ModelConfig(path=base_path, dtype="float32", device="cpu"))
    load_adapter(model, weights)
    merge_lora(model)
    base_config = json.loads((base_dir / "config.json").read_text())
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(base_config.get("torch_dtype") or base_config.get("dtype")), torch.float32
    )
    save_pretrained(model.to(dtype), out)
    tokenizer.save_pretrained(str(out))
    return out
