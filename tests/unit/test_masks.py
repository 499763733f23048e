import pytest
import torch

from headmods.functional import masks as M

NEG = float("-inf")


def test_causal_bias_is_end_aligned():
    bias = M.causal_bias(2, 4)
    for i in range(2):
        for j in range(4):
            allowed = j <= i + 2
            assert (bias[i, j] == 0) if allowed else (bias[i, j] == NEG)


def test_causal_square_matches_tril():
    bias = M.causal_bias(5, 5)
    assert torch.equal(bias == 0, torch.ones(5, 5, dtype=torch.bool).tril())


def test_from_mha_bool_true_means_masked():
    kpm = torch.tensor([[False, True, False]])
    m = M.from_mha(kpm, None, batch_size=1, num_heads=2, q_len=2, k_len=3, dtype=torch.float32)
    assert m.bias.shape == (1, 1, 1, 3)
    assert m.bias[0, 0, 0].tolist() == [0.0, NEG, 0.0]
    assert not m.causal


def test_from_mha_float_masks_are_added_and_combined():
    kpm = torch.tensor([[0.0, -1.0, 0.5]])
    am = torch.tensor([[0.0, 2.0, NEG], [1.0, 0.0, 0.0]])
    m = M.from_mha(kpm, am, batch_size=1, num_heads=2, q_len=2, k_len=3, dtype=torch.float32)
    expected = am + kpm  # broadcast over queries
    assert torch.equal(m.bias[0, 0], expected)


def test_from_mha_mixed_bool_and_float():
    kpm = torch.tensor([[False, False, True]])
    am = torch.tensor([[0.0, 2.0, 0.0]]).expand(2, 3)
    m = M.from_mha(kpm, am, batch_size=1, num_heads=1, q_len=2, k_len=3, dtype=torch.float32)
    assert m.bias[0, 0, 0].tolist() == [0.0, 2.0, NEG]


def test_from_mha_3d_attn_mask_is_per_batch_and_head():
    B, h = 2, 3
    am = torch.zeros(B * h, 1, 2, dtype=torch.bool)
    am[4, 0, 1] = True  # batch 1, head 1
    m = M.from_mha(None, am, batch_size=B, num_heads=h, q_len=1, k_len=2, dtype=torch.float32)
    assert m.bias.shape == (B, h, 1, 2)
    assert m.bias[1, 1, 0, 1] == NEG
    assert (m.bias == NEG).sum() == 1


def test_from_sdpa_bool_true_means_attend():
    m = M.from_sdpa(torch.tensor([[True, False]]), is_causal=True)
    assert m.bias.tolist() == [[[[0.0, NEG]]]]
    assert m.causal


def test_from_hf_padding_one_means_keep():
    m = M.from_hf_padding(torch.tensor([[1, 1, 0], [0, 1, 1]]), causal=True)
    assert m.bias.shape == (2, 1, 1, 3)
    assert m.bias[:, 0, 0].tolist() == [[0.0, 0.0, NEG], [NEG, 0.0, 0.0]]
    assert m.causal


def test_materialize_combines_causal_and_padding():
    kpm = torch.tensor([[True, False, False]])  # first key is padding
    m = M.from_mha(kpm, None, True, batch_size=1, num_heads=1, q_len=3, k_len=3, dtype=torch.float32)
    full = m.materialize(3, 3, dtype=torch.float32, device="cpu")[0, 0]
    for i in range(3):
        for j in range(3):
            allowed = j <= i and j != 0
            assert (full[i, j] == 0) == allowed


def test_for_sdpa_uses_fast_causal_only_when_equivalent():
    causal = M.AttentionMask(causal=True)
    assert causal.for_sdpa(4, 4, dtype=torch.float32, device="cpu") == (None, True)
    mask, is_causal = causal.for_sdpa(2, 4, dtype=torch.float32, device="cpu")  # queries after 2 cached keys
    assert not is_causal and torch.equal(mask, M.causal_bias(2, 4)[None, None])
    assert causal.for_sdpa(1, 7, dtype=torch.float32, device="cpu") == (None, False)


@pytest.mark.parametrize("bad", [torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.uint8)])
def test_integer_masks_are_refused(bad):
    with pytest.raises(TypeError, match="bool or floating-point.*int64|uint8"):
        M.from_mha(bad, None, batch_size=1, num_heads=1, q_len=1, k_len=3, dtype=torch.float32)


def test_wrong_shapes_name_expected_and_actual():
    with pytest.raises(ValueError, match=r"\(1, 3\).*got \(1, 4\)"):
        M.from_mha(torch.zeros(1, 4, dtype=torch.bool), None, batch_size=1, num_heads=1, q_len=2, k_len=3,
                   dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(2, 3\).*got \(3, 3\)"):
        M.from_mha(None, torch.zeros(3, 3), batch_size=1, num_heads=1, q_len=2, k_len=3, dtype=torch.float32)


def test_nan_in_float_mask_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        M.from_mha(None, torch.tensor([[float("nan")]]), batch_size=1, num_heads=1, q_len=1, k_len=1,
                   dtype=torch.float32)
