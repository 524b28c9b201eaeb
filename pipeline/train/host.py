"""The training process's own setup, before any tensor exists."""

from __future__ import annotations

import ctypes


def keep_freed_memory_for_reuse() -> None:
    """Pin glibc's malloc thresholds: blocks up to 64 MiB come from the heap, and freed memory is
    kept for reuse (trimmed only beyond 256 MiB).

    By default glibc serves big blocks (activations, gradients) with mmap and returns them to the
    OS when freed, under a threshold that moves with the allocation history, so the same loop
    can page-fault every step's tensors in afresh: 15,000 faults a step against 2,900 here, 12 %
    slower on 2 cores, depending only on what ran before the loop. Linux/glibc only; elsewhere
    (or with another allocator preloaded) this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
