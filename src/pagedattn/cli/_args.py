"""argparse types and shared options for the subcommands; torch is imported only when a value is parsed."""

from __future__ import annotations

import argparse


def device(value: str):
    """--device: a torch device name ("cpu", "cuda", "cuda:1")."""
    import torch

    try:
        return torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"--device must be a torch device such as cpu or cuda, got {value!r}"
        ) from None


def lengths(value: str) -> tuple[int, ...]:
    """Comma-separated lengths: ints >= 0."""
    try:
        lens = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 0, got {value!r}") from None
    if any(n < 0 for n in lens):
        raise argparse.ArgumentTypeError(f"lengths must be >= 0, got {value!r}")
    return lens


def add_device_and_rng_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=device, default=None, help="where to run (default: cuda if available, else cpu)"
    )
    parser.add_argument("--rng-seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--seed", type=int, dest="rng_seed", help=argparse.SUPPRESS)  # the old spelling


def resolve_device(value):
    """The --device value, or cuda if available, else cpu."""
    import torch

    if value is not None:
        return torch.device(value)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
