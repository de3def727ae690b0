"""`pagedattn scenario NAME`: plant a known fault, then show what checked mode and forensics say.

Two kinds of fault:
- contract faults, planted through the inputs the library is given (an unwritten decode token, a
  tampered block table, a wrong fp8 scale): the real `pagedattn.attention` runs on them, and checked
  mode gets its chance to refuse them first;
- kernel faults (a causal mask, window bound or GQA head mapping off by one), which no input can
  produce: the "kernel under test" is then a mutant, `reference.attention` run on inputs altered
  so that it computes exactly what the buggy kernel would. Checked mode has nothing to check there:
  the inputs are valid. Each mutant says in its `planted` text how it was built.

Every scenario compares the output under test with the reference on the intended inputs, and
passes when the top diagnosis of `forensics` is the cause that was planted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import checks
from .attention import attention, paged_attention
from .config import AttentionConfig, BatchShape
from .errors import PagedAttentionError
from .forensics import Report
from .testing import Step, make_step


@dataclass
class Result:
    name: str
    planted: str  # what was planted, and how
    expected: str  # the cause id the diagnosis must name
    checked: str  # what checked mode said
    report: Report
    checked_raised: bool | None = None  # None: not a contract fault, checked mode was not expected to fire
    fixed: str = ""  # for contract faults: the comparison once the fault is repaired

    @property
    def top(self) -> str | None:
        top = self.report.top
        return top.id if top else None

    @property
    def ok(self) -> bool:
        return self.top == self.expected and self.checked_raised is not False

    def to_dict(self) -> dict:
        return dict(
            name=self.name,
            planted=self.planted,
            expected=self.expected,
            top=self.top,
            ok=self.ok,
            checked=self.checked,
            checked_raised=self.checked_raised,
            fixed=self.fixed,
            forensics=self.report.to_dict(),
        )


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def sizes(full: bool, seed: int, **config) -> tuple[AttentionConfig, BatchShape]:
    """The geometry of vLLM's test (docs/origin-analysis.md): 10 sequences, the last a decode, one query
    head per KV head, fp16. Small by default (seconds on CPU); `full` is the test's real size (64 heads
    of 128, lengths up to 1024), where one bad token is the analysis' 8,192 elements."""
    if full:
        base = dict(num_q_heads=64, num_kv_heads=64, head_size=128)
        shape = BatchShape.seed_like(seed=seed)
    else:
        base = dict(num_q_heads=4, num_kv_heads=4, head_size=32)
        shape = BatchShape.seed_like(num_seqs=10, max_query_len=32, max_ctx_len=32, min_len=16, seed=seed)
    base.update(block_size=16, dtype=torch.float16)
    base.update(config)
    return AttentionConfig(**base), shape


def _check(fn) -> tuple[str, bool]:
    """Run a checked-mode call: (what it said, whether it raised)."""
    try:
        fn()
    except PagedAttentionError as e:
        return f"{type(e).__name__}: {e}", True
    return "passed", False


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


KERNEL_FAULT = (
    "not a contract violation: checked mode has nothing to check (it passed on {}); only a comparison finds this"
)


