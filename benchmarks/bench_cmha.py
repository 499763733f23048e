"""CMHA (ComplexFormer) layer against a RoPE MHA layer, and the official-style per-pair form as an anchor.

    .venv/bin/python benchmarks/bench_cmha.py [--seq-len 1024 --rounds 9]

fp32 CPU forward, B=1, D=768, h=12 (d=64), causal. Candidates:

- "RoPE MHA layer (SDPA)": headmods ``MultiHeadAttention`` with ``rope_theta``, the baseline;
- "CMHA layer (separable + SDPA)": headmods ``CMHAttention`` with the same projections and random
  ``delta``/``beta``: re-phase q and k (O(T d)), RoPE, causal SDPA;
- "CMHA per-pair, official style": the paper's logit computed per (query, key) pair as the official
  code does, materialising ``cos(delta (theta_q - theta_k) + beta + (m - n) omega) rho_q rho_k`` for
  chunks of 8 queries against all keys, ``(B, h, 8, T, d/2)`` per chunk (O(T^2 d)). It is far
  slower (its ratio is in ``benchmarks/results/cmha_cpu.md``), so it runs fewer rounds, against the
  baseline in a comparison of its own.

Both CMHA forms use the layer's 1/sqrt(d) scale here, so their outputs can be compared. The attention
core alone (polar transform + RoPE + SDPA against RoPE + SDPA on the same projected heads) is timed
too. Candidates run alternately in one process; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

import headmods
from headmods.bench import compare
from headmods.functional import AttentionMask, apply_rope, attend, rope_cos_sin, rope_inv_freq
from headmods.functional.complex_phase import complex_phase

D, H, THETA, CHUNK = 768, 12, 10000.0, 8


def per_pair_layer(layer: headmods.CMHAttention, x: Tensor) -> Tensor:
    """The official-style forward: per-pair cosine tensors, 8 queries at a time, causal mask, softmax, V, W_O."""
    c = layer.config
    B, T, _ = x.shape
    h, d = c.num_heads, c.head_dim
    half = d // 2
    q = layer.q_proj(x).view(B, T, h, d).transpose(1, 2)  # (B, h, T, d)
    k = layer.k_proj(x).view(B, T, h, d).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, h, d).transpose(1, 2)

    def polar(t: Tensor) -> tuple[Tensor, Tensor]:
        a, b = t[..., :half], t[..., half:]
        return (a * a + b * b + 1e-9).sqrt(), torch.atan2(b, a)  # (B, h, T, d/2) each

    rho_q, theta_q = polar(q)
    rho_k, theta_k = polar(k)
    delta, beta = layer.delta[:, None, None, :], layer.beta[:, None, None, :]  # (h, 1, 1, d/2)
    omega = rope_inv_freq(d, c.rope_theta)  # (d/2,)
    pos = torch.arange(T)
    scale = c.scale or d ** -0.5
    out = torch.empty(B, h, T, d)
    for s in range(0, T, CHUNK):
        e = min(s + CHUNK, T)
        rel = (pos[s:e, None] - pos[None, :]).float()[..., None] * omega  # (8, T, d/2)
        phase = delta * (theta_q[:, :, s:e, None, :] - theta_k[:, :, None, :, :]) + beta + rel  # (B, h, 8, T, d/2)
        scores = (rho_q[:, :, s:e, None, :] * rho_k[:, :, None, :, :] * phase.cos()).sum(-1) * scale  # (B, h, 8, T)
        scores.masked_fill_(pos[None, :] > pos[s:e, None], -math.inf)
        out[:, :, s:e] = scores.softmax(-1) @ v
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, h * d))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    T = a.seq_len
    mha = headmods.MultiHeadAttention(D, H, batch_first=True, rope_theta=THETA).eval()
    cmha = headmods.CMHAttention(D, H, batch_first=True, rope_theta=THETA, phase_init="paper").eval()
    with torch.no_grad():
        cmha.load_state_dict(mha.state_dict(), strict=False)  # same projections; delta, beta stay random
        cmha.beta.uniform_(-math.pi, math.pi)
    x = torch.randn(1, T, D)
    pair_rounds = max(2, a.rounds // 3)
    print(f"B=1 T={T} D={D} h={H} d={D // H}, causal, fp32 forward, torch {torch.__version__}, {a.threads} threads; "
          f"median of {a.rounds} rounds ({pair_rounds} for the per-pair form)\n")

    with torch.no_grad():
        separable, official = cmha(x, is_causal=True)[0], per_pair_layer(cmha, x)
        err = (separable - official).abs().max().item()
        layers = compare({"RoPE MHA layer (SDPA)": lambda: mha(x, is_causal=True),
                          "CMHA layer (separable + SDPA)": lambda: cmha(x, is_causal=True)},
                         rounds=a.rounds, threads=a.threads)
        pairs = compare({"RoPE MHA layer (SDPA)": lambda: mha(x, is_causal=True),
                         "CMHA per-pair, official style": lambda: per_pair_layer(cmha, x)},
                        warmup=1, rounds=pair_rounds, threads=a.threads)
    print("### Full layer (q, k, v, o projections and attention)\n")
    print(layers.to_markdown() + "\n")
    print(f"### Official-style per-pair form (max |separable - per-pair| = {err:.1e}, fp32)\n")
    print(pairs.to_markdown() + "\n")

    d = D // H
    q, k, v = (torch.randn(1, H, T, d) for _ in range(3))
    cos, sin = rope_cos_sin(torch.arange(T), d, THETA)
    causal = AttentionMask(causal=True)
    delta_q, delta_k, beta = cmha.query_delta().detach(), cmha.delta.detach(), cmha.beta.detach()
    with torch.no_grad():
        core = compare({
            "RoPE + causal SDPA": lambda: attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, causal),
            "re-phase + RoPE + causal SDPA": lambda: attend(apply_rope(complex_phase(q, delta_q, beta), cos, sin),
                                                            apply_rope(complex_phase(k, delta_k), cos, sin), v, causal),
            "re-phase of q and k alone": lambda: (complex_phase(q, delta_q, beta), complex_phase(k, delta_k)),
        }, rounds=a.rounds, threads=a.threads, memory=False)
    print("### Attention core on projected heads (1, 12, T, 64)\n")
    print(core.to_markdown() + "\n")

    print("### Summary: ratio against the RoPE MHA layer\n")
    print("| candidate | ratio vs RoPE MHA layer | rounds |\n|---|---:|---:|")
    print(f"| CMHA layer (separable + SDPA) | {layers.ratio('CMHA layer (separable + SDPA)'):.3f} | {a.rounds} |")
    print(f"| CMHA per-pair, official style | {pairs.ratio('CMHA per-pair, official style'):.1f} | {pair_rounds} |")


if __name__ == "__main__":
    main()
