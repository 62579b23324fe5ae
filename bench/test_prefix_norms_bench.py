"""prefix_norms under pytest-benchmark: `pytest bench/ --benchmark-only` (MRL_BENCH_QUICK=1: tiny shapes).
The harness (`python -m bench run prefix_norms`) is the main tool; this feeds pytest-benchmark's
own storage and comparisons (--benchmark-autosave, --benchmark-compare)."""
import os

import pytest

from bench import harness

SUITE = harness.get_suite("prefix_norms")
DEVICE = harness.default_device()
CASES = SUITE.cases(DEVICE, os.environ.get("MRL_BENCH_QUICK") == "1")


@pytest.mark.parametrize("provider", list(SUITE.providers))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_prefix_norms(benchmark, case, provider):
    harness.pytest_benchmark(benchmark, SUITE, case, provider, DEVICE)
