"""MoH layer (eval forward) against headmods MHA: sparse execution vs the official-style dense one.

    .venv/bin/python benchmarks/bench_moh.py [--seq-len 2048 --rounds 7]

h=12 heads of 64 (D=768), 2 shared + top-4 of 10 routed per token (50 % of heads active), learned
router at its N(0, 0.02) start (near-uniform, so loads are balanced), B=1, fp32. Candidates run
alternately in one process; ratios are medians of per-round ratios against headmods MHA (SDPA).
"""

from __future__ import annotations

import argparse

import torch

import headmods
from headmods.bench import compare
from headmods.layers.moh import MoHAttention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    D, h = 768, 12
    mha = headmods.MultiHeadAttention(D, h, batch_first=True).eval()
    sparse = MoHAttention.from_config(MoHAttention(D, h, shared_heads=2, active_routed=4, batch_first=True).config).eval()
    sparse.load_state_dict({**sparse.state_dict(), **mha.state_dict()})
    dense = MoHAttention.from_config(sparse.config.replace(execution="dense")).eval()
    dense.load_state_dict(sparse.state_dict())
    print(f"D={D} h={h}, 2 shared + top-4 of 10 routed, B={a.batch}, fp32, torch {torch.__version__}, "
          f"{a.threads} threads, median of {a.rounds} rounds\n")
    for T in a.seq_len:
        x = torch.randn(a.batch, T, D)
        for causal in (False, True):
            runs = {"headmods MHA (SDPA)": lambda: mha(x, is_causal=causal),
                    "MoH sparse (headmods)": lambda: sparse(x, is_causal=causal),
                    "MoH dense, official-style": lambda: dense(x, is_causal=causal)}
            with torch.no_grad():
                err = (sparse(x, is_causal=causal)[0] - dense(x, is_causal=causal)[0]).abs().max().item()
                res = compare(runs, rounds=a.rounds, threads=a.threads)
            print(f"### T={T}, {'causal' if causal else 'non-causal'} (max |sparse - dense| = {err:.1e}, "
                  f"active heads {float(sparse.last_usage.sum()) + 2:.0f}/12 per token)\n")
            print(res.to_markdown() + "\n")


if __name__ == "__main__":
    main()
