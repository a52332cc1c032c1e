"""Which kernel the native model's CPU code runs, chosen by timing on this machine, not by a vendor rule.

Four choices, each between implementations that agree to float rounding (the tests run every one):

- ``linear``: a matmul of 16+ rows with gradients (training, float32 or bf16) through oneDNN
  (`transformer._OneDNNLinear`: forward and both gradient matmuls) or through ATen's ``F.linear`` (MKL's
  sgemm in float32). On an AMD EPYC (Zen 5) oneDNN's AVX-512 kernels beat MKL's AVX2 ones 2.2x; on Intel
  Xeons the two are close, and which wins depends on the shape.
- ``inference``: a no-grad matmul of 16+ rows (generation, old log-probs) through oneDNN (with the weight
  prepacked inside `CausalLM.packed_weights`, elementwise post-ops fused) or ATen (post-ops as separate
  kernels). Timed separately for a prepacked and a plain weight.
- ``attention``: 16-bit SDPA computed in float32 (cast there and back) or in the input dtype. PyTorch's bf16
  CPU flash kernel lost to its float32 one on the EPYC; on CPUs with AMX the bf16 one may win.
- ``decode``: a decode step's attention without a shared prefix as two matmuls and a softmax, or SDPA.
- ``precision`` (``actor.precision=auto``, the embedded default's): train in float32 (``model``) or
  ``bf16-mixed``, by timing the model's MLP forward and backward at 1024 rows both ways (`time_mlp`): bf16
  wins where its matmuls are faster (AMX, a fast AVX512_BF16), float32 where they are not.

Each choice is keyed by a shape class (dtype, the layer's widths, the row count rounded to 64 / 256 /
1024, gradients or not) and decided once at first use: both candidates run on random data of that class
(interleaved, median of 5; a few ms each), and the faster wins unless it is within 3% of the default,
which then stays (near-ties would otherwise flip from run to run). Decisions are kept for the process and
written to ``<dapo cache>/kernels/<machine>.json`` (machine = CPU model, ISA flags, torch version, thread
count), so later processes on the same machine take the same kernels without timing again (the same
numerics run to run). A miss re-reads the file under a lock on it (`_machine_lock`): processes deciding at
once take turns, and each takes what another decided first. A checkpoint stores the decisions its process
made and a resume adopts them, so a resumed run is bit-identical to an uninterrupted one even on a fresh
cache. Timing draws its random inputs from a private generator: whether a decision was timed or read never
moves torch's global RNG.

``DAPO_KERNELS`` (environment) overrides: ``measure`` (the default: as above), ``default`` (no timing: the
fixed rules below, the same on every machine), or comma-separated forced choices such as
``linear=aten,inference=onednn,attention=native,decode=sdpa`` (choices not named are measured). Off CPU
nothing is timed: ATen, the input dtype and SDPA.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dapo.cache import default_cache_dir
from dapo.errors import UserError

__all__ = [
    "CHOICES",
    "adopt",
    "cpu_info",
    "decide",
    "decisions",
    "describe",
    "forced",
    "machine_line",
    "mixed_precision_wins",
    "mode",
]

ENV = "DAPO_KERNELS"

CHOICES: dict[str, tuple[str, str]] = {
    "linear": ("onednn", "aten"),
    "inference": ("onednn", "aten"),
    "attention": ("float32", "native"),
    "decode": ("matmul", "sdpa"),
    "precision": ("model", "bf16-mixed"),
}
"""Each choice's two candidates (`_default` says which is the fixed default per dtype)."""

_TIE = 0.03
"""A challenger must be this much faster than the default to replace it (timing noise on a busy machine)."""

_decided: dict[str, str] = {}
"""Decisions of this process by key (measured, read from the cache file, or forced)."""
_known: dict[tuple[str, torch.dtype, tuple[int, ...]], str] = {}
"""`_decided` by (choice, dtype, shape) tuples, for the hot path."""
_forced: dict[str, str] = {}
"""Choices forced by `forced` (tests), over ``DAPO_KERNELS``."""


def _default(choice: str, dtype: torch.dtype) -> str:
    """The fixed rule (``DAPO_KERNELS=default``): the choices that won on the AMD EPYC this code was first
    tuned on (oneDNN for float32 training matmuls, ATen for bf16 ones; decode attention as matmuls in float32
    only)."""
    if (choice == "decode" or choice == "linear") and dtype != torch.float32:
        return CHOICES[choice][1]
    return CHOICES[choice][0]


class KernelsError(UserError, ValueError):
    """A bad ``DAPO_KERNELS`` value (a user error: one line on the command line)."""


