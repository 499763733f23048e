"""The routed-head part of Mixture-of-Head attention, computed only for the selected (token, head) pairs.

MoH (``docs/methods/moh.md``) writes attention as a gated sum over heads; a routed head is
switched on per token by a top-K router. The official code computes every head for every token
and zeroes the unselected ones afterwards, which saves nothing. :func:`routed_attention` does
work proportional to the selected pairs instead (timings: ``benchmarks/results/routed_cpu.md``):

1. **Pairs.** The selected ``(token, head)`` pairs (``gate != 0``) are listed in
   (head, batch, position) order, so each head's pairs are one contiguous run and positions
   ascend inside every (head, batch) group.
2. **Queries, exact counts.** One loop over the routed heads: gather that head's token rows of
   ``x`` (``index_select`` into a reused buffer) and multiply by that head's query rows. The
   working set of one iteration stays in cache; no query of an unselected pair is projected.
3. **RoPE** rotates each gathered query at its own position.
4. **Attention, padded per (batch, head) only here.** The queries are laid out per (batch, kv
   group) and padded to the largest count.

   - Non-causal: one SDPA call for all routed heads.
   - Causal: query positions are cut into blocks of ``block``, each padded only to its own
     largest count. A block's own keys (the diagonal tile) take one call with a small
     triangular mask. The keys before it are covered without masks by rectangles of the block
     grid, halved recursively (queries of blocks ``[mid, c1)`` against keys of blocks
     ``[c0, mid)``), which keeps many queries per call, where the CPU flash kernel is faster
     per pair. The partial results are merged by log-sum-exp, which the private CPU op
     ``aten._scaled_dot_product_flash_attention_for_cpu`` returns. Without that op (another
     device, autograd, ``dv != d`` or ``use_lse=False``) each block runs one masked SDPA call
     over all the keys it may see: exact, somewhat slower.
   - Uneven router loads: the kv groups are cut into runs of similar load, each padded only to
     its own largest count (one set of calls per run); a balanced router gives one run.
5. **Output, exact counts.** Each pair's head output is multiplied by its gate; one loop over the
   heads multiplies by that head's columns of the output projection and adds the rows into the
   tokens they came from (``index_add_``), optionally straight into the caller's output.

Keys and values are never expanded to the routed heads when the routed heads' kv heads form
equal groups: each group's queries are folded into one call against its kv head (a view of
``k``/``v`` when the kv heads used are a contiguous range). Only unequal groups fall back to
``index_select`` of the kv heads, one copy per routed head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .rope import apply_rope
from . import routed_kernels as kernels
from .routed_kernels import LSE_OP, lse_attention_available

__all__ = ["routed_attention", "lse_attention_available"]

def routed_attention(
    x: Tensor,
    q_weight: Tensor | None,
    q_bias: Tensor | None,
    o_weight: Tensor,
    k: Tensor,
    v: Tensor,
    kv_of_head: Sequence[int],
    gate: Tensor,
    *,
    rope: tuple[Tensor, Tensor] | None = None,
    causal: bool = False,
    q_offset: int = 0,
    key_bias: Tensor | None = None,
    scale: float | None = None,
    block: int = 256,
    use_lse: bool | None = None,
    add_to: Tensor | None = None,
    queries: Tensor | None = None,
) -> Tensor:
    """Gated sum of the routed heads' outputs through their output-projection columns.

    ``y[b, t] = sum_j gate[b, t, j] * head_j(x)[b, t] @ o_weight[:, j*dv:(j+1)*dv].T`` over the
    routed heads ``j`` with ``gate[b, t, j] != 0``; pairs with gate 0 are not computed at all.
    ``head_j(x)[b, t] = softmax(q . k[b, kv_of_head[j]] * scale + bias) @ v[b, kv_of_head[j]]`` with
    ``q = rope(x[b, t] @ q_weight[j*d:(j+1)*d].T + q_bias[j*d:(j+1)*d])``. A query that sees no key
    (every visible key blocked by ``key_bias``) gives 0. No output bias is added.

    Args:
        x: ``(B, T, D)`` layer input.
        q_weight: ``(h_r * d, D)`` query rows of the routed heads, head-major (unused with ``queries``).
        q_bias: ``(h_r * d,)`` or None.
        o_weight: ``(E, h_r * dv)`` output-projection columns of the routed heads.
        k, v: ``(B, h_kv, Tk, d)`` and ``(B, h_kv, Tk, dv)``: every key/value the queries may read,
            RoPE already applied, cache included. Any strides (views of a ``(B, Tk, h_kv, d)``
            projection are fine; a non-unit last-dim stride costs a copy).
        kv_of_head: routed head ``j`` -> its index on the head axis of ``k``/``v`` (``len == h_r``).
        gate: ``(B, T, h_r)`` gate of each (token, routed head); 0 means not selected.
        rope: ``(cos, sin)``, each ``(B|1, T, d)``, for the ``T`` query tokens; None: no rotation.
        causal: query ``t`` (absolute position ``q_offset + t``) sees keys ``<= q_offset + t``.
        q_offset: keys before the first query (decoding with a cache); needs ``Tk >= q_offset + T``
            when causal; ignored when not causal (every key is visible).
        key_bias: ``(B|1, 1, 1, Tk)`` additive key bias (0 / -inf for padding), or None.
        scale: score scale, ``1/sqrt(d)`` by default.
        block: query positions per causal block.
        use_lse: merge causal partial attentions by log-sum-exp (the fast path). None: whenever
            the private op is available, no gradient is needed and ``dv == d``. True where it
            cannot run is an error; the merge passes no gradient through the log-sum-exp, so it
            is forward-only. Ignored when not causal.
        add_to: a ``(B, T, E)`` tensor of ``x``'s dtype (e.g. the shared heads' output) that the
            result is added into, in place, and returned; saves a zero-filled buffer and an addition.
        queries: ``(B, T, h_r, d)`` routed queries already projected (bias included, before RoPE),
            e.g. by a query-norm router that needed them all; the selected rows are gathered from
            it instead of projected, and ``q_weight``/``q_bias`` are not used (may be None).

    Returns:
        ``(B, T, E)`` in ``x``'s dtype: ``add_to`` (updated) when given.

    Example:
        >>> B, T, D, h_r, d = 1, 6, 16, 2, 8
        >>> x, k, v = torch.randn(B, T, D), torch.randn(B, h_r, T, d), torch.randn(B, h_r, T, d)
        >>> gate = torch.tensor([[[1.0, 0.0]] * 3 + [[0.0, 2.0]] * 3])  # (B, T, h_r)
        >>> y = routed_attention(x, torch.randn(h_r * d, D), None, torch.randn(D, h_r * d), k, v,
        ...                      [0, 1], gate, causal=True)
        >>> y.shape
        torch.Size([1, 6, 16])
    """
    B, T, D, h_r, d, dv, Tk = _check(x, q_weight, q_bias, o_weight, k, v, kv_of_head, gate, rope,
                                     causal, q_offset, key_bias, block, queries)
    E = o_weight.size(0)
    if add_to is not None:
        _check_add_to(add_to, x, E)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, q_weight, q_bias, o_weight, k, v, gate, key_bias, queries))
    if use_lse is None:
        use_lse = causal and not needs_grad and dv == d and lse_attention_available(x.device)
    elif use_lse:
        if dv != d:
            raise ValueError(f"use_lse=True needs equal key and value head dims (the flash op's rule), "
                             f"got {d} and {dv}")
        if not lse_attention_available(x.device):
            raise ValueError(f"use_lse=True needs torch.ops.aten.{LSE_OP} on a CPU tensor; "
                             f"got device {x.device} (available: {hasattr(torch.ops.aten, LSE_OP)})")
        if needs_grad:
            raise ValueError("use_lse=True is forward-only (no gradient flows through the log-sum-exp merge); "
                             "run under torch.no_grad() or pass use_lse=None/False")

    # 1. selected pairs in (head, batch, position) order
    sel = gate.permute(2, 0, 1) != 0  # (h_r, B, T)
    pairs = sel.nonzero()  # (P, 3) rows (j, b, t), lexicographically ascending
    P = pairs.size(0)
    if P == 0:
        return x.new_zeros(B, T, E) if add_to is None else add_to
    head, bat, pos = pairs.unbind(1)
    rows = bat * T + pos  # row of each pair's token in x.reshape(B*T, D)
    per_head = torch.bincount(head, minlength=h_r).tolist()
    gate_p = gate.permute(2, 0, 1)[sel].to(x.dtype)  # (P,), same order as `pairs`
    x_flat = x.reshape(B * T, D)

    # 2. queries of the selected pairs only, one head at a time
    if queries is None:
        q = _project_queries(x_flat, q_weight, q_bias, rows, per_head, d, needs_grad)  # (P, d)
    else:
        q = _gather_queries(queries.reshape(B * T, h_r, d), rows, per_head, needs_grad)  # (P, d)

    # 3. RoPE at each pair's own position
    if rope is not None:
        cos, sin = rope
        crow = pos if cos.size(0) == 1 else rows
        cos_p = cos.reshape(-1, d).index_select(0, crow).to(q.dtype)
        sin_p = sin.reshape(-1, d).index_select(0, crow).to(q.dtype)
        q = apply_rope(q[None, None], cos_p[None], sin_p[None])[0, 0]

    # 4. attention over the padded (batch, kv group) layout
    kr, vr, n, g, hpos = _routed_kv(k, v, kv_of_head)
    hp = torch.tensor(hpos, device=x.device).index_select(0, head)  # layout position of each pair's head
    grp, within = hp // g, hp % g
    key_live = None
    if key_bias is not None:
        live = (key_bias.reshape(key_bias.size(0), Tk) != float("-inf")).to(torch.int32)
        key_live = F.pad(live.cumsum(1, dtype=torch.int32), (1, 0))  # (B|1, Tk+1): live keys before index

    def attend(idx: Tensor | None, kr_: Tensor, vr_: Tensor, grp_: Tensor, n_: int) -> Tensor:
        q_, head_, bat_, pos_, within_ = (t if idx is None else t.index_select(0, idx)
                                          for t in (q, head, bat, pos, within))
        if causal:
            return kernels.causal(q_, kr_, vr_, key_bias, key_live, head_, bat_, pos_, grp_, within_, B, T, h_r, n_, g,
                           q_offset, block, scale, use_lse)
        return kernels.non_causal(q_, kr_, vr_, key_bias, head_, bat_, grp_, within_, B, h_r, n_, g, scale)

    runs = _load_runs(head, bat, grp, B, h_r, n)
    if len(runs) == 1:
        o = attend(None, kr, vr, grp, n)
    else:  # uneven loads: groups of similar load, each padded only to its own largest count
        o = q.new_empty(P, dv)
        new_grp = torch.empty(n, dtype=torch.long, device=x.device)
        for groups in runs:
            index = torch.tensor(groups, device=x.device)
            member = torch.zeros(n, dtype=torch.bool, device=x.device)
            member[index] = True
            idx = member.index_select(0, grp).nonzero().squeeze(1)  # this run's pairs, order kept
            new_grp[index] = torch.arange(len(groups), device=x.device)
            o.index_copy_(0, idx, attend(idx, _pick(kr, groups), _pick(vr, groups),
                                         new_grp.index_select(0, grp.index_select(0, idx)), len(groups)))
    if key_live is not None:  # a query that sees no key gives 0, whatever the kernel did
        last = (q_offset + pos + 1) if causal else torch.full_like(pos, Tk)
        dead = key_live[bat if key_live.size(0) > 1 else torch.zeros_like(bat), last] == 0
        o = o.masked_fill(dead[:, None], 0.0)

    # 5. gate, then each head's output-projection columns, added into its tokens' rows
    o = o * gate_p[:, None]
    y = x.new_zeros(B * T, E) if add_to is None else add_to.view(B * T, E)
    _project_outputs(o, o_weight, rows, per_head, dv, y, needs_grad)
    return y.view(B, T, E) if add_to is None else add_to


# --------------------------------------------------------------------------- projections


def _project_queries(x_flat: Tensor, q_weight: Tensor, q_bias: Tensor | None, rows: Tensor,
                     per_head: list[int], d: int, needs_grad: bool) -> Tensor:
    """``(P, d)``: each pair's query, computed per head on that head's rows only."""
    P = rows.size(0)
    if needs_grad:
        parts, start = [], 0
        for j, cnt in enumerate(per_head):
            if cnt:
                w = q_weight[j * d:(j + 1) * d]
                b = None if q_bias is None else q_bias[j * d:(j + 1) * d]
                parts.append(F.linear(x_flat.index_select(0, rows[start:start + cnt]), w, b))
                start += cnt
        return torch.cat(parts)
    q = x_flat.new_empty(P, d)
    xbuf = x_flat.new_empty(max(per_head), x_flat.size(1))  # reused: one head's rows of x
    start = 0
    for j, cnt in enumerate(per_head):
        if not cnt:
            continue
        xs = torch.index_select(x_flat, 0, rows[start:start + cnt], out=xbuf[:cnt])
        wt = q_weight[j * d:(j + 1) * d].t()  # (D, d)
        if q_bias is None:
            torch.mm(xs, wt, out=q[start:start + cnt])
        else:
            torch.addmm(q_bias[j * d:(j + 1) * d], xs, wt, out=q[start:start + cnt])
        start += cnt
    return q


def _gather_queries(queries: Tensor, rows: Tensor, per_head: list[int], needs_grad: bool) -> Tensor:
    """``(P, d)``: each pair's row of the given ``(B*T, h_r, d)`` queries, one head at a time."""
    parts, start = [], 0
    q = None if needs_grad else queries.new_empty(rows.size(0), queries.size(-1))
    for j, cnt in enumerate(per_head):
        if cnt:
            head_rows = queries[:, j]  # (B*T, d), strided
            if needs_grad:
                parts.append(head_rows.index_select(0, rows[start:start + cnt]))
            else:
                torch.index_select(head_rows, 0, rows[start:start + cnt], out=q[start:start + cnt])
            start += cnt
    return torch.cat(parts) if needs_grad else q


