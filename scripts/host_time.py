"""Host time per `paged_attention` call through the fast launch path and through Triton's own
(`launch.ALWAYS_TRITON`), alternating in one process: rounds of calls queued behind a GPU sleep,
so no call waits for the GPU. GPU only:

    python3 scripts/host_time.py [workload ...]      (pagedattn installed: pip install -e .)
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

from pagedattn import paged_attention
from pagedattn.bench.runner import host_times_us
from pagedattn.kernels import launch

# perf_quick.py beside this file builds the inputs (loaded by path: scripts/ is not a package)
_spec = importlib.util.spec_from_file_location("perf_quick", Path(__file__).with_name("perf_quick.py"))
perf_quick = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_quick)


def rounds(fn, calls: int = 20, repeats: int = 15) -> tuple[float, float]:
    """(min, median) over `repeats` rounds of the host time per call, in microseconds."""
    per_call = host_times_us(fn, "cuda", calls=calls, rounds=repeats)
    return min(per_call), statistics.median(per_call)


def main(names: list[str]) -> None:
    for name in names:
        w = next(w for w in perf_quick.WORKLOADS["workloads"] if w["name"] == name)
        q, k, v, cu, sl, bt, mq, ms, opts = perf_quick.build(w)
        out = torch.empty_like(q)
        fn = functools.partial(paged_attention, q, k, v, cu, sl, bt, max_query_len=mq, max_seq_len=ms, out=out, **opts)
        results: dict[bool, list] = {}
        for _ in range(3):
            for always_triton in (False, True):
                launch.ALWAYS_TRITON = always_triton
                results.setdefault(always_triton, []).append(rounds(fn))
        launch.ALWAYS_TRITON = False
        for always_triton, values in results.items():
            print(
                f"{name:20s} {'triton' if always_triton else 'fast  '} min {min(v[0] for v in values):6.1f} us  "
                f"median {statistics.median(v[1] for v in values):6.1f} us"
            )
        del q, k, v, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:] or ["decode-b64-ctx4k", "decode-b4-ctx32k", "prefill-b4-4k"])
