"""One typed config tree for a dapo run.

Every field has a docstring (the string literal under it) and a default. Defaults are the paper's DAPO
settings (arXiv 2503.14476, §4.1) where the paper gives one; the embedded default run (`dapo train` with no
arguments) is the `tiny` preset in `dapo/configs/`.

Loading: `load_config(path_or_preset, overrides)` reads YAML, applies `a.b=c` overrides, and validates. Errors
name the key, the bad value and what is allowed; unknown keys get a "did you mean" hint. Plain dataclasses
keep the tree readable and typed; the loader below is the only place that knows how YAML maps onto them.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from dapo.errors import UserError

Precision = Literal["model", "bf16-mixed", "auto"]
"""`actor.precision`'s values."""

PRESETS_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "tiny"


class ConfigError(UserError, ValueError):
    """A config value, key or file is wrong; the message names it and what is allowed."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """Hugging Face checkpoint directory (config.json + safetensors + tokenizer); a Hugging Face Hub id
    (``Qwen/Qwen2.5-7B``: taken from the local Hub cache, else downloaded into it; HF_HUB_OFFLINE=1 uses the
    cache only); or "tiny" for the built-in tiny model (built locally on first use and cached; never
    downloaded), "tiny-countdown" for the same model warmed up on the Countdown task."""
    implementation: Literal["native", "hf"] = "native"
    """"native": dapo's compact Llama/Qwen2/Qwen3 implementation; "hf": transformers' model (any architecture
    it knows)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter and compute dtype of the policy."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""

    def validate(self) -> None:
        _check(self.path != "", "model.path", self.path, "a checkpoint directory or 'tiny'")
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        _check(ok, "model.device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["dapo-math-17k.parquet"])
    """Training data: parquet/jsonl files in the reference schema (or plain problem/answer columns),
    "arithmetic" for the built-in synthetic arithmetic task, or "countdown" for the built-in Countdown task
    (with reward.function=countdown)."""
    prompt_key: str = "prompt"
    """Column with the prompt: a list of chat messages (reference schema) or a bare problem string."""
    answer_key: str = "reward_model.ground_truth"
    """Column with the ground-truth answer (dotted path into nested columns)."""
    data_source_key: str = "data_source"
    """Column naming each row's data source (metrics are reported per source); the file name when absent."""
    apply_template: Literal["auto", "always", "never"] = "auto"
    """Wrap prompts in the DAPO template: "auto" = only bare problems (prompts not already templated)."""
    dedup: bool = True
    """Drop repeated identical prompts (the published DAPO-Math-17k repeats each ~100 times by accident)."""
    strict: bool = False
    """Stop at the first malformed row (naming file and row) instead of skipping and counting it."""
    max_prompt_length: int = 2048
    """Prompts longer than this many tokens (after the chat template) are skipped and counted."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by trainer.seed)."""

    def validate(self) -> None:
        _check(len(self.train_files) > 0, "data.train_files", self.train_files, "at least one file")
        _check(
            self.max_prompt_length > 0, "data.max_prompt_length", self.max_prompt_length, "a positive integer"
        )


@dataclass
class VLLMConfig:
    """The vLLM engine (`rollout.engine=vllm`): `make setup-vllm` on CPU, the `vllm` extra on CUDA."""

    kv_cache_gib: float = 1.0
    """KV-cache budget in GiB (host memory on CPU, device memory on CUDA)."""
    enforce_eager: bool = True
    """Run the model eagerly; false lets vLLM compile it and capture CUDA graphs (faster decoding after a
    slower start)."""
    tensor_parallel_size: int = 1
    """GPUs each engine shards the model over (1 on CPU)."""
    max_model_len: int = 0
    """Longest prompt + response the engine accepts (0 = the model's max_position_embeddings)."""
    sleep_mode: bool = False
    """CUDA only: sleep after each generation (KV cache freed, weights offloaded) so that a colocated policy
    update has the memory."""

    def validate(self) -> None:
        _check(self.kv_cache_gib > 0, "rollout.vllm.kv_cache_gib", self.kv_cache_gib, "a number > 0 (GiB)")
        _check(
            self.tensor_parallel_size >= 1,
            "rollout.vllm.tensor_parallel_size",
            self.tensor_parallel_size,
            "an integer >= 1",
        )
        _check(self.max_model_len >= 0, "rollout.vllm.max_model_len", self.max_model_len, "0 (auto) or >= 1")


@dataclass
class RolloutConfig:
    engine: Literal["native", "hf", "vllm"] = "native"
    """Generation engine: "native" (dapo's batched KV-cache sampler, CPU/CUDA), "hf" (transformers generate),
    "vllm" (vLLM: `make setup-vllm` on CPU, the `vllm` extra on CUDA; settings in rollout.vllm)."""
    n: int = 16
    """G: responses sampled per prompt (a group)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (paper: 1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    max_response_length: int = 20480
    """L_max: generated tokens per response (paper: 16,384 expected + 4,096 overlong buffer)."""
    max_batch_size: int = 0
    """Most sequences decoded at once (0 = all prompts of a round at once)."""
    kv_cache_gib: float = 0.0
    """The native engine's KV-cache budget in GiB (0 = none): a round is decoded in chunks of at most as
    many sequences as fit it at full length (prompt + max_response_length), so thousands of long responses
    never hold all their caches at once; samples are the same for any budget. vLLM's is rollout.vllm's."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine's settings (used when engine=vllm)."""
    num_workers: int = 1
    """trainer.backend=ray: `RolloutWorker` actors, each with full weights and its own engine; a round's
    prompts are sharded across them by prompt index."""
    colocate: bool = False
    """trainer.backend=ray: place rollout worker i on trainer rank i % world_size's resources (GPU) instead
    of resources of its own (disaggregated)."""
    handoff: bool = False
    """Colocated hand-off: the engine gives the device back while the policy updates. The native engine's
    full-weight copy (torchrun ranks) is freed at the start of each update and gathered again after it
    (its KV cache lives only during a generation call); vLLM sleeps (rollout.vllm.sleep_mode, CUDA).
    Pair with actor.offload=optimizer, which keeps the AdamW states in host memory while the engine
    generates. Samples and updates are unchanged."""
    weight_sync_bucket_mb: int = 512
    """The weight sync moves the full weights in buckets of about this many MiB: the updated shards are
    gathered, a bucket at a time, and each bucket is broadcast to the rollout workers (trainer.backend=ray)
    as soon as it is complete, so no device ever holds a second copy of the model; a larger tensor goes
    alone. Fewer, larger buckets mean fewer collective calls."""

    def validate(self) -> None:
        _check(self.n >= 1, "rollout.n", self.n, "an integer >= 1")
        _check(self.temperature >= 0, "rollout.temperature", self.temperature, "a number >= 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a number in (0, 1]")
        _check(
            self.top_k == -1 or self.top_k >= 1, "rollout.top_k", self.top_k, "-1 (off) or an integer >= 1"
        )
        _check(self.max_response_length >= 1, "rollout.max_response_length", self.max_response_length, ">= 1")
        _check(self.max_batch_size >= 0, "rollout.max_batch_size", self.max_batch_size, ">= 0")
        _check(self.kv_cache_gib >= 0, "rollout.kv_cache_gib", self.kv_cache_gib, ">= 0 (0 = no budget)")
        _check(self.num_workers >= 1, "rollout.num_workers", self.num_workers, "an integer >= 1")
        _check(
            self.weight_sync_bucket_mb >= 1,
            "rollout.weight_sync_bucket_mb",
            self.weight_sync_bucket_mb,
            "an integer >= 1 (MiB)",
        )
        self.vllm.validate()


@dataclass
class RewardConfig:
    function: str = "math_dapo"
    """Verifier: "math_dapo" (the reference, bit-compatible), "math_verify" (symbolic), "countdown" (the
    built-in Countdown task's, every line checked), or
    "package.module:function". The latter imports and runs that module's code, as this user, in every
    process that scores or checks the config (the CLI's preflight, each scoring process, each rank or Ray
    worker): name only code you trust, as you would a script you run."""
    num_workers: int = 2
    """Scoring processes (0 = score in the training process; hung verifiers cannot be timed out then)."""
    timeout_s: float = 10.0
    """Per-response verifier time limit; a response that exceeds it scores as incorrect and is counted."""
    batch_timeout_s: float = 0.0
    """Deadline of one batch's scoring (per-response limits add up when many responses hang): responses
    not scored by then score as incorrect and are counted as timeouts. 0 = half of
    trainer.collective_timeout_s, so a batch of hung verifiers never outlasts the ranks' patience."""
    soft_overlong_punishment: bool = True
    """Add the soft overlong punishment (Eq. 13) to the correctness reward."""
    overlong_cache_length: int = 4096
    """L_cache: the length of the punishment buffer before L_max (paper: 4,096)."""
    overlong_penalty_factor: float = 1.0
    """Scale of the soft overlong punishment (paper: 1.0)."""

    def validate(self) -> None:
        _check(self.num_workers >= 0, "reward.num_workers", self.num_workers, "an integer >= 0")
        _check(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "a number > 0")
        _check(self.batch_timeout_s >= 0, "reward.batch_timeout_s", self.batch_timeout_s, "a number >= 0")
        _check(
            self.overlong_cache_length >= 1,
            "reward.overlong_cache_length",
            self.overlong_cache_length,
            ">= 1",
        )
        _check(
            self.overlong_penalty_factor >= 0,
            "reward.overlong_penalty_factor",
            self.overlong_penalty_factor,
            ">= 0",
        )


LossAggregationName = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]