def _project_outputs(o: Tensor, o_weight: Tensor, rows: Tensor, per_head: list[int], dv: int, y: Tensor,
                     needs_grad: bool) -> None:
    """Add ``o_p @ o_weight[:, head_p].T`` into row ``rows[p]`` of ``y (rows, E)``, in place."""
    if needs_grad:
        parts, start = [], 0
        for j, cnt in enumerate(per_head):
            if cnt:
                parts.append(o[start:start + cnt] @ o_weight[:, j * dv:(j + 1) * dv].t())
                start += cnt
        y.index_add_(0, rows, torch.cat(parts))
        return
    ybuf = o.new_empty(max(per_head), y.size(1))  # reused: one head's projected rows
    start = 0
    for j, cnt in enumerate(per_head):
        if not cnt:
            continue
        part = torch.mm(o[start:start + cnt], o_weight[:, j * dv:(j + 1) * dv].t(), out=ybuf[:cnt])
        y.index_add_(0, rows[start:start + cnt], part)
        start += cnt


# --------------------------------------------------------------------------- attention


def _routed_kv(k: Tensor, v: Tensor, kv_of_head: Sequence[int]) -> tuple[Tensor, Tensor, int, int, list[int]]:
    """Keys/values per kv group, group count ``n``, heads per group ``g``, layout position of each head.

    Routed heads are ordered by kv head (stably). Equal groups of ``g`` heads share one kv head:
    their queries are folded into one call, and the kv heads are a view of ``k``/``v`` when they
    form a contiguous range (an ``index_select`` of those kv heads otherwise). Unequal groups
    get one (copied) kv head per routed head, ``g = 1``.
    """
    kv = [int(j) for j in kv_of_head]
    order = sorted(range(len(kv)), key=kv.__getitem__)
    hpos = [0] * len(kv)
    for p, j in enumerate(order):
        hpos[j] = p
    used = sorted(set(kv))
    sizes = {kv.count(u) for u in used}
    if len(sizes) == 1:
        g, heads = sizes.pop(), used
    else:
        g, heads = 1, [kv[j] for j in order]
    first = heads[0]
    if heads == list(range(first, first + len(heads))):
        kr, vr = k[:, first:first + len(heads)], v[:, first:first + len(heads)]
    else:
        index = torch.tensor(heads, device=k.device)
        kr, vr = k.index_select(1, index), v.index_select(1, index)
    # the private flash op reads head vectors as contiguous (it is wrong otherwise, torch 2.13)
    kr = kr if kr.stride(-1) == 1 else kr.contiguous()
    vr = vr if vr.stride(-1) == 1 else vr.contiguous()
    return kr, vr, len(heads), g, hpos


