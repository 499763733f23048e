"""MoH: reduction to MHA, sparse == dense, cache decoding, gates/aux against a per-token loop."""

import math

import pytest
import torch
from torch import nn

import headmods
from headmods import KVCache, MultiHeadAttention
from headmods.layers.moh import MoHAttention

E, H, B, T = 48, 6, 2, 9


def _moh(**kw):
    kw = {"batch_first": True, **kw}
    return MoHAttention(E, H, **kw).eval()


def _copy_mha(moh):
    mha = MultiHeadAttention.from_config(headmods.AttentionConfig.from_dict(
        {k: v for k, v in moh.config.to_dict().items() if k in headmods.AttentionConfig.__dataclass_fields__}))
    mha.load_state_dict({k: v for k, v in moh.state_dict().items() if not k.startswith("router.")})
    return mha.eval()


@pytest.mark.parametrize("router", ["learned", "qnorm"])
@pytest.mark.parametrize("execution", ["dense", "sparse"])
@pytest.mark.parametrize("num_kv_heads,rope", [(6, None), (3, 1e4)])
@pytest.mark.parametrize("causal", [False, True])
def test_all_heads_active_with_neutral_router_is_mha(router, execution, num_kv_heads, rope, causal):
    moh = _moh(shared_heads=2, active_routed=H - 2, router=router, router_init="zero", execution=execution,
               num_kv_heads=num_kv_heads, rope_theta=rope)
    mha = _copy_mha(moh)
    x = torch.randn(B, T, E)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, :2] = True
    with torch.no_grad():
        out, _ = moh(x, key_padding_mask=pad, is_causal=causal)
        ref, _ = mha(x, key_padding_mask=pad, is_causal=causal)
    rows = torch.ones(B, T, dtype=torch.bool) if not causal else ~torch.tensor([[False] * T, [True, True] + [False] * (T - 2)])
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


def test_from_mha_and_swap_reduce_to_mha_with_any_shared_choice():
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(B, T, E)
    for shared_index in (None, [4, 1]):
        moh = MoHAttention.from_mha(mha, shared_heads=2, active_routed=4, router_init="zero",
                                    shared_index=shared_index).eval()
        with torch.no_grad():
            torch.testing.assert_close(moh(x)[0], mha(x, x, x)[0], atol=1e-5, rtol=1e-5)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2).eval()
    with torch.no_grad():
        ref = encoder(x)
        headmods.swap(encoder, "moh", shared_heads=1, active_routed=5, router_init="zero")
        torch.testing.assert_close(encoder(x), ref, atol=1e-5, rtol=1e-5)


def test_gqa_shared_choice_records_kv_map():
    gqa = MultiHeadAttention(E, H, num_kv_heads=2, batch_first=True).eval()
    from headmods.layers.base import Projections

    w = Projections(gqa.q_proj.weight, gqa.k_proj.weight, gqa.v_proj.weight, gqa.o_proj.weight, gqa.q_proj.bias,
                    gqa.k_proj.bias, gqa.v_proj.bias, gqa.o_proj.bias)
    moh = MoHAttention.from_projections(w, E, H, num_kv_heads=2, batch_first=True, shared_heads=2, active_routed=4,
                                        router_init="zero", shared_index=[5, 0]).eval()
    assert moh.config.kv_map == (1, 0, 0, 0, 1, 1)
    x = torch.randn(B, T, E)
    with torch.no_grad():
        torch.testing.assert_close(moh(x, is_causal=True)[0], gqa(x, is_causal=True)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["learned", "qnorm"])
