"""Importing this package registers every suite with bench.harness."""
from bench.suites import prefix_norms  # noqa: F401
