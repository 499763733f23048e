"""File names read from files (manifests, index files) must name a file inside their folder.

A manifest is data someone else may have written: ``"../../x"``, ``"/etc/passwd"``, ``"a/b"``
or a symlink pointing elsewhere must never make headmods read or write outside the folder.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> inside(folder, "model.safetensors", "weights.files").name
    'model.safetensors'
    >>> inside(folder, "../victim.txt", "tokenizer_files")
    Traceback (most recent call last):
    ...
    headmods.errors.UnsafePathError: tokenizer_files must be a plain file name inside its folder (no '/', '..', absolute path or empty name), got '../victim.txt'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UnsafePathError

__all__ = ["inside", "safe_name"]


def safe_name(name: Any, what: str) -> str:
    """``name`` when it is a non-empty plain file name (no folder part, not ``.``/``..``, not absolute).

    Example:
        >>> safe_name("vocab.txt", "tokenizer_files")
        'vocab.txt'
    """
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
             and "\x00" not in name and os.sep not in name and (os.altsep is None or os.altsep not in name)
             and not Path(name).is_absolute() and not Path(name).drive)
    if not plain:
        raise UnsafePathError(f"{what} must be a plain file name inside its folder (no '/', '..', "
                              f"absolute path or empty name), got {name!r}")
    return name


def inside(folder: str | os.PathLike, name: Any, what: str) -> Path:
    """``folder / name``, refused when ``name`` is not a plain file name or resolves outside ``folder``.

    A symlink whose target lies outside ``folder`` is refused too (the resolved paths are compared).

    Args:
        folder: the folder the name must stay in.
        name: the name as read from a file.
        what: where the name came from (``"tokenizer_files"``, ``"weights.files"``), for the message.

    Example:
        >>> import tempfile
        >>> inside(tempfile.mkdtemp(), "config.json", "files").name
        'config.json'
    """
    safe_name(name, what)
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    target = path.resolve()
    if target.parent != root and root not in target.parents:
        raise UnsafePathError(f"{what} names {name!r}, which resolves to {target}, outside {root} "
                              "(a symlink leaving the folder)")
    return path
