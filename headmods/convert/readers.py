"""Checkpoint readers: HF folders (safetensors, shards, ``.bin`` without pickle) and GGUF files.

``read_hf_folder`` returns ``(config dict, state dict)`` from a local folder and checks it as it
reads: every shard an index names exists, every key an index lists is in its shard, corrupt or
truncated files are named. ``load_hf_model`` builds the model from the folder's config and loads
the weights after comparing key sets and shapes itself, so a mismatch names the keys and both
shapes. Shard names from an index must be plain names inside the folder
(:class:`~headmods.errors.UnsafePathError`); truncated files raise
:class:`~headmods.errors.CorruptFileError`. ``load_gguf_model`` dequantizes a GGUF file to an fp32 ``transformers`` model that
``save_pretrained`` accepts. Nothing touches the network; ``.bin`` files go through
``torch.load(weights_only=True)`` only. ``transformers`` and ``safetensors`` are imported inside
the functions, so importing this module needs torch alone.

Example:
    >>> from headmods.convert import read_hf_folder, resolve_source
    >>> config, state = read_hf_folder(resolve_source("minilm").path)
    >>> config["model_type"], tuple(state["embeddings.word_embeddings.weight"].shape)
    ('bert', (30522, 384))
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import CorruptFileError
from .sources import Source

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "WEIGHT_FILES",
    "TOKENIZER_FILES",
    "read_weights",
    "read_hf_folder",
    "load_hf_model",
    "load_gguf_model",
    "load_tokenizer",
]

# Looked for in this order (safetensors before pickle-format files, as transformers does).
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
_SHOWN = 10  # how many offending keys an error message lists before "... and N more"

PathLike = str | os.PathLike[str] | Source


def _listing(folder: Path, limit: int = 20) -> list[str]:
    names = sorted(p.name for p in folder.iterdir())
    return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])


def _some(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _as_folder(folder: PathLike, caller: str) -> Path:
    if isinstance(folder, Source):
        if folder.format != "hf-folder":
            raise ValueError(f"{caller} expects an HF folder, got a {folder.format} source {folder.path}")
        return folder.path
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"{caller} expects a folder path (str, os.PathLike or Source), got {type(folder).__name__}")
    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{caller}: the folder {path} does not exist")
    if not path.is_dir():
        hint = "; use load_gguf_model for a .gguf file" if path.suffix.lower() == ".gguf" else ""
        raise ValueError(f"{caller} expects a folder with config.json and weights, got the file {path}{hint}")
    return path


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; an HF checkpoint folder holds config.json and its weights "
            f"(found: {_listing(folder)})"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except SafetensorError as err:
        raise CorruptFileError(
            f"cannot read {file.name} in {file.parent}: {err} (the file is truncated, corrupt, "
            f"or not a safetensors file; {file.stat().st_size} bytes on disk)"
        ) from None


def _unpickler_reason(err: Exception) -> str:
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n\s*Check the documentation|$)", text, re.S)
    reason = match.group(1) if match else text.splitlines()[0]
    reason = " ".join(reason.split())
    return reason.split(". Please use")[0]  # drop torch's "allowlist this class" advice


def _read_bin(file: Path) -> dict[str, Tensor]:
    import pickle

    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing {file.name} in {file.parent}: torch.load(weights_only=True) found something "
            f"other than tensors ({_unpickler_reason(err)}); headmods never unpickles arbitrary objects, "
            f"so convert the file to safetensors with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CorruptFileError(
            f"cannot read {file.name} in {file.parent}: {err} (truncated, corrupt, or not a torch file)"
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file} should hold a dict of name -> tensor, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise ValueError(
            f"{file} should hold a dict of name -> tensor; entries that are not: "
            + ", ".join(f"{k!r} ({type(obj[k]).__name__})" for k in bad[:_SHOWN])
        )
    return dict(obj)


def _read_index(index: Path, read_shard: Any) -> dict[str, Tensor]:
    folder = index.parent
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{index} is not valid JSON: {err}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} should hold a non-empty 'weight_map' of key -> shard file name")
    from ..io.paths import inside  # here: headmods.io imports this module

    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        inside(folder, shard, f"{index.name} (the shard of {key!r}; shards are plain file names in {folder})")
        by_shard.setdefault(shard, []).append(key)
    missing = sorted(s for s in by_shard if not (folder / s).is_file())
    if missing:
        raise FileNotFoundError(
            f"{index.name} in {folder} names shard(s) that are missing: {missing} "
            f"({len(by_shard)} shards in the index; found: {_listing(folder)})"
        )
    state: dict[str, Tensor] = {}
    for shard, keys in by_shard.items():
        tensors = read_shard(folder / shard)
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise ValueError(f"{index.name} lists key(s) that shard {shard!r} does not hold: {_some(absent)}")
        extra = set(tensors) - set(keys)
        if extra:
            raise ValueError(f"shard {shard!r} holds key(s) that {index.name} does not list: {_some(extra)}")
        state.update(tensors)
    return state


def read_weights(folder: PathLike) -> dict[str, Tensor]:
    """Every weight of a local checkpoint folder, from the first of :data:`WEIGHT_FILES` present.

    ``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin``, a
    sharded ``pytorch_model.bin.index.json`` (``.bin`` only through ``torch.load(weights_only=True)``).
    Keys are returned as stored.
    """
    folder = _as_folder(folder, "read_weights")
    if (folder / SAFETENSORS).is_file():
        return _read_safetensors(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _read_index(folder / SAFETENSORS_INDEX, _read_safetensors)
    if (folder / BIN).is_file():
        return _read_bin(folder / BIN)
    if (folder / BIN_INDEX).is_file():
        return _read_index(folder / BIN_INDEX, _read_bin)
    raise FileNotFoundError(
        f"{folder} holds no weights: looked for {', '.join(WEIGHT_FILES)}; found: {_listing(folder)}"
    )


def read_hf_folder(folder: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read ``config.json`` and every weight (:func:`read_weights`) of a local HF checkpoint folder.

    Keys are returned as stored (MiniLM's have no ``bert.`` prefix).

    Example:
        >>> from headmods.convert import resolve_source
        >>> config, state = read_hf_folder(resolve_source("minilm").path)
        >>> len(state), state["pooler.dense.weight"].dtype
        (104, torch.float32)
    """
    folder = _as_folder(folder, "read_hf_folder")
    return _read_config(folder), read_weights(folder)