@dataclass
class AlgorithmConfig:
    eps_low: float = 0.2
    """ε_low: lower clip range of the importance ratio (Eq. 10; paper: 0.2)."""
    eps_high: float = 0.28
    """ε_high: upper clip range, decoupled from ε_low (Clip-Higher, §3.1; paper: 0.28). GRPO: eps_high =
    eps_low."""
    dual_clip_c: float | None = 10.0
    """Dual-clip bound c for negative advantages (reference scripts: 10); null = off."""
    policy_loss: Literal["clip", "cispo"] = "clip"
    """"clip": the decoupled-clip surrogate (Eq. 10); "cispo": CISPO's REINFORCE with the importance weight
    clipped to [1 − eps_low, 1 + eps_high] and detached, every token keeping a gradient (eps_low may be 1:
    no lower bound; needs dual_clip_c null and ratio_level token). `dapo.algo.cispo_loss`."""
    ratio_level: Literal["token", "sequence"] = "token"
    """"token": each token's ratio (Eq. 8); "sequence": GSPO's length-normalised sequence ratio on every token
    of a response (GSPO's clip ranges are of order 3e-4 / 4e-4, its aggregation seq-mean-token-mean)."""
    advantage: Literal["grpo", "rloo", "reinforce_plus_plus"] = "grpo"
    """How a group's rewards become advantages: "grpo" (Eq. 9, DAPO's: group mean and std), "rloo" (the
    leave-one-out group mean, unscaled), "reinforce_plus_plus" (the group mean, then the std over the step's
    whole batch). Not in the paper; `dapo.algo.advantages`."""
    loss_aggregation: LossAggregationName = "token-mean"
    """"token-mean" (DAPO, §3.3: 1/Σ|o_i|), "seq-mean-token-mean" (GRPO), "seq-mean-token-sum", "seq-mean-
    token-sum-norm" (Dr. GRPO's constant normaliser)."""
    advantage_std_normalize: bool = True
    """Divide group-centred rewards by the group's (Bessel-corrected) std (Eq. 9); false = Dr. GRPO's mean-
    only."""
    overlong_filter: bool = False
    """Mask truncated responses out of the loss (§3.4). The reference runs used soft punishment without
    filtering."""
    dynamic_sampling: bool = True
    """Keep only groups with 0 < correct < G, sampling more until the batch is full (§3.2)."""
    max_rounds: int = 10
    """Dynamic sampling: most generation rounds per step (reference scripts: 10)."""
    max_oversample: float = 3.0
    """Dynamic sampling: a round generates at most this many times the prompts still needed (reference
    scripts: 3)."""
    min_keep_fraction: float = 0.5
    """If rounds or data run out, train on the kept groups when they are at least this fraction of the batch;
    else skip."""
    rollout_is_cap: float | None = None
    """Importance sampling for rollout/trainer mismatch: weight min(π_trainer/π_rollout, cap) (truncate), or
    the ratio inside [1/cap, cap] and 0 outside (mask); null = off."""
    rollout_is_level: Literal["token", "sequence"] = "token"
    """The ratio of `rollout_is_cap`: each token's, or the whole response's (the product of its tokens')."""
    rollout_is_mode: Literal["truncate", "mask"] = "truncate"
    """"truncate": min(ratio, cap) (TIS); "mask": tokens (or responses) whose ratio leaves [1/cap, cap] leave
    the loss."""
    use_rollout_logprobs: bool = False
    """Use the engine's log-probs as old log-probs instead of a trainer forward pass (only when numerically
    identical)."""

    def validate(self) -> None:
        if self.policy_loss == "cispo":
            _check(0 <= self.eps_low <= 1, "algorithm.eps_low", self.eps_low, "a number in [0, 1] with cispo")
            _check(self.dual_clip_c is None, "algorithm.dual_clip_c", self.dual_clip_c, "null with cispo")
            _check(self.ratio_level == "token", "algorithm.ratio_level", self.ratio_level, "token with cispo")
        else:
            _check(0 <= self.eps_low < 1, "algorithm.eps_low", self.eps_low, "a number in [0, 1)")
        _check(self.eps_high >= 0, "algorithm.eps_high", self.eps_high, "a number >= 0")
        if self.dual_clip_c is not None:
            _check(
                self.dual_clip_c > 1,
                "algorithm.dual_clip_c",
                self.dual_clip_c,
                "a number > 1, or null for off",
            )
        _check(self.max_rounds >= 1, "algorithm.max_rounds", self.max_rounds, "an integer >= 1")
        _check(self.max_oversample >= 1, "algorithm.max_oversample", self.max_oversample, "a number >= 1")
        _check(
            0 <= self.min_keep_fraction <= 1, "algorithm.min_keep_fraction", self.min_keep_fraction, "[0, 1]"
        )
        if self.rollout_is_cap is not None:
            _check(self.rollout_is_cap >= 1, "algorithm.rollout_is_cap", self.rollout_is_cap, ">= 1, or null")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections LoRA can adapt (the attention and MLP linear layers of Llama / Qwen2 / Qwen3)."""


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA's rank r: 0 = off (full fine-tuning). With r > 0 the base weights are frozen (no gradients, no
    optimizer state) and each target projection W learns W + (alpha / r) B A, A of r x in, B of out x r,
    B = 0 at the start (the first forward equals the base model's)."""
    alpha: float = 32.0
    """LoRA's alpha: the adapters' output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input during the update (0 = none; then the update is deterministic and
    invariant to the micro-batch split, as without LoRA)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections to adapt, by name (each decoder layer's)."""

    def validate(self) -> None:
        _check(self.rank >= 0, "actor.lora.rank", self.rank, "an integer >= 0 (0 = off)")
        _check(self.alpha > 0, "actor.lora.alpha", self.alpha, "a number > 0")
        _check(0 <= self.dropout < 1, "actor.lora.dropout", self.dropout, "a number in [0, 1)")
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        _check(
            bool(self.target_modules) and not unknown,
            "actor.lora.target_modules",
            list(self.target_modules),
            "a non-empty list of " + ", ".join(LORA_TARGETS),
        )


