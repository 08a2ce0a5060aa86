"""The base of every expected failure.

An expected failure is one the user can act on: a missing model, a broken photo, a busy
workspace. It carries a ``message`` (what went wrong, naming the file or key) and a ``hint``
(what to do). The CLI prints both and exits non-zero without a traceback; anything that is not a
:class:`UserError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure with a message meant for the user and a hint of what to do."""

    # The CLI's exit status for this kind of failure (spec problems use 2).
    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """What the CLI prints: ``error: <message>`` and, when there is one, the hint below it."""
        return f"error: {self}" + (f"\n  hint: {self.hint}" if self.hint else "")


class StageError(UserError):
    """A stage's expected failure (bad input, missing model): the run records it and stops."""
