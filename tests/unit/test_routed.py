"""routed_attention (the routed heads of MoH, selected pairs only) against a dense per-head reference."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import headmods.functional.routed as routed_mod
from headmods.functional.routed import routed_attention

DT = torch.float64
D, E, d = 12, 10, 8  # model dim, output dim, head dim


def reference(x, q_weight, q_bias, o_weight, k, v, kv_of_head, gate, *, rope=None, causal=False, q_offset=0,
              key_bias=None, scale=None):
    """Every routed head computed densely for every token, explicit softmax, then gated and projected."""
    B, T, _ = x.shape
    hd, dv, Tk = k.size(-1), v.size(-1), k.size(2)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    y = torch.zeros(B, T, o_weight.size(0), dtype=DT)
    for j, g in enumerate(kv_of_head):
        q = x @ q_weight[j * hd:(j + 1) * hd].T  # (B, T, hd)
        if q_bias is not None:
            q = q + q_bias[j * hd:(j + 1) * hd]
        if rope is not None:  # pair (i, i + hd/2) rotated by the angle whose cos/sin sit at column i
            cos, sin = (t[..., : hd // 2] for t in rope)
            q1, q2 = q[..., : hd // 2], q[..., hd // 2:]
            q = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
        for b in range(B):
            scores = q[b] @ k[b, g].T * scale  # (T, Tk)
            if key_bias is not None:
                scores = scores + key_bias[b if key_bias.size(0) > 1 else 0, 0, 0]
            if causal:
                later = torch.arange(Tk)[None, :] > (q_offset + torch.arange(T))[:, None]
                scores = scores.masked_fill(later, float("-inf"))
            for t in range(T):
                row = scores[t]
                if torch.isneginf(row).all():
                    continue  # no key: output 0
                p = torch.exp(row - row.max())
                head_out = (p / p.sum()) @ v[b, g]  # (dv,)
                y[b, t] += gate[b, t, j] * (head_out @ o_weight[:, j * dv:(j + 1) * dv].T)
    return y


def make(B=2, T=9, h_r=4, h_kv=4, Tk=None, dv=d, density=0.5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = T if Tk is None else Tk
    x = torch.randn(B, T, D, generator=g, dtype=DT)
    q_weight = torch.randn(h_r * d, D, generator=g, dtype=DT)
    q_bias = torch.randn(h_r * d, generator=g, dtype=DT) if bias else None
    o_weight = torch.randn(E, h_r * dv, generator=g, dtype=DT)
    k = torch.randn(B, h_kv, Tk, d, generator=g, dtype=DT)
    v = torch.randn(B, h_kv, Tk, dv, generator=g, dtype=DT)
    keep = torch.rand(B, T, h_r, generator=g) < density
    gate = (torch.rand(B, T, h_r, generator=g, dtype=DT) + 0.5) * keep
    return x, q_weight, q_bias, o_weight, k, v, gate


def check_against_reference(args, kv_of_head, **kw):
    x, q_weight, q_bias, o_weight, k, v, gate = args
    out = routed_attention(x, q_weight, q_bias, o_weight, k, v, kv_of_head, gate, **kw)
    kw = {key: val for key, val in kw.items() if key not in ("block", "use_lse")}
    want = reference(x, q_weight, q_bias, o_weight, k, v, kv_of_head, gate, **kw)
    assert out.shape == want.shape and out.dtype == DT
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    return out


def rope_tables(B, T, q_offset=0):
    pos = (q_offset + torch.arange(T, dtype=DT))[None, :, None] + torch.arange(B, dtype=DT)[:, None, None]
    angles = pos * (10000.0 ** (-torch.arange(0, d, 2, dtype=DT) / d))  # (B, T, d/2), per-batch positions
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("use_lse", [None, False])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(causal, use_lse):
    check_against_reference(make(), [0, 1, 2, 3], causal=causal, use_lse=use_lse)


@pytest.mark.parametrize("use_lse", [None, False])
@pytest.mark.parametrize("block", [1, 4, 5, 13, 256])
def test_causal_blocks_not_dividing_the_length(block, use_lse):
    check_against_reference(make(B=2, T=13, density=0.6), [0, 1, 2, 3], causal=True, block=block, use_lse=use_lse)


@pytest.mark.parametrize("use_lse", [None, False])
@pytest.mark.parametrize("T", [1, 5])
def test_decoding_after_cached_keys(T, use_lse):
    q_offset = 11
    args = make(B=2, T=T, Tk=q_offset + T, density=0.7)
    check_against_reference(args, [0, 1, 2, 3], causal=True, q_offset=q_offset, block=2, use_lse=use_lse)
    check_against_reference(args, [0, 1, 2, 3], causal=False, q_offset=q_offset)  # every key visible


def test_batches_select_differently_and_some_heads_get_nothing():
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=3, T=10, density=0.6, seed=3)
    gate[1, :, 2] = 0.0  # (batch 1, head 2) has no token
    gate[2, :, 0] = 0.0
    gate[:, :, 3] = 0.0  # head 3 is never selected
    gate[0, 4] = 0.0  # a token with no routed head
    args = (x, q_weight, q_bias, o_weight, k, v, gate)
    for causal in (False, True):
        out = check_against_reference(args, [0, 1, 2, 3], causal=causal, block=3)
        assert torch.equal(out[0, 4], torch.zeros(E, dtype=DT))


@pytest.mark.parametrize("kv_of_head, h_kv", [([0, 1, 2, 3], 4), ([0, 0, 1, 1, 2, 2, 3, 3], 4), ([3, 1, 0, 2], 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_uneven_loads_run_in_groups_of_similar_load(kv_of_head, h_kv, causal, monkeypatch):
    h_r = len(kv_of_head)
    T = 80
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=2, T=T, h_r=h_r, h_kv=h_kv, density=0.15, seed=4)
    heavy = [j for j in range(h_r) if kv_of_head[j] in (kv_of_head[0], kv_of_head[2])]  # kv heads not adjacent
    gate[:, :, heavy] = torch.rand(2, T, len(heavy), dtype=DT) + 0.5  # these heads take every token
    seen = []
    original = routed_mod._load_runs
    monkeypatch.setattr(routed_mod, "_load_runs", lambda *a, **kw: seen.append(original(*a, **kw)) or seen[-1])
    for use_lse in (None, False):
        check_against_reference((x, q_weight, q_bias, o_weight, k, v, gate), kv_of_head, causal=causal, block=16, use_lse=use_lse)
    assert all(len(runs) > 1 for runs in seen), seen


def test_load_runs():
    def runs(loads, B=1):
        head = torch.cat([torch.full((n,), j) for j, n in enumerate(loads)])
        return routed_mod._load_runs(head, torch.zeros_like(head), head, B, len(loads), len(loads))
    assert runs([10, 10, 11, 10]) == [[0, 1, 2, 3]]  # even: one padded call
    assert runs([400, 20, 30, 380]) == [[1, 2], [0, 3]]  # light and heavy heads apart
    assert runs([12, 2, 3, 11]) == [[0, 1, 2, 3]]  # too small to pay for a second set of calls
    assert runs([7]) == [[0]]


def test_all_pairs_selected():
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=2, T=7, density=1.0)
    assert (gate != 0).all()
    for causal in (False, True):
        check_against_reference((x, q_weight, q_bias, o_weight, k, v, gate), [0, 1, 2, 3], causal=causal, block=3)


def test_nothing_selected_gives_zeros():
    x, q_weight, q_bias, o_weight, k, v, gate = make()
    out = routed_attention(x, q_weight, q_bias, o_weight, k, v, [0, 1, 2, 3], torch.zeros_like(gate), causal=True)
    assert torch.equal(out, torch.zeros(2, 9, E, dtype=DT))


@pytest.mark.parametrize("kv_of_head, h_kv", [
    ([0, 0, 1, 1], 2),  # contiguous GQA groups
    ([2, 2, 3, 3], 5),  # equal groups on a range of kv heads that does not start at 0
    ([2, 3, 4, 5], 6),  # one kv head each, a slice of the kv heads (the MoH layout)
    ([1, 0, 1, 0], 2),  # equal groups, interleaved
    ([1, 0, 1, 2], 3),  # unequal groups, arbitrary order
    ([0, 0, 0, 0], 1),  # MQA
])
@pytest.mark.parametrize("causal", [False, True])
def test_kv_maps(kv_of_head, h_kv, causal):
    check_against_reference(make(B=2, T=11, h_kv=h_kv, density=0.6), kv_of_head, causal=causal, block=4)
    if causal:
        check_against_reference(make(B=2, T=11, h_kv=h_kv, density=0.6), kv_of_head, causal=True, block=4, use_lse=False)


@pytest.mark.parametrize("batch_tables", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_rope_at_each_pairs_position(causal, batch_tables):
    B, T, q_offset = 2, 10, 3
    args = make(B=B, T=T, Tk=q_offset + T)
    cos, sin = rope_tables(B if batch_tables else 1, T, q_offset)
    check_against_reference(args, [0, 1, 2, 3], rope=(cos, sin), causal=causal, q_offset=q_offset, block=4)


@pytest.mark.parametrize("use_lse", [None, False])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_and_queries_that_see_no_key(causal, use_lse):
    B, T = 3, 12
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=B, T=T, density=0.7, seed=5)
    key_bias = torch.zeros(B, 1, 1, T, dtype=DT)
    key_bias[0, ..., 9:] = float("-inf")  # right padding
    key_bias[1, ..., :6] = float("-inf")  # left padding: causal queries 0..5 see no key at all
    key_bias[2, ..., 1::3] = float("-inf")  # holes
    gate[1, :6, 0] = 1.0  # make sure some of those keyless queries are selected
    args = (x, q_weight, q_bias, o_weight, k, v, gate)
    out = check_against_reference(args, [0, 1, 2, 3], causal=causal, key_bias=key_bias, block=4, use_lse=use_lse)
    if causal:
        assert torch.equal(out[1, :6], torch.zeros(6, E, dtype=DT))
    all_padded = key_bias.clone()
    all_padded[2] = float("-inf")  # batch 2 sees nothing at all
    out = check_against_reference(args, [0, 1, 2, 3], causal=causal, key_bias=all_padded, block=4, use_lse=use_lse)
    assert torch.equal(out[2], torch.zeros(T, E, dtype=DT))
    check_against_reference(args, [0, 1, 2, 3], causal=causal, key_bias=key_bias[:1], block=4, use_lse=use_lse)  # batch-broadcast


def test_key_padding_over_a_cache():
    B, T, q_offset = 2, 6, 7
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=B, T=T, Tk=q_offset + T, density=0.7, seed=6)
    key_bias = torch.zeros(B, 1, 1, q_offset + T, dtype=DT)
    key_bias[0, ..., :q_offset] = float("-inf")  # the whole cache is padding for batch 0
    key_bias[1, ..., :q_offset + 2] = float("-inf")  # and beyond it: early queries of batch 1 see nothing
    args = (x, q_weight, q_bias, o_weight, k, v, gate)
    for use_lse in (None, False):
        out = check_against_reference(args, [0, 1, 2, 3], causal=True, q_offset=q_offset, key_bias=key_bias, block=2, use_lse=use_lse)
        assert torch.equal(out[1, :2], torch.zeros(2, E, dtype=DT))


def test_keyless_partial_attentions_before_a_live_one():
    """A query whose own block and first merged key range are all padding, but a later range is not."""
    B, T = 2, 12
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=B, T=T, density=1.0, seed=12)
    key_bias = torch.zeros(B, 1, 1, T, dtype=DT)
    key_bias[1, ..., :6] = float("-inf")  # blocks of 2: query 8's first range (keys 0-5) is padding,
    key_bias[1, ..., 8:10] = float("-inf")  # and so are its own block's keys; keys 6, 7 are not
    for use_lse in (None, False):
        out = check_against_reference((x, q_weight, q_bias, o_weight, k, v, gate), [0, 1, 2, 3], causal=True, key_bias=key_bias,
                    block=2, use_lse=use_lse)
        assert (out[1, 8:10] != 0).all()


def test_keyless_rows_are_zero_even_if_the_kernel_gives_nan(monkeypatch):
    """Kernels differ on fully masked rows (0 on CPU, NaN in some others): the result is 0 regardless."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def nan_rows(q, k, v, attn_mask=None, **kw):
        out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None:
            out = out.masked_fill(torch.isneginf(attn_mask).all(-1, keepdim=True), float("nan"))
        return out

    monkeypatch.setattr(routed_mod.F, "scaled_dot_product_attention", nan_rows)
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=2, T=8, density=1.0, seed=13)
    key_bias = torch.zeros(2, 1, 1, 8, dtype=DT)
    key_bias[1, ..., :4] = float("-inf")
    for causal in (False, True):
        kb = key_bias.clone()
        if not causal:
            kb[1] = float("-inf")  # batch 1 sees nothing
        check_against_reference((x, q_weight, q_bias, o_weight, k, v, gate), [0, 1, 2, 3], causal=causal, key_bias=kb, block=4,
              use_lse=False)


