"""Shipped recipes run (2 steps each), resume reproduces, distributed fine-tune, the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headmods
from headmods.recipes.config import load_config
from headmods.recipes.runner import run_recipe
from headmods.recipes.shipped import list_recipes

SMALL = ["train.max_steps=2", "prune.recover_steps=2", "prune.calib_samples=8", "data.limit=64",
         "bench.rounds=1", "bench.batch_size=2", "bench.seq_len=16", "train.progress_bar=false",
         "train.checkpoint_every_n_steps=1", "train.log_every_n_steps=1"]
SHIPPED = {name for name, _, _ in list_recipes()}
HEADMODS = str(Path(sys.executable).parent / "headmods")  # the real console entry point


def _run(name: str, out: Path, *extra: str, data: bool = True) -> Path:
    small = SMALL if data else [o for o in SMALL if not o.startswith("data.")]  # recipes without a data section
    config = load_config(dict((n, p) for n, p, _ in list_recipes())[name], small + [f"output_dir={out}", *extra])
    run_recipe(config, command=f"test {name}")
    assert (out / "report.md").is_file() and json.loads((out / "metrics.json").read_text())
    return out


def test_every_shipped_recipe_is_covered_below():
    assert SHIPPED == {"convert_minilm_mha", "minilm_bbc_finetune", "minilm_bbc_prune", "minilm_bbc_eval",
                       "demo_minilm_bbc", "smollm2_pydoc_finetune", "smollm2_pydoc_eval",
                       "smollm2_moh_qnorm_convert", "minilm_moh_bbc_finetune", "compare_moh_pydoc_scratch",
                       "compare_positions_pydoc_scratch",
                       "minilm_shrp_bbc", "dha_pydoc_scratch", "smollm2_dha_pydoc", "passkey_longheads_scratch",
                       "smollm2_passkey_longheads"}
    for name, path, summary in list_recipes():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# headmods ") and summary, f"{name} must open with its command and a summary"


@pytest.fixture(scope="module")
def minilm_finetuned(tmp_path_factory) -> Path:
    out = _run("minilm_bbc_finetune", tmp_path_factory.mktemp("ft"))
    return out / "model"


def test_minilm_finetune_recipe(minilm_finetuned):
    model = headmods.load(minilm_finetuned)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 5
    assert isinstance(model.bert.encoder.layer[0].attention, headmods.HeadAttention)


def test_convert_recipe_verifies_and_saves(tmp_path):
    out = _run("convert_minilm_mha", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["convert"]["max_abs_diff"] <= 1e-5
    assert headmods.load(out / "model") is not None


def test_prune_and_eval_recipes(tmp_path, minilm_finetuned):
    out = _run("minilm_bbc_prune", tmp_path / "prune", f"model.checkpoint={minilm_finetuned}")
    metrics = json.loads((out / "metrics.json").read_text())
    removed = 6 * (3 * (6 * 32 * 384 + 6 * 32) + 384 * 6 * 32)  # 6 layers: half of q/k/v rows + biases, o columns
    assert metrics["prune"]["attention_params_before"] - metrics["prune"]["attention_params_after"] == removed
    assert {"unpruned", "pruned", "recovered"} <= set(metrics)
    assert len(list(out.glob("*.png"))) >= 2
    pruned = headmods.load(out / "model")
    assert pruned.bert.encoder.layer[2].attention.num_heads == 6
    ev = _run("minilm_bbc_eval", tmp_path / "eval", f"model.checkpoint={out / 'model'}")
    assert "val_accuracy" in json.loads((ev / "metrics.json").read_text())["eval"]


def test_demo_recipe_is_the_shrp_pipeline(tmp_path):
    out = _run("demo_minilm_bbc", tmp_path, "data.limit=120", "shrp.sweep=[0.0,0.1]")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mha", "shrp", "shrp-pruned", "shrp-recovered", "shrp-extreme", "bench", "sweep"} <= set(metrics)
    assert {"loss.png", "head_usage.png", "tradeoff.png", "latency.png"} <= {p.name for p in out.glob("*.png")}
    model = headmods.load(out / "model")
    assert type(model.bert.encoder.layer[0].attention).variant == "shrp"


def test_structural_prune_after_finetune_in_one_demo_run(tmp_path):
    """The previous demo pipeline (recipe: demo): fine-tune, structural prune, recover."""
    config = load_config(dict((n, p) for n, p, _ in list_recipes())["minilm_bbc_finetune"],
                         SMALL + [f"output_dir={tmp_path}", "recipe=demo", "prune.recover_steps=2"])
    run_recipe(config, command="test demo")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"finetune", "unpruned", "pruned", "recovered", "bench"} <= set(metrics)
    assert {"loss.png", "head_importance.png", "tradeoff.png", "latency.png"} <= {p.name for p in tmp_path.glob("*.png")}
    assert (tmp_path / "finetuned" / "headmods.json").is_file() and (tmp_path / "model" / "headmods.json").is_file()


def test_minilm_shrp_recipe(tmp_path):
    out = _run("minilm_shrp_bbc", tmp_path, "data.limit=120", "shrp.sweep=[0.05]", "shrp.baseline=false",
               "shrp.extreme_keep_layers=null")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "mha" not in metrics and "shrp-extreme" not in metrics
    assert set(metrics["sweep"]) == {"theta_0p05"} and "SHRP-style" in (out / "report.md").read_text()


@pytest.mark.slow
def test_smollm2_recipes(tmp_path):
    out = _run("smollm2_pydoc_finetune", tmp_path / "ft", "data.limit=12", "data.max_length=64")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["val_ppl"] > 1 and metrics["finetune"]["val_ppl"] > 1
    ev = _run("smollm2_pydoc_eval", tmp_path / "ev", f"model.checkpoint={out / 'model'}", "data.limit=12",
              "data.max_length=64")
    assert json.loads((ev / "metrics.json").read_text())["eval"]["val_ppl"] > 1


def test_minilm_moh_finetune_recipe(tmp_path):
    out = _run("minilm_moh_bbc_finetune", tmp_path)
    model = headmods.load(out / "model")
    attn = model.bert.encoder.layer[0].attention
    assert type(attn).variant == "moh" and attn.config.shared_heads == 3 and attn.config.active_routed == 6
    assert "val_accuracy" in json.loads((out / "metrics.json").read_text())["finetune"]
    assert (out / "head_usage.png").is_file() and "## Head usage" in (out / "report.md").read_text()


@pytest.mark.slow
def test_smollm2_moh_qnorm_convert_recipe(tmp_path):
    out = _run("smollm2_moh_qnorm_convert", tmp_path, "data.limit=12", "data.max_length=64")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"source", "converted", "calibrate"} <= set(metrics)
    assert metrics["converted"]["val_ppl"] >= metrics["source"]["val_ppl"] * 0.5
    model = headmods.load(out / "model")
    assert model.model.layers[0].self_attn.config.router == "qnorm"


def test_compare_recipe(tmp_path):
    out = _run("compare_moh_pydoc_scratch", tmp_path, "data.limit=24", "model.scratch.hidden_size=64",
               "model.scratch.intermediate_size=96", "model.scratch.num_hidden_layers=2", "compare.seeds=[0]",
               "model.tokenizer=bpe:320", "data.max_length=32")
    metrics = json.loads((out / "metrics.json").read_text())["compare"]
    assert set(metrics) == {"mha", "moh100", "moh75", "moh50"} and metrics["mha"]["relative_to_mha"] == 0.0
    assert "Comparison" in (out / "report.md").read_text()


def test_compare_positions_recipe(tmp_path):
    out = _run("compare_positions_pydoc_scratch", tmp_path, "data.limit=24", "model.scratch.hidden_size=64",
               "model.scratch.intermediate_size=96", "model.scratch.num_hidden_layers=2", "model.tokenizer=bpe:320",
               "data.max_length=32", "model.scratch.max_position_embeddings=32", "compare.eval_every=1",
               "compare.eval_batches=1")
    metrics = json.loads((out / "metrics.json").read_text())
    names = ["rope_mha", "cmha", "mha_absolute", "mdha", "rmha", "rcmha"]
    assert set(metrics["compare"]) == set(names) and set(metrics["compare_curves"]) == set(names)
    for name in names:
        row = metrics["compare"][name]
        assert row["mean_val_loss"] > 0 and 0 <= row["mean_val_token_accuracy"] <= 1 and row["params"] > 0
        assert 0 <= metrics[f"{name}-seed0"]["val_token_accuracy"] <= 1
        assert [step for step, _ in metrics["compare_curves"][name]] == [0, 1, 2]
    assert metrics["compare"]["rope_mha"]["relative_to_rope_mha"] == 0.0
    start = {name: metrics["compare_curves"][name][0][1] for name in names}
    assert start["cmha"] == pytest.approx(start["rope_mha"], abs=1e-5)  # phase_init rope: RoPE attention at step 0
    for name in ("mha_absolute", "rmha"):  # no host RoPE (rmha starts as MHA without positions)
        assert abs(start[name] - start["rope_mha"]) > 1e-5
    report = (out / "report.md").read_text()
    assert (out / "held_out.png").is_file() and "## Held-out loss against training step" in report
    assert "mean next-token accuracy" in report and "params vs rope_mha (%)" in report
    for name in names:  # a note for every variant past the 2 % tolerance, none for the others
        off = abs(metrics["compare"][name]["params_relative_to_rope_mha"]) > 0.02
        assert (f"- {name} has " in report) == off
    assert any(abs(metrics["compare"][n]["params_relative_to_rope_mha"]) > 0.02 for n in names)  # tiny: rows weigh more


class Crash(Exception):
    pass


def test_killed_and_resumed_finetune_reproduces_the_uninterrupted_run(tmp_path, tiny_recipe):
    from lightning.pytorch.callbacks import Callback

    class KillAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 7:  # after the checkpoint of step 6
                raise Crash("killed")

    path = tiny_recipe()
    straight = load_config(path, [f"output_dir={tmp_path / 'straight'}"])
    run_recipe(straight)
    interrupted = load_config(path, [f"output_dir={tmp_path / 'resumed'}"])
    with pytest.raises(Crash):
        run_recipe(interrupted, callbacks=(KillAt(),))
    assert (tmp_path / "resumed" / "lightning" / "finetune" / "last.ckpt").is_file()
    assert not (tmp_path / "resumed" / "model").exists()
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["status"] == "running"
    run_recipe(interrupted)  # the same command again: resumes from step 6
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["status"] == "finished"
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["finetune"]
    b = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["finetune"]
    for key in ("val_loss", "val_accuracy", "val_f1"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    wa = headmods.load(tmp_path / "straight" / "model").state_dict()
    wb = headmods.load(tmp_path / "resumed" / "model").state_dict()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_distributed_finetune_ddp_two_cpu_processes(tmp_path, tiny_recipe):
    path = tiny_recipe()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([HEADMODS, "finetune", "--config", str(path), "train.strategy=ddp", "train.devices=2",
                           "train.max_steps=2", f"output_dir={tmp_path / 'ddp'}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "model" / "headmods.json").is_file()
    assert "val_accuracy" in json.loads((tmp_path / "ddp" / "metrics.json").read_text())["finetune"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([HEADMODS, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_cli_ls_and_cp(tmp_path):
    proc = _cli("ls")
    assert proc.returncode == 0
    for word in ("mha", "demo_minilm_bbc", "minilm", "smollm2-135m"):
        assert word in proc.stdout
    proc = _cli("cp", "minilm_bbc_finetune", str(tmp_path))
    assert proc.returncode == 0 and (tmp_path / "minilm_bbc_finetune.yaml").is_file()
    assert load_config(tmp_path / "minilm_bbc_finetune.yaml").recipe == "finetune"
    again = _cli("cp", "minilm_bbc_finetune", str(tmp_path))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr


def test_cli_bench_and_export(tmp_path, minilm_finetuned):
    proc = _cli("bench", "--variant", "mha", "--num-kv-heads", "4", "--embed-dim", "64", "--num-heads", "8",
                "--batch", "2", "--seq-len", "32", "--rounds", "1")
    assert proc.returncode == 0 and "mha (SDPA baseline)" in proc.stdout and "tokens/s" in proc.stdout
    proc = _cli("bench", "--ckpt", str(minilm_finetuned), "--batch", "2", "--seq-len", "16", "--rounds", "1")
    assert proc.returncode == 0 and "22,7" in proc.stdout  # MiniLM's parameter count
    proc = _cli("export", "--ckpt", str(minilm_finetuned), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForSequenceClassification

    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert stock.config.num_labels == 5


@pytest.mark.parametrize("args,message", [
    (["finetune", "--config", "no_such_recipe"], "no shipped recipe named 'no_such_recipe'"),
    (["finetune", "--config", "minilm_bbc_finetune", "model.variant=nope"], "unknown variant 'nope'"),
    (["finetune", "--config", "minilm_bbc_finetune", "train.max_stpes=2"], "unknown key train.max_stpes"),
    (["finetune", "--config", "minilm_bbc_finetune", "data.kind=folder", "data.path=/no/such/dir"], "/no/such/dir"),
    (["prune", "--config", "minilm_bbc_finetune"], "is a 'finetune' recipe; run it with `headmods finetune`"),
    (["export", "--ckpt", "/no/such/ckpt", "--out", "/tmp/x"], "/no/such/ckpt"),
    (["bench"], "give exactly one of --ckpt"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("headmods")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_cli_data_errors(tmp_path):
    empty = tmp_path / "labels"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    (empty / "b" / "x.txt").write_text("some text")
    proc = _cli("finetune", "--config", "minilm_bbc_finetune", "data.kind=folder", f"data.path={empty}", cwd=tmp_path)
    assert proc.returncode == 2 and str(empty / "a") in proc.stderr
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    proc = _cli("finetune", "--config", "minilm_bbc_finetune", "data.kind=json", f"data.path={blank}", cwd=tmp_path)
    assert proc.returncode == 2 and "empty" in proc.stderr.lower()


@pytest.mark.slow
def test_non_editable_install_ships_recipes_and_manifests(tmp_path):
    """A wheel (what `pip install .` builds) carries the recipes and checkpoint manifests."""
    repo = Path(__file__).resolve().parents[2]
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(repo),
                    "-w", str(wheel_dir)], check=True, capture_output=True, timeout=600)
    wheel = next(wheel_dir.glob("headmods-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "headmods.cli", "ls"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "demo_minilm_bbc" in proc.stdout and "smollm2-135m" in proc.stdout
    where = subprocess.run([sys.executable, "-c", "import headmods; print(headmods.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path).stdout
    assert where.startswith(str(target))  # the installed copy answered, not the repository


def test_evaluate_leaves_the_model_in_eval_mode(tiny_bert_dir):
    from headmods.recipes.config import TrainConfig
    from headmods.recipes.training import make_task
    from headmods.convert import load_hf_model

    model = load_hf_model(tiny_bert_dir, auto_class="AutoModelForSequenceClassification",
                          allow_missing=("classifier.",), config_overrides={"num_labels": 2})
    assert not model.training
    batch = {"input_ids": torch.randint(1, 1000, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    make_task(model, "classification", TrainConfig(), steps=1, num_labels=2).evaluate([batch])
    assert not any(m.training for m in model.modules())


def test_dha_scratch_recipe(tmp_path):
    out = _run("dha_pydoc_scratch", tmp_path, "data.limit=48", "model.scratch.hidden_size=64",
               "model.scratch.intermediate_size=96", "model.scratch.num_hidden_layers=2", "model.tokenizer=bpe:320",
               "data.max_length=32", "dha.pretrain_steps=2", "dha.fusion_steps=2", "dha.calib_samples=8",
               "dha.eval_every=1", "dha.eval_batches=1")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"source", "dha-start", "dha-end", "gqa-start", "gqa-end"} <= set(metrics)
    assert metrics["dha"]["kv_heads_kept"] == 8  # 25 % of 2 layers x (8 K + 8 V) heads
    report = (out / "report.md").read_text()
    assert "GQA mean-pool" in report and (out / "held_out.png").is_file()
    curves = set(json.loads((out / "metrics.json").read_text())["dha_summary"])
    assert curves == {"dha", "gqa"}
    model = headmods.load(out / "model")
    attn = model.model.layers[0].self_attn
    assert type(attn).variant == "dha" and attn.num_heads == 8


@pytest.mark.slow
def test_smollm2_dha_recipe(tmp_path):
    out = _run("smollm2_dha_pydoc", tmp_path, "data.limit=12", "data.max_length=32", "dha.fusion_steps=1",
               "dha.calib_samples=4", "dha.eval_batches=1", "train.max_steps=1", "dha.baseline=false")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dha"]["kv_fraction_of_source"] == pytest.approx(0.5, abs=0.02)
    assert metrics["dha-end"]["val_ppl"] > 1 and "gqa-end" not in metrics


def test_passkey_scratch_recipe(tmp_path):
    out = _run("passkey_longheads_scratch", tmp_path, "data.passkey_samples=40", "data.passkey_filler=6",
               "model.scratch.hidden_size=32", "model.scratch.intermediate_size=48", "model.scratch.num_hidden_layers=1",
               "model.tokenizer=bpe:320", "data.max_length=160", "passkey.chunk_size=8", "passkey.attend_length=32",
               "passkey.query_position=16", "passkey.lengths=[64,160]", "passkey.depths=[0.5]", "passkey.trials=2")
    metrics = json.loads((out / "metrics.json").read_text())["passkey"]
    assert set(metrics["full_attention"]) == {"64", "160", "seconds"} and set(metrics["longheads"]) >= {"64", "160"}
    assert set(metrics) == {"full_attention", "longheads", "longheads_token", "longheads_unroped"}
    assert all(0.0 <= metrics[m][n] <= 1.0 for m in ("full_attention", "longheads") for n in ("64", "160"))
    assert (out / "passkey_longheads.png").is_file() and "Passkey retrieval" in (out / "report.md").read_text()
    model = headmods.load(out / "model")
    assert type(model.model.layers[0].self_attn).variant == "longheads"


@pytest.mark.slow
def test_smollm2_passkey_recipe(tmp_path):
    out = _run("smollm2_passkey_longheads", tmp_path, "passkey.chunk_size=16", "passkey.attend_length=48",
               "passkey.lengths=[96]", "passkey.depths=[0.5]", "passkey.trials=1", data=False)
    metrics = json.loads((out / "metrics.json").read_text())["passkey"]
    assert 0.0 <= metrics["longheads"]["96"] <= 1.0 and 0.0 <= metrics["full_attention"]["96"] <= 1.0
