"""The error tree. The library raises these; only ``cli.py`` turns them into exit codes."""

from __future__ import annotations


class AutomlError(Exception):
    """Base error: its message is one line a user can act on."""

    exit_code = 1


class UsageError(AutomlError):
    """Bad input or usage: flags, files, names (exit code 2)."""

    exit_code = 2


class SpaceError(UsageError):
    """An invalid space file; ``errors`` holds every problem found, one line each."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


class DataError(UsageError):
    """A data file or dataset that cannot be used."""


class DeviceError(UsageError):
    """A requested device that does not exist here."""


class StudyNotFoundError(UsageError):
    """The named study is not in the storage."""


class StorageError(AutomlError):
    """The storage cannot be reached or used (exit code 1), or a malformed URL (2)."""

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        if bad_input:
            self.exit_code = 2


class TrialsFailedError(AutomlError):
    """The run's trials keep failing (exit code 1)."""
