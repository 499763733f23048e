"""The headmods checkpoint format: save a model with headmods layers, load it back without pickle.

A checkpoint is a folder::

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

Safety: the folder is written atomically (:mod:`headmods.io.atomic`); every name read from the
manifest or an index must stay inside the folder (:mod:`headmods.io.paths`); the manifest is
validated as a whole before anything is built (:mod:`headmods.io.manifest`) and compared with
the structure and dtype recorded in the weights file (:mod:`headmods.io.integrity`).
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
from ..errors import CheckpointError, CheckpointNotFoundError
from .atomic import atomic_folder, find_folder
from .card import model_card
from .integrity import check_dtype, check_layers, read_metadata, weights_metadata
from .manifest import SCHEMA_VERSION, layer_config, validate_manifest
from .owned import check_replaceable
from .paths import inside
from .weights import load_strict, read_weights, write_weights

__all__ = ["save", "load", "read_manifest", "MANIFEST", "SCHEMA_VERSION"]

MANIFEST = "headmods.json"


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
        overwrite: replace an existing ``folder``, only when it is empty or a headmods / Hugging
            Face model folder holding nothing but files those formats write (else
            :class:`~headmods.errors.OutputExistsError` names the other files). The previous
            folder stays loadable until the new one is complete.
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
    dtype = str(params[0].dtype).removeprefix("torch.") if params else None
    protect = () if source is None else (Path(source) if Path(source).is_dir() else Path(source).parent,)
    with atomic_folder(folder, overwrite=overwrite, protect=protect, may_replace=check_replaceable) as tmp:
        max_bytes = None if max_shard_mb is None else int(max_shard_mb * 2**20)
        files, aliases = write_weights(model.state_dict(), tmp, max_shard_bytes=max_bytes,
                                       metadata=weights_metadata(layers, dtype))
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
            "dtype": dtype,
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
    """The parsed ``headmods.json`` of ``folder``, every field validated (see :func:`validate_manifest`).

    When ``folder`` is missing because a writer crashed between its two renames, the complete
    previous checkpoint it left beside it is read instead.

    Example:
        >>> import headmods, tempfile, torch
        >>> path = headmods.save(torch.nn.Sequential(headmods.MultiHeadAttention(16, 2)), tempfile.mkdtemp() + "/c")
        >>> read_manifest(path)["layers"]["0"]["structure"]["num_heads"]
        2
    """
    folder = find_folder(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointNotFoundError(f"{folder} is not a headmods checkpoint: {MANIFEST} is missing "
                                      "(expected a folder written by headmods.save)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return validate_manifest(manifest, folder)


def _build_hf_host(folder: Path, host: dict[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, host["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"host.class in {MANIFEST} must name a transformers model class, got {host['class']!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return cls._from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot build {host['class']} from {folder / 'config.json'}: "
                              f"{type(e).__name__}: {e}") from None


def load(folder: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved in ``folder`` (eval mode): host, headmods layers, weights (strict).

    Before anything is built the manifest is validated and compared with the layer structure and
    dtype the weights file records; any disagreement, unsafe file name or malformed field raises a
    :class:`~headmods.errors.HeadmodsError` subclass naming the field, what was expected and what
    was given. After a crashed save, the complete previous checkpoint is loaded.

    Args:
        folder: a folder written by :func:`save`.
        model: the unswapped host model, required when the host is not a transformers model.

    Example:
        >>> import headmods, tempfile, torch
        >>> path = headmods.save(torch.nn.Sequential(headmods.MultiHeadAttention(16, 2)), tempfile.mkdtemp() + "/c")
        >>> type(load(path, model=torch.nn.Sequential(headmods.MultiHeadAttention(16, 2)))[0]).__name__
        'MultiHeadAttention'
    """
    folder = find_folder(folder)
    manifest = read_manifest(folder)
    host, weights = manifest["host"], manifest["weights"]
    files = [inside(folder, name, "weights.files") for name in weights["files"]]
    if model is None and host["kind"] != "hf":
        raise CheckpointError(f"{folder} holds a plain torch model ({host['class']}); it cannot be rebuilt "
                              "from files: pass the unswapped model as load(folder, model=...)")
    state = read_weights(folder, weights.get("aliases"))
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise CheckpointNotFoundError(f"{folder}: weights.files names {missing}, which are missing "
                                      "(expected every listed weights file in the folder)")
    metadata = read_metadata(files[0])
    check_layers(manifest["layers"], metadata)
    if model is None:
        model = _build_hf_host(folder, host)
    check_dtype(manifest.get("dtype"), metadata, state)
    if manifest.get("dtype"):
        model.to(getattr(torch, manifest["dtype"]))
    for path, entry in manifest["layers"].items():
        _restore_layer(model, path, entry)
    load_strict(model, state)
    return model.eval()


def _restore_layer(model: nn.Module, path: str, entry: dict[str, Any]) -> None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"the model has no module {path!r} for the saved layer of that path") from None
    variant = get_variant(entry["variant"])
    config = layer_config(entry, path)
    if entry["host"] == "native" or isinstance(module, HeadAttention):
        if not isinstance(module, HeadAttention):
            raise CheckpointError(f"saved layer {path!r} was a native headmods layer; the model has "
                                  f"{type(module).__name__}")
        ref = next(module.parameters())
        try:
            layer = variant.from_config(config, device=ref.device, dtype=ref.dtype)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"layer {path!r} in {MANIFEST} does not build: {e}") from None
        set_submodule(model, path, layer)
        return
    host = host_named(entry["host"])
    if find_host(module) is not host:
        raise CheckpointError(f"saved layer {path!r} replaced a {entry['host']} module; the model has "
                              f"{type(module).__name__} there")
    try:
        layer = build_layer(module, host, variant, config=config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"layer {path!r} in {MANIFEST} does not fit the model's {type(module).__name__}: "
                              f"{e}") from None
    set_submodule(model, path, layer)
    host.prepare_parent(model, path)
