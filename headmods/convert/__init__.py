"""Conversion inputs: locating source checkpoints and reading them without pickle or network.

- :func:`resolve_source` / :func:`list_sources`: short names from ``checkpoints/*.json``
  manifests (which installed package holds the weights, format, sha256) or local paths.
- :func:`read_hf_folder`: ``(config dict, state dict)`` from an HF folder (safetensors, shards,
  ``.bin`` through ``torch.load(weights_only=True)``), checked as it reads.
- :func:`load_hf_model`, :func:`load_gguf_model`, :func:`load_tokenizer`: transformers models
  and tokenizers from local files, fp32, eval mode.

Everything that needs ``transformers`` or ``safetensors`` imports it inside the function, so
``import headmods.convert`` works with torch alone.

Example:
    >>> import headmods.convert as hc
    >>> hc.resolve_source("minilm").manifest["family"]
    'bert'
"""

from .readers import WEIGHT_FILES, load_gguf_model, load_hf_model, load_tokenizer, read_hf_folder
from .sources import Source, checkpoints_dir, list_sources, resolve_source, sha256_file

__all__ = [
    "Source",
    "WEIGHT_FILES",
    "checkpoints_dir",
    "list_sources",
    "load_gguf_model",
    "load_hf_model",
    "load_tokenizer",
    "read_hf_folder",
    "resolve_source",
    "sha256_file",
]
