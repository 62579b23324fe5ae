"""The registry of benchmark suites. Each module here builds its Suite objects from bench.harness's types
and timing; the harness imports no suite (the dependency is one-way: suites -> harness). A new suite is a
module here plus its entry in SUITES."""
from __future__ import annotations

from bench.harness import Suite
from bench.suites import contrastive, nested_ce, prefix_norms, search, training

SUITES: dict[str, Suite] = {s.name: s for s in (contrastive.SUITE, nested_ce.SUITE, nested_ce.SMALL, prefix_norms.SUITE,
                                                prefix_norms.SMALL, search.SUITE, search.SMALL,
                                                training.SUITE)}


def get(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]
