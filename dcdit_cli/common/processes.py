"""When one process of a multi-process run dies: stop the others and say so in one line.

The launcher (``accelerate launch`` / ``torchrun``) notices a dead worker and sends SIGTERM
to the others; a rank blocked in a collective gets a ``torch.distributed.DistError`` as soon
as its peer's socket closes. Either way the surviving rank ends with a :class:`RankFailure`
(a :class:`DcditError`) that names the dead rank, found among the process ids gathered at
start, and the command that resumes the run from its newest intact checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from dcdit_cli.common.console import DcditError

try:
    from torch.distributed import DistError
except ImportError:  # pragma: no cover: a torch build without distributed support
    DistError = ()  # isinstance(error, ()) is always False


class RankFailure(DcditError):
    """Another process of the run died; this one stopped."""


class RankWatch:
    """The run's process ids by rank (one machine: ids are checked in /proc), the resume command."""

    def __init__(self, pids: list[int], rank: int, command: str) -> None:
        self.pids, self.rank, self.command = pids, rank, command

    def dead_ranks(self) -> list[int]:
        return [r for r, pid in enumerate(self.pids) if r != self.rank and not _alive(pid)]

    def failure(self, cause: str, grace: float = 2.0) -> RankFailure:
        """The one-line report; ``grace`` seconds to see the dead rank go: a killed process closes its
        sockets (so a peer's collective fails) a moment before it becomes a zombie, and a loaded
        machine can schedule the peer inside that moment."""
        dead, deadline = self.dead_ranks(), time.monotonic() + grace
        while not dead and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = self.dead_ranks()
        who = f"rank {', '.join(map(str, dead))}" if dead else "another rank"
        return RankFailure(
            f"{who} of {len(self.pids)} stopped ({cause}), so rank {self.rank} stopped too: resume with the same "
            f"command, `{self.command or 'the same dcdit command'}` (it continues from the newest intact checkpoint)"
        )


_watch: RankWatch | None = None


def _alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (killed, not yet reaped by the launcher)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def peer_died() -> bool:
    """True when a multi-process run is watched and another of its ranks is gone."""
    return _watch is not None and bool(_watch.dead_ranks())


def on_launcher_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one report, even if the launcher repeats itself
    raise _watch.failure("the launcher stopped this one")


def watch_ranks(accelerator, command: str) -> None:
    """Gathers every rank's process id and turns SIGTERM into a :class:`RankFailure` (multi-process runs)."""
    global _watch
    if accelerator.num_processes < 2:
        return
    pids = accelerator.gather(torch.tensor([os.getpid()], device=accelerator.device)).tolist()
    _watch = RankWatch([int(p) for p in pids], accelerator.process_index, command)
    signal.signal(signal.SIGTERM, on_launcher_sigterm)


def explain(error: BaseException) -> RankFailure | None:
    """A :class:`RankFailure` for a collective that failed because a peer died, else None."""
    if _watch is None:
        return None
    if isinstance(error, DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error).lower()):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's SIGTERM must not cut the report short
        return _watch.failure(f"a collective failed: {type(error).__name__}")
    return None
