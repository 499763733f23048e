"""The ``passkey`` recipe: passkey retrieval by length x depth, full attention against LongHeads.

With ``model.scratch`` a small RoPE LM is first trained here on passkey prompts of at most
``data.max_length`` tokens (``train.max_steps``); with ``model.source`` a checkpoint is evaluated
as it is (``model.variant: null`` keeps its own attention). The same model is then scored twice on
the same prompts (:mod:`headmods.recipes.passkey`): as it is, and with every attention module
swapped for LongHeads (``passkey.chunk_size``, ``passkey.attend_length``, ``passkey.selection``,
``passkey.query_position``).
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from ..swap import swap
from .passkey import passkey_accuracy
from .report import markdown_table

if TYPE_CHECKING:
    from .runner import RecipeRun

__all__ = ["run_passkey"]


def _longheads_runs(p: Any) -> list[tuple[str, str, int | None]]:
    """(name, selection, query_position) of each LongHeads evaluation; the configured one first."""
    runs = [("longheads", p.selection, p.query_position)]
    if p.compare_token and p.selection != "token":
        runs.append(("longheads token", "token", p.query_position))
    if p.compare_unroped and p.query_position is not None:
        runs.append(("longheads unroped", p.selection, None))
    return runs


def run_passkey(run: "RecipeRun") -> bool:
    cfg, p = run.config, run.config.passkey
    if cfg.model.scratch is not None:
        from .scratch import parse_tokenizer_spec, scratch_model

        run.dm = run.data(parse_tokenizer_spec(cfg.model.tokenizer))
        tokenizer = run.dm.tokenizer
        model = scratch_model(cfg.model.scratch, tokenizer)
        if not run.train(model, "train", cfg.train.max_steps):
            return False
        run.evaluate(model, "trained")
        info: dict[str, Any] = {}
    else:
        if cfg.model.variant is not None:
            raise ValueError("the passkey recipe compares the source's own attention with LongHeads; set "
                             f"model.variant: null (got {cfg.model.variant!r})")
        from .build import build_model

        model, tokenizer, info = build_model(cfg.model)
    grids, rows = {}, []
    candidates = [("full attention", model)]
    for name, selection, position in _longheads_runs(p):
        m = copy.deepcopy(model)
        swap(m, "longheads", chunk_size=p.chunk_size, attend_length=p.attend_length, selection=selection,
             query_position=position)
        candidates.append((name, m))
    longheads = candidates[1][1]
    for name, m in candidates:
        start = time.perf_counter()
        grid = passkey_accuracy(m, tokenizer, p.lengths, p.depths, trials=p.trials, seed=cfg.data.seed if cfg.data else 0)
        seconds = time.perf_counter() - start
        grids[name] = grid
        for length, accs in grid.items():
            rows.append({"attention": name, "length": length, "accuracy": sum(accs) / len(accs),
                         **{f"depth {d:g}": a for d, a in zip(p.depths, accs)}})
            run.report.add_metric(f"passkey.{name.replace(' ', '_')}.{length}", sum(accs) / len(accs))
        run.report.add_metric(f"passkey.{name.replace(' ', '_')}.seconds", round(seconds, 1))
        run.log(f"[passkey] {name}: " + ", ".join(f"{n}: {sum(a) / len(a):.2f}" for n, a in grid.items()))
        run.report.grids[f"passkey_{name.replace(' ', '_')}"] = {
            "title": f"Passkey accuracy, {name}", "rows": {str(n): a for n, a in grid.items()},
            "columns": [f"{d:g}" for d in p.depths], "xlabel": "depth of the key", "ylabel": "prompt tokens",
            "cbar": "accuracy", "limits": (0.0, 1.0)}
    token_note = " (\"longheads token\": the official per-token selection, for comparison)" if any(
        name == "longheads token" for name, _ in candidates) else ""
    run.report.add_section("Passkey retrieval", (
        f"{p.trials} prompts per (length, depth); a prompt counts when the model's argmax writes every token of the "
        f"five-digit key, decoding greedily after the prompt. LongHeads: chunks of {p.chunk_size} tokens, "
        f"{p.attend_length} tokens attended per query ({p.attend_length // p.chunk_size} chunks), {p.selection} "
        f"selection{token_note}, chunks scored with "
        + ("the un-roped query (official)" if p.query_position is None else
           f"the query roped at position {p.query_position}" + (" (\"unroped\": the official un-roped query)"
                                                               if p.compare_unroped else ""))
        + ", training-free; the same weights as full attention.\n\n") + markdown_table(rows))
    run.save(longheads, tokenizer, "model", source=info.get("source"))
    return True
