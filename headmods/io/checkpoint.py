"""The headmods checkpoint format: save a model with headmods layers, load it back without pickle.

A checkpoint is a folder (DESIGN §4)::

    headmods.json       schema_version, headmods version, host (kind, class, model_type), one
                        entry per headmods layer (variant, host adapter, full config, structure:
                        heads, kv heads, head_dim, kept head indices, kv groups), weights (files,
                        tied aliases), dtype, provenance (source, sha256 of its files, seed)
    model.safetensors   or shards + model.safetensors.index.json; the model's own parameter names
    config.json         the host's config when the host is a transformers model
    tokenizer files     copied when given
    README.md           a generated model card

``load(folder)`` rebuilds a transformers host from ``config.json`` (no network), puts each saved
layer back at its path with its saved structure (pruned layers included) and loads the weights
strictly. A plain torch host cannot be rebuilt from a folder: pass the unswapped model as
``model=`` and the layers are applied to it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert.readers import TOKENIZER_FILES
from ..integrations.base import find_host, host_named
from ..layers.base import HeadAttention
from ..registry import get_variant
from ..swap import build_layer, set_submodule
from .atomic import atomic_folder
from .card import model_card
from .weights import load_strict, read_weights, write_weights

__all__ = ["save", "load", "read_manifest", "MANIFEST", "SCHEMA_VERSION"]

MANIFEST = "headmods.json"
SCHEMA_VERSION = 1


def describe_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """One JSON-ready entry per headmods layer in ``model``: variant, host, config, structure."""
    layers = {}
    for path, m in model.named_modules():
        if isinstance(m, HeadAttention):
            c = m.config
            layers[path] = {
                "variant": type(m).variant,
                "host": getattr(m, "host_kind", "native"),
                "config": c.to_dict(),
                "structure": {"num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                              "kept_heads": None if c.kept_heads is None else list(c.kept_heads),
                              "kv_map": None if c.kv_map is None else list(c.kv_map)},
            }
    return layers


def _host_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and hasattr(config, "to_json_file"):
        return {"kind": "hf", "class": type(model).__name__, "model_type": getattr(config, "model_type", None)}
    return {"kind": "torch", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def _copy_tokenizer(tokenizer: Any, dest: Path) -> list[str]:
    if tokenizer is None:
        return []
    if hasattr(tokenizer, "save_pretrained"):
        return [Path(p).name for p in tokenizer.save_pretrained(str(dest))]
    src = Path(tokenizer)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src}; looked for {list(TOKENIZER_FILES)}")
    for f in copied:
        shutil.copy2(src / f, dest / f)
    return copied


def save(model: nn.Module, folder: str | os.PathLike, *, tokenizer: Any = None, source: str | os.PathLike | None = None,
         provenance: dict[str, Any] | None = None, card: dict[str, Any] | None = None, overwrite: bool = False,
         max_shard_mb: float | None = None) -> Path:
    """Write ``model`` (with its headmods layers) as a headmods checkpoint folder, atomically.

    Args:
        model: a transformers model or any torch module holding headmods layers.
        folder: destination; must not exist unless ``overwrite=True``; never the ``source``.
        tokenizer: a tokenizer (``save_pretrained``) or a folder whose tokenizer files are copied.
        source: where the model came from (a folder or file); its sha256s go into provenance and
            it is protected from being written.
        provenance: extra provenance fields (seed, command, ...).
        card: extra model-card content (``{"metrics": {...}, "prune_report": "markdown"}``).
        max_shard_mb: shard the weights above this size (HF naming and index).

    Example:
        >>> import headmods, tempfile, torch
        >>> model = torch.nn.Sequential(headmods.MultiHeadAttention(16, 2))
        >>> path = headmods.save(model, tempfile.mkdtemp() + "/ckpt")
        >>> sorted(p.name for p in path.iterdir())
        ['README.md', 'headmods.json', 'model.safetensors']
    """
    from ..convert.sources import sha256_file

    host = _host_info(model)
    layers = describe_layers(model)
    prov = {"source": None if source is None else str(source), "source_sha256": {}}
    if source is not None and Path(source).exists():
        src = Path(source)
        files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
        prov["source_sha256"] = {p.name: sha256_file(p) for p in files}
    prov.update(provenance or {})
    params = [p for p in model.parameters()]
    protect = () if source is None else (Path(source) if Path(source).is_dir() else Path(source).parent,)
    with atomic_folder(folder, overwrite=overwrite, protect=protect) as tmp:
        max_bytes = None if max_shard_mb is None else int(max_shard_mb * 2**20)
        files, aliases = write_weights(model.state_dict(), tmp, max_shard_bytes=max_bytes)
        if host["kind"] == "hf":
            model.config.to_json_file(str(tmp / "config.json"))
            gen = getattr(model, "generation_config", None)
            if gen is not None and hasattr(gen, "to_json_file"):
                gen.to_json_file(str(tmp / "generation_config.json"))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "headmods_version": _version(),
            "host": host,
            "layers": layers,
            "weights": {"format": "safetensors", "files": files, "aliases": aliases},
            "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
            "tokenizer_files": _copy_tokenizer(tokenizer, tmp),
            "provenance": prov,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(model_card(manifest, card or {}, num_params=sum(p.numel() for p in params)))
    return Path(folder)


def _version() -> str:
    from .. import __version__

    return __version__


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``headmods.json`` of ``folder``, checked for the fields ``load`` needs."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a headmods checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("schema_version", "host", "layers", "weights") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {manifest['schema_version']}; this headmods reads up to "
                         f"{SCHEMA_VERSION}: upgrade headmods")
    return manifest


def _build_hf_host(folder: Path, host: dict[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, host["class"], None)
    if cls is None:
        raise ValueError(f"transformers has no class {host['class']!r} (recorded in {MANIFEST})")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return cls._from_config(config)


def load(folder: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved in ``folder`` (eval mode): host, headmods layers, weights (strict).

    Args:
        folder: a folder written by :func:`save`.
        model: the unswapped host model, required when the host is not a transformers model.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    host = manifest["host"]
    if model is None:
        if host["kind"] != "hf":
            raise ValueError(f"{folder} holds a plain torch model ({host['class']}); it cannot be rebuilt from "
                             "files: pass the unswapped model as load(folder, model=...)")
        model = _build_hf_host(folder, host)
    if manifest.get("dtype"):
        model.to(getattr(torch, manifest["dtype"]))
    for path, entry in manifest["layers"].items():
        _restore_layer(model, path, entry)
    load_strict(model, read_weights(folder, manifest["weights"].get("aliases")))
    return model.eval()


def _restore_layer(model: nn.Module, path: str, entry: dict[str, Any]) -> None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no module {path!r} for the saved layer of that path") from None
    try:
        variant = get_variant(entry["variant"])
        config = variant.config_class.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"layer {path!r} in {MANIFEST} is invalid: {e}") from None
    if entry["host"] == "native" or isinstance(module, HeadAttention):
        if not isinstance(module, HeadAttention):
            raise ValueError(f"saved layer {path!r} was a native headmods layer; the model has {type(module).__name__}")
        ref = next(module.parameters())
        set_submodule(model, path, variant.from_config(config, device=ref.device, dtype=ref.dtype))
        return
    host = host_named(entry["host"])
    if find_host(module) is not host:
        raise ValueError(f"saved layer {path!r} replaced a {entry['host']} module; the model has "
                         f"{type(module).__name__} there")
    set_submodule(model, path, build_layer(module, host, variant, config=config))
    host.prepare_parent(model, path)
