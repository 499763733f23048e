"""Run reports: the files written, their contents, the plots and the atomic writes."""

from __future__ import annotations

import ast
import inspect
import json
import os
import struct
import sys

import pytest
import torch

from headmods.recipes import plots
from headmods.recipes import report as report_module
from headmods.recipes.plots import plot_curves, plot_heatmap, short_labels, write_atomic
from headmods.recipes.report import RunReport, format_value, markdown_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMAND = "headmods demo --out 'runs/demo 1' --seed 0"


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def full_report() -> RunReport:
    config = {"model": {"name": "bert-tiny", "heads": 4}, "lr": 3e-5, "stages": ("finetune", "prune")}
    report = RunReport("Demo run", command=COMMAND, config=config)
    report.add_metric("params", 22_713_216)
    report.add_metric("finetune.val_accuracy", 0.97123)
    report.add_metric("finetune.epochs", 3)
    report.add_metric("prune.kept_fraction", torch.tensor(0.625))
    report.metrics["per_layer"] = [{"heads": 4}, {"heads": 3}]
    for step, value in [(0, 2.3), (10, 1.5), (20, 1.1)]:
        report.add_curve_point("finetune", step, value)
    report.add_curve_point("val", 20, 1.25)
    report.add_curve_point("recover", 30, 1.0)
    report.head_scores = {"bert.encoder.layer.0.attention": [0.1, 0.9, 0.4, 0.7],
                          "bert.encoder.layer.1.attention": [0.3, 0.2, 0.8]}
    report.kept_heads = {"bert.encoder.layer.0.attention": [1, 3], "bert.encoder.layer.1.attention": [2]}
    report.tradeoff = [{"label": "fine-tuned", "params": 22_713_216, "accuracy": 0.97},
                       {"label": "pruned", "params": 18_000_000, "accuracy": 0.955}]
    report.latency = [{"label": "fine-tuned", "ms": 12.5}, {"label": "pruned", "ms": 8.0}]
    report.notes.append("Ran on 2 CPU cores.")
    report.add_section("Data", "Trained on **1,000** examples.")
    report.add_section("Per layer", markdown_table([{"layer": 0, "heads": 4}, {"layer": 1, "heads": 3}]))
    return report


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "nested" / "out"
    report = full_report()
    return report, report.write(out), out


def test_full_report_writes_text_files_and_four_pngs(written):
    _, files, out = written
    pngs = {"loss.png", "head_importance.png", "tradeoff.png", "latency.png"}
    assert set(files) == {"report.md", "metrics.json"} | pngs
    assert sorted(os.listdir(out)) == sorted(files), "stray files (temporaries?) in the output folder"
    for name, path in files.items():
        assert path == out / name and path.is_file()
    for name in pngs:
        width, height = png_size(files[name])
        assert width >= 300 and height >= 100
        assert files[name].stat().st_size > 5_000


def test_markdown_shows_command_metrics_sections_links_and_config(written):
    _, files, _ = written
    md = files["report.md"].read_text()
    lines = md.splitlines()
    assert lines[0] == "# Demo run"
    assert f"```sh\n{COMMAND}\n```" in md
    assert "| metric | value |" in md
    for row in ("| params | 22,713,216 |", "| finetune.val_accuracy | 0.9712 |", "| finetune.epochs | 3 |",
                "| prune.kept_fraction | 0.625 |"):
        assert row in md
    assert "- Ran on 2 CPU cores." in md
    assert "## Data\n\nTrained on **1,000** examples." in md
    assert "## Per layer\n\n| layer | heads |" in md
    for png in ("loss.png", "head_importance.png", "tradeoff.png", "latency.png"):
        assert f"]({png})" in md
    assert "| bert.encoder.layer.0.attention | 4 | 2 | 1, 3 |" in md
    assert "| pruned | 8 | 0.64 |" in md  # latency ratio to the first row
    assert md.index("## Data") < md.index("## Config")
    config_block = md[md.index("## Config"):]
    assert "```yaml\nmodel:\n  name: bert-tiny\n  heads: 4\nlr: 3.0e-05\nstages:\n- finetune\n- prune\n```\n" in config_block
    assert md.rstrip().endswith("```")


def test_metrics_json_round_trips_exactly(written):
    report, files, _ = written
    text = files["metrics.json"].read_text()
    assert json.loads(text) == report.metrics
    assert text == json.dumps(report.metrics, sort_keys=True, indent=2) + "\n"
    assert json.loads(text)["prune"]["kept_fraction"] == 0.625  # the tensor was stored as a float
    assert list(json.loads(text)) == sorted(report.metrics)


