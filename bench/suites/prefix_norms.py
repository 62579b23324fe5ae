"""prefix_norms(x, dims) -> [N, len(dims)]: one pass over x; memory-bound, so GB/s is the metric.

prefix_norms: dims 8, 16, ..., D. Providers: reference (the eager loop, baseline) and the op's backends.
prefix_norms_small (CPU only, fp32; bench/suites/_small.py): N in SMALL_N x D in SMALL_D, dims 8, 16, ..., D,
plus the per-call overhead case (N=1, D=16, dims (8, 16)); providers reference, auto and torch.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from bench.harness import Case, Suite, Unavailable, require
from bench.suites import _small

SMALL_N, SMALL_D = (64, 256, 1001, 4096, 65536), (16, 64, 256, 2048)


def _case(n: int, d: int, dtype: torch.dtype, label: str = "") -> Case:
    dims = _small.doubling(8, d)
    itemsize = torch.empty((), dtype=dtype).element_size()
    name = str(dtype).removeprefix("torch.")
    return Case(f"{label}N{n}-D{d}-{name}", {"N": n, "D": d, "dtype": name, "dims": list(dims)},
                flops=2 * n * d, bytes=n * d * itemsize + n * len(dims) * 4)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        shapes = [(1_000_000, torch.float16), (1_000_000, torch.bfloat16), (262_144, torch.float32)]
    else:
        shapes = [(8192, torch.float32)]
    # Quick: the same dtypes at smoke-test size; an odd N catches tail handling.
    return [_case(1001, 256, dtype) if quick else _case(n, 2048, dtype) for n, dtype in shapes]


def small_cases(device: str, quick: bool) -> list[Case]:
    points = [_case(n, d, torch.float32) for n in SMALL_N for d in SMALL_D]
    return _small.grid(device, quick, _case(1, 16, torch.float32, "overhead-"), points)


def make_inputs(case: Case, device: str, seed: int) -> tuple:
    p = case.params
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p["N"], p["D"], generator=gen, device=device, dtype=getattr(torch, p["dtype"]))
    return x, tuple(p["dims"])


def _reference(case: Case, device: str):
    return require("mrl_kernels.reference", "prefix_norms")


def _backend(backend: str, needs_cuda: bool = False, needs: str | None = None):
    def factory(case: Case, device: str):
        if needs_cuda and device != "cuda":
            raise Unavailable(f"backend={backend!r} needs a CUDA device")
        if needs and importlib.util.find_spec(needs) is None:
            raise Unavailable(f"backend={backend!r} needs {needs}, which is not installed")
        return functools.partial(require("mrl_kernels", "prefix_norms"), backend=backend)

    return factory


SUITE = Suite(
    name="prefix_norms",
    baseline="reference",
    cases=cases,
    make_inputs=make_inputs,
    providers={
        "reference": _reference,
        "torch": _backend("torch"),
        "triton": _backend("triton", needs_cuda=True),
        "cuda": _backend("cuda", needs_cuda=True, needs="cupy"),
    },
    metric="GB/s",
)

SMALL = _small.suite("prefix_norms_small", small_cases, make_inputs, _reference, _backend, "GB/s")
