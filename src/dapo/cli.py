"""The `dapo` command line: `dapo train`, `dapo eval`, `dapo report`, `dapo config`.

Every subcommand takes `--config FILE_OR_PRESET` and trailing `key.path=value` overrides
(e.g. `actor.lr=2e-6`). A user error (a bad file, row, path or config value: `dapo.errors.UserError`) prints
one line `dapo: error: ...` and exits with status 2; `--debug` or `DAPO_DEBUG=1` shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from dapo import __version__
from dapo.config import DEFAULT_PRESET, Config, dump_config, load_config
from dapo.errors import UserError
from dapo.preempt import Stopped

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

EVAL_PRESET = "paper_eval"
"""The preset `dapo eval` loads for data files when no --config is given: the paper's evaluation protocol."""

DESCRIPTION = """\
dapo: reinforcement learning for language models with DAPO (arXiv 2503.14476).

  dapo train                      train the tiny built-in model on the arithmetic task (the embedded default)
  dapo train --config FILE k=v    train with a YAML config (or preset name) and key.path=value overrides
  dapo train --config FILE --dry-run
                                  print the resolved config and the per-step plan, load nothing, exit
  dapo eval --model DIR --data FILE
                                  avg@32 / pass@32 / maj@32 of a checkpoint on a dataset, with the
                                  paper's protocol (temperature 1.0, top-p 0.7, 20,480 response tokens)
  dapo eval --model BASE --adapter CKPT/adapter --data FILE
                                  the same for a LoRA run's adapter on its base model, unmerged
  dapo export [--merge] CKPT OUT  a checkpoint as a Hugging Face model (--merge: LoRA folded into its base)
  dapo report RUN_DIR [RUN_DIR ...] [--out DIR]
                                  figures, summary and health notes of runs (DIR/index.html)
  dapo config [--config FILE]     print the resolved config with each field's documentation
"""


def _add_debug_arg(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of errors (also: DAPO_DEBUG=1)",
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    _add_debug_arg(p, argparse.SUPPRESS)  # accepted after the subcommand too; SUPPRESS keeps the main value
    p.add_argument(
        "--config",
        default=None,
        help="YAML config file or built-in preset name (default: the embedded 'tiny' preset)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. actor.lr=2e-6"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dapo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_debug_arg(parser, False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export,report,config}")

    train = sub.add_parser(
        "train",
        help="train a policy with DAPO",
        description="Train a policy with DAPO. Without --config: the tiny model on the arithmetic task.",
    )
    _add_config_args(train)
    train.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the plan, then exit"
    )
    train.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest complete checkpoint of the run directory) or a checkpoint path. A data-parallel "
        "checkpoint is trusted input, like code: torch.distributed.checkpoint reads its sharded/.metadata "
        "with pickle. A single-process checkpoint is never unpickled",
    )

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (avg@k, pass@k, maj@k)",
        description="Evaluate a checkpoint directory on a dataset: avg@k, pass@k, maj@k per data source. "
        f"Without --config: the paper's protocol ('{EVAL_PRESET}' preset: k 32, temperature 1.0, top-p 0.7, "
        "20,480 response tokens, every row) for data files; the embedded default's ('tiny': k 8) for "
        "'arithmetic'.",
    )
    _add_config_args(ev)
    ev.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format) or 'tiny'")
    ev.add_argument("--data", nargs="+", required=True, help="parquet/jsonl files, or 'arithmetic'")
    ev.add_argument("--k", type=int, default=None, help="samples per prompt row (default: evaluation.k)")
    ev.add_argument(
        "--adapter",
        default=None,
        help="a LoRA adapter directory (PEFT format: a LoRA run's CKPT/adapter) applied to --model, unmerged",
    )

    ex = sub.add_parser(
        "export",
        help="a checkpoint as a Hugging Face model directory (--merge: a LoRA adapter folded into its base)",
        description="Write a checkpoint's weights as a Hugging Face model directory OUT. A full-weights "
        "checkpoint: its model/. A LoRA run's checkpoint (or an adapter directory): its adapter in PEFT's "
        "format, or with --merge the base model with the adapter folded into its weights (W + alpha/r BA), "
        "which transformers and `dapo eval --model OUT` load.",
    )
    _add_debug_arg(ex, argparse.SUPPRESS)
    ex.add_argument("--merge", action="store_true", help="fold a LoRA adapter into its base model")
    ex.add_argument(
        "--base", default=None, help="the base model (default: the adapter's base_model_name_or_path)"
    )
    ex.add_argument(
        "checkpoint", help="a checkpoint directory (RUN/checkpoints/step_NNNNNN) or adapter directory"
    )
    ex.add_argument("out", help="the directory to write (must not exist)")

    rep = sub.add_parser("report", help="figures, summary table and health notes of runs (HTML)")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    rep.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report for one run)")

    cfg = sub.add_parser("config", help="print the resolved config with field documentation")
    _add_config_args(cfg)
    return parser


