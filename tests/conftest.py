"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dapo.models import kernels

# The embedded default trains with actor.precision=auto (bf16-mixed where a machine's timing finds it
# faster): the suite pins float32 training, so its tolerances hold on every CPU (subprocesses inherit it).
# The auto choice itself is tested in tests/test_kernels.py; bf16-mixed in test_train / test_e2e.
os.environ.setdefault(kernels.ENV, "precision=model")

KERNEL_PATHS: dict[str, dict[str, str]] = {
    "measured": {},  # as chosen on this machine (timed once, cached)
    "onednn": {"linear": "onednn", "inference": "onednn", "attention": "float32", "decode": "matmul"},
    "aten": {"linear": "aten", "inference": "aten", "attention": "native", "decode": "sdpa"},
}
"""Every candidate of every `dapo.models.kernels` choice, in two forced sets, and the measured choice."""


@pytest.fixture(params=list(KERNEL_PATHS))
def kernel_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per kernel path (``pytestmark = pytest.mark.usefixtures("kernel_path")``)."""
    with kernels.forced(**KERNEL_PATHS[request.param]):
        yield request.param
