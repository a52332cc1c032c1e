"""The update's memory settings on CPU: the planner's estimate beside the measured peak, and their time cost.

    python bench/memory.py [--tokens 2048,4096] [--repeats 3] [--settings none,checkpointing,...]

A random Qwen2-shaped model of real proportions, scaled down (hidden 512, 8 layers, MLP 2,816, 8 query / 2
key-value heads of 64, vocabulary 32,000: 56.2M parameters; the vocabulary-to-width ratio of Qwen2.5's is
kept high on purpose, since that is what makes logits matter), trains on one response of ``tokens`` tokens
(an eighth of them prompt) in one micro-batch, float32, with each setting in a fresh process:

- none: the plain update;
- checkpointing: `actor.activation_checkpointing`;
- chunked: `actor.logits_chunk_tokens=512`;
- both: the two together.

Then the generation lines: the native engine's round of `GENERATE` with each KV
budget of ``--kv-mib`` in a fresh process, its peak beside `dapo.plan.engine_memory`'s estimate, and what the
hand-off frees in one process (the bf16 sampling copy).

Per setting: the update's median seconds over ``--repeats`` after one warm-up update (which creates AdamW's
states), the process's peak resident memory growth from before the model was built (`ru_maxrss`, so
everything the update allocated, the Python allocator's slack included), and `dapo.plan.rank_memory`'s
estimate for the same settings (one process, `cuda=False`). The measured peak holds no gradients while the
activations live (one micro-batch per update), which the planner counts, so the planner's gradient term is
left out of the comparison. Prints the CPU (`dapo.models.kernels.machine_line`) and a table with ratios
against "none". Results are only comparable on one machine, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dapo.config import ActorConfig, AlgorithmConfig, load_config
from dapo.models import CausalLM, ModelArgs, kernels
from dapo.plan import rank_memory
from dapo.train import Actor, TrainBatch

ARGS = ModelArgs(
    architecture="Qwen2ForCausalLM", vocab_size=32000, hidden_size=512, intermediate_size=2816,
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    tie_word_embeddings=True, qkv_bias=True,
)  # fmt: skip
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "checkpointing": {"activation_checkpointing": True},
    "chunked": {"logits_chunk_tokens": 512},
    "both": {"activation_checkpointing": True, "logits_chunk_tokens": 512},
}


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def random_batch(tokens: int) -> TrainBatch:
    """One random response of ``tokens`` tokens, an eighth of them prompt."""
    prompt = tokens // 8
    response = tokens - prompt
    g = torch.Generator().manual_seed(1)
    return TrainBatch(
        prompt_ids=torch.randint(0, ARGS.vocab_size, (1, prompt), generator=g),
        prompt_mask=torch.ones(1, prompt, dtype=torch.long),
        prompt_index=torch.zeros(1, dtype=torch.long),
        response_ids=torch.randint(0, ARGS.vocab_size, (1, response), generator=g),
        response_lengths=torch.tensor([response]),
        response_mask=torch.ones(1, response),
        advantages=torch.ones(1),
        rollout_logprobs=torch.zeros(1, response),
    )


def one(setting: str, tokens: int, repeats: int) -> dict[str, Any]:
    """One setting in this (fresh) process."""
    from dapo import distributed

    prompt = tokens // 8
    response = tokens - prompt
    before = peak_bytes()
    torch.manual_seed(0)
    model = CausalLM(ARGS)
    settings = SETTINGS[setting]
    world = distributed.World.single()
    model, _ = distributed.parallelize(
        model, world, activation_checkpointing=bool(settings.get("activation_checkpointing"))
    )
    cfg = ActorConfig(lr=1e-6, warmup_steps=0, mini_batch_size=1, micro_batch_size=1, **settings)
    actor = Actor(model, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=response)
    batch = random_batch(tokens)
    seconds = []
    for i in range(repeats + 1):
        batch.old_logprobs = None
        t0 = time.perf_counter()
        actor.update(batch)
        if i > 0:
            seconds.append(time.perf_counter() - t0)
    measured = peak_bytes() - before
    plan_cfg = load_config(None, [f"data.max_prompt_length={prompt}", "model.dtype=float32"])
    plan_cfg.rollout.max_response_length = response
    plan_cfg.actor = cfg
    plan = rank_memory(plan_cfg, ARGS, 1, cuda=False, generates=False)
    return {
        "setting": setting,
        "tokens": tokens,
        "seconds": statistics.median(seconds),
        "measured_mib": measured / 2**20,
        "planned_mib": (plan.update - plan.grads) / 2**20,
    }


GENERATE = {"prompts": 4, "n": 8, "prompt": 256, "response": 768}
"""The generation lines' round: 4 prompts of 256 tokens, 8 samples each, 768 tokens each (a random model
never stops early: every row runs to full length)."""


def one_generate(kv_mib: int) -> dict[str, Any]:
    """The native engine's round (`GENERATE`, float32) in this (fresh) process with a KV budget of ``kv_mib``
    (0: none): its seconds, the process's peak resident set (VmHWM, reset before the model is built) above
    what was resident then (weights included), and `dapo.plan.engine_memory`'s estimate."""
    from dapo.config import Config
    from dapo.plan import engine_memory
    from dapo.rollout import NativeEngine
    from dapo.rollout.base import SamplingParams

    g = GENERATE
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident now
    before = resident_bytes()
    torch.manual_seed(0)
    model = CausalLM(ARGS).requires_grad_(False)
    engine = NativeEngine(model, pad_token_id=0, kv_budget_bytes=kv_mib * 2**20 or None)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, ARGS.vocab_size, (g["prompt"],), generator=gen).tolist() for _ in range(4)]
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(n=g["n"], max_tokens=g["response"], seed=0))
    seconds = time.perf_counter() - t0
    measured = vm_hwm_bytes() - before
    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.data.max_prompt_length, cfg.rollout.max_response_length = g["prompt"], g["response"]
    cfg.rollout.n, cfg.rollout.kv_cache_gib = g["n"], kv_mib / 1024
    plan = engine_memory(cfg, ARGS, g["prompts"], cuda=False)
    planned = plan.weights + plan.kv_cache + plan.workspace
    return {"kv_mib": kv_mib, "seconds": seconds, "measured_mib": measured / 2**20,
            "planned_mib": planned / 2**20, "rows": plan.in_flight}  # fmt: skip


