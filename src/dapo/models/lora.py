"""Low-rank adapters (LoRA, Hu et al. 2021) on the policy's projections, over frozen base weights.

A target projection ``W x + b`` becomes ``W x + b + (alpha / r) B A dropout(x)`` with ``A`` [r, in] drawn as
the LoRA paper and PEFT draw it (Kaiming-uniform) and ``B`` [out, r] zero, so the first forward is the base
model's. Only ``A`` and ``B`` train: every other parameter is frozen, so it has neither a gradient nor
optimizer state.

One small layer serves both model implementations: `LoRALinear` is the `nn.Linear` it adapts with the two
factors as children ``lora_A`` / ``lora_B`` (PEFT's names). transformers' modules call it as a module; the
native model's projections call `project` / `project_then`, which run the base matmul through the native
kernel choice (`dapo.models.transformer._linear`, with its fused post-ops) and add the adapter's output.
PEFT's own layers replace modules and are called as modules, which the native model's kernel path does not
do; its format is kept instead: `save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained`` loads on the base model, and `load_adapter` reads them back.

Initialisation is per projection from ``(seed, name)`` alone, so every rank, every process and every copy
(an engine's, a resumed run's) draws the same adapters whatever the order or device.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoRALinear",
    "LoRASpec",
    "adapter_names",
    "adapter_state_dict",
    "add_lora",
    "has_lora",
    "load_adapter",
    "merge_lora",
    "merged_state_dict",
    "read_adapter_weights",
    "save_adapter",
    "synced_names",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a rank-``r`` adapter: ``forward(x) = linear(x) + scaling * B(A(dropout(x)))``."""

    lora_A: nn.Linear  # noqa: N815  (PEFT's names, which its checkpoints use)
    lora_B: nn.Linear  # noqa: N815
    lora_dropout: nn.Module
    scaling: float

    def delta(self, x: Tensor) -> Tensor:
        """The adapter's output ``scaling * B A dropout(x)`` (the base projection's shape)."""
        out: Tensor = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return out

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.delta(x)


@dataclass(frozen=True)
class LoRASpec:
    """A run's adapters: `add_lora`'s settings (from ``actor.lora``) and the seed they are drawn from."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    seed: int = 0

    @classmethod
    def of(cls, lora: Any, seed: int) -> LoRASpec | None:
        """The spec of an ``actor.lora`` section (`dapo.config.LoRAConfig`); None when LoRA is off."""
        if lora.rank == 0:
            return None
        return cls(lora.rank, lora.alpha, lora.dropout, tuple(lora.target_modules), seed)

    def add_to(self, model: nn.Module) -> int:
        return add_lora(model, self.rank, self.alpha, self.dropout, self.targets, seed=self.seed)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"dapo-lora-{seed}-{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def add_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str], *, seed: int = 0
) -> int:
    """Give every projection of ``model`` named in ``targets`` a rank-``rank`` adapter and freeze everything
    else; the number of adapted projections. ``A`` (Kaiming-uniform, a = sqrt(5), as `nn.Linear` and PEFT)
    is drawn on the CPU from ``(seed, name)``; ``B`` is zero. A model on the meta device gets meta adapters
    (`init_adapters` fills them once materialised)."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] not in targets:
            continue
        w = module.weight
        module.__class__ = LoRALinear
        lora: Any = module
        lora.lora_A = nn.Linear(module.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        lora.lora_B = nn.Linear(rank, module.out_features, bias=False, device=w.device, dtype=w.dtype)
        lora.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        lora.scaling = alpha / rank
        count += 1
    if count == 0:
        raise ValueError(f"LoRA: no projection of the model is named any of {list(targets)}")
    init_adapters(model, seed)
    return count


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Draw every adapter's initial ``A`` from ``(seed, name)`` and zero ``B`` (no-op on the meta device)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.lora_A.weight.device.type != "meta":
            a = torch.empty(module.lora_A.weight.shape, dtype=torch.float32)
            bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_ with a = sqrt(5)
            a.uniform_(-bound, bound, generator=_generator(seed, name))
            _copy_into(module.lora_A.weight, a)
            _copy_into(module.lora_B.weight, torch.zeros(module.lora_B.weight.shape))


def _copy_into(param: Tensor, full: Tensor) -> None:
    """Copy a full tensor into a parameter, or into this rank's rows of an FSDP2 shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):  # an FSDP2 shard: this rank's chunk of dim 0
        param.copy_(distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(full)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_names(model: nn.Module) -> list[str]:
    """Parameter names of the adapters (``....q_proj.lora_A.weight``), in module order."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def _hf_name(name: str) -> str:
    """A parameter name in the Hugging Face layout (the native model's and transformers' are the same; a
    wrapper's leading ``hf.`` goes)."""
    return name.removeprefix("hf.")


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors by PEFT's names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A
    .weight``), on the CPU."""
    params = dict(model.named_parameters())
    return {_PEFT_PREFIX + _hf_name(n): params[n].detach().cpu().contiguous() for n in adapter_names(model)}


def adapter_config(model: nn.Module, base: str) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``model``'s adapters over base model ``base``."""
    lora = next(m for m in model.modules() if isinstance(m, LoRALinear))
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    dropout = lora.lora_dropout.p if isinstance(lora.lora_dropout, nn.Dropout) else 0.0
    rank = lora.lora_A.out_features
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": lora.scaling * rank,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


