import pytest
import torch

from headmods.functional import AttentionMask, attend, causal_bias, from_mha
from reference import ShapeRecorder, contiguous_groups, naive_attention

B, D = 2, 8
LAYOUTS = {  # name: (num_heads, num_kv_heads, kv_map or None)
    "mha": (4, 4, None),
    "gqa": (4, 2, None),
    "mqa": (4, 1, None),
    "map_uniform": (4, 2, (1, 0, 1, 0)),
    "map_unequal": (4, 2, (0, 0, 1, 0)),
}


def _inputs(h, h_kv, tq, tk, dtype=torch.float64):
    return (torch.randn(B, h, tq, D, dtype=dtype), torch.randn(B, h_kv, tk, D, dtype=dtype),
            torch.randn(B, h_kv, tk, D, dtype=dtype))


def _masks(h, tq, tk):
    """name -> (AttentionMask, blocked bool (B, h, Tq, Tk), bias float (B, h, Tq, Tk))."""
    none = torch.zeros(B, h, tq, tk, dtype=torch.bool)
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).logical_not().expand(B, h, tq, tk)
    pad = torch.zeros(B, tk, dtype=torch.bool)
    pad[1, : tk - 2] = True  # batch 1 sees only its last two keys; with causal, early rows see nothing
    per_head = torch.randn(B, h, tq, tk, dtype=torch.float64)
    return {
        "none": (AttentionMask(), none, None),
        "causal": (AttentionMask(causal=True), causal, None),
        "padding+causal": (from_mha(pad, None, True, batch_size=B, num_heads=h, q_len=tq, k_len=tk,
                                    dtype=torch.float64), causal | pad[:, None, None, :], None),
        "float_bias": (AttentionMask(per_head), none, per_head),
    }


def _impl_context(impl):
    return torch.no_grad() if impl == "flex" else torch.enable_grad()


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lengths", [(5, 5), (3, 6)], ids=["square", "after_cache"])
@pytest.mark.parametrize("mask_name", ["none", "causal", "padding+causal", "float_bias"])
def test_backends_match_naive_loop(impl, layout, lengths, mask_name):
    h, h_kv, kv_map = LAYOUTS[layout]
    tq, tk = lengths
    q, k, v = _inputs(h, h_kv, tq, tk)
    mask, blocked, bias = _masks(h, tq, tk)[mask_name]
    groups = list(kv_map) if kv_map else contiguous_groups(h, h_kv)
    ref, ref_w = naive_attention(q, k, v, groups, blocked=blocked, bias=bias)
    with _impl_context(impl):
        out, weights = attend(q, k, v, mask, kv_map=kv_map, impl=impl, need_weights=impl == "eager")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    if impl == "eager":
        torch.testing.assert_close(weights, ref_w, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fully_masked_rows_give_zeros_and_finite_grads(impl):
    q, k, v = (t.float().requires_grad_() for t in _inputs(4, 2, 3, 4))
    bias = torch.zeros(B, 1, 3, 4)
    bias[0, 0, 1] = float("-inf")  # batch 0, query 1 sees nothing
    out, _ = attend(q, k, v, AttentionMask(bias), impl=impl)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, 1], torch.zeros(4, D))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_sdpa_and_eager_gradients_agree():
    grads = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(1)
        q, k, v = (t.requires_grad_() for t in _inputs(4, 2, 5, 5))
        out, _ = attend(q, k, v, AttentionMask(causal=True), kv_map=(0, 1, 1, 0), impl=impl)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[impl] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["sdpa"], grads["eager"]):
        torch.testing.assert_close(a, b)


def test_auto_picks_eager_for_weights_and_sdpa_otherwise():
    q, k, v = _inputs(4, 4, 3, 3)
    assert attend(q, k, v, impl="auto")[1] is None
    w = attend(q, k, v, impl="auto", need_weights=True)[1]
    assert w.shape == (B, 4, 3, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, 4, 3, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_map", [None, (1, 0, 1, 0, 1, 0), (0, 0, 0, 0, 1, 1)])
def test_keys_and_values_are_never_expanded_to_query_heads(impl, kv_map):
    h, h_kv, tq, tk = 6, 2, 4, 9  # an expanded K/V would have shape (B, 6, 9, D)
    q, k, v = _inputs(h, h_kv, tq, tk, dtype=torch.float32)
    with ShapeRecorder() as rec:
        attend(q, k, v, AttentionMask(causal=True), kv_map=kv_map, impl=impl)
    assert (B, h, tk, D) not in rec.shapes and (B, h, D, tk) not in rec.shapes
    assert rec.shapes, "the recorder saw no ops"


def test_flex_refuses_training_on_cpu_and_dropout():
    q, k, v = (t.float().requires_grad_() for t in _inputs(4, 4, 3, 3))
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        attend(q, k, v, impl="flex")
    with torch.no_grad(), pytest.raises(ValueError, match="dropout_p=0.1"):
        attend(q, k, v, impl="flex", dropout_p=0.1)


def test_bad_arguments():
    q, k, v = _inputs(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        attend(q, k, v)
    with pytest.raises(ValueError, match="impl must be one of"):
        attend(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="need_weights=True needs the eager backend"):
        attend(q, k, v, impl="sdpa", need_weights=True)
    with pytest.raises(ValueError, match=r"one entry per query head \(4\), got 3"):
        attend(q, k, v, kv_map=(0, 1, 2))
    with pytest.raises(ValueError, match=r"kv heads \[2\] unused"):
        attend(q, k, v, kv_map=(0, 1, 1, 0))
    with pytest.raises(ValueError, match=r"q must have shape .* got \(4, 2, 8\)"):
        attend(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim differ: 8 vs 4"):
        attend(q, k[..., :4], v)


def test_dropout_is_applied_in_both_backends():
    q, k, v = _inputs(4, 4, 6, 6)
    for impl in ("sdpa", "eager"):
        a, _ = attend(q, k, v, impl=impl, dropout_p=0.5)
        b, _ = attend(q, k, v, impl=impl, dropout_p=0.0)
        assert not torch.allclose(a, b)


def test_causal_bias_helper_agrees_with_mask_flag():
    q, k, v = _inputs(4, 4, 3, 7)
    flag, _ = attend(q, k, v, AttentionMask(causal=True))
    explicit, _ = attend(q, k, v, AttentionMask(causal_bias(3, 7, dtype=torch.float64)))
    torch.testing.assert_close(flag, explicit)
