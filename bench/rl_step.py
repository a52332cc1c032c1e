"""One RL step: dapo's DAPO step against TRL's ``GRPOTrainer`` step on identical work, on the CPU.

    python bench/rl_step.py [--size tiny|25m|all] [--steps 5] [--warmup 1] [--threads N]
                            [--trl-retain-freed-memory] [--engine native|vllm] [--no-trl] [--bf16]

``--bf16``: dapo runs ``actor.precision=bf16-mixed`` (float32 master weights, bf16 autocast, bf16 sampling)
and TRL its bf16 setting (``bf16=True``: accelerate's bf16 autocast over float32 weights, generation
included); without it both sides run float32. The script prints the CPU model, its ISA extensions and the
kernel choices dapo's model made (`dapo.models.kernels`).

Workload (per step, both sides): the same 8 prompts of the built-in arithmetic task, chat-templated by dapo
(~70 tokens; TRL gets them as text and re-tokenizes them to the same ids, checked), G = 8 responses each, at
most 128 new tokens, temperature 1.0 with no top-p/top-k, one stop id (``<|im_end|>``); rewards from dapo's
``math_dapo`` verifier; group advantages (r - mean) / std; then one AdamW step (lr 1e-4, betas 0.9/0.999,
weight decay 0.1 on every parameter, grad clip 1.0, constant lr) on the token-mean DAPO loss over all 64
responses (clip 0.2 / 0.28, no KL), float32. Dynamic sampling is off so both sides do the same work. The
soft overlong punishment is off on both sides: on the random 25M model it would make rewards differ by
length within a group, and each side's policy would drift towards shorter responses at its own random pace.

- dapo runs the real trainer path (``Collector.collect`` -> ``stages.update_policy``: advantages, old
  log-probs, ``Actor.update``) with its native model and engine; a step is timed from collect to the end of
  the update, and split into generate / score (the collector's own timers) / update / other.
- TRL runs ``GRPOTrainer`` (``loss_type="dapo"``, ``epsilon_high=0.28``, ``beta=0``,
  ``scale_rewards="group"``, transformers' ``generate``, no vLLM, ``use_cpu``, no bf16, no gradient
  checkpointing) on the same checkpoint and tokenizer, with dapo's scorer as its reward function and an
  identical AdamW passed in; a step is timed from ``on_step_begin`` to ``on_step_end`` (generation,
  scoring, loss, backward, optimizer step).

Old log-probs: with one update per generation both sides skip the separate forward pass and use the
detached log-probs of the update's own forward (ratio exactly 1). What still differs: dapo's dual clip
(c = 10) is turned off here because TRL has none (at ratio 1 it never binds anyway); the
advantage's epsilon is 1e-6 in dapo and 1e-4 in TRL. Each side runs its own model code on the same weights
(dapo its native Qwen2, TRL transformers' ``Qwen2ForCausalLM``), and each samples with its own random
stream, so response lengths match only on average: the mean tokens per response of each side is printed.

Models: ``tiny`` is the embedded default (~2.9M-parameter Qwen2 after a short SFT on the task, so responses
stop early); ``25m`` is a 25M-parameter Qwen2 with random weights and the tiny tokenizer, built locally
(nothing is downloaded); it mostly runs to the 128-token limit and earns no reward, so its advantages are 0,
but both sides still compute the whole update. Each side is warmed up, then the MEDIAN seconds per step of
each is reported, and the ratio of the medians (TRL / dapo). Each side runs in its own fresh Python process
(one after the other, the same torch threads), so neither inherits the other's allocator state or warm
caches; run it on an otherwise idle machine. dapo tunes glibc's malloc when it loads a CPU policy
(`dapo.runtime.retain_freed_memory`: freed memory is kept for reuse instead of being returned to the OS);
TRL runs with the allocator's defaults, as its users get them, unless ``--trl-retain-freed-memory`` gives it
the same setting (reported for transparency: it speeds TRL up too).

``--engine vllm`` runs dapo's side with ``rollout.engine=vllm`` (needs vLLM: `make setup-vllm`, then
``.venv-vllm/bin/python bench/rl_step.py --engine vllm --no-trl``; that venv has no TRL, and ``--no-trl``
times dapo's side alone). The step's update then includes the weight sync into the engine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dapo import algo
from dapo.backends.policy import make_actor, sync_engine_weights
from dapo.config import Config, load_config
from dapo.data import PromptSampler
from dapo.data.prompts import load_examples_for, tokenize_prompts
from dapo.models import kernels, stop_token_ids
from dapo.models.load import load_policy
from dapo.models.tiny import ensure_tiny_model
from dapo.rewards import RewardPool
from dapo.rewards.pool import make_reward_pool
from dapo.rollout import make_engine
from dapo.runtime import retain_freed_memory
from dapo.stages import make_collector, update_policy

SIZES: dict[str, dict[str, int] | None] = {
    "tiny": None,  # the embedded default model (dapo.models.tiny)
    # 25.0M parameters with the tiny tokenizer's vocabulary (tied embeddings)
    "25m": {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 7,
            "num_attention_heads": 8, "num_key_value_heads": 4},
}  # fmt: skip
PROMPTS, G, NEW_TOKENS = 8, 8, 128
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
OVERRIDES = [
    "model.device=cpu",
    "model.dtype=float32",
    f"trainer.prompts_per_step={PROMPTS}",
    f"rollout.n={G}",
    f"rollout.max_response_length={NEW_TOKENS}",
    "rollout.temperature=1.0",
    "rollout.top_p=1.0",
    "rollout.top_k=-1",
    "algorithm.dynamic_sampling=false",
    "algorithm.dual_clip_c=null",  # TRL has no dual clip
    f"actor.mini_batch_size={PROMPTS * G}",  # one optimizer step per RL step, as TRL below
    f"actor.micro_batch_size={PROMPTS * G}",
    "actor.warmup_steps=0",  # constant lr, as TRL below
    "actor.epochs=1",
    "reward.num_workers=0",  # score in-process on both sides
    "reward.soft_overlong_punishment=false",  # see the module docstring; dapo_reward() would apply it too
]


def model_dir(size: str, root: Path) -> Path:
    """The checkpoint directory of `size`: the cached tiny model, or a random Qwen2 with its tokenizer."""
    tiny = ensure_tiny_model()
    shape = SIZES[size]
    if shape is None:
        return tiny
    path = root / size
    if not path.exists():
        base = json.loads((tiny / "config.json").read_text())
        torch.manual_seed(0)
        config = transformers.Qwen2Config(
            vocab_size=base["vocab_size"], **shape, tie_word_embeddings=True, rope_theta=10000.0,
            max_position_embeddings=512, bos_token_id=base.get("bos_token_id"),
            eos_token_id=base["eos_token_id"], pad_token_id=base.get("pad_token_id"),
        )  # fmt: skip
        transformers.Qwen2ForCausalLM(config).save_pretrained(path)
        for name in TOKENIZER_FILES:
            if (tiny / name).is_file():
                shutil.copy(tiny / name, path / name)
    return path


def num_parameters(path: Path) -> int:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return sum(p.numel() for p in model.parameters())


def dapo_step_times(cfg: Config, steps: int, warmup: int) -> list[dict[str, float]]:
    """Run warm-up + measured steps of dapo's trainer loop (no eval, logging or checkpoints); per-step
    seconds (total and split) and mean response length of the measured steps."""
    torch.manual_seed(cfg.trainer.seed)
    model, tokenizer, _ = load_policy(cfg.model)
    examples = load_examples_for(cfg.data.train_files, cfg.data, split="train", dedup=True)
    prompts = tokenize_prompts(examples[:PROMPTS], tokenizer, cfg.data.max_prompt_length)
    engine = make_engine(cfg.rollout, model, tokenizer, precision=cfg.actor.precision)
    scorer = make_reward_pool(cfg.reward)
    actor = make_actor(cfg, model)
    # the same 8 prompts every step
    sampler = PromptSampler(len(prompts), seed=cfg.trainer.seed, shuffle=False)
    collector = make_collector(cfg, engine, prompts, tokenizer, scorer.score, sampler)
    rows = []
    for step in range(1, warmup + steps + 1):
        t0 = time.perf_counter()
        collected = collector.collect(step)
        t1 = time.perf_counter()
        if len(collected.groups) != PROMPTS:
            raise RuntimeError(f"dapo collected {len(collected.groups)} groups, expected {PROMPTS}")
        update_policy(cfg, actor, collected.groups, tokenizer)
        sync_engine_weights(engine, model)  # vLLM keeps its own copy of the weights; no-op for native
        t2 = time.perf_counter()
        m = collected.metrics
        rows.append(
            {
                "step": t2 - t0,
                "generate": m["time/generate_s"],
                "score": m["time/score_s"],
                "update": t2 - t1,
                "other": (t1 - t0) - m["time/generate_s"] - m["time/score_s"],
                "tokens": m["rollout/response_length_mean"],
            }
        )
    scorer.close()
    print(f"  dapo {kernels.describe()}", flush=True)
    return rows[warmup:]


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step of a Trainer (generation happens inside the step in GRPOTrainer)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = time.perf_counter()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def dapo_reward(cfg: Config, pool: RewardPool, lengths: list[float]) -> Callable[..., list[float]]:
    """A TRL reward function computing exactly dapo's reward (the math_dapo score, plus the soft overlong
    punishment when the config turns it on); it records each call's mean completion length in `lengths`."""

    def math_dapo(
        completions: list[str], completion_ids: list[list[int]], answer: list[str], **_: Any
    ) -> list[float]:
        scores = [r.score for r in pool.score(completions, answer).results]
        n = torch.tensor([len(ids) for ids in completion_ids])
        lengths.append(float(n.float().mean()))
        if not cfg.reward.soft_overlong_punishment:
            return scores
        penalty = algo.soft_overlong_penalty(
            n, max_length=cfg.rollout.max_response_length, cache_length=cfg.reward.overlong_cache_length
        )
        factor = cfg.reward.overlong_penalty_factor
        return [s + factor * float(p) for s, p in zip(scores, penalty, strict=True)]

    return math_dapo


