"""`pagedattn demo`: the main job in one command: `verify --quick`, then the seed's scenario
(`scenario incomplete-cache`). Exits non-zero if either fails."""

from __future__ import annotations

from .config import parse_device  # noqa: E402

import argparse

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--device", type=parse_device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from rich.console import Console

    from . import scenarios, verify

    console = Console()
    device, what = verify.best_device()
    if args.device:
        device = torch.device(args.device)
    console.rule("pagedattn demo")
    console.print(f"device: {device}; attention runs {what}\n"
                  "1. verify --quick: the seed's test grid (CPU-sized) against the reference, "
                  "both cache contracts\n"
                  "2. scenario incomplete-cache: the seed's bug planted, refused by checked mode, "
                  "diagnosed by forensics", highlight=False)
    verify_args = argparse.Namespace(quick=True, contract="both", device=str(device), seed=args.seed,
                                     filter="", json=None)
    verify_rc = verify.run(verify_args)
    scenario_args = argparse.Namespace(name="incomplete-cache", device=str(device), seed=args.seed,
                                       full=False, json=False)
    scenario_rc = scenarios.run(scenario_args)
    ok = verify_rc == 0 and scenario_rc == 0
    console.rule("[green]demo passed[/]" if ok else
                 f"[red]demo FAILED[/] (verify exit {verify_rc}, scenario exit {scenario_rc})")
    return 0 if ok else 1
