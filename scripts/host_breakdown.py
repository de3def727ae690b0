"""Where run()'s host time goes, on a GPU host: each layer of one run() timed alone, in one process,
with the same method as `pagedattn bench --host-only` (calls queued behind a GPU sleep, median of
rounds; `pagedattn.bench.host.queued_host_times_us`).

    PYTHONPATH=src python3 scripts/host_breakdown.py [--workloads a,b] [--out DIR]

Columns, us per call:
  run        attn.run(q, k, v, out=out): the whole per-layer call
  python     the same with every launch replaced by a no-op (key, lookup, overlap check, pointers)
  launches   the plan's BoundLaunch calls alone (stream lookup, argument list, C launcher, driver)
  raw        the compiled launchers alone, argument lists prepared (C launcher + driver only)
  old        the older method (run 3's scripts/planner_bench.py: 5 rounds of 200 calls) on run()
  empty1     an empty Triton kernel with 1 pointer argument through `Compiled` (the floor per launch)
  empty60    the same kernel shape with 60 runtime arguments (what an argument costs)
  torch_add  a tiny torch op (the framework's own launch floor)
  sdpa       torch SDPA on the same data made dense (the peer)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton

from pagedattn.bench import host
from pagedattn.bench.workloads import build_dense, build_paged, load_workloads
from pagedattn.kernels.launch import FastKernel

DEFAULT = "decode-b64-ctx4k,decode-b4-ctx32k,prefill-b4-4k,mixed-chunk2k-plus-63dec"


@triton.jit
def _empty1(x_ptr):
    pass


@triton.jit
def _empty60(
    x_ptr,
    a0,
    a1,
    a2,
    a3,
    a4,
    a5,
    a6,
    a7,
    a8,
    a9,
    a10,
    a11,
    a12,
    a13,
    a14,
    a15,
    a16,
    a17,
    a18,
    a19,  # fmt: skip
    a20,
    a21,
    a22,
    a23,
    a24,
    a25,
    a26,
    a27,
    a28,
    a29,
    a30,
    a31,
    a32,
    a33,
    a34,
    a35,
    a36,
    a37,  # fmt: skip
    a38,
    a39,
    a40,
    a41,
    a42,
    a43,
    a44,
    a45,
    a46,
    a47,
    a48,
    a49,
    a50,
    a51,
    a52,
    a53,
    a54,
    a55,  # fmt: skip
    a56,
    a57,
    a58,  # fmt: skip
):
    pass


def old_method_us(fn, device, calls: int = 200, rounds: int = 5) -> float:
    """Run 3's method: 5 rounds of 200 calls, each round behind one GPU sleep long enough for all."""
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(rounds):
        torch.cuda._sleep(1 << 28)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize(device)
    return statistics.median(times)


def breakdown(w, device) -> dict:
    """One workload's row: run() and each of its layers, us per call."""
    q_us = lambda fn: host.queued_host_us(fn, device)  # noqa: E731
    inputs = build_paged(w, device)
    s = inputs.sets[0]
    attn = host.planner_for(inputs, device)
    host.plan_call(attn, inputs)()
    k, v = inputs.k_cache, inputs.v_cache

    def run():
        attn.run(s.q, k, v, out=s.out)

    run()
    run()  # the second call: every launch on the fast path
    binding = list(attn._bindings.values())[-1]
    ptrs = (s.q.data_ptr(), s.out.data_ptr(), k.data_ptr(), v.data_ptr(), s.q.data_ptr(), s.q.data_ptr())
    ptrs = ptrs + tuple(t.data_ptr() for t in attn._scales)
    tensors = (s.q, s.out, k, v, s.q, s.q, *attn._scales)

    def launches():
        for launch in binding.launches:
            launch(ptrs, tensors)

    # the raw launcher calls, argument lists prepared once (what is left: C launcher + driver)
    raws = []
    for launch in binding.launches:
        fn, template, positions, dev = next(iter(launch._compiled.values()))
        call = template.copy()
        call[3] = torch._C._cuda_getCurrentRawStream(dev)
        for at, i in positions:
            call[at] = ptrs[i]
        raws.append((fn, call))

    def raw():
        for fn, call in raws:
            fn(*call)

    row = dict(workload=w.name, launches=len(binding.launches))
    row["run"] = q_us(run)
    saved = binding.launches
    binding.launches = [lambda ptrs, tensors: None for _ in saved]
    try:
        row["python"] = q_us(run)
    finally:
        binding.launches = saved
    row["launches_us"] = q_us(launches)
    row["raw"] = q_us(raw)
    row["old"] = old_method_us(run, device)
    row["sdpa"] = host.sdpa_host_us(build_dense(inputs, 0), device)
    del inputs
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=DEFAULT)
    p.add_argument("--out", default="out/host-breakdown")
    args = p.parse_args()
    device = torch.device("cuda")
    q_us = lambda fn: host.queued_host_us(fn, device)  # noqa: E731

    x = torch.zeros(16, device=device)
    e1, e60 = FastKernel(_empty1), FastKernel(_empty60)
    ints = list(range(1, 60))
    floors = dict(
        empty1=q_us(lambda: e1[(1,)](x)),
        empty60=q_us(lambda: e60[(1,)](x, *ints)),
        torch_add=q_us(lambda: x.add_(1.0)),
    )
    wanted = args.workloads.split(",")
    rows = [breakdown(w, device) for w in load_workloads() if w.name in wanted]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_breakdown.json").write_text(json.dumps(dict(floors=floors, rows=rows), indent=1))
    print(f"floors (us per call): {', '.join(f'{k} {v:.1f}' for k, v in floors.items())}")
    cols = ["run", "python", "launches_us", "raw", "old", "sdpa"]
    print(f"{'workload':28s} {'n':>2s} " + " ".join(f"{c:>11s}" for c in cols))
    for r in rows:
        print(f"{r['workload']:28s} {r['launches']:2d} " + " ".join(f"{r[c]:11.1f}" for c in cols))


if __name__ == "__main__":
    main()
