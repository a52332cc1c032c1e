"""Time to accuracy: dapo's embedded default against TRL's ``GRPOTrainer``, each trained until held-out avg@8
reaches its start + 15 points (or a time cap), on the CPU.

    python bench/time_to_accuracy.py [--sides dapo,trl] [--gain 0.15] [--cap-s 480] [--eval-every 5]
                                     [--out runs/time_to_accuracy] [--force]

Both sides start from the same built tiny model and train on the built-in arithmetic task with the embedded
default's settings (`configs/tiny.yaml`): 32 prompts x G = 8 responses per generation batch, at most 64 new
tokens, temperature 1.0, two optimizer steps per batch (mini-batches of 128 responses), AdamW lr 1e-4 (betas
0.9/0.999, weight decay 0.1 on every parameter, grad clip 1.0) warmed up linearly over 5 batches, clip 0.2 /
0.28, no KL term, rewards from dapo's ``math_dapo`` verifier plus the soft overlong punishment (L_cache 16).

- dapo runs its trainer path (``Collector.collect`` with dynamic sampling -> ``stages.update_policy``) as
  ``dapo train`` does, with the native model and engine.
- TRL runs ``GRPOTrainer`` (``loss_type="dapo"``, ``epsilon_high=0.28``, ``beta=0``, transformers'
  ``generate``, ``use_cpu``, float32), set up by ``bench/rl_step.py``'s ``grpo_trainer`` with
  ``steps_per_generation=2``; it has no dynamic sampling and no dual clip (dapo's default has both).

The evaluator is the same for both: dapo's ``evaluate`` (the first 300 held-out problems, k = 8, temperature
1.0, the same sampling seed) on dapo's native engine; for TRL the current weights of its transformers model
are copied into a dapo model before each evaluation. Each side is evaluated before training and every
``--eval-every`` generation batches; it stops at the first evaluation at or above start + ``--gain``, or once
its training time passes ``--cap-s``. Seconds are training wall-clock only: evaluations are timed and
subtracted (they cost both sides the same). A side that hits the cap without reaching the target reports
its time as a lower bound (and the ratio as one). Each side runs in its own fresh process and writes
``OUT/<side>.json``; a side whose file exists is not run again (``--force`` reruns), so the two sides can
run in separate invocations (each under 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dapo.backends.policy import make_actor
from dapo.config import Config, load_config
from dapo.data.prompts import load_examples_for, tokenize_prompts
from dapo.evaluate import eval_sampling, evaluate, load_eval_set
from dapo.models.load import load_policy
from dapo.models.tiny import ensure_tiny_model
from dapo.rewards.pool import make_reward_pool
from dapo.rollout import make_engine
from dapo.stages import make_collector, update_policy

EVAL_KEY = "eval/arithmetic/avg@8"
STEPS_PER_GENERATION = 2  # the embedded default's 256 responses per step in mini-batches of 128


@dataclass
class Progress:
    """One side's record: evaluations (batch, training seconds, avg@8) and the outcome."""

    side: str
    target: float = 0.0
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    reached: bool = False
    seconds: float = 0.0  # training seconds at the stopping evaluation
    steps: int = 0
    eval_seconds: float = 0.0
    responses_per_step: float = 0.0


class HeldOut:
    """dapo's evaluator on a dapo model: held-out avg@8 of the weights it is given."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.model, self.tokenizer, _ = load_policy(cfg.model)
        self.prompts = load_eval_set(cfg, self.tokenizer)
        self.engine = make_engine(cfg.rollout, self.model, self.tokenizer)
        self.pool = make_reward_pool(cfg.reward)

    def __call__(self, weights: dict[str, torch.Tensor] | None = None) -> float:
        if weights is not None:
            own = self.model.state_dict()
            # tied embeddings: transformers also lists lm_head.weight, dapo's model shares embed_tokens'
            self.model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=True)
        metrics = evaluate(
            self.engine, self.prompts.prompt_ids, self.prompts.answers, self.prompts.data_sources,
            self.pool.score, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            eval_sampling(self.cfg, self.tokenizer),
        )  # fmt: skip
        return metrics[EVAL_KEY]


class Clock:
    """Training seconds: wall-clock since `start` minus the time spent in evaluations."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.in_eval = 0.0

    def training(self) -> float:
        return time.perf_counter() - self.t0 - self.in_eval

    def evaluate(self, fn: Any, *args: Any) -> float:
        t = time.perf_counter()
        value = float(fn(*args))
        self.in_eval += time.perf_counter() - t
        return value


def record(p: Progress, step: int, seconds: float, value: float, cap: float) -> bool:
    """Note an evaluation; True when the side should stop (target reached or time cap passed)."""
    p.evals.append((step, seconds, value))
    p.steps, p.seconds = step, seconds
    p.reached = value >= p.target
    print(
        f"{p.side}: step {step:4d}  {seconds:7.1f} s  avg@8 {value:.3f}  (target {p.target:.3f})", flush=True
    )
    return p.reached or seconds >= cap


