"""Where a from-scratch LLaMA's token order comes from, per compared variant: RoPE, absolute embeddings or none.

The ``compare`` recipe builds every variant on the same LLaMA blocks; a variant's ``positions``
says how those blocks see token order:

- ``rope`` (default): the host passes its rotary ``(cos, sin)`` to the swapped layers, as any
  LLaMA does (RoPE-MHA, CMHA). Nothing changes.
- ``none``: the swapped layers get no host RoPE (``LlamaAttentionAdapter.host_rope = False``).
  Order reaches them only through their own terms (RCMHA's relative logits and causal
  convolutions, as in the RCMHA paper), or only through the causal mask for plain MHA ("NoPE").
- ``absolute``: ``none`` plus learned absolute position embeddings added to the token embeddings,
  GPT-2 style (:class:`AbsolutePositionEmbedding`): the "MHA (absolute)" baseline on LLaMA blocks.
  One row per position up to the host's ``max_position_embeddings``, drawn from
  ``N(0, initializer_range)`` (0.02 for LLaMA, the same as GPT-2's ``wpe`` in transformers).

Absolute positions are ``0 .. T-1`` of each forward's input: right for training and for
evaluating whole sequences, wrong for cached decoding (a new token would get position 0), so
:func:`set_positions` makes the model refuse a non-empty cache and ``position_ids`` that are not
``0 .. T-1``. The ``compare`` recipe never decodes and never saves its models; the host-RoPE switch
and the extra embedding are not recorded in a headmods checkpoint.

Example:
    >>> import headmods, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    ...                                num_attention_heads=4, max_position_embeddings=16)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg)
    >>> _ = headmods.swap(model, "mha")
    >>> set_positions(model, "absolute").get_input_embeddings().positions.weight.shape
    torch.Size([16, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["POSITIONS", "NEEDS_ROPE", "AbsolutePositionEmbedding", "check_positions", "set_positions"]

POSITIONS = ("rope", "absolute", "none")
NEEDS_ROPE = ("cmha", "longheads")  # variants whose method is defined on rotary positions


def check_positions(name: str, variant: str, positions: Any) -> str:
    """``positions`` of the compared variant ``name`` (layer ``variant``), checked; ValueError when unusable.

    Example:
        >>> check_positions("rmha", "rcmha", "none")
        'none'
    """
    if positions not in POSITIONS:
        raise ValueError(f"compare.variants.{name}.positions must be one of {POSITIONS}, got {positions!r}")
    if positions != "rope" and variant in NEEDS_ROPE:
        raise ValueError(f"compare.variants.{name}: variant {variant!r} needs rotary positions (RoPE), so its "
                         f"positions must be 'rope'; got {positions!r}")
    return positions


class AbsolutePositionEmbedding(nn.Module):
    """Token embeddings plus learned absolute position embeddings of positions ``0 .. T-1`` (GPT-2's ``wpe``).

    Wraps the host's token embedding (``tokens``, kept as is, so a tied LM head stays tied) and adds
    ``positions (max_positions, D)``, drawn from ``N(0, std)``. ``weight`` is the token embedding's,
    for code that reads ``model.get_input_embeddings().weight``.

    Example:
        >>> emb = AbsolutePositionEmbedding(nn.Embedding(10, 4), max_positions=8)
        >>> emb(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 4])
    """

    def __init__(self, tokens: nn.Embedding, max_positions: int, *, std: float = 0.02) -> None:
        super().__init__()
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
            raise ValueError(f"max_positions must be an int >= 1, got {max_positions!r}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.tokens = tokens
        weight = tokens.weight
        self.positions = nn.Embedding(max_positions, weight.size(1), device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.positions.weight, std=std)

    @property
    def weight(self) -> nn.Parameter:
        return self.tokens.weight

    @property
    def max_positions(self) -> int:
        return self.positions.num_embeddings

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.size(-1)
        if T > self.max_positions:
            raise ValueError(f"absolute position embeddings cover {self.max_positions} positions; "
                             f"got a sequence of {T} tokens")
        where = torch.arange(T, device=input_ids.device)
        return self.tokens(input_ids) + self.positions(where)  # (B, T, D) + (T, D)

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}"


def set_positions(model: nn.Module, positions: str, *, name: str = "model") -> nn.Module:
    """Give the headmods layers of a transformers LLaMA-family ``model`` their ``positions``; returns ``model``.

    ``"rope"`` leaves the model as it is; ``"none"`` stops every headmods layer from taking the
    host's RoPE; ``"absolute"`` also wraps the input embedding in :class:`AbsolutePositionEmbedding`
    and makes the model refuse cached decoding. ``name`` is the compared variant, for messages.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r} ({name})")
    if positions == "rope":
        return model
    for layer in _llama_layers(model, positions, name):
        layer.host_rope = False
    if positions == "absolute":
        _add_absolute(model, name)
    return model


def _llama_layers(model: nn.Module, positions: str, name: str) -> list[nn.Module]:
    """The headmods layers that take RoPE from a LLaMA-family host; ValueError when there are none."""
    from ..integrations.hf.llama import LlamaAttentionAdapter

    layers = [m for m in model.modules() if isinstance(m, LlamaAttentionAdapter)]
    if not layers:
        raise ValueError(f"positions {positions!r} ({name}) switches off the host's RoPE in headmods layers swapped "
                         f"into a LLaMA-family model; {type(model).__name__} has none (swap a variant in first)")
    return layers


def _add_absolute(model: nn.Module, name: str) -> None:
    tokens = model.get_input_embeddings()
    if not isinstance(tokens, nn.Embedding):
        raise ValueError(f"positions 'absolute' ({name}) wraps an nn.Embedding of tokens; "
                         f"{type(model).__name__}'s input embedding is a {type(tokens).__name__}")
    config = model.config
    wrapped = AbsolutePositionEmbedding(tokens, int(config.max_position_embeddings),
                                        std=float(getattr(config, "initializer_range", 0.02)))
    model.set_input_embeddings(wrapped)
    model.base_model.register_forward_pre_hook(_refuse_offsets, with_kwargs=True)


def _refuse_offsets(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: absolute positions are ``0 .. T-1`` of the input, so no cache offset, no other ids."""
    from ..integrations.hf.common import pick_cache

    cache = pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"), kwargs.get("past_key_value"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"absolute position embeddings here number the tokens of each input from 0; cached "
                         f"decoding (a cache of {cache.get_seq_length()} tokens) would restart at 0. Run whole "
                         "sequences without a cache")
    ids = kwargs.get("position_ids")
    if ids is not None and not torch.equal(ids, torch.arange(ids.size(-1), device=ids.device).expand_as(ids)):
        raise ValueError("absolute position embeddings here number the tokens of each input 0 .. T-1; got other "
                         f"position_ids (first row starts {ids.reshape(-1, ids.size(-1))[0, :4].tolist()})")
