"""User-facing errors: every one becomes a single line and a non-zero exit."""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for, not a bug: one line, exit code 2."""
