"""Atomic folder writes: build the folder under a temporary name beside it, then rename.

A reader never sees a half-written checkpoint; a failure leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_folder", "same_path"]


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, *, overwrite: bool = False,
                  protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` when the block succeeds.

    Args:
        dest: the folder to create.
        overwrite: replace an existing ``dest`` (only after the new one is complete).
        protect: folders that must never be written (e.g. the source checkpoint); ``dest``
            equal to or inside one of them is refused.
    """
    dest = Path(dest)
    for p in protect:
        p = Path(p).resolve()
        if dest.resolve() == p or p in dest.resolve().parents:
            raise ValueError(f"refusing to write {dest}: it is (inside) the source checkpoint {p}")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
