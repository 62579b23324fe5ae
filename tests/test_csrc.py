"""csrc/*.cu: ahead-of-time compiles (nvcc, NVRTC), CPU host harnesses, and the kernels on a GPU.

Without a GPU this still proves every kernel compiles for sm_80 and sm_90 (registers and spills are
printed: run with -s or -rP to see them), that NVRTC accepts it with the loader's options, and that
the __host__ __device__ pieces are right, via tests/csrc/*_host.cu run on the CPU.
"""
import ctypes
import ctypes.util
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mrl_kernels.cuda import loader

ROOT = Path(__file__).resolve().parent.parent
CSRC = sorted((ROOT / "csrc").glob("*.cu"))
HARNESSES = sorted((ROOT / "tests" / "csrc").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CSRC, ids=lambda p: p.name)
def test_nvcc_compiles(src, arch, tmp_path):
    # -std=c++17 matches loader.NVRTC_OPTIONS, so nvcc sees the language level NVRTC will.
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
           f"-I{src.parent}", "-o", str(tmp_path / "k.cubin"), str(src)]
    res = _run(cmd)
    print(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    assert res.returncode == 0, f"nvcc failed for {src.name} ({arch}):\n{res.stderr}"
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)]
    if any(spills):
        warnings.warn(f"{src.name} spills registers on {arch}: see ptxas output")


def _find_nvrtc():
    """libnvrtc from $MRL_KERNELS_NVRTC, an nvidia-* wheel on sys.path, or a CUDA toolkit."""
    env = os.environ.get("MRL_KERNELS_NVRTC")
    cands = [Path(env)] if env else []
    for base in sys.path:
        cands += sorted(Path(base, "nvidia").glob("**/libnvrtc.so*"), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands += sorted(Path(home, "lib64").glob("libnvrtc.so*"), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    cands += [Path(found)] if found else []
    for c in cands:
        if re.fullmatch(r"libnvrtc\.so(\.\d+)*", c.name):  # not -builtins or .alt
            try:
                return ctypes.CDLL(str(c))
            except OSError:
                continue
    return None


def _nvrtc_compile(lib, src: Path, options):
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.read_bytes(), src.name.encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CSRC, ids=lambda p: p.name)
def test_nvrtc_compiles(src, arch):
    # The loader's real compiler: no host headers, no implicit CUDA include path.
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (set MRL_KERNELS_NVRTC=/path/to/libnvrtc.so)")
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    options = loader.NVRTC_OPTIONS + (f"-I{src.parent}", f"-arch={arch}")
    rc, log = _nvrtc_compile(lib, src, options)
    print(f"NVRTC {major.value}.{minor.value} {src.name} {options}\n{log}")
    assert rc == 0, f"NVRTC failed for {src.name} ({arch}):\n{log}"


@needs_nvcc
@pytest.mark.parametrize("harness", HARNESSES, ids=lambda p: p.name)
def test_host_harness(harness, tmp_path):
    exe = tmp_path / harness.stem
    build = _run([NVCC, "-std=c++17", "-o", str(exe), str(harness)])
    assert build.returncode == 0, f"building {harness.name} failed:\n{build.stderr}"
    res = _run([str(exe)])
    print(res.stdout + res.stderr)
    assert res.returncode == 0, f"{harness.name} failed:\n{res.stdout}{res.stderr}"


# ---- loader, without a GPU ---------------------------------------------------------------------

def test_loader_finds_sources():
    assert (loader.csrc_dir() / "prefix_norms.cu").is_file()


def test_loader_reports_missing_cupy():
    assert isinstance(loader.cupy_available(), bool)  # never raises
    try:
        import cupy  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match=r"needs CuPy: pip install mrl-kernels\[cuda12\]"):
            loader.require_cupy()
    else:
        if not loader.cupy_available():
            with pytest.raises(RuntimeError, match="CUDA device"):
                loader.require_cupy()


# ---- on a GPU ----------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and loader.cupy_available()),
    reason="needs a CUDA GPU and CuPy",
)

CASES = [
    (37, 70, (17, 3, 70)),
    (301, 2048, (8, 16, 32, 64, 128, 256, 512, 1024, 2048)),
    (5, 2048, (2048, 8, 1000, 64, 33)),
]


def _reference(x, dims):
    return torch.stack([x.double()[:, :m].norm(dim=1) for m in dims], 1)


def _check(x, dims):
    from mrl_kernels.cuda import prefix_norms_cuda

    # Leave a NaN block of the output's size in torch's cache so torch.empty inside hands it back:
    # any element the kernel forgets to write stays NaN.
    torch.full((x.shape[0], len(dims)), math.nan, device=x.device)
    out = prefix_norms_cuda(x, dims)
    assert out.shape == (x.shape[0], len(dims)) and out.dtype == torch.float32
    assert torch.isfinite(out).all(), "output elements left unwritten"
    ref = _reference(x, dims)
    # The reference reads the same (already rounded) inputs, so every dtype only sees fp32
    # accumulation error: tighter than the usual 1e-2 for half precision on purpose.
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, f"relative error {err:.3g}"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d,dims", CASES)
def test_prefix_norms_cuda(n, d, dims, dtype):
    torch.manual_seed(0)
    _check(torch.randn(n, d, device="cuda", dtype=dtype), dims)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_prefix_norms_cuda_row_stride(dtype):
    torch.manual_seed(1)
    wide = torch.randn(37, 100, device="cuda", dtype=dtype)
    x = wide[:, 3:73]  # row stride 100 > D = 70, and not 16-byte aligned
    assert x.stride() == (100, 1)
    _check(x, (17, 3, 70))


@pytest.mark.cuda
@needs_gpu
def test_prefix_norms_cuda_64bit_row_offset():
    # Row 1 starts past element 2^31: a 32-bit row * stride would wrap and read row 0's memory.
    stride = 2**31 + 64
    try:
        base = torch.zeros(stride + 64, device="cuda", dtype=torch.float16)  # 4 GiB
    except torch.OutOfMemoryError:
        pytest.skip("needs 4 GiB of free GPU memory")
    x = base.as_strided((2, 64), (stride, 1))
    x[0] = 2.0
    x[1] = torch.arange(1, 65, device="cuda", dtype=torch.float16)
    _check(x, (64, 1, 7))
    del x, base
    torch.cuda.empty_cache()
