"""headmods.MultiHeadAttention against nn.MultiheadAttention and naive references."""

import pytest
import torch
from torch import nn

import headmods
from headmods import KVCache, MultiHeadAttention
from reference import contiguous_groups, naive_attention, rope_loop

E, H, B, L, S = 32, 4, 2, 5, 7


def _pair(batch_first, **kw):
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw).eval()
    with torch.no_grad():  # non-zero biases, so a bias mix-up cannot hide
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mha, MultiHeadAttention.from_mha(mha).eval()


def _x(batch_first, length=L):
    return torch.randn(B, length, E) if batch_first else torch.randn(length, B, E)


def _mha_masks():
    kpm_bool = torch.zeros(B, L, dtype=torch.bool)
    kpm_bool[1, -2:] = True
    attn_bool = torch.rand(L, L) > 0.7
    attn_bool.fill_diagonal_(False)
    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm_bool},
        "kpm_float": {"key_padding_mask": torch.randn(B, L)},
        "attn_bool": {"attn_mask": attn_bool},
        "attn_float": {"attn_mask": torch.randn(L, L)},
        "attn_3d": {"attn_mask": torch.randn(B * H, L, L)},
        "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True},
        "causal_and_padding": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L),
                               "key_padding_mask": kpm_bool.float().masked_fill(kpm_bool, float("-inf"))},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(_mha_masks()))
@pytest.mark.parametrize("weights", ["none", "averaged", "per_head"])
def test_equals_nn_multihead_attention(batch_first, mask, weights):
    mha, ours = _pair(batch_first)
    x = _x(batch_first)
    kw = _mha_masks()[mask]
    need = weights != "none"
    ref_out, ref_w = mha(x, x, x, need_weights=need, average_attn_weights=weights == "averaged", **kw)
    out, w = ours(x, x, x, need_weights=need, average_attn_weights=weights == "averaged", **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    if need:
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    else:
        assert w is None


def test_is_causal_alone_means_causal():
    mha, ours = _pair(True)
    x = _x(True)
    ref, _ = mha(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(L), need_weights=False)
    out, _ = ours(x, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_with_kdim_vdim(batch_first):
    mha, ours = _pair(batch_first, kdim=12, vdim=20)
    q = _x(batch_first)
    k = torch.randn(B, S, 12) if batch_first else torch.randn(S, B, 12)
    v = torch.randn(B, S, 20) if batch_first else torch.randn(S, B, 20)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 3:] = True
    ref, ref_w = mha(q, k, v, key_padding_mask=kpm)
    out, w = ours(q, k, v, key_padding_mask=kpm, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)


def test_unbatched_input():
    mha, ours = _pair(False)
    x = torch.randn(L, E)
    ref, ref_w = mha(x, x, x, average_attn_weights=False)
    out, w = ours(x, need_weights=True, average_attn_weights=False)
    assert out.shape == (L, E) and w.shape == (H, L, L)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)


def test_gradients_equal_nn_multihead_attention():
    mha, ours = _pair(True)
    mha.train(), ours.train()
    x = _x(True)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -1] = True
    target = torch.randn(B, L, E)
    ((mha(x, x, x, key_padding_mask=kpm)[0] - target) ** 2).sum().backward()
    ((ours(x, key_padding_mask=kpm)[0] - target) ** 2).sum().backward()
    q_g, k_g, v_g = mha.in_proj_weight.grad.chunk(3)
    torch.testing.assert_close(ours.q_proj.weight.grad, q_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.k_proj.weight.grad, k_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.v_proj.weight.grad, v_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.o_proj.weight.grad, mha.out_proj.weight.grad, atol=1e-4, rtol=1e-4)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())


