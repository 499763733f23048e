"""Export to a stock Hugging Face folder, where the structure allows.

A stock transformers class can hold a headmods model only when every swapped layer is plain
multi-head attention (variant ``mha``, contiguous kv groups, or ``dha`` whose keys and values share
one grouping of equal groups, which is GQA up to an order of the query heads) and all layers keep
the same head counts; anything else is refused with the name of the layer that blocks it. LLaMA-family configs
state ``head_dim`` and take the pruned tensors as they are. BERT and GPT-2 fix the head size to
``hidden / num_heads``, so their pruned heads are zero-padded to it: the exported model computes
the same function but is not smaller (the headmods folder is).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from torch import nn

from ..integrations.base import host_named
from ..layers.base import HeadAttention
from ..errors import ConfigError
from .atomic import atomic_folder, find_folder
from .checkpoint import load, read_manifest
from .owned import check_replaceable
from .paths import inside
from .weights import load_strict

__all__ = ["export", "to_stock_hf"]


def to_stock_hf(model: nn.Module) -> nn.Module:
    """A stock transformers model computing what ``model`` (a transformers host with headmods layers) computes."""
    if not type(model).__module__.startswith("transformers."):
        raise ValueError(f"stock export needs a transformers host model, got {type(model).__name__}")
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, HeadAttention)]
    shapes, plain = set(), {}
    for path, layer in layers:
        host = getattr(layer, "host_kind", "native")
        if type(layer).variant == "dha":
            try:
                plain[path] = layer.as_mha()  # DHA whose K and V share equal groups is GQA
            except ValueError as e:
                raise ValueError(f"layer {path!r} (dha) has no stock transformers equivalent: {e}") from None
        elif type(layer).variant != "mha":
            raise ValueError(f"layer {path!r} is {type(layer).variant!r}; only plain multi-head attention ('mha') "
                             "and DHA that is GQA have a stock transformers equivalent")
        else:
            plain[path] = layer
        layer = plain[path]
        if not host.startswith("hf_"):
            raise ValueError(f"layer {path!r} did not replace a transformers attention module (host {host!r})")
        if layer.config.kv_map is not None:
            raise ValueError(f"layer {path!r} has uneven kv groups (kv_map={layer.config.kv_map}); stock "
                             "configs need contiguous, equal groups")
        shapes.add((layer.num_heads, layer.num_kv_heads, layer.head_dim))
    if len(shapes) > 1:
        raise ValueError(f"layers differ in (heads, kv heads, head_dim): {sorted(shapes)}; a stock config has one "
                         "value for every layer (prune with uniform=True)")
    config = copy.deepcopy(model.config)
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{p}.") for p, _ in layers)}
    for path, layer in layers:
        host = host_named(layer.host_kind)
        state.update({f"{path}.{k}": v for k, v in host.export(plain[path], config).items()})
    stock = type(model)._from_config(config)
    load_strict(stock, state)
    return stock.eval()


def export(source: str | os.PathLike | nn.Module, dest: str | os.PathLike, *, to: str = "hf",
           overwrite: bool = False) -> Path:
    """Write a stock transformers folder (``save_pretrained``) for a headmods folder or model.

    The tokenizer files the source manifest lists are copied; each name must be a plain file
    inside the source folder (else :class:`~headmods.errors.UnsafePathError`). ``dest`` is written
    atomically; with ``overwrite=True`` an existing ``dest`` is replaced only when it is empty or a
    headmods / Hugging Face model folder holding nothing but files those formats write (else
    :class:`~headmods.errors.OutputExistsError` names the other files).

    Example:
        >>> # headmods.export("runs/minilm-pruned", "runs/minilm-pruned-hf")  # then AutoModel.from_pretrained
    """
    if to != "hf":
        raise ConfigError(f"export target must be 'hf', got {to!r}")
    folder = None if isinstance(source, nn.Module) else find_folder(source)
    model = source if folder is None else load(folder)
    stock = to_stock_hf(model)
    names = [] if folder is None else read_manifest(folder).get("tokenizer_files", [])
    files = [inside(folder, name, "tokenizer_files") for name in names]
    protect = () if folder is None else (folder,)
    with atomic_folder(dest, overwrite=overwrite, protect=protect, may_replace=check_replaceable) as tmp:
        stock.save_pretrained(str(tmp))
        for file in files:
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    return Path(dest)
