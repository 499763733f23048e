"""Adversarial cases for every registered variant: interleaved caches, half precision, copies.

``HEADMODS_TEST_DEVICE=cuda`` runs the layer cases on a GPU (CI runs them on the CPU).

Each layer gets its parameters perturbed away from its function-preserving start (identity
convolutions, neutral gates), so that state kept between calls changes the output when it is wrong.
"""

import copy
import os

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import headmods
from headmods import KVCache

DEVICE = torch.device(os.environ.get("HEADMODS_TEST_DEVICE", "cpu"))
E, H = 32, 4
THETA = 100.0
SETTINGS = {  # per variant: what makes decode state matter (RoPE for the methods that need it)
    "mha": {},
    "dha": {},
    "moh": {},
    "shrp": {},
    "cmha": {"rope_theta": THETA},
    "rcmha": {"conv_kernel": 3},
    "longheads": {"rope_theta": THETA, "chunk_size": 4, "attend_length": 16, "selection": "token"},
}


def test_every_registered_variant_is_covered():
    assert sorted(SETTINGS) == sorted(headmods.list_variants())


def _layer(name: str, dtype=torch.float64, seed: int = 0) -> headmods.HeadAttention:
    torch.manual_seed(seed)
    layer = headmods.create(name, E, H, batch_first=True, dtype=dtype, device=DEVICE,
                            **SETTINGS[name]).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_interleaved_caches_decode_each_sequence_exactly(name):
    """Prefill A, prefill B (same length), then decode A and B in turn, each with its own cache."""
    layer = _layer(name)
    T, prefill = 28, 20  # past LongHeads' budget of 16 tokens, so selection state matters
    a, b = (torch.randn(2, T, E, dtype=torch.float64, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        full_a, full_b = layer(a, is_causal=True)[0], layer(b, is_causal=True)[0]
        cache_a, cache_b = KVCache(), KVCache()
        parts_a = [layer(a[:, :prefill], is_causal=True, cache=cache_a)[0]]
        parts_b = [layer(b[:, :prefill], is_causal=True, cache=cache_b)[0]]
        for t in range(prefill, T):
            parts_a.append(layer(a[:, t:t + 1], is_causal=True, cache=cache_a)[0])
            parts_b.append(layer(b[:, t:t + 1], is_causal=True, cache=cache_b)[0])
    torch.testing.assert_close(torch.cat(parts_a, dim=1), full_a, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(torch.cat(parts_b, dim=1), full_b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["rcmha", "longheads"])
def test_a_cache_filled_elsewhere_is_refused(name):
    layer = _layer(name)
    cache = KVCache()
    with torch.no_grad():
        other = _layer(name, seed=1)
        other(torch.randn(1, 8, E, dtype=torch.float64, device=DEVICE), is_causal=True, cache=cache)
        with pytest.raises(headmods.errors.CacheStateError, match="the cache holds 8 tokens but its .* state was "
                           "built on 0"):
            layer(torch.randn(1, 1, E, dtype=torch.float64, device=DEVICE), is_causal=True, cache=cache)


def test_a_reset_cache_starts_a_new_sequence():
    layer = _layer("rcmha")
    x = torch.randn(1, 12, E, dtype=torch.float64, device=DEVICE)
    cache = KVCache()
    with torch.no_grad():
        layer(torch.randn(1, 5, E, dtype=torch.float64, device=DEVICE), is_causal=True, cache=cache)
        cache.reset()
        parts = [layer(x[:, :6], is_causal=True, cache=cache)[0]]
        parts += [layer(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(6, 12)]
        torch.testing.assert_close(torch.cat(parts, dim=1), layer(x, is_causal=True)[0], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_half_precision_follows_float32(name, dtype, tolerance):
    """Half-precision layers compute the float32 result up to their rounding (relative to the output's size)."""
    reference = _layer(name, dtype=torch.float32)
    half = copy.deepcopy(reference).to(dtype)
    x = torch.randn(2, 24, E, device=DEVICE)
    with torch.no_grad():
        expected = reference(x, is_causal=True)[0]
        got = half(x.to(dtype), is_causal=True)[0]
    assert got.dtype == dtype
    error = float((got.float() - expected).abs().max() / expected.abs().max())
    assert error < tolerance, f"{name} in {dtype}: max error {error:.3g} of the output's scale"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_half_precision_large_activations_stay_finite(name, dtype):
    """Projections of size ~200, whose squares overflow float16 (65504), give finite outputs."""
    layer = _layer(name, dtype=dtype)
    x = (60 * torch.randn(2, 24, E, device=DEVICE)).to(dtype)
    with torch.no_grad():
        assert float(layer.q_proj(x).abs().max()) > 190  # the case that overflowed CMHA's magnitudes
        out = layer(x, is_causal=True)[0]
    assert torch.isfinite(out).all(), f"{name} in {dtype} gave non-finite outputs"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_copies_after_a_training_step(name):
    """deepcopy and AveragedModel after forward + backward: the copy holds the same weights and
    computes the same function, and keeps nothing of the step's graph."""
    layer = _layer(name).train()
    x = torch.randn(2, 20, E, dtype=torch.float64, requires_grad=True, device=DEVICE)
    out, _ = layer(x, is_causal=True)
    loss = out.square().mean() + (layer.aux_loss if layer.aux_loss is not None else 0)
    loss.backward()
    twin = copy.deepcopy(layer)
    averaged = AveragedModel(layer)
    assert twin.aux_loss is None
    for (n, p), q in zip(layer.named_parameters(), twin.parameters()):
        assert torch.equal(p, q) and q.grad_fn is None, n
    layer.eval(), twin.eval(), averaged.eval()
    with torch.no_grad():
        y = torch.randn(2, 20, E, dtype=torch.float64, device=DEVICE)
        torch.testing.assert_close(twin(y, is_causal=True)[0], layer(y, is_causal=True)[0], atol=0, rtol=0)
        torch.testing.assert_close(averaged(y, is_causal=True)[0], layer(y, is_causal=True)[0], atol=0, rtol=0)


@pytest.mark.parametrize("path", ["attention function", "swap longheads", "swap rcmha"])
def test_hf_models_decode_interleaved_sequences(path):
    """A transformers model with LongHeads (``use_longheads`` or ``swap``) or RCMHA: two sequences of
    equal length, each with its own ``DynamicCache``, prefilled one after the other, then decoded
    in turn."""
    from transformers import DynamicCache

    from headmods.integrations.hf.longheads_fn import use_longheads

    from .test_swap import V, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(rope_theta=THETA)
    if path == "attention function":
        use_longheads(model, chunk_size=4, attend_length=16, selection="token")
    elif path == "swap longheads":
        headmods.swap(model, "longheads", chunk_size=4, attend_length=16, selection="token")
    else:
        headmods.swap(model, "rcmha", conv_kernel=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "conv" in name:
                    p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(1, V, (2, 2, 30))  # (sequence, batch, tokens)
    with torch.no_grad():
        full = [model(ids[s]).logits for s in range(2)]
        caches = [DynamicCache(config=model.config) for _ in range(2)]
        steps = [[model(ids[s, :, :20], cache=caches[s], use_cache=True).logits] for s in range(2)]
        for t in range(20, 30):
            for s in range(2):
                steps[s].append(model(ids[s, :, t:t + 1], cache=caches[s], use_cache=True).logits)
    for s in range(2):
        torch.testing.assert_close(torch.cat(steps[s], dim=1), full[s], atol=1e-4, rtol=1e-4)
