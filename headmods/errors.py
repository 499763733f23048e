"""The exceptions headmods raises for expected failures: bad files, bad settings, unsafe writes.

Every class derives from :class:`HeadmodsError` and from the built-in exception a caller would
already catch (``ValueError``, ``FileNotFoundError``, ``FileExistsError``), so existing
``except ValueError`` code keeps working. The ``headmods`` command prints these as one line and
exits with status 2; anything else is a bug and shows its traceback.

Example:
    >>> from headmods.errors import CheckpointError, HeadmodsError
    >>> issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, HeadmodsError)
    True
"""

from __future__ import annotations

__all__ = [
    "HeadmodsError",
    "ConfigError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptFileError",
    "UnsafePathError",
    "OutputExistsError",
    "RunFolderError",
    "CacheStateError",
]


class HeadmodsError(Exception):
    """Base of every expected headmods failure (the message says what was expected and what was given)."""


class ConfigError(HeadmodsError, ValueError):
    """A recipe file, an override or a layer setting that does not fit its schema."""


class CheckpointError(HeadmodsError, ValueError):
    """A checkpoint folder whose manifest or weights are malformed or disagree with each other."""


class CheckpointNotFoundError(HeadmodsError, FileNotFoundError):
    """A folder or file that should hold a checkpoint does not exist or lacks a required file."""


class CorruptFileError(CheckpointError):
    """A weight file (safetensors, GGUF, ``.bin``) that is truncated or corrupt."""


class UnsafePathError(HeadmodsError, ValueError):
    """A file name taken from a file (manifest, index) that would leave its folder."""


class OutputExistsError(HeadmodsError, FileExistsError):
    """A destination that exists and that headmods will not replace (not asked to, or not its own)."""


class RunFolderError(OutputExistsError):
    """An output folder that holds another run, or the same run with other settings."""


class CacheStateError(HeadmodsError, ValueError):
    """A cache used out of order: decode state that does not belong to the tokens it holds."""
