"""`pagedattn scenario NAME`: plant a known fault, show what checked mode and forensics say."""

from __future__ import annotations

import argparse
import json

from ._args import add_device_and_rng_seed, resolve_device


class _ScenarioNames:
    """argparse choices read from `pagedattn.scenarios` only when a value is checked or help is shown."""

    def _names(self) -> list[str]:
        from ..scenarios import SCENARIOS

        return [*SCENARIOS, "list", "all"]

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        choices=_ScenarioNames(),
        metavar="NAME",
        help="a scenario ('pagedattn scenario list' names them), 'list' or 'all'",
    )
    add_device_and_rng_seed(parser)
    parser.add_argument(
        "--full", action="store_true", help="vLLM's test sizes (64 heads x 128, lengths up to 1024); meant for CUDA"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead")


def backend_words(device) -> str:
    """What `pagedattn.attention` runs on `device`, in words."""
    from .. import dispatch

    if dispatch.choose_backend(device, "auto")[0] == "reference":
        return "the PyTorch reference, not a kernel (no CUDA, TRITON_INTERPRET unset)"
    return "Triton kernels" + (" (interpreter)" if device.type == "cpu" else "")


def print_result(result, console, *, compact: bool = False) -> None:
    """The planted fault, what checked mode said, forensics' report (`compact`: its one-line summary
    and top cause instead of the tables), the repaired run and the verdict."""
    from rich.panel import Panel
    from rich.text import Text

    verdict = (
        f"[green]ok[/]: top diagnosis {result.top} = planted cause"
        if result.ok
        else f"[red]FAILED[/]: top diagnosis {result.top}, planted {result.expected}"
        + (", and checked mode did not refuse the inputs" if result.checked_raised is False else "")
    )
    console.print(Panel(Text(result.planted), title=f"scenario {result.name}: planted", title_align="left"))
    console.print(
        Panel(
            Text(result.checked),
            title="checked mode",
            title_align="left",
            border_style="green" if result.checked_raised else "yellow",
        )
    )
    report = result.report
    if compact and report.top is not None:
        body = Text(
            f"{report.summary()}\nlikely cause: {report.top.id}: {report.top.evidence}\n"
            f"(`pagedattn scenario {result.name}` prints the whole report)"
        )
    else:
        body = report.render()
    console.print(Panel(body, title="forensics (checked mode off)", title_align="left"))
    if result.fixed:
        console.print(Text(result.fixed, style="green" if "clean" in result.fixed else "red"))
    console.print(verdict, highlight=False)


def run(args) -> int:
    from rich.console import Console

    from ..scenarios import SCENARIOS, run_scenario

    console = Console()
    if args.name == "list":
        for name, (_, about) in SCENARIOS.items():
            console.print(f"{name:22} {about}", highlight=False)
        return 0
    device = resolve_device(args.device)
    names = list(SCENARIOS) if args.name == "all" else [args.name]
    if not args.json:
        console.print(f"on {device}, pagedattn.attention runs {backend_words(device)}", highlight=False)
    results = []
    for name in names:
        if not args.json:
            console.rule(name)
        result = run_scenario(name, device, args.rng_seed, args.full)
        results.append(result)
        if not args.json:
            print_result(result, console)
    if args.json:
        print(json.dumps([r.to_dict() for r in results] if len(results) > 1 else results[0].to_dict(), indent=1))
    return 0 if all(r.ok for r in results) else 1
