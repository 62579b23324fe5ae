"""Command line: `python -m mrl_kernels demo`."""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mrl_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="train a nested classifier on scikit-learn's digits and print accuracy per dim")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo()


if __name__ == "__main__":
    main()
