"""The errors storage, manifests and leases raise, in a leaf module every layer can import."""
from __future__ import annotations


class StorageError(RuntimeError):
    """Storage cannot be reached or used; the message names the endpoint/path and what to check."""


class StorageRefused(RuntimeError):
    """A stage refuses to write more than the configured limit (the extract stage's token cache
    above `extract.max_storage_gb`); an entry point ends with exit code 3."""

    exit_code = 3


class TableCorrupt(StorageError):
    """A part of a table is missing, truncated, altered or unreadable; names the parts."""

    def __init__(self, message: str, table: str | None = None, parts: list[str] | None = None):
        super().__init__(message)
        self.table, self.parts = table, list(parts or [])


class DuplicateKeys(StorageError):
    """A commit would add keys the table already holds (or repeats keys within itself)."""

    def __init__(self, message: str, table: str | None = None):
        super().__init__(message)
        self.table = table