def test_empty_report_writes_only_the_two_text_files(tmp_path):
    out = tmp_path / "a" / "b"
    files = RunReport("Nothing yet").write(out)
    assert set(files) == {"report.md", "metrics.json"}
    assert sorted(os.listdir(out)) == ["metrics.json", "report.md"]
    assert json.loads(files["metrics.json"].read_text()) == {}
    md = files["report.md"].read_text()
    assert md == "# Nothing yet\n"


def test_rewrite_replaces_files_and_leaves_no_temporaries(tmp_path):
    report = RunReport("r", metrics={"a": 1})
    report.write(tmp_path)
    report.add_metric("a", 2)
    report.write(tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "report.md"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = write_atomic(tmp_path / "x.txt", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(plots.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_metrics_that_would_not_round_trip_are_refused_before_writing(tmp_path):
    for bad in ({"shape": (2, 3)}, {"x": {1: 0.5}}, {"t": torch.ones(2)}):
        with pytest.raises(TypeError, match="metrics"):
            RunReport("r", metrics=bad).write(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_add_metric_builds_nested_groups_and_refuses_conflicts():
    report = RunReport("r")
    report.add_metric("finetune.val_accuracy", 0.9)
    report.add_metric("finetune.val_loss", 0.3)
    report.add_metric("a.b.c", 1)
    assert report.metrics == {"finetune": {"val_accuracy": 0.9, "val_loss": 0.3}, "a": {"b": {"c": 1}}}
    with pytest.raises(ValueError, match="finetune.val_loss"):
        report.add_metric("finetune.val_loss.x", 1)
    with pytest.raises(ValueError, match="empty"):
        report.add_metric("finetune..x", 1)


def test_heatmap_with_unequal_head_counts_and_marks(tmp_path):
    scores = {"enc.0.attn": [0.5, 0.1], "enc.1.attn": [0.2, 0.3, 0.9, 0.4, 0.6, 0.05], "enc.2.attn": [1.0]}
    path = plot_heatmap(tmp_path / "h.png", scores, title="t", cbar_label="score",
                        marks={"enc.1.attn": [2, 4], "enc.2.attn": [0]})
    assert png_size(path)[0] >= 300
    with pytest.raises(ValueError, match="outside"):
        plot_heatmap(tmp_path / "bad.png", scores, title="t", cbar_label="s", marks={"enc.0.attn": [2]})
    with pytest.raises(ValueError, match="no scores"):
        plot_heatmap(tmp_path / "bad.png", scores, title="t", cbar_label="s", marks={"enc.9.attn": [0]})
    assert sorted(os.listdir(tmp_path)) == ["h.png"]


def test_plots_refuse_empty_data(tmp_path):
    with pytest.raises(ValueError):
        plot_curves(tmp_path / "c.png", {"train": []}, title="t")
    with pytest.raises(ValueError):
        plot_heatmap(tmp_path / "h.png", {}, title="t", cbar_label="s")
    assert os.listdir(tmp_path) == []


def test_short_labels_keep_names_distinct():
    assert short_labels(["m.layers.0.attn", "m.layers.1.attn"]) == ["0", "1"]
    assert short_labels(["a.b", "a.b.c"]) == ["b", "b.c"]
    assert short_labels(["only.one.name"]) == ["name"]
    assert short_labels(["x." + "y" * 40 + ".0", "x.z.0"], max_len=10)[0] == "…" + "y" * 9


def test_markdown_table_formats_numbers_as_specified():
    rows = [{"name": "a|b", "params": 22_713_216, "acc": 0.971234, "ok": True},
            {"name": "c", "params": 1_000, "acc": 1e-7, "loss": float("nan")}]
    table = markdown_table(rows)
    assert table.splitlines() == [
        "| name | params | acc | ok | loss |",
        "|---|---:|---:|---|---:|",
        "| a\\|b | 22,713,216 | 0.9712 | true |  |",
        "| c | 1,000 | 1e-07 |  | nan |",
    ]
    assert markdown_table(rows, ["acc", "name"]).splitlines()[2] == "| 0.9712 | a\\|b |"
    assert markdown_table([]) == ""
    assert [format_value(v) for v in (123.456789, 12345.678, 7, -1_234_567, None)] == \
        ["123.5", "1.235e+04", "7", "-1,234,567", ""]


def test_plotting_touches_no_global_matplotlib_state(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    import matplotlib

    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    plot_curves(tmp_path / "c.png", {"train": [(0, 1.0), (1, 0.5)]}, title="t")
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


@pytest.mark.parametrize("module", [plots, report_module])
def test_matplotlib_and_yaml_are_imported_only_inside_functions(module):
    # the package's __init__ may pull in Lightning (and with it matplotlib), so check the modules'
    # own top-level imports rather than sys.modules
    tree = ast.parse(inspect.getsource(module))
    top = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    top += [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module]
    assert top and not [name for name in top if name.split(".")[0] in {"matplotlib", "yaml", "numpy"}]
