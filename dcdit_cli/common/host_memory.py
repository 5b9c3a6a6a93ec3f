"""Large CPU tensors on transparent huge pages, so a step does not page-fault its memory in 4 KiB at a time.

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every free a ``free``.
glibc serves allocations above its mmap threshold (128 KiB at start, raised as mapped blocks are
freed, at most 32 MiB on 64-bit) with a fresh ``mmap`` and unmaps them when freed, so large
activations are faulted in again, one 4 KiB page at a time, on every forward: 105,000–114,000
page faults per call of the scaffold at 64² (batch 8, width 256), which made it ×4.1–7.3 slower
than at 32² where ×4 is linear (docs/performance.md, ``benchmarks/perf.py scaffold``).

PyTorch's own switch ``THP_MEM_ALLOC_ENABLE=1`` (c10's CPU allocator) page-aligns allocations
of 2 MiB and more and advises the kernel (``madvise(MADV_HUGEPAGE)``) to back them with
transparent huge pages: a 64 MiB tensor filled a second time takes ~550 faults instead of
~16,400, and no memory is kept that the default would free. (Making glibc keep freed memory with
``mallopt`` removed the faults as well, but let the heap grow by six copies of a 64 MiB tensor
before reusing one.) PyTorch reads the switch once, at the process's first CPU allocation of any
size, so :func:`use_huge_pages` runs in the ``dcdit`` command before torch is imported; a user's
own ``THP_MEM_ALLOC_ENABLE=0`` wins. It needs a Linux kernel with THP in ``madvise`` mode (in
``always`` mode every large mapping gets huge pages anyway); elsewhere it changes nothing.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

ENV = "THP_MEM_ALLOC_ENABLE"
KERNEL_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROCESS_STATUS = Path("/proc/self/status")
PROCESS_CLEAR_REFS = Path("/proc/self/clear_refs")
THRESHOLD = 2 * 2**20  # c10's huge-page threshold (bytes)


def use_huge_pages() -> None:
    """Turn on PyTorch's huge-page CPU allocations unless the environment already says otherwise.

    Call it before the process creates its first tensor: PyTorch reads the switch only then.
    """
    os.environ.setdefault(ENV, "1")


def kernel_thp_mode() -> str:
    """The kernel's THP mode for this process: ``always``, ``madvise``, ``never``, ``disabled`` (by
    ``prctl(PR_SET_THP_DISABLE)``) or ``unavailable``."""
    try:
        if "THP_enabled:\t0" in PROCESS_STATUS.read_text():
            return "disabled"
        text = KERNEL_SETTING.read_text()
    except OSError:
        return "unavailable"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "unavailable"


def torch_advises_huge_pages() -> bool:
    """Whether this process's PyTorch took the switch: on its huge-page path c10 page-aligns every
    allocation of 2 MiB or more, otherwise it aligns to 64 bytes (three probes: a chance alignment
    of all three is ~4e-6)."""
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    probes = [torch.empty(THRESHOLD + k * 4160, dtype=torch.uint8) for k in range(1, 4)]
    return all(t.data_ptr() % page == 0 for t in probes)


def host_allocator() -> str:
    """What a run's env.json records: whether large CPU tensors really get huge pages in this process."""
    mode = kernel_thp_mode()
    if mode == "always":
        return "huge pages for large mappings (kernel THP always)"
    setting = os.environ.get(ENV, "unset")
    if mode == "madvise":
        if torch_advises_huge_pages():
            return f"huge pages for tensors >= 2 MiB ({ENV}=1, kernel THP madvise)"
        if setting == "1":
            setting = "1 but set after the process's first tensor"
    return f"4 KiB pages ({ENV}={setting}, kernel THP {mode})"


def _status_kib(field: str) -> int:
    with PROCESS_STATUS.open() as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_growth_mib(fn):
    """(fn(), the MiB by which the process's resident memory grows at its peak during the call).

    The benchmarks' peak-memory figures. On Linux the kernel's high-water mark is reset to the
    current resident size just before the call (``/proc/self/clear_refs``), so an earlier, higher
    peak of the process (building the call's inputs, say) does not hide the call's own; elsewhere
    the growth of ``ru_maxrss``, which such an earlier peak can hide.
    """
    try:
        PROCESS_CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        result = fn()
        return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    before = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - before) / 1024
