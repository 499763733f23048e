"""The weights file vouches for the manifest: layer structure and dtype stored in safetensors metadata.

``save`` writes each layer's variant, structure and config, and the dtype, into the metadata of
the first weights file (``headmods_layers``: JSON, ``headmods_dtype``). ``load`` compares the
manifest with it before building anything, so a ``headmods.json`` edited to describe another
model (heads and head size swapped, another dtype) is refused instead of loading silently.
Checkpoints written before this check existed have no such metadata and skip it.

Example:
    >>> meta = weights_metadata({"l": {"variant": "mha", "structure": {}, "config": {}}}, "float32")
    >>> sorted(meta)
    ['format', 'headmods_dtype', 'headmods_layers']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, CorruptFileError

__all__ = ["weights_metadata", "read_metadata", "check_layers", "check_dtype"]


def weights_metadata(layers: dict[str, Any], dtype: str | None) -> dict[str, str]:
    """The str -> str safetensors metadata that records ``layers`` (as the manifest has them) and ``dtype``."""
    record = {path: {k: entry[k] for k in ("variant", "structure", "config")} for path, entry in layers.items()}
    return {"format": "pt", "headmods_layers": json.dumps(record, sort_keys=True), "headmods_dtype": dtype or ""}


def read_metadata(file: Path) -> dict[str, str]:
    """The safetensors metadata of ``file`` (empty when it has none).

    Example:
        >>> read_metadata(Path("/no/such.safetensors"))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        headmods.errors.CorruptFileError: cannot read the metadata of /no/such.safetensors
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        size = file.stat().st_size if file.is_file() else 0
        raise CorruptFileError(f"cannot read the metadata of {file} ({size} bytes): {e}; expected a complete "
                               "safetensors file (it is truncated, corrupt, or not safetensors)") from None


def _differ(field: str, ours: Any, theirs: Any) -> CheckpointError:
    return CheckpointError(f"headmods.json and the weights disagree on {field}: the manifest says {ours!r}, "
                           f"the weights file was saved with {theirs!r}; the manifest was edited or belongs "
                           "to other weights")


def check_layers(layers: dict[str, Any], metadata: dict[str, str]) -> None:
    """Raise a CheckpointError where the manifest's ``layers`` differ from what the weights were saved with.

    Example:
        >>> entry = {"variant": "mha", "structure": {"num_heads": 4}, "config": {}}
        >>> meta = weights_metadata({"l": entry}, None)
        >>> check_layers({"l": {**entry, "structure": {"num_heads": 2}}}, meta)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        headmods.errors.CheckpointError: headmods.json and the weights disagree on layers.l.structure.num_heads: ...
    """
    if "headmods_layers" not in metadata:
        return  # saved before the weights recorded their layers
    try:
        saved = json.loads(metadata["headmods_layers"])
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"the weights' headmods_layers metadata is not JSON: {e}") from None
    if not isinstance(saved, dict):
        raise CorruptFileError("the weights' headmods_layers metadata is not a JSON object")
    if set(saved) != set(layers):
        raise _differ("layers (the module paths)", sorted(layers), sorted(saved))
    for path, entry in layers.items():
        ref = saved[path]
        if entry["variant"] != ref.get("variant"):
            raise _differ(f"layers.{path}.variant", entry["variant"], ref.get("variant"))
        for part in ("structure", "config"):
            ours, theirs = entry[part], ref.get(part, {})
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    raise _differ(f"layers.{path}.{part}.{key}", ours.get(key), theirs.get(key))


def check_dtype(dtype: str | None, metadata: dict[str, str], state: dict[str, Tensor]) -> None:
    """Raise a CheckpointError when ``dtype`` (the manifest's) is not what the weights hold.

    Example:
        >>> check_dtype("float16", {}, {"w": torch.zeros(1)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        headmods.errors.CheckpointError: headmods.json and the weights disagree on dtype: ...
    """
    if "headmods_dtype" in metadata and (dtype or "") != metadata["headmods_dtype"]:
        raise _differ("dtype", dtype, metadata["headmods_dtype"] or None)
    floats = {str(t.dtype).removeprefix("torch.") for t in state.values() if torch.is_floating_point(t)}
    if dtype is not None and floats and dtype not in floats:
        raise _differ("dtype", dtype, sorted(floats))
