"""MiniLM encoder throughput: MHA vs SHRP-style pruned models from a `headmods shrp` run.

    .venv/bin/python benchmarks/bench_shrp.py [--run checkpoints/runs/minilm-shrp-bbc] [--seq-len 256]

Loads the run's pruned SHRP model (``<run>/model``), derives the extreme setting from it (attention
kept only in the layer with the largest contribution, as the recipe does) and times the encoders
(``model.base_model``) against MiniLM with headmods MHA, alternating in one process (median of the
per-round ratios). Speed does not depend on the classifier head.
"""

from __future__ import annotations

import argparse
import copy

import torch

import headmods
from headmods.bench import compare
from headmods.convert import load_hf_model, resolve_source
from headmods.recipes.shrp_pipeline import attention_params, shrp_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="checkpoints/runs/minilm-shrp-bbc")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    mha = load_hf_model(resolve_source("minilm").path)
    headmods.swap(mha, "mha")
    pruned = headmods.load(f"{a.run}/model").base_model
    extreme = copy.deepcopy(pruned)
    layers = sorted(shrp_layers(extreme).items(), key=lambda kv: -float(kv[1].o_proj.weight.detach().norm())
                    if not kv[1].config.drop_attention else 0.0)
    for _, layer in layers[1:]:
        if not layer.config.drop_attention:
            layer.drop_attention()
    models = {"MiniLM, headmods MHA": mha, "SHRP pruned": pruned, "SHRP, attention in 1 layer": extreme}
    ids = torch.randint(1000, 29000, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        res = compare({k: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for k, m in models.items()},
                      rounds=a.rounds, threads=a.threads)
    print(f"MiniLM encoder forward, batch {a.batch}, seq {a.seq_len}, fp32, {a.threads} threads, "
          f"median of {a.rounds} rounds\n")
    print(res.to_markdown())
    print()
    for name, m in models.items():
        layers = shrp_layers(m)
        heads = sum(l.num_heads for l in layers.values() if not l.config.drop_attention) if layers else 72
        print(f"{name}: throughput x{1 / res.ratio(name):.2f}, parameters {sum(q.numel() for q in m.parameters()):,}, "
              f"attention parameters {attention_params(m):,}, heads {heads}")


if __name__ == "__main__":
    main()
