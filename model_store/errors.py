"""The one exception the store raises at its users: a message a person can act on, no traceback."""

from __future__ import annotations


class StoreError(Exception):
    """A user-facing failure: bad source, corrupt file, unknown recipe, unusable cache directory."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TransientError(StoreError):
    """A failure that says nothing about the model (disk full, out of memory, a killed build, a timeout).

    It fails this load, but it is not recorded: the next load tries again."""
