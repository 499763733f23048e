"""LongHeads kernels: per-head chunk selection with contiguous re-positioning (training-free long context).

Paper: "LongHeads: Multi-Head Attention is Secretly a Long Context Processor", Lu et al., arXiv
2402.10685; method page ``docs/methods/longheads.md`` (the algorithm follows the official code). Inputs are *un-roped* queries
and keys; this module applies RoPE itself, at the positions LongHeads assigns.

- The sequence is cut into chunks of ``w = chunk_size`` tokens. Each complete chunk ``g`` has a
  representation (:func:`chunk_representations`): inside the chunk, q and k get RoPE at local
  positions ``0..w-1``; ``o = softmax(q k^T / sqrt(d)) v`` (non-causal); ``s_g = mean(o)``;
  ``c_g = softmax(s_g k^T / sqrt(d)) k``.
- A query at position ``t < begin`` attends causally to every earlier key, at the original
  positions (standard attention, exactly).
- A query at ``t >= begin`` in chunk ``cur = t // w`` attends to ``K = attend_length / w`` chunks:
  chunk 0, chunk ``cur - 1``, the current chunk cut at ``t`` (``t`` included; the official
  prefill leaves it out, an off-by-one we do not reproduce), and the ``K - 3`` chunks among
  ``1 .. cur - 2`` whose representation best matches the *un-roped* query (``q . c_g``, as the
  official code scores; optionally the query roped at a fixed position, :func:`chunk_scores`). The chunks keep their order and are placed contiguously: keys at
  positions ``0 .. L-1``, the query at ``L - 1``, so no head ever sees a position beyond
  ``attend_length``.
- GQA (not in the official code): a key/value head serves several query heads, so chunks are
  chosen per key/value head, from the *mean* of its query heads' scores, and all of them attend
  to the same chunks.
- Selection granularity: ``block`` query tokens (a divisor of ``w``) choose once, keeping for
  each chunk the highest probability any of their tokens gives it (:func:`chunk_scores`).
  ``block=1`` is the official per-token selection; ``block=w`` (the default of the layer) is the
  deviation that makes the cost linear in length with one SDPA call per block
  (timings: ``benchmarks/results/longheads_cpu.md``). A block's choice uses all its queries, so a token's keys can
  depend on the (at most ``block - 1``) tokens after it in its block: block selection is not
  strictly causal inside a block. Decoding, a token at a time, is per-token and causal.

Shapes: B batch, h query heads, h_kv key/value heads, d head_dim, Tq new queries, Tk keys
(``q_start + Tq``), G complete chunks with a representation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .rope import apply_rope, rope_cos_sin

__all__ = ["chunk_representations", "chunk_scores", "longheads_attention", "select_chunks", "check_longheads"]


def check_longheads(chunk_size: int, attend_length: int, begin: int, block: int) -> int:
    """Validate the LongHeads sizes; returns ``K``, the chunks each query attends to."""
    for name, value in (("chunk_size", chunk_size), ("attend_length", attend_length),
                        ("begin_selective_length", begin), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if attend_length % chunk_size:
        raise ValueError(f"attend_length ({attend_length}) must be a multiple of chunk_size ({chunk_size})")
    chunks = attend_length // chunk_size
    if chunks < 3:
        raise ValueError(f"attend_length must hold at least 3 chunks (first, previous, current): "
                         f"{attend_length} / {chunk_size} = {chunks}")
    if begin < attend_length or begin % chunk_size:
        raise ValueError(f"begin_selective_length ({begin}) must be a multiple of chunk_size ({chunk_size}) and at "
                         f"least attend_length ({attend_length})")
    if chunk_size % block:
        raise ValueError(f"the selection block ({block}) must divide chunk_size ({chunk_size})")
    return chunks


def _rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    cos, sin = rope_cos_sin(positions, x.size(-1), theta, dtype=x.dtype)
    return apply_rope(x, cos.to(x.device), sin.to(x.device))


def chunk_representations(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, theta: float,
                          scale: float | None = None) -> Tensor:
    """``c_g`` of complete chunks: ``q (B, h, G*w, d)``, ``k, v (B, h_kv, G*w, d)`` un-roped -> ``(B, h, G, d)``.

    Only the mean of the in-chunk outputs is needed, and ``mean_i softmax(q_i K^T) V`` is
    ``(mean_i P_i) V``: the scores are batched over chunks and reduced to one attention row per
    query head and chunk, with no ``P V`` product. The ``h / h_kv`` query heads of a key/value
    head sit side by side in each chunk's query rows (the in-chunk attention is not causal), so
    GQA needs no key copies.
    """
    B, h, T, d = q.shape
    h_kv, w = k.size(1), chunk_size
    if T % w or k.size(2) != T:
        raise ValueError(f"chunk representations need whole chunks of {w}: q has {T} tokens, k {k.size(2)}")
    G, r, N = T // w, h // h_kv, B * h_kv
    if G == 0:
        return q.new_zeros(B, h, 0, d)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cos, sin = rope_cos_sin(torch.arange(w, device=q.device), d, theta, dtype=q.dtype)  # local positions 0..w-1
    qc = q.new_empty(B, h_kv, G, r, w, d)  # queries roped locally, a kv head's r query heads per chunk
    _rope_into(q.view(B, h_kv, r, G, w, d), cos, sin, qc.permute(0, 1, 3, 2, 4, 5))
    kc = _rope_into(k.view(B, h_kv, G, w, d), cos, sin, k.new_empty(B, h_kv, G, w, d))
    qf, kf = qc.view(N * G, r * w, d), kc.view(N * G, w, d)  # (kv head, chunk) pairs as one batch
    step = max(1, (1 << 22) // (r * w * w))  # pairs per slab: <= 16 MB of scores
    rows = []
    for a in range(0, N * G, step):
        s = torch.bmm(qf[a:a + step], kf[a:a + step].transpose(1, 2)).mul_(scale)  # (n, r*w, w)
        s = s.sub_(s.amax(dim=-1, keepdim=True)).exp_().view(-1, r, w, w)  # unnormalized softmax rows
        inv = s.sum(dim=-1).reciprocal_().div_(w)  # (n, r, w): 1 / (w * row sum)
        rows.append(torch.bmm(inv.view(-1, 1, w), s.view(-1, w, w)))  # each query head's mean attention row
    mean_p = torch.cat(rows).view(N, G, r, w)
    qc, kc = qc.view(N, G, r * w, d), kc.view(N, G, w, d)
    s_vec = torch.matmul(mean_p, v.reshape(N, G, w, v.size(-1)))  # mean output (N, G, r, d)
    c = F.scaled_dot_product_attention(s_vec, kc, kc, scale=scale)  # (N, G, r, d)
    return c.view(B, h_kv, G, r, d).permute(0, 1, 3, 2, 4).reshape(B, h, G, d)


def chunk_scores(q: Tensor, reps: Tensor, bounds: list[tuple[int, int]], h_kv: int, *, chunk_size: int,
                 theta: float, scale: float, query_position: int | None = None) -> Tensor:
    """How much each query block wants each chunk: ``(B, h_kv, Q, G)``, for :func:`select_chunks`.

    Every query token ``t`` scores the chunks it may pick (``1 .. cur-2``) by ``q_t . c_g``, turned
    into a distribution over them (softmax with the attention scale); a key/value head takes the
    mean of its query heads' distributions, and a block keeps, per chunk, the largest probability
    any of its tokens gives it. With one-token blocks this ranks chunks exactly as the official
    ``q_t . c_g`` does. (A block's *mean* query, the obvious alternative, dilutes the one token that
    asks for a distant chunk: on the README's passkey model it almost never found the key past the
    trained length, and this rule almost always did; the figures are in the README's LongHeads
    section.)

    Args:
        q: ``(B, h, T, d)`` un-roped queries of the selective positions ``bounds[0][0] ..``.
        reps: ``(B, h, G, d)`` chunk representations.
        bounds: ``(start, end)`` absolute positions of the query blocks, contiguous, each inside
            one chunk of ``chunk_size`` tokens.
        query_position: ``None`` scores with the un-roped query, as the official code does (the
            representation's keys carry RoPE at ``0..w-1``, the query none). An int places the query
            at that RoPE position, so the score sees the keys at a distance the model was trained
            on (a deviation, off by default; ``docs/methods/longheads.md``).
    """
    B, h, T, d = q.shape
    G = reps.size(2)
    first = bounds[0][0]
    block_of = torch.cat([torch.full((e - s,), i, device=q.device) for i, (s, e) in enumerate(bounds)])
    if query_position is not None:
        q = _rope(q, torch.full((T,), query_position, device=q.device), theta)
    g = torch.arange(G, device=q.device)
    out = q.new_full((B, h_kv, len(bounds), G), float("-inf"))
    # slabs of at most 2048 tokens (and ~64 MB of scores); each scores only the chunks its tokens may pick
    block = bounds[0][1] - bounds[0][0] if len(bounds) == 1 else bounds[1][1] - bounds[1][0]  # the first may be cut
    step = max(1, min(2048, (1 << 24) // max(1, B * h * G)))
    step = max(block, step // block * block)  # whole blocks per slab where the blocks allow
    for a in range(0, T, step):
        b = min(T, a + step)
        cur = torch.arange(first + a, first + b, device=q.device) // chunk_size
        n = min(G, int(cur[-1]) - 1)  # chunks 1 .. cur-2 of the slab's last token, plus chunk 0
        if n < 2:
            continue  # nothing to pick yet: every probability stays -inf
        eligible = (g[None, :n] >= 1) & (g[None, :n] <= cur[:, None] - 2)  # (tokens, n)
        s = torch.matmul(q[:, :, a:b], reps[:, :, :n].transpose(-1, -2)).mul_(scale)
        p = s.masked_fill_(~eligible, float("-inf")).softmax(dim=-1).nan_to_num_(0.0)  # no choice: 0 everywhere
        if h != h_kv:
            p = p.view(B, h_kv, h // h_kv, b - a, n).mean(dim=2)
        i0, i1 = int(block_of[a]), int(block_of[b - 1]) + 1
        if all(z - u == block for u, z in bounds[i0:i1]) and (b - a) == (i1 - i0) * block:  # whole blocks
            out[:, :, i0:i1, :n] = p.view(B, h_kv, i1 - i0, block, n).amax(dim=3)
        else:
            index = block_of[a:b].view(1, 1, -1, 1).expand(B, h_kv, b - a, n)
            out[..., :n].scatter_reduce_(2, index, p, reduce="amax")
    return out


def select_chunks(scores: Tensor, current: Tensor, chunks: int) -> Tensor:
    """Chunk indices per (batch, kv head, query block), ascending: 0, the best ``chunks - 3`` of
    ``1 .. cur-2``, ``cur - 1``, ``cur``.

    Args:
        scores: ``(B, h_kv, Q, G)`` query-block x chunk-representation scores.
        current: ``(Q,)`` the chunk each query block lies in (every ``cur >= chunks``).
        chunks: K, chunks attended per query.
    """
    B, h_kv, Q, G = scores.shape
    g = torch.arange(G, device=scores.device)
    eligible = (g[None, :] >= 1) & (g[None, :] <= current[:, None] - 2)  # (Q, G)
    picked = []
    if chunks > 3:
        masked = scores.masked_fill(~eligible, float("-inf"))
        picked = [masked.topk(chunks - 3, dim=-1).indices]  # (B, h_kv, Q, K-3)
    cur = current.view(1, 1, Q, 1).expand(B, h_kv, Q, 1)
    forced = [torch.zeros_like(cur), cur - 1, cur]
    return torch.cat(forced[:1] + picked + forced[1:], dim=-1).sort(dim=-1).values


def longheads_attention(q: Tensor, k: Tensor, v: Tensor, reps: Tensor, *, chunk_size: int, attend_length: int,
                        begin: int, theta: float, q_start: int, block: int, scale: float | None = None,
                        query_position: int | None = None, batch_tokens: bool = True) -> Tensor:
    """LongHeads attention of ``Tq`` new queries over all ``Tk = q_start + Tq`` keys (causal).

    Args:
        q: ``(B, h, Tq, d)`` un-roped queries at positions ``q_start .. Tk - 1``.
        k, v: ``(B, h_kv, Tk, d)`` un-roped keys and values of every position so far.
        reps: ``(B, h, G, d)`` chunk representations of at least the chunks selection may pick.
        chunk_size, attend_length, begin, block: see :func:`check_longheads`.
        theta: RoPE base.
        query_position: RoPE position of the queries when scoring chunks (see :func:`chunk_scores`).
        q_start: position of the first query (the number of cached tokens before it).
        batch_tokens: with ``block=1``, batch a chunk's tokens into one call (False: the block
            loop with one-token blocks, one call per token; the same result, slower).

    Returns:
        ``(B, h, Tq, d)``.
    """
    B, h, Tq, d = q.shape
    h_kv, Tk, w = k.size(1), k.size(2), chunk_size
    K = check_longheads(chunk_size, attend_length, begin, block)
    if Tk != q_start + Tq:
        raise ValueError(f"keys must cover every position: q_start {q_start} + {Tq} queries != {Tk} keys")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = q.new_empty(B, h, Tq, v.size(-1))
    dense_end = min(max(begin, q_start), Tk)  # queries before this position use full causal attention
    if dense_end > q_start:
        n = dense_end - q_start
        pos_k = torch.arange(dense_end, device=q.device)
        qd = _rope(q[:, :, :n], pos_k[q_start:], theta)
        kd = _rope(k[:, :, :dense_end], pos_k, theta)
        out[:, :, :n] = _causal(qd, kd, v[:, :, :dense_end], scale)
    if dense_end == Tk:
        return out
    # selective part: query blocks of `block` positions inside one chunk
    bounds, s = [], dense_end  # blocks are aligned to multiples of `block`; a decoding step may start mid-block
    while s < Tk:
        e = min(Tk, (s // block + 1) * block)
        bounds.append((s, e))
        s = e
    current = torch.tensor([s // w for s, _ in bounds], device=q.device)
    needed = int(current.max()) - 1  # chunks 1 .. cur-2 may be picked
    if K > 3 and reps.size(2) < needed:
        raise ValueError(f"selection needs representations of chunks 0..{needed - 1}, got {reps.size(2)}")
    scores = chunk_scores(q[:, :, dense_end - q_start:], reps[:, :, :max(needed, 1)], bounds, h_kv, chunk_size=w,
                          theta=theta, scale=scale, query_position=query_position)  # (B, h_kv, Q, G)
    chosen = select_chunks(scores, current, K)  # (B, h_kv, Q, K)
    cos, sin = rope_cos_sin(torch.arange(K * w, device=q.device), d, theta, dtype=q.dtype)  # shared by all blocks
    if block == 1 and batch_tokens:
        _per_token(q, k, v, out, chosen, bounds, q_start, w, K, cos, sin, scale)
        return out
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        _blocks_no_grad(q, k, v, out, chosen, bounds, q_start, w, K, cos, sin, scale)
        return out
    masks: dict[tuple[int, int, int], Tensor] = {}
    offsets = torch.arange(w, device=q.device)
    for i, (s, e) in enumerate(bounds):  # with gradients: out= buffers cannot carry them
        length = (K - 1) * w + (e - 1) % w + 1  # K-1 whole chunks + the current one cut at the block's end
        index = (chosen[:, :, i, :, None] * w + offsets).reshape(B, h_kv, K * w)[:, :, :length]
        k_index = index[..., None].expand(B, h_kv, length, d)
        v_index = index[..., None].expand(B, h_kv, length, v.size(-1))
        kg = apply_rope(torch.gather(k, 2, k_index), cos[:, :length], sin[:, :length])
        vg = torch.gather(v, 2, v_index)
        n = e - s
        qb = apply_rope(q[:, :, s - q_start:e - q_start], cos[:, length - n:length], sin[:, length - n:length])
        out[:, :, s - q_start:e - q_start] = _causal(qb, kg, vg, scale, masks)
    return out


_GROUP_BYTES = 4 << 20  # gathered keys + values per SDPA call (a few MB: small enough to stay in cache)


def _blocks_no_grad(q: Tensor, k: Tensor, v: Tensor, out: Tensor, chosen: Tensor, bounds: list, q_start: int,
                    w: int, K: int, cos: Tensor, sin: Tensor, scale: float) -> None:
    """The block loop for inference: one SDPA call per query block, every copy into a reused buffer.

    Choices kept because they timed faster on CPU (``benchmarks/bench_longheads.py``):

    - keys and values are first copied head-first and padded to whole chunks, so a block gathers
      whole chunks (``w * d`` contiguous values) with one ``index_select``;
    - the keys' copy puts each rotated pair side by side (dimension ``i`` next to ``i + d/2``), so
      re-positioning is one complex multiply per block instead of four half-width passes; the
      queries get the same pairing, which leaves every ``q . k`` unchanged (values keep their
      layout, so the output does too);
    - GQA: a key/value head's query heads are stacked into one query sequence (with the causal
      mask repeated), so keys are neither copied per query head nor split into small calls;
    - half-precision inputs are re-positioned and attended in float32 (there is no complex
      bfloat16);
    - keys are rotated in place in the gather buffer, a few key/value heads per call
      (``_GROUP_BYTES``), so a block's working set stays in cache.

    The SDPA calls alone set a floor under this loop: the CPU kernel is slower per query-key pair
    on short (one block of queries) calls than on one long causal call. The measured floor and the
    layer's ratios against causal SDPA are in ``benchmarks/results/longheads_cpu.md`` and the README.
    """
    B, h, _, d = q.shape
    h_kv, Tk, dv = k.size(1), k.size(2), v.size(-1)
    r, half, L = h // h_kv, d // 2, K * w
    G = -(-Tk // w)  # chunks, the last one possibly partial (padded; padding is never attended)
    ct = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32  # complex bfloat16 does not exist
    k_pairs = torch.empty(B, h_kv, G * w, half, 2, dtype=ct, device=k.device)
    v_rows = torch.empty(B, h_kv, G * w, dv, dtype=ct, device=v.device)
    k_pairs[:, :, Tk:] = 0.0  # the padding is gathered with the current chunk but cut off before attention
    v_rows[:, :, Tk:] = 0.0
    k_pairs[:, :, :Tk].copy_(k.view(B, h_kv, Tk, 2, half).transpose(-1, -2))
    v_rows[:, :, :Tk].copy_(v)
    H = B * h_kv
    k_chunks, v_chunks = k_pairs.view(H * G, w * d), v_rows.view(H * G, w * dv)
    rot = torch.complex(cos[0, :, :half].to(ct), sin[0, :, :half].to(ct))  # (L, d/2): position p turns pair i by p f_i
    flat = (chosen + (torch.arange(H, device=q.device) * G).view(B, h_kv, 1, 1)).view(H, -1, K)  # rows of k_chunks
    heads = max(1, min(H, _GROUP_BYTES // (L * (d + dv) * k_pairs.element_size())))  # kv heads per call
    k_buf, v_buf = k_pairs.new_empty(heads * K, w * d), v_rows.new_empty(heads * K, w * dv)
    out_rows = out.view(H, r, out.size(2), dv)
    q_bufs: dict[int, Tensor] = {}
    masks: dict[tuple[int, int, int], Tensor] = {}
    for i, (s, e) in enumerate(bounds):
        n, length = e - s, (K - 1) * w + (e - 1) % w + 1  # K-1 whole chunks + the current one cut at the block's end
        qb = q_bufs.get(n)
        if qb is None:
            qb = q_bufs[n] = k_pairs.new_empty(H, r, n, half, 2)
        qb.view(B, h_kv, r, n, half, 2).copy_(
            q[:, :, s - q_start:e - q_start].reshape(B, h_kv, r, n, 2, half).transpose(-1, -2))
        qc = torch.view_as_real(torch.view_as_complex(qb).mul_(rot[length - n:length]))  # at length-n .. length-1
        mask = _end_aligned_mask(n, length, r, k_buf, masks) if n > 1 else None
        for j in range(0, H, heads):
            g = min(heads, H - j)
            index = flat[j:j + g, i].reshape(-1)
            kb = torch.index_select(k_chunks, 0, index, out=k_buf[:g * K]).view(g, L, half, 2)[:, :length]
            vb = torch.index_select(v_chunks, 0, index, out=v_buf[:g * K]).view(g, L, dv)[:, :length]
            torch.view_as_complex(kb).mul_(rot[:length])  # keys at positions 0 .. length-1, in place
            o = F.scaled_dot_product_attention(qc[j:j + g].view(1, g, r * n, d), kb.reshape(1, g, length, d),
                                               vb[None], attn_mask=mask, scale=scale)
            out_rows[j:j + g, :, s - q_start:e - q_start] = o.view(g, r, n, dv)

def _per_token(q: Tensor, k: Tensor, v: Tensor, out: Tensor, chosen: Tensor, bounds: list, q_start: int, w: int,
               K: int, cos: Tensor, sin: Tensor, scale: float) -> None:
    """Per-token selection, tokens of one chunk batched: each token gets its own gathered keys.

    Tokens ``t`` of chunk ``cur`` share the forced chunks; each has its own top-k and its own cut
    of the current chunk (a key mask), all in one SDPA call over (batch x tokens) sequences. The
    group size keeps the gathered keys near 16 MB.
    """
    B, h, _, d = q.shape
    h_kv, L = k.size(1), K * w
    per_group = max(1, (1 << 22) // (L * d * h_kv * B))
    offsets = torch.arange(w, device=q.device)
    positions = torch.tensor([s for s, _ in bounds], device=q.device)
    start = 0
    while start < len(bounds):
        cur = int(positions[start]) // w
        end = start + 1
        while end < len(bounds) and end - start < per_group and int(positions[end]) // w == cur:
            end += 1
        n = end - start
        t = positions[start:end]  # (n,) absolute positions
        index = (chosen[:, :, start:end, :, None] * w + offsets).reshape(B, h_kv, n * L)
        index = index.clamp(max=k.size(2) - 1)  # slots past the sequence's end are masked below
        kg = torch.gather(k, 2, index[..., None].expand(B, h_kv, n * L, d)).view(B, h_kv, n, L, d)
        vg = torch.gather(v, 2, index[..., None].expand(B, h_kv, n * L, v.size(-1))).view(B, h_kv, n, L, v.size(-1))
        kg = apply_rope(kg.transpose(1, 2).reshape(B * n, h_kv, L, d), cos, sin)  # keys at 0 .. L-1
        vg = vg.transpose(1, 2).reshape(B * n, h_kv, L, v.size(-1))
        q_pos = (K - 1) * w + t % w  # each query sits right after its own keys
        qt = q[:, :, t - q_start].transpose(1, 2).reshape(B * n, h, 1, d)
        qt = apply_rope(qt, cos[0, q_pos].repeat(B, 1)[:, None], sin[0, q_pos].repeat(B, 1)[:, None])
        keep = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # (n, L): the current chunk cut at t
        mask = keep.repeat(B, 1)[:, None, None, :]  # (B*n, 1, 1, L)
        o = F.scaled_dot_product_attention(qt, kg, vg, attn_mask=mask, scale=scale, enable_gqa=h != h_kv)
        out[:, :, t - q_start] = o.view(B, n, h, -1).transpose(1, 2)
        start = end


def _rope_into(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor) -> Tensor:
    """``apply_rope(x, cos, sin)`` written into ``out`` with no temporaries (rotate-half layout).

    ``cos, sin``: ``(1, T, d)``, broadcast over every leading dimension of ``x (..., T, d)``.
    """
    if torch.is_grad_enabled() and x.requires_grad:  # out= kernels do not record gradients
        return out.copy_(apply_rope(x, cos, sin))
    half = x.size(-1) // 2
    c, s_ = cos[:, None, :, :half], sin[:, None, :, :half]  # cos/sin repeat each frequency in both halves
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s_, value=-1.0)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s_)
    return out


def _causal(q: Tensor, k: Tensor, v: Tensor, scale: float, masks: dict | None = None) -> Tensor:
    """Causal attention with the diagonal aligned to the end of the keys (queries are the last keys)."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    bias = _end_aligned_mask(Tq, Tk, 1, q, {} if masks is None else masks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


def _end_aligned_mask(n: int, length: int, repeat: int, like: Tensor, masks: dict) -> Tensor:
    """Additive ``(repeat * n, length)`` causal mask whose ``n`` query rows are the last ``n`` keys,
    stacked ``repeat`` times; in ``like``'s dtype, built once per shape (SDPA would convert a bool
    mask on every call)."""
    bias = masks.get((n, length, repeat))
    if bias is None:
        keep = torch.ones(n, length, dtype=torch.bool, device=like.device).tril(length - n).repeat(repeat, 1)
        bias = masks[(n, length, repeat)] = torch.zeros(repeat * n, length, dtype=like.dtype,
                                                        device=like.device).masked_fill(~keep, float("-inf"))
    return bias
