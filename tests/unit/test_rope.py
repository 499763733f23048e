import pytest
import torch

from headmods.functional.rope import apply_rope, rope_cos_sin, rope_inv_freq
from reference import rope_loop


@pytest.mark.parametrize("theta", [10000.0, 1e5])
def test_apply_rope_matches_pairwise_loop(theta):
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 100])
    cos, sin = rope_cos_sin(positions, 8, theta, dtype=torch.float64)
    # angles are float32 (as in transformers), so large positions carry ~1e-7 relative error
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_loop(x, positions, theta), atol=1e-5, rtol=1e-5)


def test_per_batch_positions():
    x = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])
    cos, sin = rope_cos_sin(positions, 4, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    for b in range(2):
        torch.testing.assert_close(out[b], rope_loop(x[b], positions[b], 10000.0), atol=1e-6, rtol=1e-6)


def test_offset_positions_equal_slice_of_full():
    cos_full, sin_full = rope_cos_sin(torch.arange(10), 16)
    cos_tail, sin_tail = rope_cos_sin(torch.arange(6, 10), 16)
    assert torch.equal(cos_full[:, 6:], cos_tail) and torch.equal(sin_full[:, 6:], sin_tail)


def test_matches_transformers_llama_convention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=1e5)
    hf_rope = LlamaRotaryEmbedding(config)
    positions = torch.tensor([[3, 4, 5, 6, 7]])
    hf_cos, hf_sin = hf_rope(torch.randn(1, 5, 64), positions)
    cos, sin = rope_cos_sin(positions, 16, 1e5)
    torch.testing.assert_close(cos, hf_cos)
    torch.testing.assert_close(sin, hf_sin)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k)


def test_relative_property_scores_depend_on_distance_only():
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 8, dtype=torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 8, dtype=torch.float64)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="even head_dim, got 7"):
        rope_inv_freq(7)
    with pytest.raises(ValueError, match="positive, got -1"):
        rope_inv_freq(8, -1)
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.float32"):
        rope_cos_sin(torch.zeros(3), 8)
    with pytest.raises(ValueError, match=r"got \(1, 1, 3\)"):
        rope_cos_sin(torch.zeros(1, 1, 3, dtype=torch.long), 8)
