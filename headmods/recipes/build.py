"""Building a recipe's model and tokenizer from a source checkpoint or a headmods folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..convert import load_gguf_model, load_hf_model, load_tokenizer, resolve_source
from ..io import load
from ..swap import swap
from .config import ModelConfig

__all__ = ["build_model", "source_model"]

_AUTO = {"classification": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


def source_model(cfg: ModelConfig, *, label_names: list[str] | None = None) -> tuple[nn.Module, Any, Path]:
    """The unconverted source model with the task's head, its tokenizer, and its path."""
    src = resolve_source(cfg.source)
    tokenizer = load_tokenizer(src)
    if src.format == "gguf":
        if cfg.task != "causal-lm":
            raise ValueError(f"{src.path.name} is a GGUF causal LM; model.task must be causal-lm, got {cfg.task!r}")
        model = load_gguf_model(src)
    elif cfg.task == "classification":
        if not label_names:
            raise ValueError("a classification model needs the data's label names")
        overrides = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                     "label2id": {name: i for i, name in enumerate(label_names)}}
        model = load_hf_model(src.path, auto_class=_AUTO["classification"], allow_missing=("classifier.",),
                              config_overrides=overrides)
    else:
        model = load_hf_model(src.path, auto_class=_AUTO["causal-lm"])
    return model, tokenizer, src.path


def build_model(cfg: ModelConfig, *, label_names: list[str] | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` for a recipe: a headmods folder as saved, or a source with
    ``cfg.variant`` swapped in (weights copied: the function-preserving start)."""
    info: dict[str, Any] = {}
    if cfg.checkpoint is not None:
        folder = Path(cfg.checkpoint)
        model = load(folder)
        tokenizer = load_tokenizer(folder)
        info["checkpoint"] = str(folder)
        if cfg.task == "classification" and label_names is not None:
            have = getattr(model.config, "num_labels", None)
            if have != len(label_names):
                raise ValueError(f"checkpoint {folder} classifies {have} labels; the data has {len(label_names)}")
    else:
        model, tokenizer, path = source_model(cfg, label_names=label_names)
        info["source"] = str(path)
        if cfg.variant is not None:
            report = swap(model, cfg.variant, **cfg.variant_config)
            info["swap"] = str(report)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without a pad token
    return model, tokenizer, info
