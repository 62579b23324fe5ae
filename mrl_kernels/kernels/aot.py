"""Ahead-of-time compilation of the Triton kernels for real GPUs, without a GPU.

The interpreter runs kernels on the CPU but accepts code the compiler rejects, so every kernel is
also compiled for the architectures the library supports, at the exact configs it launches, and
checked for shared memory over the chip's limit. The log of the ptxas run inside triton.compile reports
registers and spills.

Compiling needs real (not interpreted) kernels, so under TRITON_INTERPRET=1 the tests run
`python -m mrl_kernels.kernels.aot [--arch 90]` in a subprocess with the interpreter off; it compiles every
kernel module's `aot_specs()` and prints one JSON line per (spec, arch).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .launch import split_launch_options  # noqa: F401  (kernel modules' aot_specs use it from here)

# Opt-in shared memory per block: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}
ARCHS = tuple(SHARED_LIMIT)

TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32"}


@dataclass
class CompileReport:
    kernel: str
    arch: int
    shared: int
    registers: int | None
    spill_bytes: int | None
    ordered_atomics: int  # see ordered_atomics()
    tma_loads: int  # tiles loaded from global memory by one bulk tensor copy (TMA, sm_90)
    bulk_reductions: int  # tiles reduced into global memory by one bulk tensor operation (TMA, sm_90)
    scalar_atomics: int  # per-element atomic instructions (red / atom on global memory)
    wgmma_shapes: list  # the warpgroup MMA shapes in the PTX (sm_90), e.g. ["m64n128k16"]
    wgmma_serialized: bool  # ptxas C7515: every wgmma waited on (no overlap of tensor-core work)
    async_waits: list  # distinct n of `cp.async.wait_group n`: n >= 1 means loads stay in flight across a wait
    ptx: str

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_LIMIT[self.arch]


def pointer(dtype: torch.dtype) -> str:
    return "*" + TRITON_TYPE[dtype]


# Integer arguments that a launch passes as multiples of 16 in the usual shapes (row strides of 2048-wide
# features, tile-aligned column ranges): the JIT specializes such values, and so does the AOT check.
DIVISIBLE_INTS = ("stride_x", "stride_w", "stride_out", "k_start", "k_end")


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 3,
                   maxnreg: int | None = None, divisible: tuple = ()) -> CompileReport:
    """Compile `fn` for sm_<arch>. `signature` maps every argument to a Triton type ('*fp16', 'i32',
    'constexpr'); `constexprs` gives the constexpr values. Raises on any compile error. Like a JIT
    launch, pointers (torch allocations are 256-byte aligned) and the DIVISIBLE_INTS are marked as
    multiples of 16: without that hint loads are not vectorized and loops are not software-pipelined,
    so the report would describe a different kernel. Triton's default num_stages is 3; maxnreg caps the
    registers per thread (ptxas's .maxnreg), as the launch does. `divisible` names more integer arguments
    that the launches being described pass as multiples of 16 (a spec's "divisible" option)."""
    aligned = [i for i, (name, ty) in enumerate(signature.items())
               if ty.startswith("*") or ((name in DIVISIBLE_INTS or name in divisible) and ty in ("i32", "i64"))]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    compiled, log = compile_with_ptxas_log(src, target, options)
    ptx = compiled.asm["ptx"]
    registers, spills = ptxas_usage(log)
    return CompileReport(fn.__name__, arch, compiled.metadata.shared, registers, spills, ordered_atomics(ptx),
                         ptx.count("cp.async.bulk.tensor"), ptx.count("cp.reduce.async.bulk.tensor"),
                         scalar_atomics(ptx), wgmma_shapes(ptx), "(C7515)" in log, async_waits(ptx), ptx)


def wgmma_shapes(ptx: str) -> list:
    """Sorted distinct m/n/k shapes of the wgmma instructions in `ptx`: 64 x 64 tiles use a quarter of what a
    64 x 256 wgmma could issue at once, so the shape says how well a config feeds Hopper's tensor cores."""
    return sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))


def async_waits(ptx: str) -> list:
    """Sorted distinct n of the `cp.async.wait_group n` in `ptx`. A software-pipelined loop waits for all but
    its newest n groups of asynchronous copies (n = stages - 2 or so), so n >= 1 says the next tiles' loads
    are in flight while this one is computed; n = 0 only, or none, says every tile waits for its own load."""
    return sorted({int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)})