def _model_class(transformers: Any, auto_class: str | None, config: dict[str, Any], folder: Path) -> Any:
    if auto_class is None:
        archs = config.get("architectures")
        if not archs or not isinstance(archs, list):
            raise ValueError(
                f"{folder / 'config.json'} has no 'architectures' to pick a model class from; "
                f"pass auto_class='AutoModel' (or another transformers Auto class)"
            )
        cls = getattr(transformers, str(archs[0]), None)
        if cls is None:
            raise ValueError(
                f"{folder / 'config.json'} names the architecture {archs[0]!r}, which transformers does not have"
            )
        return cls
    if not isinstance(auto_class, str):
        raise TypeError(
            f"auto_class should be the name of a transformers Auto class or None, got {auto_class!r}"
        )
    cls = getattr(transformers, auto_class, None)
    if not (auto_class.startswith("Auto") and cls is not None and hasattr(cls, "from_config")):
        raise ValueError(
            f"auto_class should name a transformers Auto class such as 'AutoModel' or "
            f"'AutoModelForCausalLM', got {auto_class!r}"
        )
    return cls


def _align_prefix(state: dict[str, Tensor], known: set[str], prefix: str) -> dict[str, Tensor]:
    """Add or strip the base-model prefix (``bert.``, ``model.``) key by key where that matches."""
    if not prefix:
        return state
    p = prefix + "."
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        target = key
        if key not in known:
            if p + key in known:
                target = p + key
            elif key.startswith(p) and key[len(p) :] in known:
                target = key[len(p) :]
        if target != key and target in state:
            target = key  # both spellings are stored: keep them apart, let the key check speak
        out[target] = value
    return out


