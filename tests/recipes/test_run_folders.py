"""Recipe runs claim their output_dir: refusals keep earlier results, same settings resume,
--overwrite starts over, and the CLI reports misuse in one line (tiny BERT, 4 steps)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from headmods.cli import main
from headmods.errors import RunFolderError
from headmods.recipes.config import load_config
from headmods.recipes.run_folder import read_record
from headmods.recipes.runner import RecipeRun, run_recipe

SHORT = ["train.max_steps=4", "train.checkpoint_every_n_steps=2"]
REPO = Path(__file__).resolve().parents[2]


class Steps(Callback):
    """Counts the training batches a run computes."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args) -> None:
        self.batches += 1


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, write_tiny_recipe) -> Path:
    folder = tmp_path_factory.mktemp("recipe")
    return write_tiny_recipe(folder / "tiny.yaml", folder / "unused")


@pytest.fixture(scope="module")
def finished(recipe, tmp_path_factory) -> Path:
    """A finished 4-step fine-tune of the tiny BERT (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_recipe(load_config(recipe, [*SHORT, f"output_dir={out}"]), command="test finetune")
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "copy"))


def _step(out: Path) -> int:
    return torch.load(out / "lightning" / "finetune" / "last.ckpt", weights_only=True)["global_step"]


def _results(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("metrics.json", "report.md")}


def test_eval_into_a_finished_finetune_folder_is_refused_and_keeps_its_results(recipe, finished):
    before = _results(finished)
    config = load_config(recipe, [f"output_dir={finished}", "recipe=eval", f"model.checkpoint={finished / 'model'}",
                                  "model.source=null"])
    with pytest.raises(RunFolderError, match=r"holds a 'finetune' run \(finished\); an 'eval' run"):
        run_recipe(config)
    assert _results(finished) == before and read_record(finished)["recipe"] == "finetune"


def test_rerun_with_another_lr_is_refused_naming_the_key_and_both_values(recipe, finished):
    before = _results(finished)
    with pytest.raises(RunFolderError, match=r"train\.lr: 0\.001 -> 0\.002") as info:
        run_recipe(load_config(recipe, [*SHORT, f"output_dir={finished}", "train.lr=2.0e-3"]))
    assert "--overwrite" in str(info.value)
    assert _results(finished) == before and read_record(finished)["config"]["train"]["lr"] == 0.001


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the folder is a copy
def test_same_settings_resume_without_training_again(recipe, finished, tmp_path):
    out = _copy(finished, tmp_path)
    steps, logs = Steps(), []
    config = load_config(recipe, [*SHORT, f"output_dir={out}", "train.progress_bar=true"])  # presentation only
    RecipeRun(config, callbacks=(steps,), log=logs.append).run()
    assert f"[run] resuming the run in {out} (same settings); --overwrite starts over" in logs
    assert steps.batches == 0 and _step(out) == 4
    assert read_record(out)["status"] == "finished"


def test_overwrite_discards_the_previous_run_and_trains_from_the_start(recipe, finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "stale.png").write_bytes(b"from the previous run")
    steps = Steps()
    config = load_config(recipe, [*SHORT, f"output_dir={out}", "train.lr=2.0e-3"])
    RecipeRun(config, callbacks=(steps,), overwrite=True, log=lambda msg: None).run()
    assert steps.batches == 4 and _step(out) == 4 and not (out / "stale.png").exists()
    record = read_record(out)
    assert record["config"]["train"]["lr"] == 0.002 and record["status"] == "finished"


def test_a_folder_with_user_files_is_refused_and_left_alone(recipe, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(RunFolderError, match=f"{out} holds files but no run.json"):
        run_recipe(load_config(recipe, [*SHORT, f"output_dir={out}"]), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"


# -- the command line ----------------------------------------------------------------------------------------------

def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, command: str = "finetune") -> str:
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"headmods {command}: error: "), err[-2000:]
    return lines[0]


def _unavailable(accelerator: str) -> bool:
    if accelerator == "cuda":
        return not torch.cuda.is_available()
    if accelerator == "mps":
        return not torch.backends.mps.is_available()
    return True


@pytest.mark.parametrize("accelerator", ["cuda", "mps", "tpu"])
def test_cli_unsupported_accelerator_is_one_line_and_leaves_no_folder(capsys, recipe, tmp_path, accelerator):
    if not _unavailable(accelerator):
        pytest.skip(f"{accelerator} is available here")
    out = tmp_path / "acc"
    line = _one_line(*_cli(capsys, "finetune", "--config", str(recipe), *SHORT, f"output_dir={out}",
                           f"train.accelerator={accelerator}"))
    assert any(word in line.lower() for word in (accelerator, "xla")), line
    assert not out.exists()  # a fresh run that failed before its first checkpoint releases its folder


def test_cli_variant_that_differs_from_the_checkpoint_folder(capsys, recipe, finished, tmp_path):
    line = _one_line(*_cli(capsys, "eval", "--config", str(recipe), "recipe=eval", f"output_dir={tmp_path / 'ev'}",
                           f"model.checkpoint={finished / 'model'}", "model.source=null", "model.variant=moh"),
                     "eval")
    assert "model.variant is 'moh'" in line and "'mha'" in line and str(finished / "model") in line


def test_cli_changed_max_steps_on_resume_is_the_settings_refusal(capsys, recipe, finished):
    before = _results(finished)
    line = _one_line(*_cli(capsys, "finetune", "--config", str(recipe), *SHORT, f"output_dir={finished}",
                           "train.max_steps=6", "--resume"))
    assert "train.max_steps: 4 -> 6" in line and "--overwrite" in line
    assert _results(finished) == before


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_cli_unreadable_resume_checkpoint_names_the_file(capsys, recipe, finished, tmp_path, damage):
    out = _copy(finished, tmp_path)
    last = out / "lightning" / "finetune" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=1.0)}, last)
    line = _one_line(*_cli(capsys, "finetune", "--config", str(recipe), *SHORT, f"output_dir={out}"))
    assert str(last) in line and "--overwrite" in line
    assert ("argparse.Namespace" if damage == "pickled" else "truncated or corrupt") in line


def test_cli_lr_that_is_not_a_number_names_lr(capsys, recipe, tmp_path):
    line = _one_line(*_cli(capsys, "finetune", "--config", str(recipe), "train.lr=fast",
                           f"output_dir={tmp_path / 'x'}"))
    assert "lr must be a number > 0, got 'fast'" in line


def test_cli_debug_prints_the_traceback_too(capsys, recipe, tmp_path):
    code, err = _cli(capsys, "--debug", "finetune", "--config", str(recipe), "train.lr=fast",
                     f"output_dir={tmp_path / 'x'}")
    assert code == 2 and err.startswith("Traceback (most recent call last)")
    assert err.strip().splitlines()[-1].startswith("headmods finetune: error: train: lr must be a number")


def test_cli_process_writes_exactly_one_line_to_stderr(recipe, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "headmods.cli", "finetune", "--config", str(recipe),
                           "train.lr=fast", f"output_dir={tmp_path / 'x'}"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    assert "lr must be a number" in proc.stderr
