"""`dapo train --dry-run`: what one step does, and what each data-parallel rank holds, from the config alone.

Nothing is loaded: the model's shape comes from the checkpoint's `config.json` when it is on this machine,
else from a table of the published shapes of the models the presets name (so `configs/dapo_qwen2.5_32b.yaml`
can be checked on 128 GPUs before they are rented). The memory figures are estimates of the largest
tensors (the formulas are in `rank_memory`), not measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dapo.config import Config
from dapo.models.config import ModelArgs

# Published shapes (config.json of each Hugging Face checkpoint): hidden, intermediate, layers, heads, KV
# heads, vocabulary, tied embeddings, q/k/v bias.
KNOWN_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool, bool]] = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False, True),
    "qwen2.5-14b": (5120, 13824, 48, 40, 8, 152064, False, True),
    "qwen2.5-32b": (5120, 27648, 64, 40, 8, 152064, False, True),
    "qwen2.5-math-7b": (3584, 18944, 28, 28, 4, 152064, False, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False, False),
}

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_shape(path: str) -> tuple[ModelArgs | None, str]:
    """(the model's shape, where it came from); None when neither the checkpoint nor the table knows it.
    ``path``: "tiny" (or "tiny-countdown"), a checkpoint directory, or a Hub id (its config.json when the
    local Hub cache holds it; never a download)."""
    if path in ("tiny", "tiny-countdown"):
        from dapo.models.tiny import RECIPES

        r = RECIPES[path]
        args = ModelArgs(
            architecture="Qwen2ForCausalLM", vocab_size=r.vocab_size, hidden_size=r.hidden_size,
            intermediate_size=r.intermediate_size, num_hidden_layers=r.num_layers,
            num_attention_heads=r.num_heads, num_key_value_heads=r.num_kv_heads,
            head_dim=r.hidden_size // r.num_heads, tie_word_embeddings=True, qkv_bias=True,
        )  # fmt: skip
        return args, "the tiny recipe (vocabulary at most its bound)"
    config = Path(path) / "config.json"
    if not config.is_file():
        from dapo.models.load import cached_hub_config, is_hub_id

        config = (cached_hub_config(path) if is_hub_id(path) else None) or config  # a Hub id, if cached
    if config.is_file():
        return ModelArgs.from_hf_config(json.loads(config.read_text())), str(config)
    name = Path(path).name.lower()
    for key, (h, i, n_layers, heads, kv, vocab, tied, bias) in KNOWN_SHAPES.items():
        if name == key or name.startswith(key + "-") or name == key + "-instruct":
            args = ModelArgs(
                architecture="Qwen2ForCausalLM", vocab_size=vocab, hidden_size=h, intermediate_size=i,
                num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=h // heads, tie_word_embeddings=tied, qkv_bias=bias,
            )  # fmt: skip
            return args, f"the published shape of {key} ({path} is not on this machine)"
    return None, f"unknown ({path} has no config.json here and is not in dapo.plan.KNOWN_SHAPES)"


def parameter_count(a: ModelArgs) -> tuple[int, int]:
    """(all parameters, parameters of one decoder layer)."""
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    attention = a.hidden_size * (q + 2 * kv) + q * a.hidden_size + (q + 2 * kv) * a.qkv_bias
    layer = attention + 3 * a.hidden_size * a.intermediate_size + 2 * a.hidden_size
    embedding = a.vocab_size * a.hidden_size
    total = embedding * (1 if a.tie_word_embeddings else 2) + a.num_hidden_layers * layer + a.hidden_size
    return total, layer


def lora_parameter_count(a: ModelArgs, rank: int, targets: list[str]) -> int:
    """Parameters of rank-``rank`` adapters on the ``targets`` projections of every layer (A: r x in,
    B: out x r)."""
    q, kv, d, i = (
        a.num_attention_heads * a.head_dim,
        a.num_key_value_heads * a.head_dim,
        a.hidden_size,
        a.intermediate_size,
    )
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}  # fmt: skip
    return a.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets)


@dataclass
class RankMemory:
    """Estimated bytes per rank (on its device unless named host), by what holds them, and what is
    resident in each phase of a step:

    - generation: the training state left on the device between updates (the parameter shard, and the
      AdamW states unless `actor.offload` moves them to the host), the engine's weights, its KV cache and
      its workspace;
    - update: the training state, the update's gathered layers, activations and logits, and the engine's
      memory unless the hand-off (`rollout.handoff`) released it (the native engine's KV cache lives only
      during generation);
    - weight sync: the training state, the engine's weights being refilled, and one gathered tensor (plus
      one bucket on Ray's trainer rank 0);
    - loading, before training.
    """

    params: float
    grads: float
    optimizer: float
    gathered_layers: float
    weight_casts: float
    activations: float
    logits: float
    engine_weights: float = 0.0
    kv_cache: float = 0.0
    engine_workspace: float = 0.0
    sync_buffer: float = 0.0
    load: float = 0.0
    host: float = 0.0
    """Host memory: the full copy kept off the device, offloaded states, a sleeping vLLM's weights."""
    optimizer_in_generation: float = 0.0
    params_in_generation: float = 0.0
    engine_in_update: float = 0.0
    """What the engine keeps on the device during the update (0 after the hand-off)."""
    kv_in_update: float = 0.0
    kv_in_sync: float = 0.0
    """vLLM's KV pool, there while it loads new weights (awake)."""
    asleep_in_gather: bool = False
    """vLLM sleeps while the shards are gathered, then wakes to load them."""
    generates: bool = False
    in_flight: int = 0
    """Sequences the engine decodes at once at full length."""

    @property
    def update(self) -> float:
        own = self.params + self.grads + self.optimizer + self.gathered_layers + self.weight_casts
        return own + self.activations + self.logits + self.engine_in_update + self.kv_in_update

    @property
    def generate(self) -> float:
        if not self.generates:
            return 0.0
        state = self.params_in_generation + self.optimizer_in_generation
        return state + self.engine_weights + self.kv_cache + self.engine_workspace

    @property
    def sync(self) -> float:
        state = self.params_in_generation + self.optimizer_in_generation
        engine = self.engine_weights + self.kv_in_sync
        if self.asleep_in_gather:
            return state + max(engine, self.sync_buffer)
        return state + engine + self.sync_buffer

    @property
    def phases(self) -> dict[str, float]:
        out = {"generation": self.generate, "update": self.update, "weight sync": self.sync}
        out["loading"] = self.load
        return {k: v for k, v in out.items() if v > 0}

    @property
    def peak(self) -> float:
        return max(self.phases.values())


def micro_batch_tokens(cfg: Config) -> int:
    """Tokens (prompt + response) of the largest micro-batch: `actor.micro_batch_size` full-length rows,
    or fewer under `actor.max_tokens_per_micro_batch` (one row over the budget still goes alone)."""
    row = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    tokens = cfg.actor.micro_batch_size * row
    if cfg.actor.max_tokens_per_micro_batch > 0:
        tokens = min(tokens, max(cfg.actor.max_tokens_per_micro_batch, row))
    return tokens


def _compute_bytes(cfg: Config, cuda: bool) -> int:
    if cfg.actor.precision == "bf16-mixed":
        return 2
    return 2 if cuda and cfg.model.dtype != "float32" else _DTYPE_BYTES[cfg.model.dtype]


def rank_memory(
    cfg: Config,
    a: ModelArgs,
    world_size: int,
    *,
    cuda: bool,
    generates: bool = True,
    full_copy: bool | None = None,
) -> RankMemory:
    """Per-rank estimate at the config's sizes; the update's coefficients were fitted to
    `torch.cuda.max_memory_allocated` of a Qwen2.5-1.5B-shaped update at 16k tokens on an H200
    (docs/memory.md).

    Training state is sharded W ways: float32 parameters, gradients and AdamW's two moments (4 + 4 + 8
    bytes per parameter / W; on CUDA the float32 shard is the master copy of bfloat16 compute); gradients
    exist only during the update (freed after each). With LoRA (`actor.lora.rank`) only the adapters have
    gradients and moments; the parameters are the frozen base plus the adapters. While a layer computes,
    its full parameters are gathered (two layers at the compute dtype: one computing, one prefetched); in
    one process under
    bf16-mixed, autocast's bf16 copies of all the weights instead (2 bytes per parameter, kept for the
    micro-batches of a mini-batch). Activations saved for the backward, for the largest micro-batch's
    tokens (`micro_batch_tokens`): without checkpointing about (6·hidden + 4·MLP width) values per token
    per layer at the compute dtype, plus under bf16-mixed the float32 inputs of the two norms and RoPE's
    float32 q and k; with `actor.activation_checkpointing` each layer's input (hidden values per token per
    layer) plus one layer recomputed in full. Logits: two float32 copies and one at the compute dtype for
    the response tokens; with `actor.logits_chunk_tokens` eight float32 and two compute-dtype ``[chunk x
    vocabulary]`` temporaries (the forward's and the backward's softmax maths).

    Generation (`engine_memory`): a rank that generates holds the engine's weights (the native engine's
    full copy under a launcher; vLLM's own copy, the rank's full copy then in host memory) and its KV
    cache. A rank that does not generate (Ray: the rollout workers do, see `worker_memory`) holds no engine,
    and the full copy only with ``full_copy`` (Ray's trainer rank 0, in host memory). The weight sync
    gathers one tensor at a time (float32 on CUDA: the largest is the embedding). Loading (ranks > 1, the
    native model): the rank's float32 shard and the rows of one tensor (`distributed.load_sharded`), its
    full copy if the engine computes with it; transformers' model: the whole checkpoint, a copy and a
    float32 cast.
    """
    total, layer = parameter_count(a)
    compute = _compute_bytes(cfg, cuda)
    w = max(world_size, 1)
    tokens = micro_batch_tokens(cfg)
    rows = max(1, tokens // (cfg.data.max_prompt_length + cfg.rollout.max_response_length))
    response_tokens = min(tokens, rows * cfg.rollout.max_response_length)
    per_token_layer = (6 * a.hidden_size + 4 * a.intermediate_size) * compute
    if cfg.actor.precision == "bf16-mixed":  # autocast keeps the norms' inputs and RoPE's q, k in float32
        kv_width = a.num_key_value_heads * a.head_dim
        per_token_layer += (2 * a.hidden_size + a.num_attention_heads * a.head_dim + kv_width) * 4
    if cfg.actor.activation_checkpointing:
        activations = tokens * (a.num_hidden_layers * a.hidden_size * compute + per_token_layer)
    else:
        activations = tokens * a.num_hidden_layers * per_token_layer
    chunk = cfg.actor.logits_chunk_tokens
    if chunk > 0:
        logits = (8 * 4 + 2 * compute) * min(chunk, response_tokens) * a.vocab_size
    else:
        logits = (2 * 4 + compute) * response_tokens * a.vocab_size
    lora = cfg.actor.lora
    adapters = lora_parameter_count(a, lora.rank, lora.target_modules) if lora.rank else 0
    trained = adapters if lora.rank else total  # what has gradients and AdamW moments
    total += adapters
    host_state = cfg.actor.offload == "optimizer+params" and cuda
    optimizer_off = cfg.actor.offload != "none" and cuda
    dtype_bytes = _DTYPE_BYTES[cfg.model.dtype]
    sharded = w > 1
    m = RankMemory(
        params=0.0 if host_state else 4 * total / w,
        grads=0.0 if host_state else 4 * trained / w,
        optimizer=0.0 if host_state else 8 * trained / w,
        gathered_layers=2 * layer * compute if sharded else 0.0,
        weight_casts=2 * total if not sharded and cfg.actor.precision == "bf16-mixed" else 0.0,
        activations=activations,
        logits=logits,
    )
    m.params_in_generation = m.params
    m.optimizer_in_generation = 0.0 if optimizer_off else m.optimizer
    m.host = (4 * total + 12 * trained) / w if host_state else 8 * trained / w if optimizer_off else 0.0
    largest_tensor = a.vocab_size * a.hidden_size * (4 if sharded else 0)
    if generates:
        e = engine_memory(cfg, a, round_prompts(cfg, w), cuda=cuda)
        m.generates, m.in_flight, m.kv_cache, m.engine_workspace = True, e.in_flight, e.kv_cache, e.workspace
        vllm = cfg.rollout.engine == "vllm"
        if vllm:  # its own copy on the device; the rank's full copy in host memory
            m.engine_weights = e.weights
            m.host += e.weights * (2 if cfg.rollout.vllm.sleep_mode else 1)  # level 1 keeps them on the host
        elif sharded:  # the native engine computes with the rank's full copy
            m.engine_weights = e.weights
        awake = not (cfg.rollout.handoff or (vllm and cfg.rollout.vllm.sleep_mode))
        m.engine_in_update = m.engine_weights if awake else 0.0
        m.kv_in_update = m.kv_cache if vllm and awake else 0.0  # vLLM's pool; the native cache is per call
        m.kv_in_sync = m.kv_cache if vllm else 0.0
        m.asleep_in_gather = vllm and not awake  # the shards are gathered into the host copy first
        m.sync_buffer = largest_tensor
    else:
        keeps_copy = bool(full_copy) and sharded
        m.host += total * dtype_bytes if keeps_copy else 0.0
        bucket = cfg.rollout.weight_sync_bucket_mb * 2**20 if keeps_copy and cuda else 0.0
        m.sync_buffer = largest_tensor + bucket
    if w == 1:
        m.load = total * dtype_bytes
    elif cfg.model.implementation == "native":  # `distributed.load_sharded`: shards, the copy, one tensor
        one_tensor = a.vocab_size * a.hidden_size * (dtype_bytes + 4) / w
        copy_on_device = m.engine_weights if generates and cfg.rollout.engine != "vllm" else 0.0
        m.load = m.params + copy_on_device + one_tensor
    else:  # transformers' model: the whole checkpoint, a copy for the engine, a float32 cast
        m.load = total * (2 * dtype_bytes + 4)
    return m


@dataclass(frozen=True)
class EngineMemory:
    """One engine's bytes on its device(s) in total: weights, KV cache, workspace; sequences at once."""

    weights: float
    kv_cache: float
    workspace: float
    in_flight: int


def engine_memory(cfg: Config, a: ModelArgs, prompts: int, *, cuda: bool, tp: int = 1) -> EngineMemory:
    """An engine that decodes ``prompts`` x G rows per round, per device of its ``tp``. Weights: the full
    model at the model dtype. The native engine keeps at most `rollout.max_batch_size` rows at once and at
    most what `rollout.kv_cache_gib` holds at full length, each row's own slots with the refill's slack when
    the round has more rows (`NativeEngine.rows_per_chunk`, `continuous_window`); its workspace is
    one layer's prefill activations for the distinct prompts and a few float32 ``[rows x vocabulary]``
    sampling temporaries, and on CPU (``cuda`` false) with 16 rows or more a prepacked copy of the weights.
    vLLM's KV cache is `rollout.vllm.kv_cache_gib` per GPU, a pool allocated at start
    (sequences at once: what it holds at full length); its workspace one scheduler step of 8,192 tokens and
    the logits of 256 sequences."""
    compute = 2 if cuda and cfg.model.dtype != "float32" else _DTYPE_BYTES[cfg.model.dtype]
    weights = parameter_count(a)[0] * _DTYPE_BYTES[cfg.model.dtype] / tp
    kv_per_token = a.kv_bytes_per_token(compute)
    prompt, tokens = cfg.data.max_prompt_length, cfg.data.max_prompt_length + cfg.rollout.max_response_length
    per_token = (4 * a.hidden_size + 2 * a.intermediate_size) * compute
    if cfg.rollout.engine == "vllm":
        pool = cfg.rollout.vllm.kv_cache_gib * 2**30
        in_flight = max(int(pool * tp // (tokens * kv_per_token)), 0)
        workspace = 8192 * per_token / tp + 256 * a.vocab_size * 4
        return EngineMemory(weights, pool, workspace, in_flight)
    from dapo.rollout.native import continuous_window

    total = rows = prompts * cfg.rollout.n
    if cfg.rollout.max_batch_size:
        rows = min(rows, cfg.rollout.max_batch_size)
    budget = cfg.rollout.kv_cache_gib * 2**30
    if budget:
        rows = min(rows, max(1, int(budget // (tokens * kv_per_token))))
    if rows < total:  # continuous batching: each row's own slots have the refill's slack
        tokens = prompt + continuous_window(cfg.rollout.max_response_length)
        if budget:
            rows = max(1, int(budget // (tokens * kv_per_token)))
    distinct = min(prompts, rows)
    workspace = distinct * prompt * per_token + 3 * rows * a.vocab_size * 4
    if not cuda and rows >= 16:  # weights prepacked for oneDNN (`CausalLM.packed_weights`): at most a copy
        workspace += weights
    return EngineMemory(weights, rows * tokens * kv_per_token, workspace, rows)


def worker_memory(cfg: Config, a: ModelArgs, *, cuda: bool) -> EngineMemory:
    """Bytes per GPU of one Ray rollout worker's engine (its share of the largest round, over
    `rollout.vllm.tensor_parallel_size` GPUs with vLLM); its full copy, in host memory with vLLM, is not
    counted here."""
    share = math.ceil(round_prompts(cfg, 1) / cfg.rollout.num_workers)
    tp = cfg.rollout.vllm.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
    return engine_memory(cfg, a, share, cuda=cuda, tp=tp)


def round_prompts(cfg: Config, world_size: int) -> int:
    """Prompts one rank generates in the largest generation round."""
    n = cfg.trainer.prompts_per_step
    per_round = math.ceil(n * cfg.algorithm.max_oversample) if cfg.algorithm.dynamic_sampling else n
    return math.ceil(per_round / max(world_size, 1))


def format_rank_plan(cfg: Config, world_size: int, *, cuda: bool = True) -> str:
    """The per-rank lines of the dry-run plan (with trainer.backend=ray: of a trainer rank, which only
    trains; `format_ray_plan` describes the rollout workers)."""
    w = max(world_size, 1)
    generates = cfg.trainer.backend != "ray"
    responses = cfg.trainer.prompts_per_step * cfg.rollout.n
    mini = cfg.actor.mini_batch_size
    share = math.ceil(mini / w)
    if generates:
        copy = (
            "vLLM's own weights, the full copy in host memory"
            if cfg.rollout.engine == "vllm"
            else ("a full copy for generation")
        )
        lines = [
            f"per rank ({w} data-parallel rank{'s' if w > 1 else ''}"
            + (f", FSDP2 shards of the policy + {copy}):" if w > 1 else "):"),
            f"  prompts generated per round       <= {round_prompts(cfg, w)} "
            f"(x G = {round_prompts(cfg, w) * cfg.rollout.n} responses)",
        ]
    else:
        lines = [
            f"per trainer rank ({w} rank{'s' if w > 1 else ''} of one torch.distributed world"
            + (", FSDP2 shards of the policy; rank 0 keeps the full weights in host memory" if w > 1 else "")
            + "; the rollout workers generate):"
        ]
    budget = cfg.actor.max_tokens_per_micro_batch
    cut = f"<= {budget} tokens and " if budget > 0 else ""
    lines += [
        f"  responses trained per step        {math.ceil(responses / w)} of {responses}"
        f" ({share} of each mini-batch of {mini}: micro-batches of {cut}<= {cfg.actor.micro_batch_size} "
        "responses)",
    ]
    args, source = model_shape(cfg.model.path)
    if args is None:
        lines.append(f"  memory estimate                   not available: model shape {source}")
        return "\n".join(lines)
    total, _ = parameter_count(args)
    m = rank_memory(cfg, args, w, cuda=cuda, generates=generates, full_copy=not generates)
    gib = 2.0**30
    a = cfg.actor
    full_length = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    lines += [
        f"  model                             {total / 1e9:.3g}B parameters (shape from {source})",
        f"  micro-batch                       <= {micro_batch_tokens(cfg)} tokens",
    ]
    if a.lora.rank:
        adapters = lora_parameter_count(args, a.lora.rank, a.lora.target_modules)
        lines.append(
            f"  LoRA                              rank {a.lora.rank}: {adapters / 1e6:.3g}M trained "
            "parameters (the base frozen: no gradients, no AdamW moments)"
        )
    if generates:
        label = f"engine ({cfg.rollout.engine})"
        lines.append(f"  {label:<34}<= {m.in_flight} sequences of {full_length} tokens at once")
    on_host = ", on host" if cuda and a.offload == "optimizer+params" else ""
    between = " (host between)" if cuda and a.offload == "optimizer" else ""
    handed = cfg.rollout.handoff or (cfg.rollout.engine == "vllm" and cfg.rollout.vllm.sleep_mode)
    items = [
        ("params", f"parameters (fp32 shard{on_host})"),
        ("grads", f"gradients (fp32 shard{on_host})"),
        ("optimizer", f"AdamW moments{between}" if between else f"AdamW moments (fp32 shard{on_host})"),
        ("gathered_layers", "gathered layers (2)"),
        ("weight_casts", "bf16 weight copies (autocast)"),
        ("activations", "activations" + (" (checkpointed)" if a.activation_checkpointing else "")),
        (
            "logits",
            f"logits ({f'chunks of {a.logits_chunk_tokens}' if a.logits_chunk_tokens else 'fp32, whole'})",
        ),
        ("engine_weights", "engine's weights" + (" (not in update)" if handed else "")),
        ("kv_cache", "KV cache" + (" (not in update)" if handed or cfg.rollout.engine != "vllm" else "")),
        ("engine_workspace", "engine workspace"),
        ("sync_buffer", "weight sync: a tensor" + (" + bucket" if not generates and cuda else "")),
    ]
    lines.append(f"  memory estimate ({'CUDA' if cuda else 'CPU'}, {cfg.model.dtype} model, GiB per rank)")
    lines += [f"    {label:<32}{getattr(m, key) / gib:10.2f}" for key, label in items if getattr(m, key)]
    phase_label = {"generation": "total (generation)", "update": "total (update)"}
    phase_label |= {"weight sync": "total (weight sync)", "loading": "loading (before training)"}
    lines += [f"    {phase_label[k]:<32}{v / gib:10.2f}" for k, v in m.phases.items()]
    if m.host:
        lines.append(f"    {'host memory (not on the device)':<32}{m.host / gib:10.2f}")
    limit = cfg.trainer.gpu_memory_gib
    phase = max(m.phases, key=lambda k: m.phases[k])
    if generates and m.in_flight == 0:
        lines.append(
            f"  the engine's KV cache ({m.kv_cache / gib:.2f} GiB) holds no sequence of {full_length} "
            "tokens: raise rollout.vllm.kv_cache_gib"
        )
    if cuda:
        fits = m.peak <= limit * gib and (m.in_flight > 0 or not generates)
        verdict = "FITS" if fits else "DOES NOT FIT"
        who = "trainer ranks: " if not generates else ""
        lines.append(
            f"  {who}{verdict} in trainer.gpu_memory_gib={limit:g}: peak {m.peak / gib:.1f} GiB ({phase})"
        )
    in_phase = {
        "generation": ("params", "optimizer", "engine_weights", "kv_cache", "engine_workspace"),
        "weight sync": ("params", "optimizer", "engine_weights", "sync_buffer"),
        "loading": ("load",),
    }.get(phase, tuple(k for k, _ in items[:7]) + (() if handed else ("engine_weights",)))
    values = {k: getattr(m, k) for k in in_phase}
    if phase in ("generation", "weight sync"):
        values["optimizer"] = m.optimizer_in_generation
    largest = sorted(((k, v) for k, v in values.items() if v > 0), key=lambda kv: -kv[1])[:3]
    hints = {
        "activations": "actor.activation_checkpointing, actor.max_tokens_per_micro_batch",
        "kv_cache": "rollout.kv_cache_gib (native) or rollout.vllm.kv_cache_gib bound it",
        "engine_weights": "rollout.handoff frees it during the update",
        "logits": "actor.logits_chunk_tokens",
        "optimizer": "actor.offload, or more ranks",
        "load": "model.implementation=hf loads the whole model, copied and cast, per rank",
    }
    for name, value in largest:
        hint = f": {hints[name]}" if name in hints else ""
        lines.append(f"  largest ({phase}): {name.replace('_', ' ')} {value / gib:.1f} GiB{hint}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The Ray layout (trainer.backend=ray): what each part asks of the cluster


@dataclass(frozen=True)
class RayLayout:
    """The logical resources of each Ray actor and each placement-group bundle (`dapo.backends.ray` places
    them; `--dry-run` prints them). A rank and a worker take `trainer.ray_cpus_per_actor` CPUs each; on
    CUDA a rank takes one GPU and a worker `rollout.vllm.tensor_parallel_size` (vLLM) or one, and
    colocated, worker i shares rank i % ranks's GPU (half each)."""

    ranks: int
    workers: int
    rank_cpus: float
    rank_gpus: float
    worker_cpus: float
    worker_gpus: float
    trainer_bundles: list[dict[str, float]]
    worker_bundles: list[dict[str, float]]
    """Empty when colocated (the workers sit in the trainer bundles, worker i in bundle i % ranks)."""

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.trainer_bundles + self.worker_bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def ray_layout(cfg: Config, *, cuda: bool) -> RayLayout:
    ranks, workers = cfg.trainer.world_size or 1, cfg.rollout.num_workers
    cpus = float(cfg.trainer.ray_cpus_per_actor)
    colocate = cfg.rollout.colocate
    tp = cfg.rollout.vllm.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
    rank_gpus = (0.5 if colocate else 1.0) if cuda else 0.0
    worker_gpus = (0.5 if colocate else float(tp)) if cuda else 0.0

    def bundle(c: float, g: float) -> dict[str, float]:
        return {"CPU": c, "GPU": g} if g else {"CPU": c}

    trainer_bundles = [bundle(cpus, rank_gpus) for _ in range(ranks)]
    worker_bundles = [bundle(cpus, worker_gpus) for _ in range(workers)]
    if colocate:
        for i in range(workers):
            b = trainer_bundles[i % ranks]
            b["CPU"] += cpus
            if cuda:
                b["GPU"] = 1.0
        worker_bundles = []
    return RayLayout(ranks, workers, cpus, rank_gpus, cpus, worker_gpus, trainer_bundles, worker_bundles)


def format_ray_plan(cfg: Config, *, cuda: bool = True) -> str:
    """The dry-run lines of the Ray layout."""
    lay = ray_layout(cfg, cuda=cuda)

    def res(cpus: float, gpus: float) -> str:
        return f"{cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "")

    place = "colocated with the trainer ranks" if cfg.rollout.colocate else "on resources of their own"
    total = lay.total
    per_round = round_prompts(cfg, 1)
    lines = [
        "Ray layout (trainer.backend=ray; the driver is the single controller):",
        "  driver                            this process: sampler, collector, advantages, logging, "
        "checkpoints",
        f"  trainer ranks                     {lay.ranks} x ({res(lay.rank_cpus, lay.rank_gpus)}): one "
        "torch.distributed world, FSDP2 update",
        f"  rollout workers                   {lay.workers} x ({res(lay.worker_cpus, lay.worker_gpus)}), "
        f"{place}: full weights + {cfg.rollout.engine} engine each",
        f"  prompts per worker per round      <= {math.ceil(per_round / lay.workers)} of {per_round}",
        f"  reward scorers                    {lay.workers} x (0 CPU; {cfg.reward.num_workers} verifier "
        f"process(es) each, {cfg.reward.timeout_s:g} s timeout)",
        f"  cluster resources asked           {res(total.get('CPU', 0.0), total.get('GPU', 0.0))}",
    ]
    args, _ = model_shape(cfg.model.path)
    if args is not None:
        gib = 2.0**30
        e = worker_memory(cfg, args, cuda=cuda)
        tp = lay.worker_gpus if cuda and not cfg.rollout.colocate else 1
        full_length = cfg.data.max_prompt_length + cfg.rollout.max_response_length
        per_gpu = e.weights + e.kv_cache + e.workspace
        where = f", {tp:g} GPUs per worker" if tp > 1 else ""
        lines.append(
            f"  worker memory ({'per GPU' if cuda else 'CPU'}, GiB)     weights {e.weights / gib:.2f} + KV "
            f"cache {e.kv_cache / gib:.2f} + workspace {e.workspace / gib:.2f} = {per_gpu / gib:.2f}{where}; "
            f"<= {e.in_flight} sequences of {full_length} tokens at once"
        )
        total_params, _ = parameter_count(args)
        size = total_params * _DTYPE_BYTES[cfg.model.dtype] / gib
        if cuda:
            limit = cfg.trainer.gpu_memory_gib
            if cfg.rollout.colocate:  # the worker and a trainer rank share the GPU
                rank = rank_memory(cfg, args, lay.ranks, cuda=True, generates=False, full_copy=True)
                need, what = per_gpu + rank.peak, "rollout worker + trainer rank, one shared GPU"
            else:
                need, what = per_gpu, "rollout workers"
            verdict = "FITS" if need <= limit * gib and e.in_flight > 0 else "DOES NOT FIT"
            lines.append(
                f"  {what}: {verdict} in trainer.gpu_memory_gib={limit:g}: peak {need / gib:.1f} GiB"
            )
        host = (
            f"; each worker keeps a copy in host memory ({size:.2f} GiB)"
            if cfg.rollout.engine == "vllm"
            else ""
        )
        # `distributed.weight_sync_device`: NCCL where every member has a GPU of its own, gloo otherwise
        group = "NCCL" if cuda and not cfg.rollout.colocate else "gloo"
        lines.append(
            f"  weight sync per update            {size:.2f} GiB ({cfg.model.dtype}) from trainer rank 0 to "
            f"each worker ({group} broadcast group), streamed from the shards in buckets of "
            f"{cfg.rollout.weight_sync_bucket_mb} MiB{host}"
        )
    return "\n".join(lines)
