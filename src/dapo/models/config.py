"""`ModelArgs`: the hyperparameters of a dense Llama / Qwen2 / Qwen3 decoder, read from a HF ``config.json``.

Both config dialects are read: transformers 4.x (``rope_theta`` and ``rope_scaling`` at the top level) and 5.x
(``rope_parameters``). `ModelArgs.to_hf_config` writes the 4.x spelling, which 5.x still reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelArgs", "RopeScaling", "UnsupportedModelError"]

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""Architecture name (``config.json`` ``architectures[0]``) → HF ``model_type``."""

_SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its features is not covered by the native implementation."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency scaling of the rotary embedding (HF ``rope_type: "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    """Shape and numerics of a dense decoder-only transformer of the Llama / Qwen2 / Qwen3 family."""

    architecture: str
    """HF architecture name, one of `SUPPORTED_ARCHITECTURES`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """Grouped-query attention: each K/V head serves num_attention_heads // num_key_value_heads queries."""
    head_dim: int
    """Per-head width; Qwen3 sets it independently of ``hidden_size // num_attention_heads``."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    """``lm_head`` reuses ``embed_tokens.weight`` (no separate tensor)."""
    qkv_bias: bool = False
    """Bias on q/k/v projections (always on for Qwen2)."""
    o_bias: bool = False
    """Bias on the attention output projection (Llama / Qwen3 ``attention_bias``)."""
    mlp_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each head of q and k before the rotary embedding (Qwen3)."""
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    """The checkpoint's parameter dtype, as written in ``config.json``."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(_unsupported_message(self.architecture))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelArgs.{name} must be >= 1, got {getattr(self, name)}")
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h < 1 or kv < 1 or h % kv != 0:
            raise ValueError(
                f"num_attention_heads ({h}) must be a positive multiple of num_key_value_heads ({kv})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def model_type(self) -> str:
        """HF ``model_type`` of the architecture ("llama", "qwen2", "qwen3")."""
        return SUPPORTED_ARCHITECTURES[self.architecture]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes of one token: keys and values of every layer's key-value heads."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> ModelArgs:
        """Read a HF ``config.json`` dict; unsupported features raise `UnsupportedModelError`."""
        archs = d.get("architectures") or []
        if not archs:
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            if d.get("model_type") not in by_type:
                raise UnsupportedModelError(
                    f"config.json has no 'architectures' and model_type {d.get('model_type')!r} is not in "
                    f"{sorted(by_type)}"
                )
            archs = [by_type[d["model_type"]]]
        arch = str(archs[0])
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(_unsupported_message(arch))
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if d.get(k) is None
        ]
        if missing:
            raise ValueError(f"config.json for {arch} lacks required keys: {missing}")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("use_sliding_window", False):
            raise UnsupportedModelError(
                "sliding-window attention (use_sliding_window: true) is not supported"
            )
        heads = int(d["num_attention_heads"])
        theta, scaling = _read_rope(d)
        attention_bias = bool(d.get("attention_bias", False))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        eos = d.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) and arch == "LlamaForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers loads as the same architecture with the same shapes."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "dtype": self.torch_dtype,
            "use_cache": True,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.architecture == "Qwen2ForCausalLM":
            d["use_sliding_window"] = False
        else:
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"{self.architecture} has one attention_bias flag; got qkv/o bias differing")
            d["attention_bias"] = self.qkv_bias
        if self.architecture == "LlamaForCausalLM":
            d["mlp_bias"] = self.mlp_bias
        return d


def _unsupported_message(arch: str) -> str:
    return (
        f"architecture {arch!r} is not supported by the native implementation; supported: "
        f"{sorted(SUPPORTED_ARCHITECTURES)}. Use implementation='hf' to run it with transformers."
    )


def _read_rope(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from either the 4.x or the 5.x config dialect."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters / rope_scaling must be a dict, got {params!r}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {list(_SUPPORTED_ROPE_TYPES)}"
        )
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings") or d["max_position_embeddings"]
            ),
        )
    except KeyError as e:
        raise ValueError(f"llama3 rope_scaling lacks the key {e.args[0]!r}") from None
    return theta, scaling
