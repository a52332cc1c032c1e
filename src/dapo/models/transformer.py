"""A compact dense decoder (Llama / Qwen2 / Qwen3) with HF-identical parameter names, and its KV cache.

Parameter names and shapes equal those of transformers' ``*ForCausalLM`` so that state dicts map 1:1.
Numerics follow transformers' (float32 RMSNorm statistics, rotary tables computed in float32 then cast to the
model dtype). Two shortcuts, equal in float32 and differing only by bf16 rounding: `F.rms_norm` (one rounding
instead of two) and the rotary embedding as ``x * cos + roll(x, Dh/2) * sin_signed`` (3 kernels instead of 7).
The model knows nothing of sampling or parallelism; `KVCache` is shaped for `dapo.rollout.NativeEngine`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from dapo.models import kernels
from dapo.models.config import ModelArgs
from dapo.models.lora import LoRALinear

__all__ = ["CausalLM", "KVCache", "forward_responses_unshared"]


class KVCache:
    """Preallocated keys and values for generation: per layer ``[B, H_kv, max_len, Dh]``.

    All rows share one write cursor ``length`` (slots ``[0, length)`` are filled); rows with shorter prompts
    are left-padded, which `valid` records. ``pos`` is each row's next rotary position (its count of real
    tokens), so a padded row gets the same positions as it would unpadded.

    `share_prefix` turns the filled slots into a read-only prefix that several rows continue (the prompt of a
    group of samples): its keys and values are stored once per prompt and read once per decode step for all
    of the prompt's rows (cascade attention), instead of being copied to every row.
    """

    def __init__(
        self, args: ModelArgs, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch_size, args.num_key_value_heads, max_len, args.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        # Slots past `length` are never attended, so they may start as "valid"; only padding is written.
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # [B, max_len]
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.length = 0
        self.max_len = max_len
        self.padded = False
        """Whether any filled slot is padding (if not, attention needs no mask)."""
        self.prefix: _Prefix | None = None

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.pos.shape[0]

    @property
    def max_position(self) -> int:
        """One past the largest rotary position a row can reach (prefix and own slots)."""
        return self.max_len + (0 if self.prefix is None else self.prefix.k[0].shape[2])

    def select(self, rows: Tensor) -> None:
        """Keep only ``rows`` (a ``[B']`` index tensor, repeats allowed), in that order."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid = self.valid.index_select(0, rows)
        self.pos = self.pos.index_select(0, rows)
        if self.prefix is not None:
            self.prefix = self.prefix.select(rows)

    def share_prefix(self, owners: Tensor, max_len: int) -> None:
        """Make the filled slots of all rows a shared prefix, continued by ``len(owners)`` new rows: row i
        continues old row ``owners[i]`` (``[B']``), with ``max_len`` slots of its own (empty, cursor at 0)."""
        if self.prefix is not None:
            raise ValueError("the cache already has a shared prefix")
        n, dev = self.length, self.pos.device
        keys = [k[:, :, :n] for k in self.k]  # [U, H_kv, P, Dh]
        values = [v[:, :, :n] for v in self.v]
        valid = self.valid[:, :n]
        self.prefix = _Prefix.build(keys, values, None if bool(valid.all()) else valid, owners)
        shape = (len(owners), *self.k[0].shape[1:2], max_len, self.k[0].shape[3])
        self.k = [torch.empty(shape, dtype=k.dtype, device=dev) for k in self.k]
        self.v = [torch.empty(shape, dtype=v.dtype, device=dev) for v in self.v]
        self.valid = torch.ones(len(owners), max_len, dtype=torch.bool, device=dev)
        self.pos = self.pos.index_select(0, owners)
        self.length, self.max_len, self.padded = 0, max_len, False

    def extend(self, prompts: KVCache | None, owners: Tensor) -> None:
        """Add rows (continuous batching) that continue shared prompts: ``prompts`` holds new prompts' filled
        slots (the shared prefix's width, no prefix of its own; None: no new prompt); new row i continues
        prompt ``owners[i]`` (``[r]``, indices into the shared prompts followed by the new ones). The new
        rows' own slots before the write cursor are masked out, so they attend to their prompt and then to
        their own tokens only."""
        prefix = self.prefix
        if prefix is None:
            raise ValueError("extend needs a cache with a shared prefix")
        U, n, dev = prefix.k[0].shape[0], prefix.k[0].shape[2], self.pos.device
        keys, values, valid, pos = prefix.k, prefix.v, prefix.valid, self._prompt_lengths()
        if prompts is not None:
            if prompts.prefix is not None or prompts.length != n:
                raise ValueError(f"extend needs new prompts of the prefix's width {n}, got {prompts.length}")
            keys = [torch.cat([a, b[:, :, :n]]) for a, b in zip(keys, prompts.k, strict=True)]
            values = [torch.cat([a, b[:, :, :n]]) for a, b in zip(values, prompts.v, strict=True)]
            if valid is not None or not bool(prompts.valid[:, :n].all()):
                old = valid if valid is not None else torch.ones(U, n, dtype=torch.bool, device=dev)
                valid = torch.cat([old, prompts.valid[:, :n]])
            pos = torch.cat([pos, prompts.pos])
        self.prefix = _Prefix.build(keys, values, valid, torch.cat([prefix.owner, owners]))
        r, (_, H, L, D) = len(owners), self.k[0].shape
        # zeros, not empty: the new rows' slots before the cursor are read (masked), and 0 x NaN is NaN
        self.k = [torch.cat([k, k.new_zeros(r, H, L, D)]) for k in self.k]
        self.v = [torch.cat([v, v.new_zeros(r, H, L, D)]) for v in self.v]
        fresh = torch.ones(r, L, dtype=torch.bool, device=dev)
        fresh[:, : self.length] = False
        self.valid = torch.cat([self.valid, fresh])
        self.pos = torch.cat([self.pos, pos.index_select(0, owners)])
        self.padded = self.padded or self.length > 0

    def _prompt_lengths(self) -> Tensor:
        """``[U]`` the real tokens of each shared prompt (its rotary position count)."""
        assert self.prefix is not None
        U, n = self.prefix.k[0].shape[0], self.prefix.k[0].shape[2]
        if self.prefix.valid is None:
            return torch.full((U,), n, dtype=torch.long, device=self.pos.device)
        return self.prefix.valid.sum(1)

    def drop_prompts(self, keep: Tensor) -> None:
        """Keep only the shared prompts ``keep`` (``[U']``, ascending; every row's prompt among them)."""
        prefix = self.prefix
        if prefix is None:
            raise ValueError("the cache has no shared prefix")
        remap = torch.full((prefix.k[0].shape[0],), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(len(keep), device=keep.device)
        owner = remap.index_select(0, prefix.owner)
        if bool((owner < 0).any()):
            raise ValueError("drop_prompts would drop a prompt that a row continues")
        valid = None if prefix.valid is None else prefix.valid.index_select(0, keep)
        self.prefix = _Prefix.build(
            [k.index_select(0, keep) for k in prefix.k],
            [v.index_select(0, keep) for v in prefix.v],
            valid,
            owner,
        )

    def rebase(self, shift: int) -> None:
        """Move every row's own slots ``shift`` to the left (the first ``shift`` slots must be free or
        masked for every row): the write cursor goes back by ``shift``, positions stay."""
        if not 0 <= shift <= self.length:
            raise ValueError(f"rebase by {shift} with {self.length} slots filled")
        n = self.length - shift
        for t in (*self.k, *self.v):
            t[:, :, :n] = t[:, :, shift : self.length].clone()
        self.valid[:, :n] = self.valid[:, shift : self.length].clone()
        self.valid[:, n:] = True
        self.length = n
        self.padded = bool((~self.valid[:, :n]).any())


@dataclass(frozen=True)
class _Prefix:
    """`KVCache`'s shared prefix: per layer ``[U, H_kv, P, Dh]`` keys and values of U prompts; row i of the
    cache continues prompt ``owner[i]``. For attention the rows are laid out on a ``[U, G]`` grid (G = the
    most rows of one prompt): row i sits at flat cell ``slot[i]``; ``dense`` when the rows fill the grid in
    order (no scatter needed)."""

    k: list[Tensor]
    v: list[Tensor]
    mask: Tensor | None  # [B, 1, 1, P] True = real prefix token (None: no padding)
    valid: Tensor | None  # [U, P]
    owner: Tensor  # [B]
    slot: Tensor  # [B]
    G: int
    dense: bool

    @staticmethod
    def build(k: list[Tensor], v: list[Tensor], valid: Tensor | None, owner: Tensor) -> _Prefix:
        U = k[0].shape[0]
        # rank of each row among the earlier rows of its prompt
        onehot = F.one_hot(owner, U)  # [B, U]
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # [B]
        G = int(rank.max()) + 1 if len(owner) else 1
        slot = owner * G + rank
        dense = len(owner) == U * G and bool((slot == torch.arange(len(owner), device=owner.device)).all())
        mask = None if valid is None else valid.index_select(0, owner)[:, None, None, :]
        return _Prefix(k, v, mask, valid, owner, slot, G, dense)

    def select(self, rows: Tensor) -> _Prefix:
        return _Prefix.build(self.k, self.v, self.valid, self.owner.index_select(0, rows))

    def to_grid(self, t: Tensor) -> Tensor:
        """Rows ``[B, H_kv, r, X]`` -> ``[U, H_kv, G*r, X]`` (a prompt's rows side by side; zeros fill)."""
        _, H, r, X = t.shape
        U = self.k[0].shape[0]
        if not self.dense:
            t = t.new_zeros(U * self.G, H, r, X).index_copy_(0, self.slot, t)
        return t.view(U, self.G, H, r, X).transpose(1, 2).reshape(U, H, self.G * r, X)

    def from_grid(self, t: Tensor, r: int) -> Tensor:
        """The inverse of `to_grid`: ``[U, H_kv, G*r, X]`` -> rows ``[B, H_kv, r, X]``."""
        U, H, _, X = t.shape
        t = t.view(U, H, self.G, r, X).transpose(1, 2).reshape(U * self.G, H, r, X)
        return t if self.dense else t.index_select(0, self.slot)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


# Every training step has new matmul shapes (token counts vary), and each primitive that oneDNN and PyTorch's
# wrapper of it cache (1024 of each by default) holds memory: the default run's RSS grew ~30 MB per step
# (3.1 GB after 250 steps). 64 covers one step's distinct shapes. Read when the first primitive is made (the
# probe below), so set here; values in the environment win.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "64")


def _probe_onednn() -> bool:
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.T))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_FP32 = _probe_onednn()
"""Whether oneDNN's float32 matmul is usable (PyTorch built with mkldnn, as the x86 and arm64 wheels are)."""


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_FUSABLE = (torch.float32,) * _ONEDNN_FP32 + (torch.bfloat16,) * (_ONEDNN_FP32 and _onednn_bf16())
"""Dtypes whose CPU matmuls oneDNN can run, with a fused elementwise post-op (`_linear_then`) or a prepacked
weight; whether it does is the measured kernel choice (`dapo.models.kernels`, `_onednn`)."""

_PACKED: contextvars.ContextVar[dict[int, Tensor] | None] = contextvars.ContextVar("packed", default=None)
"""Prepacked weights by ``id`` of the parameter, inside `CausalLM.packed_weights` (else None)."""


def _needs_grad(x: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _onednn(x: Tensor, weight: Tensor, *, packed: bool = False) -> bool:
    """Whether ``x @ weight.T`` runs on oneDNN (else ATen's ``F.linear``): on CPU, a dtype in `_FUSABLE`,
    16+ rows, no autocast (whose casts only ATen's ops know), and the measured choice for the shape class
    (``linear`` with gradients, ``inference`` without; ``packed``: with a prepacked weight)."""
    if x.dtype not in _FUSABLE or x.device.type != "cpu" or x.numel() < 16 * x.shape[-1]:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return _onednn_choice(
        x.dtype, x.numel() // x.shape[-1], tuple(weight.shape), _needs_grad(x, weight), packed
    )


def _onednn_choice(dtype: torch.dtype, rows: int, wshape: tuple[int, ...], grad: bool, packed: bool) -> bool:
    r = kernels.rows_class(rows)
    shape = (r, *wshape, int(packed and not grad))
    choice = "linear" if grad else "inference"
    timer = functools.partial(_linear_workload, dtype=dtype, rows=r, wshape=wshape, grad=grad, packed=packed)
    return kernels.decide(choice, dtype, shape, timer) == "onednn"


def _linear_workload(
    candidate: str, *, dtype: torch.dtype, rows: int, wshape: tuple[int, ...], grad: bool, packed: bool
) -> Callable[[], object]:
    """`kernels.decide`'s timing of one candidate: the forward (and with ``grad`` both gradient matmuls)."""
    x = kernels.random_like((rows, wshape[1]), dtype, grad=grad)
    w = kernels.random_like(wshape, dtype, grad=grad)
    if grad:
        g = torch.ones(rows, wshape[0], dtype=dtype)
        fn = _OneDNNLinear.apply if candidate == "onednn" else F.linear

        def train() -> object:
            return torch.autograd.grad(fn(x, w, None), (x, w), g)

        return train
    if candidate == "aten":
        return lambda: F.linear(x, w)
    wp = torch.ops.mkldnn._reorder_linear_weight(w, rows) if packed else w
    return lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, or on CPU the same matmul through oneDNN where that was measured faster (`_onednn`).

    oneDNN's float32 AVX-512 kernels measured 2.2x faster than MKL's sgemm (450 vs 200 GFLOPS on 2 cores) on
    an AMD EPYC (Zen 5), where MKL runs AVX2 kernels; on Intel Xeons they are close. Results differ from
    MKL's by float32 summation order. The op has no autograd formula, so training goes through
    `_OneDNNLinear`, which supplies one. Inside `CausalLM.packed_weights` a prepacked copy of ``weight`` is
    used when there is one.
    """
    grad = _needs_grad(x, weight)
    packed = None if grad else _packed(weight)
    if not _onednn(x, weight, packed=packed is not None):
        return F.linear(x, weight, bias)
    if grad:
        return cast(Tensor, _OneDNNLinear.apply(x, weight, bias))
    out: Tensor = torch.ops.mkldnn._linear_pointwise(
        x, weight if packed is None else packed, bias, "none", [], ""
    )
    return out


def _packed(weight: Tensor) -> Tensor | None:
    """The prepacked copy of ``weight`` inside `CausalLM.packed_weights`, if there is one."""
    packs = _PACKED.get()
    return None if packs is None else packs.get(id(weight))


def _linear_then(
    x: Tensor, weight: Tensor, bias: Tensor | None, post: str, other: Tensor | None = None
) -> Tensor:
    """``x @ weight.T + bias`` followed by ``post``: ``"swish"`` = silu of it, ``"mul"`` / ``"add"`` = it
    times / plus ``other`` (same shape as the result).

    Without gradients (generation, old log-probs) where oneDNN runs the matmul (`_onednn`), it applies the
    post-op inside the matmul, on the tile still in cache: a decode step's MLP is 3 kernels instead of 5 and
    the residual adds come free (decode steps 2-3% faster, 3M and 25M models, fp32 and bf16, AMD EPYC). With
    gradients, or elsewhere, it is the plain composite; float32 results agree to rounding (oneDNN's swish
    differs from `F.silu` by ~1e-7 relative; the adds and the product are exact).
    """
    packed = _packed(weight)
    if not _needs_grad(x, weight) and _onednn(x, weight, packed=packed is not None):
        w = weight if packed is None else packed
        if other is None:
            out: Tensor = torch.ops.mkldnn._linear_pointwise(x, w, bias, post, [], "")
        else:
            out = torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), w, bias, post)
        return out
    y = _linear(x, weight, bias)
    if post == "swish":
        return F.silu(y)
    assert other is not None
    return y * other if post == "mul" else other + y


def _project(x: Tensor, m: nn.Linear) -> Tensor:
    """Projection ``m`` of ``x`` through `_linear`, plus its LoRA adapter's output where it has one
    (`dapo.models.lora`; the adapter's two small matmuls go through `_linear` too)."""
    y = _linear(x, m.weight, m.bias)
    return y + _adapter(x, m) if isinstance(m, LoRALinear) else y


def _adapter(x: Tensor, m: LoRALinear) -> Tensor:
    return _linear(_linear(m.lora_dropout(x), m.lora_A.weight), m.lora_B.weight) * m.scaling


def _project_then(x: Tensor, m: nn.Linear, post: str, other: Tensor | None = None) -> Tensor:
    """`_linear_then` of projection ``m``; with a LoRA adapter its output joins before ``post`` (into the
    fused residual add for ``"add"``)."""
    if not isinstance(m, LoRALinear):
        return _linear_then(x, m.weight, m.bias, post, other)
    delta = _adapter(x, m)
    if post == "add":
        assert other is not None
        return _linear_then(x, m.weight, m.bias, "add", other + delta)
    y = _linear(x, m.weight, m.bias) + delta
    if post == "swish":
        return F.silu(y)
    assert other is not None
    return y * other


class _OneDNNLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with all three matmuls (forward, input and weight gradients) on oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        linear = torch.ops.mkldnn._linear_pointwise
        grad2 = grad.reshape(-1, grad.shape[-1])  # [N, out]
        dx = linear(grad, weight.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None  # [.., in]
        dw = None
        if ctx.needs_input_grad[1]:
            dw = linear(grad2.t(), x.reshape(-1, x.shape[-1]).t(), None, "none", [], "")  # [out, in]
        db = grad2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


@dataclass(frozen=True)
class _SharedPrefix:
    """The token layout of `CausalLM.forward_responses`: ``n`` left-padded prompts of ``P`` tokens, then the
    response tokens, flattened into one token axis (so every linear layer runs once over all of them). The
    responses are ``b`` rows of ``T`` tokens for attention; on the token axis only their real tokens are kept
    (``packed`` lists their slots in the ``[b*T]`` rows; None = no padding). Response row i continues prompt
    ``prompt_index[i]``."""

    n: int
    P: int
    b: int
    T: int
    prompt_index: Tensor  # [b]
    prompt_mask: Tensor | None  # [n, 1, P, P] bool (None: no padding, plain causal)
    # [b, 1, T, P + T] bool: the prompt's real tokens, then causal (unpadded prompts: bottom-right causal)
    response_mask: Tensor | CausalBias
    packed: Tensor | None  # [m] slots of the kept response tokens in [b*T]

    def rows(self, t: Tensor) -> Tensor:
        """Response tokens of the token axis ``[m, ...]`` -> ``[b*T, ...]`` rows (zeros at padding)."""
        if self.packed is None:
            return t
        return t.new_zeros(self.b * self.T, *t.shape[1:]).index_copy(0, self.packed, t)

    def tokens(self, t: Tensor) -> Tensor:
        """The inverse of `rows`: ``[b*T, ...]`` -> the kept tokens ``[m, ...]``."""
        return t if self.packed is None else t.index_select(0, self.packed)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, T, H, Dh] by cos/sin [B, T, 1, Dh]; ``sin`` carries the sign of HF's rotate_half."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


_HALF = (torch.bfloat16, torch.float16)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention``; on CPU for 16-bit inputs (or 16-bit autocast) in float32 and
    cast back where that was measured faster (kernel choice ``attention``): PyTorch's bf16 CPU flash kernel
    lost to its float32 one on an AMD EPYC (forward + backward 11.6 vs 7.4 ms for a 25M-model micro-batch);
    float32 is also the more accurate."""
    if q.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        if dtype in _HALF:
            # under autocast q and k leave RoPE in float32 (cos/sin are float32) while v is bf16: cast all
            # three here, since a mask subclass (`torch.nn.attention.bias`) checks dtypes before autocast
            work = torch.float32 if _attention_choice(q, k, dtype, **kwargs) == "float32" else dtype
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.to(work), k.to(work), v.to(work), **kwargs)
            return out.to(dtype)
    dev = q.device.type
    if torch.is_autocast_enabled(dev) and q.dtype != v.dtype:
        # the same dtype mix off CPU (CUDA bf16-mixed): the CausalBias mask checks dtypes before autocast
        # would cast, so cast to autocast's dtype here
        dtype = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _attention_choice(q: Tensor, k: Tensor, dtype: torch.dtype, **kwargs: Any) -> str:
    """The ``attention`` kernel choice for SDPA of this shape class (query and key lengths rounded, masked or
    not, with gradients or not)."""
    H, Lq, Dh = q.shape[-3:]
    Hkv, Lk = k.shape[-3], k.shape[-2]
    grad = torch.is_grad_enabled() and q.requires_grad
    masked = kwargs.get("attn_mask") is not None or bool(kwargs.get("is_causal"))
    lq, lk = kernels.rows_class(Lq), kernels.rows_class(Lk)
    shape = (H, Hkv, Dh, lq, lk, int(masked), int(grad))

    def timer(candidate: str) -> Callable[[], object]:
        B = max(1, 512 // lq)  # ~512 query rows: a micro-batch's worth, a few ms
        qs, ks = (
            kernels.random_like((B, H, lq, Dh), dtype, grad=grad),
            kernels.random_like((B, Hkv, lk, Dh), dtype, grad=grad),
        )
        vs = kernels.random_like((B, Hkv, lk, Dh), dtype, grad=grad)
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if masked else None
        up = candidate == "float32"
        return kernels.time_sdpa(qs, ks, vs, upcast=up, grad=grad, mask=mask, gqa=Hkv != H)

    return kernels.decide("attention", dtype, shape, timer)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention as two matmuls and a float32 softmax: ``q`` [B, H_kv, r, Dh], ``k``/``v`` [B, H_kv, L, Dh],
    ``mask`` [B, 1, 1, L] (True = may attend) or None."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).float()  # [B, H_kv, r, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def _decode_choice(q: Tensor, k: Tensor, mask: Tensor | None) -> str:
    """The ``decode`` kernel choice (matmuls or SDPA) for a decode step's attention without a shared prefix
    of this shape class (keys rounded to 64 / 256 / 1024, masked or not); timed at batch 64."""
    _, Hkv, r, Dh = q.shape
    L = kernels.rows_class(k.shape[2])
    shape = (Hkv, r, Dh, L, int(mask is not None))

    def timer(candidate: str) -> Callable[[], object]:
        qs = kernels.random_like((64, Hkv, r, Dh), q.dtype)
        ks, vs = (
            kernels.random_like((64, Hkv, L, Dh), q.dtype),
            kernels.random_like((64, Hkv, L, Dh), q.dtype),
        )
        m = None if mask is None else torch.ones(64, 1, 1, L, dtype=torch.bool)
        if candidate == "matmul":
            return lambda: _matmul_attention(qs, ks, vs, m)
        return lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m)

    with torch.no_grad():
        return kernels.decide("decode", q.dtype, shape, timer)


def _decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix: _Prefix | None = None, layer: int = 0
) -> Tensor:
    """Attention of a few queries per K/V head: ``q`` [B, H_kv, r, Dh] over ``k``/``v`` [B, H_kv, L, Dh],
    after the row's shared ``prefix`` (``[U, H_kv, P, Dh]`` per layer) if any; ``mask`` [B, 1, 1, P + L] (True
    = may attend; P = 0 without a prefix).

    Without a prefix: on CPU two plain matmuls and a softmax or SDPA, whichever was measured faster (kernel
    choice ``decode``: on an AMD EPYC the matmuls won in float32, 0.84 vs 0.97 s of a 25M model's 64 x
    128-token rollout, and lost in bf16); elsewhere SDPA. With a prefix: the matmuls, over the prefix's and
    the row's scores together with one softmax, so that the prefix's keys and values are read once per
    prompt for all of its rows (`_Prefix.to_grid`) instead of once per row.
    """
    if prefix is None:
        if q.device.type != "cpu" or _decode_choice(q, k, mask) == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return _matmul_attention(q, k, v, mask)
    r = q.shape[2]
    q = q * q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2))  # [B, H_kv, r, L]
    shared = torch.matmul(prefix.to_grid(q), prefix.k[layer].transpose(-1, -2))  # [U, H_kv, G*r, P]
    scores = torch.cat([prefix.from_grid(shared, r), scores], -1).float()  # [B, H_kv, r, P + L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)
    P = prefix.k[layer].shape[2]
    shared = torch.matmul(prefix.to_grid(probs[..., :P]), prefix.v[layer])  # [U, H_kv, G*r, Dh]
    return prefix.from_grid(shared, r) + torch.matmul(probs[..., P:], v)


class _Attention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, self.n_kv * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, self.n_kv * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = _RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = _RMSNorm(a.head_dim, a.rms_norm_eps)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries ``[..., H, Dh]``, rotated keys and values ``[..., H_kv, Dh]`` of ``x`` ``[..., D]``
        (cos/sin broadcast as ``[..., 1, Dh]``)."""
        a, shape = self, (*x.shape[:-1], -1, self.head_dim)
        q = _project(x, a.q_proj).view(shape)
        k = _project(x, a.k_proj).view(shape)
        v = _project(x, a.v_proj).view(shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def forward(
        self,
        x: Tensor,  # [B, T, D]
        residual: Tensor,  # [B, T, D], added to the output
        cos: Tensor,  # [B, T, 1, Dh]
        sin: Tensor,  # [B, T, 1, Dh]
        mask: Tensor | None,  # [B, 1, T, L] bool, True = may attend
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        B, T, _ = x.shape
        dh = self.head_dim
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, cos, sin))  # [B, H or H_kv, T, Dh]
        prefix = None
        if cache is not None:
            start, prefix = cache.length, cache.prefix
            cache.k[layer][:, :, start : start + T] = k
            cache.v[layer][:, :, start : start + T] = v
            k, v = cache.k[layer][:, :, : start + T], cache.v[layer][:, :, : start + T]  # [B, H_kv, L, Dh]
        rep = self.n_heads // self.n_kv
        if T == 1 and (rep > 1 or x.device.type == "cpu" or prefix is not None):
            # One query per head: fold the query heads of each K/V group into the query axis, so grouped-query
            # attention is plain attention without K/V repetition (and no causal mask: all keys are past).
            q = q.view(B, self.n_kv, rep, dh)
            # reshape, not view: with one shared prompt the cascade's output has its batch and head axes
            # swapped in memory
            out = _decode_attention(q, k, v, mask, prefix, layer).reshape(B, self.n_heads, 1, dh)
        else:
            out = _sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=rep > 1)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * dh)
        return _project_then(out, self.o_proj, "add", residual)  # [B, T, D]

    def forward_shared(
        self, x: Tensor, residual: Tensor, cos: Tensor, sin: Tensor, s: _SharedPrefix
    ) -> Tensor:
        """Attention over `_SharedPrefix`'s token layout: x ``[n*P + m, D]`` -> same shape, plus
        ``residual``."""
        gqa, split = self.n_heads > self.n_kv, s.n * s.P
        q, k, v = self.qkv(x, cos, sin)  # [M, H or H_kv, Dh]

        def prompts(t: Tensor) -> Tensor:
            return t[:split].view(s.n, s.P, -1, self.head_dim).transpose(1, 2)  # [n, H, P, Dh]

        def responses(t: Tensor) -> Tensor:
            return s.rows(t[split:]).view(s.b, s.T, -1, self.head_dim).transpose(1, 2)  # [b, H, T, Dh]

        kp, vp = prompts(k), prompts(v)
        out = _sdpa(
            prompts(q), kp, vp, attn_mask=s.prompt_mask, is_causal=s.prompt_mask is None, enable_gqa=gqa
        )  # [n, H, P, Dh]
        outs = [out.transpose(1, 2).reshape(split, -1)]
        if s.T:
            # each response attends to its prompt's keys and values (one copy per response), then its own
            k_all = torch.cat([kp.index_select(0, s.prompt_index), responses(k)], 2)  # [b, H_kv, P + T, Dh]
            v_all = torch.cat([vp.index_select(0, s.prompt_index), responses(v)], 2)
            out = _sdpa(
                responses(q), k_all, v_all, attn_mask=s.response_mask, enable_gqa=gqa
            )  # [b, H, T, Dh]
            outs.append(s.tokens(out.transpose(1, 2).reshape(s.b * s.T, -1)))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return _project_then(out, self.o_proj, "add", residual)  # [M, D]