def _env() -> tuple[str, dict[str, str]]:
    """(mode, forced choices) from ``DAPO_KERNELS``; a clear error for anything else."""
    return _parse(os.environ.get(ENV, "measure"))


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> tuple[str, dict[str, str]]:
    raw = raw.strip()
    if raw in ("measure", "default", ""):
        return raw or "measure", {}
    out = {}
    for item in raw.split(","):
        name, _, value = item.strip().partition("=")
        if name not in CHOICES or value not in CHOICES[name]:
            allowed = "; ".join(f"{k}={'|'.join(v)}" for k, v in CHOICES.items())
            raise KernelsError(
                f"{ENV}={raw!r}: bad item {item!r}; allowed: 'measure', 'default' or items {allowed}"
            )
        out[name] = value
    return "measure", out


def mode() -> str:
    """How choices are made now: ``measure``, ``default`` or the forced items."""
    m, env = _env()
    force = {**env, **_forced}
    return ",".join(f"{k}={v}" for k, v in force.items()) if force else m


@contextlib.contextmanager
def forced(**choices: str) -> Iterator[None]:
    """Within: the named choices take the given candidate (tests run every path this way)."""
    for name, value in choices.items():
        if name not in CHOICES or value not in CHOICES[name]:
            raise ValueError(f"kernels.forced: {name}={value!r}; allowed: {CHOICES}")
    saved = dict(_forced)
    _forced.update(choices)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def decide(
    choice: str, dtype: torch.dtype, shape: tuple[int, ...], timer: Callable[[str], Callable[[], object]]
) -> str:
    """The candidate of ``choice`` for this shape class: forced, the fixed default, or measured once (both
    candidates' ``timer(candidate)`` workloads timed) and cached. ``shape`` already holds rounded sizes."""
    if choice in _forced:
        return _forced[choice]
    m, env = _env()
    if choice in env:
        return env[choice]
    if m == "default":
        return _default(choice, dtype)
    fast = (choice, dtype, shape)  # called on every matmul of a decode step: no string building then
    if fast in _known:
        return _known[fast]
    key = f"{choice}:{str(dtype).removeprefix('torch.')}:{'x'.join(map(str, shape))}"
    hit = _decided.get(key)
    if hit is None:
        # one decision per machine: processes starting together (a Ray trainer and its rollout workers, a
        # test and its subprocesses) take turns, and each reads what the others decided before timing
        with _machine_lock():
            disk = _load()
            hit = disk.get(key)
            if hit not in CHOICES[choice]:
                hit = _measure(choice, dtype, timer)
                _save(disk, key, hit)
    _decided[key] = _known[fast] = hit
    return hit


def decisions() -> dict[str, str]:
    """This process's decisions by shape-class key (a checkpoint stores them; see `adopt`)."""
    return dict(_decided)


def adopt(saved: dict[str, str]) -> None:
    """Take ``saved`` decisions (a checkpoint's) as this process's own, over the machine cache and any made
    already: a resumed run then runs the kernels the interrupted one ran, bit for bit, even where a new
    timing would have decided otherwise. Keys or values this code does not know are ignored."""
    for key, value in saved.items():
        if value in CHOICES.get(key.partition(":")[0], ()):
            _decided[key] = value
    _known.clear()


def _measure(choice: str, dtype: torch.dtype, timer: Callable[[str], Callable[[], object]]) -> str:
    default = _default(choice, dtype)
    other = next(c for c in CHOICES[choice] if c != default)
    # timed on fresh tensors, outside whatever mode the caller is in (inference mode, autocast)
    with torch.inference_mode(False), torch.autocast("cpu", enabled=False):
        try:
            fns = {default: timer(default), other: timer(other)}
            times: dict[str, list[float]] = {default: [], other: []}
            for fn in fns.values():
                fn()  # warm-up: oneDNN builds its primitive on the first call
            for _ in range(5):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        except RuntimeError:  # a candidate this build cannot run: keep the default
            return default
    med = {k: statistics.median(v) for k, v in times.items()}
    return other if med[other] < (1 - _TIE) * med[default] else default


def rows_class(rows: int) -> int:
    """The row count a decision for ``rows`` rows is timed at (and keyed by)."""
    return 64 if rows < 128 else 256 if rows < 512 else 1024


def describe() -> str:
    """The mode and this process's decisions so far, one line (logged with a run, printed by benchmarks)."""
    counts: dict[str, dict[str, int]] = {}
    for key, value in _decided.items():  # key: choice:dtype:shape
        group = counts.setdefault(":".join(key.split(":")[:2]), {})
        group[value] = group.get(value, 0) + 1
    made = ", ".join(
        f"{k} " + "/".join(f"{v} x{n}" for v, n in sorted(c.items())) for k, c in sorted(counts.items())
    )
    return f"{ENV}={mode()}; shape classes decided: {made or 'none yet'}; per shape in {_cache_file()}"


