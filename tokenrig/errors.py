"""The errors a user can cause or must be told of: one base class, `UserError`, carrying the exit status
(tokenrig/exit_status.py) and the word `tokenrig` prints before its one-line message, so that the command's
main() catches one type. Each module keeps its own subclass (ScenarioError, FitError, ...); `UsageError` is
the command line's own: options that are wrong or do not go together, named with the fix.
"""

from __future__ import annotations

from tokenrig import exit_status


class UserError(Exception):
    """An error whose message alone tells the user what to do; `tokenrig` prints
    `tokenrig: <label>: <message>` on stderr and exits with `exit_code`."""

    exit_code: int = exit_status.BAD_INPUT
    label: str = "error"


class UsageError(UserError):
    """Command-line options that are wrong or do not go together; the message names the flag and the fix."""