# ---------------------------------------------------------------------------------------------
# contract faults: planted through the inputs, run by the real entry points
# ---------------------------------------------------------------------------------------------
def incomplete_cache(device, seed: int = 0, full: bool = False) -> Result:
    config, shape = sizes(full, seed)
    step = make_step(config, shape, device=device, seed=seed, contract="context", write_decode_kv=False)
    row = shape.num_seqs - 1
    seq, ctx = step.seq_ids[row], shape.ctx_lens[row]
    slot = step.cache.slot_mapping([seq], [1]).item()
    planted = (
        f"the origin bug (docs/origin-analysis.md): sequence {row} is a decode (query_len 1, ctx_len {ctx}, seq_len {ctx + 1}); "  # noqa: E501
        f"only its {ctx} context tokens were written, its own token's slot ({slot}) was reserved but "
        f"never written (poisoned NaN). prefix_prefill(decode_from_cache=True) reads all seq_len tokens "
        f"of a decode from the cache."
    )
    run = dict(k_new=step.k_new, v_new=step.v_new, decode_from_cache=True)
    said, raised = _check(lambda: attention(step.q, step.cache, step.batch, checked=True, **run))
    out = attention(step.q, step.cache, step.batch, checked=False, out=_nan_like(step.q), **run)
    ref = step.reference(decode_from_cache=False)  # intended: the decode token's K/V from k_new
    report = step.compare(out, ref)
    # the fix: write before attend
    start = sum(shape.query_lens[:row])
    step.cache.write([seq], step.k_new[start : start + 1], step.v_new[start : start + 1], [1])
    fixed_out = attention(step.q, step.cache, step.batch, checked=True, out=_nan_like(step.q), **run)
    fixed = "after writing the decode token's K/V (write before attend): " + step.compare(fixed_out, ref).summary()
    return Result("incomplete-cache", planted, "missing-decode-kv", said, report, raised, fixed)


def wrong_block_table(device, seed: int = 0, full: bool = False) -> Result:
    config, shape = sizes(full, seed)
    step = make_step(config, shape, device=device, seed=seed, contract="full")
    bs = config.block_size
    a, b = sorted((i for i in range(shape.num_seqs) if shape.seq_lens[i] >= bs), key=lambda i: -shape.query_lens[i])[:2]
    table = step.batch.block_table.clone()
    table[a, 0], table[b, 0] = step.batch.block_table[b, 0], step.batch.block_table[a, 0]
    bad = dataclasses.replace(step.batch, block_table=table)
    bad.seq_ids, bad.contract = step.batch.seq_ids, step.batch.contract
    planted = (
        f"block_table[{a}, 0] and block_table[{b}, 0] swapped in the batch (blocks {int(table[b, 0])} "
        f"and {int(table[a, 0])}): sequences {a} and {b} read each other's first {bs} tokens."
    )
    said, raised = _check(lambda: attention(step.q, step.cache, bad, checked=True))
    out = attention(step.q, step.cache, bad, checked=False, out=_nan_like(step.q))
    report = step.compare(out, step.reference())
    return Result("wrong-block-table", planted, "block-table", said, report, raised)


def wrong_scale(device, seed: int = 0, full: bool = False) -> Result:
    config, shape = sizes(full, seed, kv_dtype="fp8_e4m3")
    step = make_step(config, shape, device=device, seed=seed, contract="full")
    c, batch = step.cache, step.batch
    wrong = 2 * c.v_scale
    planted = (
        f"fp8 e4m3 cache quantized with v_scale {c.v_scale:g}; the caller passes v_scale={wrong:g} "
        f"to paged_attention (a valid, positive, wrong scale)."
    )

    def call(checked: bool, out=None):
        return paged_attention(
            step.q,
            c.k,
            c.v,
            batch.cu_seqlens_q,
            batch.seq_lens,
            batch.block_table,
            max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len,
            k_scale=c.k_scale,
            v_scale=wrong,
            checked=checked,
            out=out,
        )

    said, _ = _check(lambda: call(True))
    if said == "passed":
        said = KERNEL_FAULT.format("a wrong but valid, positive v_scale")
    report = step.compare(call(False, _nan_like(step.q)), step.reference())
    return Result("wrong-scale", planted, "scale", said, report)


# ---------------------------------------------------------------------------------------------
# kernel faults: a mutant "kernel under test" built from the reference on altered inputs
# ---------------------------------------------------------------------------------------------
def _kernel_fault(name: str, step: Step, planted: str, expected: str, mutant: torch.Tensor) -> Result:
    """Checked mode's check of the real inputs (valid: it passes; no kernel needs to run for that),
    then forensics on the mutant's output."""
    said, _ = _check(
        lambda: checks.check_batch_against_cache(step.cache, step.batch, step.contract, step.decode_from_cache)
    )
    said = KERNEL_FAULT.format("the valid inputs") if said == "passed" else said
    report = step.compare(mutant.to(step.q.dtype), step.reference())
    return Result(name, planted, expected, said, report)


