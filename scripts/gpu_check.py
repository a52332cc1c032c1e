"""`make gpu-check`: the GPU paths on one CUDA GPU, in minutes, with no network (random weights, a tokenizer
built here). Run from the repository root: ``python scripts/gpu_check.py [--out DIR]``.

1. update: one `Actor.update` of a random Qwen2.5-1.5B-shaped model (float32 masters, bf16-mixed) on one
   response of 16,384 tokens (1,024 prompt + 15,360 response), with each memory setting on and off: time,
   MFU (model FLOPs over the GPU's dense bf16 peak) and the peak of `torch.cuda.max_memory_allocated`
   against the `--dry-run` planner's estimate (`dapo.plan.rank_memory`) for the same settings, and the
   memory held between updates (`actor.offload=optimizer` moves AdamW's states to the host).
2. generation: the native engine's bf16 sampling against transformers' `generate` on the same random
   Qwen2.5-0.5B-shaped weights and prompts (tokens/s, every row decoding the full budget).
3. engine: the native engine's CUDA peak for one round of 64 rows × 2,560 tokens, with no KV budget and
   with `rollout.kv_cache_gib=0.5`, against the planner's `engine_memory` (weights + KV cache + workspace).
4. torchrun: `torchrun --nproc-per-node 1 -m dapo train` (NCCL; the policy loaded sharded,
   `distributed.load_sharded`) for 2 steps with checkpoints, then resumed to 4 steps (`--resume auto`), on a
   random model with the built-in task's tokenizer.

Prints one table per part and writes ``<out>/gpu_check.json``. Exit status 1 if a part fails.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dapo import distributed  # noqa: E402
from dapo.config import ActorConfig, AlgorithmConfig, Config  # noqa: E402
from dapo.models import CausalLM, save_pretrained  # noqa: E402
from dapo.plan import model_shape, parameter_count, rank_memory  # noqa: E402
from dapo.train import Actor, TrainBatch  # noqa: E402

DEV = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda"))  # "cpu": a smoke run of the script itself
SMOKE = DEV.type == "cpu"
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 512}
SMOKE_SHAPE |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, the vendor's datasheet
GIB = 2.0**30
SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "checkpointing": {"activation_checkpointing": True},
    "chunked logits": {"logits_chunk_tokens": 2048},
    "both": {"activation_checkpointing": True, "logits_chunk_tokens": 2048},
    "both + optimizer offload": {
        "activation_checkpointing": True,
        "logits_chunk_tokens": 2048,
        "offload": "optimizer",
    },
}


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def update_check(
    shape: str = "qwen2.5-1.5b", prompt: int = 1024, response: int = 15360, repeats: int = 3
) -> list[dict[str, Any]]:
    args, _ = model_shape(shape)
    assert args is not None
    if SMOKE:
        args = dataclasses.replace(args, **SMOKE_SHAPE)
        prompt, response, repeats = 16, 48, 1
    dev = DEV
    torch.manual_seed(0)
    with dev:
        base = CausalLM(args).float()
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(
        prompt_ids=torch.randint(0, args.vocab_size, (1, prompt), generator=g),
        prompt_mask=torch.ones(1, prompt, dtype=torch.long),
        prompt_index=torch.zeros(1, dtype=torch.long),
        response_ids=torch.randint(0, args.vocab_size, (1, response), generator=g),
        response_lengths=torch.tensor([response]),
        response_mask=torch.ones(1, response),
        advantages=torch.ones(1),
        rollout_logprobs=torch.zeros(1, response),
    )
    _, layer = parameter_count(args)
    tokens = prompt + response
    # model FLOPs of one update (forward + backward = 3 forwards): the layers' matmuls on every token, causal
    # attention (QKᵀ and AV over half the square), the head on the response tokens
    attention = (
        2 * 2 * tokens * tokens / 2 * args.num_attention_heads * args.head_dim * args.num_hidden_layers
    )
    forward = (
        2 * layer * args.num_hidden_layers * tokens
        + attention
        + 2 * args.hidden_size * args.vocab_size * response
    )
    rows = []
    chosen = os.environ.get("GPU_CHECK_SETTINGS")  # a comma-separated subset of SETTINGS
    for name, settings in SETTINGS.items():
        if chosen and name not in chosen.split(","):
            continue
        model = copy.deepcopy(base)
        world = distributed.World.single(dev)
        checkpointing = bool(settings.get("activation_checkpointing", False))
        model, _ = distributed.parallelize(model, world, activation_checkpointing=checkpointing)
        cfg = ActorConfig(
            lr=1e-6, warmup_steps=0, mini_batch_size=1, micro_batch_size=1, precision="bf16-mixed", **settings
        )
        actor = Actor(
            model, cfg, AlgorithmConfig(), temperature=1.0, max_response_length=response, world=world
        )
        times = []
        for i in range(repeats + 1):
            if i == 1 and not SMOKE:
                torch.cuda.reset_peak_memory_stats()
            batch.old_logprobs = None
            sync()
            t0 = time.perf_counter()
            metrics = actor.update(batch)
            sync()
            if i > 0:
                times.append(time.perf_counter() - t0)
        peak = 1 if SMOKE else torch.cuda.max_memory_allocated()
        resident = 0 if SMOKE else torch.cuda.memory_allocated()  # between updates (generation's share)
        plan_cfg = Config()
        plan_cfg.model.dtype = "float32"
        plan_cfg.data.max_prompt_length, plan_cfg.rollout.max_response_length = prompt, response
        plan_cfg.actor = cfg
        est = rank_memory(plan_cfg, args, 1, cuda=True, generates=False).update
        seconds = sorted(times)[len(times) // 2]
        rows.append(
            {
                "setting": name,
                "update_s": seconds,
                "mfu": 3 * forward / seconds / PEAK_BF16,
                "peak_gib": peak / GIB,
                "between_updates_gib": resident / GIB,
                "planned_gib": est / GIB,
                "planned_over_measured": est / peak,
                "finite": bool(torch.isfinite(torch.tensor(metrics["actor/pg_loss"]))),
            }
        )
        print(rows[-1], flush=True)
        del actor, model
        if not SMOKE:
            torch.cuda.empty_cache()
    return rows


def generation_check(prompts: int = 128, prompt_len: int = 128, new: int = 256) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from dapo.rollout.base import SamplingParams
    from dapo.rollout.native import NativeEngine

    args, _ = model_shape("qwen2.5-0.5b")
    assert args is not None
    if SMOKE:
        args = dataclasses.replace(args, **SMOKE_SHAPE)
        prompts, prompt_len, new = 4, 8, 8
    torch.manual_seed(0)
    with DEV:
        model = CausalLM(args).to(torch.bfloat16)
    ids = torch.randint(1, args.vocab_size, (prompts, prompt_len), generator=torch.Generator().manual_seed(1))
    engine = NativeEngine(model, pad_token_id=0)
    sampling = SamplingParams(n=1, temperature=1.0, max_tokens=new, seed=0)
    engine.generate(ids[:8, :16].tolist(), SamplingParams(n=1, max_tokens=8, seed=0))  # warm-up
    sync()
    t0 = time.perf_counter()
    out = engine.generate(ids.tolist(), sampling)
    sync()
    native_s = time.perf_counter() - t0
    native_tokens = sum(len(c.token_ids) for c in out)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, Path(d))
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(DEV).eval()
    hf_ids = ids.to(DEV)
    kwargs = {"do_sample": True, "top_p": 1.0, "top_k": 0, "pad_token_id": 0, "eos_token_id": None}
    hf.generate(hf_ids[:8, :16], max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen = hf.generate(hf_ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
    sync()
    hf_s = time.perf_counter() - t0
    hf_tokens = (gen.shape[1] - prompt_len) * prompts
    row = {
        "prompts": prompts,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "native_tok_s": native_tokens / native_s,
        "transformers_tok_s": hf_tokens / hf_s,
        "native_over_transformers": (native_tokens / native_s) / (hf_tokens / hf_s),
    }
    print(row, flush=True)
    return row


ENGINE_ROUND = {"prompts": 8, "n": 8, "prompt": 512, "response": 2048}
"""The engine-peak part's round: 64 rows of 2,560 tokens (a random model never stops: all full length)."""


