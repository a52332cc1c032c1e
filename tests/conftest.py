"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dapo.models import kernels

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
