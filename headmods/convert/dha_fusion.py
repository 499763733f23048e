"""DHA's in-group head fusion: learnable linear combinations of the heads in each planned group.

Method page: ``docs/methods/dha.md``. Between planning and collapse, each DHA layer's
``k_proj`` / ``v_proj`` is wrapped in a :class:`HeadFusion`: head ``i`` of group ``G`` uses

    W~_i = sum_{j in G} w_ij W_j          (biases alike; w initialized to the identity)

so at the start every head is itself and the model is exactly the source. Training moves the
fusion weights (and, if wanted, the model) on ``L_LM + lambda * L_fuse + mu / 2 * L_fuse^2``
(:class:`FusionLagrangian`, our choice for the paper's augmented Lagrangian): ``L_fuse`` is the
mean over projections of ``sum_G 1/|G|^2 sum_{i,j in G} ||W~_i - W~_j||^2 / ||W||^2``, and
``lambda`` rises by dual ascent, ``lambda <- lambda + eta * L_fuse``, until the heads of every group
agree. Over the last part of the stage a consensus ramp (our addition: the multiplier alone
left relative disagreements of 1e-2 after 60 steps on a well-trained 4-layer LM, and the collapse
then cost 0.45 nats) blends each head toward its group mean, ``W^_i = (1 - a) W~_i + a mean_G W~``
with ``a`` rising to 1, so the heads agree exactly at the end while the LM loss still trains the
rest of the model around them. :func:`materialize_fusion` then writes ``W^`` into plain ``nn.Linear`` modules, and
:func:`headmods.convert.dha.collapse` averages each group into one head: lossless once the
members are equal, and RoPE commutes with it (``sum_j w_j RoPE(x W_j) = RoPE(x sum_j w_j W_j)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.dha import DHAAttention

__all__ = ["HeadFusion", "FusionLagrangian", "attach_fusion", "fusion_loss", "fusion_modules",
           "fusion_parameters", "materialize_fusion", "set_consensus"]


class HeadFusion(nn.Module):
    """A head-structured linear projection whose heads are mixed within groups (see module doc).

    Args:
        linear: the projection to wrap; its parameters are reused, not copied.
        groups: a partition of its heads (lists of head indices).
        head_dim: rows per head.
    """

    def __init__(self, linear: nn.Linear, groups: Sequence[Sequence[int]], head_dim: int) -> None:
        super().__init__()
        n = linear.out_features // head_dim
        members = sorted(int(i) for g in groups for i in g)
        if linear.out_features % head_dim or members != list(range(n)):
            raise ValueError(f"groups must partition the {n} heads of a {linear.out_features}-row projection, "
                             f"got {[list(g) for g in groups]}")
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features, self.head_dim = linear.in_features, linear.out_features, head_dim
        self.groups = [sorted(int(i) for i in g) for g in groups]
        multi = [g for g in self.groups if len(g) > 1]
        dd = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.omegas = nn.ParameterList([nn.Parameter(torch.eye(len(g), **dd)) for g in multi])
        rows = [i for g in multi for i in g for _ in g]
        cols = [j for g in multi for _ in g for j in g]
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long, device=dd["device"]), persistent=False)
        self.register_buffer("cols", torch.tensor(cols, dtype=torch.long, device=dd["device"]), persistent=False)
        with torch.no_grad():
            self.norm = float(self._flat(linear.weight, linear.bias).double().pow(2).sum().clamp_min(1e-30))
        self.consensus = 0.0  # blend toward the group means, 0 (off) .. 1 (heads equal)
        average = torch.eye(n, **dd)
        for g in multi:
            average[torch.tensor(g)[:, None], torch.tensor(g)[None, :]] = 1.0 / len(g)
        self.register_buffer("average", average, persistent=False)

    def mixing(self) -> Tensor:
        """The ``(n, n)`` head-mixing matrix: identity outside groups, ``w`` blocks inside, then the
        consensus blend ``((1 - a) I + a A)`` with ``A`` the in-group averaging matrix."""
        n = self.out_features // self.head_dim
        eye = torch.eye(n, device=self.weight.device, dtype=self.weight.dtype)
        if not len(self.omegas):
            return eye
        values = torch.cat([w.reshape(-1) for w in self.omegas])
        mix = eye.index_put((self.rows, self.cols), values)
        if self.consensus > 0.0:
            mix = ((1.0 - self.consensus) * eye + self.consensus * self.average) @ mix
        return mix

    def fused(self) -> tuple[Tensor, Tensor | None]:
        """The fused weight ``(n*d, D)`` and bias ``(n*d,)``."""
        n, d = self.out_features // self.head_dim, self.head_dim
        mix = self.mixing()
        weight = (mix @ self.weight.view(n, d * self.in_features)).view(n * d, self.in_features)
        bias = None if self.bias is None else (mix @ self.bias.view(n, d)).view(n * d)
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.fused()
        return F.linear(x, weight, bias)

    def _flat(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        n = self.out_features // self.head_dim
        flat = weight.reshape(n, -1)
        return flat if bias is None else torch.cat([flat, bias.reshape(n, -1)], dim=1)

    def fusion_loss(self) -> Tensor:
        """``sum_G 1/|G|^2 sum_{i,j in G} ||W~_i - W~_j||^2``, relative to the source's ``||W||^2``."""
        flat = self._flat(*self.fused())
        total = flat.new_zeros(())
        for g in self.groups:
            if len(g) > 1:
                rows = flat[g]
                total = total + 2.0 / len(g) * (rows - rows.mean(dim=0, keepdim=True)).pow(2).sum()
        return total / self.norm

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


