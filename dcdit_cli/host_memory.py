"""Large CPU tensors on transparent huge pages, so a step does not page-fault its memory in 4 KiB at a time.

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every free a ``free``.
glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with a
fresh ``mmap`` and unmaps them when freed, so each (B, L, D) activation above 32 MiB is faulted
in again, one 4 KiB page at a time, on every forward: ~105,000–114,000 page faults per call of
the scaffold at 64² (batch 8, width 256), which made it 4.9–7.3× slower than at 32² where ~4× is
linear (docs/performance.md, ``benchmarks/perf.py scaffold``).

PyTorch's own switch ``THP_MEM_ALLOC_ENABLE=1`` (c10's CPU allocator) aligns allocations of
2 MiB and more to 2 MiB and advises the kernel to back them with transparent huge pages: one
fault per 2 MiB instead of 512, and no change in what memory is kept. (Making glibc keep freed
memory with ``mallopt`` removed the faults as well, but let the heap grow by several copies of a
large tensor before reusing it.) The switch is read once, at the process's first large
allocation, so :func:`use_huge_pages` runs first thing in the ``dcdit`` command; a user's own
``THP_MEM_ALLOC_ENABLE=0`` wins. It needs a Linux kernel with THP in ``madvise`` or ``always``
mode; elsewhere it changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "THP_MEM_ALLOC_ENABLE"
KERNEL_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def use_huge_pages() -> None:
    """Turn on PyTorch's huge-page CPU allocations unless the environment already says otherwise."""
    os.environ.setdefault(ENV, "1")


def kernel_thp_mode() -> str:
    """The kernel's THP mode (``always``, ``madvise``, ``never``), or ``unavailable``."""
    try:
        text = KERNEL_SETTING.read_text()
    except OSError:
        return "unavailable"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "unavailable"


def host_allocator() -> str:
    """What a run's env.json records: whether large CPU tensors get huge pages in this process."""
    mode = kernel_thp_mode()
    if os.environ.get(ENV) == "1" and mode in ("always", "madvise"):
        return f"huge pages for tensors >= 2 MiB ({ENV}=1, kernel THP {mode})"
    return f"4 KiB pages ({ENV}={os.environ.get(ENV, 'unset')}, kernel THP {mode})"
