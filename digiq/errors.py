"""One error type for bad input: it names the file and the field, so the CLI can print one clear line."""

from __future__ import annotations

from pathlib import Path


class DigiqError(Exception):
    """A user-facing error: ``file: field: message`` (file and field optional)."""

    def __init__(self, message: str, *, file: str | Path | None = None, field: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.field) if part)
        return f"{where}: {self.message}" if where else self.message


class ActionParseError(DigiqError, ValueError):
    """A malformed AutoUI action string."""


def first_line(value: object) -> str:
    """The first non-empty line of an exception's text, control characters escaped: messages stay one line."""
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    line = lines[0] if lines else type(value).__name__
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in line)
