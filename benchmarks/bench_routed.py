"""Sparse Mixture-of-Head attention (routed heads via ``routed_attention``) against dense MHA.

    .venv/bin/python benchmarks/bench_routed.py [--seq-len 2048 4096 --rounds 9 --threads 2 --skew 0]

Forward only, CPU, fp32, no_grad. Candidates, all bias-free and batch-first ``(B, T, D)``:

1. ``mha``: four D x D linear maps and one F.scaled_dot_product_attention; the baseline.
2. ``moh official-style``: every one of the 12 heads computed densely, the (B, T, 12) gate multiplied
   into the head outputs after SDPA, then the full W_O. What the released MoH code does.
3. ``moh sparse``: the 2 shared heads densely (linear D->2d for Q, SDPA, gate, linear 2d->D), dense K
   and V for all 12 heads, and ``routed_attention`` for the 10 routed heads, which adds its rows
   straight into the shared heads' output (``add_to``): only the selected (token, head) pairs get a
   query, attention and an output projection. Also timed without ``add_to`` (``y + routed``).

The selection is a balanced random top-4 of 10 routed heads per token (``--skew`` biases it towards
the last heads), with softmax-renormalised gates (scaled to sum to 4) and random shared gates. Both
MoH candidates use the same gates, made before timing (the router itself, a Linear(D, 10) and a
top-k, would be the same for both). Ratios are medians of per-round ratios against ``mha``
(headmods.bench.compare), all candidates alternating in one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from headmods.bench import compare
from headmods.functional.routed import lse_attention_available, routed_attention

RESULTS = Path(__file__).parent / "results" / "routed_cpu.md"


def make_case(B: int, T: int, D: int, h: int, h_s: int, top_k: int, seed: int = 0, skew: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    d, h_r = D // h, h - h_s
    w = {name: torch.randn(D, D, generator=g) / D ** 0.5 for name in ("q", "k", "v", "o")}
    x = torch.randn(B, T, D, generator=g)
    logits = torch.randn(B, T, h_r, generator=g)
    scores = torch.rand(B, T, h_r, generator=g) + torch.linspace(0, skew, h_r)  # skew 0: balanced
    choice = scores.topk(top_k, dim=-1).indices
    keep = torch.zeros(B, T, h_r).scatter_(-1, choice, 1.0)
    p = logits.softmax(-1) * keep
    routed_gate = p / p.sum(-1, keepdim=True) * top_k  # (B, T, h_r), zero where not selected
    shared_gate = torch.rand(B, T, h_s, generator=g) + 0.5
    return x, w, shared_gate, routed_gate, d


def mha(x, w, h, causal):
    B, T, D = x.shape
    q, k, v = (F.linear(x, w[n]).view(B, T, h, D // h).transpose(1, 2) for n in "qkv")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, T, d)
    return F.linear(out.transpose(1, 2).reshape(B, T, D), w["o"])


def moh_official(x, w, h, gate, causal):
    """All heads dense; gate (B, T, h) multiplied after SDPA."""
    B, T, D = x.shape
    q, k, v = (F.linear(x, w[n]).view(B, T, h, D // h).transpose(1, 2) for n in "qkv")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)  # (B, T, h, d)
    out = out * gate[..., None]
    return F.linear(out.reshape(B, T, D), w["o"])


def moh_sparse(x, w, h, h_s, shared_gate, routed_gate, causal, fused_add=True):
    B, T, D = x.shape
    d = D // h
    k, v = (F.linear(x, w[n]).view(B, T, h, d).transpose(1, 2) for n in "kv")  # (B, h, T, d) views
    qs = F.linear(x, w["q"][: h_s * d]).view(B, T, h_s, d).transpose(1, 2)  # (B, h_s, T, d)
    os_ = F.scaled_dot_product_attention(qs, k[:, :h_s], v[:, :h_s], is_causal=causal).transpose(1, 2)
    os_ = (os_ * shared_gate[..., None]).reshape(B, T, h_s * d)
    y = F.linear(os_, w["o"][:, : h_s * d])
    args = (x, w["q"][h_s * d:], None, w["o"][:, h_s * d:], k, v, range(h_s, h), routed_gate)
    if fused_add:  # routed rows added straight into the shared heads' output
        return routed_attention(*args, causal=causal, add_to=y)
    return y + routed_attention(*args, causal=causal)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--shared", type=int, default=2)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--skew", type=float, default=0.0,
                   help="selection-score bias rising linearly to this over the routed heads (0.35: loads ~0.21-0.6)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/routed_cpu.md")
    p.add_argument("--append", action="store_true", help="append to benchmarks/results/routed_cpu.md, not replace it")
    a = p.parse_args()
    h, h_s = a.heads, a.shared
    router = "balanced" if a.skew == 0 else f"skewed selection (--skew {a.skew})"
    head = (f"## B={a.batch} D={a.embed_dim} h={h} (shared {h_s}, routed top-{a.top_k} of {h - h_s}, {router}) "
            f"fp32 forward, torch {torch.__version__}, {a.threads} threads, median of {a.rounds} rounds; "
            f"log-sum-exp op available: {lse_attention_available()}\n")
    print(head)
    sections = [head]
    for T in a.seq_len:
        x, w, sg, rg, d = make_case(a.batch, T, a.embed_dim, h, h_s, a.top_k, skew=a.skew)
        gate = torch.cat([sg, rg], dim=-1)
        for causal in (False, True):
            with torch.no_grad():
                err = (moh_sparse(x, w, h, h_s, sg, rg, causal) - moh_official(x, w, h, gate, causal)).abs().max()
                res = compare({
                    "mha": lambda: mha(x, w, h, causal),
                    "moh official-style (dense + gate)": lambda: moh_official(x, w, h, gate, causal),
                    "moh sparse (routed_attention)": lambda: moh_sparse(x, w, h, h_s, sg, rg, causal),
                    "moh sparse, routed output added afterwards": lambda: moh_sparse(x, w, h, h_s, sg, rg, causal,
                                                                                     fused_add=False),
                }, baseline="mha", rounds=a.rounds, threads=a.threads)
            loads = (rg != 0).float().mean(dim=(0, 1))
            text = (f"### T={T}, {'causal' if causal else 'non-causal'} "
                    f"(max |sparse - official| = {err:.1e}; largest routed-head load {loads.max():.3f} "
                    f"= {loads.max() / loads.mean():.2f}x the mean)\n\n{res.to_markdown()}\n")
            print(text, flush=True)
            sections.append(text)
    if not a.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(sections)
        if a.append and RESULTS.exists():
            text = RESULTS.read_text() + "\n" + text
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
