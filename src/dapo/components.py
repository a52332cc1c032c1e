"""Builders shared by `dapo train` and `dapo eval`: device, policy + tokenizer, engine, prompt sets, scorer.

Each turns one config section into a ready object, so the trainer loop and the evaluator stay short.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapo.config import Config, DataConfig, ModelConfig, Precision, RewardConfig, RolloutConfig
from dapo.data import Example, ReaderSettings, load_many
from dapo.errors import UserError
from dapo.rewards import RewardPool
from dapo.rollout.base import RolloutEngine

BUILTIN_TASK = "arithmetic"
ARITHMETIC_TRAIN_PROBLEMS = 50_000  # distinct training problems drawn from the task's endless stream
ARITHMETIC_HELDOUT_PROBLEMS = 300


def resolve_device(name: str) -> torch.device:
    """ "auto" → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_path(path: str, *, progress: bool = True) -> Path:
    """A checkpoint directory; "tiny" builds (once, then cached) the built-in tiny model."""
    if path == "tiny":
        from dapo.models.tiny import ensure_tiny_model

        return ensure_tiny_model(progress=progress, isolated=True)  # a run must not depend on the build
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "no such directory" if not p.exists() else "no config.json there"
        raise UserError(
            f"model path {path!r}: {what}; allowed: a Hugging Face checkpoint directory "
            "(config.json, *.safetensors, tokenizer files) or 'tiny'"
        )
    return p