def off_by_one_causal(device, seed: int = 0, full: bool = False) -> Result:
    config, shape = sizes(full, seed)
    step = make_step(config, shape, device=device, seed=seed, contract="full")
    # Mask j <= p + 1 (bounded by seq_len): query i sees what a query at position p + 1 sees. So the
    # mutant's row i is the reference's output for q_i placed in row i + 1; the last row of each
    # sequence has no future key and is unchanged.
    last = set((torch.tensor(shape.query_lens).cumsum(0) - 1).tolist())
    rows = torch.tensor([t for t in range(shape.num_tokens) if t not in last], dtype=torch.long, device=step.q.device)
    shifted_q = step.q.clone()
    shifted_q[rows + 1] = step.q[rows]
    mutant = step.reference()
    mutant[rows] = step.reference(q=shifted_q)[rows + 1]
    planted = (
        "mutant kernel: causal mask j <= p + 1 instead of j <= p (each query sees one future key). "
        "Emulated with the reference: query i's row is the reference output for q_i moved one position "
        "later (p + 1), the last query of each sequence is unchanged."
    )
    return _kernel_fault("off-by-one-causal", step, planted, "causal-off-by-one", mutant)


def sliding_window_edge(device, seed: int = 0, full: bool = False) -> Result:
    window = 512 if full else 40
    config, shape = sizes(full, seed, sliding_window=window)
    step = make_step(config, shape, device=device, seed=seed, contract="full")
    mutant = step.reference(sliding_window=window + 1)
    planted = (
        f"mutant kernel: sliding window bound p - j <= W instead of p - j < W (W = {window}): one key "
        f"too many at the window edge. Emulated with the reference run at sliding_window={window + 1}."
    )
    return _kernel_fault("sliding-window-edge", step, planted, "sliding-window-edge", mutant)


def gqa_head_mapping(device, seed: int = 0, full: bool = False) -> Result:
    config, shape = sizes(full, seed, **(dict(num_kv_heads=8) if full else dict(num_q_heads=8, num_kv_heads=2)))
    step = make_step(config, shape, device=device, seed=seed, contract="full")
    h, kv = config.num_q_heads, config.num_kv_heads
    mapping = torch.arange(h, device=step.q.device) % kv  # the bug: h % num_kv_heads, not h // (h / kv)
    k, v = step.cache.k[:, :, mapping], step.cache.v[:, :, mapping]
    mutant = step.reference(k_cache=k, v_cache=v)
    wrong = [x for x in range(h) if x % kv != x // (h // kv)]
    planted = (
        f"mutant kernel: query head h reads KV head h % num_kv_heads instead of h // {h // kv} "
        f"({h} query heads, {kv} KV heads; heads {wrong} read the wrong KV head). Emulated with the "
        f"reference on a cache whose heads are expanded to one per query head in that order."
    )
    return _kernel_fault("gqa-head-mapping", step, planted, "gqa-head-mapping", mutant)


SCENARIOS = {
    "incomplete-cache": (incomplete_cache, "the origin bug: a decode token's K/V never written to the cache"),
    "wrong-block-table": (wrong_block_table, "two block ids swapped in the batch's block table"),
    "wrong-scale": (wrong_scale, "fp8 v_scale passed at twice the quantization scale"),
    "off-by-one-causal": (off_by_one_causal, "mutant kernel: causal mask admits one future key"),
    "sliding-window-edge": (sliding_window_edge, "mutant kernel: window admits W + 1 keys"),
    "gqa-head-mapping": (gqa_head_mapping, "mutant kernel: query head -> KV head mapping h % num_kv_heads"),
}


def run_scenario(name: str, device="cpu", seed: int = 0, full: bool = False) -> Result:
    return SCENARIOS[name][0](torch.device(device), seed=seed, full=full)
