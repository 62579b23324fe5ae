"""Backend choice. Every op names the backends it implements; "auto" picks the fastest of those
that can run on the input's device (an op may refine that by shape first); an explicit choice that cannot run
says why. "torch" is an op's chunked fallback (ops/<op>_torch.py), "eager" the plain per-dim loop of torch
ops with autograd through torch (fastest for small inputs), "reference" the test oracle
(mrl_kernels.reference)."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch", "eager", "reference")


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cupy_available() -> bool:
    from ..cuda.loader import cupy_available as available

    return available()


def resolve_backend(op: str, backend, device: torch.device, implemented: tuple[str, ...]) -> str:
    """`implemented` lists the op's backends in the order "auto" tries them ("reference" always last)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        for name in implemented:
            if name in ("triton", "cuda") and device.type != "cuda":
                continue
            if name == "cuda" and not cupy_available():
                continue
            return name
    if backend not in implemented:
        raise NotImplementedError(f"{op}: backend={backend!r} is not implemented yet; "
                                  f"available: {', '.join(implemented)}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreter_on():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors (got {device}); on the CPU it runs only "
                         "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    if backend == "cuda" and (device.type != "cuda" or not cupy_available()):
        raise ValueError(f"{op}: backend='cuda' needs CUDA tensors and CuPy (pip install mrl-kernels[cuda12] "
                         f"or [cuda13]); got tensors on {device}")
    return backend
