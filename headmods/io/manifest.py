"""One validation pass over ``headmods.json``, run before anything is built from it.

Every field is checked for its type and range, every layer's config is built and compared with
its ``structure``, and every file name is checked to stay inside the folder. A failure is a
:class:`~headmods.errors.CheckpointError` (or :class:`~headmods.errors.UnsafePathError` for a file
name) whose message names the field by its dotted path, what was expected and what was given.

Example:
    >>> validate_manifest({"schema_version": "1"}, "ckpt")
    Traceback (most recent call last):
    ...
    headmods.errors.CheckpointError: ckpt/headmods.json: schema_version must be an int in [1, 1], got '1' (str)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from .paths import safe_name

__all__ = ["validate_manifest", "layer_config", "DTYPES", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "float64")
STRUCTURE = ("num_heads", "num_kv_heads", "head_dim", "kept_heads", "kv_map")


class _Checker:
    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = folder
        self.where = f"{folder}/headmods.json"

    def fail(self, field: str, expected: str, given: Any, missing: bool = False) -> CheckpointError:
        shown = "nothing (the key is missing)" if missing else f"{_short(given)} ({type(given).__name__})"
        return CheckpointError(f"{self.where}: {field} must be {expected}, got {shown}")

    def get(self, data: Mapping[str, Any], key: str, field: str, expected: str, *, required: bool = True,
            default: Any = None) -> Any:
        if key not in data:
            if required:
                raise self.fail(field, expected, None, missing=True)
            return default
        return data[key]

    def mapping(self, value: Any, field: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.fail(field, "a JSON object", value)
        return value

    def int_(self, value: Any, field: str, lo: int = 1, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise self.fail(field, f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}", value)
        return value

    def str_(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field, "a non-empty string", value)
        return value

    def ints(self, value: Any, field: str) -> None:
        if value is not None and (not isinstance(value, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
            raise self.fail(field, "null or a list of ints >= 0", value)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def layer_config(entry: Mapping[str, Any], path: str, folder: str | os.PathLike = ".") -> Any:
    """The config of the (already type-checked) manifest entry of layer ``path``; a CheckpointError if invalid.

    Example:
        >>> layer_config({"variant": "mha", "config": {"embed_dim": 16, "num_heads": 4}}, "0").head_dim
        4
    """
    from ..registry import get_variant

    try:
        return get_variant(entry["variant"]).config_class.from_dict(dict(entry["config"]))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:
        raise CheckpointError(f"layer {path!r} in headmods.json is invalid: layers.{path}.config must build a "
                              f"{entry.get('variant')!r} config, got {type(e).__name__}: {e} (in {folder})") from None


def _layer(c: _Checker, path: str, entry: Any) -> None:
    from ..integrations.base import host_named
    from ..registry import list_variants

    field = f"layers.{path}"
    entry = c.mapping(entry, field)
    variant = c.get(entry, "variant", f"{field}.variant", f"one of {list_variants()}")
    if variant not in list_variants():
        raise c.fail(f"{field}.variant", f"one of {list_variants()}", variant)
    host = c.str_(c.get(entry, "host", f"{field}.host", "a string"), f"{field}.host")
    if host != "native":
        try:
            host_named(host)
        except ValueError:
            raise c.fail(f"{field}.host", "'native' or a known host kind", host) from None
    c.mapping(c.get(entry, "config", f"{field}.config", "a JSON object"), f"{field}.config")
    structure = c.mapping(c.get(entry, "structure", f"{field}.structure", "a JSON object"), f"{field}.structure")
    for key in ("num_heads", "num_kv_heads", "head_dim"):
        c.int_(c.get(structure, key, f"{field}.structure.{key}", "an int >= 1"), f"{field}.structure.{key}")
    for key in ("kept_heads", "kv_map"):
        c.ints(c.get(structure, key, f"{field}.structure.{key}", "null or a list of ints"), f"{field}.structure.{key}")
    config = layer_config(entry, path, c.folder)
    for key in STRUCTURE:
        value = getattr(config, key)
        value = None if value is None else (list(value) if isinstance(value, tuple) else value)
        if structure[key] != value:
            raise c.fail(f"{field}.structure.{key}", f"{value!r} as {field}.config says", structure[key])


def validate_manifest(manifest: Any, folder: str | os.PathLike) -> dict[str, Any]:
    """``manifest`` (parsed ``headmods.json`` of ``folder``) when every field is well-formed; raises otherwise.

    Required: ``schema_version`` (int in [1, SCHEMA_VERSION]), ``host`` (``kind`` hf or torch,
    ``class``), ``layers`` (module path -> variant, host, config, structure agreeing with the
    config), ``weights`` (``format`` safetensors, ``files`` plain names, ``aliases`` name -> name).
    Optional: ``headmods_version`` (str), ``dtype`` (one of :data:`DTYPES` or null),
    ``tokenizer_files`` (plain names), ``provenance`` (object).

    Example:
        >>> m = {"schema_version": 1, "host": {"kind": "torch", "class": "x.Net"}, "layers": {},
        ...      "weights": {"format": "safetensors", "files": ["model.safetensors"], "aliases": {}}}
        >>> validate_manifest(m, "ckpt") is m
        True
    """
    c = _Checker(folder)
    if not isinstance(manifest, Mapping):
        raise c.fail("the top level", "a JSON object", manifest)
    version = c.get(manifest, "schema_version", "schema_version", f"an int in [1, {SCHEMA_VERSION}]")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise CheckpointError(f"{c.where} has schema_version {version}; this headmods reads up to "
                              f"{SCHEMA_VERSION}: upgrade headmods")
    c.int_(version, "schema_version", 1, SCHEMA_VERSION)
    if "headmods_version" in manifest:
        c.str_(manifest["headmods_version"], "headmods_version")
    host = c.mapping(c.get(manifest, "host", "host", "a JSON object"), "host")
    if c.get(host, "kind", "host.kind", "'hf' or 'torch'") not in ("hf", "torch"):
        raise c.fail("host.kind", "'hf' or 'torch'", host["kind"])
    c.str_(c.get(host, "class", "host.class", "a string"), "host.class")
    if host.get("model_type") is not None:
        c.str_(host["model_type"], "host.model_type")
    for path, entry in c.mapping(c.get(manifest, "layers", "layers", "a JSON object"), "layers").items():
        _layer(c, path, entry)
    weights = c.mapping(c.get(manifest, "weights", "weights", "a JSON object"), "weights")
    if c.get(weights, "format", "weights.format", "'safetensors'") != "safetensors":
        raise c.fail("weights.format", "'safetensors'", weights["format"])
    files = c.get(weights, "files", "weights.files", "a non-empty list of file names")
    if not isinstance(files, list) or not files:
        raise c.fail("weights.files", "a non-empty list of file names", files)
    for i, name in enumerate(files):
        safe_name(name, f"{c.where}: weights.files[{i}]")
    aliases = c.mapping(weights.get("aliases", {}), "weights.aliases")
    for alias, target in aliases.items():
        if not isinstance(target, str) or not alias or not target:
            raise c.fail(f"weights.aliases.{alias}", "a non-empty tensor name (string)", target)
    dtype = manifest.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise c.fail("dtype", f"null or one of {list(DTYPES)}", dtype)
    tokenizer_files = manifest.get("tokenizer_files", [])
    if not isinstance(tokenizer_files, list):
        raise c.fail("tokenizer_files", "a list of file names", tokenizer_files)
    for i, name in enumerate(tokenizer_files):
        safe_name(name, f"{c.where}: tokenizer_files[{i}]")
    c.mapping(manifest.get("provenance", {}), "provenance")
    return manifest  # type: ignore[return-value]
