"""Recipes: the Lightning layer of headmods (data, tasks, training, reports, the runner).

Submodules import ``lightning`` and ``datasets`` only when they are used, so ``headmods ls`` and
other light commands stay fast and ``import headmods`` never imports them.

- :mod:`.config`: the YAML recipe schema (strict), overrides.
- :mod:`.data` / :mod:`.text_sources`: offline data (BBC News, pydoc, passkey, local files) and
  a step-resumable ``LightningDataModule``.
- :mod:`.tasks` / :mod:`.training`: classification and causal-LM tasks, resumable fits.
- :mod:`.report` / :mod:`.plots`: ``report.md``, ``metrics.json`` and PNG plots.
- :mod:`.runner`: convert / finetune / prune / eval / demo.
- :mod:`.compare_pipeline` / :mod:`.positions`: the compare recipe (variants from the same random
  init at equal steps; per variant the host's RoPE, learned absolute positions or none).

Example:
    >>> from headmods.recipes import DataConfig
    >>> DataConfig("passkey", passkey_samples=8).passkey_samples
    8
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DATA_KINDS": "data", "Collator": "data", "DataConfig": "data", "RecipeDataModule": "data",
    "ResumableLoader": "data", "StepStream": "data", "bbc_folder": "text_sources", "load_local": "text_sources",
    "passkey_samples": "text_sources", "pydoc_texts": "text_sources", "read_label_folder": "text_sources",
    "RecipeConfig": "config", "load_config": "config", "run_recipe": "runner", "RunReport": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