def save_adapter(
    model: nn.Module, out_dir: Path, base: str, tensors: dict[str, Tensor] | None = None
) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format into ``out_dir``
    (``tensors``: the adapters' full tensors by PEFT's names, when ``model`` holds only shards of them)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else adapter_state_dict(model), str(out_dir / ADAPTER_WEIGHTS))
    text = json.dumps(adapter_config(model, base), indent=2, sort_keys=True) + "\n"
    (out_dir / ADAPTER_CONFIG).write_text(text)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """A PEFT LoRA ``adapter_config.json``, checked for what dapo can load."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file() or not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{adapter_dir}: not a LoRA adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    config: dict[str, Any] = json.loads(path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: only plain LoRA adapters (peft_type LORA, no DoRA, bias none) load here")
    return config


def read_adapter_weights(adapter_dir: Path, model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of a PEFT LoRA directory by ``model``'s parameter names (``model`` has adapters
    of the same targets: `add_lora`); a ValueError names any that are missing."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    names = {_PEFT_PREFIX + _hf_name(n): n for n in adapter_names(model)}
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ValueError(f"{adapter_dir}: the adapter lacks {missing[:3]} (of {len(missing)})")
    return {name: weights[key] for key, name in names.items()}


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Add the adapters of a PEFT LoRA directory to ``model`` (frozen base) and load their weights."""
    config = read_adapter_config(adapter_dir)
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    add_lora(model, int(config["r"]), float(config["lora_alpha"]), float(config["lora_dropout"]), targets)
    params = dict(model.named_parameters())
    for name, value in read_adapter_weights(adapter_dir, model).items():
        params[name].copy_(value)


def synced_names(model: nn.Module) -> set[str] | None:
    """The parameters an engine's own copy must receive after an update: the adapters (the base is frozen
    and already there), or None for every parameter (no LoRA)."""
    names = adapter_names(model)
    return set(names) if names else None


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the base model's names with every adapter folded in (``W + scaling B A``,
    computed in float32): what an engine without LoRA support (vLLM here) loads."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, module in iter_lora(model):
        state[f"{name}.weight"] = _merged_weight(module)
    return state


def _merged_weight(module: LoRALinear) -> Tensor:
    a, b = module.lora_A.weight.float(), module.lora_B.weight.float()
    return (module.weight.float() + module.scaling * (b @ a)).to(module.weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += scaling * B A``) and turn the projections back into
    plain `nn.Linear` layers; the number merged."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, LoRALinear):
            module.weight.copy_(_merged_weight(module))
            for child in ("lora_A", "lora_B", "lora_dropout"):
                delattr(module, child)
            del module.scaling
            plain: nn.Module = module
            plain.__class__ = nn.Linear
            count += 1
    return count


def iter_lora(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module
