"""Policy-update throughput: dapo's native model against transformers' in the same `Actor` update step.

    python bench/update.py [--size tiny|3m|25m|all] [--dtype float32|bfloat16|bf16-mixed|all] [--repeats 5]
                           [--threads N] [--micro-batch-size 8] [--profile]

``--dtype bf16-mixed`` loads both models in float32 and runs both actors with ``actor.precision=bf16-mixed``
(bf16 autocast over float32 master weights and AdamW states); its peak is the bf16 one. The script prints
the CPU model, the ISA extensions the kernels depend on, and the kernel choices dapo's model made
(`dapo.models.kernels`; ``DAPO_KERNELS`` forces them).

Workload: one DAPO training step's batch, 8 prompts x 8 responses (prompts of random lengths 32-64 tokens,
responses of random lengths 16-128 tokens, random 0/1 rewards with every group mixed, so the group-relative
advantages are non-zero; random rollout log-probs), packed by `dapo.collect.make_train_batch` as the trainer
packs it; fixed seed. Both models are loaded from the same checkpoint with `dapo.models.load_pretrained`
(``implementation="native"`` and ``"hf"``, the latter wrapping transformers' ``*ForCausalLM``), and the
identical `dapo.train.Actor` code (AdamW at lr 1e-6 without warm-up, so the weights barely move; micro-batches
of 8 responses by default) runs on each: only the model's ``forward_responses`` differs. The native model
computes each prompt once for all the responses of its group in a micro-batch; transformers' runs one
prompt + response row per response (`dapo.models.forward_responses_unshared`).

Each repeat, per model: `actor.compute_logprobs` (the old log-probs, a no-grad forward; timed and reported
separately) then `actor.update` = forward + backward + gradient clipping + one AdamW step over all 64
responses (the headline figure). Tokens/s counts the same work for both: each response's real prompt +
response tokens. Each model is warmed up once, then runs alternate (native, transformers, native, ...); the
MEDIAN of each is reported and the ratio is the median of the per-repeat ratios (robust to a drifting load).

Model FLOPs of one update (real tokens only; padding computed on is overhead, not work):

    6 * N * tokens + 6 * n_layers * d_attn * sum (query-key pairs of causal attention, x2)

with N = non-embedding parameters + the lm_head's V * D (counted even when tied to the embedding: the lookup
is free, the output projection is not), d_attn = heads * head_dim; the second term is causal attention (QK^T
and AV, 2 * d_attn FLOPs per query-key pair per layer forward) times 3 for forward + backward. The tokens
and pairs are those each model really computes: with prompts shared, a prompt's tokens count once per
micro-batch group instead of once per response (counted once per group here: the FLOPs are a lower bound, so
the fraction of peak is not flattered). The log-prob pass is a third of that. Peak: the median GFLOP/s of a
2048 x 2048 matmul measured in this script for each dtype, both as ``torch.mm`` (MKL) and through oneDNN
(``torch.ops.mkldnn._linear_pointwise``, which on AMD CPUs runs AVX-512 kernels where MKL's sgemm runs AVX2);
the larger is "peak", so the fraction of peak is honest. ``--profile`` prints torch.profiler's top ops by
self CPU time for one native update per case. Nothing is downloaded: the 3m and 25m models (bench/rollout.py's
sizes) get random weights built locally; tiny is the built-in default policy (`ensure_tiny_model`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from rollout import SIZES  # bench/ is on sys.path when run as a script: the same model configs
from torch import nn

from dapo.collect import Group, make_train_batch
from dapo.config import ActorConfig, AlgorithmConfig
from dapo.models import CausalLM, HFCausalLM, kernels, load_pretrained
from dapo.models.tiny import ensure_tiny_model
from dapo.train import Actor, TrainBatch

PROMPTS, GROUP, MIN_PROMPT, MAX_PROMPT, MIN_RESPONSE, MAX_RESPONSE = 8, 8, 32, 64, 16, 128
PAD = 0  # the tiny model's pad id; random token ids are drawn from [1, vocab)
PEAK_N = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16-mixed": torch.float32}
"""Parameter dtype per ``--dtype``; bf16-mixed computes in bf16 (`COMPUTE`) with `actor.precision`."""
COMPUTE = {**DTYPES, "bf16-mixed": torch.bfloat16}


def checkpoint(size: str, root: Path) -> Path:
    """The checkpoint directory: the tiny default policy, or a random-weight Qwen2 built once under root."""
    if size == "tiny":
        return ensure_tiny_model()
    path = root / size
    if not path.exists():
        torch.manual_seed(0)
        config = transformers.Qwen2Config(**SIZES[size], tie_word_embeddings=True, rope_theta=10000.0)
        transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def make_batch(vocab: int, pad: int, seed: int = 1234) -> TrainBatch:
    """8 groups of 8 responses with random lengths, tokens, rollout log-probs and mixed 0/1 rewards."""
    rng = random.Random(seed)
    groups = []
    for i in range(PROMPTS):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(MIN_PROMPT, MAX_PROMPT))]
        lengths = [rng.randint(MIN_RESPONSE, MAX_RESPONSE) for _ in range(GROUP)]
        acc = [True, False] + [rng.random() < 0.5 for _ in range(GROUP - 2)]  # 0 < correct < G
        rng.shuffle(acc)
        groups.append(
            Group(
                example_index=i, data_source="bench", prompt_ids=prompt,
                responses=[[rng.randrange(1, vocab) for _ in range(n)] for n in lengths],
                rollout_logprobs=[[-2.0 * rng.random() for _ in range(n)] for n in lengths],
                truncated=[n == MAX_RESPONSE for n in lengths], acc=acc, rewards=[float(a) for a in acc],
                step=1,
            )
        )  # fmt: skip
    return make_train_batch(groups, pad_token_id=pad)


def update_flops(model: CausalLM, batch: TrainBatch, *, shared: bool) -> float:
    """Model FLOPs of one forward + backward over the batch's real tokens (formula: module docstring), with
    each prompt computed once per group (`shared`, the native model) or once per response (transformers)."""
    a = model.args
    embed = model.model.embed_tokens.weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embed + a.vocab_size * a.hidden_size
    prompt = batch.prompt_mask.sum(1).double()  # [N]
    p = prompt[batch.prompt_index]  # [B]
    rows = p + batch.response_lengths.double()  # [B] prompt + response
    pairs = rows * (rows + 1) - p * (p + 1)  # 2 x causal query-key pairs of the response tokens
    tokens = batch.response_lengths.double().sum()
    if shared:
        pairs, tokens = pairs.sum() + (prompt * (prompt + 1)).sum(), tokens + prompt.sum()
    else:
        pairs, tokens = pairs.sum() + (p * (p + 1)).sum(), tokens + p.sum()
    return 6 * n * float(tokens) + 6 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * float(pairs)


def row_tokens(batch: TrainBatch) -> int:
    """Real prompt + response tokens summed over the responses (each response counts its prompt)."""
    return int(batch.prompt_mask.sum(1)[batch.prompt_index].sum() + batch.response_lengths.sum())


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peak(dtype: torch.dtype, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a PEAK_N^3 matmul, as torch.mm and through oneDNN (where that is built in)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PEAK_N, PEAK_N, generator=g).to(dtype)
    w = torch.randn(PEAK_N, PEAK_N, generator=g).to(dtype)
    kernels: dict[str, Callable[[], object]] = {
        "mm": lambda: torch.mm(x, w),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
    }
    out: dict[str, float] = {}
    for kernel, fn in kernels.items():
        with contextlib.suppress(AttributeError, RuntimeError):  # no oneDNN, or not for this dtype
            out[kernel] = 2 * PEAK_N**3 / median_seconds(fn, repeats) / 1e9
    return out


def make_actor(model: nn.Module, micro: int, precision: str) -> Actor:
    cfg = ActorConfig(
        lr=1e-6, warmup_steps=0, mini_batch_size=PROMPTS * GROUP, micro_batch_size=micro,
        precision=precision,  # type: ignore[arg-type]
    )  # fmt: skip
    return Actor(model, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=MAX_RESPONSE)


def step(actor: Actor, batch: TrainBatch) -> tuple[float, float]:
    """Seconds of the old-log-prob pass and of the update."""
    start = time.perf_counter()
    old = actor.compute_logprobs(batch)
    mid = time.perf_counter()
    metrics = actor.update(dataclasses.replace(batch, old_logprobs=old))
    end = time.perf_counter()
    assert metrics["actor/updates"] == 1, f"the optimizer step was skipped: {metrics}"
    return mid - start, end - mid


def profile(actor: Actor, batch: TrainBatch, rows: int = 20) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = dataclasses.replace(batch, old_logprobs=actor.compute_logprobs(batch))
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        actor.update(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def bench(
    size: str, dtype_name: str, repeats: int, micro: int, peaks: dict[str, float], root: Path, prof: bool
) -> None:
    dtype = DTYPES[dtype_name]
    path = checkpoint(size, root)
    native = load_pretrained(path, dtype=dtype)
    hf = load_pretrained(path, dtype=dtype, implementation="hf")
    assert isinstance(native, CausalLM) and isinstance(hf, HFCausalLM)
    hf_state = hf.hf.state_dict()
    assert all(torch.equal(v, hf_state[k]) for k, v in native.state_dict().items()), "weights differ"
    batch = make_batch(native.args.vocab_size, PAD)
    tokens = row_tokens(batch)
    flops = {"native": update_flops(native, batch, shared=True)}
    flops["transformers"] = update_flops(native, batch, shared=False)
    precision = "bf16-mixed" if dtype_name == "bf16-mixed" else "model"
    actors = {k: make_actor(m, micro, precision) for k, m in (("native", native), ("transformers", hf))}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in actors}
    for actor in actors.values():
        step(actor, batch)  # warm-up (also allocates the AdamW state)
    for _ in range(repeats):
        for name, actor in actors.items():
            times[name].append(step(actor, batch))
    upd = {k: [tokens / t[1] for t in v] for k, v in times.items()}
    lp = {k: statistics.median(tokens / t[0] for t in v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in upd.items()}
    ratio = statistics.median(a / b for a, b in zip(upd["native"], upd["transformers"], strict=True))
    peak = max(peaks.values())
    gf = {k: flops[k] * v / tokens / 1e9 for k, v in med.items()}
    pct = {k: 100 * v / peak for k, v in gf.items()}
    n_params = sum(p.numel() for p in native.parameters())
    label = f"{size} ({n_params / 1e6:.2f}M) {dtype_name}"
    attn = getattr(hf.hf.config, "_attn_implementation", "?")
    print(
        f"{label:<24} update native {med['native']:7.0f} tok/s  transformers {med['transformers']:7.0f} "
        f"tok/s  ratio {ratio:4.2f}x  |  native {gf['native']:6.1f} GFLOP/s = {pct['native']:4.1f}% of peak, "
        f"transformers {gf['transformers']:6.1f} = {pct['transformers']:4.1f}%"
    )
    runs = ", ".join(f"{k} {[round(x) for x in v]}" for k, v in upd.items())
    print(
        f"{'':<24} {tokens} tokens, GFLOP/update native {flops['native'] / 1e9:.1f} (prompts shared), "
        f"transformers {flops['transformers'] / 1e9:.1f}, transformers attention {attn}; "
        f"log-prob pass native {lp['native']:.0f} "
        f"tok/s, transformers {lp['transformers']:.0f} tok/s ({lp['native'] / lp['transformers']:.2f}x); "
        f"update runs: {runs}"
    )
    print(f"{'':<24} {kernels.describe()}")
    if prof:
        print(f"profile: native update, {label}")
        profile(actors["native"], batch)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", *SIZES, "all"], default="all")
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="rows per forward/backward pass")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one native update")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads")
    print(kernels.machine_line())
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    measured = {d: measure_peak(d) for d in dict.fromkeys(COMPUTE[name] for name in dtypes)}
    peaks = {name: measured[COMPUTE[name]] for name in dtypes}  # bf16-mixed: the bf16 peak
    for name in dtypes:
        text = ", ".join(f"{k} {v:.0f}" for k, v in peaks[name].items())
        print(f"peak {name}: {max(peaks[name].values()):.0f} GFLOP/s ({PEAK_N}^3 matmul: {text})")
    print(
        f"{PROMPTS}x{GROUP} responses, prompts {MIN_PROMPT}-{MAX_PROMPT}, responses {MIN_RESPONSE}-"
        f"{MAX_RESPONSE} tokens, micro-batches of {args.micro_batch_size}, AdamW lr 1e-6, median of "
        f"{args.repeats}"
    )
    sizes = ["tiny", *SIZES] if args.size == "all" else [args.size]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for name in dtypes:
                bench(size, name, args.repeats, args.micro_batch_size, peaks[name], Path(tmp), args.profile)


if __name__ == "__main__":
    main()
