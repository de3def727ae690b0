"""`pagedattn bench`: the standard workloads on the current GPU, as ratios to ceilings and peers
measured in the same process.

    1. ceilings: read bandwidth (a streaming-read Triton kernel over 2 GiB, `kernels/stream.py`;
       torch.sum beside it; the datasheet figure where the GPU is known), copy bandwidth (1 GiB
       device copy, bytes read + written), bf16 matmul (8192^3), each the median of
       triton.testing.do_bench. Percentages of read bandwidth are of the best measured read.
    2. workloads.json's workloads through `paged_attention` (full-cache contract), rotating among
       2-4 batches over disjoint blocks; K/V TB/s and TFLOP/s as % of the ceilings; the ratio to
       the vLLM anchor time; dense SDPA (flash, cuDNN) on the same data as the in-run peer; host
       time per call (`bench/host.py`: calls queued behind a GPU sleep) of `PagedAttention.plan`,
       `.run`, the one-shot `paged_attention` and the SDPA peer
    3. sweeps around one decode and one prefill workload (dtype, head size, GQA ratio, block
       size, fp8 KV), each variant's % of its roofline and its ratio to the best in its sweep
Writes results.json and roofline.png under --out; prints the table last. `--host-only`: the
host-time table alone (see `run_host`). Ratios "x peer" are
peer time / our time: above 1 we are faster. `--dry-run` runs everything at 1/64 scale on the CPU
through the PyTorch reference, checks the accounting and the dense peers' masks, times nothing.
"""

from __future__ import annotations

import datetime
import functools
import gc
import itertools
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels.stream import stream_programs, stream_sum
from ..testing import capture_graph, random_tensor
from . import host as host_time
from .workloads import (
    Sweep,
    Workload,
    build_dense,
    build_paged,
    dense_attention,
    input_bytes,
    load_workloads,
    lower_right_mask,
    paged_rows,
    reference_ceilings,
    rel_err,
    repeat_kv,
    sweeps,
)

GiB = 1 << 30
PEER_BACKENDS = ("flash", "cudnn")
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3}  # ||out - ref|| / ||ref||
CHECK_SEQS = 4  # the output check compares the first and the last CHECK_SEQS sequences with the reference
L2_FALLBACK = 50 * 2**20


# ---------------------------------------------------------------------------------------------
# timing and ceilings
# ---------------------------------------------------------------------------------------------
def make_timer(*, quick: bool, cuda_graph: bool) -> Callable[[Callable], dict]:
    """fn -> {"ms": median, "ms_p20", "ms_p80", "reps"} through triton's event timers (do_bench
    flushes L2 before every call; do_bench_cudagraph times replays of a captured loop)."""
    import triton.testing

    warmup, rep = (10, 40) if quick else (25, 200)

    def timer(fn: Callable) -> dict:
        fn()
        torch.cuda.synchronize()
        if cuda_graph:
            times = triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="all")
        else:
            times = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
        torch.cuda.synchronize()
        times = sorted(times)
        pick = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        return dict(ms=statistics.median(times), ms_p20=pick(0.2), ms_p80=pick(0.8), reps=len(times))

    return timer


# datasheet read bandwidth (TB/s) by a substring of torch.cuda.get_device_name()
DATASHEET_READ_TBS = {"H200": 4.8, "H100 80GB HBM3": 3.35, "A100-SXM4-80GB": 2.039}


def datasheet_read_tbs(device_name: str) -> float | None:
    return next((tbs for key, tbs in DATASHEET_READ_TBS.items() if key in device_name), None)