@pytest.mark.parametrize("num_kv_heads,rope", [(6, None), (2, 1e4)])
@pytest.mark.parametrize("causal,padding", [(False, False), (False, True), (True, False), (True, True)])
def test_sparse_path_equals_dense_path(router, num_kv_heads, rope, causal, padding):
    torch.manual_seed(1)
    dense = _moh(shared_heads=1, active_routed=2, router=router, execution="dense", num_kv_heads=num_kv_heads,
                 rope_theta=rope, dtype=torch.float64)
    with torch.no_grad():
        for p in dense.router.parameters():
            p.normal_(0, 1.0)  # a decisive, uneven router
    sparse = MoHAttention.from_config(dense.config.replace(execution="sparse"), dtype=torch.float64).eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(3, 37, E, dtype=torch.float64)
    pad = torch.zeros(3, 37, dtype=torch.bool)
    if padding:
        pad[1, :5] = True
        pad[2, 30:] = True
    with torch.no_grad():
        a, _ = dense(x, key_padding_mask=pad, is_causal=causal)
        b, _ = sparse(x, key_padding_mask=pad, is_causal=causal)
    torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)


def test_auto_execution_is_sparse_without_grad_and_dense_in_training():
    moh = _moh(shared_heads=2, active_routed=2)
    calls = []
    sparse_forward = moh._sparse_forward
    moh._sparse_forward = lambda *a, **k: calls.append(1) or sparse_forward(*a, **k)
    x = torch.randn(B, T, E)
    with torch.no_grad():
        moh(x)
    assert calls == [1]
    moh.train()
    out, _ = moh(x)
    out.sum().backward()
    assert calls == [1] and moh.aux_loss is not None and moh.router.routed.weight.grad is not None


