"""Data: dataset readers (validation, deduplication), the DAPO prompt template, the resumable sampler."""

from dapo.data.dataset import (
    DataError,
    DataWarning,
    Example,
    LoadedDataset,
    Message,
    ReaderSettings,
    load_examples,
    load_many,
)
from dapo.data.sampler import PromptSampler
from dapo.data.templates import DAPO_TEMPLATE, apply_dapo_template, is_templated, strip_dapo_template

__all__ = [
    "DAPO_TEMPLATE",
    "DataError",
    "DataWarning",
    "Example",
    "LoadedDataset",
    "Message",
    "PromptSampler",
    "ReaderSettings",
    "apply_dapo_template",
    "is_templated",
    "load_examples",
    "load_many",
    "strip_dapo_template",
]
