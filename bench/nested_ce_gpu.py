"""Issue 9's prepared GPU run: one call, under five minutes, JSON lines out.

    python -m bench.nested_ce_gpu [--out DIR] [--quick] [--device cuda|cpu]

1. Tile reductions (bench/tile_reduce.py): programs adding 128 x 64 fp32 tiles into a 16 MB target (L2
   resident) and a 1 GB one, by per-element relaxed atomics and by tensor-descriptor bulk reductions; GB/s of
   tiles reduced. Tells whether the L2 absorbs the backward's bulk reductions (../shared/NESTED_CE_GPU.md).
2. The bf16 matmul ceiling (8192^3), the unit the targets are counted in.
3. The shipped nested-CE kernels over candidate tile configs (launch_config overridden) at N=4096, C=32,768,
   D=2048, 9 dims, bf16: forward alone and forward+backward, the backward by the TMA kernel (TMA loads, bulk
   tile reductions; shipped on sm_90) and by the pointer kernel (per-element relaxed atomics), each config's
   loss and gradient error against the fp32 torch backend;
   a config that fails to compile or run is recorded with its error.
4. The nested_ce suite, fwd+bwd at every head (python -m bench run nested_ce, NESTED_CE_MODES=fwd+bwd).

Every step has its own time limit (STEP_SECONDS) and writes its records as it goes, to
<out>/nested_ce_gpu.jsonl with the device name and versions; --quick (tiny sizes) and --device cpu (the
interpreter) try the script out without a GPU. Nothing here is tuned at run time: winners ship as fixed,
AOT-checked configs.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import torch

from bench import gpu_run
from bench.harness import rel_err

STEP_SECONDS = {"reduce": 30, "mm": 15, "sweep": 130, "suite": 120}  # 295 s in all
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the shipped TMA configs first (launch_config), then
# NESTED_CE_GPU.md's candidates.
FORWARD_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                   (64, 128, 64, 8, 3)]
BACKWARD_CONFIGS = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
                    (64, 128, 32, 4, 3)]
SWEEP_SHAPE = dict(n=4096, c=32768, d=2048, dims=tuple(8 << i for i in range(9)))
QUICK_SWEEP_SHAPE = dict(n=64, c=256, d=64, dims=(8, 16, 32, 64))
# The CPU tryout runs the interpreter, which has no descriptor reduce (only the tests' conftest shims it).
NO_DESCRIPTOR_REDUCE = "no descriptor reduce in the interpreter"


def tile_reductions(device: str, quick: bool, deadline: float):
    from bench import tile_reduce

    targets = [(256, 192)] if quick else [(2048, 2048), (16384, 16384)]  # 16 MB and 1 GB of fp32
    bench = gpu_run.timer(device)
    for rows, cols in targets:
        out = torch.zeros(rows, cols, device=device)
        n_tiles = (rows // 128) * (cols // 64)
        programs = 4 * n_tiles
        for kind in tile_reduce.KERNELS:
            if time.monotonic() > deadline:
                return
            if kind == "tma" and device == "cpu":
                yield {"step": "reduce", "kind": kind, "skipped": NO_DESCRIPTOR_REDUCE}
                continue
            ms = bench(lambda: tile_reduce.add_tiles(out, programs, kind))
            out.zero_()
            tile_reduce.add_tiles(out, programs, kind)
            tiles = tile_reduce.per_tile(out)
            exact = bool(torch.equal(tiles, tile_reduce.expected_sums(n_tiles, programs)[:, None].expand_as(tiles)))
            yield {"step": "reduce", "kind": kind, "target_mb": rows * cols * 4 / 2**20, "programs": programs,
                   "ms": ms, "gbps_reduced": programs * 128 * 64 * 4 / ms / 1e6, "exact": exact}
        del out


def mm_ceiling(device: str, quick: bool, deadline: float):
    n = 256 if quick else 8192
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    ms = gpu_run.timer(device)(lambda: a @ a)
    yield {"step": "mm", "n": n, "dtype": str(dtype), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


@contextlib.contextmanager
def _launch_config(forward_tiles: tuple | None, backward_tiles: tuple | None, backward_tma: bool = True):
    """Overrides the nested-CE kernels' tiles (16-bit inputs) for the forward and/or the backward (None: the
    shipped ones), and with backward_tma=False keeps the backward off its TMA kernel (the pointer kernel)."""
    from mrl_kernels.kernels import nested_ce_backward, nested_ce_forward

    shipped, shipped_tma = nested_ce_forward.launch_config, nested_ce_backward.use_tma

    def config(dtype, backward=False, tma=False):
        tiles = backward_tiles if backward else forward_tiles
        if tiles is None or dtype == torch.float32:
            return shipped(dtype, backward, tma)
        m, n, k, warps, stages = tiles
        return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages,
                "PRECISION": "tf32"}

    nested_ce_forward.launch_config = nested_ce_backward.launch_config = config
    nested_ce_backward.use_tma = lambda *tensors: backward_tma and shipped_tma(*tensors)
    try:
        yield
    finally:
        nested_ce_forward.launch_config = nested_ce_backward.launch_config = shipped
        nested_ce_backward.use_tma = shipped_tma


def config_sweep(device: str, quick: bool, deadline: float):
    import mrl_kernels as mk

    shape = QUICK_SWEEP_SHAPE if quick else SWEEP_SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape["n"], shape["d"], generator=gen, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(shape["c"], shape["d"], generator=gen, device=device) / shape["d"] ** 0.5).to(dtype)
    w.requires_grad_()
    t = torch.randint(0, shape["c"], (shape["n"],), generator=gen, device=device)
    dims = shape["dims"]

    def step(backend, xs, ws):
        loss = mk.matryoshka_linear_cross_entropy(xs, ws, t, dims, backend=backend)
        return (loss.detach(), *torch.autograd.grad(loss, (xs, ws)))

    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = step("torch", x32, w32)
    bench = gpu_run.timer(device)
    # The shipped backward tiles by both kernels first: the question this run is for.
    backward = [(f"backward-{'tma' if tma else 'pointer'}", None, cfg, tma) for cfg in BACKWARD_CONFIGS
                for tma in (True, False)]
    runs = backward[:2] + [("forward", cfg, None, True) for cfg in FORWARD_CONFIGS] + backward[2:]
    for which, fwd_cfg, bwd_cfg, tma in runs:
        if which == "backward-tma" and device == "cpu":  # as in tile_reductions: no descriptor reduce there
            yield {"step": "sweep", "which": which, "config": bwd_cfg, "skipped": NO_DESCRIPTOR_REDUCE}
            continue
        if time.monotonic() > deadline:
            yield {"step": "sweep", "which": which, "config": fwd_cfg or bwd_cfg, "error": "out of time"}
            continue
        record = {"step": "sweep", "which": which, "config": fwd_cfg or bwd_cfg, **{k: v for k, v in shape.items()}}
        try:
            with _launch_config(fwd_cfg, bwd_cfg, tma):
                with torch.no_grad():
                    record["fwd_ms"] = bench(lambda: mk.matryoshka_linear_cross_entropy(x, w, t, dims,
                                                                                        backend="triton"))
                record["fwd_bwd_ms"] = bench(lambda: step("triton", x, w))
                record["rel_err_vs_fp32"] = rel_err(step("triton", x, w), ref)
        except Exception as exc:  # a config the compiler or the chip refuses is a result, not a crash
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        yield record


def nested_ce_suite(device: str, quick: bool, deadline: float):
    env = dict(os.environ, NESTED_CE_MODES="fwd+bwd")
    cmd = [sys.executable, "-m", "bench", "run", "nested_ce", "--device", device, *(["--quick"] if quick else [])]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=max(1, deadline - time.monotonic()))
        yield {"step": "suite", "returncode": proc.returncode, "tail": proc.stdout[-2000:] + proc.stderr[-1000:]}
    except subprocess.TimeoutExpired:
        yield {"step": "suite", "error": "out of time"}


STEPS = {"reduce": tile_reductions, "mm": mm_ceiling, "sweep": config_sweep, "suite": nested_ce_suite}


def main(argv=None) -> int:
    return gpu_run.main("python -m bench.nested_ce_gpu", __doc__.split("\n")[0], "nested_ce_gpu", STEPS, STEP_SECONDS,
                        argv)


if __name__ == "__main__":
    sys.exit(main())
