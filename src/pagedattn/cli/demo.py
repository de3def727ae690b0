"""`pagedattn demo`: the first run. Checks vLLM's test grid (CPU-sized) against the reference, then
plants the bug of docs/origin-analysis.md and shows it caught. Exits non-zero if either fails."""

from __future__ import annotations

import argparse
import time

from ._args import add_device_and_rng_seed, resolve_device

SEED_SCENARIO = "incomplete-cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_device_and_rng_seed(parser)


def run(args) -> int:
    from rich.console import Console

    from .. import dispatch
    from ..config import seed_grid
    from ..scenarios import run_scenario
    from . import scenario, verify

    console = Console()
    device = resolve_device(args.device)
    backend = scenario.backend_words(device)
    interpreted = device.type == "cpu" and dispatch.interpreter_enabled()
    num_configs = len(seed_grid(quick=True))
    console.rule("pagedattn demo")
    console.print(
        f"on {device}, attention runs {backend}. "
        + (
            "This takes about 5 minutes on 2 CPU cores (the interpreter runs each kernel program in Python). "
            if interpreted
            else "This takes under a minute. "
        )
        + "What is checked:\n"
        f" 1. vLLM's chunked-prefill test grid ({num_configs} configurations, CPU-sized) x both cache contracts: "
        "each output against the PyTorch reference, with checked mode on and the cache and output NaN-poisoned\n"
        " 2. the bug that started this library (docs/origin-analysis.md): one decode token's K/V never written "
        "to the cache. Checked mode must refuse the inputs, and forensics must name the cause from the output alone",
        highlight=False,
    )
    console.rule("1. verify --quick")
    start = time.perf_counter()
    grid = argparse.Namespace(quick=True, contract="both", device=device, rng_seed=args.rng_seed, filter="")
    results, device, _ = verify.run_grid(grid, console, progress_lines=False)
    verify_ok = verify.summarize(results, device, console, time.perf_counter() - start)
    console.rule(f"2. scenario {SEED_SCENARIO}")
    result = run_scenario(SEED_SCENARIO, device, args.rng_seed)
    scenario.print_result(result, console, compact=True)
    ok = verify_ok and result.ok
    console.rule(
        "[green]demo passed[/]"
        if ok
        else f"[red]demo FAILED[/] (verify {'ok' if verify_ok else 'failed'}, "
        f"scenario {'ok' if result.ok else 'failed'})"
    )
    return 0 if ok else 1
