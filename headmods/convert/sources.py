"""Where source checkpoints live: short names from manifests, or local paths.

A *manifest* is a JSON file in ``<repo>/checkpoints/`` (or in the folder named by the
environment variable ``HEADMODS_CHECKPOINTS``) that says which installed Python package holds a
known checkpoint, in which format, and the sha256 of its main weights file. ``resolve_source``
turns a short name ("minilm", "smollm2-135m") or a local path (a folder with ``config.json``, or
a ``.gguf`` file) into a :class:`Source`; nothing here touches the network or imports the
package that holds the weights (``importlib.util.find_spec`` locates it without running it).

Example:
    >>> from headmods.convert import resolve_source
    >>> resolve_source("minilm").format
    'hf-folder'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FORMATS",
    "MANIFEST_KEYS",
    "Source",
    "checkpoints_dir",
    "list_sources",
    "resolve_source",
    "sha256_file",
]

FORMATS = ("hf-folder", "gguf")
MANIFEST_KEYS = (
    "name",
    "family",
    "model_type",
    "package",
    "version",
    "format",
    "path",
    "weights_file",
    "sha256",
    "pip",
    "notes",
)
ENV_VAR = "HEADMODS_CHECKPOINTS"
_LOCAL_HINT = "a local path (a folder with config.json, or a .gguf file) is also accepted"


@dataclass(frozen=True)
class Source:
    """A located checkpoint: ``path`` is an HF folder (``format="hf-folder"``) or a GGUF file.

    ``manifest`` is the manifest dict for a known short name, None for a local path.

    Example:
        >>> from pathlib import Path
        >>> Source(Path("model.gguf"), "gguf").name
        'model.gguf'
    """

    path: Path
    format: str
    manifest: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):
            raise TypeError(f"Source.path must be a pathlib.Path, got {type(self.path).__name__}")
        if self.format not in FORMATS:
            raise ValueError(f"Source.format must be one of {FORMATS}, got {self.format!r}")

    @property
    def name(self) -> str:
        """The manifest's short name, or the path's last component for a local path."""
        return self.manifest["name"] if self.manifest else self.path.name


def checkpoints_dir() -> Path:
    """The folder searched for manifests: ``$HEADMODS_CHECKPOINTS``, else the shipped ``checkpoints/``
    (``headmods/_shipped/checkpoints`` links to the repository's folder and is package data in wheels).

    Example:
        >>> checkpoints_dir().name
        'checkpoints'
    """
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    import headmods

    return Path(headmods.__file__).parent / "_shipped" / "checkpoints"


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk_size`` pieces (never the whole file at once).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "abc.txt"
        >>> _ = p.write_bytes(b"abc")
        >>> sha256_file(p)[:16]
        'ba7816bf8f01cfea'
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sha256_file: no file at {path}")
    if not path.is_file():
        raise ValueError(f"sha256_file expects a file, got a folder: {path}")
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with path.open("rb") as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _read_manifest(file: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {file} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest {file} must hold a JSON object, got {type(manifest).__name__}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest {file} lacks key(s) {missing}; a manifest holds {list(MANIFEST_KEYS)}")
    if manifest["format"] not in FORMATS:
        raise ValueError(f"manifest {file}: 'format' must be one of {FORMATS}, got {manifest['format']!r}")
    digest = manifest["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set(string.hexdigits.lower())):
        raise ValueError(f"manifest {file}: 'sha256' must be 64 lower-case hex digits, got {digest!r}")
    return manifest


def _manifests() -> dict[str, tuple[dict[str, Any], Path]]:
    """Every manifest in :func:`checkpoints_dir`, by name (with the file it came from)."""
    folder = checkpoints_dir()
    if not folder.is_dir():
        if os.environ.get(ENV_VAR):
            raise FileNotFoundError(f"${ENV_VAR} names {folder}, which is not a folder of manifests")
        return {}  # an installed wheel without the repository: only local paths work
    found: dict[str, tuple[dict[str, Any], Path]] = {}
    for file in sorted(folder.glob("*.json")):
        manifest = _read_manifest(file)
        name = manifest["name"]
        if name in found:
            raise ValueError(f"checkpoint name {name!r} is defined twice: in {found[name][1]} and in {file}")
        found[name] = (manifest, file)
    return found


def _package_dir(package: str) -> Path | None:
    """The installed package's folder, found without importing (running) the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def _from_manifest(manifest: dict[str, Any], file: Path, verify: bool) -> Source:
    name, package, pip = manifest["name"], manifest["package"], manifest["pip"]
    root = _package_dir(package)
    if root is None:
        raise FileNotFoundError(
            f"checkpoint {name!r} (manifest {file.name}) lives in the Python package {package!r}, "
            f"which is not installed; install it with: {pip}"
        )
    path = root / manifest["path"]
    fmt = manifest["format"]
    weights = path if fmt == "gguf" else path / manifest["weights_file"]
    if not weights.is_file():
        raise FileNotFoundError(
            f"checkpoint {name!r}: expected {weights} in the installed package {package!r}, but it is "
            f"missing; reinstall with: {pip}"
        )
    if fmt == "hf-folder" and not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {name!r}: {path} has no config.json; reinstall with: {pip}")
    if verify:
        actual = sha256_file(weights)
        if actual != manifest["sha256"]:
            raise ValueError(
                f"sha256 mismatch for checkpoint {name!r}: {weights} should have sha256 "
                f"{manifest['sha256']} (manifest {file}), but has {actual}; reinstall with: {pip}"
            )
    return Source(path=path, format=fmt, manifest=dict(manifest))


def _from_local(path: Path) -> Source:
    if path.is_dir():
        if not (path / "config.json").is_file():
            present = sorted(p.name for p in path.iterdir())[:20]
            raise FileNotFoundError(
                f"{path} is a folder without config.json; an HF checkpoint folder holds config.json and "
                f"its weights (found: {present})"
            )
        return Source(path=path, format="hf-folder")
    if path.suffix.lower() == ".gguf":
        return Source(path=path, format="gguf")
    raise ValueError(f"expected a folder with config.json or a .gguf file, got the file {path}")


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith(".") or text.lower().endswith(".gguf")


def resolve_source(name_or_path: str | os.PathLike[str], *, verify: bool = False) -> Source:
    """Locate a checkpoint by short name (a manifest's ``name``) or by local path.

    A ``str`` without a path separator that matches a manifest is that manifest's checkpoint;
    anything else is a local path: a folder holding ``config.json`` or a ``.gguf`` file.
    ``verify=True`` checks the main weights file against the manifest's sha256 (local paths
    have no recorded hash, so they refuse ``verify=True``).

    Example:
        >>> src = resolve_source("smollm2-135m")
        >>> src.format, src.path.name
        ('gguf', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"resolve_source expects a short name or a path (str or os.PathLike), "
            f"got {type(name_or_path).__name__}"
        )
    if isinstance(name_or_path, str):
        if not name_or_path:
            raise ValueError(f"resolve_source got an empty name; {_LOCAL_HINT}")
        if not _looks_like_path(name_or_path):
            manifests = _manifests()
            if name_or_path in manifests:
                return _from_manifest(*manifests[name_or_path], verify=verify)
            if not Path(name_or_path).exists():
                raise ValueError(
                    f"unknown checkpoint name {name_or_path!r}; known names: {sorted(manifests)} "
                    f"(manifests in {checkpoints_dir()}); {_LOCAL_HINT}"
                )
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint path {path} does not exist; expected a folder with config.json or a .gguf "
            f"file, or one of the known names {sorted(_manifests())}"
        )
    if verify:
        raise ValueError(
            f"verify=True needs a recorded sha256, and the local path {path} has no manifest; "
            f"use a known name {sorted(_manifests())} or compare sha256_file(...) yourself"
        )
    return _from_local(path)


def list_sources() -> list[dict[str, Any]]:
    """Every known checkpoint: its manifest plus ``installed``, ``location`` and ``manifest_file``.

    Example:
        >>> "minilm" in {s["name"] for s in list_sources()}
        True
    """
    rows = []
    for name, (manifest, file) in sorted(_manifests().items()):
        root = _package_dir(manifest["package"])
        location = root / manifest["path"] if root is not None else None
        installed = location is not None and location.exists()
        rows.append(
            {
                **manifest,
                "installed": installed,
                "location": str(location) if installed else None,
                "manifest_file": str(file),
            }
        )
    return rows
