"""Preemption: SIGTERM or SIGUSR1 → finish the step, write a checkpoint, exit with ``Preempted.exit_code`` (75).

Clusters stop jobs with a signal before they kill them: SLURM sends the signal chosen with
``--signal=USR1@120`` that many seconds before the time limit, Kubernetes sends SIGTERM and waits
its grace period. The handler here only notes the signal; the training loop reads the note
between steps, so the step in progress always completes and the checkpoint is one a straight run
would also have written (resuming from it is bitwise exact, tests/test_preemption.py).

With several processes the ranks must stop after the same step, or the checkpoint would mix
steps and the others would hang in the next step's collective. The signal may reach one rank, all
of them, or each at a different moment, so the ranks combine their notes with one all-reduce. It
is read on the host, so it is not done every step: every ``CHECK_EVERY`` steps, and at log steps
inside the metrics all-reduce that is already there (no extra collective). One process needs no
agreement and reads its note every step, for free.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

import torch

from dcdit_cli.common import processes
from dcdit_cli.common.console import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECK_EVERY = 10
"""Steps between the stop all-reduces of a multi-process run: the largest delay between the signal
and the checkpoint, in steps (about 10 s for a 1 s step, well inside SLURM's and Kubernetes' grace)."""


class StopRequest:
    """The signal a process has received (None: none yet), and the ranks' agreement on it."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGTERM and processes.peer_died():
            processes.on_launcher_sigterm(signum, frame)  # the launcher stops us because a rank died: say which
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def flag(self, device) -> torch.Tensor:
        """This rank's note as a () float tensor: 1.0 once a signal came (summed or averaged over ranks)."""
        return torch.full((), float(self.signal_name is not None), device=device)  # a fill: no host-to-device copy

    def due(self, step: int, world: int) -> bool:
        """Whether ``step`` checks for a stop on its own (not at a log step, where the metrics carry it)."""
        return world == 1 or step % CHECK_EVERY == 0

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank has received a signal (one all-reduce with several ranks)."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        return bool(accelerator.reduce(self.flag(accelerator.device), reduction="sum").item() > 0)


@contextmanager
def listen() -> Iterator[StopRequest]:
    """Notes SIGTERM and SIGUSR1 while the block runs; the previous handlers come back after it.

    When the block stops the run (:class:`Preempted`), both signals are ignored from then on
    instead: the process is exiting on purpose, and a second signal must not cut that short. (A
    launcher sends SIGTERM to the ranks still running as soon as one rank exits with a code other
    than 0, so rank 0 gets one while it reports.)
    """
    request = StopRequest()
    previous = {sig: signal.signal(sig, request._on_signal) for sig in SIGNALS}
    try:
        yield request
    except Preempted:
        previous = dict.fromkeys(SIGNALS, signal.SIG_IGN)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