def _matches(key: str, prefixes: Iterable[str], patterns: Iterable[str] | None) -> bool:
    if any(key.startswith(p) for p in prefixes):
        return True
    return any(re.search(p, key) for p in (patterns or ()))


def _check_and_filter(
    model: "nn.Module",
    state: dict[str, Tensor],
    folder: Path,
    allow_missing: tuple[str, ...],
    allow_unexpected: tuple[str, ...],
) -> dict[str, Tensor]:
    """Compare the checkpoint with the model's own state dict; return what to load."""
    expected = model.state_dict()
    non_persistent = {name for name, _ in model.named_buffers()} - set(expected)
    state = _align_prefix(state, set(expected) | non_persistent, getattr(model, "base_model_prefix", ""))

    # A missing key is fine when the model ties it to a key the checkpoint has (lm_head <- embeddings).
    by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, value in expected.items():
        if value.numel() == 0:
            continue
        by_storage.setdefault((value.data_ptr(), _shape(value)), []).append(key)
    tied_to = {
        key: [k for k in group if k != key]
        for group in by_storage.values()
        if len(group) > 1
        for key in group
    }
    missing = {
        k
        for k in set(expected) - set(state)
        if not any(t in state for t in tied_to.get(k, ()))
        and not _matches(k, allow_missing, getattr(model, "_keys_to_ignore_on_load_missing", None))
    }
    unexpected = {
        k
        for k in set(state) - set(expected)
        if k not in non_persistent
        and not _matches(k, allow_unexpected, getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    }
    name = type(model).__name__
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) that {name} expects: {_some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) that {name} does not have: {_some(unexpected)}")
        raise ValueError(
            f"the weights in {folder} do not fit {name} built from its config.json: "
            + "; ".join(parts)
            + " (allow_missing=/allow_unexpected= take key prefixes to accept on purpose)"
        )
    mismatched = [k for k in state if k in expected and _shape(state[k]) != _shape(expected[k])]
    if mismatched:
        detail = "; ".join(
            f"{k!r}: checkpoint {_shape(state[k])} vs model {_shape(expected[k])}"
            for k in sorted(mismatched)[:_SHOWN]
        )
        raise ValueError(
            f"{len(mismatched)} weight(s) in {folder} have shapes that {name} built from config.json does "
            f"not: {detail}" + (f"; ... and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else "")
        )
    for key, others in tied_to.items():
        for other in others:
            if key < other and key in state and other in state and not torch.equal(state[key], state[other]):
                raise ValueError(
                    f"{name} ties {key!r} and {other!r} (config), but the checkpoint in {folder} stores "
                    f"different values for them"
                )
    return {k: v for k, v in state.items() if k in expected}


def load_hf_model(
    folder: PathLike,
    *,
    auto_class: str | None = "AutoModel",
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    config_overrides: Mapping[str, Any] | None = None,
) -> "nn.Module":
    """Build a transformers model from a local folder's config and load its weights strictly.

    ``config_overrides`` set config attributes before the model is built (e.g. ``num_labels``
    and ``id2label`` for a new classification head, kept by ``allow_missing=("classifier.",)``).

    The class is ``transformers.<auto_class>`` (``from_config``), or the first entry of
    ``architectures`` in ``config.json`` when ``auto_class=None``. Before loading, key sets and
    shapes are compared, and any difference raises a ``ValueError`` that names the keys (and both
    shapes). Accepted on purpose: the base-model prefix added or stripped (``bert.``, ``model.``),
    stored non-persistent buffers (MiniLM's ``embeddings.position_ids``), keys the model ties to a
    stored one (``lm_head.weight`` with ``tie_word_embeddings``), and keys starting with a prefix in
    ``allow_missing`` (left as initialized, e.g. a new ``classifier.``) or ``allow_unexpected``
    (dropped). Returns the model in eval mode, float32.

    Example:
        >>> from headmods.convert import resolve_source
        >>> model = load_hf_model(resolve_source("minilm").path)
        >>> type(model).__name__, model.training, model.config.num_attention_heads
        ('BertModel', False, 12)
    """
    folder = _as_folder(folder, "load_hf_model")
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    config_dict, state = read_hf_folder(folder)

    import transformers

    cls = _model_class(transformers, auto_class, config_dict, folder)
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    if auto_class is None:
        model = cls(config)
    else:
        model = cls.from_config(config, dtype=torch.float32)
    model = model.float()
    to_load = _check_and_filter(model, state, folder, allow_missing, allow_unexpected)
    model.load_state_dict(to_load, strict=False)
    return model.eval()


def _as_gguf(path: PathLike, caller: str) -> Path:
    if isinstance(path, Source):
        if path.format != "gguf":
            raise ValueError(f"{caller} expects a GGUF file, got an {path.format} source {path.path}")
        path = path.path
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{caller} expects a .gguf file path (str, os.PathLike or Source), got {type(path).__name__}"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{caller}: no GGUF file at {path}")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{caller} expects a .gguf file, got {path.name}")
    return path


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table (memory-mapped) so a truncated file is named as such."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # transformers says that gguf is needed
    try:
        GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError, IndexError, struct.error, ... on bad bytes
        raise CorruptFileError(
            f"{path} ({path.stat().st_size} bytes) is truncated or corrupt: expected a complete GGUF file "
            f"(header, tensor table and all tensor data); reading it failed with {type(err).__name__}: {err}"
        ) from None