def trl_prompts(cfg: Config, tokenizer: Any, examples: list[Any]) -> tuple[list[str], list[str]]:
    """dapo's chat-templated prompts as the text TRL takes (checked to re-tokenize to dapo's ids), and their
    answers."""
    prompts = tokenize_prompts(examples, tokenizer, cfg.data.max_prompt_length)
    texts = [
        tokenizer.apply_chat_template(e.chat_messages(), tokenize=False, add_generation_prompt=True)
        for e in prompts.examples
    ]
    for text, ids in zip(texts, prompts.prompt_ids, strict=True):  # TRL tokenizes plain-text prompts this way
        if tokenizer(text=text)["input_ids"] != ids:
            raise RuntimeError(f"TRL would see other prompt tokens than dapo for {text!r}")
    return texts, prompts.answers


def grpo_trainer(
    cfg: Config,
    path: Path,
    texts: list[str],
    answers: list[str],
    out: Path,
    *,
    max_steps: int,
    steps_per_generation: int = 1,
    shuffle: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[Any, RewardPool, list[float]]:
    """TRL's GRPOTrainer set up to do dapo's step from `cfg` on the checkpoint at `path`: each generation
    batch is `cfg.trainer.prompts_per_step` prompts x G, trained in `steps_per_generation` optimizer steps
    (dapo's mini-batches), with dapo's reward (`dapo_reward`) and dapo's optimizer exactly; the learning
    rate warms up linearly over `cfg.actor.warmup_steps` generation batches, then stays constant (as dapo's
    schedule). Returns the trainer, its reward pool (close it) and the list of mean completion lengths
    that each reward call appends to."""
    threads = torch.get_num_threads()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    stops = list(stop_token_ids(tokenizer))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, local_files_only=True
    )
    model.generation_config.eos_token_id = stops  # TRL stops on these (plus the tokenizer's eos)
    import datasets  # the bench extra: imported here so that `--no-trl` runs without it
    import trl

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"prompt": texts, "answer": answers})
    a, g = cfg.actor, cfg.rollout.n
    batch = cfg.trainer.prompts_per_step * g // steps_per_generation
    args = trl.GRPOConfig(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=batch, num_generations=g,
        steps_per_generation=steps_per_generation, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=cfg.rollout.max_response_length,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0, loss_type="dapo",
        epsilon=cfg.algorithm.eps_low, epsilon_high=cfg.algorithm.eps_high, beta=0.0, scale_rewards="group",
        mask_truncated_completions=cfg.algorithm.overlong_filter, use_vllm=False, use_cpu=True,
        bf16=cfg.actor.precision == "bf16-mixed",
        fp16=False, activation_checkpointing=False, learning_rate=a.lr, adam_beta1=a.betas[0],
        adam_beta2=a.betas[1], adam_epsilon=1e-8, weight_decay=a.weight_decay, max_grad_norm=a.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0, shuffle_dataset=shuffle, seed=cfg.trainer.seed,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0,
    )  # fmt: skip
    # dapo's optimizer exactly: AdamW with weight decay on every parameter (Trainer's default exempts biases
    # and norms); dapo's schedule: lr x min(1, generation batch / warm-up steps), 1-based
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, eps=1e-8
    )
    warmup = a.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i // steps_per_generation + 1) / warmup) if warmup else 1.0
    )
    pool = make_reward_pool(cfg.reward)
    lengths: list[float] = []
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=dapo_reward(cfg, pool, lengths), args=args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=list(callbacks), optimizers=(optimizer, scheduler),
    )  # fmt: skip
    trainer.remove_callback(transformers.PrinterCallback)  # it would print the final metrics dict
    if trainer.args.gradient_checkpointing or torch.get_num_threads() != threads:
        raise RuntimeError("TRL turned on gradient checkpointing or changed the number of threads")
    if sorted(trainer.eos_token_ids) != sorted(stops):
        raise RuntimeError(f"TRL stops on {trainer.eos_token_ids}, dapo on {stops}")
    return trainer, pool, lengths


