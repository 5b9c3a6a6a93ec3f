"""Rank-0 console output, progress bars, the metrics writer and the error type.

Every user-facing failure is a :class:`DcditError`: the CLI prints its message as one
red line and exits with code 2. Library code raises it with a message that names the
problem *and* the fix; it never prints tracebacks for bad input.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class DcditError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


class Preempted(Exception):
    """The run stopped on a scheduler's signal after checkpointing: one line and ``exit_code``
    (docs/reliability.md#preemption); rerunning the command resumes."""

    exit_code = 75  # sysexits' EX_TEMPFAIL, "try again later": what a requeue script tests for


console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def load_error_reason(error: BaseException) -> str:
    """A short, safe description of why a file could not be read: never torch's advice to
    unpickle it anyway, never terminal escape codes."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds Python objects other than tensors, and dcdit never unpickles those (no code from a file runs)"
    text = one_line(str(error)) or type(error).__name__
    return text if len(text) <= 160 else text[:159] + "…"


def is_main_process() -> bool:
    """True on rank 0 (or when not launched by a distributed launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only."""
    if is_main_process():
        console.print(*args, **kwargs)


def print_table(table) -> None:
    """A rich table on rank 0; into a log or a pipe at its natural width (up to 240 columns), since
    rich would otherwise fold it to the 80 columns it assumes without a terminal and cut numbers."""
    if not is_main_process():
        return
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=240, highlight=False).print(table)


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|[\x00-\x08\x0b-\x1f\x7f]")


def one_line(message: str) -> str:
    """``message`` as one plain line: terminal escape codes and control characters removed,
    line breaks folded. The result is printed as text, never parsed as rich markup."""
    return " ".join(_ANSI.sub("", str(message)).split())


def _stderr_line(label: str, style: str, message: str) -> None:
    err_console.print(Text.assemble((label, style), " ", one_line(message)), soft_wrap=True)


def error_line(message: str) -> None:
    """The one line a failed command prints on stderr: ``error: <problem>: <fix>``."""
    _stderr_line("error:", "bold red", message)


def stopped_line(message: str) -> None:
    """The one line a preempted run prints on stderr (rank 0 only)."""
    if is_main_process():
        _stderr_line("stopped:", "bold yellow", message)


def warn(message: str) -> None:
    """A one-line warning on stderr (rank 0 only)."""
    if is_main_process():
        _stderr_line("warning:", "bold yellow", message)


@contextmanager
def progress_bar(description: str = "", *, disable: bool = False, extra: str = "") -> Iterator[Progress]:
    """A rich progress bar with count, rate-friendly columns and ETA (rank 0 only).

    ``extra`` is a format string rendered from the task's fields, e.g. ``"{task.fields[loss]}"``.
    When stdout is not a terminal the bar is disabled; callers log plain lines instead.
    """
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    progress = Progress(
        *columns,
        console=console,
        disable=disable or not is_main_process() or not console.is_terminal,
        transient=False,
    )
    with progress:
        yield progress


class RateMeter:
    """Items per second since construction (or since the last ``reset``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def update(self, n: int) -> float:
        """Counts ``n`` more items; returns the rate (items per second), for the caller to format."""
        self.count += n
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.count / elapsed


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, record: dict) -> None:
        """One ``write`` call on an append-only descriptor: a killed run never leaves half a line."""
        if not is_main_process():
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        finally:
            os.close(fd)


def plain_log(message: str) -> None:
    """A plain log line on stderr when stdout is not a terminal (CI, log files); stdout stays for results."""
    if is_main_process() and not console.is_terminal:
        print(message, file=sys.stderr, flush=True)
