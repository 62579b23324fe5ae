"""python -m bench list | run [SUITE...] [--device cpu|cuda] [--quick] [--out DIR] | plot SUITE... [--quick] [--out DIR]

`run` without suite names runs every suite that has cases for the device. Results go to
DIR/<device>/<suite>.json (DIR: --out, else $MRL_BENCH_RESULTS, else bench/results) with a .md table and a
.png plot beside it; `plot` redraws those two from the stored JSON of every device found under DIR.
Exit status 1 when a provider raised an error (skipped providers are not failures).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench import harness, report
from bench.suites import SUITES, get


def _list(args) -> int:
    for name, suite in SUITES.items():
        counts = ", ".join(f"{d}: {len(suite.cases(d, False))} cases" for d in ("cpu", "cuda"))
        print(f"{name}  baseline={suite.baseline}  providers={','.join(suite.providers)}  ({counts})")
    return 0


def _run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    names = args.suites or [n for n, s in SUITES.items() if s.cases(args.device, args.quick)]
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
    if args.device == "cpu" and load > cores / 2:
        # Other processes on the cores stall torch's OpenMP threads at every parallel op: small calls then
        # take whole scheduler slices (multiples of ~16 ms here) and the ratios mean nothing.
        print(f"warning: load average {load:.1f} on {cores} cores: CPU timings will be skewed by other work; "
              "do not commit them", file=sys.stderr)
    failed = False
    for name in names:
        suite = get(name)
        records = []
        for case_records in harness.run_suite(suite, args.device, quick=args.quick):
            path = report.save(suite, case_records, args.out, args.quick)  # stored case by case
            records += case_records
        if not records:
            print(f"{name}: no cases for {args.device}")
            continue
        print(report.table(report.document(suite, records)))
        print(f"\nwrote {path} and its .md and .png\n")
        failed |= any(r["status"] == "error" for r in records)
    return int(failed)


def _plot(args) -> int:
    found = False
    for name in args.suites:
        for path in sorted(Path(args.out).glob(f"*/{report.file_name(name, args.quick)}")):
            report.render(path)
            print(f"redrew {path.with_suffix('.md')} and {path.with_suffix('.png')}")
            found = True
    return 0 if found else 1


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=report.DEFAULT_ROOT, help="results root (default: %(default)s)")
    common.add_argument("--quick", action="store_true", help="tiny shapes and few reps: a smoke test")
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered suites")
    run = sub.add_parser("run", parents=[common], help="run suites and store their results")
    run.add_argument("suites", nargs="*", metavar="SUITE")
    run.add_argument("--device", choices=["cpu", "cuda"], default=harness.default_device())
    plot = sub.add_parser("plot", parents=[common], help="redraw tables and plots from stored results")
    plot.add_argument("suites", nargs="+", metavar="SUITE")
    args = parser.parse_args(argv)
    unknown = [n for n in getattr(args, "suites", []) if n not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    return {"list": _list, "run": _run, "plot": _plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