def trl_step_times(cfg: Config, path: Path, steps: int, warmup: int, out: Path) -> list[dict[str, float]]:
    """Run warm-up + measured steps of TRL's GRPOTrainer on the same work; per-step seconds (total and
    transformers.generate) and mean response length of the measured steps."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    examples = load_examples_for(cfg.data.train_files, cfg.data, split="train", dedup=True)
    texts, answers = trl_prompts(cfg, tokenizer, examples[:PROMPTS])
    total = warmup + steps
    timer = StepTimer()
    # rows in order, no shuffling: every step takes the same 8 prompts (RepeatSampler repeats each G times)
    trainer, pool, lengths = grpo_trainer(
        cfg, path, texts * total, answers * total, out, max_steps=total, callbacks=[timer]
    )
    model = trainer.model
    generate_seconds: list[float] = []
    generate = model.generate

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = generate(*args, **kwargs)
        generate_seconds.append(time.perf_counter() - t0)
        return result

    model.generate = timed_generate  # instrumentation only: the same call, timed
    trainer.train()
    pool.close()
    if not (len(timer.seconds) == len(lengths) == len(generate_seconds) == total):
        raise RuntimeError(
            f"expected {total} TRL steps, got {len(timer.seconds)} timed, {len(lengths)} scored, "
            f"{len(generate_seconds)} generate calls"
        )
    rows = [
        {"step": s, "generate": g, "tokens": n}
        for s, g, n in zip(timer.seconds, generate_seconds, lengths, strict=True)
    ]
    return rows[warmup:]


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run_side(side: str, size: str, path: Path, args: argparse.Namespace, out: Path) -> list[dict[str, float]]:
    """One side's measured steps, run in a fresh Python process (this script with ``--side``)."""
    cmd = [sys.executable, __file__, "--side", side, "--size", size, "--model", str(path), "--out", str(out)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--engine", args.engine]
    if args.bf16:
        cmd += ["--bf16"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.trl_retain_freed_memory:
        cmd += ["--trl-retain-freed-memory"]
    subprocess.run(cmd, check=True)
    rows: list[dict[str, float]] = json.loads((out / f"{side}.json").read_text())
    return rows


def side_main(args: argparse.Namespace) -> None:
    """Child process: run one side, write its rows as JSON."""
    path, out = Path(args.model), Path(args.out)
    precision = "bf16-mixed" if args.bf16 else "model"
    cfg = load_config(
        "tiny",
        [*OVERRIDES, f"model.path={path}", f"rollout.engine={args.engine}", f"actor.precision={precision}"],
    )
    if args.side == "dapo":
        rows = dapo_step_times(cfg, args.steps, args.warmup)
    else:
        if args.trl_retain_freed_memory:
            retain_freed_memory()
        rows = trl_step_times(cfg, path, args.steps, args.warmup, out / f"trl-{args.size}")
    (out / f"{args.side}.json").write_text(json.dumps(rows))


def bench(size: str, args: argparse.Namespace, root: Path) -> None:
    path = model_dir(size, root)
    ours = run_side("dapo", size, path, args, root)
    engine = f"dapo (rollout.engine={args.engine})"
    split = "  ".join(
        f"{k.replace('_', ' ')} {median(ours, k):.3f}" for k in ("generate", "score", "update", "other")
    )
    if args.no_trl:
        print(f"{size} ({num_parameters(path) / 1e6:.2f}M parameters, {path})")
        print(f"  {engine} {median(ours, 'step'):8.3f} s/step; split (s, medians): {split}")
        print(f"  tokens per response {statistics.mean(r['tokens'] for r in ours):6.1f}; per step (s): "
              f"{[round(r['step'], 3) for r in ours]}")  # fmt: skip
        return
    theirs = run_side("trl", size, path, args, root)
    d, t = median(ours, "step"), median(theirs, "step")
    trl_malloc = ", TRL with dapo's malloc setting" if args.trl_retain_freed_memory else ""
    print(f"{size} ({num_parameters(path) / 1e6:.2f}M parameters, {path}{trl_malloc})")
    print(f"  {engine} {d:8.3f} s/step   TRL {t:8.3f} s/step   TRL/dapo {t / d:5.2f}x")
    print(
        f"  tokens per response: dapo {statistics.mean(r['tokens'] for r in ours):6.1f}   "
        f"TRL {statistics.mean(r['tokens'] for r in theirs):6.1f}"
    )
    print(f"  dapo split (s, medians): {split}")
    print(f"  TRL generate (transformers.generate, s, median): {median(theirs, 'generate'):.3f}")
    per_step = {name: [round(r["step"], 3) for r in rows] for name, rows in (("dapo", ours), ("TRL", theirs))}
    print(f"  per step (s): {per_step}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=[*SIZES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per side before those")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument(
        "--trl-retain-freed-memory", action="store_true", help="give TRL's process dapo's malloc setting"
    )
    parser.add_argument(
        "--engine", choices=["native", "vllm"], default="native", help="dapo's rollout.engine"
    )
    parser.add_argument("--no-trl", action="store_true", help="time dapo's side only (no TRL needed)")
    parser.add_argument(
        "--bf16", action="store_true", help="dapo actor.precision=bf16-mixed, TRL bf16=True (else float32)"
    )
    parser.add_argument("--side", choices=["dapo", "trl"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("need --steps >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # transformers 5 renamed gradient checkpointing; TRL still asks under the old name
    warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)
    if args.side:
        side_main(args)
        return
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if args.engine == "vllm":
        import vllm

        versions += f", vllm {vllm.__version__}"
    if not args.no_trl:
        import trl

        versions += f", trl {trl.__version__}"
    print(f"{versions}, {torch.get_num_threads()} threads")
    print(kernels.machine_line())
    precision = "bf16 (dapo bf16-mixed, TRL bf16=True)" if args.bf16 else "float32"
    print(
        f"{PROMPTS} prompts x {G} responses, <= {NEW_TOKENS} new tokens, T=1, {precision} on CPU, dynamic "
        f"sampling off; median of {args.steps} steps after {args.warmup} warm-up; each side in its own "
        "process"
    )
    sizes = list(SIZES) if args.size == "all" else [args.size]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            bench(size, args, Path(tmp))


if __name__ == "__main__":
    main()