def engine_peak_check(budgets_gib: tuple[float, ...] = (0.0, 0.5)) -> list[dict[str, Any]]:
    """The native engine's peak on the GPU (`torch.cuda.max_memory_allocated`, the weights included) for one
    round of `ENGINE_ROUND` on a random Qwen2.5-0.5B-shaped bf16 model, with no KV budget and with
    `rollout.kv_cache_gib` = each of ``budgets_gib``, against `dapo.plan.engine_memory` (target: ±15%)."""
    from dapo.plan import engine_memory
    from dapo.rollout.base import SamplingParams
    from dapo.rollout.native import NativeEngine

    args, _ = model_shape("qwen2.5-0.5b")
    assert args is not None
    r = dict(ENGINE_ROUND)
    if SMOKE:
        args = dataclasses.replace(args, **SMOKE_SHAPE)
        r |= {"prompts": 2, "n": 2, "prompt": 8, "response": 8}
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, args.vocab_size, (r["prompt"],), generator=gen).tolist() for _ in range(r["prompts"])
    ]
    rows = []
    for budget in budgets_gib:
        if not SMOKE:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        with DEV:
            model = CausalLM(args).to(torch.bfloat16).requires_grad_(False)
        engine = NativeEngine(model, pad_token_id=0, kv_budget_bytes=budget * GIB or None)
        sync()
        t0 = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(n=r["n"], max_tokens=r["response"], seed=0))
        sync()
        seconds = time.perf_counter() - t0
        peak = 1 if SMOKE else torch.cuda.max_memory_allocated()
        cfg = Config()
        cfg.model.dtype = "bfloat16"
        cfg.data.max_prompt_length, cfg.rollout.max_response_length = r["prompt"], r["response"]
        cfg.rollout.n, cfg.rollout.kv_cache_gib = r["n"], budget
        plan = engine_memory(cfg, args, r["prompts"], cuda=True)
        planned = plan.weights + plan.kv_cache + plan.workspace
        rows.append(
            {
                "kv_cache_gib": budget or None,
                "rows_in_flight": plan.in_flight,
                "seconds": seconds,
                "tokens": sum(len(c.token_ids) for c in out),
                "peak_gib": peak / GIB,
                "planned_gib": planned / GIB,
                "planned_over_measured": planned / peak,
            }
        )
        print(rows[-1], flush=True)
        del engine, model
    return rows


