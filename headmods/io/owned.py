"""Which existing folders ``save``/``export`` may replace with ``overwrite=True``.

Rule: an existing destination is replaced only when it is empty, or when it is a headmods
checkpoint (holds ``headmods.json``) or a Hugging Face model folder (``config.json`` and weights)
*and* every entry in it is a file one of those formats writes: the manifest, ``README.md``,
``config.json``, ``generation_config.json``, safetensors or ``.bin`` weights, shards and their
index, tokenizer files (the standard names, and those the manifest lists). Anything else (a
sub-folder, a user's notes) is refused with :class:`~headmods.errors.OutputExistsError` naming it,
so ``overwrite=True`` never deletes a file headmods did not write.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "notes.txt").write_text("mine")
    >>> check_replaceable(folder)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    headmods.errors.OutputExistsError: ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..convert.readers import TOKENIZER_FILES
from ..errors import OutputExistsError

__all__ = ["check_replaceable", "foreign_entries"]

_FIXED = {"headmods.json", "README.md", "config.json", "generation_config.json", "model.safetensors",
          "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json", *TOKENIZER_FILES}
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _manifest_names(folder: Path) -> set[str]:
    try:
        names = json.loads((folder / "headmods.json").read_text()).get("tokenizer_files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")} \
        if isinstance(names, list) else set()


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that neither a headmods save nor an HF ``save_pretrained`` writes.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text("{}"); _ = (folder / "keep.txt").write_text("x")
        >>> foreign_entries(folder)
        ['keep.txt']
    """
    known = _FIXED | _manifest_names(folder)
    return sorted(p.name for p in folder.iterdir()
                  if p.is_symlink() or not p.is_file() or not (p.name in known or _SHARD.fullmatch(p.name)))


def check_replaceable(folder: Path) -> None:
    """Raise :class:`~headmods.errors.OutputExistsError` unless ``folder`` may be replaced (see the module rule).

    Example:
        >>> import tempfile
        >>> check_replaceable(Path(tempfile.mkdtemp()))  # empty: nothing to lose
    """
    folder = Path(folder)
    entries = list(folder.iterdir())
    if not entries:
        return
    is_headmods = (folder / "headmods.json").is_file()
    is_hf = (folder / "config.json").is_file() and any((folder / w).is_file() for w in _WEIGHTS)
    if not (is_headmods or is_hf):
        raise OutputExistsError(f"refusing to overwrite {folder}: expected a headmods checkpoint (headmods.json) or "
                                f"a Hugging Face model folder (config.json and weights), got a folder holding "
                                f"{sorted(p.name for p in entries)[:10]}")
    foreign = foreign_entries(folder)
    if foreign:
        raise OutputExistsError(f"refusing to overwrite {folder}: it holds {foreign[:10]}, which a headmods or "
                                "Hugging Face save does not write; move them away or pick another destination")
