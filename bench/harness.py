"""Benchmark harness: each suite's providers are timed side by side, in one process, on one device.
The suites (bench/suites/, whose __init__ holds the registry) build on this module; it imports none of them.

Timing. Warm-up first (it also absorbs compilation, autotuning and lazy initialisation), then enough
reps to fill `Timing.rep_ms`; the median is reported. CUDA uses a pair of CUDA events around every call
(GPU time, launch gaps inside the call included); the CPU uses time.perf_counter. When a case's inputs
are small next to the last-level cache, a few fresh copies are rotated so that a rep does not read what
the previous rep left in cache.

Providers. A provider's factory returns fn; fn(*inputs) is what is timed. Two optional attributes of fn:
`fn.prepare(*inputs) -> args`, untimed work before every call (the forward pass, when only backward is to
be timed: each timed call is then fn(*fn.prepare(*inputs)), and peak memory counts from after prepare),
and `fn.extra`, a dict merged into the provider's record after the run (e.g. compile seconds, a `note`).

Peak memory: the extra bytes allocated at the peak of one warm call, output included, inputs excluded
(out_mb, the returned tensors' bytes, is recorded too: peak - out is the working memory).
On CUDA, torch.cuda.max_memory_allocated during the call minus memory_allocated before it; this sees
torch's caching allocator only (memory a provider takes from CuPy's own pool is not counted). On the CPU,
the profiler's allocation events (profile_memory=True) summed in time order: the same c10 allocator bytes
as on CUDA. Process RSS would be blurred by malloc arenas and page reuse, and tracemalloc does not see
torch's allocations at all.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib
import itertools
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


class Unavailable(Exception):
    """A provider cannot run on this device or install; the harness records the reason and skips it."""


@dataclass(frozen=True)
class Case:
    name: str  # unique within its suite: stored results are merged on it
    params: dict[str, Any]  # shapes, dtype, ...: JSON-able
    flops: float
    bytes: float  # bytes the op must move at least: reads plus writes


@dataclass(frozen=True)
class Suite:
    name: str
    baseline: str
    cases: Callable[[str, bool], list[Case]]  # (device, quick) -> cases; [] if none for that device
    make_inputs: Callable[[Case, str, int], tuple]  # (case, device, seed) -> a provider's arguments
    providers: dict[str, Callable[[Case, str], Callable]]  # name -> (case, device) -> fn(*inputs)
    metric: str = "GB/s"  # the throughput that matters for this op: "GB/s" or "TFLOP/s"
    floor: str | None = None  # a provider to read times against too: records get vs_floor = median / its median
    # (case, inputs) -> the exact output for those inputs, in a wider dtype than the providers': every
    # record then gets oracle_err = rel_err(its output, that), the baseline's too (rel_err only says how far a
    # provider is from the baseline, which in a 16-bit case carries 16-bit error of its own).
    oracle: Callable[[Case, tuple], Any] | None = None
    timing: dict[str, "Timing"] = dataclasses.field(default_factory=dict)  # device -> full-run Timing override


@dataclass(frozen=True)
class Timing:
    warmup_ms: float = 100
    rep_ms: float = 400
    min_reps: int = 5
    max_reps: int = 200
    max_copies: int = 8
    # rounds > 1: the case's providers are timed in turn, one window of rep_ms each per round (the order
    # rotating), and each reports the median of all its rounds' calls. A busy spell of a shared machine then
    # slows every provider alike instead of whichever one it fell on. rounds = 1: one provider after the
    # other, each built, timed and freed before the next (what large GPU cases need).
    rounds: int = 1


METRIC_KEY = {"GB/s": "gbps", "TFLOP/s": "tflops"}  # a suite's metric -> its record field

QUICK = Timing(warmup_ms=5, rep_ms=20, min_reps=3, max_reps=20, max_copies=2)

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def require(module: str, attr: str | None = None):
    """Import a provider's dependency, turning its absence into Unavailable."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise Unavailable(str(e)) from None
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise Unavailable(f"{module}.{attr} does not exist yet")
    return getattr(mod, attr)