@pytest.mark.parametrize("causal", [False, True])
def test_log_sum_exp_path_equals_fallback(causal, monkeypatch):
    args = make(B=2, T=21, h_kv=2, density=0.5, seed=7)
    key_bias = torch.zeros(2, 1, 1, 21, dtype=DT)
    key_bias[1, ..., :5] = float("-inf")
    kw = dict(causal=causal, block=4, key_bias=key_bias, rope=rope_tables(2, 21))
    fast = routed_attention(*args[:6], [1, 0, 1, 1], args[6], use_lse=True if causal else None, **kw)
    slow = routed_attention(*args[:6], [1, 0, 1, 1], args[6], use_lse=False, **kw)
    monkeypatch.setattr(routed_mod, "lse_attention_available", lambda device="cpu": False)
    auto = routed_attention(*args[:6], [1, 0, 1, 1], args[6], **kw)  # as without the private op
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(auto, slow, atol=0, rtol=0)
    if causal:
        with pytest.raises(ValueError, match="use_lse=True needs"):
            routed_attention(*args[:6], [1, 0, 1, 1], args[6], use_lse=True, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_any_strides(causal):
    """Views as a layer makes them: (B, T, h, d) storage, head-dim-major storage, batch-broadcast keys."""
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=2, T=13, density=0.6)
    def stored(t, a, b):  # same values, kept in memory with dims a and b swapped
        return t.transpose(a, b).contiguous().transpose(a, b)

    layouts = {
        "time-major": (stored(k, 1, 2), stored(v, 1, 2)),
        "dim-major": (stored(k, -1, -2), stored(v, -1, -2)),
        "broadcast": (k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)),
    }
    key_bias = torch.zeros(1, 1, 1, 13, dtype=DT)
    key_bias[..., 2] = float("-inf")
    for kk, vv in layouts.values():
        check_against_reference((stored(x, 0, 1), q_weight, q_bias, o_weight, kk, vv, gate), [0, 1, 2, 3], causal=causal, block=4,
              key_bias=key_bias.expand(2, 1, 1, 13))


