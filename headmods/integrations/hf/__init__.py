"""Hugging Face transformers hosts (LLaMA family, BERT, GPT-2) and attention-function registration.

Nothing here imports transformers at module load; only :mod:`.attention_fns` needs it, when called.
"""

from .attention_fns import headmods_attention, register_attention

__all__ = ["headmods_attention", "register_attention"]
