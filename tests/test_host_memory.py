"""Large CPU tensors on huge pages (dcdit_cli/common/host_memory.py): a large tensor allocated again is not
page-faulted in 4 KiB at a time, the dcdit command runs that way and env.json says what really
happened, and a user's own setting wins."""

import json
import os
import subprocess
import sys

import pytest

from dcdit_cli.common.host_memory import ENV, kernel_thp_mode

# In "always" mode the kernel gives huge pages whatever the switch says; in "never"/"disabled" it never does.
needs_madvise = pytest.mark.skipif(kernel_thp_mode() != "madvise", reason="needs the kernel's THP in madvise mode")

# Allocate and fill a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) twice, freeing it
# in between; print the minor page faults of the second round and what env.json would record.
# argv[1]: "huge" calls use_huge_pages() first, "late" after a first small tensor, "small" never.
PROBE = """
import resource, sys
from dcdit_cli.common.host_memory import host_allocator, use_huge_pages
if sys.argv[1] == "huge":
    use_huge_pages()
import torch
torch.zeros(1)
if sys.argv[1] == "late":
    use_huge_pages()
x = torch.ones(16 * 2**20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, host_allocator())
"""


def _environment(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k != ENV}, "OMP_NUM_THREADS": "1", **extra}


def _probe(mode: str, **extra) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=_environment(**extra)).stdout.split(maxsplit=1)
    return int(out[0]), out[1].strip()


@needs_madvise
def test_a_large_tensor_is_not_faulted_in_page_by_page():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    faults, state = _probe("small")
    assert faults > pages // 2 and state.startswith("4 KiB")  # glibc unmapped it: every page faulted in again
    faults, state = _probe("huge")
    assert faults < pages // 8 and state.startswith("huge pages")
    faults, state = _probe("huge", **{ENV: "0"})  # the user's own setting wins
    assert faults > pages // 2 and state.startswith("4 KiB")
    faults, state = _probe("late")  # too late to take effect: the record says so
    assert faults > pages // 2 and state.startswith("4 KiB") and "after the process's first tensor" in state


@needs_madvise
def test_the_dcdit_command_uses_huge_pages_and_records_it(tmp_path):
    subprocess.run([sys.executable, "-m", "dcdit_cli", "train", "--recipe", "tiny", "--set", "train.max_steps=1",
                    "--out", str(tmp_path / "run")], check=True, capture_output=True, env=_environment())
    assert json.loads((tmp_path / "run" / "env.json").read_text())["host_allocator"].startswith("huge pages")


def test_peak_growth_sees_a_call_that_stays_below_an_earlier_peak():
    """The benchmarks' peak memory of one call (``peak_growth_mib``: perf.py scaffold, train_speed.py,
    eval_metrics.py): an earlier, higher peak of the process, such as building the call's inputs,
    must not hide the call's own (the growth of ru_maxrss alone reads 0 here); the call's result
    comes back with it."""
    code = ("import torch\n"
            "from dcdit_cli.common.host_memory import peak_growth_mib\n"
            "big = torch.ones(2**26); del big  # a 256 MiB peak first\n"
            "total, mib = peak_growth_mib(lambda: torch.ones(2**24).sum())  # a 64 MiB call\n"
            "print(int(total), mib)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_environment(**{ENV: "0"}))
    assert out.returncode == 0, out.stderr[-2000:]
    total, mib = out.stdout.split()
    assert int(total) == 2**24 and 56 < float(mib) < 80
