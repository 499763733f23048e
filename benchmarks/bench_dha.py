"""DHA layer against headmods MHA: KV cache bytes, one decode step at a long cache, and prefill.

    .venv/bin/python benchmarks/bench_dha.py [--cache-len 8192 --batch 8 --rounds 9]

h=12 query heads of 64 (D=768), fp32, 25 % K/V budget: 3 key heads with contiguous groups and 3
value heads grouped across them (k_map 0 0 0 0 1 1 1 1 2 2 2 2, v_map 0 1 2 0 1 2 ...), the
decoupled case no GQA kernel runs. Decode: one new token per sequence against ``--cache-len``
cached tokens (the cache is rewound after every step, so each step sees the same length).
Candidates run alternately in one process; ratios are medians of per-round ratios against MHA.
"""

from __future__ import annotations

import argparse
import math

import torch

import headmods
from headmods.bench import compare
from headmods.functional import attend, decoupled_attend
from headmods.functional.decoupled import _grouped

K_MAP = (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2)
V_MAP = (0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2)


def _filled_cache(layer: headmods.MultiHeadAttention, batch: int, length: int) -> headmods.KVCache:
    c = layer.config
    cache = headmods.KVCache(max_len=length + 1)
    cache.update(torch.randn(batch, c.num_kv_heads, length, c.head_dim),
                 torch.randn(batch, c.value_heads(), length, c.head_dim))
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    D, h, d, N, B = 768, 12, 64, a.cache_len, a.batch
    mha = headmods.MultiHeadAttention(D, h, batch_first=True).eval()
    dha = headmods.DHAAttention(D, h, num_kv_heads=3, kv_map=K_MAP, num_v_heads=3, v_map=V_MAP, batch_first=True).eval()
    caches = {"mha": _filled_cache(mha, B, N), "dha": _filled_cache(dha, B, N)}
    nbytes = {k: (c.k[:, :, :N].numel() + c.v[:, :, :N].numel()) * 4 for k, c in caches.items()}
    print(f"D={D} h={h} d={d}, DHA 3 key + 3 value heads (25 % budget), fp32, torch {torch.__version__}, "
          f"{a.threads} threads, median of {a.rounds} rounds\n")
    print(f"KV cache at {N} tokens, batch {B}: MHA {nbytes['mha'] / 2**20:.1f} MiB, DHA {nbytes['dha'] / 2**20:.1f} "
          f"MiB, ratio {nbytes['dha'] / nbytes['mha']:.3f}\n")

    x = torch.randn(B, 1, D)

    def step(layer, cache):
        def run():
            layer(x, is_causal=True, cache=cache)
            cache.seq_len = N  # rewind: every step sees N cached tokens
        return run

    with torch.no_grad():
        res = compare({"MHA decode step (SDPA)": step(mha, caches["mha"]),
                       "DHA decode step (grouped, chunked)": step(dha, caches["dha"])},
                      rounds=a.rounds, threads=a.threads)
    print(f"### Full layer decode step (projections, cache append, attention, W_O), cache {N}, batch {B}\n")
    print(res.to_markdown() + "\n")

    q = torch.randn(B, h, 1, d)
    km, vm = caches["mha"].k[:, :, :N], caches["mha"].v[:, :, :N]
    kd, vd = caches["dha"].k[:, :, :N], caches["dha"].v[:, :, :N]
    idx_k, idx_v = torch.tensor(K_MAP), torch.tensor(V_MAP)
    with torch.no_grad():
        err = (decoupled_attend(q, kd, vd, k_map=K_MAP, v_map=V_MAP)[0]
               - attend(q, kd.index_select(1, idx_k), vd.index_select(1, idx_v))[0]).abs().max().item()
        res = compare({"MHA attention (SDPA, 12 kv heads)": lambda: attend(q, km, vm),
                       "DHA grouped, chunked online softmax": lambda: decoupled_attend(q, kd, vd, k_map=K_MAP, v_map=V_MAP),
                       "DHA expand K/V with index_select + SDPA": lambda: attend(q, kd.index_select(1, idx_k),
                                                                                 vd.index_select(1, idx_v))},
                      rounds=a.rounds, threads=a.threads)
    print(f"### Attention kernel only, one query per sequence (max |grouped - expanded| = {err:.1e})\n")
    print(res.to_markdown() + "\n")

    T = a.prefill_len
    xp = torch.randn(1, T, D)
    qp, kp, vp = torch.randn(1, h, T, d), torch.randn(1, 3, T, d), torch.randn(1, 3, T, d)
    causal = torch.full((T, T), -math.inf).triu(1)[None, None]  # (1, 1, T, T) additive bias
    with torch.no_grad():
        res = compare({"MHA prefill layer (SDPA)": lambda: mha(xp, is_causal=True),
                       "DHA prefill layer (paired + SDPA)": lambda: dha(xp, is_causal=True)},
                      rounds=a.rounds, threads=a.threads)
        kernels = compare({"DHA prefill kernel: paired + SDPA": lambda: decoupled_attend(
                               qp, kp, vp, headmods.functional.AttentionMask(causal=True), k_map=K_MAP, v_map=V_MAP),
                           "DHA prefill kernel: grouped online softmax": lambda: _grouped(
                               qp, kp, vp, causal, K_MAP, V_MAP, None, 1024)},
                          rounds=max(3, a.rounds // 3), threads=a.threads)
    print(f"### Prefill, batch 1, {T} tokens, causal\n")
    print(res.to_markdown() + "\n")
    print("Prefill kernel choice (why prefill pairs heads instead of grouping them):\n")
    print(kernels.to_markdown() + "\n")


if __name__ == "__main__":
    main()