def test_custom_scale_and_value_dim():
    args = make(B=2, T=8, dv=5)
    for causal in (False, True):
        check_against_reference(args, [0, 1, 2, 3], causal=causal, scale=0.3, block=3)


def test_add_to_adds_in_place():
    args = make()
    base = torch.randn(2, 9, E, dtype=DT)
    acc = base.clone()
    out = routed_attention(*args[:6], [0, 1, 2, 3], args[6], causal=True, add_to=acc)
    assert out is acc
    want = base + routed_attention(*args[:6], [0, 1, 2, 3], args[6], causal=True)
    torch.testing.assert_close(acc, want, atol=1e-12, rtol=1e-12)


def test_float32_matches_float64_reference():
    args = make(B=2, T=40, density=0.4)
    out = routed_attention(*(t.float() if t is not None else None for t in args[:6]), [0, 1, 2, 3],
                           args[6].float(), causal=True, block=8)
    want = reference(*args[:6], [0, 1, 2, 3], args[6], causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


class _MatmulRows(TorchDispatchMode):
    """Counts the rows of every (add)mm by the shape of its right operand."""

    def __init__(self):
        super().__init__()
        self.rows = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = (args[0], args[1]) if packet is torch.ops.aten.mm else (args[1], args[2])
            self.rows[tuple(b.shape)] = self.rows.get(tuple(b.shape), 0) + a.size(0)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_projects_only_selected_pairs(causal, grad):
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=3, T=16, density=0.3, seed=9)
    pairs = int((gate != 0).sum())
    assert 0 < pairs < gate.numel() // 2
    with torch.set_grad_enabled(grad):
        if grad:
            x.requires_grad_()
        with _MatmulRows() as rec:
            routed_attention(x, q_weight, q_bias, o_weight, k, v, [0, 1, 2, 3], gate, causal=causal, block=4)
    assert rec.rows == {(D, d): pairs, (d, E): pairs}  # queries in, outputs out: one row per selected pair


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_given_queries_are_gathered_not_projected(causal, grad):
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=2, T=11, density=0.5, seed=14)
    rope = rope_tables(2, 11)
    queries = (x @ q_weight.T + q_bias).view(2, 11, 4, d)  # (B, T, h_r, d), before RoPE
    want = routed_attention(x, q_weight, q_bias, o_weight, k, v, [0, 1, 2, 3], gate, rope=rope, causal=causal,
                            block=4)
    with torch.set_grad_enabled(grad):
        queries = queries.clone().requires_grad_(grad)
        with _MatmulRows() as rec:
            got = routed_attention(x, None, None, o_weight, k, v, [0, 1, 2, 3], gate, rope=rope, causal=causal,
                                   block=4, queries=queries)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert (D, d) not in rec.rows  # nothing projected
    if grad:  # the gradient reaches selected query rows only (a causal first token's is 0: one key)
        got.sum().backward()
        touched = queries.grad.abs().sum(-1) != 0  # (B, T, h_r)
        assert not (touched & (gate == 0)).any() and touched.sum() >= int((gate[:, 1:] != 0).sum())