class _MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + mlp(x)``."""
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        h = _project_then(x, u, "mul", _project_then(x, g, "swish"))
        return _project_then(h, d, "add", residual)


class _Layer(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.self_attn = _Attention(a)
        self.mlp = _MLP(a)
        self.input_layernorm = _RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(
        self,
        h: Tensor,  # [B, T, D]
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        h = self.self_attn(self.input_layernorm(h), h, cos, sin, mask, is_causal, cache, layer)
        out: Tensor = self.mlp(self.post_attention_layernorm(h), h)
        return out  # [B, T, D]

    def forward_shared(self, h: Tensor, cos: Tensor, sin: Tensor, s: _SharedPrefix) -> Tensor:
        h = self.self_attn.forward_shared(self.input_layernorm(h), h, cos, sin, s)
        out: Tensor = self.mlp(self.post_attention_layernorm(h), h)
        return out  # [n*P + m, D]


class _Backbone(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(_Layer(a) for _ in range(a.num_hidden_layers))
        self.norm = _RMSNorm(a.hidden_size, a.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder-only language model; ``state_dict()`` keys equal transformers' for the same architecture."""

    def __init__(self, args: ModelArgs, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.args = args
        self.model = _Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self._rope_table: tuple[Tensor, Tensor] | None = None  # cos, signed sin: [max_pos, Dh]
        for m in self.modules():  # HF-style init; a no-op on the meta device
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def lm_head_weight(self) -> Tensor:
        """The output projection ``[V, D]`` (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    @contextlib.contextmanager
    def packed_weights(self, rows: int) -> Iterator[None]:
        """Within: no-gradient CPU matmuls of 16+ rows read copies of the linear weights prepacked in oneDNN's
        blocked layout for about ``rows`` rows, instead of repacking each weight on every call.

        For generation (`dapo.rollout.NativeEngine`): 6-16% faster decode steps on an AMD EPYC (3M and 25M
        models, fp32 and bf16; the matmul alone 10-20%). Only weights whose prepacked oneDNN matmul was
        measured faster than ATen's (kernel choice ``inference``) are packed. The copies are taken on entry,
        so the weights must not change inside (training outside is fine: the next entry packs again).
        Results differ from unpacked matmuls by float summation order only. A no-op off CPU, for dtypes
        oneDNN does not fuse, without oneDNN, and for fewer than 16 rows (where the matmuls use ATen).
        """
        weight = self.lm_head_weight
        if weight.device.type != "cpu" or weight.dtype not in _FUSABLE or rows < 16:
            yield  # nothing would read the copies
            return
        linears = [m.weight for m in self.modules() if isinstance(m, nn.Linear)] + [weight]
        reorder = torch.ops.mkldnn._reorder_linear_weight
        with torch.no_grad():  # only weights whose prepacked matmul was measured faster than ATen's
            packs = {
                id(w): reorder(w.detach(), rows)
                for w in linears
                if _onednn_choice(w.dtype, rows, tuple(w.shape), grad=False, packed=True)
            }
        token = _PACKED.set(packs)
        try:
            yield
        finally:
            _PACKED.reset(token)

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        *,
        positions: Tensor | None = None,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, T], 1 = real token, 0 = padding
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits ``[B, T, V]`` (or the final normed hidden states ``[B, T, D]`` with ``return_hidden``).

        Without ``cache`` this is the training path. With ``cache`` the tokens are written at slots
        ``[cache.length, cache.length + T)`` and attend to everything cached before them.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = input_ids.device
        start = 0 if cache is None else cache.length
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {(B, T)}")
            attention_mask = attention_mask.bool()
            if bool(attention_mask.all()):  # one sync per call; no padding lets attention skip the mask
                attention_mask = None
        if cache is not None:
            if start + T > cache.max_len or cache.batch_size != B:
                raise ValueError(
                    f"KV cache holds {cache.batch_size}x{cache.max_len}; cannot add {B}x{T} at {start}"
                )
            if cache.prefix is not None and T != 1:
                raise ValueError(f"a KV cache with a shared prefix decodes one token at a time, got {T}")
            if attention_mask is not None:
                cache.valid[:, start : start + T] = attention_mask
                cache.padded = True
        # rotary table rows needed: every cache slot, or the largest explicit position (one sync)
        if positions is not None:
            if bool((positions < 0).any()):
                raise ValueError("positions must be >= 0")
            need = int(positions.max()) + 1
        else:
            need = cache.max_position if cache is not None else T
            base = (
                cache.pos[:, None] if cache is not None else torch.zeros(1, 1, dtype=torch.long, device=dev)
            )
            if attention_mask is None:
                positions = base + torch.arange(T, device=dev) if T > 1 else base
            else:  # pads before the first real token get position 0; they are never attended
                positions = (base + attention_mask.cumsum(1) - 1).clamp(min=0)
        cos, sin = self._rope(need, dev)
        cos, sin = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)  # [B, T, 1, Dh]
        mask, is_causal = self._attention_mask(attention_mask, cache, T, start, dev)
        h = self.model.embed_tokens(input_ids)  # [B, T, D]
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.length += T
            cache.pos += T if attention_mask is None else attention_mask.sum(1)
        h = self.model.norm(h)
        return h if return_hidden else _linear(h, self.lm_head_weight)  # [B, T, V]

    def forward_responses(
        self,
        prompt_ids: Tensor,  # [n, P] left-padded
        prompt_mask: Tensor,  # [n, P] 1 = real token
        prompt_index: Tensor,  # [b] the prompt row each response continues
        response_ids: Tensor,  # [b, R] right-padded
        response_lengths: Tensor | None = None,  # [b] real tokens per response (None: all R)
        *,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits ``[b, R, V]``: row i, position j predicts ``response_ids[i, j]`` after prompt
        ``prompt_index[i]`` and the response's first j tokens. With ``return_hidden``, the final normed hidden
        states ``[b, R, D]`` instead, for a head applied in chunks (`dapo.algo.token_stats_from_hidden`).

        Equal (up to float summation order) to `forward` on the rows ``prompt + response`` sliced to the
        response positions, but each prompt is computed once for all of its responses (a group of G samples
        shares one prompt), no logits are computed for prompt tokens, and with ``response_lengths`` the
        linear layers skip response padding (only attention sees it, masked). Logits past a row's length
        are garbage.
        """
        (n, P), (b, R) = prompt_ids.shape, response_ids.shape
        lengths_ok = response_lengths is None or response_lengths.shape == (b,)
        if prompt_mask.shape != prompt_ids.shape or prompt_index.shape != (b,) or R < 1 or not lengths_ok:
            raise ValueError(
                f"forward_responses: prompt_ids {tuple(prompt_ids.shape)}, prompt_mask "
                f"{tuple(prompt_mask.shape)}, prompt_index {tuple(prompt_index.shape)}, response_ids {(b, R)}"
                f", response_lengths {None if response_lengths is None else tuple(response_lengths.shape)}"
            )
        dev, T = prompt_ids.device, R - 1  # the last response token predicts nothing we need
        real = prompt_mask.bool()
        packed = None
        if response_lengths is not None:  # input j feeds output j + 1: keep j < length - 1
            keep = torch.arange(T, device=dev) < (response_lengths.to(dev)[:, None] - 1)  # [b, T]
            if not bool(keep.all()):
                packed = keep.reshape(-1).nonzero().squeeze(1)  # [m]
        prompt_pos = (real.long().cumsum(1) - 1).clamp(min=0)  # [n, P]; pads (on the left) get 0
        response_pos = real.sum(1)[prompt_index, None] + torch.arange(T, device=dev)  # [b, T]
        response_tokens = response_ids[:, :T].reshape(-1)  # [b*T]
        response_pos = response_pos.reshape(-1)
        if packed is not None:
            response_tokens, response_pos = response_tokens[packed], response_pos[packed]
        positions = torch.cat([prompt_pos.reshape(-1), response_pos])  # [M]
        cos, sin = self._rope(int(positions.max()) + 1, dev)
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [M, 1, Dh]
        unpadded = bool(real.all())  # one host sync
        prompt_mask4, _ = self._attention_mask(None if unpadded else real, None, P, 0, dev)
        response_mask4: Tensor | CausalBias
        if unpadded:  # every key up to the query's own slot: causal, aligned to the bottom right
            response_mask4 = causal_lower_right(T, P + T)  # no [T, P + T] mask in memory; GPU flash kernels
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            response_mask4 = torch.cat(
                [real[prompt_index, None, None, :].expand(b, 1, T, P), causal.expand(b, 1, T, T)], -1
            )  # [b, 1, T, P + T]
        s = _SharedPrefix(n, P, b, T, prompt_index, prompt_mask4, response_mask4, packed)
        h = self.model.embed_tokens(torch.cat([prompt_ids.reshape(-1), response_tokens]))  # [M, D]
        for layer in self.model.layers:
            h = cast(_Layer, layer).forward_shared(h, cos, sin, s)
        h = self.model.norm(h)
        last = h[: n * P].view(n, P, -1)[:, -1].index_select(0, prompt_index)  # [b, D] predicts token 0
        h = torch.cat([last[:, None], s.rows(h[n * P :]).view(b, T, h.shape[-1])], 1)  # [b, R, D]
        return h if return_hidden else _linear(h, self.lm_head_weight)  # [b, R, V]

    def _attention_mask(
        self, pad: Tensor | None, cache: KVCache | None, n_new: int, start: int, dev: torch.device
    ) -> tuple[Tensor | None, bool]:
        """(bool mask [B, 1, n_new, L] or None, is_causal) for queries at slots [start, start + n_new)."""
        if cache is None:
            if pad is None:
                return None, n_new > 1
            key_valid = pad  # [B, L]
        else:
            key_valid = cache.valid[:, : start + n_new]  # [B, L]
            if n_new == 1:  # a single new query may attend every filled slot (and the shared prefix)
                rows = key_valid[:, None, None, :] if cache.padded else None  # [B, 1, 1, L]
                prefix = cache.prefix
                if prefix is None or (prefix.mask is None and rows is None):
                    return rows, False
                ones, B = key_valid.new_ones(1, 1, 1, 1), len(key_valid)
                shared = ones.expand(B, 1, 1, prefix.k[0].shape[2]) if prefix.mask is None else prefix.mask
                own = rows if rows is not None else ones.expand(B, 1, 1, start + 1)
                return torch.cat([shared, own], -1), False  # [B, 1, 1, P + L]
            if not cache.padded and start == 0:
                return None, True
        L = start + n_new
        q_slot = torch.arange(start, L, device=dev)[:, None]  # [n_new, 1]
        k_slot = torch.arange(L, device=dev)[None, :]  # [1, L]
        # A padding query would attend to nothing (all -inf → NaN rows that leak into later layers through its
        # keys and values); letting every query see its own slot keeps all rows finite.
        allowed = ((k_slot <= q_slot) & key_valid[:, None, None, :]) | (k_slot == q_slot)
        return allowed, False  # [B, 1, n_new, L]

    def _rope(self, n: int, dev: torch.device) -> tuple[Tensor, Tensor]:
        """cos and signed sin tables ``[>= n, Dh]`` in the model dtype, cached and grown in powers of two."""
        dtype = self.model.embed_tokens.weight.dtype
        t = self._rope_table
        if t is not None and t[0].shape[0] >= n and t[0].device == dev and t[0].dtype == dtype:
            return t
        size, a = max(256, 1 << (n - 1).bit_length()), self.args
        # built as normal tensors even under inference_mode (generation), so training can use the cached table
        with torch.inference_mode(False), torch.no_grad():
            inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2).float() / a.head_dim))  # [Dh/2]
            if a.rope_scaling is not None:
                inv_freq = _llama3_scale(inv_freq, a)
            freqs = torch.arange(size, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [size, Dh/2]
            cos, sin = freqs.cos(), freqs.sin()
            table = torch.cat([cos, cos], -1).to(dev, dtype), torch.cat([-sin, sin], -1).to(dev, dtype)
        self._rope_table = table
        return table


def forward_responses_unshared(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompt_index: Tensor,
    response_ids: Tensor,
    *,
    return_hidden: bool = False,
) -> Tensor:
    """`CausalLM.forward_responses` computed the plain way, for any model with `CausalLM`'s ``forward``: one
    row ``prompt + response`` per response (prompts left-padded, so every row's prompt ends at ``P - 1``)."""
    P, rest = prompt_ids.shape[1], response_ids[:, :-1]
    ids = torch.cat([prompt_ids.index_select(0, prompt_index), rest], 1)  # [b, P + R - 1]
    mask = torch.cat([prompt_mask.index_select(0, prompt_index), torch.ones_like(rest)], 1)
    out: Tensor = model(ids, attention_mask=mask, return_hidden=return_hidden)[:, P - 1 :]  # [b, R, V or D]
    return out


def _llama3_scale(inv_freq: Tensor, a: ModelArgs) -> Tensor:
    """Llama 3.1 rope scaling: long wavelengths slowed by ``factor``, short kept, the band between blended."""
    s = a.rope_scaling
    assert s is not None
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor  # longer than this: fully scaled
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor  # shorter than this: unchanged
    blend = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out)