@dataclass
class ActorConfig:
    lr: float = 1e-6
    """AdamW learning rate, constant after warm-up (paper: 1e-6)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.1
    """AdamW weight decay (reference scripts: 0.1)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (reference scripts: 1.0); 0 = off."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up over this many steps (policy-update rounds, not generation rounds; paper:
    20)."""
    mini_batch_size: int = 512
    """Responses per gradient update (paper: 512, so 512 prompts x 16 responses give 16 updates per step)."""
    micro_batch_size: int = 8
    """Responses per forward/backward pass; any value gives the same gradient (one global token count per
    mini-batch)."""
    epochs: int = 1
    """Passes over each step's batch (paper: 1)."""
    precision: Precision = "model"
    """"model": every tensor in `model.dtype`. "bf16-mixed": float32 master weights and AdamW states
    (`model.dtype` must be float32), the model's matmuls and attention in bf16 under autocast, the loss
    maths of `dapo.algo` in float32; the native engine samples in bf16 from a copy of the same weights
    (`rollout/mismatch_kl` measures the difference; `algorithm.rollout_is_cap` corrects for it). Faster
    only where bf16 matmuls are (GPUs, some CPUs): see docs/benchmarks.md. "auto" (the embedded
    default's): "bf16-mixed" where it can run (float32 model on CPU, native engine) and a timing of the
    model's MLP on this machine finds it faster, else "model"; decided once per machine (`dapo.models.
    kernels`, the `precision` choice), logged, and kept by a resumed run."""

    activation_checkpointing: bool = False
    """Keep only each decoder layer's input during the update's forward and recompute the layer in the
    backward (per layer, non-reentrant): activations of ~L·D·2 bytes per token instead of ~L·(6D + 4I)·2,
    for about a third more compute. The gradient is unchanged. On in the long-response presets."""
    logits_chunk_tokens: int = 0
    """Log-probs and entropy from the final hidden states through the LM head this many tokens at a time,
    in forward and backward, so a micro-batch's [tokens x vocabulary] logits are never held whole (verl and
    Liger call this fused linear cross-entropy). 0 = the whole micro-batch's logits at once. Same values and
    gradients either way."""
    max_tokens_per_micro_batch: int = 0
    """Micro-batches by a token budget (verl's ppo_max_token_len_per_gpu): a mini-batch's responses, in
    order, are packed into micro-batches of at most this many tokens (prompt once per group in the
    micro-batch, plus the responses; a longer response goes alone), `micro_batch_size` capping the count as
    well. 0 = by `micro_batch_size` alone. The gradient is the same for any split (one global denominator)."""
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    """Between updates, keep the AdamW states ("optimizer") or the states and the sharded training weights
    ("optimizer+params") in host memory, on the device only during the update; for a GPU shared with
    generation. The update's results are unchanged. "none" on CPU (nothing to move)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters (`dapo.models.lora`): train r-rank adapters of the projections over frozen base
    weights instead of every weight (``actor.lora.rank`` > 0)."""

    def validate(self) -> None:
        self.lora.validate()
        _check(self.lr > 0, "actor.lr", self.lr, "a number > 0")
        _check(all(0 <= b < 1 for b in self.betas), "actor.betas", self.betas, "two numbers in [0, 1)")
        _check(self.weight_decay >= 0, "actor.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.grad_clip >= 0, "actor.grad_clip", self.grad_clip, "a number >= 0 (0 = off)")
        _check(self.warmup_steps >= 0, "actor.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.mini_batch_size >= 1, "actor.mini_batch_size", self.mini_batch_size, "an integer >= 1")
        _check(self.micro_batch_size >= 1, "actor.micro_batch_size", self.micro_batch_size, "an integer >= 1")
        _check(self.epochs >= 1, "actor.epochs", self.epochs, "an integer >= 1")
        _check(
            self.logits_chunk_tokens >= 0,
            "actor.logits_chunk_tokens",
            self.logits_chunk_tokens,
            "an integer >= 0 (0 = off)",
        )
        _check(
            self.max_tokens_per_micro_batch >= 0,
            "actor.max_tokens_per_micro_batch",
            self.max_tokens_per_micro_batch,
            "an integer >= 0 (0 = off)",
        )
        offloads = ("none", "optimizer", "optimizer+params")
        _check(self.offload in offloads, "actor.offload", self.offload, " | ".join(offloads))


@dataclass
class TrainerConfig:
    prompts_per_step: int = 512
    """N: groups (prompts) per policy-update step after dynamic-sampling filtering (paper: 512)."""
    total_steps: int = 1000
    """Policy-update steps to run (a step is one update round; generation rounds are counted separately)."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str = ""
    """Run directory name under output_dir ("" = the config's name, e.g. "tiny")."""
    world_size: int = 0
    """Data-parallel ranks (0 = as launched: torchrun's WORLD_SIZE, else 1). A number is checked against
    the launcher's and sizes `--dry-run`'s per-rank plan."""
    collective_timeout_s: float = 600.0
    """Seconds a collective may wait for the other ranks before the run stops with an error naming this
    rank (a rank that died or hangs never makes the others hang); in Ray mode also the limit of every
    remote call (a timeout is logged, then the run stops)."""
    backend: Literal["local", "ray"] = "local"
    """"local": this process, or the ranks torchrun started; "ray": the cluster mode
    (`dapo.backends.ray`): this process is the single controller, `world_size` trainer ranks and
    `rollout.num_workers` rollout workers run as Ray actors."""
    ray_address: str = ""
    """trainer.backend=ray: the Ray cluster to join ("" = $RAY_ADDRESS, else a local Ray started with
    this machine's CPUs)."""
    ray_cpus_per_actor: int = 1
    """trainer.backend=ray: logical CPUs (and torch threads) of each trainer rank and rollout worker."""
    gpu_memory_gib: float = 80.0
    """The memory of one GPU, which `--dry-run` checks each rank's plan against (FITS / DOES NOT FIT)."""
    async_rollout_steps: int = 0
    """Beyond the paper, trainer.backend=ray: 1 = step k+1's batch is generated while step k updates
    (one-step-off-policy; the trainer's log-probs are the clip ratio's denominators and truncated
    importance sampling, algorithm.rollout_is_cap, corrects against the engine's); 0 = synchronous."""

    def validate(self) -> None:
        _check(self.gpu_memory_gib > 0, "trainer.gpu_memory_gib", self.gpu_memory_gib, "a number > 0")
        _check(
            self.prompts_per_step >= 1, "trainer.prompts_per_step", self.prompts_per_step, "an integer >= 1"
        )
        _check(self.total_steps >= 0, "trainer.total_steps", self.total_steps, "an integer >= 0")
        _check(self.world_size >= 0, "trainer.world_size", self.world_size, "0 (as launched) or >= 1")
        _check(
            self.collective_timeout_s > 0, "trainer.collective_timeout_s", self.collective_timeout_s, "> 0"
        )
        _check(
            self.async_rollout_steps in (0, 1),
            "trainer.async_rollout_steps",
            self.async_rollout_steps,
            "0 or 1",
        )
        _check(
            self.ray_cpus_per_actor >= 1,
            "trainer.ray_cpus_per_actor",
            self.ray_cpus_per_actor,
            "an integer >= 1",
        )


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=lambda: ["aime-2024.parquet"])
    """Validation data (evaluation never deduplicates: AIME repeats each problem 32 times on purpose)."""
    k: int = 32
    """Samples per prompt row for avg@k / pass@k / maj@k."""
    temperature: float = 1.0
    """Evaluation sampling temperature (paper: 1.0)."""
    top_p: float = 0.7
    """Evaluation nucleus threshold (paper: 0.7)."""
    max_response_length: int = 0
    """Generated tokens per evaluation response (0 = rollout.max_response_length)."""
    every_steps: int = 5
    """Evaluate every this many steps (0 = only before and after training)."""
    before_training: bool = True
    """Evaluate the initial policy before the first step."""
    max_prompts: int = 0
    """Evaluate at most this many prompt rows (0 = all)."""

    def validate(self) -> None:
        _check(self.k >= 1, "evaluation.k", self.k, "an integer >= 1")
        _check(self.temperature >= 0, "evaluation.temperature", self.temperature, "a number >= 0")
        _check(0 < self.top_p <= 1, "evaluation.top_p", self.top_p, "a number in (0, 1]")
        _check(
            self.max_response_length >= 0, "evaluation.max_response_length", self.max_response_length, ">= 0"
        )
        _check(self.every_steps >= 0, "evaluation.every_steps", self.every_steps, "an integer >= 0")
        _check(self.max_prompts >= 0, "evaluation.max_prompts", self.max_prompts, "an integer >= 0")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    progress_bar: bool = True
    """Show progress: a bar with ETA and the key figures on a terminal, else plain lines (see every_steps)."""
    every_steps: int = 10
    """When the output is not a terminal (a log file): one plain progress line every this many steps."""
    wandb: bool = False
    """Also log the metrics to Weights & Biases (the `wandb` extra: pip install 'dapo[wandb]'), from the main
    process only; the run is named after the run directory and carries the resolved config."""
    wandb_project: str = "dapo"
    """The W&B project of the run (with logging.wandb)."""
    wandb_tags: list[str] = field(default_factory=list)
    """Tags of the W&B run (with logging.wandb)."""

    def validate(self) -> None:
        _check(self.every_steps >= 1, "logging.every_steps", self.every_steps, "an integer >= 1")
        _check(self.wandb_project != "", "logging.wandb_project", self.wandb_project, "a project name")


@dataclass
class CheckpointConfig:
    every_steps: int = 50
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_last: int = 3
    """Keep the newest this many checkpoints."""
    resume: str = "none"
    """"none", "auto" (continue the newest complete checkpoint of the run directory) or a checkpoint path."""

    def validate(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "an integer >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclass
class Config:
    """The whole run. Sections mirror the pipeline: data -> rollout -> reward -> algorithm -> actor ->
    trainer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def longest_sequence(self) -> int:
        """The longest prompt + response an engine is asked for: training's or evaluation's response."""
        responses = self.rollout.max_response_length, self.evaluation.max_response_length
        return self.data.max_prompt_length + max(responses)

    def validate(self) -> None:
        """Validate every section, then the constraints that span sections."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.actor.precision == "bf16-mixed":
            _check(
                self.model.dtype == "float32" and self.rollout.engine == "native",
                "actor.precision",
                self.actor.precision,
                f"'bf16-mixed' only with model.dtype=float32 (the master weights; got {self.model.dtype})"
                f" and rollout.engine=native (got {self.rollout.engine}); else 'model'",
            )
        resp = self.rollout.max_response_length
        if self.reward.soft_overlong_punishment:
            _check(
                self.reward.overlong_cache_length <= resp,
                "reward.overlong_cache_length",
                self.reward.overlong_cache_length,
                f"<= rollout.max_response_length ({resp})",
            )
        if self.rollout.engine == "hf":
            _check(
                self.model.implementation == "hf",
                "rollout.engine",
                self.rollout.engine,
                "'hf' only with model.implementation=hf (transformers' generate runs transformers' model)",
            )
        longest = self.longest_sequence()
        if self.rollout.engine == "vllm" and self.rollout.vllm.max_model_len:
            _check(
                self.rollout.vllm.max_model_len >= longest,
                "rollout.vllm.max_model_len",
                self.rollout.vllm.max_model_len,
                f"0 or >= data.max_prompt_length + the longest of rollout/evaluation.max_response_length "
                f"({longest})",
            )
        files = [*self.data.train_files, *self.evaluation.files]
        if self.reward.function == "countdown":
            _check(
                all(f == "countdown" for f in files),
                "reward.function",
                self.reward.function,
                f"'countdown' only when data.train_files and evaluation.files are all the built-in countdown "
                f"task (got {files})",
            )
        if "countdown" in files:
            _check(
                self.reward.function not in ("math_dapo", "math_verify"),
                "reward.function",
                self.reward.function,
                "'countdown' (or a function of your own) with the built-in countdown task in "
                "data.train_files or evaluation.files: its ground truths are 'TARGET from N1 N2 ...', which "
                "only the countdown verifier reads",
            )
        if self.reward.batch_timeout_s:
            _check(
                self.reward.batch_timeout_s < self.trainer.collective_timeout_s,
                "reward.batch_timeout_s",
                self.reward.batch_timeout_s,
                f"0 or < trainer.collective_timeout_s ({self.trainer.collective_timeout_s:g}: the ranks wait "
                "no longer for a batch's scores)",
            )
        if self.trainer.async_rollout_steps:
            key, value = "trainer.async_rollout_steps", self.trainer.async_rollout_steps
            _check(not self.rollout.handoff, key, value, "0 with rollout.handoff=true (the engine that "
                   "generates during the update cannot give the device back to it)")  # fmt: skip
            _check(self.trainer.backend == "ray", key, value, "0 unless trainer.backend=ray (generation and "
                   "update overlap on separate actors)")  # fmt: skip
            _check(self.algorithm.rollout_is_cap is not None, key, value, "0 unless algorithm.rollout_is_cap "
                   "is set (truncated importance sampling against the engine's log-probs)")  # fmt: skip
            _check(not self.algorithm.use_rollout_logprobs, key, value, "0 with "
                   "algorithm.use_rollout_logprobs=true (the stale engine log-probs would cancel the "
                   "importance weights)")  # fmt: skip
        responses = self.trainer.prompts_per_step * self.rollout.n
        _check(
            self.actor.mini_batch_size <= responses,
            "actor.mini_batch_size",
            self.actor.mini_batch_size,
            f"<= responses per step (trainer.prompts_per_step x rollout.n = {responses})",
        )


# ----------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed tree


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: invalid value {value!r}; allowed: {allowed}")


T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = _did_you_mean(str(value), [str(a) for a in allowed])
            raise ConfigError(
                f"{key}: invalid value {value!r}; allowed: {', '.join(map(repr, allowed))}{hint}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str | int | float):
            value = [value]  # a single file is a one-element list
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        item_tps = get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(item_tps):
            raise ConfigError(f"{key}: expected a list of {len(item_tps)} values, got {value!r}")
        return tuple(
            _coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_tps, strict=True))
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown key {full!r}{_did_you_mean(str(key), names)}; "
                f"allowed keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=c` into ("a.b", parsed c); the value is parsed as YAML (numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form key.path=value (e.g. actor.lr=1e-6)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a built-in preset (e.g. "tiny", "dapo_qwen2.5_32b")."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a preset{_did_you_mean(name_or_path, names)}; "
        f"presets: {', '.join(names)}"
    )


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping (as read from YAML)."""
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping; `base: NAME_OR_PATH` at its top loads that file first, then overrides."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (
        path.parent / str(base) if (path.parent / str(base)).is_file() else resolve_config_path(str(base))
    )
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    merged = _read_yaml(base_path, (*seen, path.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file or preset name (None = the embedded default), apply `a.b=c` overrides, validate."""
    path = resolve_config_path(str(config) if config is not None else DEFAULT_PRESET)
    data = _read_yaml(path)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(data, key, value)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(cfg: Any) -> Any:
    """The resolved tree as plain data (tuples become lists), for YAML output."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved config (what every run directory stores as config.yaml)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, width=120)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config section, read from the source (used by `dapo config --explain`)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
