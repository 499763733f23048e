"""headmods.prune: importance scores, plans, structural removal and reports, on a tiny LM.

The oracle for structural pruning is head-mask equivalence: the pruned model equals the unpruned
model with the removed heads' ``o_proj`` columns zeroed by hand. Scores are checked against
brute-force references written here (copies with zeroed columns, parameter gradients, loops).
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from headmods import KVCache, MultiHeadAttention
from headmods.prune import (
    HeadPrunePlan,
    PruneReport,
    count_macs,
    head_importance,
    plan_from_scores,
    prune_heads,
    validate_plan,
)

V, E, B, T = 11, 16, 2, 5
PATHS = ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
# (heads, kv heads, head_dim) of each layer: MHA, GQA (2 groups of 2), MHA with wider heads
SHAPES = {"blocks.0.attn": (4, 4, 4), "blocks.1.attn": (4, 2, 4), "blocks.2.attn": (2, 2, 8)}


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(E)
        self.attn = attn

    def forward(self, x):
        return x + self.attn(self.norm(x), is_causal=True)[0]


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.blocks = nn.ModuleList(
            Block(MultiHeadAttention(E, h, num_kv_heads=kv, head_dim=d, batch_first=True))
            for h, kv, d in SHAPES.values())
        self.head = nn.Linear(E, V)
        with torch.no_grad():  # non-zero biases, so a bias slicing mistake cannot hide
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, ids):
        x = self.embed(ids)  # (B, T, E)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # (B, T, V)


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))


@pytest.fixture
def model():
    return TinyLM().eval()


@pytest.fixture
def batches():
    return [torch.randint(V, (B, T + 1)) for _ in range(2)]


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_untouched(model, before_shapes, before_state):
    assert shapes(model) == before_shapes
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before_state.items())


def zeroed(model, removed):
    """A copy of ``model`` whose listed heads (original indices) have zero ``o_proj`` columns."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for path, heads in removed.items():
            d = SHAPES[path][2]
            for i in heads:
                ref.get_submodule(path).o_proj.weight[:, i * d:(i + 1) * d] = 0.0
    return ref


def attn_params(h, kv, d):
    """Parameters of one attention layer with biases: q, k, v, o."""
    return (E * h * d + h * d) + 2 * (E * kv * d + kv * d) + (h * d * E + E)


def model_params(layer_shapes):
    return V * E + len(layer_shapes) * 2 * E + sum(attn_params(*s) for s in layer_shapes) + E * V + V


def no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks and not m._backward_hooks for m in model.modules())


# -- structural pruning ----------------------------------------------------------------------------
def test_pruned_equals_zeroed_heads(model):
    ids = torch.randint(V, (B, T))
    plan = HeadPrunePlan({"blocks.0.attn": (1, 3), "blocks.1.attn": (2, 3), "blocks.2.attn": (1,)})
    ref = zeroed(model, {"blocks.0.attn": [0, 2], "blocks.1.attn": [0, 1], "blocks.2.attn": [0]})
    prune_heads(model, plan)
    torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=0)

    # a second plan indexes the *current* heads: head 0 of blocks.0.attn is now original head 1
    prune_heads(model, HeadPrunePlan({"blocks.0.attn": (1,)}))
    ref = zeroed(ref, {"blocks.0.attn": [1]})
    torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=0)
    assert model.blocks[0].attn.config.kept_heads == (3,)


def test_pruned_equals_zeroed_partial_gqa_groups(model):
    ids = torch.randint(V, (B, T))
    plan = HeadPrunePlan({"blocks.1.attn": (0, 1, 3)})  # groups of 2 and 1 remain
    ref = zeroed(model, {"blocks.1.attn": [2]})
    prune_heads(model, plan)
    layer = model.blocks[1].attn
    assert (layer.num_heads, layer.num_kv_heads, layer.config.kv_map) == (3, 2, (0, 0, 1))
    torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=0)


def test_parameter_counts_match_formula(model):
    assert sum(p.numel() for p in model.parameters()) == model_params(SHAPES.values())
    plan = HeadPrunePlan({"blocks.0.attn": (1, 3), "blocks.1.attn": (2, 3), "blocks.2.attn": (1,)})
    report = prune_heads(model, plan)
    after = [(2, 2, 4), (2, 1, 4), (1, 1, 8)]
    assert report.params_before == model_params(SHAPES.values())
    assert report.params_after == model_params(after) == sum(p.numel() for p in model.parameters())
    assert report.attn_params_before == sum(attn_params(*s) for s in SHAPES.values())
    assert report.attn_params_after == sum(attn_params(*s) for s in after)


