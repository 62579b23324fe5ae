"""prefix_norms(x, dims) -> [N, len(dims)]: one pass over x; memory-bound, so GB/s is the metric."""
from __future__ import annotations

import functools
import importlib.util

import torch

from bench.harness import Case, Suite, Unavailable, register, require

DIMS = tuple(8 << i for i in range(9))  # 8, 16, ..., 2048


def _case(n: int, d: int, dtype: torch.dtype) -> Case:
    dims = tuple(m for m in DIMS if m <= d)
    itemsize = torch.empty((), dtype=dtype).element_size()
    name = str(dtype).removeprefix("torch.")
    return Case(f"N{n}-D{d}-{name}", {"N": n, "D": d, "dtype": name, "dims": list(dims)},
                flops=2 * n * d, bytes=n * d * itemsize + n * len(dims) * 4)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        shapes = [(1_000_000, torch.float16), (1_000_000, torch.bfloat16), (262_144, torch.float32)]
    else:
        shapes = [(8192, torch.float32)]
    # Quick: the same dtypes at smoke-test size; an odd N catches tail handling.
    return [_case(1001, 256, dtype) if quick else _case(n, 2048, dtype) for n, dtype in shapes]


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


SUITE = register(Suite(
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
))