def load_gguf_model(path: PathLike) -> "nn.Module":
    """Load a GGUF file as an fp32 ``AutoModelForCausalLM`` (dequantized by transformers), offline.

    transformers undoes llama.cpp's q/k row permutation while it dequantizes. The model keeps a
    GGUF quantizer that makes ``save_pretrained`` refuse; it is removed (the weights are plain
    float32 by then), so the result saves as a stock HF folder. Needs ``gguf`` and ``accelerate``.

    Example:
        >>> from headmods.convert import resolve_source
        >>> model = load_gguf_model(resolve_source("smollm2-135m").path)  # doctest: +SKIP
        >>> model.config.num_key_value_heads  # doctest: +SKIP
        3
    """
    path = _as_gguf(path, "load_gguf_model")
    _check_gguf(path)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ImportError(
            f"load_gguf_model needs transformers: pip install -c constraints.txt '.[hf]' ({err})"
        ) from err
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
    except ImportError:
        raise
    except Exception as err:
        raise ValueError(f"cannot load {path} as a GGUF causal LM: {type(err).__name__}: {err}") from err
    # The weights are dequantized fp32 tensors; only the bookkeeping still says "gguf".
    model.hf_quantizer = None
    model.is_quantized = False
    vars(model).pop("quantization_method", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.float().eval()


def load_tokenizer(source: PathLike) -> Any:
    """The tokenizer of an HF folder or a GGUF file (``AutoTokenizer``, local files only).

    Example:
        >>> from headmods.convert import resolve_source
        >>> tok = load_tokenizer(resolve_source("minilm").path)
        >>> tok("head attention")["input_ids"][0]
        101
    """
    if isinstance(source, Source):
        path, is_gguf = source.path, source.format == "gguf"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        is_gguf = path.suffix.lower() == ".gguf"
    else:
        raise TypeError(f"load_tokenizer expects a folder or .gguf path (or Source), got {type(source).__name__}")
    from transformers import AutoTokenizer

    if is_gguf:
        path = _as_gguf(path, "load_tokenizer")
        _check_gguf(path)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    folder = _as_folder(path, "load_tokenizer")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer: looked for {', '.join(TOKENIZER_FILES)}; found: {_listing(folder)}"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