def load_policy(
    cfg: ModelConfig, *, path: str | None = None, device: torch.device | None = None
) -> tuple[nn.Module, Any, Path]:
    """The policy model (on its device, in its dtype), its tokenizer, and the checkpoint directory.
    ``device`` overrides `model.device` (a data-parallel rank's own GPU)."""
    from dapo.models import load_pretrained, load_tokenizer

    model_dir = resolve_model_path(path or cfg.path)
    device = device or resolve_device(cfg.device)
    if device.type == "cpu":
        retain_freed_memory()
    model = load_pretrained(model_dir, dtype=cfg.dtype, device=device, implementation=cfg.implementation)
    tokenizer = load_tokenizer(model_dir)
    return model, tokenizer, model_dir


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (Linux only).

    PyTorch's CPU tensors come straight from malloc, and glibc serves large blocks with fresh ``mmap``s and
    trims the heap after frees, so every micro-batch's activations land on new pages that the kernel must
    zero-fill on first touch: measured ~15% of a CPU policy update (10-60k page faults per step on the tiny
    model). Afterwards the process's memory stays at its peak instead of shrinking between steps. Returns
    whether the settings took effect (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: leave the allocator as it is
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(mallopt(opt, value) == 1 for opt, value in (
        (m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)
    ))  # fmt: skip


def pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The end-of-turn / end-of-sequence ids that end a response."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return tuple(sorted(i for i in ids if i is not None))


def resolve_precision(cfg: Config, saved_kernels: dict[str, str] | None = None) -> Precision:
    """`actor.precision` with ``auto`` decided: ``bf16-mixed`` where it can run (a float32 model on CPU, the
    native engine) and this machine's timing of the model's MLP says it is faster (`dapo.models.kernels`,
    the ``precision`` choice, cached per machine), else ``model``. ``saved_kernels``: a checkpoint's kernel
    choices, adopted first, so a resumed run keeps the precision it started with. Off CPU: ``model``."""
    if cfg.actor.precision != "auto":
        return cfg.actor.precision
    from dapo.models import kernels
    from dapo.plan import model_shape

    args, _ = model_shape(cfg.model.path)
    mixable = cfg.model.dtype == "float32" and cfg.rollout.engine == "native"
    if args is None or not mixable or resolve_device(cfg.model.device).type != "cpu":
        return "model"
    kernels.adopt(saved_kernels or {})
    h, i = args.hidden_size, args.intermediate_size
    timer = functools.partial(_time_precision, rows=1024, hidden=h, intermediate=i)
    chosen = kernels.decide("precision", torch.float32, (1024, h, i), timer)
    return "bf16-mixed" if chosen == "bf16-mixed" else "model"


def _time_precision(candidate: str, *, rows: int, hidden: int, intermediate: int) -> Any:
    from dapo.models import kernels

    return kernels.time_mlp(rows, hidden, intermediate, mixed=candidate == "bf16-mixed")


def make_engine(
    cfg: RolloutConfig, model: nn.Module, tokenizer: Any, *, precision: str = "model"
) -> RolloutEngine:
    """The rollout engine named by `rollout.engine`, sharing the policy's weights where it can;
    ``precision`` is `actor.precision` (``bf16-mixed``: the native engine samples in bf16)."""
    if cfg.engine == "native":
        from dapo.rollout.native import NativeEngine

        return NativeEngine(
            model,  # type: ignore[arg-type]
            pad_token_id=pad_token_id(tokenizer),
            max_batch_size=cfg.max_batch_size or None,
            dtype=torch.bfloat16 if precision == "bf16-mixed" else None,
        )
    if cfg.engine == "hf":
        from dapo.rollout.hf import HFEngine

        return HFEngine(model, pad_token_id=pad_token_id(tokenizer))
    if cfg.engine == "vllm":
        from dapo.rollout.vllm import VLLMEngine

        v = cfg.vllm
        return VLLMEngine(
            model,
            kv_cache_gib=v.kv_cache_gib,
            enforce_eager=v.enforce_eager,
            tensor_parallel_size=v.tensor_parallel_size,
            max_model_len=v.max_model_len,
            sleep_mode=v.sleep_mode,
        )
    raise ValueError(f"rollout.engine {cfg.engine!r}: allowed 'native', 'hf', 'vllm'")


@dataclass
class PromptSet:
    """Examples with their chat-templated prompt token ids."""

    examples: list[Example]
    prompt_ids: list[list[int]]
    num_too_long: int = 0

    @property
    def answers(self) -> list[str]:
        return [e.answer for e in self.examples]

    @property
    def data_sources(self) -> list[str]:
        return [e.data_source for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)


def load_examples_for(files: Sequence[str], data: DataConfig, *, split: str, dedup: bool) -> list[Example]:
    """Examples from files, where "arithmetic" is the built-in task (its train or held-out split)."""
    examples: list[Example] = []
    paths = [f for f in files if f != BUILTIN_TASK]
    if BUILTIN_TASK in files:
        from dapo.data.synthetic import ArithmeticTask

        task = ArithmeticTask(seed=0)
        if split == "train":
            problems = task.train_problems(ARITHMETIC_TRAIN_PROBLEMS)
        else:
            problems = task.heldout_problems(ARITHMETIC_HELDOUT_PROBLEMS)
        examples += ArithmeticTask.to_examples(problems, split)
    if paths:
        examples += load_many(paths, reader_settings(data, dedup=dedup)).examples
    if dedup:
        seen: set[str] = set()
        unique = []
        for e in examples:
            if e.uid not in seen:
                seen.add(e.uid)
                unique.append(e)
        examples = unique
    return examples


def reader_settings(data: DataConfig, *, dedup: bool) -> ReaderSettings:
    """The dataset reader's settings from the `data` section."""
    return ReaderSettings(
        prompt_key=data.prompt_key,
        answer_key=data.answer_key,
        data_source_key=data.data_source_key,
        apply_template=data.apply_template,
        dedup=dedup,
        strict=data.strict,
    )


def tokenize_prompts(examples: list[Example], tokenizer: Any, max_prompt_length: int) -> PromptSet:
    """Apply the tokenizer's chat template; prompts longer than `max_prompt_length` tokens are skipped,
    counted."""
    from dapo.models import apply_chat_template

    kept: list[Example] = []
    ids: list[list[int]] = []
    too_long = 0
    for e in examples:
        tokens = apply_chat_template(tokenizer, e.chat_messages())
        if len(tokens) > max_prompt_length:
            too_long += 1
            continue
        kept.append(e)
        ids.append(tokens)
    return PromptSet(examples=kept, prompt_ids=ids, num_too_long=too_long)


def make_reward_pool(cfg: RewardConfig) -> RewardPool:
    return RewardPool(cfg.function, num_workers=cfg.num_workers, timeout_s=cfg.timeout_s)
