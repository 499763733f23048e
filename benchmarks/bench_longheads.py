"""LongHeads prefill against causal SDPA: one layer and the attention core, at growing lengths.

    .venv/bin/python benchmarks/bench_longheads.py [--seq-len 4096 8192 16384 --rounds 3]

h=12 heads of 64 (D=768), chunk_size 128, attend_length 2048 (16 chunks per query), block
selection, B=1, fp32. The layer rows include the q/k/v/o projections on both sides; the core rows
time only attention on the same un-roped q, k, v (LongHeads: chunk representations, selection,
gathers, re-RoPE and one SDPA call per block; reference: RoPE + causal SDPA). The third core row
times only the SDPA calls LongHeads makes (causal over the first attend_length tokens, then one masked
call of chunk_size queries x attend_length keys per block) on ready tensors: the floor of this design
with this kernel. Peak memory is the process's resident-set growth during one call. Ratios are medians of per-round ratios in one process.
"""

from __future__ import annotations

import argparse

import torch

import headmods
from headmods.bench import compare
from headmods.functional.longheads import chunk_representations, longheads_attention
from headmods.functional.rope import apply_rope, rope_cos_sin

W, ATTEND, THETA = 128, 2048, 10000.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    D, h, d = 768, 12, 64
    mha = headmods.MultiHeadAttention(D, h, batch_first=True, rope_theta=THETA).eval()
    lh = headmods.LongHeadsAttention(D, h, batch_first=True, rope_theta=THETA, chunk_size=W, attend_length=ATTEND).eval()
    lh.load_state_dict(mha.state_dict())
    print(f"D={D} h={h} d={d}, chunk {W}, attend_length {ATTEND}, block selection, B=1, fp32, torch "
          f"{torch.__version__}, {a.threads} threads, median of {a.rounds} rounds\n")
    for T in a.seq_len:
        x = torch.randn(1, T, D)
        q, k, v = torch.randn(1, h, T, d), torch.randn(1, h, T, d), torch.randn(1, h, T, d)
        cos, sin = rope_cos_sin(torch.arange(T), d, THETA)

        def causal_core():
            return torch.nn.functional.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin),
                                                                    v, is_causal=True)

        def longheads_core():
            G = T // W
            reps = chunk_representations(q[:, :, :G * W], k[:, :, :G * W], v[:, :, :G * W], W, THETA)
            return longheads_attention(q, k, v, reps, chunk_size=W, attend_length=ATTEND, begin=ATTEND, theta=THETA,
                                       q_start=0, block=W)

        blocks = T // W - ATTEND // W  # query blocks past the dense start
        qb, kb, vb = torch.randn(1, h, W, d), torch.randn(1, h, ATTEND, d), torch.randn(1, h, ATTEND, d)
        keep = torch.ones(W, ATTEND, dtype=torch.bool).tril(ATTEND - W)
        mask = torch.zeros(W, ATTEND).masked_fill(~keep, float("-inf"))
        qd, kd, vd = q[:, :, :ATTEND], k[:, :, :ATTEND], v[:, :, :ATTEND]

        def sdpa_calls_only():  # the floor of any one-call-per-block design: its SDPA calls on ready keys
            torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            for _ in range(blocks):
                torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)

        with torch.no_grad():
            layers = compare({"causal SDPA layer (RoPE MHA)": lambda: mha(x, is_causal=True),
                              "LongHeads layer": lambda: lh(x, is_causal=True)}, rounds=a.rounds, threads=a.threads)
            cores = compare({"causal SDPA core": causal_core, "LongHeads core": longheads_core,
                             "its SDPA calls alone (dense start + one call per block)": sdpa_calls_only},
                            rounds=a.rounds, threads=a.threads)
        print(f"### T={T}\n")
        print(layers.to_markdown() + "\n")
        print(cores.to_markdown() + "\n")


if __name__ == "__main__":
    main()
