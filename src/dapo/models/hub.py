"""Hugging Face checkpoints in and out: ``config.json`` + ``model.safetensors`` (or shards).

Only safetensors are read (never pickled ``.bin`` files). `HFCausalLM` wraps a transformers model behind the
native forward signature, the fallback for architectures the native implementation does not cover.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dapo.models.config import ModelArgs
from dapo.models.transformer import CausalLM, KVCache, forward_responses_unshared

__all__ = [
    "HFCausalLM",
    "load_pretrained",
    "resolve_dtype",
    "save_pretrained",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFCausalLM(nn.Module):
    """A transformers ``*ForCausalLM`` with `CausalLM`'s forward signature (no KV cache: use `HFEngine`)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    @property
    def lm_head_weight(self) -> Tensor:
        """The output projection ``[V, D]``."""
        w: Tensor = self.hf.get_output_embeddings().weight  # type: ignore[operator]
        return w

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        *,
        positions: Tensor | None = None,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, T]
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits ``[B, T, V]``, or the final normed hidden states ``[B, T, D]`` with ``return_hidden``."""
        if cache is not None:
            raise ValueError("HFCausalLM does not take a native KVCache; generate with HFEngine")
        if positions is None and attention_mask is not None:
            # transformers derives no positions from the mask in forward(); match the native convention
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {
            "attention_mask": attention_mask,
            "position_ids": positions,
            "use_cache": False,
        }
        if return_hidden:
            hidden: Tensor = self.hf.base_model(input_ids, **kwargs).last_hidden_state  # type: ignore[operator]
            return hidden
        logits: Tensor = self.hf(input_ids, **kwargs).logits
        return logits

    def forward_responses(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        prompt_index: Tensor,
        response_ids: Tensor,
        response_lengths: Tensor | None = None,  # unused: the rows are computed padded
        *,
        return_hidden: bool = False,
    ) -> Tensor:
        """`CausalLM.forward_responses` without prompt sharing: one ``prompt + response`` row each."""
        return forward_responses_unshared(
            self, prompt_ids, prompt_mask, prompt_index, response_ids, return_hidden=return_hidden
        )


def resolve_dtype(dtype: torch.dtype | str | None, config: Mapping[str, Any] | None = None) -> torch.dtype:
    """A torch dtype from a dtype, its name, or (when None) the checkpoint's ``torch_dtype``, else float32."""
    if dtype is None:
        name = (config or {}).get("torch_dtype") or (config or {}).get("dtype") or "float32"
        return _DTYPES.get(str(name), torch.float32)
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {list(_DTYPES)}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(_DTYPES)}")
    return _DTYPES[dtype]


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    implementation: str = "native",
) -> CausalLM | HFCausalLM:
    """Load a HF checkpoint directory as a `CausalLM` (``"native"``) or a wrapped transformers model ("hf").

    ``dtype`` defaults to the checkpoint's ``torch_dtype`` (float32 when absent); the model is in eval mode.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    config = json.loads(config_path.read_text())
    torch_dtype = resolve_dtype(dtype, config)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if implementation == "hf":
        return _load_hf(path, torch_dtype, dev)
    if implementation != "native":
        raise ValueError(f"implementation must be 'native' or 'hf', got {implementation!r}")
    args = ModelArgs.from_hf_config(config)
    tensors = _read_safetensors(path)
    with torch.device("meta"):
        model = CausalLM(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints also store the shared matrix; unused
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match {args.architecture}: {len(missing)} missing tensors "
            f"{missing[:5]}, {len(unexpected)} unexpected tensors {unexpected[:5]}"
        )
    bad = [
        f"{k}: {tuple(t.shape)} != {tuple(expected[k])}" for k, t in tensors.items() if t.shape != expected[k]
    ]
    if bad:
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape: {bad[:5]}")
    state = {k: t.to(device=dev, dtype=torch_dtype) for k, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_hf(path: Path, dtype: torch.dtype, dev: torch.device) -> HFCausalLM:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{dtype_kw: dtype})
    module: nn.Module = hf  # typed as a plain module: transformers' own `to` overloads confuse mypy
    return HFCausalLM(module.to(dev)).eval()


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Which safetensors file of a checkpoint directory holds each tensor (nothing is read)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if not index.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    return {name: path / shard for name, shard in weight_map.items()}


def read_rows(file: Path, name: str, start: int, stop: int) -> Tensor:
    """Rows ``[start, stop)`` of one tensor of a safetensors file, read alone (the file is memory-mapped:
    the other rows and tensors are never loaded)."""
    with safe_open(str(file), framework="pt") as f:
        rows: Tensor = f.get_slice(name)[start:stop]
        return rows


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if not index.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {path} (found {found[:10]}); "
            "only safetensors checkpoints are read"
        )
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise FileNotFoundError(f"shard {shard} named in {index} is missing")
        tensors.update(load_file(path / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{index} lists tensors found in no shard: {absent[:5]}")
    return tensors


def save_pretrained(model: nn.Module, path: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers and `load_pretrained` both read.

    Tied embeddings are stored once (as ``model.embed_tokens.weight``), as transformers does.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HFCausalLM):
        model.hf.save_pretrained(path)  # type: ignore[operator]
        return
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_pretrained takes a CausalLM or HFCausalLM, got {type(model).__name__}")
    dtype = model.lm_head_weight.dtype
    names = {v: k for k, v in _DTYPES.items()}
    config = model.args.to_hf_config()
    config["torch_dtype"] = config["dtype"] = names.get(dtype, "float32")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
