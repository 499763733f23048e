"""Weights on disk: safetensors, one file or Hugging Face-style shards with an index.

Tied parameters (an LM head sharing the embedding) are stored once; the other names are
recorded as aliases and restored on reading. safetensors metadata holds ``{"format": "pt"}`` as
transformers writes it, plus what the caller adds (``save`` records the layer structure there).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError

__all__ = ["WEIGHTS_NAME", "INDEX_NAME", "write_weights", "read_weights", "split_aliases", "load_strict"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - safetensors is in the recipes/dev extras
        raise ImportError("reading and writing checkpoints needs safetensors: pip install safetensors") from e
    return st


def split_aliases(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors stored once (first name wins) and ``alias -> stored name`` for tensors sharing memory."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = t.detach().contiguous()
    return stored, aliases


def write_weights(state_dict: dict[str, Tensor], folder: Path, *, max_shard_bytes: int | None = None,
                  metadata: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Write ``state_dict`` into ``folder``; returns (file names, aliases).

    ``metadata`` (str -> str) goes into the first file, beside ``{"format": "pt"}``.

    Example:
        >>> import tempfile
        >>> write_weights({"w": torch.zeros(2)}, Path(tempfile.mkdtemp()))
        (['model.safetensors'], {})
    """
    st = _safetensors()
    first = {"format": "pt", **(metadata or {})}
    stored, aliases = split_aliases(state_dict)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in stored.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        st.save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=first)
        return [WEIGHTS_NAME], aliases
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, (file, shard) in enumerate(zip(files, shards)):
        st.save_file(shard, str(folder / file), metadata=first if i == 0 else {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in stored.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return files, aliases


def read_weights(folder: Path, aliases: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Read the weights of ``folder`` (single file or indexed shards, checked), aliases restored.

    An alias must name a tensor the files do not hold and point at one they do.
    """
    from ..convert.readers import read_weights as read_folder

    state = read_folder(folder)
    stored = set(state)
    for alias, target in (aliases or {}).items():
        if target not in stored:
            raise CheckpointError(f"tied weight {alias!r} points at {target!r}, which the files do not hold "
                                  "(expected an alias target among the stored tensors)")
        if alias in stored:
            raise CheckpointError(f"weights.aliases names {alias!r}, which the files also hold; an alias must "
                                  "name a tensor stored only once, under its target")
        state[alias] = state[target]
    return state


def load_strict(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names every bad key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:10]}")
        raise CheckpointError("weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
