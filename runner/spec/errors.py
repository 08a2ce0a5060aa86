"""Spec problems, collected and reported all at once."""

from __future__ import annotations

from dataclasses import dataclass

from runner.core.errors import UserError


def format_key_path(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    col: int
    key_path: str
    message: str
    expected: str = ""
    hint: str = ""

    def render(self) -> str:
        text = f"{self.file}:{self.line}:{self.col}: {self.key_path}: {self.message}"
        if self.expected:
            text += f"\n    expected: {self.expected}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class SpecError(UserError):
    """One or more problems with one or more spec files. Exit code 2; :meth:`render` lists them
    all (each problem carries its own hint)."""

    exit_code = 2

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col, p.key_path))
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in spec"
        return head + ":\n" + "\n".join(p.render() for p in self.problems)
