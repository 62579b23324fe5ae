"""The eager nested linear cross-entropy: one linear map and one F.cross_entropy per dim, autograd through torch.

The loop users write by hand (the MRL paper's code), as a production path: in the inputs' dtype, following
autocast exactly as F.linear and F.cross_entropy do, except that 16-bit logits on the CPU go through the
cross-entropy in fp32 (see _widen_on_cpu). It keeps every dim's logits (and their log-softmax) for
backward, about 2 * len(dims) * N * C elements; in exchange it runs a few torch ops per dim and nothing else,
so it is the fastest path where the per-call cost dominates (small batches and heads) and wherever a fast
matmul makes the logits cheap to keep. ops/nested_ce.py says when "auto" picks it. Nothing here validates its
inputs.

A shared head with fp32/fp64 logits takes the prefixes as running sums, logits_j = logits_{j-1} +
x[:, seg_j] W[:, seg_j]^T with x and W split into the segments once: one full-D matmul for all dims (the loop
pays sum_j m_j, about 2D for doubling dims), and autograd forms the segment gradients sum_{j>=s} D_j itself,
with no per-dim slice of x or W whose gradient would be a zero-filled [N, D] or [C, D] copy. 16-bit logits
(and autocast) take F.linear per prefix instead, so that each dim's logits are rounded once, as F.linear's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._nesting import nesting


def nested_ce_eager(x: torch.Tensor, weight, target: torch.Tensor, dims, bias, dim_weights,
                    ignore_index: int, label_smoothing: float, reduction: str):
    """(total, per-dim losses): per_dim[..., j] = F.cross_entropy(x[:, :m_j] W_j^T + b_j, target) reduced as
    `reduction` says ([len(dims)], or [N, len(dims)] for "none"), total = per_dim @ dim_weights.
    weight: a [C, D] tensor (shared head) or one [C, m_j] tensor per dim; bias: None, a [C] tensor (shared)
    or one [C] tensor / None per dim."""
    losses = [None] * len(dims)
    for j, logits in _logits(x, weight, bias, dims):
        losses[j] = F.cross_entropy(_widen_on_cpu(logits), target, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction=reduction)
    per_dim = torch.stack(losses, dim=-1)
    if per_dim.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        per_dim = per_dim.to(x.dtype)  # the dtype F.cross_entropy of 16-bit logits returns
    if all(w == 1.0 for w in dim_weights):
        return per_dim.sum(-1), per_dim  # the usual unweighted sum: one op, no weight tensor
    weights = torch.tensor(dim_weights, dtype=per_dim.dtype, device=per_dim.device)
    return (per_dim * weights).sum(-1), per_dim


# Running sums cost two extra passes over each dim's [N, C] logits (reading logits_{j-1} forward, adding its
# gradient backward); they save sum_j m_j - D matmul columns (6 flops each per logit, forward and backward) and
# about four autograd ops per dim (the slices of x and W and their zero-filled gradients). So they are used
# when they save at least SEGMENT_COLUMNS_PER_DIM columns per dim, or when a dim's logits are at most
# SEGMENT_SMALL_LOGITS elements (the saved ops then cost more than the extra passes). On this library's 2-core
# CPU (fp32, fwd+bwd): faster than F.linear per prefix from D = 128 (dims 2..128, 18 columns saved per dim)
# at every N and C of the small-shape grid; at D = 16 (dims 2..16, 3.5 per dim) faster up to N * C = 25,600
# and slower from 102,400 (measurements: bench/NOTES.md).
SEGMENT_COLUMNS_PER_DIM = 8
SEGMENT_SMALL_LOGITS = 1 << 15


def _logits(x, weight, bias, dims):
    """Yields (j, logits of dims[j]) for every dim (see the module docstring for how)."""
    if not isinstance(weight, torch.Tensor):
        for j, (m, head) in enumerate(zip(dims, weight)):
            yield j, F.linear(_prefix(x, m), head, None if bias is None else bias[j])
        return
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    geo = nesting(dims)
    saved = sum(dims) - geo.ascending[-1]  # matmul columns the running sums save over F.linear per prefix
    worth_it = saved >= SEGMENT_COLUMNS_PER_DIM * len(dims) or x.shape[0] * weight.shape[0] <= SEGMENT_SMALL_LOGITS
    if autocast or x.dtype not in (torch.float32, torch.float64) or not worth_it:
        for j, m in enumerate(dims):
            yield j, F.linear(_prefix(x, m), _prefix(weight, m), bias)
        return
    sizes = [b - a for a, b in geo.segments]
    x_segs = _prefix(x, geo.ascending[-1]).split(sizes, dim=1)
    w_segs = _prefix(weight, geo.ascending[-1]).split(sizes, dim=1)
    z = None
    for j, x_s, w_s in zip(geo.order, x_segs, w_segs):
        z = F.linear(x_s, w_s, bias) if z is None else torch.addmm(z, x_s, w_s.T)
        yield j, z


def _widen_on_cpu(logits: torch.Tensor) -> torch.Tensor:
    """16-bit CPU logits as fp32: torch's CPU nll_loss sums a 16-bit batch in 16 bits (bf16, 37 rows, 101
    classes: up to 1.1% off the float64 loss, against 0.02% from fp32 logits; CUDA sums in fp32). Autocast
    runs F.cross_entropy in fp32 anyway, so this only changes calls outside it."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def _prefix(t: torch.Tensor, m: int) -> torch.Tensor:
    return t if m == t.shape[1] else t[:, :m]  # a slice costs an autograd node: none for the whole tensor
