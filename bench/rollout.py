"""Rollout throughput: dapo's NativeEngine against transformers' ``generate`` on the same random Qwen2.

    python bench/rollout.py [--size 3m|25m|all] [--dtype float32|bfloat16|all] [--repeats 5] [--stop]
                            [--floor]

Workload (the embedded default run's shape): 64 prompts of random lengths 32-64, temperature 1.0, 128 new
tokens and no stop token, so every sequence generates 128 tokens. ``--stop`` adds a variant with 16 stop ids
(each row stops with probability ~1.5% per step), where finished rows leave the native engine's batch. Each
engine is warmed up once, then runs alternate (native, transformers, native, ...); the MEDIAN tokens/s of
each is reported, and the ratio is the median of the per-repeat ratios (robust to a drifting machine load).
Nothing is downloaded: the model is built locally from a config with random weights.

``--floor`` also times the native engine with its decode attention skipped (each layer's attention output is
its query: wrong tokens, the same work everywhere else), alternating with the other two. That step is a lower
bound for any attention kernel, and is printed next to the step time the size's target (TARGETS) allows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

import dapo.models.transformer as model_code
from dapo.models import CausalLM, load_pretrained
from dapo.rollout import NativeEngine, SamplingParams

SIZES: dict[str, dict[str, int]] = {
    # 3.00M parameters (tied embeddings)
    "3m": {"vocab_size": 1024, "hidden_size": 192, "intermediate_size": 1024, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2},
    # 25.4M parameters (tied embeddings)
    "25m": {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 6,
            "num_attention_heads": 8, "num_key_value_heads": 4},
}  # fmt: skip
BATCH, MIN_LEN, MAX_LEN, NEW_TOKENS, PAD = 64, 32, 64, 128, 0
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


def run_native(engine: NativeEngine, prompts: list[list[int]], stops: tuple[int, ...], seed: int) -> int:
    sp = SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, stop_token_ids=stops, seed=seed)
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
    """`run_native` with each decode step's attention replaced by its query (same shape, no work)."""
    real, calls = model_code._decode_attention, [0]

    def skip(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return q

    model_code._decode_attention = skip
    try:
        tokens = run_native(engine, prompts, (), seed)
    finally:
        model_code._decode_attention = real
    if calls[0] == 0:  # the decode path no longer goes through it: the "floor" would be the full step
        raise RuntimeError("--floor: the native decode step did not call _decode_attention")
    return tokens


def timed(fn: Callable[[int], int], seed: int) -> float:
    start = time.perf_counter()
    tokens = fn(seed)
    return tokens / (time.perf_counter() - start)


def bench(
    size: str, dtype: torch.dtype, repeats: int, stops: tuple[int, ...], root: Path, floor: bool
) -> None:
    native, hf, n_params = build(size, dtype, root)
    prompts = make_prompts(native.args.vocab_size)
    engine = NativeEngine(native, pad_token_id=PAD)
    runs = {
        "native": lambda s: run_native(engine, prompts, stops, s),
        "transformers": lambda s: run_hf(hf, prompts, stops, s),
    }
    if floor and not stops:
        runs["no attention"] = lambda s: run_without_attention(engine, prompts, s)
    speeds: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        timed(fn, 0)  # warm-up
    for r in range(repeats):
        for name, fn in runs.items():
            speeds[name].append(timed(fn, r + 1))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = statistics.median(a / b for a, b in zip(speeds["native"], speeds["transformers"], strict=True))
    label = f"{size} ({n_params / 1e6:.2f}M) {str(dtype).removeprefix('torch.')}"
    variant = f"{len(stops)} stop ids" if stops else "no stop"
    runs_text = ", ".join(f"{k} {[round(x) for x in v]}" for k, v in speeds.items())
    print(
        f"{label:<24} {variant:<12} native {med['native']:7.0f} tok/s  "
        f"transformers {med['transformers']:7.0f} tok/s  ratio {ratio:4.2f}x  ({runs_text})"
    )
    if "no attention" in med:
        step = {k: 1000 * BATCH / v for k, v in med.items()}  # ms per decode step of the whole batch
        print(
            f"{'':<37} ms per step: native {step['native']:.2f}, native without attention "
            f"{step['no attention']:.2f}, transformers {step['transformers']:.2f}; the {TARGETS[size]:g}x "
            f"target allows {step['transformers'] / TARGETS[size]:.2f}"
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads")
    print(
        f"{BATCH} prompts of {MIN_LEN}-{MAX_LEN} tokens, {NEW_TOKENS} new tokens, T=1, "
        f"median of {args.repeats}"
    )
    sizes = list(SIZES) if args.size == "all" else [args.size]
    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for dt in dtypes:
                variants: list[tuple[int, ...]] = [()]
                if args.stop:
                    variants.append(tuple(range(100, 116)))
                for stops in variants:
                    bench(size, getattr(torch, dt), args.repeats, stops, Path(tmp), args.floor)


if __name__ == "__main__":
    main()
