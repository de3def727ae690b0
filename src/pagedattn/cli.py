"""The `pagedattn` command (also `python -m pagedattn`).

Each subcommand lives in the module that owns the concept; that module provides
`add_arguments(parser)` and `run(args) -> int`. This file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("pagedattn.demo", "the main job: verify --quick, then the seed scenario"),
    "verify": ("pagedattn.verify", "run a grid of configurations against the reference and print a table"),
    "scenario": ("pagedattn.scenarios", "plant a known fault and show its detection and diagnosis"),
    "explain": ("pagedattn.dispatch", "show which kernel runs for a configuration and batch, and why"),
    "bench": ("benchmarks.runner", "benchmark the standard workloads on the current GPU"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return int(args._run(args) or 0)
