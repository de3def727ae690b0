#!/usr/bin/env python3
"""Every bad-metadata case of `pagedattn.catalogue`, unvalidated, through every entry point it
applies to, plus the valid batch through each: no crash, nothing written outside any tensor
(guard margins), NaN rows for the bad sequences, reference rows for the others. One line a run,
then a summary; exit status 1 if any run broke a promise.

On an H200 (memcheck proves no access outside an allocation; without the caching allocator every
tensor is its own allocation, so an overrun cannot land in a neighbour):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python3 scripts/sanitize_catalogue.py 2>&1 | tee catalogue-memcheck.log

On a CPU, through Triton's interpreter (the same checks, no sanitizer):

    TRITON_INTERPRET=1 python3 scripts/sanitize_catalogue.py --select ci

A run that takes longer than --timeout seconds ends the process with a traceback (a kernel
looping on a huge seq_len cannot be interrupted from Python); the last "start" line names it,
and --skip CASE leaves it out of the next attempt.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time

import torch

from pagedattn import catalogue as cat
from pagedattn.catalogue_run import check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--select",
        choices=("full", "ci"),
        default="full",
        help="full: every case through every entry point (default); ci: each kernel case once",
    )
    parser.add_argument("--entry", action="append", help="only these entry points")
    parser.add_argument("--case", action="append", help="only these cases ('valid' = the base batch)")
    parser.add_argument("--skip", action="append", default=[], help="leave these cases out")
    parser.add_argument(
        "--validated",
        action="store_true",
        help="also run every case validated (the error class and the argument named)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a run may take (default 120)")
    parser.add_argument("--verbose-start", action="store_true", help="print a 'start' line before each run")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("on a CPU, set TRITON_INTERPRET=1: without it the library runs its PyTorch reference, not a kernel")
        return 2
    if device.type == "cuda":
        print(
            f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
            f"PYTORCH_NO_CUDA_MEMORY_CACHING={os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING', '(unset)')}",
            flush=True,
        )
    cases = [c for c in (args.case or ["valid", *cat.CASES_BY_NAME]) if c not in args.skip]
    runs = [(r, False) for r in cat.planned_runs(args.entry, cases, "both", args.select)]
    if args.validated:
        runs += [((c, e, "user"), True) for c, e in cat.applicable(args.entry, cases)]
    print(f"{len(cat.CASES)} cases in the catalogue; {len(runs)} runs", flush=True)

    failures = []
    started = time.perf_counter()
    for (case, entry, out_mode), validated in runs:
        label = ("validated " if validated else "") + cat.run_label(case, entry, out_mode)
        if args.verbose_start:
            print(f"start {label}", flush=True)
        faulthandler.dump_traceback_later(args.timeout, exit=True)  # a hang ends the process, named
        t0 = time.perf_counter()
        try:
            problems = check(case, entry, device, validate=validated, out_mode=out_mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (a harness error fails the run, the others go on)
            problems = [f"harness error {type(e).__name__}: {e}"]
        finally:
            faulthandler.cancel_dump_traceback_later()
        seconds = time.perf_counter() - t0
        if problems:
            failures.append((label, problems))
        print(f"{'FAIL' if problems else 'ok  '} {label:70} {seconds:6.2f}s  {'; '.join(problems)}", flush=True)

    total = time.perf_counter() - started
    print(
        f"\n{len(runs) - len(failures)} of {len(runs)} runs kept every promise, {len(failures)} failed ({total:.0f} s)",
        flush=True,
    )
    for label, problems in failures:
        print(f"  FAIL {label}: {'; '.join(problems)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
