"""SHRP-style expert attention: routing vs a per-token loop, paths, pruning, dropping, save/load."""

import math

import pytest
import torch
from torch import nn

import headmods
from headmods import SHRPAttention
from reference import naive_attention

E, H, B, T = 32, 4, 2, 7
D = E // H


def _layer(**kw):
    torch.manual_seed(0)
    layer = SHRPAttention(E, H, batch_first=True, dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)  # decisive routing
        for p in layer.expander.parameters():
            p.normal_(0, 0.3)
    return layer


def _loop(layer, x, temperature=1.0):
    """Per token: softmax router, argmax head, that head's MHA term + expander + bias."""
    q = (x @ layer.q_proj.weight.T + layer.q_proj.bias).view(B, T, H, D).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T + layer.k_proj.bias).view(B, T, H, D).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T + layer.v_proj.bias).view(B, T, H, D).transpose(1, 2)
    heads, _ = naive_attention(q, k, v, list(range(H)))  # (B, H, T, D)
    W1, b1 = layer.expander[0].weight.detach(), layer.expander[0].bias.detach()
    W2, b2 = layer.expander[2].weight.detach(), layer.expander[2].bias.detach()
    Wr, Wo, bo = layer.router.weight.detach(), layer.o_proj.weight.detach(), layer.o_proj.bias.detach()
    out = torch.zeros(B, T, E, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            logits = [float(Wr[i] @ x[b, t]) / temperature for i in range(H)]
            best = max(range(H), key=lambda i: logits[i])
            o = heads[b, best, t]
            hidden = W1 @ o + b1
            hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
            out[b, t] = Wo[:, best * D:(best + 1) * D] @ o + W2 @ hidden + b2 + bo
    return out


@pytest.mark.parametrize("training", [False, True])
def test_routing_matches_a_per_token_loop(training):
    layer = _layer().train(training)
    x = torch.randn(B, T, E, dtype=torch.float64)
    out, _ = layer(x)
    torch.testing.assert_close(out, _loop(layer, x), atol=1e-10, rtol=1e-8)


def test_inference_path_equals_training_path_in_eval():
    layer = _layer().eval()
    x = torch.randn(B, T, E, dtype=torch.float64)
    with torch.no_grad():
        fast, _ = layer(x)  # per-head loops, no autograd
    slow, _ = layer(x)  # dense one-hot path with autograd
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-8)


def test_router_and_expander_get_gradients_and_the_value_is_straight_through():
    layer = _layer().train()
    x = torch.randn(B, T, E, dtype=torch.float64)
    out, _ = layer(x)
    (out.square().mean() + layer.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.expander[0].weight.grad.abs().sum() > 0


def test_converted_layer_starts_as_the_chosen_heads_mha_term():
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    layer = SHRPAttention.from_mha(mha).eval()
    assert float(layer.expander[2].weight.detach().abs().sum()) == 0.0 and layer.router.weight.abs().max() < 0.01
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0  # every token (positive features) picks head 2
    x = torch.rand(B, T, E) + 0.1
    zeroed = nn.MultiheadAttention(E, H, batch_first=True).eval()
    zeroed.load_state_dict(mha.state_dict())
    with torch.no_grad():
        for i in (0, 1, 3):
            zeroed.out_proj.weight[:, i * D:(i + 1) * D] = 0.0
        torch.testing.assert_close(layer(x)[0], zeroed(x, x, x)[0], atol=1e-5, rtol=1e-5)


def test_aux_loss_and_schedules():
    layer = _layer(balance_weight=0.5, balance_anneal=0.5, temperature=2.0, temperature_final=1.0).train()
    x = torch.randn(B, T, E, dtype=torch.float64)
    layer(x)
    probs = (layer.router(x) / 2.0).softmax(-1).flatten(0, 1)
    f = torch.nn.functional.one_hot(probs.argmax(-1), H).double().mean(0)
    assert float(layer.aux_loss) == pytest.approx(0.5 * H * float((probs.mean(0) * f).sum()), rel=1e-9)
    layer.set_progress(0.25)
    assert layer.balance_weight == pytest.approx(0.25) and layer.temperature == pytest.approx(1.75)
    layer.set_progress(0.8)
    layer(x)
    assert layer.balance_weight == 0.0 and layer.aux_loss is None
    out, _ = layer(x)
    torch.testing.assert_close(out, _loop(layer, x, temperature=1.2), atol=1e-10, rtol=1e-8)


def test_pruning_unused_heads_keeps_the_function():
    layer = _layer().eval()
    with torch.no_grad():
        layer.router.weight[1] = -10.0  # head 1 never wins for positive inputs
    x = torch.rand(B, T, E, dtype=torch.float64) + 0.1
    with torch.no_grad():
        before, _ = layer(x)
    assert layer.usage[1] == 0
    layer.prune_by_usage(1e-9)
    assert 1 not in layer.config.kept_heads and layer.router.out_features == layer.num_heads
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], before, atol=1e-10, rtol=1e-8)
    layer.prune_by_usage(keep=1)
    assert layer.num_heads == 1


def test_save_load_including_a_dropped_layer(tmp_path):
    model = nn.Sequential(SHRPAttention(E, H, batch_first=True), SHRPAttention(E, H, batch_first=True)).eval()
    x = torch.randn(B, T, E)
    with torch.no_grad():
        model[0](x)
    model[0].prune_by_usage(keep=2)
    model[1].drop_attention()
    assert sum(p.numel() for p in model[1].parameters()) == 0
    with torch.no_grad():
        ref = [m(x)[0] for m in model]
    headmods.save(model, tmp_path / "ckpt")
    skeleton = nn.Sequential(SHRPAttention(E, H, batch_first=True), SHRPAttention(E, H, batch_first=True))
    loaded = headmods.load(tmp_path / "ckpt", model=skeleton)
    assert loaded[1].config.drop_attention and loaded[0].num_heads == 2
    with torch.no_grad():
        for m, r in zip(loaded, ref):
            torch.testing.assert_close(m(x)[0], r)
    assert torch.equal(ref[1], torch.zeros_like(ref[1]))


def test_bad_input():
    layer = SHRPAttention(E, H)
    with pytest.raises(ValueError, match=r"threshold must be a usage fraction in \[0, 1\], got 1.5"):
        layer.prune_by_usage(1.5)
    with pytest.raises(ValueError, match=r"keep must be an int in \[0, num_heads=4\], got 5"):
        layer.prune_by_usage(keep=5)
    with pytest.raises(ValueError, match="pruning would leave no head .* allow_drop=True"):
        layer.prune_by_usage(0.9)
    assert layer.num_heads == H
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\) must equal num_heads \(4\)"):
        SHRPAttention(E, H, num_kv_heads=2)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        layer.prune_by_usage()


def test_bert_host_with_a_dropped_attention_layer_saves_and_reloads(tmp_path):
    from .test_swap import tiny_bert

    model = tiny_bert()
    headmods.swap(model, "shrp")
    ids = torch.randint(1, 101, (2, 9))
    with torch.no_grad():
        model(ids)
    model.encoder.layer[1].attention.drop_attention()
    model.encoder.layer[0].attention.prune_by_usage(keep=2)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    headmods.save(model, tmp_path / "ckpt")
    loaded = headmods.load(tmp_path / "ckpt")
    assert loaded.encoder.layer[1].attention.config.drop_attention
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'shrp'; only plain multi-head attention"):
        headmods.export(loaded, tmp_path / "hf")