def _naive_layer(layer, x, *, causal=False, positions=None, theta=None):
    """Explicit reference of a headmods MHA/GQA layer (batch-first x): projections, per-head loop."""
    c = layer.config
    Bx, T, _ = x.shape
    q = (x @ layer.q_proj.weight.T + layer.q_proj.bias).view(Bx, T, c.num_heads, c.head_dim).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T + layer.k_proj.bias).view(Bx, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T + layer.v_proj.bias).view(Bx, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
    if theta is not None:
        q, k = rope_loop(q, positions, theta), rope_loop(k, positions, theta)
    blocked = None
    if causal:
        blocked = torch.ones(T, T, dtype=torch.bool).triu(1).expand(Bx, c.num_heads, T, T)
    groups = list(c.kv_map) if c.kv_map else contiguous_groups(c.num_heads, c.num_kv_heads)
    heads, _ = naive_attention(q, k, v, groups, blocked=blocked)
    merged = heads.transpose(1, 2).reshape(Bx, T, -1)
    return merged @ layer.o_proj.weight.double().T + layer.o_proj.bias.double()


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_gqa_equals_naive_repeat_kv_reference(num_kv_heads):
    layer = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(B, L, E, dtype=torch.float64)
    out, _ = layer(x, is_causal=True)
    torch.testing.assert_close(out, _naive_layer(layer, x, causal=True), atol=1e-10, rtol=1e-8)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = MultiHeadAttention(E, H, num_kv_heads=2, batch_first=True).eval()
    mha = MultiHeadAttention(E, H, batch_first=True).eval()
    d = gqa.head_dim
    rows = torch.cat([torch.arange(d) + (i // 2) * d for i in range(H)])  # kv head of each query head
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.o_proj.load_state_dict(gqa.o_proj.state_dict())
        for src, dst in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            dst.weight.copy_(src.weight[rows])
            dst.bias.copy_(src.bias[rows])
    x = torch.randn(B, L, E)
    torch.testing.assert_close(gqa(x, is_causal=True)[0], mha(x, is_causal=True)[0], atol=1e-5, rtol=1e-5)


def test_rope_layer_equals_naive_reference():
    layer = MultiHeadAttention(E, H, num_kv_heads=2, batch_first=True, rope_theta=500.0, dtype=torch.float64).eval()
    x = torch.randn(B, L, E, dtype=torch.float64)
    positions = torch.tensor([3, 4, 5, 6, 7])
    out, _ = layer(x, is_causal=True, positions=positions)
    ref = _naive_layer(layer, x, causal=True, positions=positions, theta=500.0)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_backends_agree_at_layer_level(impl, num_kv_heads):
    ref_layer = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, batch_first=True, rope_theta=1e4).eval()
    layer = MultiHeadAttention.from_config(ref_layer.config.replace(impl=impl)).eval()
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(B, L, E)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, :2] = True
    with torch.no_grad():
        ref, _ = ref_layer(x, key_padding_mask=kpm, is_causal=True)
        out, _ = layer(x, key_padding_mask=kpm, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads,rope", [(4, None), (2, 1e4), (1, 1e4)])
@pytest.mark.parametrize("max_len", [None, 16])
def test_cached_decoding_equals_full_forward(num_kv_heads, rope, max_len):
    layer = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, batch_first=True, rope_theta=rope).eval()
    T = 9
    x = torch.randn(B, T, E)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, 0] = True  # a left-padded sequence
    with torch.no_grad():
        full, _ = layer(x, key_padding_mask=kpm, is_causal=True)
        cache = KVCache(max_len=max_len)
        steps = [layer(x[:, :4], key_padding_mask=kpm[:, :4], is_causal=True, cache=cache)[0]]
        for t in range(4, T):  # then one token at a time; the padding mask covers cached + new keys
            steps.append(layer(x[:, t:t + 1], key_padding_mask=kpm[:, :t + 1], is_causal=True, cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == T


def test_cached_chunks_with_need_weights():
    layer = MultiHeadAttention(E, H, batch_first=True, rope_theta=1e4).eval()
    x = torch.randn(B, 6, E)
    with torch.no_grad():
        _, full_w = layer(x, is_causal=True, need_weights=True)
        cache = KVCache()
        layer(x[:, :3], is_causal=True, cache=cache)
        _, w = layer(x[:, 3:], is_causal=True, cache=cache, need_weights=True)
    torch.testing.assert_close(w, full_w[:, 3:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads,keep", [(4, [0, 2]), (2, [0, 1]), (2, [1, 2, 3]), (2, [3]), (1, [1, 3])])
def test_pruned_layer_equals_zeroed_heads(num_kv_heads, keep):
    layer = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, batch_first=True, rope_theta=1e4).eval()
    x = torch.randn(B, L, E)
    d = layer.head_dim
    zeroed = MultiHeadAttention.from_config(layer.config).eval()
    zeroed.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for i in set(range(H)) - set(keep):
            zeroed.o_proj.weight[:, i * d:(i + 1) * d] = 0.0
        expected, _ = zeroed(x, is_causal=True)
        layer.prune_heads(keep)
        out, _ = layer(x, is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    kept_kv = len({i // (H // num_kv_heads) for i in keep})
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (len(keep), kept_kv, d)
    assert layer.q_proj.weight.shape == (len(keep) * d, E)
    assert layer.k_proj.weight.shape == (kept_kv * d, E)
    assert layer.o_proj.weight.shape == (E, len(keep) * d)
    expected_params = E * (len(keep) + 2 * kept_kv) * d + (len(keep) + 2 * kept_kv) * d + E * len(keep) * d + E
    assert sum(p.numel() for p in layer.parameters()) == expected_params


def test_pruning_to_unequal_groups_records_kv_map_and_survives_round_trip():
    layer = MultiHeadAttention(E, H, num_kv_heads=2, batch_first=True).eval()
    layer.prune_heads([0, 1, 2])  # kv head 0 keeps two query heads, kv head 1 keeps one
    assert layer.config.kv_map == (0, 0, 1)
    layer.prune_heads([0, 2])  # indices into the current heads; kept_heads maps back to the original
    assert layer.config.kept_heads == (0, 2) and layer.config.kv_map is None and layer.num_kv_heads == 2
    layer.prune_heads([1])
    assert layer.config.kept_heads == (2,)
    layer = MultiHeadAttention(E, H, num_kv_heads=2, batch_first=True).eval().prune_heads([0, 1, 2])
    rebuilt = MultiHeadAttention.from_config(MultiHeadAttention.config_class.from_json(layer.config.to_json()))
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(B, L, E)
    torch.testing.assert_close(rebuilt.eval()(x)[0], layer(x)[0])


def test_config_round_trips_through_json():
    layer = headmods.create("mha", 48, 6, num_kv_heads=3, batch_first=True, rope_theta=1e5, dropout=0.1, bias=False)
    c = layer.config
    assert (c.head_dim, c.kdim, c.vdim, c.kv_map, c.out_bias) == (8, 48, 48, None, False)
    mixed = headmods.create("mha", 48, 6, bias=False, out_bias=True)
    assert mixed.q_proj.bias is None and mixed.o_proj.bias is not None
    again = type(c).from_json(c.to_json())
    assert again == c
    with pytest.raises(Exception):
        c.num_heads = 3  # frozen


def test_transformer_encoder_accepts_the_layer():
    enc_layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(enc_layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(B, L, E)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, -2:] = True
    encoder.eval()
    with torch.no_grad():
        ref = encoder(x, src_key_padding_mask=pad)
    for layer in encoder.layers:
        layer.self_attn = MultiHeadAttention.from_mha(layer.self_attn)
    for mode in ("train", "eval"):
        getattr(encoder, mode)()
        out = encoder(x, src_key_padding_mask=pad)
        assert torch.isfinite(out).all()
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out[~pad], ref[~pad], atol=1e-5, rtol=1e-5)


def test_compiles_without_graph_breaks():
    layer = MultiHeadAttention(E, H, num_kv_heads=2, batch_first=True, rope_theta=1e4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, L, E)
    torch.testing.assert_close(compiled(x, is_causal=True)[0], layer(x, is_causal=True)[0])
