"""The one error path: whatever stops a command becomes one line on stderr and an exit code.

- a :class:`DcditError` (bad recipe, option, checkpoint, data or output path): its message, exit 2;
- a usage error from the command line parser (unknown command or option, bad value): one
  line with a did-you-mean, exit 2;
- a foreseeable library error at the edges (file system, decoding, a refused pickle, a
  collective whose peer died): one line naming the problem and the fix, exit 2;
- a :class:`Preempted` run (a scheduler's SIGTERM or SIGUSR1, checkpoint written): one line, exit 75;
- anything else is a dcdit bug: one short line and the path of a log file holding the
  traceback, exit 1. The terminal never gets a traceback.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import typer

from dcdit_cli.common.console import DcditError, Preempted, error_line, load_error_reason, one_line, stopped_line

BAD_INPUT, BUG, INTERRUPTED, PREEMPTED = 2, 1, 130, Preempted.exit_code


def _usage_line(error) -> str:
    """A parser usage error as one line, with a did-you-mean for an unknown command or option."""
    message = one_line(error.format_message())
    ctx = getattr(error, "ctx", None)
    typo = getattr(error, "option_name", None)
    if typo and not re.search(r"did you mean|possible options", message, re.I) and ctx is not None:
        names = [o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts)]
        close = difflib.get_close_matches(typo, names, n=1, cutoff=0.5)
        message += f" (did you mean {close[0]}?)" if close else ""
    unknown = re.match(r"No such command '([^']+)'\.?", message)
    if unknown and "did you mean" not in message.lower() and ctx is not None:
        message += f" (commands: {', '.join(ctx.command.list_commands(ctx))})"
    where = ctx.command_path if ctx is not None else "dcdit"
    return f"{message.rstrip('.')}. See `{where} --help`."


def _edge_line(error: BaseException) -> str | None:
    """One line for a foreseeable library error, or None for a genuine bug."""
    if isinstance(error, pickle.UnpicklingError):
        return f"a file was refused: {load_error_reason(error)}; pass a checkpoint that holds only tensors"
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({load_error_reason(error)}): save it as UTF-8"
    if isinstance(error, (IsADirectoryError, NotADirectoryError, FileNotFoundError, PermissionError, FileExistsError)):
        return f"{error.filename}: {error.strerror}: check the path (and that its folders are folders you can write)"
    if isinstance(error, OSError) and error.errno is not None:
        return f"{error.filename or 'a file'}: {error.strerror}: check the disk (free space, permissions) and rerun"
    if isinstance(error, (zipfile.BadZipFile, EOFError)):
        return f"a file is truncated or not what it claims to be ({load_error_reason(error)}): re-create it"
    if "dcdit_cli.common.processes" in sys.modules:  # a collective failed because a peer died
        failure = sys.modules["dcdit_cli.common.processes"].explain(error)
        if failure is not None:
            return str(failure)
    return None


def crash_log(error: BaseException) -> Path:
    """Writes the traceback of an unexpected error to a log file; returns its path."""
    folder = Path(os.environ.get("DCDIT_LOG_DIR") or tempfile.gettempdir())
    path = folder / f"dcdit-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(f"dcdit {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(error)), encoding="utf-8")
    except OSError:
        path = Path("(the log could not be written)")
    return path


def report(error: BaseException) -> int:
    """Prints the one line for ``error``; returns the exit code."""
    if isinstance(error, DcditError):
        error_line(str(error))
        return BAD_INPUT
    if isinstance(error, typer.TyperException) and hasattr(error, "format_message"):  # typer's bundled click
        if type(error).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            error_line(_usage_line(error))
        return BAD_INPUT
    if isinstance(error, Preempted):
        stopped_line(str(error))
        return PREEMPTED
    if isinstance(error, (KeyboardInterrupt, typer.Abort)):
        error_line("interrupted: rerun the same command to resume")
        return INTERRUPTED
    line = _edge_line(error)
    if line is not None:
        error_line(line)
        return BAD_INPUT
    log = crash_log(error)
    error_line(f"unexpected {type(error).__name__}: {load_error_reason(error)} (a dcdit bug: the traceback is in {log})")
    return BUG
