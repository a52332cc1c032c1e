"""Evaluation: avg@k, pass@k and maj@k per data source (the paper's protocol: k = 32, temperature 1.0, top-p
0.7).

Every prompt row is evaluated on its own with k samples: rows are never deduplicated (AIME 2024's reference
file repeats each problem 32 times on purpose, so avg over its 960 rows is the paper's avg@32), and those
copies are not taken to be the k samples either. Metrics are means over rows:
- avg@k: the mean accuracy of the k samples (the expected accuracy of one sample);
- pass@k: 1 if any of the k samples is correct;
- maj@k: 1 if the most frequent normalised prediction among the k is correct (ties: the one seen first).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dapo import components
from dapo.config import Config
from dapo.rewards import RewardResult, ScoreBatch
from dapo.rollout.base import RolloutEngine, SamplingParams

Scorer = Callable[[Sequence[str], Sequence[str]], ScoreBatch]


@dataclass(frozen=True)
class RowScores:
    """The k scored samples of one prompt row."""

    data_source: str
    results: list[RewardResult]
    lengths: list[int]

    def avg(self) -> float:
        return sum(r.acc for r in self.results) / len(self.results)

    def passed(self) -> float:
        return float(any(r.acc for r in self.results))

    def majority(self) -> float:
        votes = Counter(r.pred for r in self.results)
        top = votes.most_common(1)[0][0]  # Counter keeps first-seen order among equal counts
        return float(next(r.acc for r in self.results if r.pred == top))


def summarize(rows: Sequence[RowScores], k: int) -> dict[str, float]:
    """`eval/<source>/avg@k`, `pass@k`, `maj@k`, `response_length`, `rows` per source and over all rows."""
    metrics: dict[str, float] = {}
    sources = sorted({r.data_source for r in rows})
    groups = [(s, [r for r in rows if r.data_source == s]) for s in sources]
    if len(sources) > 1:
        groups.append(("all", list(rows)))
    for source, part in groups:
        n = len(part)
        metrics[f"eval/{source}/avg@{k}"] = sum(r.avg() for r in part) / n
        metrics[f"eval/{source}/pass@{k}"] = sum(r.passed() for r in part) / n
        metrics[f"eval/{source}/maj@{k}"] = sum(r.majority() for r in part) / n
        lengths = [x for r in part for x in r.lengths]
        metrics[f"eval/{source}/response_length"] = sum(lengths) / len(lengths)
        metrics[f"eval/{source}/rows"] = float(n)
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
        seed = None if sampling.seed is None else sampling.seed + lo
        batch_sampling = dataclasses.replace(sampling, seed=seed)
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
        stop_token_ids=components.stop_token_ids(tokenizer),
        seed=cfg.trainer.seed + 7919,  # evaluation samples are the same at every evaluation of a run
    )


def load_eval_set(cfg: Config, tokenizer: Any, files: list[str] | None = None) -> components.PromptSet:
    examples = components.load_examples_for(
        files or cfg.evaluation.files, cfg.data, split="eval", dedup=False
    )
    if cfg.evaluation.max_prompts:
        examples = examples[: cfg.evaluation.max_prompts]
    return components.tokenize_prompts(examples, tokenizer, cfg.data.max_prompt_length)


def format_eval(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items() if "@" in k)


def evaluate_checkpoint(
    cfg: Config, *, model_path: str, data_files: list[str], k: int | None = None
) -> dict[str, float]:
    """`dapo eval`: load a checkpoint directory and evaluate it on the given files; prints and returns
    metrics."""
    model, tokenizer, model_dir = components.load_policy(cfg.model, path=model_path)
    prompts = load_eval_set(cfg, tokenizer, data_files)
    engine = components.make_engine(cfg.rollout, model, tokenizer)
    sampling = eval_sampling(cfg, tokenizer, k)
    with components.make_reward_pool(cfg.reward) as pool:
        metrics = evaluate(
            engine,
            prompts.prompt_ids,
            prompts.answers,
            prompts.data_sources,
            pool.score,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            sampling,
        )
    print(
        f"{model_dir}: {len(prompts)} prompt rows x k={sampling.n} samples "
        f"(temperature {sampling.temperature}, top-p {sampling.top_p})"
    )
    for key, value in metrics.items():
        print(f"  {key.removeprefix('eval/'):<40} {value:.4f}")
    return metrics
