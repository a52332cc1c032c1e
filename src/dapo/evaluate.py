"""Evaluation: avg@k, pass@k and maj@k per data source (the paper's protocol: k = 32, temperature 1.0, top-p
0.7).

Every prompt row is evaluated on its own with k samples: rows are never deduplicated (AIME 2024's reference
file repeats each problem 32 times on purpose, so avg over its 960 rows is the paper's avg@32), and those
copies are not taken to be the k samples either. Metrics are means over rows:
- avg@k: the mean accuracy of the k samples (the expected accuracy of one sample);
- pass@k: 1 if any of the k samples is correct;
- maj@k: 1 if the most frequent normalised prediction among the k is correct (ties: the one seen first);
- pass@j for j = 1, 2, 4, ... < k: the unbiased estimator from the k samples (`dapo.stats.pass_at_k`);
- avg@k_ci95_low / _high: the 95% percentile-bootstrap interval of avg@k, resampling problems (a problem's
  copies, rows with the same prompt, count once, with their mean; seeded: the same scores give the same
  interval).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapo.config import Config
from dapo.data.prompts import PromptSet, load_examples_for, tokenize_prompts
from dapo.models.load import load_policy
from dapo.models.tokenizer import stop_token_ids
from dapo.rewards import RewardResult, ScoreBatch
from dapo.rewards.pool import make_reward_pool
from dapo.rollout import make_engine
from dapo.rollout.base import RolloutEngine, SamplingParams
from dapo.stats import bootstrap_mean_ci, pass_at_k, problem_means

Scorer = Callable[[Sequence[str], Sequence[str]], ScoreBatch]


@dataclass(frozen=True)
class RowScores:
    """The k scored samples of one prompt row; rows with equal `problem` are copies of one problem (None:
    a problem of its own)."""

    data_source: str
    results: list[RewardResult]
    lengths: list[int]
    problem: Hashable | None = None

    def avg(self) -> float:
        return sum(r.acc for r in self.results) / len(self.results)

    def passed(self) -> float:
        return float(any(r.acc for r in self.results))

    def pass_at(self, k: int) -> float:
        return pass_at_k(len(self.results), sum(r.acc for r in self.results), k)

    def majority(self) -> float:
        votes = Counter(r.pred for r in self.results)
        top = votes.most_common(1)[0][0]  # Counter keeps first-seen order among equal counts
        return float(next(r.acc for r in self.results if r.pred == top))


CI_LOW, CI_HIGH = "_ci95_low", "_ci95_high"


def summarize(rows: Sequence[RowScores], k: int) -> dict[str, float]:
    """`eval/<source>/avg@k` (with `avg@k_ci95_low` / `_high`), `pass@k`, `pass@j` (j = 1, 2, 4, ... < k),
    `maj@k`, `response_length`, `rows`, `problems` per source and over all rows."""
    metrics: dict[str, float] = {}
    sources = sorted({r.data_source for r in rows})
    groups = [(s, [r for r in rows if r.data_source == s]) for s in sources]
    if len(sources) > 1:
        groups.append(("all", list(rows)))
    for source, part in groups:
        n = len(part)
        avgs = [r.avg() for r in part]
        per_problem = problem_means(
            avgs, [("row", i) if r.problem is None else r.problem for i, r in enumerate(part)]
        )
        low, high = bootstrap_mean_ci(per_problem, level=0.95)
        metrics[f"eval/{source}/avg@{k}"] = sum(avgs) / n
        metrics[f"eval/{source}/avg@{k}{CI_LOW}"] = low
        metrics[f"eval/{source}/avg@{k}{CI_HIGH}"] = high
        metrics[f"eval/{source}/pass@{k}"] = sum(r.passed() for r in part) / n
        j = 1
        while j < k:
            metrics[f"eval/{source}/pass@{j}"] = sum(r.pass_at(j) for r in part) / n
            j *= 2
        metrics[f"eval/{source}/maj@{k}"] = sum(r.majority() for r in part) / n
        lengths = [x for r in part for x in r.lengths]
        metrics[f"eval/{source}/response_length"] = sum(lengths) / len(lengths)
        metrics[f"eval/{source}/rows"] = float(n)
        metrics[f"eval/{source}/problems"] = float(len(per_problem))
    return metrics


def evaluate(
    engine: RolloutEngine,
    prompts: Sequence[list[int]],
    answers: Sequence[str],
    data_sources: Sequence[str],
    scorer: Scorer,
    decode: Callable[[list[int]], str],
    sampling: SamplingParams,
    *,
    prompts_per_batch: int = 64,
) -> dict[str, float]:
    """Sample `sampling.n` (= k) responses per prompt row, score them, and summarise (see the module
    docstring)."""
    if not prompts:
        raise ValueError("evaluation set is empty")
    rows: list[RowScores] = []
    for lo in range(0, len(prompts), prompts_per_batch):
        hi = min(lo + prompts_per_batch, len(prompts))
        batch_sampling = dataclasses.replace(sampling, first_prompt_index=sampling.first_prompt_index + lo)
        completions = engine.generate(list(prompts[lo:hi]), batch_sampling)
        texts = [decode(c.token_ids) for c in completions]
        truths = [answers[lo + c.prompt_index] for c in completions]
        scored = scorer(texts, truths)
        k = sampling.n
        for j in range(hi - lo):
            part = slice(j * k, (j + 1) * k)
            rows.append(
                RowScores(
                    data_source=data_sources[lo + j],
                    results=scored.results[part],
                    lengths=[len(c.token_ids) for c in completions[part]],
                    problem=tuple(prompts[lo + j]),
                )
            )
    return summarize(rows, sampling.n)


def eval_sampling(cfg: Config, tokenizer: Any, k: int | None = None) -> SamplingParams:
    ev = cfg.evaluation
    return SamplingParams(
        n=k or ev.k,
        temperature=ev.temperature,
        top_p=ev.top_p,
        max_tokens=ev.max_response_length or cfg.rollout.max_response_length,
        stop_token_ids=stop_token_ids(tokenizer),
        seed=cfg.trainer.seed + 7919,  # evaluation samples are the same at every evaluation of a run
    )


def load_eval_set(cfg: Config, tokenizer: Any, files: list[str] | None = None) -> PromptSet:
    examples = load_examples_for(files or cfg.evaluation.files, cfg.data, split="eval", dedup=False)
    if cfg.evaluation.max_prompts:
        examples = examples[: cfg.evaluation.max_prompts]
    return tokenize_prompts(examples, tokenizer, cfg.data.max_prompt_length)


def format_eval(metrics: dict[str, float]) -> str:
    """One line: avg@k [95% CI], pass@k and maj@k of each source."""
    parts = []
    for key, value in metrics.items():
        name = key.removeprefix("eval/")
        metric = name.rsplit("/", 1)[-1]
        if not metric.startswith(("avg@", "pass@", "maj@")) or metric.endswith((CI_LOW, CI_HIGH)):
            continue
        k = metric.split("@")[1]
        if metric.startswith("pass@") and f"{key.rsplit('/', 1)[0]}/avg@{k}" not in metrics:
            continue  # pass@j for j < k: in the metrics, not on the line
        ci = ""
        if key + CI_LOW in metrics:
            ci = f" [{metrics[key + CI_LOW]:.3f}, {metrics[key + CI_HIGH]:.3f}]"
        parts.append(f"{name}={value:.3f}{ci}")
    return "  ".join(parts)


def format_protocol(
    sampling: SamplingParams, rows: int, cfg: Config, *, too_long: int = 0, config_name: str = ""
) -> str:
    """The evaluation protocol on one line: k, temperature, top-p, response budget and the rows evaluated."""
    which = f"the first {rows} (evaluation.max_prompts)" if cfg.evaluation.max_prompts else f"all {rows}"
    skipped = f" ({too_long} longer ones skipped)" if too_long else ""
    source = f" ({config_name})" if config_name else ""
    return (
        f"protocol{source}: k={sampling.n} samples per row, temperature {sampling.temperature}, "
        f"top-p {sampling.top_p}, response budget {sampling.max_tokens:,} tokens; rows: {which}, "
        f"prompts <= {cfg.data.max_prompt_length:,} tokens{skipped}"
    )


def evaluate_checkpoint(
    cfg: Config,
    *,
    model_path: str,
    data_files: list[str],
    k: int | None = None,
    config_name: str = "",
    adapter: str | None = None,
) -> dict[str, float]:
    """`dapo eval`: load a checkpoint directory (with ``adapter``: plus a LoRA adapter directory, unmerged)
    and evaluate it on the given files; prints the protocol, then the metrics, and returns them.
    `config_name` names where the protocol came from (a preset)."""
    model, tokenizer, model_dir = load_policy(cfg.model, path=model_path)
    if adapter is not None:
        from dapo.models.lora import load_adapter

        load_adapter(model, Path(adapter))
        model.eval()
    prompts = load_eval_set(cfg, tokenizer, data_files)
    engine = make_engine(cfg.rollout, model, tokenizer, longest=cfg.longest_sequence())
    sampling = eval_sampling(cfg, tokenizer, k)
    protocol = format_protocol(
        sampling, len(prompts), cfg, too_long=prompts.num_too_long, config_name=config_name
    )
    print(protocol, flush=True)  # before generation: a paper-protocol evaluation takes long
    with make_reward_pool(cfg.reward) as pool:
        metrics = evaluate(
            engine,
            prompts.prompt_ids,
            prompts.answers,
            prompts.data_sources,
            pool.score,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            sampling,
        )
    print(f"{model_dir}: {len(prompts)} prompt rows x k={sampling.n} samples")
    for key, value in metrics.items():
        if key.endswith((CI_LOW, CI_HIGH)):
            continue
        ci = ""
        if key + CI_LOW in metrics:
            low, high = metrics[key + CI_LOW], metrics[key + CI_HIGH]
            ci = f"  95% CI [{low:.4f}, {high:.4f}] (bootstrap over problems)"
        print(f"  {key.removeprefix('eval/'):<40} {value:.4f}{ci}")
    return metrics
