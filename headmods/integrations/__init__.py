"""Putting headmods layers into other people's models.

Each supported host kind (``nn.MultiheadAttention``, HF LLaMA family / BERT / GPT-2, timm-style
ViT attention) is a :class:`~headmods.integrations.base.Host`; :func:`headmods.swap` finds them.
Host libraries are imported lazily: ``import headmods`` needs torch alone.
"""

from .base import Extracted, Host, adapter_class, find_host, host_list, host_named

__all__ = ["Extracted", "Host", "adapter_class", "find_host", "host_list", "host_named"]
