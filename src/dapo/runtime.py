"""The process's runtime: which device "auto" means here, and how the C allocator keeps freed memory."""

from __future__ import annotations

import ctypes
import functools
import sys

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
