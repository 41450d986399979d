"""User-facing errors.

Anything the user can fix (a recipe key, a data file, a path, a flag) is raised as a
`UserError` carrying one or more `Problem`s. The CLI prints them all and exits with code 2,
without a traceback. Everything else is a bug in this tool and exits with code 1.

    raise UserError([Problem("lora.r", "must be at least 1", line=12)])
    raise UserError.single("data.sources[0].path", "file not found: x.jsonl")
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input.

    `where` is a dotted recipe key (`lora.alpha`), a file (`data.jsonl:17`) or a flag (`--set`).
    `line` is the recipe line the key sits on, when known.
    """

    where: str
    message: str
    line: int | None = None  # the recipe line the key sits on

    def render(self) -> str:
        loc = self.where
        if self.line is not None:
            loc += f" (line {self.line})"
        return f"{loc}: {self.message}"


class UserError(Exception):
    """Input the user must fix. Printed as a list of problems; exit code 2."""

    def __init__(self, problems: list[Problem], header: str | None = None):
        self.problems = problems
        self.header = header
        super().__init__(self.render())

    @classmethod
    def single(cls, where: str, message: str, line: int | None = None) -> "UserError":
        return cls([Problem(where, message, line)])

    def render(self) -> str:
        lines = [self.header] if self.header else []
        lines += [f"  - {p.render()}" if len(self.problems) > 1 or self.header else p.render() for p in self.problems]
        return "\n".join(lines)


class StoppedRun(Exception):
    """A run that ended early on purpose (a signal, a non-finite loss). The CLI prints the message,
    which says what was kept and what to do next, without a traceback, and exits with exit_code."""

    def __init__(self, exit_code: int, message: str, graceful: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.graceful = graceful  # stopped on a signal after saving a checkpoint


class NothingToDo(Exception):
    """A command that has nothing left to do (resuming a run that is already complete). The CLI
    prints the message, which says how to ask for more, and exits 0."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its class name): what a user-facing
    message quotes, without the library's multi-line explanations and stack context."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
