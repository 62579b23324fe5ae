"""The driver shared by the prepared GPU scripts (bench/nested_ce_gpu.py, bench/search_gpu.py): a timer, and a
main that runs named steps, each under its own time limit, writing one JSON line per record (with the device
name and versions) to <out>/<name>.jsonl as it goes. A step is a generator fn(device, quick, deadline) of
dicts; a record with "error", "exact": False or a nonzero "returncode" makes the exit status 1."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def timer(device: str):
    """ms of one call of fn: triton's do_bench on a GPU (L2 flushed, median), one timed call on the CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=40)

    def once(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def main(prog: str, description: str, name: str, steps: dict, step_seconds: dict, argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: try the script out")
    parser.add_argument("--step", action="append", choices=list(steps), help="run only these steps (repeatable)")
    args = parser.parse_args(argv)
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.jsonl"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    env = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__, "quick": args.quick,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    failed = False
    with path.open("a") as f:
        for step in args.step or list(steps):
            deadline = time.monotonic() + step_seconds[step]
            try:
                for record in steps[step](args.device, args.quick, deadline):
                    failed |= "error" in record or record.get("exact") is False or record.get("returncode", 0) != 0
                    line = json.dumps({**env, **record})
                    print(line, flush=True)
                    f.write(line + "\n")
            except Exception as exc:
                failed = True
                line = json.dumps({**env, "step": step, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(line, flush=True)
                f.write(line + "\n")
    print(f"wrote {path}")
    return 1 if failed else 0