# ---- statistics ----------------------------------------------------------------------------------


def summarize(times_ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times_ms, n=5, method="inclusive") if len(times_ms) > 1 else times_ms * 4
    return {
        "median_ms": statistics.median(times_ms),
        "p20_ms": q[0],
        "p80_ms": q[3],
        "min_ms": min(times_ms),
        "reps": len(times_ms),
    }


def add_ratios(records: list[dict], baseline: str, floor: str | None = None) -> list[dict]:
    """ratio = median / the baseline's median on the same case (below 1: faster than the baseline);
    peak_ratio = peak_mb / the baseline's peak_mb; scratch_ratio = the same for peak_mb - out_mb (the
    working memory beyond the output); vs_floor = median / the floor provider's median."""

    def of(provider, key):
        return {r["case"]: r.get(key) for r in records if r["provider"] == provider and r["status"] == "ok"}

    def scratch(r):  # peak extra memory less the output's own bytes (e.g. the gradients): working memory
        return None if r.get("peak_mb") is None or r.get("out_mb") is None else r["peak_mb"] - r["out_mb"]

    base, base_peak = of(baseline, "median_ms"), of(baseline, "peak_mb")
    base_scratch = {r["case"]: scratch(r) for r in records if r["provider"] == baseline and r["status"] == "ok"}
    low = of(floor, "median_ms") if floor else {}
    for r in records:
        if r["status"] == "ok":
            b, bp, f = base.get(r["case"]), base_peak.get(r["case"]), low.get(r["case"])
            bs, s = base_scratch.get(r["case"]), scratch(r)
            r["ratio"] = r["median_ms"] / b if b else None
            r["peak_ratio"] = r["peak_mb"] / bp if bp and r.get("peak_mb") is not None else None
            r["scratch_ratio"] = s / bs if bs and s is not None else None
            if floor:
                r["vs_floor"] = r["median_ms"] / f if f else None
    return records


def rel_err(out, ref) -> float | None:
    """||out - ref|| / ||ref|| in float64, so a fast but wrong provider shows up in the results; for tuples
    of tensors (e.g. loss and gradients), the largest of the per-item errors."""
    if isinstance(out, (tuple, list)) and isinstance(ref, (tuple, list)):
        if len(out) != len(ref):
            raise ValueError(f"{len(out)} outputs, the baseline has {len(ref)}")
        errs = [e for e in map(rel_err, out, ref) if e is not None]
        return max(errs, default=None)
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)):
        return None
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the baseline's {tuple(ref.shape)}")
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---- measurement ---------------------------------------------------------------------------------


def _clock(device: str):
    if device == "cuda":

        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def elapsed(start, end):
            end.synchronize()
            return start.elapsed_time(end)

        return mark, elapsed
    return time.perf_counter, lambda start, end: (end - start) * 1e3


def time_fn(fn: Callable, copies: list[tuple], device: str, timing: Timing) -> list[float]:
    """Per-call times in ms, after a warm-up; calls cycle through the input copies."""
    return timing_window(fn, copies, device, timing)()


def timing_window(fn: Callable, copies: list[tuple], device: str, timing: Timing) -> Callable[[], list[float]]:
    """Warms fn up, then returns window(): the per-call times (ms) of one window of about rep_ms."""
    mark, elapsed = _clock(device)
    args = itertools.cycle(copies)
    prepare = getattr(fn, "prepare", None)

    def run(n: int) -> list[float]:
        spans = []
        for _ in range(n):
            inputs = next(args)
            inputs = prepare(*inputs) if prepare else inputs
            start = mark()
            fn(*inputs)
            spans.append((start, mark()))
        # Read CUDA events only after all calls are queued, so the GPU never waits for the host.
        return [elapsed(start, end) for start, end in spans]

    run(1)
    estimate = max(statistics.median(run(3)), 1e-6)
    run(min(math.ceil(timing.warmup_ms / estimate), timing.max_reps))
    reps = min(max(math.ceil(timing.rep_ms / estimate), timing.min_reps), timing.max_reps)
    return lambda: run(reps)


