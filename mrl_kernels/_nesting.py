"""Nesting geometry in one place: the dims in ascending order, the column segments between consecutive
nesting boundaries, and where each dim's head starts when per-dim heads are concatenated along columns;
plus the one rule for the dtype that sums and products accumulate in.

Every layer (ops, the torch fallbacks, the Triton launchers, the CUDA loader) takes `dims` in the caller's
order and returns per-dim results in that order; they walk the prefixes in ascending order. This module is
a leaf: it imports only torch and the standard library.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and result) dtype of sums, norms, logits and gradients: fp64 for fp64 inputs, fp32
    for everything else (16-bit inputs accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Nesting(NamedTuple):
    """The geometry of one dims list (caller's order)."""
    dims: tuple[int, ...]
    order: tuple[int, ...]                  # caller's indices of the dims, ascending by dim
    ascending: tuple[int, ...]              # the dims ascending: dims[order[s]]
    segments: tuple[tuple[int, int], ...]   # [start, end) columns that prefix ascending[s] adds to the one before
    offsets: tuple[int, ...]                # first column of each dim's head in the concatenated per-dim weight

    @property
    def in_order(self) -> bool:
        """Whether the caller's dims are already ascending (per-dim results need no reordering)."""
        return self.order == tuple(range(len(self.order)))


@functools.lru_cache(maxsize=256)
def _nesting(dims: tuple[int, ...]) -> Nesting:
    order = tuple(sorted(range(len(dims)), key=dims.__getitem__))
    ascending = tuple(dims[j] for j in order)
    bounds = (0, *ascending)
    offsets = tuple(sum(dims[:j]) for j in range(len(dims)))
    return Nesting(dims, order, ascending, tuple(zip(bounds[:-1], bounds[1:])), offsets)


def nesting(dims) -> Nesting:
    """The geometry of `dims` (a sequence of unique positive ints, any order); cached per dims tuple, since
    training calls with the same dims every step (torch.compile traces the computation instead: it warns
    about a cache it cannot keep)."""
    if torch.compiler.is_compiling():
        return _nesting.__wrapped__(tuple(dims))
    return _nesting(tuple(dims))
