"""Shared-prefix (cascade) decode on the GPU: the standard workload (256 sequences sharing a 32k-token
prefix plus 512 own tokens each; 32 q heads, 8 KV heads, head 128, block 16, bf16) with cascade
against the same batch forced through the plain path, checked against the float64 reference and
torch SDPA on a subset of sequences; then the plain standard decode workloads planned with and
without the detection (it must cost them nothing). Writes $OUT/cascade_bench.json (or --out) and
prints a short table last.

    PYTHONPATH=src python scripts/cascade_bench.py            # H200: about 1-2 minutes
    TRITON_INTERPRET=1 PYTHONPATH=src python scripts/cascade_bench.py --dry   # CPU: tiny shapes, no timing
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pagedattn import AttentionOptions, PagedAttention, reference
from pagedattn.bench.runner import make_timer
from pagedattn.bench.workloads import build_paged, build_shared_prefix, load_workloads, shared_prefix_workload
from pagedattn.testing import geometry
from pagedattn.tolerances import default_tolerance

CHECK_SEQS = (0, 1, 128, 255)  # the sequences checked against the reference and SDPA


def new_planner(w, device) -> PagedAttention:
    """An unplanned PagedAttention of workload `w`'s geometry and dtype, default options."""
    return PagedAttention(AttentionOptions(), **geometry(w.config), dtype=w.config.dtype, device=device)


def planner(w, device, inputs, i, **plan_kw) -> PagedAttention:
    return plan(new_planner(w, device), w, inputs, i, **plan_kw)


def plan(attn, w, inputs, i, **plan_kw) -> PagedAttention:
    s, shape = inputs.sets[i], w.shape
    return attn.plan(
        s.cu_seqlens_q,
        s.seq_lens,
        s.block_table,
        query_lens_host=list(shape.query_lens),
        seq_lens_host=list(shape.seq_lens),
        **plan_kw,
    )


