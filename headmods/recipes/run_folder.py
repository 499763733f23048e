"""Run folders: a recipe run claims its ``output_dir`` with a ``run.json`` record before writing.

The record holds the recipe, the full configuration, the command, the headmods version and a
status (``running`` until the report is written, then ``finished``). It is written atomically.
:func:`claim_run_folder` applies these rules before a run writes anything:

- a missing or empty folder is claimed: the run starts fresh;
- a folder that holds files but no ``run.json`` is refused: headmods did not create it;
- a folder that holds a run of another recipe is refused, ``overwrite`` or not (an ``eval`` never
  replaces a fine-tune's results): choose another ``output_dir``;
- a run of the same recipe with other settings is refused, naming each differing key with its
  old and new value, unless ``overwrite`` (the previous run is removed and the run starts fresh);
- a run of the same recipe with the same settings is resumed: fit stages continue from their
  last Lightning checkpoint, finished ones skip to their end (``overwrite`` starts over instead);
- ``resume`` demands that last case: a folder without a run with the same settings is refused.

Settings that change only presentation (:data:`IGNORED_SETTINGS`, e.g. ``train.progress_bar``)
are not compared. A fresh claim whose run fails before any Lightning checkpoint is released
(:meth:`RunFolder.release`), so correcting a setting and running again needs no ``overwrite``.

Example:
    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     folder = claim_run_folder(pathlib.Path(d) / "run", recipe="eval", config={"lr": 1},
    ...                               command="headmods eval", log=lambda msg: None)
    ...     folder.finish()
    ...     read_record(folder.path)["status"]
    'finished'
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunFolderError
from ..io.atomic import write_atomic

__all__ = ["RECORD_NAME", "IGNORED_SETTINGS", "RunFolder", "claim_run_folder", "read_record", "settings_diff"]

RECORD_NAME = "run.json"
IGNORED_SETTINGS = frozenset({"output_dir", "train.progress_bar"})
_MISSING = object()


@dataclass
class RunFolder:
    """A claimed ``output_dir``: ``record`` is what ``run.json`` holds; ``fresh`` is True when the
    run starts from nothing (the folder was missing, empty, or its previous run was removed)."""

    path: Path
    record: dict[str, Any]
    fresh: bool
    created: bool = False  # the claim made the folder itself

    def finish(self) -> None:
        """Mark the run ``finished`` in ``run.json`` (after its report is written)."""
        self.record.update(status="finished", finished=_now())
        _write_record(self.path, self.record)

    def release(self) -> None:
        """Undo a fresh claim whose run failed before saving anything resumable.

        The folder held nothing of anyone else's before the claim, so everything in it is removed;
        a folder with a Lightning ``last.ckpt`` (a resumable run) or a resumed run is kept.
        """
        if self.fresh and not any(self.path.glob("lightning/*/last.ckpt")):
            _clear(self.path, keep_record=False)
            if self.created and not any(self.path.iterdir()):
                self.path.rmdir()


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The run record of ``folder``, or None when it has no ``run.json``.

    Raises:
        RunFolderError: ``run.json`` exists but is not a run record headmods wrote.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     read_record(d) is None
        True
    """
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} is not a run record headmods can read ({e}); move the folder away or "
                             "choose another output_dir") from None
    if not isinstance(record, dict) or not isinstance(record.get("recipe"), str) or not isinstance(
            record.get("config"), dict):
        raise RunFolderError(f"{path} is not a run record (expected a mapping with 'recipe' and 'config'); move the "
                             "folder away or choose another output_dir")
    return record


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every dotted setting that differs (presentation keys ignored).

    Example:
        >>> settings_diff({"train": {"lr": 0.001, "progress_bar": True}},
        ...               {"train": {"lr": 0.002, "progress_bar": False}})
        ['train.lr: 0.001 -> 0.002']
    """
    a, b = _flatten(_plain(old)), _flatten(_plain(new))
    return [f"{key}: {_show(a.get(key, _MISSING))} -> {_show(b.get(key, _MISSING))}"
            for key in sorted(set(a) | set(b))
            if key not in IGNORED_SETTINGS and a.get(key, _MISSING) != b.get(key, _MISSING)]


def claim_run_folder(folder: str | Path, *, recipe: str, config: Mapping[str, Any], command: str,
                     resume: bool = False, overwrite: bool = False,
                     log: Callable[[str], None] = print) -> RunFolder:
    """Claim ``folder`` for a ``recipe`` run with ``config`` by the rules of this module.

    Returns:
        the claimed :class:`RunFolder` (its ``run.json`` says ``running``).

    Raises:
        ConfigError: both ``resume`` and ``overwrite`` given.
        RunFolderError: the folder holds files that are not a headmods run, another recipe's run,
            the same recipe's run with other settings (without ``overwrite``), or, with ``resume``,
            no run to resume.

    Example:
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     first = claim_run_folder(d, recipe="eval", config={"seed": 0}, command="", log=print)
        ...     again = claim_run_folder(d, recipe="eval", config={"seed": 0}, command="", log=lambda m: None)
        ...     first.fresh, again.fresh
        (True, False)
    """
    if resume and overwrite:
        raise ConfigError("give at most one of --resume (continue the run) and --overwrite (start it over)")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output_dir {path} is a file, not a folder; choose another output_dir")
    config = _plain(config)
    new = {"recipe": recipe, "config": config, "command": command, "headmods_version": _version(),
           "status": "running", "started": _now()}
    if not path.exists() or not any(path.iterdir()):
        if resume:
            raise RunFolderError(f"--resume: {path} holds no run to resume; run without --resume to start one")
        return _claim(path, new, fresh=True, created=not path.exists())
    old = read_record(path)
    if old is None:
        raise RunFolderError(f"output_dir {path} holds files but no {RECORD_NAME}: headmods did not create it and "
                             "will not write into it; move it away or choose a new or empty output_dir")
    if old["recipe"] != recipe:
        raise RunFolderError(f"output_dir {path} holds {_a(old['recipe'])} run ({old.get('status', 'unknown')}); "
                             f"{_a(recipe)} run there would replace its results, with --overwrite too; choose "
                             f"another output_dir (e.g. output_dir={path}-{recipe})")
    diff = settings_diff(old["config"], config)
    if overwrite:
        _clear(path, keep_record=True)
        log(f"[run] --overwrite: removed the previous {recipe} run in {path}; starting over")
        return _claim(path, new, fresh=True)
    if diff:
        lead = "--resume needs the same settings: " if resume else ""
        raise RunFolderError(f"{lead}output_dir {path} holds {_a(recipe)} run with other settings "
                             f"({'; '.join(diff)}); pass --overwrite to discard it and start over, or choose "
                             "another output_dir")
    log(f"[run] resuming the run in {path} (same settings); --overwrite starts over")
    return _claim(path, {**new, "started": old.get("started", new["started"]), "resumed": _now()}, fresh=False)


def _claim(path: Path, record: dict[str, Any], *, fresh: bool, created: bool = False) -> RunFolder:
    path.mkdir(parents=True, exist_ok=True)
    _write_record(path, record)
    return RunFolder(path, record, fresh, created)


def _write_record(path: Path, record: dict[str, Any]) -> None:
    write_atomic(path / RECORD_NAME, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def _clear(path: Path, *, keep_record: bool) -> None:
    """Remove what ``path`` holds; ``run.json`` last (or kept), so an interrupted clear stays claimed."""
    for entry in sorted(path.iterdir()):
        if entry.name == RECORD_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if not keep_record:
        (path / RECORD_NAME).unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    """``value`` as it comes back from JSON (tuples become lists; unknown objects their str)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _a(recipe: str) -> str:
    return f"{'an' if recipe[:1] in 'aeiou' else 'a'} {recipe!r}"


def _show(value: Any) -> str:
    return "(not set)" if value is _MISSING else json.dumps(value)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _version() -> str:
    from .. import __version__

    return __version__