def measure_ceilings(timer: Callable, device="cuda", *, read_bytes: int = 2 * GiB, others: bool = True) -> dict:
    """read_tbs: the best of the streaming-read kernel and torch.sum (fp32, bf16) over
    `read_bytes`; read_source names it; read_tbs_datasheet beside it (None: unknown GPU).
    With `others`: copy_tbs and mm_tflops too."""
    out = {}
    x = random_tensor((read_bytes // 2,), torch.bfloat16, device)
    partials = torch.empty(stream_programs(x.numel()), dtype=torch.float32, device=device)
    out["read_tbs_stream"] = x.nbytes / timer(functools.partial(stream_sum, x, partials))["ms"] / 1e9
    out["read_tbs_sum_bf16"] = x.nbytes / timer(functools.partial(torch.sum, x))["ms"] / 1e9
    del x, partials
    _free(device)
    x = random_tensor((read_bytes // 4,), torch.float32, device)
    out["read_tbs_sum_fp32"] = x.nbytes / timer(functools.partial(torch.sum, x))["ms"] / 1e9
    del x
    _free(device)
    source = max(("read_tbs_stream", "read_tbs_sum_bf16", "read_tbs_sum_fp32"), key=out.__getitem__)
    out["read_tbs"], out["read_source"] = out[source], source
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
    out["read_tbs_datasheet"] = datasheet_read_tbs(name)
    if not others:
        return out
    src = random_tensor((read_bytes // 4,), torch.bfloat16, device)
    dst = torch.empty_like(src)
    out["copy_tbs"] = 2 * src.nbytes / timer(functools.partial(dst.copy_, src))["ms"] / 1e9
    del src, dst
    _free(device)
    n = 8192
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    c = torch.empty_like(a)
    out["mm_tflops"] = 2 * n**3 / timer(functools.partial(torch.mm, a, b, out=c))["ms"] / 1e9
    del a, b, c
    _free(device)
    return out


def metrics(ms: float, kv_bytes: int, flops: int, ceilings: dict) -> dict:
    tbs, tflops = kv_bytes / ms / 1e9, flops / ms / 1e9
    attainable = min(ceilings["mm_tflops"], flops / kv_bytes * ceilings["read_tbs"])  # the roofline
    return dict(
        tb_per_s=tbs,
        pct_read_bw=100 * tbs / ceilings["read_tbs"],
        tflop_per_s=tflops,
        pct_mm=100 * tflops / ceilings["mm_tflops"],
        pct_roofline=100 * tflops / attainable,
    )


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _rotate(calls: list[Callable]) -> Callable:
    it = itertools.cycle(calls)
    return lambda: next(it)()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# one workload
# ---------------------------------------------------------------------------------------------
@dataclass
class Bench:
    device: str = "cuda"
    backend: str = "auto"  # paged_attention's backend; "reference" for CPU dry runs
    timer: Callable[[Callable], dict] | None = None  # None: run once, time nothing
    ceilings: dict | None = None
    check: bool = True
    peers: tuple[str, ...] = PEER_BACKENDS
    host_calls: int = host_time.CALLS  # host time: calls per round, rounds (CUDA only)
    host_rounds: int = 9

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def num_sets(self, w: Workload) -> int:
        """2-4 batches so one pass over all of them reads >= 4x L2, as memory allows."""
        if torch.device(self.device).type != "cuda":
            return 1  # nothing to time; count_accounting builds two sets to check they are disjoint
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or L2_FALLBACK
        n = min(4, max(2, math.ceil(4 * l2 / w.kv_bytes)))
        free = torch.cuda.mem_get_info(self.device)[0]
        copies = 2 if self.peers else 1  # the dense peer holds a gathered copy of every set
        while n > 1 and copies * input_bytes(w, n) > 0.8 * free:
            n -= 1
        if input_bytes(w, n) > 0.8 * free:
            raise MemoryError(f"{w.name} needs {input_bytes(w, n) / GiB:.1f} GiB, {free / GiB:.1f} GiB free")
        return n

    def run_workload(self, w: Workload, *, sweep: Sweep | None = None) -> dict:
        row = dict(
            name=w.name,
            kind="sweep" if sweep else "workload",
            config=w.describe(),
            kv_bytes=w.kv_bytes,
            flops=w.flops,
            intensity=w.intensity,
            plan=self.plan(w),
        )
        if sweep:
            row.update(sweep=sweep.name, base=sweep.base)
        if w.expected_flops is not None:
            row["matches_workloads_json"] = (w.kv_bytes_bf16, w.flops) == (w.expected_kv_bytes_bf16, w.expected_flops)
        if torch.device(self.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        inputs = None
        try:
            inputs = build_paged(w, self.device, num_sets=self.num_sets(w))
            row["num_sets"] = len(inputs.sets)
            self.run_ours(w, inputs, row)
            if self.timer and self.on_cuda and not sweep and "error" not in row:
                try:  # the planner's host time: plan, run, run allocating out, one-shot (set 0)
                    row.update(
                        host_time.measure_planner_host(
                            inputs, self.device, backend=self.backend, calls=self.host_calls, rounds=self.host_rounds
                        )
                    )
                except Exception as e:
                    row["host_error"] = _error(e)
            if self.peers and not sweep:
                row["peers"] = self.run_peers(inputs, row)
        except Exception as e:  # an OOM or a failing kernel costs one row, not the run
            row["error"] = _error(e)
        finally:
            del inputs
            _free(self.device)
        if torch.device(self.device).type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / GiB
        return row

    def plan(self, w: Workload) -> str:
        from .. import dispatch

        try:
            p = dispatch.plan_for(w.config, w.shape, device=self.device, backend=self.backend)
            return f"{p.kernel} {p.params()}"
        except Exception as e:
            return f"plan failed: {_error(e)}"

    def run_ours(self, w: Workload, inputs, row: dict) -> None:
        calls = [functools.partial(inputs.call, i, self.backend) for i in range(len(inputs.sets))]
        try:
            for call in calls:  # every set once: compiles, and writes every out (poisoned with NaN)
                call()
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize(self.device)
            row["all_written"] = all(bool(torch.isfinite(s.out).all()) for s in inputs.sets)
            if self.timer:
                row.update(self.timer(_rotate(calls)))
                row.update(metrics(row["ms"], w.kv_bytes, w.flops, self.ceilings))
                if self.on_cuda:  # host time of the one-shot call, rotating the sets
                    row["host_us"] = statistics.median(
                        host_time.queued_host_times_us(
                            _rotate(calls), self.device, calls=self.host_calls, rounds=self.host_rounds
                        )
                    )
                anchors = {k: dict(ms=a["ms"], ratio=a["ms"] / row["ms"]) for k, a in w.anchors.items() if "ms" in a}
                if anchors:
                    row["anchors"] = anchors
        except Exception as e:
            row["error"] = _error(e)
            return
        if self.check:
            try:
                row["check"] = self.check_output(inputs)
            except Exception as e:
                row["check"] = dict(ok=False, error=_error(e))

    def check_output(self, inputs) -> dict:
        """Relative error of the first and last CHECK_SEQS sequences of set 0 against the reference."""
        from .. import reference

        s, n = inputs.sets[0], inputs.shape.num_seqs
        ids = sorted(set(range(min(CHECK_SEQS, n))) | set(range(max(0, n - CHECK_SEQS), n)))
        cu = s.cu_seqlens_q.tolist()
        rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in ids]).to(s.q.device)
        sub_cu = [0]
        for i in ids:
            sub_cu.append(sub_cu[-1] + cu[i + 1] - cu[i])
        index = torch.tensor(ids, device=s.q.device)
        ref = reference.attention(
            s.q[rows],
            inputs.k_cache,
            inputs.v_cache,
            torch.tensor(sub_cu, dtype=torch.int32, device=s.q.device),
            s.seq_lens[index],
            s.block_table[index],
            k_scale=inputs.k_scale,
            v_scale=inputs.v_scale,
        )
        err, tol = rel_err(s.out[rows], ref), TOLERANCE[inputs.config.dtype]
        return dict(ok=err <= tol, rel_err=err, tol=tol, seqs=ids)

    def run_peers(self, inputs, row: dict) -> dict:
        """Dense SDPA per (query_len, ctx_len) group on the same data; ms is the sum over groups."""
        cu = inputs.sets[0].cu_seqlens_q.tolist()
        ours = inputs.sets[0].out if row.get("all_written") else None
        result = {}
        for backend in self.peers:
            entry: dict = {}
            try:
                dense = [build_dense(inputs, i) for i in range(len(inputs.sets))]
                entry["groups"] = len(dense[0])
                try:
                    first = [dense_attention(g, backend) for g in dense[0]]
                except RuntimeError as e:
                    if dense[0][0].k.shape[1] == dense[0][0].q.shape[1]:
                        raise
                    entry["note"] = f"enable_gqa refused ({_error(e)[:120]}): K/V repeated to num_q_heads"
                    dense = [[repeat_kv(g) for g in groups] for groups in dense]
                    first = [dense_attention(g, backend) for g in dense[0]]
                if ours is not None:
                    entry["rel_err_vs_ours"] = max(rel_err(o, paged_rows(ours, cu, g)) for o, g in zip(first, dense[0]))
                del first
                if self.timer and self.on_cuda:  # the peer's host time: one call per group
                    entry["host_us"] = host_time.sdpa_host_us(
                        dense[0], self.device, backend, calls=self.host_calls, rounds=self.host_rounds
                    )
                if self.timer:
                    entry["ms"] = sum(
                        self.timer(
                            _rotate([functools.partial(dense_attention, groups[j], backend) for groups in dense])
                        )["ms"]
                        for j in range(len(dense[0]))
                    )
                    if row.get("ms"):
                        entry["ratio"] = entry["ms"] / row["ms"]
            except Exception as e:
                entry["error"] = _error(e)
            finally:
                dense = None
                _free(self.device)
            result[backend] = entry
        return result


def rank_sweeps(rows: list[dict]) -> None:
    """vs_best = this variant's % of roofline / the best in its (sweep, base); fastest = best ms / ms."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "sweep" and r.get("pct_roofline"):
            groups.setdefault((r["sweep"], r["base"]), []).append(r)
    for group in groups.values():
        best, fastest = max(r["pct_roofline"] for r in group), min(r["ms"] for r in group)
        for r in group:
            r["vs_best"], r["vs_fastest"] = r["pct_roofline"] / best, fastest / r["ms"]


# ---------------------------------------------------------------------------------------------
# dry run: 1/64 scale on the CPU, accounting checked by counting, no timing
# ---------------------------------------------------------------------------------------------
def count_accounting(w: Workload) -> dict:
    """K/V bytes and attended pairs counted from built inputs: distinct cache slots each sequence's
    block table maps its positions to, and the ones of each sequence's causal mask."""
    inputs = build_paged(w, "cpu", num_sets=2, fill=False)
    bs, slots = w.config.block_size, []
    for s in inputs.sets:
        table, seq_lens = s.block_table.long(), s.seq_lens.tolist()
        for i, seq_len in enumerate(seq_lens):
            pos = torch.arange(seq_len)
            slots.append(table[i, pos // bs] * bs + pos % bs)
    slots = torch.cat(slots)
    per_token = inputs.k_cache[0, 0].numel() * inputs.k_cache.element_size()
    pairs = sum(int(lower_right_mask(q, q + c, "cpu").sum()) for q, c in zip(w.shape.query_lens, w.shape.ctx_lens))
    return dict(
        kv_bytes=2 * (slots.numel() // len(inputs.sets)) * per_token,
        pairs=pairs,
        slots_distinct=torch.unique(slots).numel() == slots.numel(),
    )


def dry_run(
    workloads: list[Workload], sweep_list: list[Sweep], console, factor: int = 64
) -> tuple[list[dict], list[str]]:
    bench = Bench(device="cpu", backend="reference", timer=None, check=True, peers=("math",))
    rows, problems = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: extra threads only contend (35 s -> 1.5 s on 2 busy cores)
    try:
        for w, sweep in [(w, None) for w in workloads] + [(v, s) for s in sweep_list for v in s.variants]:
            _dry_run_one(bench, w, sweep, factor, rows, problems, console)
    finally:
        torch.set_num_threads(threads)
    return rows, problems


def _dry_run_one(
    bench: Bench, w: Workload, sweep: Sweep | None, factor: int, rows: list, problems: list, console
) -> None:
    if w.expected_kv_bytes_bf16 is not None and w.kv_bytes_bf16 != w.expected_kv_bytes_bf16:
        problems.append(f"{w.name}: kv_bytes {w.kv_bytes_bf16} != workloads.json {w.expected_kv_bytes_bf16}")
    if w.expected_flops is not None and w.flops != w.expected_flops:
        problems.append(f"{w.name}: flops {w.flops} != workloads.json {w.expected_flops}")
    small = w.scaled(factor)
    row = bench.run_workload(small, sweep=sweep)
    counted = count_accounting(small)
    row["counted"] = counted
    if (counted["kv_bytes"], counted["pairs"]) != (small.kv_bytes, small.pairs) or not counted["slots_distinct"]:
        problems.append(f"{small.name}: counted {counted} vs formula kv_bytes {small.kv_bytes}, pairs {small.pairs}")
    if row.get("error"):
        problems.append(f"{small.name}: {row['error']}")
    if not row.get("all_written", True) or not row.get("check", {}).get("ok", False):
        problems.append(f"{small.name}: output check failed: {row.get('check')}")
    for backend, peer in row.get("peers", {}).items():
        if peer.get("error") or not peer.get("rel_err_vs_ours", math.inf) <= 2e-2:
            problems.append(f"{small.name}: dense {backend} peer disagrees with paged output: {peer}")
    rows.append(row)
    console.print(
        f"[dim]dry run[/] {small.name}: ok"
        if not any(p.startswith(small.name) for p in problems)
        else f"[red]dry run {small.name}: FAILED[/]"
    )


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def metadata(device, *, dry_run: bool = False) -> dict:
    import triton

    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        host=platform.node(),
    )
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            device=props.name,
            cuda=torch.version.cuda,
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / GiB,
            l2_mib=getattr(props, "L2_cache_size", 0) / 2**20,
        )
    else:
        meta["device"] = "cpu (dry run)" if dry_run else str(device)
    return meta


def write_results(results: dict, out_dir: Path) -> Path:
    """results.json, and results.md for timed runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    if not results.get("dry_run"):
        (out_dir / "results.md").write_text(markdown_report(results))
    return path


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _peer_cell(row: dict, backend: str) -> str:
    peer = row.get("peers", {}).get(backend)
    if not peer:
        return "—"
    if peer.get("error"):
        return "[red]err[/]"
    if "ratio" not in peer:
        return "—"
    return f"{peer['ratio']:.2f}" + ("*" if peer.get("note") else "")


def workload_table(results: dict):
    from rich.table import Table

    table = Table(
        title=f"pagedattn bench — {results['meta'].get('device')}",
        caption="x peer = peer ms / our ms (>1: faster than the peer). Host us per call, calls queued "
        "behind a GPU sleep: plan / run = PagedAttention.plan (host lengths) / .run (given out); "
        "one-shot = paged_attention; SDPA = the flash peer's calls. vLLM anchors are H100 "
        "times from workloads.json. * = K/V repeated for the peer. ✗ = output check failed.",
    )
    for col in (
        "workload",
        "ms",
        "TB/s",
        "% read BW",
        "TFLOP/s",
        "% mm",
        "x vLLM anchor",
        "x SDPA flash",
        "x SDPA cuDNN",
        *HOST_COLUMNS,
    ):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in results["rows"]:
        if r["kind"] != "workload":
            continue
        name = r["name"] + (" [red]✗[/]" if r.get("check") and not r["check"].get("ok") else "")
        if r.get("error") and "ms" not in r:
            table.add_row(name, f"[red]{r['error'][:60]}[/]", *[""] * (8 + len(HOST_COLUMNS)))
            continue
        anchor = r.get("anchors", {}).get("vllm-unified", {}).get("ratio")
        table.add_row(
            name,
            _fmt(r.get("ms"), ".4f"),
            _fmt(r.get("tb_per_s"), ".3f"),
            _fmt(r.get("pct_read_bw"), ".1f"),
            _fmt(r.get("tflop_per_s"), ".1f"),
            _fmt(r.get("pct_mm"), ".1f"),
            _fmt(anchor, ".2f"),
            _peer_cell(r, "flash"),
            _peer_cell(r, "cudnn"),
            *host_cells(r),
        )
    return table


HOST_COLUMNS = ("plan us", "run us", "one-shot us", "SDPA us")


def host_cells(row: dict) -> list[str]:
    """plan, run, one-shot and the flash peer's host time per call (— where not measured)."""
    sdpa = row.get("peers", {}).get("flash", {}).get("host_us", row.get("sdpa_us"))
    return [
        _fmt(row.get("plan_us"), ".1f"),
        _fmt(row.get("run_us"), ".1f"),
        _fmt(row.get("oneshot_us", row.get("host_us")), ".1f"),
        _fmt(sdpa, ".1f"),
    ]


def sweep_table(results: dict):
    from rich.table import Table

    table = Table(title="sweeps (vs best = % of roofline / the best in its sweep; x fastest = fastest ms / ms)")
    for col in ("sweep", "variant", "ms", "TB/s", "TFLOP/s", "% roofline", "vs best", "x fastest", "plan"):
        table.add_column(col, justify="left" if col in ("sweep", "variant", "plan") else "right")
    for r in results["rows"]:
        if r["kind"] != "sweep":
            continue
        low = r.get("vs_best") is not None and r["vs_best"] < 0.8
        table.add_row(
            r["sweep"],
            r["name"] + (" [red]✗[/]" if r.get("check") and not r["check"].get("ok") else ""),
            _fmt(r.get("ms"), ".4f") if not r.get("error") else f"[red]{r['error'][:40]}[/]",
            _fmt(r.get("tb_per_s"), ".3f"),
            _fmt(r.get("tflop_per_s"), ".1f"),
            _fmt(r.get("pct_roofline"), ".1f"),
            ("[red]" if low else "") + _fmt(r.get("vs_best"), ".2f") + ("[/]" if low else ""),
            _fmt(r.get("vs_fastest"), ".2f"),
            r.get("plan", ""),
        )
    return table


def _md_check(row: dict) -> str:
    if row.get("error"):
        return "error: " + row["error"][:80]
    return "ok" if row.get("check", {}).get("ok") else "FAILED"


def _md_peer(row: dict, backend: str) -> str:
    peer = row.get("peers", {}).get(backend) or {}
    return "err" if peer.get("error") else _fmt(peer.get("ratio"), ".2f")


def ceiling_line(c: dict) -> str:
    """The ceilings in words: the read ceiling with what measured it and the datasheet figure."""
    notes = []
    source = c.get("read_source")
    if source:
        names = {"read_tbs_stream": "streaming-read kernel", "read_tbs_sum_bf16": "torch.sum bf16"}
        notes.append(names.get(source, "torch.sum fp32"))
    if source == "read_tbs_stream":
        notes.append(f"torch.sum {max(c['read_tbs_sum_fp32'], c['read_tbs_sum_bf16']):.3f}")
    if c.get("read_tbs_datasheet"):
        sheet = c["read_tbs_datasheet"]
        notes.append(f"datasheet {sheet:.2f}: {100 * c['read_tbs'] / sheet:.1f}% of it")
    parts = [f"read {c['read_tbs']:.3f} TB/s" + (f" ({'; '.join(notes)})" if notes else "")]
    if "copy_tbs" in c:
        parts.append(f"copy {c['copy_tbs']:.3f} TB/s")
    if "mm_tflops" in c:
        parts.append(f"bf16 matmul {c['mm_tflops']:.1f} TFLOP/s")
    return ", ".join(parts)


def markdown_report(results: dict) -> str:
    """results.md: the run's metadata, ceilings and both tables as Markdown (for BENCHMARKS.md)."""
    meta, c = results["meta"], results.get("ceilings") or {}
    lines = [
        f"# pagedattn bench: {meta.get('device')}",
        "",
        f"{meta.get('date')}, torch {meta.get('torch')}, triton {meta.get('triton')}, options {results.get('options')}",
        "",
    ]
    if c:
        lines += [f"Ceilings in this run: {ceiling_line(c)}.", ""]
    lines += [
        "| workload | ms | TB/s | % read BW | TFLOP/s | % matmul | x vLLM anchor | x SDPA flash | x SDPA cuDNN "
        "| plan us | run us | one-shot us | SDPA us | check | plan |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results["rows"]:
        if r["kind"] != "workload":
            continue
        anchor = r.get("anchors", {}).get("vllm-unified", {}).get("ratio")
        lines.append(
            f"| {r['name']} | {_fmt(r.get('ms'), '.4f')} | {_fmt(r.get('tb_per_s'), '.3f')} | "
            f"{_fmt(r.get('pct_read_bw'), '.1f')} | {_fmt(r.get('tflop_per_s'), '.1f')} | "
            f"{_fmt(r.get('pct_mm'), '.1f')} | {_fmt(anchor, '.2f')} | {_md_peer(r, 'flash')} | "
            f"{_md_peer(r, 'cudnn')} | {' | '.join(host_cells(r))} | {_md_check(r)} | {r.get('plan', '')} |"
        )
    sweep_rows = [r for r in results["rows"] if r["kind"] == "sweep"]
    if sweep_rows:
        lines += [
            "",
            "| sweep | variant | ms | TB/s | TFLOP/s | % roofline | vs best | x fastest | check | plan |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in sweep_rows:
            lines.append(
                f"| {r['sweep']} | {r['name']} | {_fmt(r.get('ms'), '.4f')} | {_fmt(r.get('tb_per_s'), '.3f')} | "
                f"{_fmt(r.get('tflop_per_s'), '.1f')} | {_fmt(r.get('pct_roofline'), '.1f')} | "
                f"{_fmt(r.get('vs_best'), '.2f')} | {_fmt(r.get('vs_fastest'), '.2f')} | {_md_check(r)} "
                f"| {r.get('plan', '')} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def run(args) -> int:
    from rich.console import Console

    # a log file gets the tables whole: rich would wrap them to 80 columns off a terminal
    console = Console() if sys.stdout.isatty() else Console(width=240)
    workloads = load_workloads()
    names = [w.name for w in workloads]
    if args.workloads:
        wanted = [n.strip() for n in args.workloads.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"pagedattn bench: unknown workload(s) {unknown}; known: {', '.join(names)}", file=sys.stderr)
            return 2
        selected = [w for w in workloads if w.name in wanted]
    else:
        selected = workloads
    do_sweeps = args.sweeps if args.sweeps is not None else not args.workloads
    sweep_list = sweeps(workloads, quick=args.quick or args.dry_run) if do_sweeps else []

    if args.dry_run:
        rows, problems = dry_run(selected, sweep_list, console)
        write_results(dict(meta=metadata("cpu", dry_run=True), dry_run=True, ceilings=None, rows=rows), args.out)
        for p in problems:
            console.print(f"[red]{p}[/]")
        console.print(
            f"dry run: {len(rows)} workloads and variants built at 1/64 scale, "
            f"{'all checks passed' if not problems else f'{len(problems)} problem(s)'}; "
            f"wrote {args.out / 'results.json'}"
        )
        return 1 if problems else 0
    if not torch.cuda.is_available():
        print(
            "pagedattn bench: no CUDA GPU is available (torch.cuda.is_available() is False); the "
            "benchmark times kernels on a GPU. Run it on a CUDA machine, or use --dry-run to check "
            "the workloads and their accounting on the CPU.",
            file=sys.stderr,
        )
        return 2
    if args.host_only:
        return run_host(args, selected, console)
    return run_gpu(args, selected, sweep_list, console)


def run_host(
    args,
    selected: list[Workload],
    console,
    *,
    device="cuda",
    backend="auto",
    timer: Callable | None = None,
    ceilings: dict | None = None,
    calls: int | None = None,
    rounds: int | None = None,
) -> int:
    """`pagedattn bench --host-only`: the read ceiling, then per workload the host time per call
    of plan (host copies of the lengths and block table), run (given out), run with out
    allocated, the one-shot paged_attention and the flash SDPA peer (`bench/host.py`), the
    launches per run, run()'s kernel time (eager; CUDA-graph timing is `--cuda-graph` without
    --host-only) with its % of the read ceiling; run()'s output (fast launch path) checked against
    the reference, the one-shot call's and a CUDA-graph replay's against run()'s, bit for bit.
    Writes host.json and host.md under --out; prints the table last. Returns 1 when a check
    failed. `device`, `backend`, `timer`, `ceilings`, `calls` and `rounds` are for tests."""
    timer = timer or make_timer(quick=args.quick, cuda_graph=False)
    calls = calls or (10 if args.quick else host_time.CALLS)
    rounds = rounds or (7 if args.quick else host_time.ROUNDS)
    results = dict(meta=metadata(device), options=dict(quick=args.quick, host_only=True), rows=[])
    results["ceilings"] = ceilings or measure_ceilings(timer, device, others=False)
    checker = Bench(device=device, backend=backend)
    for w in selected:
        console.print(f"[dim]host time: {w.name}[/]")
        kinds = sorted({"decode" if n == 1 else "prefill" for n in w.shape.query_lens})
        row: dict = dict(name=w.name, kind="workload", kv_bytes=w.kv_bytes, query_kinds=kinds)
        inputs = None
        try:
            inputs = build_paged(w, device, num_sets=1)
            s = inputs.sets[0]
            attn = host_time.planner_for(inputs, device, backend=backend)
            host_time.plan_call(attn, inputs)()
            run = functools.partial(attn.run, s.q, inputs.k_cache, inputs.v_cache, out=s.out)
            run()  # the first call of a binding goes through Triton's own launch path (and compiles)
            s.out.fill_(float("nan"))
            run()  # the second through the fast path: the one checked
            if checker.on_cuda:
                torch.cuda.synchronize(device)
            row["all_written"] = bool(torch.isfinite(s.out).all())
            row["check"] = checker.check_output(inputs)
            if checker.on_cuda:
                row["graph_ok"] = _graph_replay_equal(attn, s, inputs)
            row["ms"] = timer(run)["ms"]
            row["pct_read_bw"] = 100 * w.kv_bytes / row["ms"] / 1e9 / results["ceilings"]["read_tbs"]
            row.update(host_time.measure_planner_host(inputs, device, backend=backend, calls=calls, rounds=rounds))
            row["oneshot_equal"] = bool(torch.equal(host_time.oneshot_call(inputs, 0, backend)(), s.out))
            if args.peers:
                try:
                    groups = build_dense(inputs, 0)
                    row["sdpa_us"] = host_time.sdpa_host_us(groups, device, "flash", calls=calls, rounds=rounds)
                    del groups
                except Exception as e:
                    row["sdpa_error"] = _error(e)
        except Exception as e:
            row["error"] = _error(e)
        finally:
            inputs = None
            _free(device)
        results["rows"].append(row)
        write_host_results(results, args.out)
    text = host_table(results)
    console.print(f"wrote {args.out / 'host.json'} and host.md", markup=False)
    print(text)
    return 0 if all(not r.get("error") and _host_check(r) == "ok" for r in results["rows"]) else 1


def _graph_replay_equal(attn, s, inputs) -> bool:
    """run() captured in a CUDA graph (on the fast launch path) and replayed writes what an eager
    run() wrote into s.out, bit for bit."""
    out = torch.full_like(s.out, float("nan"))
    graph, _ = capture_graph(lambda: attn.run(s.q, inputs.k_cache, inputs.v_cache, out=out))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    equal = bool(torch.equal(out, s.out))
    del graph
    return equal


def write_host_results(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "host.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "host.md").write_text(host_table(results, markdown=True))


# run() host-time targets (issue 13), us per call
RUN_TARGET_US = {"decode": 15.0, "mixed": 25.0}


def host_table(results: dict, *, markdown: bool = False) -> str:
    """The host-time table (plain text, or Markdown for BENCHMARKS.md), the ceiling line first and
    the run() targets last."""
    meta, rows = results["meta"], results["rows"]
    cols = (
        "workload",
        "plan us",
        "run us",
        "run+alloc us",
        "one-shot us",
        "SDPA us",
        "launches",
        "run ms",
        "% read",
        "check",
    )
    cells = []
    for r in rows:
        if r.get("error"):
            cells.append([r["name"], "error: " + r["error"][:90]] + [""] * (len(cols) - 2))
            continue
        cells.append(
            [
                r["name"] + (" (queue drained)" if r.get("drained_rounds") else ""),
                _fmt(r.get("plan_us"), ".1f"),
                _fmt(r.get("run_us"), ".1f"),
                _fmt(r.get("run_alloc_us"), ".1f"),
                _fmt(r.get("oneshot_us"), ".1f"),
                _fmt(r.get("sdpa_us"), ".1f") if "sdpa_error" not in r else "err",
                str(r.get("launches", "—")),
                _fmt(r.get("ms"), ".4f"),
                _fmt(r.get("pct_read_bw"), ".1f"),
                _host_check(r),
            ]
        )
    head = [
        f"pagedattn bench --host-only: {meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}",
        f"ceilings: {ceiling_line(results['ceilings'])}",
        "host us per call, median of rounds queued behind a GPU sleep; run ms: eager do_bench of run()",
    ]
    if markdown:
        lines = head[:1] + ["", head[1] + ".", head[2] + ".", ""]
        lines += ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 2) + "|---|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
    else:
        widths = [max(len(x) for x in col) for col in zip(cols, *cells)]
        fmt = lambda row: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))  # noqa: E731
        lines = head + [fmt(cols)] + [fmt(c) for c in cells]
    lines.append("")
    for r in rows:
        kind = _run_target_kind(r)
        if kind and r.get("run_us") is not None:
            target = RUN_TARGET_US[kind]
            verdict = "met" if r["run_us"] <= target else "NOT met"
            lines.append(f"{r['name']}: run {r['run_us']:.1f} us, {kind} target <= {target:.0f} us: {verdict}")
    return "\n".join(lines) + "\n"


def _host_check(row: dict) -> str:
    """ok: run() wrote every row and matches the reference, the one-shot call equals it, and
    (on CUDA) a graph replay of run() equals it too."""
    failed = [
        what
        for what, ok in (
            ("reference", row.get("all_written") and row.get("check", {}).get("ok")),
            ("one-shot", row.get("oneshot_equal", True)),
            ("graph", row.get("graph_ok", True)),
        )
        if not ok
    ]
    return "ok" if not failed else "FAILED " + "/".join(failed)


def _run_target_kind(row: dict) -> str | None:
    """ "decode" (every query_len 1), "mixed" (both kinds) or None (prefill only: no target)."""
    kinds = row.get("query_kinds")
    if kinds == ["decode"]:
        return "decode"
    if kinds == ["decode", "prefill"]:
        return "mixed"
    return None


def run_gpu(
    args,
    selected: list[Workload],
    sweep_list: list[Sweep],
    console,
    *,
    device="cuda",
    backend="auto",
    timer: Callable | None = None,
    ceilings: dict | None = None,
) -> int:
    """The timed run. `device`, `backend`, `timer` and `ceilings` are for tests (a fake timer over
    the CPU reference exercises everything but the GPU)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .plot import roofline

    timer = timer or make_timer(quick=args.quick, cuda_graph=args.cuda_graph)
    results = dict(
        meta=metadata(device),
        options=dict(quick=args.quick, cuda_graph=args.cuda_graph, check=args.check, peers=args.peers),
        ceilings=None,
        ceilings_h100_reference=reference_ceilings(),
        rows=[],
    )
    jobs = [(w, None) for w in selected] + [(v, s) for s in sweep_list for v in s.variants]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("ceilings", total=len(jobs) + 1)
        results["ceilings"] = ceilings or measure_ceilings(timer, device)
        bench = Bench(
            device=device,
            backend=backend,
            timer=timer,
            ceilings=results["ceilings"],
            check=args.check,
            peers=PEER_BACKENDS if args.peers else (),
        )
        progress.advance(task)
        for w, sweep in jobs:
            progress.update(task, description=w.name)
            row = bench.run_workload(w, sweep=sweep)
            results["rows"].append(row)
            rank_sweeps(results["rows"])
            write_results(results, args.out)  # after every row: a run cut short keeps what it measured
            progress.advance(task)
    path = write_results(results, args.out)
    try:
        roofline(results, args.out / "roofline.png")
    except Exception as e:
        console.print(f"[red]roofline.png failed: {_error(e)}[/]")
    console.print(f"ceilings: {ceiling_line(results['ceilings'])}; wrote {path}, results.md and roofline.png")
    for r in results["rows"]:
        if r.get("error") or (r.get("check") and not r["check"].get("ok")):
            console.print(f"[red]{r['name']}: {r.get('error') or r['check']}[/]")
        if r.get("matches_workloads_json") is False:
            console.print(f"[red]{r['name']}: kv_bytes/flops differ from workloads.json[/]")
        for b, p in r.get("peers", {}).items():
            if p.get("error") or p.get("note"):
                console.print(f"[dim]{r['name']} SDPA {b}: {p.get('error') or p.get('note')}[/]")
            if p.get("rel_err_vs_ours", 0) > 2e-2:
                console.print(
                    f"[red]{r['name']} SDPA {b}: output differs from ours (rel err "
                    f"{p['rel_err_vs_ours']:.2e}): a mask or a kernel is wrong[/]"
                )
    if sweep_list:
        console.print(sweep_table(results))
    console.print(workload_table(results))
    return 0
