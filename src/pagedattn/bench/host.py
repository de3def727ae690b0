"""Host time: what `plan()`, `run()`, the one-shot `paged_attention` and torch SDPA cost the CPU.

Method (GPU): each round enqueues a GPU sleep (`torch.cuda._sleep`) and then `calls` calls, and
times the host loop alone; the sleep is longer than the loop, so no call waits for the GPU and the
wall time is the host's (checks, planning, Triton's launcher). A round whose queue drained before
the loop ended (the stream is idle right after it) may have waited for the GPU: such rounds are
counted (`drained`). Results are medians over rounds.

Method (CPU, `stub_launches()`): the same calls with every kernel launch replaced by a no-op, so
what remains is the Python around the launches. For the planner's host cost on a machine without a
GPU (the compiled launcher's own C cost, a few us per launch, is not in it).

`measure_planner_host(inputs, device)` gives, for one workload's inputs: plan_us (with host
copies of the lengths and block table), run_us (given `out`), run_alloc_us (`out` allocated by
run), oneshot_us (`paged_attention`: plan + run per call), launches per run;
`sdpa_host_us` the peer's: torch SDPA on the same data made dense, one call per
(query_len, ctx_len) group.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from ..attention import paged_attention
from ..kernels import launch as launch_mod
from ..options import AttentionOptions
from ..planner import PagedAttention
from ..testing import PagedInputs
from .workloads import dense_attention

SLEEP_CYCLES = 1 << 26  # ~34 ms of GPU time at 1.98 GHz: far longer than a round of calls
CALLS = 20
ROUNDS = 15


def queued_host_times_us(
    fn: Callable, device, *, calls: int = CALLS, rounds: int = ROUNDS, drained: list | None = None
) -> list[float]:
    """Host time per call of `fn` in each round, in us. On CUDA each round is queued behind a GPU
    sleep; elsewhere the calls are timed as they are. `drained`, when given, receives the number of
    rounds whose queue ran dry before the loop ended (those rounds are still in the list)."""
    cuda = torch.device(device).type == "cuda"
    fn()  # warm: a first launch may compile or load a module
    if cuda:
        torch.cuda.synchronize(device)
    times, dry = [], 0
    for _ in range(rounds):
        if cuda:
            torch.cuda._sleep(SLEEP_CYCLES)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        if cuda:
            if torch.cuda.current_stream(device).query():  # idle already: the GPU caught up
                dry += 1
            torch.cuda.synchronize(device)
    if drained is not None:
        drained.append(dry)
    return times


def queued_host_us(fn: Callable, device, *, calls: int = CALLS, rounds: int = ROUNDS) -> float:
    """The median of `queued_host_times_us`."""
    return statistics.median(queued_host_times_us(fn, device, calls=calls, rounds=rounds))


# ---------------------------------------------------------------------------------------------
# CPU: launches replaced by no-ops
# ---------------------------------------------------------------------------------------------
class _NoKernel:
    """Stands in for a compiled kernel: its launcher takes the arguments and does nothing."""

    function = None
    packed_metadata = None

    @staticmethod
    def run(*args) -> None:
        return None


@contextlib.contextmanager
def stub_launches():
    """Every `FastKernel` / `BoundLaunch` launch becomes a no-op that still takes its arguments
    (the fast path's Python runs in full: argument lists, alignment keys, the launcher call with
    every argument). The stream lookup is a no-op too (this torch may have no CUDA)."""
    fast = launch_mod.FastKernel

    def fake_launch(self, grid, args, kwargs):
        names = self.fn.arg_names[len(args) :]
        return launch_mod.Compiled(_NoKernel, tuple(kwargs.get(n) for n in names), 0)

    saved_launch = fast.launch
    saved_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    fast.launch = fake_launch
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    try:
        yield
    finally:
        fast.launch = saved_launch
        if saved_stream is None:
            del torch._C._cuda_getCurrentRawStream
        else:
            torch._C._cuda_getCurrentRawStream = saved_stream


# ---------------------------------------------------------------------------------------------
# one workload
# ---------------------------------------------------------------------------------------------
def planner_for(inputs: PagedInputs, device, *, backend: str = "auto", cuda_graph: bool = False) -> PagedAttention:
    c = inputs.config
    return PagedAttention(
        AttentionOptions(k_scale=inputs.k_scale, v_scale=inputs.v_scale),
        num_q_heads=c.num_q_heads,
        num_kv_heads=c.num_kv_heads,
        head_size=c.head_size,
        block_size=c.block_size,
        dtype=c.dtype,
        kv_cache_dtype=c.cache_dtype,
        num_blocks=inputs.k_cache.shape[0],
        device=device,
        backend=backend,
        cuda_graph=cuda_graph,
    )


def plan_call(attn: PagedAttention, inputs: PagedInputs, i: int = 0) -> Callable[[], PagedAttention]:
    """plan() of set i with host copies of the lengths and the block table (what an engine has)."""
    s, shape = inputs.sets[i], inputs.shape
    table_host = s.block_table.cpu()
    query_lens, seq_lens = list(shape.query_lens), list(shape.seq_lens)
    return lambda: attn.plan(
        s.cu_seqlens_q,
        s.seq_lens,
        s.block_table,
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
        block_table_host=table_host,
    )


def oneshot_call(inputs: PagedInputs, i: int = 0, backend: str = "auto") -> Callable[[], torch.Tensor]:
    """paged_attention on set i with the host query lengths (an engine's one-shot call)."""
    s, shape = inputs.sets[i], inputs.shape
    query_lens = list(shape.query_lens)
    bounds = dict(max_query_len=max(shape.query_lens), max_seq_len=max(shape.seq_lens))
    return lambda: paged_attention(
        s.q,
        inputs.k_cache,
        inputs.v_cache,
        s.cu_seqlens_q,
        s.seq_lens,
        s.block_table,
        k_scale=inputs.k_scale,
        v_scale=inputs.v_scale,
        out=s.out,
        query_lens_host=query_lens,
        backend=backend,
        **bounds,
    )


def measure_planner_host(
    inputs: PagedInputs, device, *, backend: str = "auto", calls: int = CALLS, rounds: int = ROUNDS
) -> dict:
    """plan_us, run_us, run_alloc_us, oneshot_us, launches (per run) and drained_rounds (rounds
    whose GPU queue ran dry: their time includes waiting) of set 0 of `inputs`. run() writes set
    0's `out`."""
    s = inputs.sets[0]
    attn = planner_for(inputs, device, backend=backend)
    plan = plan_call(attn, inputs)
    plan()
    k, v = inputs.k_cache, inputs.v_cache
    drained: list[int] = []

    def median_us(fn):
        return statistics.median(queued_host_times_us(fn, device, calls=calls, rounds=rounds, drained=drained))

    row = dict(plan_us=median_us(plan))
    row["run_us"] = median_us(lambda: attn.run(s.q, k, v, out=s.out))
    row["launches"] = launches_of(attn)
    row["run_alloc_us"] = median_us(lambda: attn.run(s.q, k, v))
    row["oneshot_us"] = median_us(oneshot_call(inputs, 0, backend))
    row["drained_rounds"] = sum(drained)
    return row


def launches_of(attn: PagedAttention) -> int:
    """Kernel launches per run() of the current plan (after one run bound them)."""
    bindings = list(attn._bindings.values())
    return len(bindings[-1].launches) if bindings else 0


def sdpa_host_us(groups, device, backend: str = "flash", *, calls: int = CALLS, rounds: int = ROUNDS) -> float:
    """Host time of the dense peer: one SDPA call per group (`workloads.build_dense`'s groups of
    equal (query_len, ctx_len), the same data as the paged batch)."""

    def peer():
        for g in groups:
            dense_attention(g, backend)

    return statistics.median(queued_host_times_us(peer, device, calls=calls, rounds=rounds))
