"""Errors told in one line: what a long message (a traceback, Ray's wrapped errors) comes down to."""

from __future__ import annotations


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of an error's message, at most `limit` characters; the error's type name when the
    message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def described(error: BaseException) -> str:
    """`Type: first line` of an error, or its type name alone when it has no message."""
    line = first_line(error)
    return type(error).__name__ if line == type(error).__name__ else f"{type(error).__name__}: {line}"