def test_gqa_whole_group_removes_its_kv_head_and_nothing_else(model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune_heads(model, HeadPrunePlan({"blocks.1.attn": (2, 3)}))  # both query heads of kv head 0 go
    layer, d = model.blocks[1].attn, 4
    assert (layer.num_heads, layer.num_kv_heads, layer.config.kv_map) == (2, 1, None)
    p = "blocks.1.attn."
    for name in ("k_proj", "v_proj"):  # kv head 1's rows are all that is left
        assert torch.equal(getattr(layer, name).weight, before[p + name + ".weight"][d:2 * d])
        assert torch.equal(getattr(layer, name).bias, before[p + name + ".bias"][d:2 * d])
    assert torch.equal(layer.q_proj.weight, before[p + "q_proj.weight"][2 * d:4 * d])
    assert torch.equal(layer.o_proj.weight, before[p + "o_proj.weight"][:, 2 * d:4 * d])
    assert torch.equal(layer.o_proj.bias, before[p + "o_proj.bias"])
    for name, value in model.named_parameters():  # every other parameter is exactly as it was
        if not name.startswith(p):
            assert torch.equal(value, before[name])


def test_gqa_partial_group_keeps_kv_heads(model):
    prune_heads(model, HeadPrunePlan({"blocks.1.attn": (1, 3)}))
    layer = model.blocks[1].attn
    assert (layer.num_heads, layer.num_kv_heads) == (2, 2)
    assert tuple(layer.k_proj.weight.shape) == (8, E)


def test_full_keep_leaves_layer_objects(model):
    q_before = model.blocks[0].attn.q_proj
    report = prune_heads(model, HeadPrunePlan({"blocks.0.attn": (0, 1, 2, 3)}))
    assert model.blocks[0].attn.q_proj is q_before
    assert report.layers[0].kept_heads == (0, 1, 2, 3)


def test_explicit_keep_kv_plan(model):
    plan = HeadPrunePlan({"blocks.1.attn": (2, 3)}, keep_kv={"blocks.1.attn": (1,)})
    validate_plan(model, plan)
    prune_heads(model, plan)
    assert model.blocks[1].attn.num_kv_heads == 1


# -- errors: each leaves the model as it was --------------------------------------------------------
@pytest.mark.parametrize("keep,keep_kv,message", [
    ({"blocks.9.attn": (0,)}, None,
     r"plan names layer 'blocks.9.attn'.*known layers: \['blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn'\]"),
    ({"blocks.0.attn": ()}, None, r"plan would remove every head of layer 'blocks.0.attn' \(it has 4\)"),
    ({"blocks.0.attn": (0, 4)}, None, r"kept heads of layer 'blocks.0.attn' must be in \[0, 4\), got \[0, 4\]"),
    ({"blocks.0.attn": (-1, 2)}, None, r"must be in \[0, 4\), got \[-1, 2\] \(out of range: \[-1\]\)"),
    ({"blocks.0.attn": (1, 1)}, None, r"must be distinct, got \[1, 1\] \(repeated: \[1\]\)"),
    ({"blocks.1.attn": (0, 1)}, {"blocks.1.attn": (0, 1)}, "would orphan kv head 1 of layer 'blocks.1.attn'"),
    ({"blocks.1.attn": (0, 2)}, {"blocks.1.attn": (0,)},
     "keeps query head 2 of layer 'blocks.1.attn' but drops kv head 1"),
    ({"blocks.1.attn": (0, 2)}, {"blocks.1.attn": (0, 2)}, r"kept kv heads of layer 'blocks.1.attn' must be in \[0, 2\)"),
    ({"blocks.1.attn": (0,)}, {"blocks.7.attn": (0,)}, "plan names layer 'blocks.7.attn'"),
    # the first layer is fine, the last is not: nothing is pruned
    ({"blocks.0.attn": (0,), "blocks.1.attn": (2, 3), "blocks.2.attn": (5,)}, None,
     r"kept heads of layer 'blocks.2.attn' must be in \[0, 2\)"),
])
def test_bad_plans_raise_and_leave_model_untouched(model, keep, keep_kv, message):
    plan = HeadPrunePlan(keep, keep_kv)
    before_shapes, before_state = shapes(model), state(model)
    with pytest.raises(ValueError, match=message):
        validate_plan(model, plan)
    with pytest.raises(ValueError, match=message):
        prune_heads(model, plan, example_inputs=(torch.randint(V, (B, T)),))
    assert_untouched(model, before_shapes, before_state)
    assert no_hooks(model)


@pytest.mark.parametrize("call,error,message", [
    (lambda m: prune_heads(m, {"blocks.0.attn": (0,)}), TypeError, "expected a HeadPrunePlan, got dict"),
    (lambda m: prune_heads(m, HeadPrunePlan({"blocks.0.attn": (0,)}), example_inputs=torch.zeros(1, 2)),
     TypeError, r"example_inputs must be a tuple .* got Tensor \(wrap a single tensor as \(x,\)\)"),
    (lambda m: prune_heads(m, HeadPrunePlan({"blocks.0.attn": (0,)}), latency_rounds=3),
     ValueError, "latency_rounds=3 needs example_inputs"),
    (lambda m: prune_heads(m, HeadPrunePlan({"blocks.0.attn": (0,)}), latency_rounds=-1),
     ValueError, "latency_rounds must be an int >= 0, got -1"),
    (lambda m: prune_heads(m, HeadPrunePlan({"blocks.0.attn": (0,)}), example_inputs=(torch.randn(B, T),)),
     RuntimeError, "indices"),  # the model's own error from the "before" forward, raised before any change
])
def test_bad_arguments_leave_model_untouched(model, call, error, message):
    before_shapes, before_state = shapes(model), state(model)
    with pytest.raises(error, match=message):
        call(model)
    assert_untouched(model, before_shapes, before_state)
    assert no_hooks(model)


def test_plan_type_errors():
    with pytest.raises(TypeError, match=r"HeadPrunePlan.keep\['a'\] must hold ints, got \[0.5\]"):
        HeadPrunePlan({"a": [0.5]})
    with pytest.raises(TypeError, match="must be a sequence of ints, got str"):
        HeadPrunePlan({"a": "01"})
    with pytest.raises(TypeError, match="keys must be layer paths"):
        HeadPrunePlan({0: (1,)})
    with pytest.raises(ValueError, match=r"got \['keep', 'extra'\]|got \['extra', 'keep'\]"):
        HeadPrunePlan.from_dict({"keep": {}, "extra": 1})


def test_model_without_layers():
    model = nn.Sequential(nn.Linear(4, 4))
    before_shapes = shapes(model)
    with pytest.raises(ValueError, match="Sequential has no prunable headmods attention layers"):
        head_importance(model, "magnitude")
    with pytest.raises(ValueError, match="no prunable headmods attention layers"):
        prune_heads(model, HeadPrunePlan({"0": (0,)}))
    assert shapes(model) == before_shapes


def test_importance_errors(model, batches):
    before_shapes, before_state = shapes(model), state(model)
    with pytest.raises(ValueError, match=r"unknown importance method 'l1'; known methods: "
                                         r"\['magnitude', 'ablation', 'taylor'\]"):
        head_importance(model, "l1")
    with pytest.raises(ValueError, match=r"'ablation' is data-driven .* missing: \['batches'\]"):
        head_importance(model, "ablation", loss_fn=lm_loss)
    with pytest.raises(ValueError, match=r"'taylor' is data-driven .* missing: \['batches', 'loss_fn'\]"):
        head_importance(model, "taylor")
    with pytest.raises(ValueError, match="needs at least one batch, got none"):
        head_importance(model, "taylor", batches=[], loss_fn=lm_loss)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(2,\)"):
        head_importance(model, "ablation", batches=batches, loss_fn=lambda m, b: torch.ones(2))
    with pytest.raises(ValueError, match="does not depend on any headmods layer"):
        head_importance(model, "taylor", batches=batches, loss_fn=lambda m, b: torch.tensor(1.0))
    assert_untouched(model, before_shapes, before_state)
    assert no_hooks(model)


# -- importance scores -----------------------------------------------------------------------------
@torch.no_grad()
def test_magnitude_equals_hand_norms(model):
    scores = head_importance(model, "magnitude")
    assert list(scores) == PATHS
    for path, (h, kv, d) in SHAPES.items():
        layer = model.get_submodule(path)
        group = h // kv
        expected = []
        for i in range(h):
            g = i // group
            q = layer.q_proj.weight[i * d:(i + 1) * d].pow(2).sum().sqrt()
            o = layer.o_proj.weight[:, i * d:(i + 1) * d].pow(2).sum().sqrt()
            k = layer.k_proj.weight[g * d:(g + 1) * d].pow(2).sum().sqrt()
            v = layer.v_proj.weight[g * d:(g + 1) * d].pow(2).sum().sqrt()
            expected.append(float(q + o + (k + v) / group))
        torch.testing.assert_close(scores[path], torch.tensor(expected), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_magnitude_follows_kv_map_after_uneven_prune(model):
    prune_heads(model, HeadPrunePlan({"blocks.1.attn": (0, 1, 2)}))  # query heads read kv 0, 0, 1
    layer, d = model.blocks[1].attn, 4
    kv_of, group_size = [0, 0, 1], {0: 2, 1: 1}
    expected = []
    for i, g in enumerate(kv_of):
        kv = layer.k_proj.weight[g * d:(g + 1) * d].norm() + layer.v_proj.weight[g * d:(g + 1) * d].norm()
        expected.append(float(layer.q_proj.weight[i * d:(i + 1) * d].norm()
                              + layer.o_proj.weight[:, i * d:(i + 1) * d].norm() + kv / group_size[g]))
    torch.testing.assert_close(head_importance(model, "magnitude")["blocks.1.attn"], torch.tensor(expected))


def test_ablation_equals_brute_force(model, batches):
    model.train()
    model.blocks[1].eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    before_state = state(model)
    scores = head_importance(model, "ablation", batches=batches, loss_fn=lm_loss)

    ref_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        base = sum(float(lm_loss(ref_model, b)) for b in batches) / len(batches)
        for path, (h, _, _) in SHAPES.items():
            expected = []
            for i in range(h):
                m = zeroed(ref_model, {path: [i]})
                expected.append(sum(float(lm_loss(m, b)) for b in batches) / len(batches) - base)
            torch.testing.assert_close(scores[path], torch.tensor(expected), atol=1e-5, rtol=0)
    assert [m.training for m in model.modules()] == flags
    assert_untouched(model, shapes(model), before_state)
    assert no_hooks(model)


def test_ablation_removes_hooks_on_error(model, batches):
    model.train()
    calls = []

    def failing(m, b):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return lm_loss(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        head_importance(model, "ablation", batches=batches, loss_fn=failing)
    assert no_hooks(model)
    assert all(m.training for m in model.modules())


def _manual_taylor(model, batches):
    """|sum over batches of dL/dW_o[:, head] . W_o[:, head]|: the derivative of the loss w.r.t. a
    scale on head i's output at 1, from parameter gradients alone."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(True)
        p.grad = None
    for b in batches:
        lm_loss(m, b).backward()
    out = {}
    for path, (h, _, d) in SHAPES.items():
        o = m.get_submodule(path).o_proj.weight
        g, o = o.grad, o.detach()
        out[path] = torch.tensor([abs(float((g[:, i * d:(i + 1) * d] * o[:, i * d:(i + 1) * d]).sum()))
                                  for i in range(h)])
    return out


def test_taylor_equals_manual_autograd(model, batches):
    model.train()
    model.embed.weight.grad = torch.full_like(model.embed.weight, 0.5)
    expected = _manual_taylor(model, batches)
    scores = head_importance(model, "taylor", batches=batches, loss_fn=lm_loss)
    for path in PATHS:
        torch.testing.assert_close(scores[path], expected[path], atol=1e-6, rtol=1e-4)
    assert torch.equal(model.embed.weight.grad, torch.full_like(model.embed.weight, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "embed.weight")
    assert all(m.training for m in model.modules())
    assert no_hooks(model)


def test_taylor_on_frozen_model(model, batches):
    expected = _manual_taylor(model, batches)
    for p in model.parameters():
        p.requires_grad_(False)
    scores = head_importance(model, "taylor", batches=batches, loss_fn=lm_loss)
    for path in PATHS:
        torch.testing.assert_close(scores[path], expected[path], atol=1e-6, rtol=1e-4)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_data_driven_scores_accept_generators(model, batches):
    scores = head_importance(model, "ablation", batches=iter(batches), loss_fn=lm_loss)
    assert [tuple(s.shape) for s in scores.values()] == [(4,), (4,), (2,)]


# -- plans from scores -----------------------------------------------------------------------------
def test_ratio_normalizes_per_layer():
    scores = {"a": torch.tensor([100.0, 200.0, 300.0, 400.0]), "b": torch.tensor([2.0, 2.0, 2.0, 2.1])}
    # normalized: a = [.18, .37, .55, .73], b ~ [.49, .49, .49, .51]: a's two weakest go
    assert plan_from_scores(scores, ratio=0.25).keep == {"a": (2, 3), "b": (0, 1, 2, 3)}
    # raw: b's scores are all lower; ties go to the lower index first
    assert plan_from_scores(scores, ratio=0.25, normalize=False).keep == {"a": (0, 1, 2, 3), "b": (2, 3)}


def test_ratio_rounds_to_nearest_head():
    scores = {"a": torch.arange(6.0), "b": torch.arange(4.0)}
    plan = plan_from_scores(scores, ratio=0.25)  # 2.5 of 10 heads -> 3
    assert sum(len(k) for k in plan.keep.values()) == 7
    assert plan_from_scores(scores, ratio=0.0).keep == {"a": tuple(range(6)), "b": tuple(range(4))}


def test_ratio_respects_min_heads():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    plan = plan_from_scores(scores, ratio=0.75, min_heads=2)  # asks for 6 of 8; only 4 may go
    assert plan.keep == {"a": (2, 3), "b": (2, 3)}
    plan = plan_from_scores(scores, ratio=0.875)  # 7 of 8, min_heads=1
    assert {len(k) for k in plan.keep.values()} == {1}


def test_per_layer_int_and_dict():
    scores = {"a": torch.tensor([0.3, 0.1, 0.4, 0.2]), "b": torch.tensor([0.5, 0.9])}
    assert plan_from_scores(scores, per_layer=1).keep == {"a": (2,), "b": (1,)}
    assert plan_from_scores(scores, per_layer={"a": 2}).keep == {"a": (0, 2)}
    with pytest.raises(ValueError, match=r"heads to keep in layer 'b' must be an int in \[min_heads=1, 2\], got 3"):
        plan_from_scores(scores, per_layer=3)
    with pytest.raises(ValueError, match=r"per_layer names layer 'c', which has no scores"):
        plan_from_scores(scores, per_layer={"c": 1})
    with pytest.raises(ValueError, match=r"min_heads=2, 4\], got 1"):
        plan_from_scores(scores, per_layer={"a": 1}, min_heads=2)


def test_ignore_paths_and_prefixes():
    scores = {"blocks.0.attn": torch.arange(4.0), "blocks.01.attn": torch.arange(4.0), "blocks.1.attn": torch.arange(4.0)}
    plan = plan_from_scores(scores, per_layer=2, ignore=("blocks.0",))
    assert list(plan.keep) == ["blocks.01.attn", "blocks.1.attn"]
    plan = plan_from_scores(scores, ratio=0.5, ignore=("blocks.1.attn",))
    assert list(plan.keep) == ["blocks.0.attn", "blocks.01.attn"]
    with pytest.raises(ValueError, match=r"ignore entry 'blocks.9' matches no scored layer"):
        plan_from_scores(scores, per_layer=2, ignore=("blocks.9",))
    with pytest.raises(TypeError, match="ignore must be a sequence of layer paths"):
        plan_from_scores(scores, per_layer=2, ignore="blocks.0")
    with pytest.raises(ValueError, match="which ignore= leaves whole"):
        plan_from_scores(scores, per_layer={"blocks.0.attn": 1}, ignore=("blocks.0",))


def test_uniform_keeps_same_count_and_same_per_kv_group(model):
    scores = {"blocks.0.attn": torch.tensor([4.0, 3.0, 2.0, 1.0]),
              "blocks.1.attn": torch.tensor([9.0, 8.0, 1.0, 0.0]),  # group 0 dominates
              "blocks.2.attn": torch.tensor([1.0, 2.0])}
    assert plan_from_scores(scores, per_layer=2).keep["blocks.1.attn"] == (0, 1)  # not uniform: group 1 goes
    plan = plan_from_scores(scores, per_layer=2, uniform=True, model=model)
    assert plan.keep == {"blocks.0.attn": (0, 1), "blocks.1.attn": (0, 2), "blocks.2.attn": (0, 1)}
    # ratio: 10 heads * 0.5 / 3 layers = 1.67 per layer, rounded to a multiple of 2 (GQA kv heads)
    plan = plan_from_scores(scores, ratio=0.5, uniform=True, model=model)
    assert {len(k) for k in plan.keep.values()} == {2}
    assert plan.keep["blocks.1.attn"] == (0, 2)
    prune_heads(model, plan)
    gqa = model.blocks[1].attn
    assert (gqa.num_heads, gqa.num_kv_heads, gqa.config.kv_map) == (2, 2, None)


def test_uniform_with_ignore_and_on_model_scores(model):
    scores = head_importance(model, "magnitude")
    plan = plan_from_scores(scores, ratio=0.5, uniform=True, ignore=("blocks.2",), model=model)
    assert list(plan.keep) == ["blocks.0.attn", "blocks.1.attn"]
    assert {len(k) for k in plan.keep.values()} == {2}
    g = [i // 2 for i in plan.keep["blocks.1.attn"]]
    assert g == [0, 1]


def test_uniform_errors(model):
    scores = head_importance(model, "magnitude")
    with pytest.raises(ValueError, match="uniform=True needs model="):
        plan_from_scores(scores, per_layer=2, uniform=True)
    with pytest.raises(ValueError, match=r"multiple of 2 \(the kv heads of layer 'blocks.1.attn'\), got 1"):
        plan_from_scores(scores, per_layer=1, uniform=True, model=model)
    with pytest.raises(ValueError,
                       match=r"heads to keep in layer 'blocks.2.attn' must be an int in \[min_heads=1, 2\], got 4"):
        plan_from_scores(scores, per_layer={p: 4 for p in PATHS}, uniform=True, model=model)
    # min_heads=3 rounds up to 4 (a multiple of the GQA layer's 2 kv heads): more than blocks.2.attn has
    with pytest.raises(ValueError, match="uniform=True keeps 4 heads per layer, but layer 'blocks.2.attn' has only 2"):
        plan_from_scores(scores, ratio=0.5, min_heads=3, uniform=True, model=model)
    with pytest.raises(ValueError, match="uniform=True needs the same count for every layer"):
        plan_from_scores(scores, per_layer={PATHS[0]: 2, PATHS[1]: 4, PATHS[2]: 2}, uniform=True, model=model)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "give exactly one of ratio / per_layer, got ratio=None, per_layer=None"),
    ({"ratio": 0.5, "per_layer": 2}, "give exactly one of ratio / per_layer, got ratio=0.5, per_layer=2"),
    ({"ratio": 1.0}, r"ratio must be a number in \[0, 1\), got 1.0"),
    ({"ratio": -0.1}, r"ratio must be a number in \[0, 1\), got -0.1"),
    ({"ratio": 0.5, "min_heads": 0}, "min_heads must be an int >= 1, got 0"),
])
def test_plan_from_scores_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_from_scores({"a": torch.arange(4.0)}, **kwargs)


def test_scores_checked_against_model(model):
    with pytest.raises(ValueError, match="scores of layer 'blocks.0.attn' have 3 entries; the layer has 4 heads"):
        plan_from_scores({"blocks.0.attn": torch.ones(3)}, per_layer=1, model=model)
    with pytest.raises(ValueError, match="scores of layer 'a' contain NaN"):
        plan_from_scores({"a": torch.tensor([1.0, float("nan")])}, per_layer=1)
    with pytest.raises(ValueError, match=r"must be a non-empty 1-D tensor, got shape \(2, 2\)"):
        plan_from_scores({"a": torch.ones(2, 2)}, per_layer=1)


def test_plan_json_round_trip():
    plan = HeadPrunePlan({"blocks.1.attn": [3, 2]}, keep_kv={"blocks.1.attn": [1]})
    again = HeadPrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.keep == {"blocks.1.attn": (2, 3)} and again.keep_kv == {"blocks.1.attn": (1,)}


# -- end to end, report, MACs ----------------------------------------------------------------------
def test_score_plan_prune_end_to_end(model, batches):
    scores = head_importance(model, "taylor", batches=batches, loss_fn=lm_loss)
    plan = plan_from_scores(scores, ratio=0.4)
    removed = {p: [i for i in range(SHAPES[p][0]) if i not in plan.keep[p]] for p in PATHS}
    assert sum(map(len, removed.values())) == 4
    ref = zeroed(model, removed)
    prune_heads(model, plan)
    ids = torch.randint(V, (B, T))
    torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=0)


def test_report_contents(model):
    ids = torch.randint(V, (B, T))
    plan = HeadPrunePlan({"blocks.0.attn": (1, 3), "blocks.1.attn": (2, 3)})
    report = prune_heads(model, plan, example_inputs=(ids,))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["macs_after"] < data["macs_before"]
    assert data["latency_ms_before"] is None and data["latency_ratio"] is None
    assert [row["path"] for row in data["layers"]] == PATHS
    assert data["layers"][1] == {"path": "blocks.1.attn", "heads_before": 4, "heads_after": 2,
                                 "kv_heads_before": 2, "kv_heads_after": 1, "kept_heads": [2, 3]}
    assert data["layers"][2]["kept_heads"] == [0, 1]
    assert data["plan"] == plan.to_dict()
    assert PruneReport.from_dict(data) == report
    text = report.to_markdown()
    assert "| blocks.1.attn | 4 → 2 | 2 → 1 | 2, 3 |" in text
    assert "| MACs |" in text and "latency" not in text


def test_report_latency_measured(model):
    report = prune_heads(model, HeadPrunePlan({"blocks.0.attn": (0,)}),
                         example_inputs={"ids": torch.randint(V, (B, T))}, latency_rounds=2)
    assert report.latency_ms_before > 0 and report.latency_ms_after > 0 and report.latency_ratio > 0
    assert "latency (median ms)" in report.to_markdown()
    json.dumps(report.to_dict())


def _expected_macs(layer_shapes, batch, length):
    tokens = batch * length
    total = E * V * tokens  # the LM head; the embedding is a lookup
    for h, kv, d in layer_shapes:
        total += (E * h * d + 2 * E * kv * d + h * d * E) * tokens  # q, k, v, o projections
        total += 2 * batch * h * length * length * d  # q k^T and weights @ v
    return total


def test_count_macs_matches_formula(model):
    ids = torch.randint(V, (3, 7))
    assert count_macs(model, (ids,)) == _expected_macs(SHAPES.values(), 3, 7)
    prune_heads(model, HeadPrunePlan({"blocks.1.attn": (2, 3), "blocks.2.attn": (1,)}))
    assert count_macs(model, {"ids": ids}) == _expected_macs([(4, 4, 4), (2, 1, 4), (1, 1, 8)], 3, 7)


def test_count_macs_seq_first_cross_attention_and_cache():
    attn = MultiHeadAttention(E, 4, num_kv_heads=2)  # seq-first, d = 4
    q, kv = torch.randn(3, 2, E), torch.randn(7, 2, E)
    expected = E * 16 * 6 + 2 * E * 8 * 14 + 16 * E * 6 + 2 * 2 * 4 * 3 * 7 * 4
    assert count_macs(attn, (q, kv)) == expected

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MultiHeadAttention(E, 4, batch_first=True)

        def forward(self, x, cache):
            return self.attn(x, is_causal=True, cache=cache)[0]

    dec, cache = Decoder().eval(), KVCache()
    with torch.no_grad():
        dec(torch.randn(2, 4, E), cache)  # 4 cached tokens
    step = count_macs(dec, (torch.randn(2, 1, E), cache))  # 1 new query against 5 keys
    assert step == 4 * E * E * 2 + 2 * 2 * 4 * 1 * 5 * 4


def test_count_macs_errors(model):
    with pytest.raises(TypeError, match="count_macs needs example_inputs"):
        count_macs(model, None)
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        count_macs(model, torch.zeros(2))
    assert math.isfinite(count_macs(model, (torch.randint(V, (1, 2)),)))
