"""headmods MHA against nn.MultiheadAttention and a plain SDPA MHA layer (forward, CPU, fp32).

    .venv/bin/python benchmarks/bench_mha.py [--batch 4 --seq-len 1024 --embed-dim 768 --heads 12]

The baseline is "sdpa_mha": four nn.Linear and F.scaled_dot_product_attention, nothing else.
nn.MultiheadAttention runs with its fast path off (torch.backends.mha.set_fastpath_enabled(False))
and on. All candidates run alternately in this process; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import headmods
from headmods.bench import compare


class SDPAMHA(nn.Module):
    """The baseline: the least an MHA layer can do on top of SDPA."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        D, self.h = mha.embed_dim, mha.num_heads
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))
        self.o = nn.Linear(D, D)
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.o.load_state_dict(mha.out_proj.state_dict())

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (lin(x).view(B, T, self.h, D // self.h).transpose(1, 2) for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, T, d)
        return self.o(out.transpose(1, 2).reshape(B, T, D))


def with_fastpath(flag: bool, fn):
    def run():
        torch.backends.mha.set_fastpath_enabled(flag)
        try:
            return fn()
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    B, T, D, h = a.batch, a.seq_len, a.embed_dim, a.heads
    mha = nn.MultiheadAttention(D, h, batch_first=True).eval()
    mha_sf = nn.MultiheadAttention(D, h).eval()
    mha_sf.load_state_dict(mha.state_dict())
    ours = headmods.MultiHeadAttention.from_mha(mha).eval()
    ours_sf = headmods.MultiHeadAttention.from_mha(mha_sf).eval()
    gqa = headmods.MultiHeadAttention(D, h, num_kv_heads=a.kv_heads, batch_first=True).eval()
    base = SDPAMHA(mha).eval()
    x = torch.randn(B, T, D)
    xs = x.transpose(0, 1).contiguous()  # (T, B, D)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(T)
    print(f"B={B} T={T} D={D} h={h} fp32 forward, torch {torch.__version__}, {a.threads} threads, "
          f"median of {a.rounds} rounds\n")
    for causal in (False, True):
        m = causal_mask if causal else None
        cands = {
            "sdpa_mha": lambda: base(x, causal),
            "nn.MHA fast path off": with_fastpath(False, lambda: mha(x, x, x, need_weights=False, attn_mask=m, is_causal=causal)),
            "nn.MHA fast path on": with_fastpath(True, lambda: mha(x, x, x, need_weights=False, attn_mask=m, is_causal=causal)),
            "headmods MHA": lambda: ours(x, is_causal=causal),
            f"headmods GQA kv={a.kv_heads}": lambda: gqa(x, is_causal=causal),
            "nn.MHA seq-first, fast path off": with_fastpath(False, lambda: mha_sf(xs, xs, xs, need_weights=False, attn_mask=m, is_causal=causal)),
            "headmods MHA seq-first": lambda: ours_sf(xs, is_causal=causal),
        }
        with torch.no_grad():
            ref = mha(x, x, x, need_weights=False, attn_mask=m, is_causal=causal)[0]
            err = (ours(x, is_causal=causal)[0] - ref).abs().max().item()
            res = compare(cands, baseline="sdpa_mha", rounds=a.rounds, threads=a.threads)
        print(f"### {'causal' if causal else 'non-causal'} (max |headmods - nn.MHA| = {err:.1e})\n")
        print(res.to_markdown())
        print(f"\nheadmods MHA / nn.MHA fast path off: {res.ratio('headmods MHA', 'nn.MHA fast path off'):.3f} "
              f"(batch-first), {res.ratio('headmods MHA seq-first', 'nn.MHA seq-first, fast path off'):.3f} (seq-first)\n")


if __name__ == "__main__":
    main()
