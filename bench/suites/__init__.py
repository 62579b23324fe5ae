"""Importing this package registers every suite with bench.harness."""
from bench.suites import nested_ce, prefix_norms, search  # noqa: F401
