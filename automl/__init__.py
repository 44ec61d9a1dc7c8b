"""automl: hyperparameter search for PyTorch models from a YAML space file, on Optuna."""

from typing import TYPE_CHECKING, Any

from automl.errors import (
    AutomlError,
    DataError,
    DeviceError,
    SpaceError,
    StorageError,
    StudyNotFoundError,
    UsageError,
)

if TYPE_CHECKING:
    from automl.spaces import Space, TrialConfig, load_space, parse_space, suggest

# automl.spaces pulls in pydantic (0.9 s on a busy 2-core machine): import it on first
# use, so `automl --help` and the error classes stay cheap (PEP 562).
_LAZY = {"Space", "TrialConfig", "load_space", "parse_space", "suggest"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from automl import spaces

        return getattr(spaces, name)
    raise AttributeError(f"module 'automl' has no attribute {name!r}")


__all__ = [
    "AutomlError",
    "DataError",
    "DeviceError",
    "Space",
    "SpaceError",
    "StorageError",
    "StudyNotFoundError",
    "TrialConfig",
    "UsageError",
    "load_space",
    "parse_space",
    "suggest",
]