@pytest.mark.parametrize("router", ["learned", "qnorm"])
@pytest.mark.parametrize("num_kv_heads", [6, 3])
def test_cached_decoding_equals_full_forward(router, num_kv_heads):
    torch.manual_seed(2)
    moh = _moh(shared_heads=2, active_routed=2, router=router, num_kv_heads=num_kv_heads, rope_theta=1e4)
    x = torch.randn(B, 12, E)
    with torch.no_grad():
        full, _ = moh(x, is_causal=True)
        cache = KVCache()
        parts = [moh(x[:, :5], is_causal=True, cache=cache)[0]]
        parts += [moh(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def _loop_gates(moh, x):
    """Gates and load balance of the learned router, token by token (the official code's formulas)."""
    c = moh.config
    h_s, h_r, K = c.shared_heads, c.routed_heads, c.active_routed
    Wr, Ws, Wh = (m.weight.detach().double() for m in (moh.router.routed, moh.router.shared, moh.router.mix))
    tokens = x.reshape(-1, x.size(-1)).double()
    gates, P, f = [], torch.zeros(h_r, dtype=torch.float64), torch.zeros(h_r, dtype=torch.float64)
    for u in tokens:
        def softmax(z):
            e = [math.exp(float(v) - float(z.max())) for v in z]
            return [v / sum(e) for v in e]
        p = softmax(Wr @ u)
        chosen = sorted(range(h_r), key=lambda i: -p[i])[:K]
        total = sum(p[i] for i in chosen)
        r = [(p[i] / total * K if i in chosen else 0.0) for i in range(h_r)]
        s = [v * h_s for v in softmax(Ws @ u)]
        a = [v * 2 for v in softmax(Wh @ u)]
        gates.append([a[0] * v for v in s] + [a[1] * v for v in r])
        for i in range(h_r):
            P[i] += p[i] / len(tokens)
            f[i] += (1.0 if i in chosen else 0.0) / len(tokens)
    return torch.tensor(gates, dtype=torch.float64).view(*x.shape[:2], -1), h_r * float((P * f).sum())


def test_learned_gates_and_aux_loss_match_a_per_token_loop():
    torch.manual_seed(3)
    moh = _moh(shared_heads=2, active_routed=2, aux_weight=1.0).train()
    with torch.no_grad():
        for p in moh.router.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(B, T, E)
    routing = moh._route(x, None)
    gates, balance = _loop_gates(moh, x)
    torch.testing.assert_close(routing.gates.double(), gates, atol=1e-5, rtol=1e-5)
    assert float(moh.aux_loss) == pytest.approx(balance, rel=1e-5)


def test_aux_loss_is_K_at_a_uniform_router():
    moh = _moh(shared_heads=2, active_routed=3, router_init="zero", aux_weight=1.0).train()
    moh(torch.randn(B, T, E))
    assert float(moh.aux_loss) == pytest.approx(3.0, abs=1e-6)
    moh.eval()
    moh(torch.randn(B, T, E))
    assert moh.aux_loss is None


def test_qnorm_routes_to_the_largest_query_norms():
    moh = _moh(shared_heads=1, active_routed=2, router="qnorm", bias=False)
    d = E // H
    with torch.no_grad():
        moh.q_proj.weight.zero_()
        for head, scale in ((1, 1.0), (2, 5.0), (3, 0.5), (4, 3.0), (5, 2.0)):  # routed heads 0..4
            moh.q_proj.weight[head * d:(head + 1) * d, :d] = scale * torch.eye(d)
    x = torch.zeros(1, 1, E)
    x[0, 0, :d] = 1.0
    routing = moh._route(x, moh.q_proj(x).view(1, 1, H, d)[:, :, 1:])
    assert routing.select[0, 0].tolist() == [False, True, False, True, False]  # norms 5 and 3 win
    assert routing.gates[0, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_usage_statistics_and_pruning_unused_heads():
    torch.manual_seed(4)
    moh = _moh(shared_heads=1, active_routed=2, router_init="zero", usage_decay=0.0)
    with torch.no_grad():
        moh.router.routed.weight.normal_(0, 1.0)
        moh.router.routed.weight[3] = -5.0  # routed head 3 never wins for positive inputs
    x = torch.rand(B, T, E) + 0.5
    with torch.no_grad():
        before, _ = moh(x)
    assert moh.usage[3] == 0 and float(moh.usage.sum()) == pytest.approx(2.0)
    unused = int((moh.usage == 0).sum())
    moh.prune_unused(min_usage=1e-9)
    assert moh.num_heads == H - unused and moh.router.routed.out_features == 5 - unused
    assert moh.config.routed_heads == 5 - unused and moh.config.kept_heads[0] == 0 and 4 not in moh.config.kept_heads
    with torch.no_grad():
        after, _ = moh(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # the dropped head was never used


def test_bad_configurations():
    with pytest.raises(ValueError, match=r"shared_heads \+ active_routed \(2 \+ 5\) exceeds num_heads \(6\)"):
        MoHAttention(E, H, shared_heads=2, active_routed=5)
    with pytest.raises(ValueError, match="active_routed=0 with shared_heads=0 leaves no head active"):
        MoHAttention(E, H, shared_heads=0, active_routed=0)
    with pytest.raises(ValueError, match=r"router must be one of \('learned', 'qnorm'\), got 'topk'"):
        MoHAttention(E, H, router="topk")
    with pytest.raises(ValueError, match=r"shared_index must list distinct heads in \[0, 6\), got \[1, 1\]"):
        MoHAttention.from_mha(nn.MultiheadAttention(E, H), shared_heads=2, shared_index=[1, 1])


def test_config_defaults_and_round_trip():
    c = MoHAttention(E, H).config
    assert (c.shared_heads, c.active_routed, c.routed_heads) == (2, 2, 4)
    assert type(c).from_json(c.to_json()) == c


def test_shared_heads_chosen_by_importance():
    from headmods.convert.moh import shared_from_scores, swap_moh

    assert shared_from_scores({"a": [0.1, 0.9, 0.5, 0.9]}, 2) == {"a": [1, 3]}
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2).eval()
    x = torch.randn(B, T, E)
    with torch.no_grad():
        ref = encoder(x)
    scores = {"layers.0.self_attn": torch.tensor([0.0, 0.0, 3.0, 0.0, 2.0, 0.0]),
              "layers.1.self_attn": torch.arange(6.0)}
    report = swap_moh(encoder, scores, shared_heads=2, active_routed=4, router_init="zero")
    assert report.paths == ["layers.0.self_attn", "layers.1.self_attn"]
    first = encoder.layers[0].self_attn
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), ref, atol=1e-5, rtol=1e-5)  # all heads on: still MHA
    assert first.config.shared_heads == 2 and first.q_proj.weight.shape == (E, E)
    with pytest.raises(ValueError, match="has 6 heads; cannot share 7"):
        shared_from_scores({"x": [0.0] * 6}, 7)
