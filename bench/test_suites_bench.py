"""Every benchmark suite under pytest-benchmark: `pytest bench/ --benchmark-only` (MRL_BENCH_QUICK=1: tiny
shapes; -k SUITE for one). The harness (`python -m bench run SUITE`) is the main tool: it also records peak
memory, errors against the baseline and skip reasons; this feeds pytest-benchmark's own storage and
comparisons (--benchmark-autosave, --benchmark-compare)."""
import os

import pytest

from bench import harness
from bench.suites import SUITES

DEVICE = harness.default_device()
QUICK = os.environ.get("MRL_BENCH_QUICK") == "1"
PARAMS = [pytest.param(suite, case, provider, id=f"{name}-{case.name}-{provider}")
          for name, suite in SUITES.items()
          for case in suite.cases(DEVICE, QUICK)
          for provider in suite.providers]


@pytest.mark.parametrize("suite,case,provider", PARAMS)
def test_benchmark(benchmark, suite, case, provider):
    harness.pytest_benchmark(benchmark, suite, case, provider, DEVICE)
