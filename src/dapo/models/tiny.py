"""The tiny default model: a Qwen2 of about three million parameters, built locally on first use.

The embedded default run (``dapo train`` with no arguments) needs a policy that already follows the answer
format of the built-in arithmetic task but is far from perfect at it, so that DAPO has something to improve
within minutes on a laptop CPU. This module builds one, reproducibly, from a :class:`TinyRecipe`:

1. a byte-level BPE tokenizer (a few hundred tokens) trained on task text with Qwen2's own normaliser and
   pre-tokenizer, so ``AutoTokenizer`` loads it back identically; that pre-tokenizer makes every digit a token
   of its own, which keeps arithmetic learnable. A Qwen-style (ChatML) chat template; a templated prompt is
   about 70 tokens, a solution at most about 30;
2. a Qwen2 (dapo's native `CausalLM`) with tied embeddings, randomly initialised from the recipe's seed;
3. a short supervised warm-up (SFT) on templated prompt -> reference solution, loss on the response tokens
   only, AdamW with linear warm-up and cosine decay, on a deterministic stream of training-split problems,
   under bf16 autocast where this machine trains faster so (the ``precision`` choice of `kernels`, the one
   ``actor.precision=auto`` takes), else in float32.

The result is saved in Hugging Face format (``config.json``, ``model.safetensors``, tokenizer files) plus
``recipe.json``, in ``${DAPO_CACHE:-${XDG_CACHE_HOME:-~/.cache}/dapo}/tiny/<key>/`` where ``<key>`` hashes
the recipe and :data:`BUILD_VERSION`. The build goes into a temporary directory that is renamed into place
when complete, under a file lock (POSIX ``flock``), so concurrent processes build once and never see a
partial checkpoint.

Deviations from a real Qwen2 checkpoint: the chat template has no default system message (it would double
the prompt of a tiny model), and the vocabulary only covers task text well (other text falls back to bytes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dapo.cache import default_cache_dir
from dapo.data import countdown
from dapo.data.countdown import CountdownProblem
from dapo.data.prompts import builtin_task
from dapo.data.synthetic import FACTOR_RANGE, OPERAND_RANGE, ArithmeticProblem
from dapo.models import kernels
from dapo.models.config import ModelArgs
from dapo.models.hub import save_pretrained
from dapo.models.transformer import CausalLM

__all__ = [
    "BUILD_VERSION",
    "CHAT_TEMPLATE",
    "COUNTDOWN_RECIPE",
    "DEFAULT_RECIPE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "RECIPES",
    "TinyBuildReport",
    "TinyEvalReport",
    "TinyRecipe",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "ensure_tiny_model",
    "evaluate_tiny_model",
    "recipe_key",
]

logger = logging.getLogger(__name__)

BUILD_VERSION = 3
"""Bumped whenever the build code changes what a recipe produces, so stale caches are not reused."""

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, EOS_TOKEN)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen-style (ChatML) chat template, without Qwen's default system message."""

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer pattern: words, single digits, punctuation runs, newlines, spaces."""

_REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "recipe.json")


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the tiny model; its hash names the cache directory."""

    seed: int = 0
    """Seed for initialisation, SFT data order and the task."""
    task: str = "arithmetic"
    """The built-in task the tokenizer and the warm-up are made from: "arithmetic" or "countdown"."""
    levels: tuple[int, ...] = (1, 2, 3)
    """Task levels used for the tokenizer corpus and SFT."""
    wrong_fraction: float = 0.0
    """Share of warm-up traces that are wrong attempts (countdown only: `dapo.data.countdown.trace`); the
    others are a solution drawn uniformly from the problem's solutions."""
    vocab_size: int = 512
    """Upper bound on the BPE vocabulary (the trainer stops earlier when no pair repeats)."""
    tokenizer_corpus: int = 2000
    """Number of training problems whose prompt and solution the tokenizer is trained on."""
    hidden_size: int = 192
    """Model width."""
    intermediate_size: int = 1024
    """MLP width."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + response) the model is configured for."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    sft_steps: int = 1500
    """Most supervised warm-up steps (each on a fresh batch of training problems); the cosine schedule spans
    them, and the warm-up usually stops earlier at ``target_accuracy``."""
    batch_size: int = 32
    """Problems per SFT step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 30
    """Linear learning-rate warm-up steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay (on matrices only)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    target_accuracy: float = 0.4
    """Stop the warm-up once the validation problems' mean probability of their reference solution reaches
    this (0 disables). That probability is the chance that one sample at temperature 1.0 reproduces the
    reference, so it tracks sampled accuracy; stopping on it, rather than after a fixed step count, lands
    the model in the intended accuracy band however fast this machine's numerics make it learn."""
    val_problems: int = 128
    """Training-split problems (an own random stream) on which ``target_accuracy`` is checked."""
    val_every: int = 50
    """Steps between checks of ``target_accuracy``."""

    def __post_init__(self) -> None:
        """Validate sizes so a bad recipe fails before minutes of building."""
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}"
            )
        if (
            self.sft_steps < 0
            or min(self.batch_size, self.tokenizer_corpus, self.val_problems, self.val_every) < 1
        ):
            raise ValueError(
                "sft_steps must be >= 0; batch_size, tokenizer_corpus, val_problems, val_every >= 1"
            )
        if self.task not in TASK_RANGES:
            raise ValueError(f"task must be one of {', '.join(TASK_RANGES)}, got {self.task!r}")
        if not 0.0 <= self.wrong_fraction < 1.0 or (self.wrong_fraction and self.task != "countdown"):
            raise ValueError(
                f"wrong_fraction must be in [0, 1) and 0 unless task is countdown, got {self.wrong_fraction}"
            )
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy must be in [0, 1], got {self.target_accuracy}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must cover the 256 byte tokens and specials, got {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON-able values."""
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        return d


TASK_RANGES: dict[str, dict[str, Any]] = {
    "arithmetic": {"operand_range": list(OPERAND_RANGE), "factor_range": list(FACTOR_RANGE)},
    "countdown": {"number_range": list(countdown.NUMBER_RANGE), "max_value": countdown.MAX_VALUE},
}
"""Each task's number ranges: part of the cache key, so a change to the task rebuilds the model."""

Problem = ArithmeticProblem | CountdownProblem


COUNTDOWN_SFT_STEPS = 1500


def recipe_key(recipe: TinyRecipe) -> str:
    """Short stable hash of the recipe, :data:`BUILD_VERSION` and the task's number ranges."""
    fields = recipe.to_dict()
    if recipe.task == "arithmetic":  # the fields the arithmetic recipe always had: its caches stay valid
        del fields["task"], fields["wrong_fraction"]
    blob = json.dumps(
        {"build_version": BUILD_VERSION, "task": TASK_RANGES[recipe.task], **fields}, sort_keys=True
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class TinyBuildReport:
    """What a build did and how long it took."""

    key: str
    out_dir: Path
    seconds: float
    """Wall time of the whole build."""
    tokenizer_seconds: float
    sft_seconds: float
    final_loss: float
    """Mean SFT loss (per response token) over the last 10% of steps."""
    steps: int
    """SFT steps run (fewer than the recipe's ``sft_steps`` when ``target_accuracy`` was reached)."""
    precision: str
    """The warm-up's compute: ``bf16-mixed`` (bf16 autocast over float32 weights) where this machine's
    ``precision`` kernel choice says it trains faster, else ``float32`` (`kernels.mixed_precision_wins`)."""
    val_accuracy: float
    """Mean probability of the reference solutions of the validation problems when the warm-up ended."""
    num_parameters: int
    vocab_size: int
    mean_prompt_tokens: float
    """Mean chat-templated prompt length, in tokens, over 200 training problems."""
    max_response_tokens: int
    """Longest reference solution of those problems, in tokens, including the end-of-sequence token."""


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_corpus(problems: Sequence[Problem]) -> Iterator[str]:
    """Texts the BPE is trained on: each prompt and solution after its chat role line, as rendered."""
    for p in problems:
        yield f"user\n{p.prompt}"
        yield f"assistant\n{p.solution}"


def build_tiny_tokenizer(recipe: TinyRecipe) -> Any:
    """Train the byte-level BPE of ``recipe`` and wrap it as a ``transformers`` Qwen2 tokenizer.

    The BPE is trained with exactly the normaliser and pre-tokenizer that ``transformers`` gives a ``qwen2``
    checkpoint (``AutoTokenizer`` rebuilds that pipeline around the saved vocabulary and merges, whatever
    ``tokenizer.json`` says), so the saved tokenizer loads back identical. That pipeline splits every digit
    into its own piece, which makes arithmetic learnable, and is byte-level, so decode(encode(x)) == x for
    NFC-normal text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken
    from transformers.models.qwen2 import Qwen2Tokenizer

    task = builtin_task(recipe.task, recipe.seed, recipe.levels)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(task.train_problems(recipe.tokenizer_corpus)), trainer)
    trained = json.loads(tok.to_str())["model"]
    merges: Any = [tuple(m) for m in trained["merges"]]
    hf = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=recipe.max_position_embeddings,
    )
    hf.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without any added special tokens (special-token strings in it are recognised)."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _prompt_ids(tokenizer: Any, problem: Problem) -> list[int]:
    """Chat-templated prompt ids, ending with the assistant generation prompt."""
    text: str = tokenizer.apply_chat_template(problem.messages(), add_generation_prompt=True, tokenize=False)
    return _encode(tokenizer, text)


# ----------------------------------------------------------------------------------------------------------
# Model and supervised warm-up


def _make_model(recipe: TinyRecipe, tokenizer: Any) -> CausalLM:
    """A randomly initialised native Qwen2 (tied embeddings) sized by ``recipe`` (seeded by the caller)."""
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    args = ModelArgs(
        architecture="Qwen2ForCausalLM",
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        rms_norm_eps=1e-6,
        rope_theta=recipe.rope_theta,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        qkv_bias=True,
        bos_token_id=pad_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=pad_id,
    )
    return CausalLM(args)


def _lr_factor(step: int, recipe: TinyRecipe) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    span = max(1, recipe.sft_steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class _SFTBatch:
    """One SFT batch: the prompt prefix every row shares, then each row's own tokens, right-padded."""

    prefix: torch.Tensor  # [P] shared leading prompt tokens (the fixed part of the template), P >= 1
    rest: torch.Tensor  # [B, T] the remaining prompt tokens, then response + eos, then padding
    labels: torch.Tensor  # [B, T] token ids on response positions, -100 on prompt and padding
    lengths: torch.Tensor  # [B] real tokens of each row of ``rest``


def _sft_batch(tokenizer: Any, problems: Sequence[Problem], eos_id: int, pad_id: int) -> _SFTBatch:
    """Tokenize prompt → solution + eos for each problem and split off the prompts' common prefix."""
    prompts = [_prompt_ids(tokenizer, p) for p in problems]
    responses = [[*_encode(tokenizer, p.solution), eos_id] for p in problems]
    # The longest common prefix of the prompts, less one token so every row keeps a prompt token of its own.
    shared = min(len(q) for q in prompts) - 1
    for q in prompts[1:]:
        shared = next((i for i in range(shared) if q[i] != prompts[0][i]), shared)
    if shared < 1:
        raise ValueError("SFT prompts share no leading token; the chat template should start each of them")
    rows = [q[shared:] + r for q, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in rows)
    rest = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # [B, T]
    for i, (q, r) in enumerate(zip(prompts, responses, strict=True)):
        n_prompt = len(q) - shared
        rest[i, : n_prompt + len(r)] = torch.tensor(q[shared:] + r)
        labels[i, n_prompt : n_prompt + len(r)] = torch.tensor(r)
    return _SFTBatch(
        prefix=torch.tensor(prompts[0][:shared], dtype=torch.long),
        rest=rest,
        labels=labels,
        lengths=torch.tensor([len(r) for r in rows]),
    )


def _batch_logits(model: CausalLM, batch: _SFTBatch) -> torch.Tensor:
    """Logits ``[B, T, V]`` predicting each token of ``batch.rest`` (position j predicts ``rest[:, j]``).

    The shared prompt prefix is computed once for the whole batch (`CausalLM.forward_responses`, with the
    prefix as the one prompt every row continues; gradients flow through it), and the linear layers skip
    the rows' right padding: the template is most of a prompt, so this is much cheaper than full rows.
    """
    prefix, B = batch.prefix[None], batch.rest.shape[0]
    index = torch.zeros(B, dtype=torch.long)  # every row continues the one shared prefix
    return model.forward_responses(prefix, torch.ones_like(prefix), index, batch.rest, batch.lengths)


def _sft_loss(model: CausalLM, batch: _SFTBatch) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of ``batch``."""
    logits = _batch_logits(model, batch)  # [B, T, V]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch.labels.reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def _reference_probability(model: CausalLM, batch: _SFTBatch) -> float:
    """Mean over rows of P(reference response | prompt): the chance a temperature-1 sample reproduces it."""
    was_training = model.training
    model.eval()
    logits = _batch_logits(model, batch)  # [B, T, V]
    model.train(was_training)
    labels = batch.labels  # [B, T]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    # -100 marks prompt and padding; clamp it to a valid index, the mask then zeroes those positions.
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    seq_logprob = (picked * (labels != -100)).sum(-1)  # [B]
    return float(seq_logprob.exp().mean())


def _warmup_stream(recipe: TinyRecipe) -> Iterator[Problem]:
    """The warm-up's endless stream of training problems with the solution to learn: the task's reference
    solution (arithmetic), or a trace drawn from the problem's solutions and, at ``wrong_fraction``, wrong
    attempts (countdown), so the warmed model starts with several paths to choose between."""
    problems = builtin_task(recipe.task, recipe.seed + 1, recipe.levels).iter_train()
    if recipe.task != "countdown":
        yield from problems
        return
    rng = random.Random(f"dapo-tiny-traces-{recipe.seed}")
    for p in problems:
        yield dataclasses.replace(p, solution=countdown.trace(p, rng, recipe.wrong_fraction))


def _make_optimizer(model: Any, recipe: TinyRecipe) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )


@dataclass(frozen=True)
class _SFTResult:
    losses: list[float]
    """Training loss of every step run."""
    val_accuracy: float
    """Validation reference probability at the end."""


def _sft(model: CausalLM, tokenizer: Any, recipe: TinyRecipe, progress: bool, *, mixed: bool) -> _SFTResult:
    """Supervised warm-up on a deterministic stream of training problems, stopped at ``target_accuracy``.
    With ``mixed``, the training forward runs under bf16 autocast (float32 weights and optimizer); the
    validation that decides the stop is float32."""
    from tqdm import tqdm

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    optimizer = _make_optimizer(model, recipe)
    # Separate task seeds: the tokenizer corpus uses seed, the SFT stream seed + 1, validation seed + 2.
    stream = _warmup_stream(recipe)
    val_problems = builtin_task(recipe.task, recipe.seed + 2, recipe.levels).train_problems(
        recipe.val_problems
    )
    val_batch = _sft_batch(tokenizer, val_problems, eos_id, pad_id)
    model.train()
    losses: list[float] = []
    val_accuracy = _reference_probability(model, val_batch)
    # a bar only on a terminal: in a log file it would be one long line of carriage returns
    shown = progress and sys.stderr.isatty()
    bar = tqdm(range(recipe.sft_steps), desc="dapo tiny model: SFT", disable=not shown, file=sys.stderr)
    for step in bar:
        batch = _sft_batch(tokenizer, [next(stream) for _ in range(recipe.batch_size)], eos_id, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, recipe)
        with torch.autocast("cpu", torch.bfloat16, enabled=mixed):
            loss = _sft_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % recipe.val_every == 0 or step + 1 == recipe.sft_steps:
            val_accuracy = _reference_probability(model, val_batch)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val_acc=f"{val_accuracy:.2f}")
            if recipe.target_accuracy > 0 and val_accuracy >= recipe.target_accuracy:
                break
    bar.close()
    model.eval()
    return _SFTResult(losses=losses, val_accuracy=val_accuracy)


def build_tiny_model(recipe: TinyRecipe, out_dir: Path, *, progress: bool = False) -> TinyBuildReport:
    """Build the tokenizer and the SFT-warmed model of ``recipe`` and save them in HF format into ``out_dir``.

    Deterministic: the same recipe gives bitwise-identical weights (on the same torch build, hardware and
    thread count). The caller's torch random state is left untouched.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(recipe)
    tokenizer_seconds = time.perf_counter() - start

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = _make_model(recipe, tokenizer)
        sft_start = time.perf_counter()
        mixed = kernels.mixed_precision_wins(recipe.hidden_size, recipe.intermediate_size)
        result = _sft(model, tokenizer, recipe, progress, mixed=mixed)
    losses = result.losses
    sft_seconds = time.perf_counter() - sft_start

    save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    probe = builtin_task(recipe.task, recipe.seed, recipe.levels).train_problems(
        min(200, recipe.tokenizer_corpus)
    )
    tail = losses[-max(1, len(losses) // 10) :]
    report = TinyBuildReport(
        key=recipe_key(recipe),
        out_dir=out_dir,
        seconds=time.perf_counter() - start,
        tokenizer_seconds=tokenizer_seconds,
        sft_seconds=sft_seconds,
        # With zero SFT steps there is no loss to report.
        final_loss=sum(tail) / len(tail) if losses else float("nan"),
        steps=len(losses),
        precision="bf16-mixed" if mixed else "float32",
        val_accuracy=result.val_accuracy,
        num_parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=len(tokenizer),
        mean_prompt_tokens=sum(len(_prompt_ids(tokenizer, p)) for p in probe) / len(probe),
        max_response_tokens=max(len(_encode(tokenizer, p.solution)) + 1 for p in probe),
    )
    meta = {
        "key": report.key,
        "build_version": BUILD_VERSION,
        "recipe": recipe.to_dict(),
        "report": {k: v for k, v in dataclasses.asdict(report).items() if k != "out_dir"},
    }
    (out_dir / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
    return report


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (POSIX ``flock``), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(path: Path) -> bool:
    """True when ``path`` holds every file a finished build writes."""
    return all((path / name).is_file() for name in _REQUIRED_FILES)


DEFAULT_RECIPE = TinyRecipe()
"""What ``model.path=tiny`` builds."""

COUNTDOWN_RECIPE = TinyRecipe(
    task="countdown", wrong_fraction=0.2, sft_steps=COUNTDOWN_SFT_STEPS, target_accuracy=0.0
)
"""What ``model.path=tiny-countdown`` builds: the tiny model warmed up on diverse Countdown traces, a fifth
of them wrong, for a fixed number of steps (the stop rule's reference probability means little when a
problem has many solutions)."""

RECIPES: dict[str, TinyRecipe] = {"tiny": DEFAULT_RECIPE, "tiny-countdown": COUNTDOWN_RECIPE}
"""The built-in models by ``model.path`` name (`dapo.models.load.TINY_MODELS`)."""


def ensure_tiny_model(
    recipe: TinyRecipe | None = None,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    isolated: bool = False,
) -> Path:
    """The checkpoint directory of ``recipe`` (default :data:`DEFAULT_RECIPE`), building it first if missing.

    The cache root is ``cache_dir`` or :func:`default_cache_dir`; the model lives in ``<root>/tiny/<key>``.
    ``isolated`` builds in a fresh interpreter, so that this process ends up in the same state whether the
    model was built now or found in the cache (a run's results must not depend on that): building here
    leaves the allocator, oneDNN's primitive caches and the thread pools as the warm-up left them.
    """
    recipe = recipe or DEFAULT_RECIPE
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = recipe_key(recipe)
    final = root / "tiny" / key
    # Fast path without the lock: a complete directory only ever appears by an atomic rename.
    if _is_complete(final):
        return final
    with _file_lock(root / "tiny" / f"{key}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if _is_complete(final):
            return final
        # A directory without every file was not made by us (renames are atomic): move it out of the way.
        if final.exists():
            logger.warning("tiny model cache %s is incomplete; rebuilding it", final)
            shutil.rmtree(final)
        if progress:
            print(
                f"dapo: building the tiny default model (first use, a few minutes) into {final}",
                file=sys.stderr,
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        # mkdtemp makes the directory private (0700); the finished cache entry is an ordinary readable one.
        tmp.chmod(0o755)
        try:
            build = _build_in_a_fresh_process if isolated else build_tiny_model
            report = build(recipe, tmp, progress=progress)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            print(
                f"dapo: tiny model built in {report.seconds:.0f} s "
                f"({report.num_parameters / 1e6:.2f} M parameters, {report.steps} warm-up steps in "
                f"{report.precision}, final SFT loss {report.final_loss:.3f})",
                file=sys.stderr,
            )
    return final


def _build_in_a_fresh_process(recipe: TinyRecipe, out_dir: Path, *, progress: bool) -> TinyBuildReport:
    """:func:`build_tiny_model` in a new ("spawn") interpreter; its output goes to this one's terminal."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(build_tiny_model, recipe, out_dir, progress=progress).result()


# ----------------------------------------------------------------------------------------------------------
# Evaluation (used to calibrate the recipe and by the slow test)


@dataclass(frozen=True)
class TinyEvalReport:
    """Held-out accuracy of a model on arithmetic problems."""

    accuracy: float
    """Mean correctness over all problems and samples."""
    per_level: dict[int, float]
    """Mean correctness per task level."""
    samples: int
    """Number of responses scored."""
    mean_response_tokens: float


@torch.no_grad()
def evaluate_tiny_model(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    samples_per_problem: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> TinyEvalReport:
    """Sample responses with HF ``generate`` (``temperature == 0`` means greedy), score them with the task's
    verifier (math_dapo for arithmetic, countdown for Countdown).

    Prompts of equal token length are batched together, so no padding is needed.
    """
    import transformers

    from dapo.rewards import countdown as countdown_reward
    from dapo.rewards import math_dapo

    def verify(problem: Problem) -> Any:
        return (
            countdown_reward.compute_score
            if isinstance(problem, CountdownProblem)
            else math_dapo.compute_score
        )

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    greedy = temperature == 0.0
    n = 1 if greedy else samples_per_problem
    # Called through Any: the class's __init__ is untyped.
    config_cls: Any = transformers.GenerationConfig
    gen = config_cls(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None if greedy else 0,
        top_p=None if greedy else 1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    model.eval()
    by_len: dict[int, list[tuple[Problem, list[int]]]] = {}
    for p in problems:
        ids = _prompt_ids(tokenizer, p)
        by_len.setdefault(len(ids), []).append((p, ids))
    hits: dict[int, list[float]] = {}
    lengths: list[int] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length in sorted(by_len):
            group = by_len[length]
            input_ids = torch.tensor([ids for _, ids in group for _ in range(n)])  # [P * n, L]
            out = model.generate(input_ids=input_ids, generation_config=gen)  # [P * n, L + new]
            for row, seq in enumerate(out[:, length:].tolist()):
                problem = group[row // n][0]
                # Cut at the first end-of-sequence token (generate pads finished rows after it).
                if eos_id in seq:
                    seq = seq[: seq.index(eos_id)]
                lengths.append(len(seq))
                text = tokenizer.decode(seq, skip_special_tokens=True)
                hits.setdefault(problem.level, []).append(float(verify(problem)(text, problem.answer).acc))
    all_hits = [h for v in hits.values() for h in v]
    return TinyEvalReport(
        accuracy=sum(all_hits) / len(all_hits),
        per_level={lv: sum(v) / len(v) for lv, v in sorted(hits.items())},
        samples=len(all_hits),
        mean_response_tokens=sum(lengths) / len(lengths),
    )
