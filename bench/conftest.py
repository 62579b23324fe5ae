"""pytest.ini's addopts carry --benchmark-disable so that unit-test runs never time anything; here
--benchmark-only means "run the benchmarks", which pytest-benchmark otherwise refuses as a conflict."""


def pytest_configure(config):
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True
