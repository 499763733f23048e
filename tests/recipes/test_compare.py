"""The compare recipe's pieces: next-token accuracy, the summary, parameter warnings, curves, RCMHA's conv_init through swap."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import headmods
from headmods.recipes.compare_pipeline import compare_summary, mean_curve, param_warnings
from headmods.recipes.tasks import CausalLMTask


class FixedLogits(nn.Module):
    """A causal LM stand-in returning the logits it was given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits * self.scale)


def test_causal_lm_evaluation_reports_next_token_accuracy_over_non_padding_targets():
    torch.manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[0, 3] = -100  # a target left out by its label
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding: targets 4 and 5 of row 1 are not predicted
    ids[2, 1:] = logits[2, :-1].argmax(-1)  # row 2: every next token is the argmax
    labels[2] = ids[2]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    correct = total = 0
    for b in range(B):
        for t in range(T - 1):
            target = labels[b, t + 1]
            if target == -100 or mask[b, t + 1] == 0:
                continue
            total += 1
            correct += int(logits[b, t].argmax() == target)
    metrics = CausalLMTask(FixedLogits(logits), lr=1e-3).evaluate([batch])
    assert total == 12 and correct >= 5
    assert metrics["val_token_accuracy"] == pytest.approx(correct / total, abs=1e-7)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].masked_fill(
        mask[:, 1:] == 0, -100).reshape(-1), ignore_index=-100)
    assert metrics["val_loss"] == pytest.approx(float(nll), rel=1e-6)


def _rows(**params):
    return [{"variant": name, "seed": seed, "val_loss": 2.0 + i + seed, "val_token_accuracy": 0.5 - 0.1 * i,
             "params": n} for i, (name, n) in enumerate(params.items()) for seed in (0, 1)]


def test_compare_summary_means_over_seeds_and_differences_from_the_first_variant():
    variants = {"rope": {"variant": "mha"}, "abs": {"variant": "mha", "positions": "absolute"}}
    summary = compare_summary(_rows(rope=1000, abs=1030), variants)
    rope, absolute = summary
    assert rope["mean val_loss"] == 2.5 and absolute["mean val_loss"] == 3.5
    assert absolute["mean next-token accuracy"] == pytest.approx(0.4)
    assert absolute["positions"] == "absolute" and rope["positions"] == "rope"
    assert absolute["params vs rope (%)"] == pytest.approx(3.0) and rope["params vs rope (%)"] == 0.0
    assert absolute["val_loss vs rope"] == pytest.approx(0.4)
    assert absolute["accuracy vs rope (points)"] == pytest.approx(-10.0)


def test_param_warnings_name_the_variants_past_the_tolerance_only():
    variants = {v: {"variant": "mha"} for v in ("a", "b", "c")}
    summary = compare_summary(_rows(a=1000, b=1019, c=979), variants)
    warnings = param_warnings(summary, 0.02)
    assert len(warnings) == 1 and warnings[0].startswith("c has 979 parameters, -2.10 % against a's 1,000")
    assert param_warnings(summary, 0.025) == []


def test_mean_curve_averages_the_steps_every_seed_has():
    assert mean_curve([[[0, 3.0], [5, 2.0]], [[0, 5.0], [5, 1.0]]]) == [(0, 4.0), (5, 1.5)]
    assert mean_curve([[[0, 3.0], [5, 2.0]]]) == [(0, 3.0), (5, 2.0)]


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=50)).eval()


def test_swap_takes_rcmha_conv_init_and_keeps_the_host_projections():
    model = _llama()
    q_weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    headmods.swap(model, "rcmha", relative=False, conv_init="official")
    layer = model.model.layers[0].self_attn
    assert layer.config.conv_init == "official" and not layer.config.relative
    identity = torch.zeros_like(layer.q_conv.weight)
    identity[..., -1] = 1.0
    assert not torch.equal(layer.q_conv.weight, identity)  # official: nn.Conv1d's random init, not the identity
    assert torch.equal(layer.q_proj.weight, q_weight)  # the projections are still the host's
    plain = _llama()
    headmods.swap(plain, "rcmha", relative=False)
    assert torch.equal(plain.model.layers[0].self_attn.q_conv.weight, identity)


def test_step_curve_records_once_per_step_and_keeps_its_points_as_callback_state():
    from headmods.recipes.compare_pipeline import StepCurve

    losses = iter([3.0, 2.5, 2.0])
    module = SimpleNamespace(evaluate=lambda batches: {"val_loss": next(losses), "val_token_accuracy": 0.1})
    trainer = SimpleNamespace(global_step=0, max_steps=4)
    curve = StepCurve([{"input_ids": torch.zeros(1, 2)}], every=2)
    curve.on_train_start(trainer, module)
    for step in (1, 2, 2, 3, 4):  # step 2 twice: gradient accumulation ends two batches there
        trainer.global_step = step
        curve.on_train_batch_end(trainer, module, None, None, 0)
    assert curve.points == [[0, 3.0], [2, 2.5], [4, 2.0]]
    resumed = StepCurve([], every=2)
    resumed.load_state_dict(curve.state_dict())
    assert resumed.points == curve.points
