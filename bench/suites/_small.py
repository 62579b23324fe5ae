"""The small-shape grids (the *_small suites): the shapes a small model trains and serves at, on the CPU,
where a drop-in op must not lose to the eager loop it replaces (issue 8). Each grid has one extra case,
`overhead-...`, at the tiniest shapes (one row): its time is the op's fixed cost per call, next to the
loop's. Providers: `reference` (the eager loop, the baseline), `auto` and `torch` (the op's backends)."""
from __future__ import annotations

from bench.harness import Suite, Timing

# Hundreds of sub-millisecond calls: shorter windows than the default Timing, more reps for tiny calls, and
# the providers timed in turn over 7 rounds: ratios near 1 are the point here, and on a shared 2-core
# machine back-to-back windows of one provider after the other moved them by up to 40%.
TIMING = Timing(warmup_ms=20, rep_ms=60, min_reps=5, max_reps=2000, max_copies=8, rounds=7)


def doubling(low: int, full: int) -> tuple[int, ...]:
    """low, 2*low, 4*low, ... below `full`, then `full`: doubling(2, 128) = (2, 4, ..., 64, 128)."""
    dims = []
    while low < full:
        dims.append(low)
        low *= 2
    return (*dims, full)


def grid(device: str, quick: bool, overhead, points) -> list:
    """The overhead case then the grid, on the CPU only ([] elsewhere); quick: the overhead case and the
    first grid point."""
    if device != "cpu":
        return []
    cases = [overhead, *points]
    return cases[:2] if quick else cases


def suite(name: str, cases, make_inputs, reference, backend, metric: str) -> Suite:
    """A small grid's Suite: `reference` (the eager loop's provider factory) as the baseline, then the op
    with backend "auto" and "torch" (backend(name) -> a provider factory)."""
    return Suite(name=name, baseline="reference", cases=cases, make_inputs=make_inputs,
                 providers={"reference": reference, "auto": backend("auto"), "torch": backend("torch")},
                 metric=metric, timing={"cpu": TIMING})
