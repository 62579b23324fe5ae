"""nested_ce: mk.matryoshka_linear_cross_entropy(x, W, target, dims) with one shared [C, D] head (MRL-E),
the sum over dims m_j of cross_entropy(x[:, :m_j] @ W[:, :m_j]^T, target), mean reduction, no bias.

Modes (one case per mode, the mode is the case name's suffix):
  fwd      the loss with autograd recording (inputs require grad), as in training; the graph is dropped.
  bwd      torch.autograd.grad(loss, (x, W)) alone: the forward runs untimed before every timed call
           (fn.prepare in the harness), so this is the backward's own time, not fwd+bwd minus fwd; its
           peak memory counts from after the forward (what the forward saved is not in it).
  fwd+bwd  loss, then torch.autograd.grad(loss, (x, W)): one training step of the head. The number that
           matters; its peak memory is the whole step's.
rel err compares the loss (fwd), (dx, dW) (bwd) or (loss, dx, dW) (fwd+bwd) with the eager loop's: the
largest of the per-tensor errors.

FLOPs: one matmul-equivalent is 2*N*C*D. TFLOP/s counts the useful single-pass work at the full dim,
whatever a provider really does: 2*N*C*D (fwd), 4*N*C*D (bwd: dx and dW), 6*N*C*D (fwd+bwd). The eager
loop really does 2*N*C*sum(m_j) forward (about 2x that for doubling dims) and twice that backward, so its
TFLOP/s reads low by that factor: it is wasted work, not a slow matmul.

Providers:
  reference           mrl_kernels.reference.nested_cross_entropy: the eager loop (the baseline).
  compiled_loop       torch.compile(dynamic=False) of that loop; the CPU case and the first GPU case only;
                      the first call (compile) is recorded apart as first_call_s; skipped if compile fails.
  torch_linear_ce     sum over dims of F.linear_cross_entropy(x[:, :m], W[:, :m], target,
                      options=torch.nn.LinearCrossEntropyOptions()) (torch's chunked path, which computes
                      the gradients inside its forward, like Liger; without the options class, the plain
                      call, which is the eager loop again).
  ours_torch          mk.matryoshka_linear_cross_entropy(..., backend="torch").
  ours_triton         mk.matryoshka_linear_cross_entropy(..., backend="triton") (CUDA).
  cce                 sum over dims of cut_cross_entropy.linear_cross_entropy(x[:, :m].contiguous(),
                      W[:, :m].contiguous(), target) (CUDA; the copies are timed: CCE needs contiguous
                      operands). APPROXIMATE: CCE's defaults skip the gradient blocks whose softmax is below
                      2^-12 (filter_eps), which at small nesting dims (nearly uniform softmax, C > 4096)
                      drops the whole non-target mass, and accumulate in bf16.
  cce_exact           the same with impl="cce_exact": no gradient filter, fp32 accumulation. The exact peer.
  liger               sum over dims of liger_kernel's LigerFusedLinearCrossEntropyFunction.apply(
                      x[:, :m].contiguous(), W[:, :m].contiguous(), target)[0] (CUDA). Liger computes
                      the gradients inside its forward: its fwd is nearly its fwd+bwd, its bwd nearly free.
  cce_exact_full_dim_floor  ONE cut_cross_entropy.linear_cross_entropy(x, W, target, impl="cce_exact") at the
                      full dim: not the same loss (no rel err), the floor for "all dims cost at most 1.3x one
                      exact full-dim CCE call"; vs floor = median / its median.
  cce_full_dim_floor  the same with CCE's defaults (approximate, see cce), beside it.
err vs oracle: every provider's output against the exact one, computed in fp32 for 16-bit cases (fp64 for
fp32 ones) by the eager loop over row chunks (_oracle), so a provider's own error shows, the baseline's too.
A provider whose package is missing, or that would need more than MEMORY_BUDGET bytes (the eager loop
materialises len(dims) logits matrices), is skipped with the reason; so is _liger's fwd and bwd alone at
the vocab head (slow).

Heads: ImageNet-1k, JFT-300M (21,841 classes) and a 128,256-token vocabulary, logits of unit scale at the
full dim; jft-peaked is the JFT head with full-dim logits of std 4, where a softmax concentrates on few
classes and gradient filtering is realistic. Trimming a run: $NESTED_CE_MODES (e.g. "fwd+bwd") and
$NESTED_CE_HEADS (e.g. "imagenet,jft"; not --quick) take comma-separated subsets.

nested_ce_small (CPU only, fp32, fwd+bwd; bench/suites/_small.py): N in SMALL_N x D in SMALL_D x C in SMALL_C,
dims 2, 4, ..., D, plus the per-call overhead case (N=1, D=8, C=2, dims (2, 4, 8)). Providers: reference (the
eager loop, baseline), auto and torch (mk.matryoshka_linear_cross_entropy with that backend).
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import time

import torch
import torch.nn.functional as F

from bench.harness import Case, Suite, Timing, Unavailable, require
from bench.suites import _small

DIMS = tuple(8 << i for i in range(9))  # 8, 16, ..., 2048
JFT_DIMS = (12, 24, 48, 96, 192, 384, 768)
MODES = ("fwd", "bwd", "fwd+bwd")
PASSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # useful work in units of 2*N*C*D
MEMORY_BUDGET = 60 * 2**30  # skip a provider whose estimated peak is above this (bytes)

# (label, N, D, C, dims, dtype, std of the full-dim logits)
CPU_HEADS = [("imagenet", 2048, 2048, 1000, DIMS, "float32", 1.0)]
GPU_HEADS = [
    ("imagenet", 8192, 2048, 1000, DIMS, "bfloat16", 1.0),
    ("jft", 8192, 768, 21841, JFT_DIMS, "bfloat16", 1.0),
    ("jft-peaked", 8192, 768, 21841, JFT_DIMS, "bfloat16", 4.0),
    ("vocab", 16384, 2048, 128256, DIMS, "bfloat16", 1.0),
]
QUICK_HEAD = ("tiny", 64, 64, 50, (8, 16, 32, 64))
COMPILE_HEAD = {"cpu": "imagenet", "cuda": "imagenet"}  # torch.compile is slow: one head per device
LIGER_MAX_CHUNKS = 4096  # above this many row chunks per call, time Liger in fwd+bwd only
SMALL_N, SMALL_D, SMALL_C = (64, 256, 1024, 4096), (16, 128, 512), (10, 100, 1000)


def _case(label: str, n: int, d: int, c: int, dims, dtype: str, logit_std: float, mode: str) -> Case:
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    operands = (n * d + c * d) * itemsize
    moved = {"fwd": operands + n * 8, "bwd": 2 * operands + n * 8 + n * len(dims) * 4,
             "fwd+bwd": 2 * operands + n * 8}[mode]
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    return Case(f"{label}-N{n}-D{d}-C{c}-{short}-{mode}",
                {"head": label, "N": n, "D": d, "C": c, "dims": list(dims), "dtype": dtype, "logit_std": logit_std,
                 "mode": mode},
                flops=PASSES[mode] * 2 * n * c * d, bytes=moved)


def _selected(env: str, known) -> list:
    """$env, a comma-separated subset of `known` (unset: all of them): a way to trim a GPU run."""
    wanted = [w for w in os.environ.get(env, "").split(",") if w]
    unknown = set(wanted) - set(known)
    if unknown:
        raise ValueError(f"${env}: unknown {sorted(unknown)}; known: {list(known)}")
    return [k for k in known if not wanted or k in wanted]


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        heads = [QUICK_HEAD + ("bfloat16" if device == "cuda" else "float32", 1.0)]
    else:
        heads = GPU_HEADS if device == "cuda" else CPU_HEADS
        labels = _selected("NESTED_CE_HEADS", [h[0] for h in heads])
        heads = [h for h in heads if h[0] in labels]
    return [_case(*head, mode) for head in heads for mode in _selected("NESTED_CE_MODES", MODES)]


def small_cases(device: str, quick: bool) -> list[Case]:
    overhead = _case("overhead", 1, 8, 2, (2, 4, 8), "float32", 1.0, "fwd+bwd")
    points = [_case("small", n, d, c, _small.doubling(2, d), "float32", 1.0, "fwd+bwd")
              for n in SMALL_N for d in SMALL_D for c in SMALL_C]
    return _small.grid(device, quick, overhead, points)


def make_inputs(case: Case, device: str, seed: int) -> tuple:
    p = case.params
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    x = torch.randn(p["N"], p["D"], generator=gen, device=device, dtype=dtype)
    # Full-dim logits of std logit_std (x and W rows of unit-variance entries: x.w has variance D).
    scale = p.get("logit_std", 1.0) / p["D"] ** 0.5
    w = torch.randn(p["C"], p["D"], generator=gen, device=device, dtype=dtype) * scale
    target = torch.randint(0, p["C"], (p["N"],), generator=gen, device=device)
    return x.requires_grad_(), w.requires_grad_(), target


# ---- modes ---------------------------------------------------------------------------------------


def _moded(loss_fn, mode: str, compare: bool = True):
    """The timed callable for a mode, from loss_fn(x, w, target) -> scalar loss."""
    if mode == "fwd":

        def fn(x, w, t):
            loss = loss_fn(x, w, t).detach()
            return loss if compare else None

    elif mode == "fwd+bwd":

        def fn(x, w, t):
            loss = loss_fn(x, w, t)
            dx, dw = torch.autograd.grad(loss, (x, w))
            return (loss.detach(), dx, dw) if compare else None

    else:

        def fn(loss, x, w):
            grads = torch.autograd.grad(loss, (x, w))
            return grads if compare else None

        fn.prepare = lambda x, w, t: (loss_fn(x, w, t), x, w)
    return fn


def _params(case: Case):
    p = case.params
    return p, tuple(p["dims"]), getattr(torch, p["dtype"]).itemsize


def _check_memory(case: Case, need: float, what: str) -> None:
    if need > MEMORY_BUDGET:
        raise Unavailable(f"{what} needs ~{need / 2**30:.0f} GiB (> the {MEMORY_BUDGET / 2**30:.0f} GiB budget)")


def _loop_bytes(case: Case) -> float:
    """Eager loop: every dim's logits and log-softmax are saved for backward (input dtype), plus fp32
    transients in backward."""
    p, dims, itemsize = _params(case)
    return len(dims) * p["N"] * p["C"] * itemsize * 2 + 2 * p["N"] * p["C"] * 4


ORACLE_ROWS = 1024  # rows per step of the oracle's loop: its logits stay within 2 * len(dims) * 1024 * C


def _oracle(case: Case, inputs: tuple):
    """The exact output for `inputs`: the eager loop in fp32 (fp64 for fp32 inputs) over row chunks of
    ORACLE_ROWS, the loss summed over chunks / N (the bench's targets ignore no row); what the case's mode
    compares: loss (fwd), (dx, dW) (bwd), (loss, dx, dW) (fwd+bwd). The three modes of a head share their
    inputs (seed 0), so the last result is kept for the next mode."""
    p, dims, _ = _params(case)
    key = (p["head"], p["N"], p["D"], p["C"], p["dtype"], p["logit_std"], str(inputs[0].device))
    if _oracle_cache.get("key") != key:
        _oracle_cache.clear()
        _oracle_cache.update(key=key, out=_oracle_step(*inputs, dims))
    loss, dx, dw = _oracle_cache["out"]
    return {"fwd": loss, "bwd": (dx, dw), "fwd+bwd": (loss, dx, dw)}[p["mode"]]


_oracle_cache: dict = {}


def _oracle_step(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, dims: tuple):
    loop = require("mrl_kernels.reference", "nested_cross_entropy")
    wide = torch.float64 if x.dtype == torch.float32 else torch.float32
    w_wide = w.detach().to(wide).requires_grad_()
    dx = torch.empty(x.shape, dtype=wide, device=x.device)
    loss = torch.zeros((), dtype=wide, device=x.device)
    with torch.enable_grad():
        for r0 in range(0, x.shape[0], ORACLE_ROWS):
            x_rows = x[r0:r0 + ORACLE_ROWS].detach().to(wide).requires_grad_()
            part = loop(x_rows, w_wide, target[r0:r0 + ORACLE_ROWS], dims, reduction="sum") / x.shape[0]
            part.backward()
            dx[r0:r0 + ORACLE_ROWS] = x_rows.grad
            loss += part.detach()
    return loss, dx, w_wide.grad


def _needs_cuda(device: str, name: str) -> None:
    if device != "cuda":
        raise Unavailable(f"{name} runs Triton kernels: CUDA only")


# ---- providers -----------------------------------------------------------------------------------


def _reference(case: Case, device: str):
    _check_memory(case, _loop_bytes(case), "the eager loop")
    loop = require("mrl_kernels.reference", "nested_cross_entropy")
    dims = tuple(case.params["dims"])
    return _moded(lambda x, w, t: loop(x, w, t, dims), case.params["mode"])


_compile_failures: dict[tuple, str] = {}


@functools.cache
def _compiled(dims: tuple, device: str):
    loop = require("mrl_kernels.reference", "nested_cross_entropy")

    def loss(x, w, t):
        return loop(x, w, t, dims)

    return torch.compile(loss, dynamic=False)


def _compiled_loop(case: Case, device: str):
    p, dims, _ = _params(case)
    if p["head"] != COMPILE_HEAD.get(device):
        raise Unavailable(f"torch.compile is slow: only at the {COMPILE_HEAD.get(device)!r} head on {device}")
    _check_memory(case, _loop_bytes(case), "the compiled loop")
    key = (dims, device)
    if key in _compile_failures:
        raise Unavailable(_compile_failures[key])
    compiled = _compiled(dims, device)
    fn = _moded(compiled, p["mode"])
    extra = {}

    def guarded(call):
        def run(*args):
            try:
                return call(*args)
            except Exception as e:  # a compile failure is a missing provider, not a broken one
                _compile_failures[key] = f"torch.compile failed: {type(e).__name__}: {e}"[:300]
                raise Unavailable(_compile_failures[key]) from e

        return run

    checked = guarded(fn)

    def timed(*args):
        if extra:
            return fn(*args)
        start = time.perf_counter()
        out = checked(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        extra["first_call_s"] = time.perf_counter() - start
        extra["note"] = f"first call {extra['first_call_s']:.1f} s (any compile)"
        return out

    if hasattr(fn, "prepare"):
        timed.prepare = guarded(fn.prepare)
    timed.extra = extra
    return timed


def _torch_linear_ce(case: Case, device: str):
    p, dims, _ = _params(case)
    if not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    chunked = "options" in inspect.signature(F.linear_cross_entropy).parameters and hasattr(
        torch.nn, "LinearCrossEntropyOptions")
    if chunked:
        kwargs = {"options": torch.nn.LinearCrossEntropyOptions()}
        note = "chunked path (options=LinearCrossEntropyOptions()): gradients computed in its forward"
    else:
        _check_memory(case, _loop_bytes(case), "F.linear_cross_entropy without chunking")
        kwargs, note = {}, "no chunking options in this torch: the eager loop again"

    def loss(x, w, t):
        return sum(F.linear_cross_entropy(x[:, :m], w[:, :m], t, **kwargs) for m in dims)

    fn = _moded(loss, p["mode"])
    fn.extra = {"note": note}
    return fn


def _ours(backend: str, needs_cuda: bool = False):
    def factory(case: Case, device: str):
        if needs_cuda:
            _needs_cuda(device, f"backend={backend!r}")
        op = require("mrl_kernels", "matryoshka_linear_cross_entropy")
        dims = tuple(case.params["dims"])
        return _moded(lambda x, w, t: op(x, w, t, dims, backend=backend), case.params["mode"])

    return factory


CCE_NOTES = {"cce": "approximate: CCE's defaults (gradient filter, bf16 accumulation)",
             "cce_exact": "exact: impl='cce_exact' (no gradient filter, fp32 accumulation)"}


def _cce(impl: str, full_dim_floor: bool = False):
    """A CCE provider factory: per dim (the same loss as ours), or ONE full-dim call (the floor)."""

    def factory(case: Case, device: str):
        _needs_cuda(device, "cut-cross-entropy")
        lce = require("cut_cross_entropy", "linear_cross_entropy")
        if impl != "cce" and impl not in getattr(require("cut_cross_entropy.cce_utils", "CCEPresets"), "names", ()):
            raise Unavailable(f"this cut-cross-entropy has no impl={impl!r}")
        kwargs = {} if impl == "cce" else {"impl": impl}
        dims = tuple(case.params["dims"])
        if full_dim_floor:  # another loss than the others': no rel err (compare=False returns nothing)
            fn = _moded(lambda x, w, t: lce(x, w, t, **kwargs), case.params["mode"], compare=False)
            fn.extra = {"note": f"ONE full-dim CCE call, the floor, not the same loss; {CCE_NOTES[impl]}"}
            return fn

        def loss(x, w, t):
            return sum(lce(x[:, :m].contiguous(), w[:, :m].contiguous(), t, **kwargs) for m in dims)

        fn = _moded(loss, case.params["mode"])
        fn.extra = {"note": f"per dim, slice copies timed; {CCE_NOTES[impl]}"}
        return fn

    return factory


def _liger_chunks(n: int, c: int, dims) -> int:
    """Row chunks of one Liger call per dim, summed (its rule: chunk = next_pow2(N / ceil(C / m)) rows)."""
    total = 0
    for m in dims:
        size = min(n, 1 << max(0, math.ceil(math.log2(math.ceil(n / math.ceil(c / m))))))
        total += math.ceil(n / size)
    return total


def _liger(case: Case, device: str):
    _needs_cuda(device, "Liger-Kernel")
    p = case.params
    chunks = _liger_chunks(p["N"], p["C"], p["dims"])
    if p["mode"] != "fwd+bwd" and chunks > LIGER_MAX_CHUNKS:
        raise Unavailable(f"{chunks} row chunks per call (~1 s, launch-bound): timed in fwd+bwd only, and "
                          "Liger does the backward's work in its forward anyway")
    function = require("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    dims = tuple(case.params["dims"])

    def loss(x, w, t):
        return sum(function.apply(x[:, :m].contiguous(), w[:, :m].contiguous(), t)[0] for m in dims)

    fn = _moded(loss, case.params["mode"])
    fn.extra = {"note": "per dim; gradients computed in its forward; slice copies timed"}
    return fn


SUITE = Suite(
    name="nested_ce",
    baseline="reference",
    cases=cases,
    make_inputs=make_inputs,
    providers={
        "reference": _reference,
        "compiled_loop": _compiled_loop,
        "torch_linear_ce": _torch_linear_ce,
        "ours_torch": _ours("torch"),
        "ours_triton": _ours("triton", needs_cuda=True),
        "cce": _cce("cce"),
        "cce_exact": _cce("cce_exact"),
        "liger": _liger,
        "cce_exact_full_dim_floor": _cce("cce_exact", full_dim_floor=True),
        "cce_full_dim_floor": _cce("cce", full_dim_floor=True),
    },
    metric="TFLOP/s",
    floor="cce_exact_full_dim_floor",
    oracle=_oracle,
    # The GPU budget is small: few reps (the big head's calls take 100+ ms each, so min_reps rules there).
    timing={"cuda": Timing(warmup_ms=20, rep_ms=60, min_reps=3, max_reps=30, max_copies=2)},
)

SMALL = _small.suite("nested_ce_small", small_cases, make_inputs, _reference, _ours, "TFLOP/s")
