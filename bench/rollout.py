"""Rollout throughput of dapo's NativeEngine, vLLM (`VLLMEngine`) and transformers' ``generate``, same model.

    python bench/rollout.py [--engines native,vllm,hf] [--shape batch|group|all] [--size 3m|25m|all]
                            [--dtype float32|bfloat16|all] [--repeats 5] [--stop] [--floor]

Workloads (``--shape``): ``batch`` is 64 distinct prompts of random lengths 32-64 (n = 1: no shared prefix);
``group`` is the RL step's shape, 8 of those prompts x n = 8 samples each (each group shares its prompt:
the native engine's cascade attention and vLLM's prefix cache store it once; transformers repeats it). Both
sample at temperature 1.0, 128 new tokens and no stop token, so every sequence generates 128 tokens.
``--stop`` adds a variant with 16 stop ids (each row stops with probability ~1.5% per step), where finished
rows leave the batch. Each engine is warmed up once, then runs alternate (native, vllm, transformers,
native, ...); the MEDIAN tokens/s of each is reported, and each ratio is the median of the per-repeat
ratios against the first engine listed (robust to a drifting machine load). Nothing is downloaded: the
model is built locally from a config with random weights. ``vllm`` needs vLLM (`make setup-vllm`, then
``.venv-vllm/bin/python bench/rollout.py --engines native,vllm,hf``); it runs in this process on torch's
threads, with its own copy of the weights (see `dapo.rollout.vllm`).

``--floor`` also times the native engine with its decode attention skipped (each layer's attention output is
its query: wrong tokens, the same work everywhere else), alternating with the others. That step is a lower
bound for any attention kernel, and is printed next to the step time the size's target (TARGETS) allows.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

import dapo.models.transformer as model_code
from dapo.models import CausalLM, kernels, load_pretrained
from dapo.rollout import NativeEngine, RolloutEngine, SamplingParams

SIZES: dict[str, dict[str, int]] = {
    # 3.00M parameters (tied embeddings)
    "3m": {"vocab_size": 1024, "hidden_size": 192, "intermediate_size": 1024, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2},
    # 25.4M parameters (tied embeddings)
    "25m": {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 6,
            "num_attention_heads": 8, "num_key_value_heads": 4},
}  # fmt: skip
BATCH, MIN_LEN, MAX_LEN, NEW_TOKENS, PAD = 64, 32, 64, 128, 0
GROUP = 8  # samples per prompt in the RL-step shape
ENGINES = ("native", "vllm", "hf")
TARGETS = {"3m": 4.0, "25m": 1.5}  # native / transformers tokens/s (the models/rollout issue)


def build(size: str, dtype: torch.dtype, root: Path) -> tuple[CausalLM, transformers.PreTrainedModel, int]:
    """The same random weights as a native model and as transformers' Qwen2ForCausalLM (sdpa attention)."""
    path = root / size
    if not path.exists():
        torch.manual_seed(0)
        config = transformers.Qwen2Config(**SIZES[size], tie_word_embeddings=True, rope_theta=10000.0)
        transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    native = load_pretrained(path, dtype=dtype)
    assert isinstance(native, CausalLM)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    hf.generation_config = transformers.GenerationConfig()  # no checkpoint defaults (eos, top_k=50, ...)
    return native, hf, sum(p.numel() for p in native.parameters())


def make_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (BATCH,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def run_engine(
    engine: RolloutEngine, prompts: list[list[int]], n: int, stops: tuple[int, ...], seed: int
) -> int:
    sp = SamplingParams(n=n, temperature=1.0, max_tokens=NEW_TOKENS, stop_token_ids=stops, seed=seed)
    return sum(len(c.token_ids) for c in engine.generate(prompts, sp))


def run_hf(
    hf: transformers.PreTrainedModel, prompts: list[list[int]], stops: tuple[int, ...], seed: int
) -> int:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=NEW_TOKENS, use_cache=True, pad_token_id=PAD, eos_token_id=list(stops) or None,
        )  # fmt: skip
    new = out[:, width:]
    if not stops:
        return new.numel()
    is_stop = torch.isin(new, torch.tensor(stops))
    return int(torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, new.shape[1]).sum())


