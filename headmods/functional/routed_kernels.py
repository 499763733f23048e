"""Padded attention for :func:`headmods.functional.routed.routed_attention`: the kernels.

Queries arrive gathered per (batch, routed head) and laid out per kv group; these functions run
the non-causal call, or the causal block scheme (a masked call per block's own keys, unmasked
rectangles for the keys before it, halved recursively, merged by log-sum-exp from the private
CPU op ``aten._scaled_dot_product_flash_attention_for_cpu``; a masked per-block fallback
elsewhere). See the docstring of :mod:`headmods.functional.routed` for the whole method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LSE_OP", "lse_attention_available", "non_causal", "causal", "ranks"]

LSE_OP = "_scaled_dot_product_flash_attention_for_cpu"


def lse_attention_available(device: torch.device | str = "cpu") -> bool:
    """Whether the private CPU flash-attention op that also returns the log-sum-exp can run here."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, LSE_OP)


def ranks(key: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Counts per key value and each element's rank among equal keys (``key`` must be non-decreasing)."""
    counts = torch.bincount(key, minlength=size)
    starts = counts.cumsum(0) - counts
    return counts, torch.arange(key.size(0), device=key.device) - starts.index_select(0, key)


def non_causal(q: Tensor, kr: Tensor, vr: Tensor, key_bias: Tensor | None, head: Tensor, bat: Tensor,
                grp: Tensor, within: Tensor, B: int, h_r: int, n: int, g: int, scale: float) -> Tensor:
    """One SDPA call: queries padded per (batch, head) to the largest count, ``(B, n, g*L, d)``."""
    P, d = q.shape
    counts, rank = ranks(head * B + bat, h_r * B)
    L = int(counts.max())
    slot = ((bat * n + grp) * g + within) * L + rank
    src = torch.zeros(B * n * g * L, dtype=torch.long, device=q.device)  # padding reads pair 0
    src[slot] = torch.arange(P, device=q.device)
    qp = q.index_select(0, src).view(B, n, g * L, d)
    out = F.scaled_dot_product_attention(qp, kr, vr, attn_mask=key_bias, scale=scale)  # (B, n, g*L, dv)
    return out.reshape(-1, vr.size(-1)).index_select(0, slot)


def causal(q: Tensor, kr: Tensor, vr: Tensor, key_bias: Tensor | None, key_live: Tensor | None,
            head: Tensor, bat: Tensor, pos: Tensor, grp: Tensor, within: Tensor, B: int, T: int, h_r: int,
            n: int, g: int, q_offset: int, block: int, scale: float, use_lse: bool) -> Tensor:
    """Causal attention of the selected queries, blockwise; returns ``(P, dv)`` in pair order.

    Layout: for each (batch, kv group), the query blocks follow each other; block ``c`` holds
    ``g`` heads x ``L_c`` rows (``L_c``: that block's largest count over (batch, head)), so the
    rows of any run of blocks are one contiguous range, ``(B, n, rows, d)``.

    With the log-sum-exp op, block ``c``'s own keys are one masked call per block (the diagonal
    tile); the keys before it are covered by unmasked calls over rectangles of the block grid:
    queries of blocks ``[mid, c1)`` against keys of blocks ``[c0, mid)``, halving recursively,
    plus the cached keys ``[0, q_offset)`` for every query. Halving keeps the query count of a
    call large (the CPU flash kernel is slower per pair below 192 and 768 queries). The partial
    results are merged by log-sum-exp. Without the op, one masked call per block over all the
    keys the block may see.
    """
    P, d = q.shape
    dv = vr.size(-1)
    dev = q.device
    nb = -(-T // block)
    blk = pos // block
    counts, rank = ranks((head * B + bat) * nb + blk, h_r * B * nb)
    L = counts.view(h_r, B, nb).amax(dim=(0, 1))  # (nb,) largest count of each block
    rows_c = g * L  # rows of block c in each (batch, group)
    first = F.pad(rows_c.cumsum(0), (1, 0))  # (nb + 1,) first row of each block; first[nb] = rows
    R = int(first[-1])
    slot = (bat * n + grp) * R + first.index_select(0, blk) + within * L.index_select(0, blk) + rank
    src = torch.zeros(B * n * R, dtype=torch.long, device=dev)  # padding reads pair 0
    src[slot] = torch.arange(P, device=dev)
    qp = q.index_select(0, src).view(B, n, R, d)
    # position of each slot relative to its block start; padding sits at the block's last position
    width = torch.clamp(T - torch.arange(nb, device=dev) * block, max=block)
    rel = torch.repeat_interleave(width - 1, rows_c).repeat(B * n)
    rel[slot] = pos - blk * block
    rel = rel.view(B * n, R)
    tb = min(block, T)
    tri = torch.full((tb, tb), float("-inf"), dtype=q.dtype, device=dev).triu(1)  # key i > row position

    acc = q.new_empty(B, n, R, dv)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    lse = torch.empty(B, n, R, dtype=lse_dtype, device=dev) if use_lse else None
    lse_op = getattr(torch.ops.aten, LSE_OP) if use_lse else None
    bounds = first.tolist()
    for c in range(nb):
        r0, r1 = bounds[c], bounds[c + 1]
        if r0 == r1:
            continue
        w = min(block, T - c * block)
        ks = q_offset + c * block  # keys before this block
        qc = qp[:, :, r0:r1]
        rc = rel[:, r0:r1]
        diag_mask = tri[:w, :w].index_select(0, rc.reshape(-1)).view(B, n, r1 - r0, w)
        if key_bias is not None:
            diag_mask = diag_mask + key_bias[..., ks:ks + w]
        if lse_op is None:
            before = q.new_zeros(1, 1, 1, ks) if key_bias is None else key_bias[..., :ks]
            mask = torch.cat([before.expand(B, n, r1 - r0, ks), diag_mask], dim=-1)
            acc[:, :, r0:r1] = F.scaled_dot_product_attention(qc, kr[:, :, :ks + w], vr[:, :, :ks + w],
                                                              attn_mask=mask, scale=scale)
            continue
        out, part = lse_op(qc, kr[:, :, ks:ks + w], vr[:, :, ks:ks + w], 0.0, False, attn_mask=diag_mask, scale=scale)
        if key_live is not None:  # the op reports lse 0 for a row with no key: make it -inf
            live = key_live.expand(B, -1)
            seen = live.gather(1, ks + rc.reshape(B, -1) + 1) - live[:, ks:ks + 1]  # live keys in [ks, ks + rel]
            part = part.masked_fill((seen == 0).view(B, n, r1 - r0), float("-inf"))
        acc[:, :, r0:r1] = out
        lse[:, :, r0:r1] = part
    if lse_op is not None:
        rects = [(0, R, 0, q_offset)] if q_offset > 0 else []  # every query against the cached keys
        _halvings(0, nb, rects, bounds, q_offset, block)
        for r0, r1, k0, k1 in rects:
            if r0 == r1:
                continue
            mask = None if key_bias is None else key_bias[..., k0:k1]
            out, part = lse_op(qp[:, :, r0:r1], kr[:, :, k0:k1], vr[:, :, k0:k1], 0.0, False, attn_mask=mask,
                               scale=scale)
            acc_l = lse[:, :, r0:r1]
            if key_live is not None:
                no_key = (key_live[:, k1] - key_live[:, k0] == 0).view(-1, 1, 1)
                part = part.masked_fill(no_key, float("-inf"))
                weight = torch.sigmoid(part - acc_l).nan_to_num_(0.0)  # both parts keyless: keep zeros
            else:
                weight = torch.sigmoid(part - acc_l)  # share of the new keys
            acc[:, :, r0:r1].lerp_(out, weight.unsqueeze(-1).to(acc.dtype))
            torch.logaddexp(acc_l, part, out=acc_l)
    return acc.view(-1, dv).index_select(0, slot)


def _halvings(c0: int, c1: int, rects: list, bounds: list[int], q_offset: int, block: int) -> None:
    """Off-diagonal rectangles of blocks ``[c0, c1)``: rows of ``[mid, c1)`` x keys of ``[c0, mid)``, recursively."""
    if c1 - c0 < 2:
        return
    mid = (c0 + c1) // 2
    rects.append((bounds[mid], bounds[c1], q_offset + c0 * block, q_offset + mid * block))
    _halvings(c0, mid, rects, bounds, q_offset, block)
    _halvings(mid, c1, rects, bounds, q_offset, block)