def format_plan(cfg: Config) -> str:
    """What one step will do, derived from the config (no model is loaded)."""
    n_prompts = cfg.trainer.prompts_per_step
    g = cfg.rollout.n
    responses = n_prompts * g
    updates = -(-responses // cfg.actor.mini_batch_size) * cfg.actor.epochs
    micro = -(-cfg.actor.mini_batch_size // cfg.actor.micro_batch_size)
    max_tokens = responses * (cfg.data.max_prompt_length + cfg.rollout.max_response_length)
    lines = [
        "plan per step (one step = one policy-update round):",
        f"  prompts (groups) kept per step    N = {n_prompts}",
        f"  responses per prompt              G = {g}",
        f"  responses trained per step        N x G = {responses}",
        f"  gradient updates per step         {updates} (mini-batch {cfg.actor.mini_batch_size} responses, "
        f"{cfg.actor.epochs} epoch(s), {micro} micro-batches of {cfg.actor.micro_batch_size})",
        f"  token budget per step             <= {max_tokens:,} tokens "
        f"({responses} x ({cfg.data.max_prompt_length} prompt + {cfg.rollout.max_response_length} response))",
    ]
    if cfg.algorithm.dynamic_sampling:
        per_round = int(n_prompts * cfg.algorithm.max_oversample)
        lines.append(
            f"  dynamic sampling                  keep groups with 0 < correct < {g}; "
            f"<= {cfg.algorithm.max_rounds} rounds of <= {per_round} prompts ({per_round * g} responses) each"
        )
    else:
        lines.append("  dynamic sampling                  off (every sampled group is trained on)")
    lines += [
        f"  warm-up                           linear over {cfg.actor.warmup_steps} steps "
        f"to lr {cfg.actor.lr:g}, then constant",
        f"  total                             {cfg.trainer.total_steps} steps "
        f"(<= {cfg.trainer.total_steps * updates} gradient updates)",
    ]
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if not cfg.trainer.run_name:  # runs are named after their config: runs/tiny, runs/dapo_qwen2.5_32b, ...
        cfg.trainer.run_name = Path(args.config).stem if args.config else DEFAULT_PRESET
    if args.dry_run:
        from dapo.distributed import launched_world_size
        from dapo.plan import format_rank_plan

        print("# resolved config")
        print(dump_config(cfg))
        print(format_plan(cfg))
        world_size = cfg.trainer.world_size or launched_world_size() or 1
        print(format_rank_plan(cfg, world_size, cuda=cfg.model.device != "cpu"))
        if cfg.trainer.backend == "ray":
            from dapo.plan import format_ray_plan

            print(format_ray_plan(cfg, cuda=cfg.model.device != "cpu"))
        return 0
    from dapo.preflight import check_train
    from dapo.trainer import train

    check_train(cfg)
    train(cfg)
    return 0


def eval_config_name(config: str | None, data: Sequence[str]) -> str:
    """The config `dapo eval` loads: `--config` when given; else the embedded default ('tiny') when every
    `--data` entry is the built-in arithmetic task, and the paper's evaluation protocol (`EVAL_PRESET`) for
    data files (AIME 2024 avg@32 as the paper reports it)."""
    from dapo.data.prompts import BUILTIN_TASK

    if config is not None:
        return config
    return DEFAULT_PRESET if all(d == BUILTIN_TASK for d in data) else EVAL_PRESET


def _cmd_eval(args: argparse.Namespace) -> int:
    config = eval_config_name(args.config, list(args.data))
    cfg = load_config(config, list(args.overrides))
    from dapo.evaluate import evaluate_checkpoint
    from dapo.preflight import check_eval

    check_eval(cfg, args.model, list(args.data), args.adapter)

    evaluate_checkpoint(
        cfg, model_path=args.model, data_files=list(args.data), k=args.k, config_name=Path(config).stem,
        adapter=args.adapter,
    )  # fmt: skip
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dapo.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out), merge=args.merge, base=args.base)
    print(f"exported: {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dapo.report import ReportError, report

    try:
        written = report(args.run_dirs, args.out)
    except ReportError as e:
        print(f"dapo report: {e}", file=sys.stderr)
        return 2
    for note in written.notes:
        print(f"health: {note.run}, step {note.step}: {note.text}")
    print(f"report: {written.index} ({len(written.pngs)} figures, {len(written.notes)} health notes)")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    from dapo.config import config_to_dict, field_docs

    cfg = load_config(args.config, list(args.overrides))
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        docs = field_docs(type(value))
        print(f"{section.name}:")
        for name, v in config_to_dict(value).items():
            print(f"  {name}: {v!r}")
            if name in docs:
                print(f"      # {docs[name]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may also follow options (`dapo train --resume auto actor.lr=2e-6`): argparse leaves those
    unknown = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {
        "train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export, "report": _cmd_report,
        "config": _cmd_config,
    }  # fmt: skip
    debug = args.debug or os.environ.get("DAPO_DEBUG", "") not in ("", "0")
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _OneLineWarnings(warnings.showwarning)
        try:
            return handlers[args.command](args)
        except UserError as e:
            if debug:
                raise
            print(f"dapo: error: {one_line(str(e))}", file=sys.stderr)
            return EXIT_USER_ERROR
        except Stopped as e:  # SIGTERM / SIGINT during training: the checkpoint is written
            print(e, file=sys.stderr)
            return e.exit_status
        except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing to save
            if debug:
                raise
            print("dapo: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def one_line(text: str) -> str:
    """A message on one line (some libraries' messages, quoted in ours, span several)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class _OneLineWarnings:
    """A `warnings.showwarning` that prints dapo's own warnings (skipped rows, a corrupt checkpoint passed
    over) as one line each, and the others as `original` does."""

    def __init__(self, original: Callable[..., None]) -> None:
        self.original = original

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if filename.startswith(_PACKAGE_DIR):
            print(f"dapo: warning: {one_line(str(message))}", file=file or sys.stderr)
        else:
            self.original(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    raise SystemExit(main())