def test_unselected_tokens_are_never_read():
    x, q_weight, q_bias, o_weight, k, v, gate = make(B=2, T=10, density=0.5, seed=10)
    gate[0, 3] = 0.0
    gate[1, 7] = 0.0
    want = routed_attention(x, q_weight, q_bias, o_weight, k, v, [0, 1, 2, 3], gate, causal=True, block=4)
    x = x.clone()
    x[0, 3] = float("nan")  # a token with no routed head: its input must not matter
    x[1, 7] = float("inf")
    got = routed_attention(x, q_weight, q_bias, o_weight, k, v, [0, 1, 2, 3], gate, causal=True, block=4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_reference(causal):
    args = make(B=2, T=7, density=0.5, seed=11)
    key_bias = torch.zeros(2, 1, 1, 7, dtype=DT)
    key_bias[1, ..., :3] = float("-inf")  # includes queries with no key
    grads = []
    for fn in (routed_attention, reference):
        leaves = [t.clone().requires_grad_() for t in args]
        kw = dict(causal=causal, key_bias=key_bias, rope=rope_tables(2, 7))
        if fn is routed_attention:
            kw["block"] = 3
        out = fn(*leaves[:6], [1, 0, 1, 2], leaves[6], **kw)
        (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("x", "q_weight", "q_bias", "o_weight", "k", "v", "gate"), *grads):
        assert torch.isfinite(a).all(), name
        # the gate's gradient exists only where the pair is selected
        if name == "gate":
            b = b * (args[6] != 0)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_log_sum_exp_path_refuses_gradients():
    args = [t.clone().requires_grad_() for t in make()]
    with pytest.raises(ValueError, match="forward-only"):
        routed_attention(*args[:6], [0, 1, 2, 3], args[6], causal=True, use_lse=True)


def test_bad_arguments():
    x, q_weight, q_bias, o_weight, k, v, gate = make()
    kv = [0, 1, 2, 3]
    cases = [
        (dict(x=x[0]), r"x must have shape \(batch, seq, dim\)"),
        (dict(q_weight=q_weight[:-1]), r"q_weight must have shape \(h_r\*d, D\) = \(32, 12\)"),
        (dict(q_bias=q_bias[:-1]), r"q_bias must have shape \(32,\)"),
        (dict(o_weight=o_weight[:, :-1]), r"o_weight must have shape"),
        (dict(k=k[:, :, :-1]), r"k and v must agree"),
        (dict(kv_of_head=[0, 1, 2, 4]), r"kv_of_head entries must lie in \[0, 4\)"),
        (dict(kv_of_head=[]), "no routed heads"),
        (dict(gate=gate[..., :3]), r"gate must have shape \(batch, seq, h_r\) = \(2, 9, 4\)"),
        (dict(x=x.float()), "must share one dtype"),
        (dict(rope=(torch.ones(1, 9, 6, dtype=DT),) * 2), r"rope cos must have shape \(2 or 1, 9, 8\)"),
        (dict(causal=True, k=k[:, :, :5], v=v[:, :, :5]), r"Tk=5 < q_offset \+ T = 0 \+ 9"),
        (dict(q_offset=-1), "q_offset must be >= 0"),
        (dict(key_bias=torch.zeros(2, 1, 9, dtype=DT)), r"key_bias must have shape \(2 or 1, 1, 1, 9\)"),
        (dict(key_bias=torch.zeros(2, 1, 1, 9)), "key_bias must have x's dtype"),
        (dict(block=0), "block must be >= 1"),
        (dict(gate=gate.to("meta")), "every tensor must be on x's device cpu, got also"),
        (dict(add_to=torch.zeros(2, 9, E + 1, dtype=DT)), r"add_to must be a \(2, 9, 10\)"),
        (dict(queries=torch.zeros(2, 9, 4, d + 1, dtype=DT)), r"queries must have shape .* = \(2, 9, 4, 8\)"),
        (dict(q_weight=None), r"q_weight must have shape .* got None"),
    ]
    base = dict(x=x, q_weight=q_weight, q_bias=q_bias, o_weight=o_weight, k=k, v=v, kv_of_head=kv, gate=gate)
    for change, message in cases:
        kw = {**base, **change}
        with pytest.raises(ValueError, match=message):
            routed_attention(kw.pop("x"), kw.pop("q_weight"), kw.pop("q_bias"), kw.pop("o_weight"), kw.pop("k"),
                             kw.pop("v"), kw.pop("kv_of_head"), kw.pop("gate"), **kw)