def scalar_atomics(ptx: str) -> int:
    """Atomic instructions on global memory (`red.global` / `atom.global`, predicated or not): each adds one
    element (or a 4-vector) at a time, where a bulk tensor reduction adds a whole tile."""
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?(?:red|atom)\.global", ptx, re.M))


def ordered_atomics(ptx: str) -> int:
    """Atomic instructions with acquire/release (or stronger) ordering. tl.atomic_add defaults to acq_rel,
    which on sm_90 puts a GPU-wide memory barrier and an L1 invalidation around every atomic instruction;
    accumulations that only the next kernel reads need relaxed ones (sem="relaxed": fire-and-forget REDs)."""
    return len(re.findall(r"\b(?:atom|red)\.[\w.]*\b(?:acq_rel|acquire|release|sc)\b", ptx))


def ptxas_usage(log: str) -> tuple[int | None, int | None]:
    """(registers, spill store bytes) from a `ptxas -v` log, or (None, None) where the log has no such line."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def compile_with_ptxas_log(src, target, options):
    """triton.compile, plus the `ptxas -v` log of the very ptxas run that built the cubin. Triton picks the
    ptxas (its bundled one, a newer one for some archs in some versions, or TRITON_PTXAS_PATH) and its flags
    per version; running a ptxas of our own on the PTX could use another version (one too old for the PTX,
    as Triton 3.9's bundled CUDA 12.9 ptxas is for its sm_90 PTX) or other flags, and report another kernel.
    Triton prints the log when `knobs.nvidia.dump_ptxas_log` is set (Triton >= 3.5), and only when it runs
    ptxas, hence always_compile (a cache hit would skip ptxas)."""
    from triton import knobs

    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return compiled, log.getvalue()


# Kernel modules whose aot_specs() are compiled; each yields (label, fn, signature, constexprs, options) where
# options holds num_warps and optionally num_stages, exactly as the launcher passes them, and optionally
# min_arch (the variant is only launched from that arch on: reported as skipped below it) and divisible
# (integer arguments hinted as multiples of 16 beyond DIVISIBLE_INTS, as the JIT does at the shapes described).
KERNEL_MODULES = ("mrl_kernels.kernels.prefix_norms", "mrl_kernels.kernels.nested_ce_forward",
                  "mrl_kernels.kernels.nested_ce_backward", "mrl_kernels.kernels.prefix_tile_max",
                  "mrl_kernels.kernels.gather_scores", "mrl_kernels.kernels.contrastive_forward",
                  "mrl_kernels.kernels.contrastive_backward")


def compile_spec(module: str, index: int, arch: int) -> dict:
    """The JSON report of spec `index` of `module`'s aot_specs() compiled for sm_<arch>; a compile error is
    reported, not raised, so one bad kernel does not hide the others."""
    label, fn, signature, constexprs, options = list(importlib.import_module(module).aot_specs())[index]
    label = f"{module.rsplit('.', 1)[-1]}[{label}]"
    options = dict(options)
    min_arch = options.pop("min_arch", 0)  # a variant the launcher only runs from that arch on
    if arch < min_arch:
        return {"label": label, "kernel": fn.__name__, "arch": arch, "skipped": f"launched on sm_{min_arch}+ only",
                "error": None}
    try:
        report = asdict(compile_kernel(fn, signature, constexprs, arch, **options))
        del report["ptx"]
        report.update(fits=report["shared"] <= SHARED_LIMIT[arch], error=None)
    except Exception as exc:
        report = {"kernel": fn.__name__, "arch": arch, "error": f"{type(exc).__name__}: {exc}"}
    return {"label": label, **report}


def _compile_task(task):
    return compile_spec(*task)


def compile_all(archs=ARCHS, workers: int | None = None):
    """Reports of every spec of every kernel module for every arch, in that order. Each compile is
    single-threaded and takes seconds (ptxas on the larger kernels), so they run in `workers` processes
    (default: one per core); spawned, as the JIT functions do not pickle and each worker imports its own."""
    tasks = [(module, index, arch) for module in KERNEL_MODULES
             for index in range(sum(1 for _ in importlib.import_module(module).aot_specs())) for arch in archs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    if workers == 1:
        yield from map(_compile_task, tasks)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_compile_task, tasks)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mrl_kernels.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compile for this sm_ arch only (repeatable; default: all of %(choices)s)")
    parser.add_argument("--workers", type=int, default=None, help="compiler processes (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for line in compile_all(tuple(args.arch or ARCHS), args.workers):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
