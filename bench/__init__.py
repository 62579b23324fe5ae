"""Benchmarks for mrl_kernels: `python -m bench --help`; see harness.py for how things are measured."""