def run_without_attention(engine: NativeEngine, prompts: list[list[int]], seed: int) -> int:
    """`run_engine` (n = 1, no stops) with each decode attention replaced by its query (no work)."""
    real, calls = model_code._decode_attention, [0]

    def skip(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return q

    model_code._decode_attention = skip
    try:
        tokens = run_engine(engine, prompts, 1, (), seed)
    finally:
        model_code._decode_attention = real
    if calls[0] == 0:  # the decode path no longer goes through it: the "floor" would be the full step
        raise RuntimeError("--floor: the native decode step did not call _decode_attention")
    return tokens


def timed(fn: Callable[[int], int], seed: int) -> float:
    start = time.perf_counter()
    tokens = fn(seed)
    return tokens / (time.perf_counter() - start)


@dataclass
class Workload:
    prompts: list[list[int]]
    n: int
    stops: tuple[int, ...]

    @property
    def label(self) -> str:
        shape = f"{len(self.prompts)}x{self.n}" if self.n > 1 else str(len(self.prompts))
        return shape + (f", {len(self.stops)} stops" if self.stops else "")


def bench(
    size: str, dtype: torch.dtype, workloads: list[Workload], engines: list[str], args: argparse.Namespace,
    root: Path,
) -> None:  # fmt: skip
    """Time each engine on each workload, on one model (each engine built once)."""
    native, hf, n_params = build(size, dtype, root)
    built: dict[str, RolloutEngine] = {}
    for name in engines:
        if name == "native":
            built[name] = NativeEngine(native, pad_token_id=PAD)
        elif name == "vllm":
            from dapo.rollout.vllm import VLLMEngine

            built[name] = VLLMEngine(native, kv_cache_gib=1.0, max_model_len=MAX_LEN + NEW_TOKENS)
    label = f"{size} ({n_params / 1e6:.2f}M) {str(dtype).removeprefix('torch.')}"
    for w in workloads:
        runs: dict[str, Callable[[int], int]] = {}
        for name in engines:
            if name == "hf":  # transformers expands each prompt n times (as num_return_sequences does)
                repeated = [p for p in w.prompts for _ in range(w.n)]
                runs["transformers"] = functools.partial(run_hf, hf, repeated, w.stops)
            else:
                runs[name] = functools.partial(run_engine, built[name], w.prompts, w.n, w.stops)
        if args.floor and not w.stops and w.n == 1 and "native" in built:
            runs["no attention"] = functools.partial(run_without_attention, built["native"], w.prompts)
        speeds: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            timed(fn, 0)  # warm-up
        for r in range(args.repeats):
            for name, fn in runs.items():
                speeds[name].append(timed(fn, r + 1))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        first = next(iter(runs))
        figures = [f"{first} {med[first]:7.0f} tok/s"]
        for name in list(runs)[1:]:
            ratio = statistics.median(a / b for a, b in zip(speeds[first], speeds[name], strict=True))
            figures.append(f"{name} {med[name]:7.0f} tok/s ({first} {ratio:4.2f}x)")
        runs_text = ", ".join(f"{k} {[round(x) for x in v]}" for k, v in speeds.items())
        print(f"{label:<24} {w.label:<14} {'  '.join(figures)}  ({runs_text})")
        if "no attention" in med and "transformers" in med:
            step = {k: 1000 * BATCH / v for k, v in med.items()}  # ms per decode step of the whole batch
            print(
                f"{'':<39} ms per step: native {step['native']:.2f}, native without attention "
                f"{step['no attention']:.2f}, transformers {step['transformers']:.2f}; the "
                f"{TARGETS[size]:g}x target allows {step['transformers'] / TARGETS[size]:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=[*SIZES, "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stop", action="store_true", help="also run a variant with 16 stop token ids")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--floor", action="store_true", help="also time native decoding without attention")
    parser.add_argument("--engines", default="native,hf", help=f"comma-separated, from {','.join(ENGINES)}")
    parser.add_argument("--shape", choices=["batch", "group", "all"], default="batch")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if not engines or any(e not in ENGINES for e in engines) or len(set(engines)) != len(engines):
        parser.error(f"--engines {args.engines!r}: a comma-separated list of distinct names from {ENGINES}")
    if "vllm" in engines:
        from dapo.rollout.vllm import INSTALL_HINT, vllm_available

        if not vllm_available():
            parser.error(INSTALL_HINT)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads")
    print(kernels.machine_line())
    print(
        f"prompts of {MIN_LEN}-{MAX_LEN} tokens ({BATCH} distinct, or {BATCH // GROUP} x n={GROUP}), "
        f"{NEW_TOKENS} new tokens, T=1, median of {args.repeats}"
    )
    shapes = ["batch", "group"] if args.shape == "all" else [args.shape]
    variants: list[tuple[int, ...]] = [(), tuple(range(100, 116))] if args.stop else [()]
    sizes = list(SIZES) if args.size == "all" else [args.size]
    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            prompts = make_prompts(SIZES[size]["vocab_size"])
            workloads = [
                Workload(
                    prompts if shape == "batch" else prompts[: BATCH // GROUP],
                    1 if shape == "batch" else GROUP,
                    stops,
                )
                for shape in shapes
                for stops in variants
            ]
            for dt in dtypes:
                bench(size, getattr(torch, dt), workloads, engines, args, Path(tmp))
    print(kernels.describe())


if __name__ == "__main__":
    main()
