"""Host time of plan(), run() and the one-shot call on the CPU, with every kernel launch replaced by
a no-op (`pagedattn.bench.host.stub_launches`): the Python around the launches, on a machine
without a GPU. The GPU host's numbers come from `pagedattn bench --host-only` (they add the C
launcher and the driver, a few us per launch).

    PYTHONPATH=src python3 scripts/host_microbench.py [workload,...]

Prints min / median over rounds of 100 calls (30 for plan and one-shot), in us of this thread's
CPU time per call (not wall time: the CPU may be shared). The metadata is on the CPU, so plan()
and the one-shot call validate the values on every call (on a GPU they do so only when host
copies of both lengths are given).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # plan the Triton kernels on the CPU (none runs)

import torch  # noqa: E402

from pagedattn.bench import host  # noqa: E402
from pagedattn.bench.workloads import build_paged, load_workloads  # noqa: E402


def best(fn, calls: int = 100, rounds: int = 15) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        times.append((time.thread_time() - start) / calls * 1e6)
    return min(times), statistics.median(times)


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    with host.stub_launches():
        for w in load_workloads():
            if not names or w.name in names:
                print(row(w), flush=True)


def row(w) -> str:
    inputs = build_paged(w, "cpu", num_sets=1, fill=False)
    s, k, v = inputs.sets[0], inputs.k_cache, inputs.v_cache
    attn = host.planner_for(inputs, "cpu")
    plan = host.plan_call(attn, inputs)
    plan()
    r = dict(
        plan=best(plan, 30, 7),
        run=best(lambda: attn.run(s.q, k, v, out=s.out)),
        run_alloc=best(lambda: attn.run(s.q, k, v)),
        oneshot=best(host.oneshot_call(inputs), 30, 9),
    )
    attn.run(s.q, k, v, out=s.out)
    cells = "  ".join(f"{n} {a:6.1f}/{m:6.1f}" for n, (a, m) in r.items())
    return f"{w.name:28s} {cells}  launches {host.launches_of(attn)}"


if __name__ == "__main__":
    main([n for a in sys.argv[1:] for n in a.split(",") if n])