def peak_bytes(fn: Callable, inputs: tuple, device: str) -> tuple[Any, int | None]:
    """(output, extra bytes at the peak of the call); see the module docstring."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn(*inputs)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*inputs)
    try:  # kineto's raw events carry the allocation sizes in time order; the FunctionEvent tree folds them
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        return out, max(itertools.accumulate((e.nbytes() for e in events), initial=0))
    except AttributeError:  # a torch whose profiler lacks this API: no number rather than a wrong one
        return out, None


def cache_bytes(device: str) -> int:
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max(sizes, default=32 << 20)


def n_copies(input_bytes: int, cache: int, max_copies: int) -> int:
    """Enough input copies to span twice the cache, so each rep reads its inputs from memory."""
    return max(1, min(max_copies, math.ceil(2 * cache / max(input_bytes, 1))))


def _nbytes(inputs: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


@functools.cache
def ceiling(device: str, metric: str) -> float:
    """The machine's measured ceiling for a metric, so results can be read as a fraction of it:
    GB/s of a copy far larger than the cache (read + write), or TFLOP/s of a large matmul (bf16 on CUDA,
    fp32 on the CPU). Measured, not the data sheet's number, which no kernel reaches."""
    timing = Timing(warmup_ms=20, rep_ms=100, min_reps=3, max_reps=50)
    if metric == "GB/s":
        src = torch.empty(max(8 * cache_bytes(device), 256 << 20) // 4, device=device)
        dst = torch.empty_like(src)
        ms = statistics.median(time_fn(dst.copy_, [(src,)], device, timing))
        return 2 * src.numel() * 4 / ms / 1e6
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_fn(torch.mm, [(a, a)], device, timing))
    return 2 * n**3 / ms / 1e9


# ---- environment ---------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", name.lower())).strip("-")


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # absent or broken: either way there is no version to record
        return None


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


def environment(device: str) -> dict[str, Any]:
    """Stored with every record: results from different runs and machines stay comparable."""
    return {
        "device": device_name(device),
        "device_type": device,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "cupy": _version("cupy"),
            "mrl_kernels": _version("mrl_kernels"),
        },
        "threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings most: keep a trace of it.
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- running -------------------------------------------------------------------------------------


