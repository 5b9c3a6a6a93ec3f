"""Checks of command-line options, run before any model loads or any work starts.

Each command's library entry point collects the problems of all its options in one
:class:`OptionCheck` and raises them together as one :class:`DcditError` line, so a user
fixes every flag in one go. The recipe's own fields are checked by recipe.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from dcdit_cli.common.atomic import check_output
from dcdit_cli.common.console import DcditError

SEED_LIMIT = 2**63


class OptionCheck:
    """Collects option problems; :meth:`done` raises them as one line."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def count(self, flag: str, value: int | None, least: int = 1, example: int = 16) -> "OptionCheck":
        """An integer option that must be ≥ ``least`` (None: not given)."""
        if value is not None and value < least:
            self.problems.append(f"{flag} {value}: give at least {least} (e.g. {flag} {example})")
        return self

    def fraction(self, flag: str, value: float | None,
                 hint: str = "a tail-dropping fraction such as 0.2 (0 keeps every boundary)") -> "OptionCheck":
        """A tail-dropping budget in [0, 1)."""
        if value is not None and not (math.isfinite(value) and 0.0 <= value < 1.0):
            self.problems.append(f"{flag} {value} is outside [0, 1): pass {hint}")
        return self

    def cfg_scale(self, flag: str, value: float | None) -> "OptionCheck":
        """A classifier-free guidance scale: ≥ 1, where 1 means no guidance (one forward per step)."""
        if value is not None and not (math.isfinite(value) and value >= 1.0):
            self.problems.append(f"{flag} {value}: give a guidance scale >= 1 (1 turns guidance off; e.g. 1.5 for FID, 4 for pictures)")
        return self

    def seed(self, flag: str, value: int | None) -> "OptionCheck":
        if value is not None and not 0 <= value < SEED_LIMIT:
            self.problems.append(f"{flag} {value}: give a seed in [0, 2**63)")
        return self

    def choice(self, flag: str, value: str, options: tuple[str, ...]) -> "OptionCheck":
        if value not in options:
            self.problems.append(f"{flag} {value!r}: give one of {', '.join(options)}")
        return self

    def output(self, flag: str, path: Path | None, suffixes: tuple[str, ...] = (), directory: bool = False) -> "OptionCheck":
        """An output path that can be written (suffix, no file in the way, a writable folder)."""
        if path is not None:
            try:
                check_output(path, flag, suffixes, directory)
            except DcditError as e:
                self.problems.append(str(e))
        return self

    def done(self) -> None:
        if len(self.problems) == 1:
            raise DcditError(self.problems[0])
        if self.problems:
            raise DcditError(f"{len(self.problems)} problems with the options: " + "; ".join(self.problems))