def torchrun_check(out: Path) -> dict[str, Any]:
    from dapo.models.tiny import TinyRecipe, _make_model, build_tiny_tokenizer

    recipe = TinyRecipe()
    tokenizer = build_tiny_tokenizer(recipe)
    model_dir = out / "random-tiny"
    save_pretrained(_make_model(recipe, tokenizer), model_dir)
    tokenizer.save_pretrained(model_dir)
    common = [
        f"model.path={model_dir}",
        "trainer.prompts_per_step=8",
        "rollout.n=4",
        "rollout.max_response_length=40",
        "reward.overlong_cache_length=8",
        "actor.mini_batch_size=16",
        "actor.micro_batch_size=16",
        "actor.activation_checkpointing=true",
        "actor.logits_chunk_tokens=64",
        "evaluation.max_prompts=8",
        "evaluation.k=2",
        "evaluation.every_steps=0",
        "checkpoint.every_steps=1",
        "logging.progress_bar=false",
        f"trainer.output_dir={out}",
        "trainer.run_name=torchrun",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "dapo", "train"]
    results: dict[str, Any] = {}
    for name, extra in (
        ("first", ["trainer.total_steps=2"]),
        ("resumed", ["trainer.total_steps=4", "--resume", "auto"]),
    ):
        t0 = time.perf_counter()
        run = subprocess.run([*launch, *common, *extra], env=env, capture_output=True, text=True, timeout=300)
        log = run.stdout + run.stderr
        results[name] = {"rc": run.returncode, "s": time.perf_counter() - t0}
        if run.returncode != 0:
            print(log[-4000:], flush=True)
        results[name]["resumed"] = "resumed from" in log
    ckpts = sorted(p.name for p in (out / "torchrun" / "checkpoints").glob("step_*"))
    results["checkpoints"] = ckpts
    print(results, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--parts", default="update,generation,engine,torchrun")
    parser.add_argument("--update-shape", default="qwen2.5-1.5b", help="a name of dapo.plan.KNOWN_SHAPES")
    parser.add_argument("--update-tokens", default="1024,15360", help="prompt,response tokens of the update")
    args = parser.parse_args()
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "gpu": "cpu (smoke run)" if SMOKE else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(report, flush=True)
    ok = True
    parts = args.parts.split(",")
    checks = {
        "update": lambda: update_check(args.update_shape, *map(int, args.update_tokens.split(","))),
        "generation": generation_check,
        "engine": engine_peak_check,
        "torchrun": lambda: torchrun_check(args.out),
    }
    for part in parts:
        try:
            report[part] = checks[part]()
        except Exception as e:  # a failed part is reported, and the others still run
            ok = False
            report[part] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{part}: FAILED {type(e).__name__}: {e}", flush=True)
            import traceback

            traceback.print_exc()
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    if "torchrun" in report and not report["torchrun"].get("error"):
        t = report["torchrun"]
        ok = ok and t["first"]["rc"] == 0 and t["resumed"]["rc"] == 0 and t["resumed"]["resumed"]
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