def host_us(fn, calls: int = 30) -> float:
    """Median host time of fn() in microseconds (plan() is host work: no sync needed)."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def rotate(calls):
    state = [0]

    def call():
        calls[state[0] % len(calls)]()
        state[0] += 1

    return call


def check_subset(w, inputs, out, ids) -> dict:
    """Relative errors of sequences `ids` of set 0 against the float64 reference and SDPA."""
    s, c = inputs.sets[0], w.config
    cu = s.cu_seqlens_q.tolist()
    rows = torch.tensor([cu[i] for i in ids], device=s.q.device)  # one query token per sequence
    index = torch.tensor(ids, device=s.q.device)
    q = s.q[rows]
    sub_cu = torch.arange(len(ids) + 1, dtype=torch.int32, device=s.q.device)
    ref = reference.attention(
        q,
        inputs.k_cache,
        inputs.v_cache,
        sub_cu,
        s.seq_lens[index],
        s.block_table[index],
        compute_dtype=torch.float64,
    )
    got = out[rows].double()
    atol, rtol = default_tolerance(c.dtype)
    ok_ref = bool(torch.allclose(got, ref, atol=atol, rtol=rtol)) and bool(torch.isfinite(got).all())
    seq_len = int(s.seq_lens[0])
    blocks = s.block_table[index, : -(-seq_len // c.block_size)].long()
    k = inputs.k_cache[blocks].flatten(1, 2)[:, :seq_len].transpose(1, 2)  # [B, kv_heads, seq_len, d]
    v = inputs.v_cache[blocks].flatten(1, 2)[:, :seq_len].transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None, :], k, v, enable_gqa=True)[:, :, 0]
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    return dict(
        ids=list(ids),
        rel_err_reference=rel(got, ref),
        rel_err_sdpa=rel(got, sdpa),
        rel_err_sdpa_vs_reference=rel(sdpa, ref),
        within_tolerance=ok_ref,
    )


def shared_prefix_rows(w, device, timers, dry: bool) -> dict:
    inputs = build_shared_prefix(w, device, num_sets=1 if dry else 2)
    n = len(inputs.sets)
    host_tables = [s.block_table.cpu() for s in inputs.sets]
    cascade = [planner(w, device, inputs, i, block_table_host=host_tables[i]) for i in range(n)]
    plain = [planner(w, device, inputs, i, shared_prefix=False) for i in range(n)]
    assert cascade[0]._cascade is not None, f"cascade not chosen: {cascade[0].explain()}"
    assert plain[0]._cascade is None
    outs = {}
    row = dict(name=w.name, explain_cascade=cascade[0].explain(), explain_plain=plain[0].explain())
    for label, attns in (("cascade", cascade), ("plain", plain)):
        calls = []
        for i, attn in enumerate(attns):
            s = inputs.sets[i]
            out = torch.full_like(s.q, float("nan"))
            calls.append(functools.partial(attn.run, s.q, inputs.k_cache, inputs.v_cache, out=out))
            calls[-1]()
            if i == 0:
                outs[label] = out
        if device != "cpu":
            torch.cuda.synchronize()
        row[f"{label}_all_written"] = bool(torch.isfinite(outs[label]).all())
        for mode, timer in timers.items():
            row[f"{label}_ms_{mode}"] = timer(rotate(calls))["ms"]
    ids = [i for i in CHECK_SEQS if i < w.num_seqs]
    row["check_cascade"] = check_subset(w, inputs, outs["cascade"], ids)
    row["check_plain"] = check_subset(w, inputs, outs["plain"], ids)
    row["max_abs_diff_cascade_vs_plain"] = float((outs["cascade"].float() - outs["plain"].float()).abs().max())
    row["plan_host_us_cascade"] = host_us(lambda: plan(cascade[0], w, inputs, 0, block_table_host=host_tables[0]))
    row["plan_host_us_plain"] = host_us(lambda: plan(plain[0], w, inputs, 0, shared_prefix=False))
    for mode in timers:
        row[f"speedup_{mode}"] = row[f"plain_ms_{mode}"] / row[f"cascade_ms_{mode}"]
    row["kv_bytes_plain"], row["kv_bytes_unique"] = w.kv_bytes, w.kv_bytes_unique
    return row


def plain_decode_rows(device, timers, dry: bool) -> list[dict]:
    """The standard decode workloads (no sharing) planned with the detection (block_table_host given)
    and without it (shared_prefix=False): run() must be the same launches, plan() barely slower."""
    return [plain_decode_row(w.scaled(256) if dry else w, device, timers) for w in load_workloads() if w.is_decode]


def plain_decode_row(w, device, timers) -> dict:
    inputs = build_paged(w, device, num_sets=1)
    s = inputs.sets[0]
    host_table = s.block_table.cpu()
    kw = dict(query_lens_host=list(w.shape.query_lens), seq_lens_host=list(w.shape.seq_lens))
    detect, off = new_planner(w, device), new_planner(w, device)

    def plan_detect():
        detect.plan(s.cu_seqlens_q, s.seq_lens, s.block_table, **kw, block_table_host=host_table)

    def plan_off():
        off.plan(s.cu_seqlens_q, s.seq_lens, s.block_table, **kw, block_table_host=host_table, shared_prefix=False)

    plan_detect()
    plan_off()
    assert detect._cascade is None, detect.explain()
    row = dict(name=w.name)
    out = torch.empty_like(s.q)
    for mode, timer in timers.items():
        # interleaved, twice each, to even out clocks
        t = [
            timer(functools.partial(a.run, s.q, inputs.k_cache, inputs.v_cache, out=out))["ms"]
            for a in (detect, off) * 2
        ]
        row[f"ms_{mode}_detect"], row[f"ms_{mode}_off"] = min(t[0], t[2]), min(t[1], t[3])
        row[f"ratio_{mode}"] = row[f"ms_{mode}_detect"] / row[f"ms_{mode}_off"]
    row["plan_host_us_detect"] = host_us(plan_detect)
    row["plan_host_us_off"] = host_us(plan_off)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for cascade_bench.json")
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    p.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    args = p.parse_args()
    device = "cpu" if args.dry else "cuda"
    if args.dry:
        w = shared_prefix_workload(
            num_seqs=8, prefix_len=64, own_len=9, num_q_heads=4, num_kv_heads=2, head_size=32, dtype=torch.float32
        )
        timers = {}
    else:
        w = shared_prefix_workload()
        timers = {
            "graph": make_timer(quick=args.quick, cuda_graph=True),
            "eager": make_timer(quick=args.quick, cuda_graph=False),
        }
    t0 = time.time()
    if args.dry:
        import pagedattn.planner as planner_module

        planner_module.PagedAttention.cascade_min_prefix = 16
        planner_module.PagedAttention.cascade_min_saved_keys = 64
    shared = shared_prefix_rows(w, device, timers, args.dry)
    torch.cuda.empty_cache() if device == "cuda" else None
    plain = plain_decode_rows(device, timers, args.dry)
    results = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter dry run)",
        torch=torch.__version__,
        seconds=time.time() - t0,
        shared_prefix=shared,
        plain_decode=plain,
    )
    out = Path(args.out) / "cascade_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"full results: {out}")
    print(f"cascade plan: {shared['explain_cascade']}")
    c = shared["check_cascade"]
    print(
        f"check {w.name} seqs {c['ids']}: rel err vs float64 reference {c['rel_err_reference']:.2e}, vs SDPA "
        f"{c['rel_err_sdpa']:.2e} (SDPA vs reference {c['rel_err_sdpa_vs_reference']:.2e}); within tolerance: "
        f"{c['within_tolerance']}; max |cascade - plain| {shared['max_abs_diff_cascade_vs_plain']:.2e}; "
        f"all written: {shared['cascade_all_written']}"
    )
    print(f"{'workload':34} {'mode':6} {'cascade/detect ms':>18} {'plain/off ms':>13} {'ratio':>7}  target")
    for mode in timers:
        print(
            f"{w.name:34} {mode:6} {shared[f'cascade_ms_{mode}']:18.4f} {shared[f'plain_ms_{mode}']:13.4f} "
            f"{shared[f'speedup_{mode}']:6.1f}x  >= 10x: {'PASS' if shared[f'speedup_{mode}'] >= 10 else 'FAIL'}"
        )
        for r in plain:
            print(
                f"{r['name']:34} {mode:6} {r[f'ms_{mode}_detect']:18.4f} {r[f'ms_{mode}_off']:13.4f} "
                f"{r[f'ratio_{mode}']:7.3f}  <= 1.01: {'PASS' if r[f'ratio_{mode}'] <= 1.01 else 'FAIL'}"
            )
    print(
        f"plan() host us: shared batch cascade {shared['plan_host_us_cascade']:.0f} / plain "
        f"{shared['plan_host_us_plain']:.0f}; "
        + ", ".join(f"{r['name']} {r['plan_host_us_detect']:.0f}/{r['plan_host_us_off']:.0f}" for r in plain)
        + f"; total {results['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