def run_dapo(cfg: Config, args: argparse.Namespace) -> Progress:
    torch.manual_seed(cfg.trainer.seed)
    held_out = HeldOut(cfg)  # the policy itself: its engine shares the weights being trained
    model, tokenizer = held_out.model, held_out.tokenizer
    train_set = tokenize_prompts(
        load_examples_for(cfg.data.train_files, cfg.data, split="train", dedup=cfg.data.dedup),
        tokenizer,
        cfg.data.max_prompt_length,
    )
    actor = make_actor(cfg, model)
    collector = make_collector(cfg, held_out.engine, train_set, tokenizer, held_out.pool.score)
    p = Progress("dapo")
    clock = Clock()
    start = clock.evaluate(held_out)
    p.target = start + args.gain
    record(p, 0, 0.0, start, args.cap_s)
    responses = 0.0
    for step in range(1, 100_000):
        collected = collector.collect(step)
        responses += collected.metrics.get("rollout/responses", 0.0)
        if not collected.skipped:
            update_policy(cfg, actor, collected.groups, tokenizer)
        if step % args.eval_every == 0 or clock.training() >= args.cap_s:
            seconds = clock.training()
            if record(p, step, seconds, clock.evaluate(held_out), args.cap_s):
                break
    p.eval_seconds, p.responses_per_step = clock.in_eval, responses / p.steps
    held_out.pool.close()
    return p


def run_trl(cfg: Config, args: argparse.Namespace) -> Progress:
    import transformers
    from rl_step import grpo_trainer, trl_prompts
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    torch.manual_seed(cfg.trainer.seed)
    path = ensure_tiny_model()
    held_out = HeldOut(cfg)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    examples = load_examples_for(cfg.data.train_files, cfg.data, split="train", dedup=True)
    texts, answers = trl_prompts(cfg, tokenizer, examples)
    p = Progress("trl")
    state: dict[str, Any] = {}

    class EvalEvery(TrainerCallback):
        """Evaluate every `--eval-every` generation batches; stop at the target or the cap."""

        def on_train_begin(self, a: TrainingArguments, s: TrainerState, c: TrainerControl, **kw: Any) -> None:
            clock = state["clock"] = Clock()
            start = clock.evaluate(held_out, kw["model"].state_dict())
            p.target = start + args.gain
            record(p, 0, 0.0, start, args.cap_s)

        def on_step_end(self, a: TrainingArguments, s: TrainerState, c: TrainerControl, **kw: Any) -> None:
            clock: Clock = state["clock"]
            batches, done = divmod(s.global_step, STEPS_PER_GENERATION)
            if done or (batches % args.eval_every and clock.training() < args.cap_s):
                return
            value = clock.evaluate(held_out, kw["model"].state_dict())
            if record(p, batches, clock.training(), value, args.cap_s):
                c.should_training_stop = True

    trainer, pool, _ = grpo_trainer(
        cfg, path, texts, answers, args.out / "trl-trainer", max_steps=len(texts), shuffle=True,
        steps_per_generation=STEPS_PER_GENERATION, callbacks=[EvalEvery()],
    )  # fmt: skip
    trainer.train()
    pool.close()
    held_out.pool.close()
    p.eval_seconds = state["clock"].in_eval
    p.responses_per_step = float(cfg.trainer.prompts_per_step * cfg.rollout.n)
    return p


def side_main(args: argparse.Namespace) -> None:
    cfg = load_config("tiny", ["model.device=cpu"])
    p = run_dapo(cfg, args) if args.side == "dapo" else run_trl(cfg, args)
    (args.out / f"{args.side}.json").write_text(json.dumps(asdict(p), indent=1))


def summary(ours: Progress, theirs: Progress) -> str:
    def line(p: Progress) -> str:
        bound = "" if p.reached else " (cap: target NOT reached, a lower bound)"
        first, last = p.evals[0][2], p.evals[-1][2]
        per_step = f"{p.responses_per_step:.0f} responses/step"
        head = f"  {p.side:<5} {p.seconds:7.1f} s training, {p.steps} steps ({per_step})"
        return f"{head}, avg@8 {first:.3f} -> {last:.3f}{bound}"

    ratio = theirs.seconds / ours.seconds
    exact = ours.reached and theirs.reached
    qualifier = (
        "" if exact else (" (lower bound: TRL hit the cap)" if ours.reached else " (dapo hit the cap)")
    )
    return "\n".join([line(ours), line(theirs), f"  TRL / dapo time to +target: {ratio:.2f}x{qualifier}"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", default="dapo,trl", help="dapo, trl or dapo,trl")
    parser.add_argument("--gain", type=float, default=0.15, help="target: start avg@8 + this")
    parser.add_argument(
        "--cap-s", type=float, default=480.0, help="training seconds after which a side stops"
    )
    parser.add_argument(
        "--eval-every", type=int, default=5, help="evaluate every this many generation batches"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/time_to_accuracy"))
    parser.add_argument("--force", action="store_true", help="rerun sides whose results exist")
    parser.add_argument("--side", choices=["dapo", "trl"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*will be removed in v6", category=FutureWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.side:
        side_main(args)
        return
    sides = args.sides.split(",")
    if not set(sides) <= {"dapo", "trl"}:
        parser.error(f"--sides {args.sides!r}: allowed dapo, trl, dapo,trl")
    for side in sides:
        if (args.out / f"{side}.json").is_file() and not args.force:
            print(f"{side}: result exists ({args.out / f'{side}.json'}), not rerun")
            continue
        cmd = [sys.executable, __file__, "--side", side, "--gain", str(args.gain), "--cap-s", str(args.cap_s),
               "--eval-every", str(args.eval_every), "--out", str(args.out)]  # fmt: skip
        subprocess.run(cmd, check=True)
    results = {s: Progress(**json.loads((args.out / f"{s}.json").read_text())) for s in ("dapo", "trl")
               if (args.out / f"{s}.json").is_file()}  # fmt: skip
    if len(results) == 2:
        import transformers
        import trl

        print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
              f"{torch.get_num_threads()} threads; target: start + {args.gain:.2f} avg@8")  # fmt: skip
        print(summary(results["dapo"], results["trl"]))


if __name__ == "__main__":
    main()