def cpu_info() -> dict[str, object]:
    """This CPU's model name, the ISA extensions the kernels depend on, and PyTorch's view of them."""
    name, flags = platform.processor() or platform.machine(), set[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    isa = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    return {
        "cpu": name,
        "isa": [f for f in isa if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": _bool_op("_is_mkldnn_bf16_supported"),
        "threads": torch.get_num_threads(),
    }


def machine_line() -> str:
    """`cpu_info` as one line, for benchmark output."""
    info = cpu_info()
    isa = " ".join(info["isa"]) or "none of AVX2 / AVX-512 / AMX"  # type: ignore[arg-type]
    return (
        f"CPU {info['cpu']}; ISA {isa}; torch CPU capability {info['torch_cpu_capability']}; oneDNN bf16 "
        f"{'yes' if info['mkldnn_bf16'] else 'no'}; AMX {'yes' if 'amx_bf16' in isa else 'no'}"
    )


def _bool_op(name: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


def _cache_file() -> Path:
    info = cpu_info()
    ident = json.dumps([info["cpu"], info["isa"], info["threads"], torch.__version__])
    return default_cache_dir() / "kernels" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """An exclusive lock on this machine's cache file while a decision is read or made (none where the
    cache cannot be written: then each process decides alone)."""
    path = _cache_file().with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _load() -> dict[str, str]:
    """The decisions in this machine's cache file now (read on each miss: other processes add to it)."""
    try:
        return dict(json.loads(_cache_file().read_text()).get("decisions", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _save(disk: dict[str, str], key: str, value: str) -> None:
    """Add a decision to the cache file read as ``disk`` under `_machine_lock` (best effort: a read-only
    cache only costs re-timing)."""
    disk[key] = value
    path = _cache_file()
    with contextlib.suppress(OSError):
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"machine": cpu_info(), "torch": torch.__version__, "decisions": disk}, indent=1)
        )
        tmp.replace(path)


_timing_rng = torch.Generator().manual_seed(0)
"""The timing workloads' own random stream: measuring a decision must leave torch's global RNG (sampling,
dropout, initialisation) exactly where it was, or a run would depend on whether the cache was warm."""


def random_like(shape: tuple[int, ...], dtype: torch.dtype, *, grad: bool = False) -> Tensor:
    """A random tensor for a timing workload (values do not matter for speed), drawn from a private
    generator."""
    return torch.randn(shape, generator=_timing_rng).to(dtype).requires_grad_(grad)


def time_mlp(rows: int, hidden: int, intermediate: int, *, mixed: bool) -> Callable[[], object]:
    """A timing workload: a SwiGLU MLP's forward and backward on ``rows`` tokens with float32 weights, under
    bf16 autocast when ``mixed`` (the casts included, as `actor.precision=bf16-mixed` pays them)."""
    x = random_like((rows, hidden), torch.float32, grad=True)
    up = random_like((2 * intermediate, hidden), torch.float32, grad=True)
    down = random_like((hidden, intermediate), torch.float32, grad=True)

    def run() -> object:
        with torch.autocast("cpu", torch.bfloat16, enabled=mixed):
            gate, value = F.linear(x, up).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * value, down)
        out.float().sum().backward()
        return out

    return run


def mixed_precision_wins(hidden: int, intermediate: int) -> bool:
    """The ``precision`` choice for a model of these widths: whether bf16 autocast over float32 weights
    trains faster than float32 on this machine (its MLP timed at 1024 rows both ways, decided once per
    machine). `actor.precision=auto` and the tiny model's warm-up take the same decision."""
    timer = functools.partial(_time_precision, rows=1024, hidden=hidden, intermediate=intermediate)
    return decide("precision", torch.float32, (1024, hidden, intermediate), timer) == "bf16-mixed"


def _time_precision(candidate: str, *, rows: int, hidden: int, intermediate: int) -> Callable[[], object]:
    return time_mlp(rows, hidden, intermediate, mixed=candidate == "bf16-mixed")


def time_sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, upcast: bool, grad: bool, mask: Tensor | None, gqa: bool
) -> Callable[[], object]:
    """A timing workload: SDPA of these tensors (float32 when ``upcast``), with its backward when ``grad``."""

    def run() -> object:
        with torch.set_grad_enabled(grad):
            if upcast:
                qf, kf, vf = q.float(), k.float(), v.float()
                out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, enable_gqa=gqa).to(q.dtype)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            if grad:
                out.sum().backward()
        return out

    return run
