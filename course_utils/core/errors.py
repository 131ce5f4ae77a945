"""The course's own errors: each says what went wrong and what to do, in one line a learner can act on.

Every error the course raises on purpose derives from ``CourseError``; the CLI prints its message alone
(``--debug`` adds the traceback), while any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class CourseError(Exception):
    """A problem the user can fix (a setting, a missing stage, odd input); the message names the fix."""

    def __str__(self) -> str:
        # KeyError (a base of some course errors) would otherwise print its message in quotes.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def first_validation_problem(error: ValidationError, top: str = "the top level") -> str:
    """``where: what`` of the first problem pydantic found, for a course error's one line."""
    first = error.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc']) or top}: {first['msg']}"
