"""`pagedattn bench`: the standard workloads on the current GPU (or `--dry-run` on the CPU)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workloads",
        default=None,
        metavar="NAME,...",
        help="comma-separated workload names (default: all of the bench's workloads.json)",
    )
    parser.add_argument(
        "--sweeps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the sweeps (default: on, off when --workloads or --host-only is given)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sweep variants")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, 1/64 scale, reference path: build everything, check the accounting, time nothing",
    )
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip comparing outputs with the reference"
    )
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip the dense SDPA peers")
    parser.add_argument(
        "--host-only",
        action="store_true",
        help="the host-time table only: plan(), run(), one-shot and SDPA host us per call (queued behind a "
        "GPU sleep), run()'s kernel time and the read ceiling; writes host.json and host.md (about 2-3 min "
        "for all workloads on an H200)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time CUDA-graph replays (triton do_bench_cudagraph) instead of single launches",
    )


def run(args) -> int:
    from ..bench.runner import run as run_bench

    return run_bench(args)