def attach_fusion(layers: Mapping[str, DHAAttention], groups: Mapping[str, Mapping[str, list[list[int]]]]) -> list[HeadFusion]:
    """Wrap the planned layers' key and value projections in :class:`HeadFusion` (identity start)."""
    added = []
    for path, g in groups.items():
        if path not in layers:
            raise ValueError(f"the plan names layer {path!r}, which is not among the DHA layers")
        layer = layers[path]
        if isinstance(layer.k_proj, HeadFusion) or isinstance(layer.v_proj, HeadFusion):
            raise ValueError(f"layer {path!r} is already fusing; call materialize_fusion first")
        layer.k_proj = HeadFusion(layer.k_proj, g["k"], layer.head_dim)
        layer.v_proj = HeadFusion(layer.v_proj, g["v"], layer.head_dim)
        added += [layer.k_proj, layer.v_proj]
    return added


def fusion_modules(model: nn.Module) -> list[HeadFusion]:
    return [m for m in model.modules() if isinstance(m, HeadFusion)]


def set_consensus(model: nn.Module, alpha: float) -> None:
    """Set the blend toward group means (0 = off, 1 = the heads of every group are equal)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"consensus must lie in [0, 1], got {alpha!r}")
    for m in fusion_modules(model):
        m.consensus = float(alpha)


def fusion_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The fusion weights ``w`` (to give them their own learning rate)."""
    return [p for m in fusion_modules(model) for p in m.omegas]


def fusion_loss(model: nn.Module, reduction: str = "mean") -> Tensor:
    """The fusion loss of every :class:`HeadFusion` in ``model``: mean (training) or max (stopping)."""
    losses = [m.fusion_loss() for m in fusion_modules(model)]
    if not losses:
        raise ValueError("the model has no HeadFusion modules; call attach_fusion first")
    stacked = torch.stack(losses)
    return stacked.mean() if reduction == "mean" else stacked.max()


@torch.no_grad()
def materialize_fusion(model: nn.Module) -> int:
    """Replace each :class:`HeadFusion` by a plain ``nn.Linear`` holding its fused weights; returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, HeadFusion):
                weight, bias = child.fused()
                linear = nn.Linear(child.in_features, child.out_features, bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
                linear.requires_grad_(child.weight.requires_grad)
                setattr(parent, name, linear)
                count += 1
    return count


class FusionLagrangian:
    """``lambda * L + mu / 2 * L^2`` with dual ascent on ``lambda`` (state is two floats).

    Args:
        mu: fixed quadratic weight.
        dual_lr: ``eta`` of ``lambda <- lambda + eta * L``. Measured on a 4-layer LM (25 % budget,
            Adam on the fusion weights at 0.05): ``eta = 1`` left the largest relative fusion loss
            at 0.07 after 40 steps and the collapse cost 0.95 nats; ``eta = 50`` reached 1e-3
            after 40 steps and 7e-5 after 80, where the collapse changed the loss by 2e-4.
        lam: starting multiplier.
        tol: the fusion counts as done when the *largest* projection loss is below it.
    """

    def __init__(self, mu: float = 10.0, dual_lr: float = 50.0, lam: float = 0.0, tol: float = 1e-4) -> None:
        for name, value in (("mu", mu), ("dual_lr", dual_lr), ("tol", tol)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.mu, self.dual_lr, self.lam, self.tol = float(mu), float(dual_lr), float(lam), float(tol)

    def penalty(self, loss: Tensor) -> Tensor:
        return self.lam * loss + 0.5 * self.mu * loss * loss

    def ascend(self, loss: float) -> None:
        self.lam += self.dual_lr * float(loss)

    def state_dict(self) -> dict[str, float]:
        return {"mu": self.mu, "dual_lr": self.dual_lr, "lam": self.lam, "tol": self.tol}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.mu, self.dual_lr, self.lam, self.tol = (float(state[k]) for k in ("mu", "dual_lr", "lam", "tol"))
