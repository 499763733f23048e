"""Atomic writes for every headmods writer: folders (checkpoints, exports) and single files (reports, plots).

Guarantees, for a writer killed at any instant (power loss is up to the file system):

* :func:`write_atomic` writes a file beside the target (``.name.<pid>.<random>.tmp``) and renames
  it over the target: a reader sees the old file or the new one, never part of one.
* :func:`atomic_folder` builds the new folder as ``.name.tmp-<pid>-<random>`` beside ``name``. An
  existing ``name`` is untouched until the new folder is complete; then ``name`` is renamed to
  ``.name.old-<pid>-<random>``, the new folder to ``name``, and the old one is removed. A crash
  between those two renames leaves the previous folder complete under its ``.old-`` name:
  :func:`find_folder` (used by the loaders) reads it from there, and the next write to ``name``
  renames it back before doing anything else.
* Temporary and ``.old-`` folders (or files) whose writer process is no longer alive are removed
  by the next write to the same destination; those of a live process (a concurrent writer) are
  never touched. Liveness is checked by pid on this machine.
* On an exception inside the block the temporary folder is removed and the destination is left
  (or put back) as it was.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> dest = Path(tempfile.mkdtemp()) / "ckpt"
    >>> with atomic_folder(dest) as tmp:
    ...     _ = (tmp / "a.txt").write_text("hi")
    >>> sorted(p.name for p in dest.parent.iterdir()), (dest / "a.txt").read_text()
    (['ckpt'], 'hi')
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import OutputExistsError, UnsafePathError

__all__ = ["atomic_folder", "write_atomic", "find_folder", "same_path"]


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same place once resolved.

    Example:
        >>> same_path("/tmp/x/../y", "/tmp/y")
        True
    """
    return Path(a).resolve() == Path(b).resolve()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _siblings(dest: Path, kind: str) -> list[tuple[Path, int | None]]:
    """``(path, writer pid or None)`` of the ``.name.<kind>-*`` entries beside ``dest``, newest first."""
    if not dest.parent.is_dir():
        return []
    prefix = f".{dest.name}.{kind}-"
    found = []
    for p in dest.parent.iterdir():
        if p.name.startswith(prefix):
            m = re.match(r"(\d+)-", p.name[len(prefix):])
            try:
                mtime = p.lstat().st_mtime
            except FileNotFoundError:  # its writer just removed it
                continue
            found.append((mtime, p, int(m.group(1)) if m else None))  # no pid: an older headmods wrote it
    return [(p, pid) for _, p, pid in sorted(found, key=lambda e: e[0], reverse=True)]


def _payload(old: Path, name: str) -> Path:
    # older headmods moved ``name`` into ``.name.old-XXXX/name``; this one renames it directly
    return old / name if (old / name).is_dir() and len(list(old.iterdir())) == 1 else old


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def find_folder(dest: str | os.PathLike) -> Path:
    """``dest``, or the complete previous folder a crashed writer left as ``.dest.old-*``.

    Read-only: the loaders use it; the next :func:`atomic_folder` on ``dest`` moves it back.

    Example:
        >>> find_folder("/no/such/folder").name
        'folder'
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    for old, _ in _siblings(dest, "old"):
        if old.is_dir():
            return _payload(old, dest.name)
    return dest


def _recover(dest: Path) -> None:
    """Put back a previous folder left by a crash between the renames; drop dead writers' leftovers."""
    if not dest.exists():
        for old, pid in _siblings(dest, "old"):
            if (pid is None or not _alive(pid)) and old.is_dir():
                os.replace(_payload(old, dest.name), dest)
                _remove(old)
                break
    for kind in ("tmp", "old"):
        for path, pid in _siblings(dest, kind):
            if pid is None or not _alive(pid):
                _remove(path)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, *, overwrite: bool = False,
                  protect: tuple[str | os.PathLike, ...] = (),
                  may_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` when the block succeeds.

    Args:
        dest: the folder to create.
        overwrite: replace an existing ``dest`` (only after the new one is complete).
        protect: folders that must never be written (e.g. the source checkpoint); ``dest``
            equal to or inside one of them is refused.
        may_replace: called with an existing ``dest`` before it is replaced; raises to refuse
            (e.g. when ``dest`` holds files the writer did not make).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> dest = Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_folder(dest) as tmp:
        ...     tmp.name.startswith(".out.tmp-")
        True
    """
    dest = Path(dest)
    for p in protect:
        p = Path(p).resolve()
        if dest.resolve() == p or p in dest.resolve().parents:
            raise UnsafePathError(f"refusing to write {dest}: it is (inside) the source checkpoint {p}")
    _recover(dest)
    if dest.exists() and not overwrite:
        raise OutputExistsError(f"{dest} already exists; pass overwrite=True to replace it")
    if dest.exists() and (dest.is_symlink() or not dest.is_dir()):
        raise OutputExistsError(f"{dest} exists and is not a folder; expected a folder to replace")
    if dest.exists() and may_replace is not None:
        may_replace(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.with_name(f".{dest.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{tag}")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)  # put the previous folder back
                raise
            _remove(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    A reader sees the old file or the new one, never half of one; on failure the temporary file
    is removed and ``path`` is left as it was. The parent folder is created when missing; the
    temporary files of dead writers to the same ``path`` are removed.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_atomic(pathlib.Path(d) / "a.txt", b"hi").read_bytes()
        b'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = re.fullmatch(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp", stale.name)
        if m and not _alive(int(m.group(1))):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:  # "x": never clobber; mode honours the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
