"""Prompt sets: the examples a config's files name (``arithmetic``: the built-in task) and their
chat-templated prompt token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dapo.config import DataConfig
from dapo.data.dataset import Example, ReaderSettings, load_many

BUILTIN_TASK = "arithmetic"
"""The embedded default's task."""
BUILTIN_TASKS = ("arithmetic", "countdown")
"""The names in ``data.train_files`` / ``evaluation.files`` that are generated tasks, not files."""
TRAIN_PROBLEMS = 50_000  # distinct training problems drawn from a task's endless stream
HELDOUT_PROBLEMS = 300


def builtin_task(name: str, seed: int = 0, levels: tuple[int, ...] | None = None) -> Any:
    """The generator of built-in task ``name`` (`ArithmeticTask` or `CountdownTask`: the same interface)."""
    from dapo.data.countdown import CountdownTask
    from dapo.data.synthetic import ArithmeticTask

    tasks: dict[str, Any] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}
    if name not in tasks:
        raise ValueError(f"unknown built-in task {name!r}; allowed: {', '.join(tasks)}")
    return tasks[name](seed) if levels is None else tasks[name](seed, levels)


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
    """Examples from files, where "arithmetic" and "countdown" are the built-in tasks (their train or
    held-out split)."""
    examples: list[Example] = []
    paths = [f for f in files if f not in BUILTIN_TASKS]
    for name in BUILTIN_TASKS:
        if name in files:
            task = builtin_task(name)
            if split == "train":
                problems = task.train_problems(TRAIN_PROBLEMS)
            else:
                problems = task.heldout_problems(HELDOUT_PROBLEMS)
            examples += task.to_examples(problems, split)
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
    from dapo.models.tokenizer import apply_chat_templates

    kept: list[Example] = []
    ids: list[list[int]] = []
    too_long = 0
    for e, tokens in zip(
        examples, apply_chat_templates(tokenizer, [e.chat_messages() for e in examples]), strict=True
    ):
        if len(tokens) > max_prompt_length:
            too_long += 1
            continue
        kept.append(e)
        ids.append(tokens)
    return PromptSet(examples=kept, prompt_ids=ids, num_too_long=too_long)
