"""The bad-metadata catalogue, as data: every way an engine can hand over wrong metadata, over
every entry point it applies to, with what must happen.

    validated   (validate=True, checked mode, or the CPU/interpreter default): the call raises
                `case.error`, its message names one of `case.args`, and nothing is touched.
    unvalidated (validate=False): host-side checks (`case.bad_seqs is None`) still raise; otherwise
                the call runs and must not crash, must not read or write outside its tensors, must
                give NaN rows for the sequences in `case.bad_seqs` and reference rows for the others
                (NaN or reference rows, nothing else, for `case.nan_or_right`; rows two sequences
                claim are unconstrained), and NaN rows that no sequence covers when the library
                allocated `out`. The write op skips the tokens in `case.bad_slots`, writes the others.

Every case starts from `base_batch()`, one small valid mixed batch, and changes it in one place:

    sequence          0        1        2
    query_len         5        1        3          cu_seqlens_q [0, 5, 6, 9], 9 tokens
    seq_len          17       21        3          ctx_len 12, 20, 0
    block_table   [3, 6, 1] [0, 5, 1] [7, 1, 1]    8 blocks of 16; 1, 2, 4 unused; padding 1

All K/V in the cache are finite (unused blocks too), so a NaN in the output is the library's
answer, never an accident of the data; `k_new`/`v_new` equal the cache at the query positions, so
both contracts give the same answer. `pagedattn.catalogue_run.check(case, entry, device)` runs a
case and returns the list of broken promises (empty = the case passed); `python -m
pagedattn.catalogue` runs many, one line each (the test suite runs it in a subprocess, so a crash
is a failure, not a dead worker; scripts/sanitize_catalogue.py runs it under compute-sanitizer).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 32, 16, 8
QUERY_LENS, SEQ_LENS = (5, 1, 3), (17, 21, 3)
BLOCK_TABLE = ((3, 6, 1), (0, 5, 1), (7, 1, 1))
WRITE_SLOTS = (16, 17, 18, 19, 20, 32, 33, 34, 35)  # unused blocks 1 and 2
SENTINEL = 0.5  # guard margins and a user `out` start as this: finite, so an unwanted read or a missed write shows
I32_MAX, I32_MIN = 2**31 - 1, -(2**31)


# ---------------------------------------------------------------------------------------------
# the valid batch every case starts from
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_q_heads, head_size]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size] (nhd)
    v_cache: torch.Tensor
    k_new: torch.Tensor  # [num_tokens, num_kv_heads, head_size]
    v_new: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int
    slot_mapping: torch.Tensor  # the write op's: [num_tokens] int64, unused slots
    out: torch.Tensor | None = None  # a replacement `out` (wrong shape/dtype cases); None: the runner decides
    k_scale: float | None = None
    v_scale: float | None = None

    def replace(self, **changes) -> Batch:
        return dataclasses.replace(self, **changes)


def base_batch(device="cpu", dtype=torch.float16, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=g)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=g)
    k_new, v_new = [], []
    for row, q_len, s in zip(BLOCK_TABLE, QUERY_LENS, SEQ_LENS):
        pos = torch.arange(s - q_len, s)
        blocks = torch.tensor(row)[pos // BLOCK_SIZE]
        k_new.append(k_cache[blocks, pos % BLOCK_SIZE])
        v_new.append(v_cache[blocks, pos % BLOCK_SIZE])
    num_tokens = sum(QUERY_LENS)
    i32 = dict(dtype=torch.int32, device=device)
    return Batch(
        q=torch.randn(num_tokens, NUM_Q_HEADS, HEAD_SIZE, generator=g).to(device=device, dtype=dtype),
        k_cache=k_cache.to(device=device, dtype=dtype),
        v_cache=v_cache.to(device=device, dtype=dtype),
        k_new=torch.cat(k_new).to(device=device, dtype=dtype),
        v_new=torch.cat(v_new).to(device=device, dtype=dtype),
        cu_seqlens_q=torch.tensor([0, 5, 6, 9], **i32),
        seq_lens=torch.tensor(SEQ_LENS, **i32),
        block_table=torch.tensor(BLOCK_TABLE, **i32),
        max_query_len=max(QUERY_LENS),
        max_seq_len=max(SEQ_LENS),
        slot_mapping=torch.tensor(WRITE_SLOTS, dtype=torch.int64, device=device),
    )


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
FULL = ("paged_attention", "paged_attention_hnd", "attention", "planner", "ops_paged_attention", "unified_attention")
CONTEXT = ("prefix_prefill", "planner_context", "context_attention_fwd", "chunked_prefill_paged_decode")
ATTENTION = FULL + CONTEXT
NATIVE = (
    "paged_attention",
    "paged_attention_hnd",
    "prefix_prefill",
    "attention",
    "planner",
    "planner_context",
    "ops_paged_attention",
)
WRITE = ("write_kv", "reshape_and_cache_flash")
# cases that are also run with `out` left to the library: rows that no sequence covers must come
# out NaN, and rows past q must not be written past the allocation
LIBRARY_OUT_CASES = (
    "cu-not-starting-at-0",
    "cu-ends-before-tokens",
    "cu-ends-after-tokens",
    "cu-end-int32-max",
    "q-fewer-rows",
    "q-more-rows",
)


@dataclass(frozen=True)
class Case:
    name: str
    entry_points: tuple[str, ...]
    mutate: Callable[[Batch], Batch]
    error: tuple[str, ...]  # names of pagedattn.errors classes; any one is right (none: a valid variant)
    args: tuple[str, ...]  # the message names one of these (an entry point's own name for it counts)
    bad_seqs: tuple[int, ...] | None  # NaN when unvalidated; None = a host-side check, raised always
    bad_slots: tuple[int, ...] = ()  # write op: tokens whose slot is out of range (skipped unvalidated)
    nan_or_right: tuple[int, ...] = ()  # sequences whose rows may be NaN or the reference's, nothing else
    why: str = ""

    @property
    def host_check(self) -> bool:
        return self.bad_seqs is None


def _set(name: str, index, value):
    """A mutation: tensor `name` with [index] = value (a copy; the base is not changed)."""

    def mutate(b: Batch) -> Batch:
        t = getattr(b, name).clone()
        t[index] = value
        return b.replace(**{name: t})

    return mutate


def _with(**changes):
    def mutate(b: Batch) -> Batch:
        return b.replace(**{k: (v(b) if callable(v) else v) for k, v in changes.items()})

    return mutate


def _i32(values, b: Batch) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=b.q.device)


def _both(*mutations):
    def mutate(b: Batch) -> Batch:
        for m in mutations:
            b = m(b)
        return b

    return mutate


def _rows(n: int):
    """q, k_new, v_new with n rows (cut, or extended with fresh rows)."""

    def mutate(b: Batch) -> Batch:
        def resize(t):
            if n <= t.shape[0]:
                return t[:n].contiguous()
            return torch.cat([t, torch.randn(n - t.shape[0], *t.shape[1:], device=t.device).to(t.dtype)])

        return b.replace(q=resize(b.q), k_new=resize(b.k_new), v_new=resize(b.v_new))

    return mutate


def _fp8_no_k_scale(b: Batch) -> Batch:
    fp8 = torch.float8_e4m3fn
    return b.replace(k_cache=b.k_cache.to(fp8), v_cache=b.v_cache.to(fp8), k_scale=None, v_scale=1.0)


def _other_device(t: torch.Tensor) -> torch.Tensor:
    """The same tensor on another device: the CPU for a CUDA batch, "meta" for a CPU one."""
    return t.cpu() if t.device.type != "cpu" else torch.empty_like(t, device="meta")


def _host(name: str, entry_points, field: str, change, error: tuple[str, ...], why: str = "") -> Case:
    """A host-side check (raised with or without validation): the batch's `field` replaced by
    change(batch), the message naming `field`."""
    return Case(name, entry_points, _with(**{field: change}), error, (field,), None, why=why)


BME, SE, DE, DTE, SCE = "BatchMetadataError", "ShapeError", "DeviceError", "DTypeError", "ScaleError"
C = Case
CASES: tuple[Case, ...] = (
    # ---- block ids (only entries every contract reads: seq 0 block 0, seq 1 blocks 0-1)
    C("block-id-past-cache", ATTENTION, _set("block_table", (1, 1), 1000), (BME,), ("block_table[1, 1]",), (1,)),
    C(
        "block-id-equals-num-blocks",
        ATTENTION,
        _set("block_table", (0, 0), NUM_BLOCKS),
        (BME,),
        ("block_table[0, 0]",),
        (0,),
        why="off by one: the first id past the cache",
    ),
    C("block-id-negative", ATTENTION, _set("block_table", (1, 0), -1), (BME,), ("block_table[1, 0]",), (1,)),
    C(
        "block-id-int32-min",
        ATTENTION,
        _set("block_table", (1, 1), I32_MIN),
        (BME,),
        ("block_table[1, 1]",),
        (1,),
        why="id * stride overflows 32-bit arithmetic",
    ),
    C("block-id-int32-max", ATTENTION, _set("block_table", (0, 0), I32_MAX), (BME,), ("block_table[0, 0]",), (0,)),
    # ---- seq_lens
    C("seq-len-negative", ATTENTION, _set("seq_lens", 1, -3), (BME,), ("seq_lens[1]",), (1,)),
    C("seq-len-below-query-len", ATTENTION, _set("seq_lens", 0, 2), (BME,), ("seq_lens[0]",), (0,)),
    C("seq-len-zero-with-query", ATTENTION, _set("seq_lens", 2, 0), (BME,), ("seq_lens[2]",), (2,)),
    C(
        "ctx-len-negative",
        CONTEXT,
        _set("seq_lens", 2, 2),
        (BME,),
        ("seq_lens[2]",),
        (2,),
        why="context contract: ctx_len = seq_len - query_len = -1",
    ),
    C(
        "block-table-too-narrow",
        ATTENTION,
        _both(_set("seq_lens", 1, 100), _with(max_seq_len=100)),
        (BME,),
        ("block_table",),
        (1,),
        why="seq_len 100 needs 7 blocks, the table has 3 columns",
    ),
    C(
        "seq-len-int32-max",
        ATTENTION,
        _both(_set("seq_lens", 1, I32_MAX), _with(max_seq_len=I32_MAX)),
        (BME,),
        ("block_table",),
        (1,),
        why="positions near 2^31 overflow 32-bit arithmetic",
    ),
    # ---- cu_seqlens_q
    C(
        "cu-decreasing",
        ATTENTION,
        _with(cu_seqlens_q=lambda b: _i32([0, 5, 3, 9], b)),
        (BME,),
        ("cu_seqlens_q",),
        (1, 2),
        nan_or_right=(0,),
        why="rows 3-4 are claimed by sequences 0 and 2: unconstrained; a broken "
        "cu_seqlens_q may poison the whole batch",
    ),
    C(
        "cu-negative-entry",
        ATTENTION,
        _with(cu_seqlens_q=lambda b: _i32([0, -4, 6, 9], b)),
        (BME,),
        ("cu_seqlens_q",),
        (0, 1),
        nan_or_right=(2,),
        why="sequence 1 would start 4 rows before q",
    ),
    C(
        "cu-not-starting-at-0",
        ATTENTION,
        _with(cu_seqlens_q=lambda b: _i32([2, 5, 6, 9], b)),
        (BME, SE),
        ("cu_seqlens_q",),
        (),
        why="rows 0-1 belong to no sequence",
    ),
    C(
        "cu-starting-negative",
        ATTENTION,
        _with(cu_seqlens_q=lambda b: _i32([-2, 5, 6, 9], b)),
        (BME, SE),
        ("cu_seqlens_q",),
        (0,),
    ),
    C(
        "cu-ends-before-tokens",
        ATTENTION,
        _with(cu_seqlens_q=lambda b: _i32([0, 5, 6, 8], b)),
        (BME, SE),
        ("cu_seqlens_q", "q"),
        (),
        why="row 8 belongs to no sequence",
    ),
    C(
        "cu-ends-after-tokens",
        ATTENTION,
        _both(_with(cu_seqlens_q=lambda b: _i32([0, 5, 6, 12], b), max_query_len=6), _set("seq_lens", 2, 6)),
        (BME, SE),
        ("cu_seqlens_q", "q"),
        (2,),
        why="sequence 2 would read and write rows 9-11 past q and out",
    ),
    C(
        "cu-end-int32-max",
        ATTENTION,
        _with(cu_seqlens_q=lambda b: _i32([0, 5, 6, I32_MAX], b)),
        (BME, SE),
        ("cu_seqlens_q", "q", "seq_lens[2]", "max_query_len"),
        (2,),
        why="several rules broken: any may be named",
    ),
    # ---- the maxima
    C(
        "max-query-len-too-small",
        ATTENTION,
        _with(max_query_len=2),
        (BME,),
        ("max_query_len",),
        (),
        nan_or_right=(0, 2),
        why="a kernel that does not rely on the bound may still compute the right rows",
    ),
    C(
        "max-seq-len-too-small",
        FULL + ("prefix_prefill", "planner_context"),
        _with(max_seq_len=10),
        (BME,),
        ("max_seq_len",),
        (),
        nan_or_right=(0, 1),
        why="the context compat ops ignore max_seq_len on purpose "
        "(documented); a kernel that does not rely on the bound may still compute the right rows",
    ),
    # ---- q rows vs the batch
    C(
        "q-fewer-rows",
        ATTENTION,
        _rows(7),
        (BME, SE),
        ("q", "cu_seqlens_q"),
        (2,),
        why="the review's heap corruption: sequence 2's rows 7-8 are past q and out",
    ),
    C("q-more-rows", ATTENTION, _rows(11), (BME, SE), ("q", "cu_seqlens_q"), (), why="rows 9-10 belong to no sequence"),
    # ---- host-side checks: raised with or without validation
    _host(
        "out-wrong-shape",
        ATTENTION,
        "out",
        lambda b: torch.empty(9, NUM_Q_HEADS, 16, device=b.q.device, dtype=b.q.dtype),
        (SE,),
    ),
    _host(
        "out-wrong-dtype",
        ATTENTION,
        "out",
        lambda b: torch.empty(b.q.shape, device=b.q.device, dtype=torch.float32),
        (DTE,),
    ),
    _host(
        "out-fewer-rows",
        ATTENTION,
        "out",
        lambda b: torch.empty(7, NUM_Q_HEADS, HEAD_SIZE, device=b.q.device, dtype=b.q.dtype),
        (SE,),
    ),
    _host("k-new-wrong-rows", CONTEXT, "k_new", lambda b: b.k_new[:7].contiguous(), (SE,)),
    _host("v-new-wrong-rows", CONTEXT, "v_new", lambda b: b.v_new[:8].contiguous(), (SE,)),
    C(
        "fp8-cache-no-k-scale",
        tuple(e for e in ATTENTION if e != "attention"),
        _fp8_no_k_scale,
        (SCE,),
        ("k_scale",),
        None,
        why="PagedKVCache always has a scale, so `attention` cannot express it",
    ),
    C(
        "seq-lens-fewer-entries",
        ATTENTION,
        _with(seq_lens=lambda b: b.seq_lens[:2].contiguous()),
        (SE, BME),
        ("cu_seqlens_q", "seq_lens"),
        None,
        why="num_seqs: 3 from cu_seqlens_q, 2 from seq_lens",
    ),
    _host("cu-more-entries", ATTENTION, "cu_seqlens_q", lambda b: _i32([0, 5, 6, 9, 9], b), (SE, BME)),
    _host("block-table-fewer-rows", ATTENTION, "block_table", lambda b: b.block_table[:2].contiguous(), (SE, BME)),
    _host(
        "seq-lens-int64",
        NATIVE,
        "seq_lens",
        lambda b: b.seq_lens.long(),
        (DTE,),
        why="the compat ops convert int64 metadata on purpose (documented)",
    ),
    _host("block-table-float", ATTENTION, "block_table", lambda b: b.block_table.float(), (DTE,)),
    _host("cu-rank-2", ATTENTION, "cu_seqlens_q", lambda b: b.cu_seqlens_q[None], (SE,)),
    _host(
        "block-table-other-device",
        tuple(e for e in ATTENTION if e != "ops_paged_attention"),
        "block_table",
        lambda b: _other_device(b.block_table),
        (DE,),
        why="on a CPU the other device is 'meta', which the custom-op dispatcher sends to the fake implementation",
    ),
    # ---- the write op: slots outside [-1, num_slots)
    C(
        "slot-equals-num-slots",
        WRITE,
        _set("slot_mapping", 3, NUM_BLOCKS * BLOCK_SIZE),
        (BME,),
        ("slot_mapping[3]",),
        (),
        bad_slots=(3,),
    ),
    C("slot-below-minus-one", WRITE, _set("slot_mapping", 0, -2), (BME,), ("slot_mapping[0]",), (), bad_slots=(0,)),
    C("slot-huge", WRITE, _set("slot_mapping", 4, 2**62), (BME,), ("slot_mapping[4]",), (), bad_slots=(4,)),
    C("slot-int64-min", WRITE, _set("slot_mapping", 8, -(2**63)), (BME,), ("slot_mapping[8]",), (), bad_slots=(8,)),
    C(
        "slot-int64-max",
        WRITE,
        _set("slot_mapping", 5, 2**63 - 1),
        (BME,),
        ("slot_mapping[5]",),
        (),
        bad_slots=(5,),
        why="block * stride wraps around in int64",
    ),
    _host(
        "slot-mapping-int32",
        ("write_kv",),
        "slot_mapping",
        lambda b: b.slot_mapping.int(),
        (DTE,),
        why="reshape_and_cache_flash converts int32 slots on purpose",
    ),
    _host(
        "slot-mapping-short",
        ("write_kv",),
        "slot_mapping",
        lambda b: b.slot_mapping[:8].contiguous(),
        (SE,),
        why="reshape_and_cache_flash takes fewer slots than rows on purpose (vLLM padding)",
    ),
)
CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


# ---------------------------------------------------------------------------------------------
# entry points: each one's signature over a Batch
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EntryPoint:
    name: str
    contract: str  # "full" | "context" | "write"
    decode_from_cache: bool = False
    layout: str = "nhd"  # "nhd" | "vllm_v0"
    aliases: dict = field(default_factory=dict)  # pagedattn's argument name -> this entry's
    library_out: bool = False  # `out` may be left to the library
    host_copies: bool = False  # passes query_lens_host / seq_lens_host / block_table_host


ENTRY_POINTS = {
    e.name: e
    for e in (
        EntryPoint("paged_attention", "full", library_out=True),
        EntryPoint("paged_attention_hnd", "full", layout="hnd", library_out=True),  # kv_layout="hnd" caches
        EntryPoint("prefix_prefill", "context", library_out=True),
        EntryPoint("ops_paged_attention", "full", library_out=True),  # torch.ops.pagedattn.paged_attention
        EntryPoint("attention", "full", library_out=True),
        EntryPoint("planner", "full", library_out=True, host_copies=True),
        EntryPoint("planner_context", "context", library_out=True),
        EntryPoint(
            "unified_attention",
            "full",
            aliases=dict(
                k_cache="k",
                v_cache="v",
                seq_lens="seqused_k",
                max_query_len="max_seqlen_q",
                max_seq_len="max_seqlen_k",
                k_scale="k_descale",
                v_scale="v_descale",
            ),
        ),
        EntryPoint(
            "context_attention_fwd",
            "context",
            layout="vllm_v0",
            aliases=dict(
                k_new="k",
                v_new="v",
                out="o",
                cu_seqlens_q="b_start_loc",
                seq_lens="b_seq_len",
                block_table="b_loc",
                max_query_len="max_input_len",
            ),
        ),
        EntryPoint(
            "chunked_prefill_paged_decode",
            "context",
            decode_from_cache=True,
            layout="vllm_v0",
            aliases=dict(
                q="query",
                k_new="key",
                v_new="value",
                out="output",
                cu_seqlens_q="query_start_loc",
                k_cache="key_cache",
                v_cache="value_cache",
            ),
        ),
        EntryPoint("write_kv", "write"),
        EntryPoint(
            "reshape_and_cache_flash",
            "write",
            aliases=dict(k="key", v="value", k_cache="key_cache", v_cache="value_cache"),
        ),
    )
}


def names_argument(message: str, entry: EntryPoint, args: tuple[str, ...]) -> bool:
    """Does `message` name one of `args`, by pagedattn's name or the entry point's own?"""
    for arg in args:
        root, rest = re.match(r"([a-z_0-9]+)(.*)", arg).groups()
        for name in {root, entry.aliases.get(root, root)}:
            if re.search(rf"(?<![a-z_0-9]){re.escape(name + rest)}(?![a-z_0-9])", message):
                return True
    return False


def applicable(entries=None, cases=None) -> list[tuple[Case, str]]:
    """(case, entry point) pairs, in catalogue order."""
    return [
        (c, e)
        for c in CASES
        if cases is None or c.name in cases
        for e in c.entry_points
        if entries is None or e in entries
    ]


def planned_runs(entries=None, cases=None, out_mode: str = "both", select: str = "full") -> list[tuple]:
    """The unvalidated runs, as (case or None, entry point, out_mode), in a fixed order.

    select "full": every case over every entry point it applies to; "ci" (interpreter-sized): the
    valid batch, the host-side checks and the write op everywhere, but each case that runs an
    attention kernel through two entry points only, one per contract, taken in turn from those it
    applies to (for LIBRARY_OUT_CASES, from those where the library may allocate `out`). out_mode
    "both": `out` given by the caller, and also left to the library for LIBRARY_OUT_CASES."""
    entries = list(ENTRY_POINTS) if entries is None else list(entries)
    runs = []
    if cases is None or "valid" in cases:
        runs += [(None, e, "library" if ENTRY_POINTS[e].library_out else "user") for e in entries]
    turn = 0
    for case in CASES:
        if cases is not None and case.name not in cases:
            continue
        chosen = [e for e in case.entry_points if e in entries]
        if select == "ci" and not case.host_check and chosen and ENTRY_POINTS[chosen[0]].contract != "write":
            picks = []
            for contract in ("full", "context"):
                pool = [e for e in chosen if ENTRY_POINTS[e].contract == contract]
                if case.name in LIBRARY_OUT_CASES:
                    pool = [e for e in pool if ENTRY_POINTS[e].library_out] or pool
                if pool:
                    picks.append(pool[turn % len(pool)])
            chosen = picks
            turn += 1
        for e in chosen:
            if out_mode in ("user", "both"):
                runs.append((case, e, "user"))
            if (
                out_mode != "user"
                and ENTRY_POINTS[e].library_out
                and not case.host_check
                and (out_mode == "library" or case.name in LIBRARY_OUT_CASES)
            ):
                runs.append((case, e, "library"))
    return runs


def run_label(case: Case | None, entry: str, out_mode: str) -> str:
    return f"{case.name if case else 'valid'}/{entry}/{out_mode}"


if __name__ == "__main__":
    from pagedattn.catalogue_run import main

    sys.exit(main())
