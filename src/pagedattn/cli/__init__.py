"""The `pagedattn` command (also `python -m pagedattn`).

One module per subcommand (`verify`, `scenario`, `explain`, `compare`, `bench`, `demo`), each with
`add_arguments(parser)` and `run(args) -> int`: argument parsing and rendering live here, the
library modules they call return data. Nothing here imports torch or triton until a subcommand
runs, so `pagedattn --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help; the module is pagedattn.cli.<name>
SUBCOMMANDS = {
    "demo": "the first run: verify --quick, then the planted incomplete-cache bug caught",
    "verify": "run vLLM's test grid (or its CPU-sized copy) against the reference and print a table",
    "scenario": "plant a known fault and show its detection and diagnosis",
    "explain": "show which kernel runs for a configuration and batch, and why",
    "compare": "forensics from saved tensors: where OUT and REF differ, and the likely causes",
    "bench": "benchmark the standard workloads on the current GPU",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not "(default: None)" or a flag's "(default: False)", which say nothing."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedattn",
        formatter_class=HelpFormatter,
        description="Attention over a paged KV cache: check it, break it on purpose, explain it, time it.",
        epilog="On a machine without a GPU, set TRITON_INTERPRET=1 to run the Triton kernels through "
        "Triton's interpreter; otherwise the PyTorch reference runs. `pagedattn COMMAND --help` for more.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return int(args._run(args) or 0)