def vm_hwm_bytes() -> int:
    """The process's peak resident set since the last reset through /proc/self/clear_refs (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_handoff(release: bool) -> dict[str, Any]:
    """What the hand-off saves in one process: the native engine sampling in bf16 from float32 weights
    (`actor.precision=bf16-mixed`) keeps a bf16 copy, which `NativeEngine.release` (the hand-off's first act)
    drops before the update. The process's peak resident set over a short generation and a 1,024-token
    update, with or without the release."""
    from dapo.rollout import NativeEngine
    from dapo.rollout.base import SamplingParams

    Path("/proc/self/clear_refs").write_text("5")
    before = resident_bytes()
    torch.manual_seed(0)
    model = CausalLM(ARGS)
    engine = NativeEngine(model, pad_token_id=0, dtype=torch.bfloat16)
    engine.generate([[1, 2, 3, 4]], SamplingParams(n=2, max_tokens=4, seed=0))
    if release:
        engine.release()
    actor = Actor(model, ActorConfig(lr=1e-6, warmup_steps=0, mini_batch_size=1, micro_batch_size=1),
                  AlgorithmConfig(), temperature=1.0, max_response_length=896)  # fmt: skip
    actor.update(random_batch(1024))
    return {"peak_mib": (vm_hwm_bytes() - before) / 2**20,
            "copy_mib": sum(p.numel() * 2 for p in model.parameters()) / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="2048,4096", help="comma-separated prompt + response lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--kv-mib", default="0,64", help="the generation lines' KV budgets (0: none)")
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--one-generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-handoff", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.repeats)))
        return
    if args.one_generate is not None:
        print(json.dumps(one_generate(args.one_generate)))
        return
    if args.one_handoff is not None:
        print(json.dumps(one_handoff(bool(args.one_handoff))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(kernels.machine_line())
    params = sum(p.numel() for p in CausalLM(ARGS).parameters())
    shape = f"hidden {ARGS.hidden_size}, {ARGS.num_hidden_layers} layers, vocabulary {ARGS.vocab_size}"
    print(f"model: {params / 1e6:.1f}M parameters ({shape}), float32, one response per update")
    print(f"median of {args.repeats} updates after one warm-up, each setting in a fresh process")
    columns = ["tokens", "setting", "update s", "x none", "measured MiB", "planned MiB", "planned/measured"]
    print("| " + " | ".join([*columns, "saved MiB"]) + " |")
    print("|" + "---|" * 8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    for tokens in (int(t) for t in args.tokens.split(",") if t):  # --tokens "": the generation lines only
        base: dict[str, Any] | None = None
        for setting in args.settings.split(","):
            run = subprocess.run(
                [sys.executable, __file__, "--one", setting, str(tokens), "--repeats", str(args.repeats)],
                capture_output=True, text=True, env=env, check=True,
            )  # fmt: skip
            r = json.loads(run.stdout.strip().splitlines()[-1])
            base = base or r
            measured, planned = r["measured_mib"], r["planned_mib"]
            print(
                f"| {tokens} | {setting} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f} | "
                f"{measured:.0f} | {planned:.0f} | {planned / measured:.2f} | "
                f"{base['measured_mib'] - measured:.0f} |",
                flush=True,
            )
    g = GENERATE
    print(
        f"\ngeneration (native engine, float32): {g['prompts']} prompts of {g['prompt']} tokens x {g['n']} "
        f"samples x {g['response']} tokens, weights included"
    )
    print("| KV budget MiB | rows at once | generate s | measured MiB | planned MiB | planned/measured |")
    print("|" + "---|" * 6)
    for kv in (int(k) for k in args.kv_mib.split(",")):
        r = fresh(env, "--one-generate", str(kv))
        print(
            f"| {kv or 'none'} | {r['rows']} | {r['seconds']:.1f} | {r['measured_mib']:.0f} | "
            f"{r['planned_mib']:.0f} | {r['planned_mib'] / r['measured_mib']:.2f} |",
            flush=True,
        )
    kept, released = fresh(env, "--one-handoff", "0"), fresh(env, "--one-handoff", "1")
    print(
        f"\nhand-off in one process (bf16 sampling copy of float32 weights, then a 1,024-token update): "
        f"peak {kept['peak_mib']:.0f} MiB with the copy kept, {released['peak_mib']:.0f} MiB released first "
        f"(saved {kept['peak_mib'] - released['peak_mib']:.0f} MiB; the copy: {kept['copy_mib']:.0f} MiB)"
    )


def fresh(env: dict[str, str], *args: str) -> dict[str, Any]:
    """This script's JSON result for ``args`` in a fresh process."""
    run = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True
    )
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
