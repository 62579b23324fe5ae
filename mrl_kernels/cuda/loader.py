"""Run-time loading of csrc/*.cu through CuPy (NVRTC) and launching on torch's current stream.

CuPy is optional and imported lazily: importing this module never needs it, and `cupy_available()`
answers without raising. Kernels are compiled once per (file, options, device) in this process; CuPy's
own disk cache (~/.cupy/kernel_cache) makes later processes skip NVRTC.

Tensors are handed over as raw device pointers (the kernel sees `T*`), which costs nothing per call;
the caller keeps them alive and launches on the stream they were allocated for, so torch's caching
allocator stays correct without record_stream.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path

import torch

# Options the loader passes to NVRTC; tests/test_csrc.py compiles with the same ones.
NVRTC_OPTIONS = ("--std=c++17",)

_CUPY_MISSING = "backend='cuda' needs CuPy: pip install mrl-kernels[cuda12] or [cuda13]"

_PKG_DIR = Path(__file__).resolve().parent.parent  # .../mrl_kernels
_modules: dict = {}
_lock = threading.Lock()


def csrc_dir() -> Path:
    """The directory holding the .cu sources.

    Order: $MRL_KERNELS_CSRC; a source checkout's csrc/ (the repo root has pyproject.toml or setup.py,
    so edits there win over a stale copy); the installed package data mrl_kernels/_csrc.
    """
    env = os.environ.get("MRL_KERNELS_CSRC")
    if env:
        return Path(env)
    root = _PKG_DIR.parent
    checkout = root / "csrc"
    if checkout.is_dir() and ((root / "pyproject.toml").exists() or (root / "setup.py").exists()):
        return checkout
    for cand in (_PKG_DIR / "_csrc", checkout):
        if cand.is_dir():
            return cand
    raise RuntimeError(f"CUDA sources not found: looked for {_PKG_DIR / '_csrc'} and {checkout}")


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device; never raises."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, missing driver or libraries: all mean "not usable"
        return False


def require_cupy():
    """Import CuPy or raise a RuntimeError that says what to install."""
    try:
        import cupy
    except Exception as e:
        raise RuntimeError(f"{_CUPY_MISSING} (import failed: {e})") from e
    if not cupy_available():
        raise RuntimeError("backend='cuda' needs a CUDA device, and CuPy sees none")
    return cupy


def _device_index(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def get_kernel(file: str, name: str, device, options: tuple = ()):
    """The extern "C" kernel `name` from csrc/`file`, compiled for `device` (cached)."""
    cupy = require_cupy()
    dev = _device_index(device)
    path = csrc_dir() / file
    opts = NVRTC_OPTIONS + (f"-I{path.parent}",) + tuple(options)
    key = (str(path), opts, dev)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = _modules[key] = cupy.RawModule(code=path.read_text(), options=opts)
    with cupy.cuda.Device(dev):
        try:
            return mod.get_function(name)  # NVRTC runs here, on first use per device
        except Exception as e:
            raise RuntimeError(f"loading {name} from {path} failed: {e}") from e


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, dev: int):
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # CuPy 14 prefers Stream.from_external
        return cupy.cuda.ExternalStream(ptr, dev)


def _kernel_arg(a):
    if isinstance(a, torch.Tensor):
        import numpy

        return numpy.uint64(a.data_ptr())
    return a


def launch(kernel, grid, block, args, device, shared_mem: int = 0) -> None:
    """Launch on torch's current stream of `device`.

    Tensors in `args` become device pointers. Python ints become 64-bit (long long) parameters:
    pass numpy.int32 for `int` ones, since the kernel reads its parameter buffer by the C types.
    """
    cupy = require_cupy()
    dev = _device_index(device)
    stream = torch.cuda.current_stream(dev)
    args = tuple(_kernel_arg(a) for a in args)
    with cupy.cuda.Device(dev), _external_stream(stream.cuda_stream, dev):
        # CuPy launches with cuLaunchKernel and raises on its error code (bad configuration, too
        # many resources), which is all the launch itself can report; faults inside the kernel show
        # up at the next synchronisation, which MRL_KERNELS_CUDA_SYNC=1 forces here for debugging.
        kernel(tuple(grid), tuple(block), args, shared_mem=shared_mem)
    if os.environ.get("MRL_KERNELS_CUDA_SYNC") == "1":
        stream.synchronize()
