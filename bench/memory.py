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
    g = torch.Generator().manual_seed(1)
    batch = TrainBatch(
        prompt_ids=torch.randint(0, ARGS.vocab_size, (1, prompt), generator=g),
        prompt_mask=torch.ones(1, prompt, dtype=torch.long),
        prompt_index=torch.zeros(1, dtype=torch.long),
        response_ids=torch.randint(0, ARGS.vocab_size, (1, response), generator=g),
        response_lengths=torch.tensor([response]),
        response_mask=torch.ones(1, response),
        advantages=torch.ones(1),
        rollout_logprobs=torch.zeros(1, response),
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="2048,4096", help="comma-separated prompt + response lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.repeats)))
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
    for tokens in (int(t) for t in args.tokens.split(",")):
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


if __name__ == "__main__":
    main()
