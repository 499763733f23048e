"""The run-folder rules of headmods.recipes.run_folder, on records alone (no model, no training)."""

from __future__ import annotations

import pytest

from headmods.errors import ConfigError, RunFolderError
from headmods.recipes.run_folder import RECORD_NAME, claim_run_folder, read_record, settings_diff

CONFIG = {"output_dir": "a", "train": {"lr": 0.001, "max_steps": 10, "progress_bar": True}, "seeds": (0, 1)}


def _claim(folder, config=CONFIG, recipe="finetune", **kwargs):
    logs: list[str] = []
    claimed = claim_run_folder(folder, recipe=recipe, config=config, command="headmods test", log=logs.append,
                               **kwargs)
    return claimed, logs


def _with(**train):
    return {**CONFIG, "train": {**CONFIG["train"], **train}}


def test_a_missing_folder_is_claimed_running_then_finished(tmp_path):
    folder, logs = _claim(tmp_path / "new" / "run")
    record = read_record(tmp_path / "new" / "run")
    assert folder.fresh and record["status"] == "running" and record["recipe"] == "finetune" and logs == []
    assert record["config"]["train"]["lr"] == 0.001 and record["command"] == "headmods test"
    folder.finish()
    assert read_record(folder.path)["status"] == "finished"


def test_same_settings_resume_and_say_so_in_one_line(tmp_path):
    _claim(tmp_path)[0].finish()
    folder, logs = _claim(tmp_path, config={**_with(progress_bar=False), "output_dir": "moved"})
    assert not folder.fresh and read_record(tmp_path)["status"] == "running"
    assert logs == [f"[run] resuming the run in {tmp_path} (same settings); --overwrite starts over"]


def test_other_settings_are_refused_naming_each_key_with_both_values(tmp_path):
    _claim(tmp_path)[0].finish()
    (tmp_path / "metrics.json").write_text("{}")
    for kwargs in ({}, {"resume": True}):
        with pytest.raises(RunFolderError) as info:
            _claim(tmp_path, config=_with(lr=0.002, max_steps=12), **kwargs)
        message = str(info.value)
        assert "train.lr: 0.001 -> 0.002" in message and "train.max_steps: 10 -> 12" in message
        assert "--overwrite" in message and "progress_bar" not in message
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_overwrite_removes_the_previous_run_and_starts_fresh(tmp_path):
    _claim(tmp_path)[0].finish()
    (tmp_path / "lightning" / "finetune").mkdir(parents=True)
    (tmp_path / "lightning" / "finetune" / "last.ckpt").write_bytes(b"old")
    folder, logs = _claim(tmp_path, config=_with(lr=0.002), overwrite=True)
    assert folder.fresh and sorted(p.name for p in tmp_path.iterdir()) == [RECORD_NAME]
    assert read_record(tmp_path)["config"]["train"]["lr"] == 0.002 and "removed the previous" in logs[0]


def test_another_recipes_run_is_refused_even_with_overwrite(tmp_path):
    _claim(tmp_path)[0].finish()
    (tmp_path / "report.md").write_text("fine-tune results")
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match=r"holds a 'finetune' run \(finished\); an 'eval' run"):
            _claim(tmp_path, recipe="eval", **kwargs)
    assert (tmp_path / "report.md").read_text() == "fine-tune results"
    assert read_record(tmp_path)["recipe"] == "finetune"


@pytest.mark.parametrize("kwargs", [{}, {"overwrite": True}])
def test_a_folder_headmods_did_not_create_is_refused(tmp_path, kwargs):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=f"{tmp_path} holds files but no run.json"):
        _claim(tmp_path, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_needs_a_run_and_excludes_overwrite(tmp_path):
    with pytest.raises(RunFolderError, match="holds no run to resume"):
        _claim(tmp_path / "none", resume=True)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ConfigError, match="at most one of --resume"):
        _claim(tmp_path, resume=True, overwrite=True)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"recipe": "finetune"}'])
def test_an_unreadable_record_is_refused_and_kept(tmp_path, text):
    (tmp_path / RECORD_NAME).write_text(text)
    with pytest.raises(RunFolderError, match=RECORD_NAME):
        _claim(tmp_path, overwrite=True)
    assert (tmp_path / RECORD_NAME).read_text() == text


def test_release_undoes_a_fresh_claim_but_keeps_a_resumable_run(tmp_path):
    folder, _ = _claim(tmp_path / "a")
    (tmp_path / "a" / "cache").mkdir()
    folder.release()
    assert not (tmp_path / "a").exists()
    folder, _ = _claim(tmp_path / "b")
    (tmp_path / "b" / "lightning" / "fit").mkdir(parents=True)
    (tmp_path / "b" / "lightning" / "fit" / "last.ckpt").write_bytes(b"x")
    folder.release()
    assert read_record(tmp_path / "b")["status"] == "running"
    _claim(tmp_path / "b")[0].release()  # a resumed run is never removed
    assert (tmp_path / "b" / "lightning" / "fit" / "last.ckpt").is_file()


def test_settings_diff_compares_json_values_and_shows_missing_keys():
    assert settings_diff({"seeds": (0, 1)}, {"seeds": [0, 1]}) == []
    assert settings_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": None}}) == ["a.c: (not set) -> null"]
    assert settings_diff({"m": {"v": "mha"}}, {"m": {"v": "moh"}}) == ['m.v: "mha" -> "moh"']