def build(suite: Suite, case: Case, provider: str, device: str) -> Callable:
    """The provider's callable; raises Unavailable when it cannot run here."""
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    return suite.providers[provider](case, device)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def run_case(suite: Suite, case: Case, device: str, timing: Timing, env: dict) -> list[dict]:
    inputs = suite.make_inputs(case, device, 0)
    copies = [inputs] + [suite.make_inputs(case, device, seed)
                         for seed in range(1, n_copies(_nbytes(inputs), cache_bytes(device), timing.max_copies))]
    # $MRL_BENCH_PROVIDERS, a comma-separated subset, trims a run (the baseline always runs: ratios need it).
    wanted = [p for p in os.environ.get("MRL_BENCH_PROVIDERS", "").split(",") if p]
    names = [suite.baseline] + [p for p in suite.providers if p != suite.baseline and (not wanted or p in wanted)]
    records = {name: {"case": case.name, "provider": name, "params": case.params, "flops": case.flops,
                      "bytes": case.bytes, "status": "ok", **env, "timing": dataclasses.asdict(timing)}
               for name in names}
    ref = None
    oracle = None
    for group in [names] if timing.rounds > 1 else [[name] for name in names]:
        fns, windows, times = {}, {}, {}
        for name in group:
            def warm(name=name):
                fns[name] = build(suite, case, name, device)
                windows[name], times[name] = timing_window(fns[name], copies, device, timing), []
            _attempt(records[name], warm)
        for r in range(timing.rounds):
            live = list(windows)
            shift = r % len(live) if live else 0
            for name in live[shift:] + live[:shift]:
                if not _attempt(records[name], lambda name=name: times[name].extend(windows[name]())):
                    del windows[name]
        for name in windows:  # the baseline first, so that the others' rel_err can be read against it
            def measure(name=name):
                nonlocal ref, oracle
                rec, fn = records[name], fns[name]
                rec.update(summarize(times[name]))
                # Measured after timing, so one-off compile or autotuning buffers do not count.
                prepare = getattr(fn, "prepare", None)
                out, peak = peak_bytes(fn, prepare(*inputs) if prepare else inputs, device)
                ref = out if name == suite.baseline else ref
                seconds = rec["median_ms"] * 1e-3
                outs = out if isinstance(out, (tuple, list)) else (out,)
                if suite.oracle is not None and out is not None:
                    oracle = suite.oracle(case, inputs) if oracle is None else oracle
                    rec["oracle_err"] = rel_err(out, oracle)
                rec.update(peak_mb=None if peak is None else peak / 2**20, out_mb=_nbytes(outs) / 2**20,
                           rel_err=rel_err(out, ref),
                           gbps=case.bytes / seconds / 1e9, tflops=case.flops / seconds / 1e12)
                rec["of_ceiling"] = rec[METRIC_KEY[suite.metric]] / env["ceiling"][suite.metric]
                rec.update(getattr(fn, "extra", {}))
            _attempt(records[name], measure)
        fns = windows = None
        _free(device)
    return list(records.values())


def _attempt(rec: dict, step: Callable[[], Any]) -> bool:
    """Runs one step of a provider's measurement; a failure is written into its record (skipped: it cannot
    run here; error: anything else, so that one broken provider does not hide the others' numbers)."""
    try:
        step()
        return True
    except (Unavailable, NotImplementedError) as e:
        rec.update(status="skipped", reason=_reason(e))
    except Exception as e:
        rec.update(status="error", reason=_reason(e))
    return False


def pytest_benchmark(benchmark, suite: Suite, case: Case, provider: str, device: str) -> None:
    """One (case, provider) under pytest-benchmark's `benchmark` fixture; skips a provider that cannot run."""
    import pytest

    inputs = suite.make_inputs(case, device, 0)
    try:
        fn = build(suite, case, provider, device)
        prepare = getattr(fn, "prepare", None)
        fn(*(prepare(*inputs) if prepare else inputs))  # compile and autotune outside the timed rounds
    except (Unavailable, NotImplementedError) as e:
        pytest.skip(_reason(e))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(*args):
        fn(*(args or inputs))
        sync()  # pytest-benchmark reads a wall clock: wait for the GPU to finish

    benchmark.extra_info.update(case=case.name, params=case.params, flops=case.flops, bytes=case.bytes,
                                device=device_name(device))
    if prepare is None:
        benchmark(call)
    else:  # untimed setup before every round; pedantic mode is the only one that has it

        def setup():
            args = prepare(*inputs)
            sync()
            return args, {}

        benchmark.pedantic(call, setup=setup, rounds=10, warmup_rounds=1)


def run_suite(suite: Suite, device: str, quick: bool = False, timing: Timing | None = None):
    """Yields each case's records (ratios filled in) as soon as the case is done, so a caller can store
    them before the next case: a run cut short by a time limit keeps what it measured."""
    timing = timing or (QUICK if quick else suite.timing.get(device, Timing()))
    env = environment(device)
    env["ceiling"] = {suite.metric: ceiling(device, suite.metric)}
    for case in suite.cases(device, quick):
        records = run_case(suite, case, device, timing, env)
        _free(device)
        yield add_ratios(records, suite.baseline, suite.floor)