def _pick(t: Tensor, heads: list[int]) -> Tensor:
    """Heads ``heads`` (ascending) of ``t (B, n, ...)``: a view when they are a contiguous range."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return t[:, heads[0]:heads[0] + len(heads)]
    return t.index_select(1, torch.tensor(heads, device=t.device))


def _load_runs(head: Tensor, bat: Tensor, grp: Tensor, B: int, h_r: int, n: int,
               extra_run: float = 0.05, extra_rows: int = 16) -> list[list[int]]:
    """Split the kv groups into runs of similar load; each run is padded to its own largest count.

    Padding every (batch, head) to the largest count wastes work when the router is uneven
    (``benchmarks/bench_routed.py`` times skewed routers). Groups sorted by load are
    cut into contiguous runs minimizing ``sum(groups in run * largest load in run)`` plus, for
    every run after the first (its extra calls and copies), ``extra_run`` times the all-padded
    cost and ``extra_rows`` rows per group. A balanced router gives one run.
    """
    if n == 1 or head.numel() <= extra_rows:  # a split could never pay for itself
        return [list(range(n))]
    per_head = torch.bincount(head * B + bat, minlength=h_r * B).view(h_r, B).amax(1)  # (h_r,)
    group_of_head = torch.zeros(h_r, dtype=torch.long, device=grp.device)
    group_of_head[head] = grp
    loads = torch.zeros(n, dtype=per_head.dtype, device=grp.device).scatter_reduce(
        0, group_of_head, per_head, reduce="amax").tolist()
    order = sorted(range(n), key=loads.__getitem__)
    penalty = extra_run * n * max(loads) + extra_rows * n
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):  # best[end]: cheapest split of the `end` lightest groups
        for start in range(end):
            cost = best[start] + (end - start) * loads[order[end - 1]] + (penalty if start else 0.0)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], n
    while end > 0:
        runs.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return runs[::-1]


def _check(x, q_weight, q_bias, o_weight, k, v, kv_of_head, gate, rope, causal, q_offset, key_bias, block, queries):
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, seq, dim), got {tuple(x.shape)}")
    B, T, D = x.shape
    h_r = len(kv_of_head)
    if h_r == 0:
        raise ValueError("kv_of_head is empty: there are no routed heads")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.size(0) != B:
            raise ValueError(f"{name} must have shape (batch={B}, kv_heads, keys, head_dim), got {tuple(t.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (batch, kv_heads, keys), got {tuple(k.shape[:3])} "
                         f"and {tuple(v.shape[:3])}")
    h_kv, Tk, d = k.shape[1:]
    dv = v.size(-1)
    if any(not 0 <= int(j) < h_kv for j in kv_of_head):
        raise ValueError(f"kv_of_head entries must lie in [0, {h_kv}), got {tuple(kv_of_head)}")
    if queries is not None:
        if queries.shape != (B, T, h_r, d):
            raise ValueError(f"queries must have shape (batch, seq, h_r, head_dim) = ({B}, {T}, {h_r}, {d}), "
                             f"got {tuple(queries.shape)}")
        q_weight = q_bias = None  # not used
    elif q_weight is None or q_weight.shape != (h_r * d, D):
        shape = None if q_weight is None else tuple(q_weight.shape)
        raise ValueError(f"q_weight must have shape (h_r*d, D) = ({h_r * d}, {D}), got {shape}")
    if q_bias is not None and q_bias.shape != (h_r * d,):
        raise ValueError(f"q_bias must have shape ({h_r * d},), got {tuple(q_bias.shape)}")
    if o_weight.dim() != 2 or o_weight.size(1) != h_r * dv:
        raise ValueError(f"o_weight must have shape (E, h_r*dv) = (E, {h_r * dv}), got {tuple(o_weight.shape)}")
    if gate.shape != (B, T, h_r):
        raise ValueError(f"gate must have shape (batch, seq, h_r) = ({B}, {T}, {h_r}), got {tuple(gate.shape)}")
    others = [q_weight, q_bias, o_weight, k, v, gate, key_bias, queries, *(rope or ())]
    devices = {t.device for t in others if t is not None} - {x.device}
    if devices:
        raise ValueError(f"every tensor must be on x's device {x.device}, got also {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in (x, q_weight, q_bias, o_weight, k, v, queries) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"x, q_weight, q_bias, o_weight, k, v, queries must share one dtype, "
                         f"got {sorted(map(str, dtypes))}")
    if rope is not None:
        for name, t in zip(("cos", "sin"), rope):
            if t.dim() != 3 or t.size(0) not in (1, B) or t.shape[1:] != (T, d):
                raise ValueError(f"rope {name} must have shape ({B} or 1, {T}, {d}), got {tuple(t.shape)}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    if causal and Tk < q_offset + T:
        raise ValueError(f"causal attention needs keys for every query: Tk={Tk} < q_offset + T = {q_offset} + {T}")
    if key_bias is not None:
        if key_bias.dim() != 4 or key_bias.size(0) not in (1, B) or key_bias.shape[1:] != (1, 1, Tk):
            raise ValueError(f"key_bias must have shape ({B} or 1, 1, 1, {Tk}), got {tuple(key_bias.shape)}")
        if key_bias.dtype != x.dtype:
            raise ValueError(f"key_bias must have x's dtype {x.dtype}, got {key_bias.dtype}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return B, T, D, h_r, d, dv, Tk


def _check_add_to(add_to: Tensor, x: Tensor, E: int) -> None:
    B, T = x.shape[:2]
    if add_to.shape != (B, T, E) or add_to.dtype != x.dtype or add_to.device != x.device:
        raise ValueError(f"add_to must be a ({B}, {T}, {E}) {x.dtype} tensor on {x.device}, got "
                         f"{tuple(add_to.shape)} {add_to.dtype} on {add_to.device}")
    if not add_to.is_contiguous():
        raise ValueError("add_to must be contiguous (the routed rows are added into its (B*T, E) view)")
