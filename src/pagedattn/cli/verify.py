"""`pagedattn verify`: vLLM's test grid (or its CPU-sized copy) against the reference, one line a
case while it runs, then a table of the failures only."""

from __future__ import annotations

import argparse
import json
import time

from ..text import plural
from ._args import add_device_and_rng_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="the CPU-sized grid: vLLM's configurations at small heads and lengths"
    )
    parser.add_argument("--contract", choices=["full", "context", "both"], default="both", help="cache contract(s)")
    add_device_and_rng_seed(parser)
    parser.add_argument("--filter", default="", help="only cases whose label contains this text")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")


def run_grid(args, console, *, progress_lines: bool = True) -> tuple[list, object, str]:
    """Run the grid `args` selects, printing one line a case (or one status line); returns
    (results, device, what runs there)."""
    import torch

    from .. import verify
    from ..config import seed_grid
    from ..testing import CONTRACTS

    device, what = verify.best_device()
    if args.device and torch.device(args.device).type != device.type:
        what = f"whatever dispatch picks on {args.device}"
    device = torch.device(args.device) if args.device else device
    contracts = CONTRACTS if args.contract == "both" else (args.contract,)
    cases = [c for c in seed_grid(quick=args.quick, seed=args.rng_seed) if args.filter in c.label()]
    jobs = [(case, contract) for case in cases for contract in contracts]
    console.print(
        f"[bold]pagedattn verify[/]: {plural(len(cases), 'case')} x {plural(len(contracts), 'contract')} "
        f"on {device}: {what}",
        highlight=False,
    )
    results = []
    if progress_lines:
        for case, contract in jobs:
            r = verify.run_case(case, device, contract, args.rng_seed)
            results.append(r)
            mark = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
            console.print(f"  {mark} {r.contract:7} {r.case}  ({r.seconds:.1f}s)", highlight=False)
        return results, device, what
    with console.status("") as status:
        for i, (case, contract) in enumerate(jobs):
            status.update(f"case {i + 1}/{len(jobs)}: {contract} {case.label()}")
            results.append(verify.run_case(case, device, contract, args.rng_seed))
    return results, device, what


def failure_table(results: list, device):
    """The failed cases only (a passing row would say 'pass' and nothing else)."""
    from rich.table import Table

    from ..config import dtype_name
    from ..testing import TOLERANCES

    table = Table(
        title=f"failures ({device}; tolerances by dtype: "
        + ", ".join(f"{dtype_name(k)} {v[0]:g}" for k, v in TOLERANCES.items())
        + ")"
    )
    for col in ("case", "contract", "kernel", "max abs err", "forensics"):
        table.add_column(col, overflow="fold")
    for r in results:
        if not r.passed:
            table.add_row(r.case, r.contract, r.kernel, f"{r.max_abs_err:.2e}", r.summary)
    return table


def summarize(results: list, device, console, seconds: float) -> bool:
    """The failure table (if any) and one summary line; True when every case passed."""
    failed = [r for r in results if not r.passed]
    if failed:
        console.print(failure_table(results, device))
    console.print(
        f"{len(results) - len(failed)} / {len(results)} passed in {seconds:.0f}s"
        + (f", {len(failed)} FAILED" if failed else ""),
        style="red" if failed else "green",
    )
    return not failed


def run(args) -> int:
    from rich.console import Console

    console = Console()
    start = time.perf_counter()
    results, device, what = run_grid(args, console)
    ok = summarize(results, device, console, time.perf_counter() - start)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), backend=what, results=[r.to_dict() for r in results]), f, indent=1)
    return 0 if ok else 1
