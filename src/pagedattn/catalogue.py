"""The bad-metadata catalogue, as data: every way an engine can hand over wrong metadata, over
every entry point it applies to, with what must happen.

    validated   (validate=True, checked mode, or the CPU/interpreter default): the call raises
                `case.error`, its message names one of `case.args`, and nothing is touched.
    unvalidated (validate=False): host-side checks (`case.bad_seqs is None`) still raise; otherwise
                the call runs and must not crash, must not read or write outside its tensors, must
                give NaN rows for the sequences in `case.bad_seqs` and reference rows for the others,
                and NaN rows that no sequence covers when the library allocated `out`. The write op
                skips the tokens in `case.bad_slots` and writes the others.

Every case starts from `base_batch()`, one small valid mixed batch, and changes it in one place:

    sequence          0        1        2
    query_len         5        1        3          cu_seqlens_q [0, 5, 6, 9], 9 tokens
    seq_len          17       21        3          ctx_len 12, 20, 0
    block_table   [3, 6, 1] [0, 5, 1] [7, 1, 1]    8 blocks of 16; 1, 2, 4 unused; padding 1

All K/V in the cache are finite (unused blocks too), so a NaN in the output is the library's
answer, never an accident of the data; `k_new`/`v_new` equal the cache at the query positions, so
both contracts give the same answer. Run a case with `check(case, entry, device)`: it returns the
list of broken promises (empty = the case passed); `python -m pagedattn.catalogue` runs many, one
line each (the test suite runs it in a subprocess, so a crash is a failure, not a dead worker;
scripts/sanitize_catalogue.py runs it under compute-sanitizer).
"""

from __future__ import annotations

import dataclasses
import json
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
I32_MAX, I32_MIN = 2 ** 31 - 1, -2 ** 31


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
        k_cache=k_cache.to(device=device, dtype=dtype), v_cache=v_cache.to(device=device, dtype=dtype),
        k_new=torch.cat(k_new).to(device=device, dtype=dtype), v_new=torch.cat(v_new).to(device=device, dtype=dtype),
        cu_seqlens_q=torch.tensor([0, 5, 6, 9], **i32), seq_lens=torch.tensor(SEQ_LENS, **i32),
        block_table=torch.tensor(BLOCK_TABLE, **i32), max_query_len=max(QUERY_LENS), max_seq_len=max(SEQ_LENS),
        slot_mapping=torch.tensor(WRITE_SLOTS, dtype=torch.int64, device=device),
    )


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
FULL = ("paged_attention", "paged_attention_hnd", "attention", "planner", "ops_paged_attention", "unified_attention")
CONTEXT = ("prefix_prefill", "planner_context", "context_attention_fwd", "chunked_prefill_paged_decode")
ATTENTION = FULL + CONTEXT
NATIVE = ("paged_attention", "paged_attention_hnd", "prefix_prefill", "attention", "planner", "planner_context",
          "ops_paged_attention")
WRITE = ("write_kv", "reshape_and_cache_flash")
# cases that are also run with `out` left to the library: rows that no sequence covers must come
# out NaN, and rows past q must not be written past the allocation
LIBRARY_OUT_CASES = ("cu-not-starting-at-0", "cu-ends-before-tokens", "cu-ends-after-tokens", "cu-end-int32-max",
                     "q-fewer-rows", "q-more-rows")


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


BME, SE, DE, DTE, SCE = "BatchMetadataError", "ShapeError", "DeviceError", "DTypeError", "ScaleError"
C = Case
CASES: tuple[Case, ...] = (
    # ---- block ids (only entries every contract reads: seq 0 block 0, seq 1 blocks 0-1)
    C("block-id-past-cache", ATTENTION, _set("block_table", (1, 1), 1000), (BME,), ("block_table[1, 1]",), (1,)),
    C("block-id-equals-num-blocks", ATTENTION, _set("block_table", (0, 0), NUM_BLOCKS), (BME,),
      ("block_table[0, 0]",), (0,), why="off by one: the first id past the cache"),
    C("block-id-negative", ATTENTION, _set("block_table", (1, 0), -1), (BME,), ("block_table[1, 0]",), (1,)),
    C("block-id-int32-min", ATTENTION, _set("block_table", (1, 1), I32_MIN), (BME,), ("block_table[1, 1]",), (1,),
      why="id * stride overflows 32-bit arithmetic"),
    C("block-id-int32-max", ATTENTION, _set("block_table", (0, 0), I32_MAX), (BME,), ("block_table[0, 0]",), (0,)),
    # ---- seq_lens
    C("seq-len-negative", ATTENTION, _set("seq_lens", 1, -3), (BME,), ("seq_lens[1]",), (1,)),
    C("seq-len-below-query-len", ATTENTION, _set("seq_lens", 0, 2), (BME,), ("seq_lens[0]",), (0,)),
    C("seq-len-zero-with-query", ATTENTION, _set("seq_lens", 2, 0), (BME,), ("seq_lens[2]",), (2,)),
    C("ctx-len-negative", CONTEXT, _set("seq_lens", 2, 2), (BME,), ("seq_lens[2]",), (2,),
      why="context contract: ctx_len = seq_len - query_len = -1"),
    C("block-table-too-narrow", ATTENTION, _both(_set("seq_lens", 1, 100), _with(max_seq_len=100)), (BME,),
      ("block_table",), (1,), why="seq_len 100 needs 7 blocks, the table has 3 columns"),
    C("seq-len-int32-max", ATTENTION, _both(_set("seq_lens", 1, I32_MAX), _with(max_seq_len=I32_MAX)), (BME,),
      ("block_table",), (1,), why="positions near 2^31 overflow 32-bit arithmetic"),
    # ---- cu_seqlens_q
    C("cu-decreasing", ATTENTION, _with(cu_seqlens_q=lambda b: _i32([0, 5, 3, 9], b)), (BME,), ("cu_seqlens_q",),
      (1, 2), nan_or_right=(0,), why="rows 3-4 are claimed by sequences 0 and 2: unconstrained; a broken "
      "cu_seqlens_q may poison the whole batch"),
    C("cu-negative-entry", ATTENTION, _with(cu_seqlens_q=lambda b: _i32([0, -4, 6, 9], b)), (BME,),
      ("cu_seqlens_q",), (0, 1), nan_or_right=(2,), why="sequence 1 would start 4 rows before q"),
    C("cu-not-starting-at-0", ATTENTION, _with(cu_seqlens_q=lambda b: _i32([2, 5, 6, 9], b)), (BME, SE),
      ("cu_seqlens_q",), (), why="rows 0-1 belong to no sequence"),
    C("cu-starting-negative", ATTENTION, _with(cu_seqlens_q=lambda b: _i32([-2, 5, 6, 9], b)), (BME, SE),
      ("cu_seqlens_q",), (0,)),
    C("cu-ends-before-tokens", ATTENTION, _with(cu_seqlens_q=lambda b: _i32([0, 5, 6, 8], b)), (BME, SE),
      ("cu_seqlens_q", "q"), (), why="row 8 belongs to no sequence"),
    C("cu-ends-after-tokens", ATTENTION, _both(_with(cu_seqlens_q=lambda b: _i32([0, 5, 6, 12], b), max_query_len=6),
                                               _set("seq_lens", 2, 6)), (BME, SE), ("cu_seqlens_q", "q"), (2,),
      why="sequence 2 would read and write rows 9-11 past q and out"),
    C("cu-end-int32-max", ATTENTION, _with(cu_seqlens_q=lambda b: _i32([0, 5, 6, I32_MAX], b)), (BME, SE),
      ("cu_seqlens_q", "q", "seq_lens[2]", "max_query_len"), (2,), why="several rules broken: any may be named"),
    # ---- the maxima
    C("max-query-len-too-small", ATTENTION, _with(max_query_len=2), (BME,), ("max_query_len",), (),
      nan_or_right=(0, 2), why="a kernel that does not rely on the bound may still compute the right rows"),
    C("max-seq-len-too-small", FULL + ("prefix_prefill", "planner_context"), _with(max_seq_len=10), (BME,),
      ("max_seq_len",), (), nan_or_right=(0, 1), why="the context compat ops ignore max_seq_len on purpose "
      "(documented); a kernel that does not rely on the bound may still compute the right rows"),
    # ---- q rows vs the batch
    C("q-fewer-rows", ATTENTION, _rows(7), (BME, SE), ("q", "cu_seqlens_q"), (2,),
      why="the review's heap corruption: sequence 2's rows 7-8 are past q and out"),
    C("q-more-rows", ATTENTION, _rows(11), (BME, SE), ("q", "cu_seqlens_q"), (),
      why="rows 9-10 belong to no sequence"),
    # ---- host-side checks: raised with or without validation
    C("out-wrong-shape", ATTENTION, _with(out=lambda b: torch.empty(9, NUM_Q_HEADS, 16, device=b.q.device,
                                                                      dtype=b.q.dtype)), (SE,), ("out",), None),
    C("out-wrong-dtype", ATTENTION, _with(out=lambda b: torch.empty(b.q.shape, device=b.q.device,
                                                                      dtype=torch.float32)), (DTE,), ("out",), None),
    C("out-fewer-rows", ATTENTION, _with(out=lambda b: torch.empty(7, NUM_Q_HEADS, HEAD_SIZE, device=b.q.device,
                                                                     dtype=b.q.dtype)), (SE,), ("out",), None),
    C("k-new-wrong-rows", CONTEXT, _with(k_new=lambda b: b.k_new[:7].contiguous()), (SE,), ("k_new",), None),
    C("v-new-wrong-rows", CONTEXT, _with(v_new=lambda b: b.v_new[:8].contiguous()), (SE,), ("v_new",), None),
    C("fp8-cache-no-k-scale", tuple(e for e in ATTENTION if e != "attention"), _fp8_no_k_scale, (SCE,),
      ("k_scale",), None, why="PagedKVCache always has a scale, so `attention` cannot express it"),
    C("seq-lens-fewer-entries", ATTENTION, _with(seq_lens=lambda b: b.seq_lens[:2].contiguous()), (SE, BME),
      ("cu_seqlens_q", "seq_lens"), None, why="num_seqs: 3 from cu_seqlens_q, 2 from seq_lens"),
    C("cu-more-entries", ATTENTION, _with(cu_seqlens_q=lambda b: _i32([0, 5, 6, 9, 9], b)), (SE, BME),
      ("cu_seqlens_q",), None),
    C("block-table-fewer-rows", ATTENTION, _with(block_table=lambda b: b.block_table[:2].contiguous()), (SE, BME),
      ("block_table",), None),
    C("seq-lens-int64", NATIVE, _with(seq_lens=lambda b: b.seq_lens.long()), (DTE,), ("seq_lens",), None,
      why="the compat ops convert int64 metadata on purpose (documented)"),
    C("block-table-float", ATTENTION, _with(block_table=lambda b: b.block_table.float()), (DTE,), ("block_table",),
      None),
    C("cu-rank-2", ATTENTION, _with(cu_seqlens_q=lambda b: b.cu_seqlens_q[None]), (SE,), ("cu_seqlens_q",), None),
    C("block-table-other-device", ATTENTION, _with(block_table=lambda b: _other_device(b.block_table)), (DE,),
      ("block_table",), None),
    # ---- the write op: slots outside [-1, num_slots)
    C("slot-equals-num-slots", WRITE, _set("slot_mapping", 3, NUM_BLOCKS * BLOCK_SIZE), (BME,),
      ("slot_mapping[3]",), (), bad_slots=(3,)),
    C("slot-below-minus-one", WRITE, _set("slot_mapping", 0, -2), (BME,), ("slot_mapping[0]",), (), bad_slots=(0,)),
    C("slot-huge", WRITE, _set("slot_mapping", 4, 2 ** 62), (BME,), ("slot_mapping[4]",), (), bad_slots=(4,)),
    C("slot-int64-min", WRITE, _set("slot_mapping", 8, -2 ** 63), (BME,), ("slot_mapping[8]",), (), bad_slots=(8,)),
    C("slot-int64-max", WRITE, _set("slot_mapping", 5, 2 ** 63 - 1), (BME,), ("slot_mapping[5]",), (),
      bad_slots=(5,), why="block * stride wraps around in int64"),
    C("slot-mapping-int32", ("write_kv",), _with(slot_mapping=lambda b: b.slot_mapping.int()), (DTE,),
      ("slot_mapping",), None, why="reshape_and_cache_flash converts int32 slots on purpose"),
    C("slot-mapping-short", ("write_kv",), _with(slot_mapping=lambda b: b.slot_mapping[:8].contiguous()), (SE,),
      ("slot_mapping",), None, why="reshape_and_cache_flash takes fewer slots than rows on purpose (vLLM padding)"),
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


ENTRY_POINTS = {e.name: e for e in (
    EntryPoint("paged_attention", "full", library_out=True),
    EntryPoint("paged_attention_hnd", "full", layout="hnd", library_out=True),  # kv_layout="hnd" caches
    EntryPoint("prefix_prefill", "context", library_out=True),
    EntryPoint("ops_paged_attention", "full", library_out=True),  # torch.ops.pagedattn.paged_attention
    EntryPoint("attention", "full", library_out=True),
    EntryPoint("planner", "full", library_out=True, host_copies=True),
    EntryPoint("planner_context", "context", library_out=True),
    EntryPoint("unified_attention", "full", aliases=dict(
        k_cache="k", v_cache="v", seq_lens="seqused_k", max_query_len="max_seqlen_q", max_seq_len="max_seqlen_k",
        k_scale="k_descale", v_scale="v_descale")),
    EntryPoint("context_attention_fwd", "context", layout="vllm_v0", aliases=dict(
        k_new="k", v_new="v", out="o", cu_seqlens_q="b_start_loc", seq_lens="b_seq_len", block_table="b_loc",
        max_query_len="max_input_len")),
    EntryPoint("chunked_prefill_paged_decode", "context", decode_from_cache=True, layout="vllm_v0", aliases=dict(
        q="query", k_new="key", v_new="value", out="output", cu_seqlens_q="query_start_loc",
        k_cache="key_cache", v_cache="value_cache")),
    EntryPoint("write_kv", "write"),
    EntryPoint("reshape_and_cache_flash", "write", aliases=dict(k="key", v="value", k_cache="key_cache",
                                                                 v_cache="value_cache")),
)}


def names_argument(message: str, entry: EntryPoint, args: tuple[str, ...]) -> bool:
    """Does `message` name one of `args`, by pagedattn's name or the entry point's own?"""
    for arg in args:
        root, rest = re.match(r"([a-z_0-9]+)(.*)", arg).groups()
        for name in {root, entry.aliases.get(root, root)}:
            if re.search(rf"(?<![a-z_0-9]){re.escape(name + rest)}(?![a-z_0-9])", message):
                return True
    return False


class Guarded:
    """`t`'s values in the middle of a larger buffer whose margins hold SENTINEL: a write past the
    view changes a margin; a read past it gets finite numbers where NaN is due."""

    def __init__(self, t: torch.Tensor, margin: int):
        self.buffer = torch.full((2 * margin + t.numel(),), SENTINEL, device=t.device).to(t.dtype)
        self.view = self.buffer[margin:margin + t.numel()].view(t.shape)
        self.view.copy_(t)
        self.before = _bits(self.buffer)

    def margins_intact(self) -> bool:
        n = self.view.numel()
        margin = (self.buffer.numel() - n) // 2
        now = _bits(self.buffer)
        return torch.equal(now[:margin * self._size], self.before[:margin * self._size]) and \
            torch.equal(now[(margin + n) * self._size:], self.before[(margin + n) * self._size:])

    def unchanged(self) -> bool:
        return torch.equal(_bits(self.buffer), self.before)

    @property
    def _size(self) -> int:
        return self.buffer.element_size()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).cpu().clone() if t.numel() else torch.empty(0, dtype=torch.uint8)


def _to_v0(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nhd caches -> vLLM's older layout (copies)."""
    nb, bs, kvh, d = k.shape
    x = max(1, 16 // k.element_size())
    return (k.reshape(nb, bs, kvh, d // x, x).permute(0, 2, 3, 1, 4).contiguous(),
            v.permute(0, 2, 3, 1).contiguous())


@dataclass
class Prepared:
    """A batch laid out for one entry point: every tensor it reads or writes inside a Guarded buffer."""
    entry: EntryPoint
    batch: Batch
    guards: dict  # name -> Guarded
    out_mode: str  # "library" (out=None) | "user" (a Guarded out that starts as SENTINEL)

    def t(self, name: str):
        return self.guards[name].view if name in self.guards else getattr(self.batch, name)


def prepare(entry: EntryPoint, b: Batch, out_mode: str = "user") -> Prepared:
    row = lambda t: t[0].numel() if t.dim() and t.shape[0] else 1  # noqa: E731
    guards = {}
    k, v = b.k_cache, b.v_cache
    if entry.layout == "vllm_v0" and k.dim() == 4:
        k, v = _to_v0(k, v)
    elif entry.layout == "hnd" and k.dim() == 4:
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    for name, t in (("k_cache", k), ("v_cache", v)):
        guards[name] = Guarded(t, 2 * row(t))
    for name in ("q", "k_new", "v_new", "cu_seqlens_q", "seq_lens", "block_table", "slot_mapping"):
        t = getattr(b, name)
        if t.device.type != "meta" and t.dim() > 0:
            guards[name] = Guarded(t, 2 * row(t))
    if b.out is not None:
        guards["out"] = Guarded(b.out, 2 * row(b.out))
    elif entry.contract != "write" and (out_mode == "user" or not entry.library_out):
        out_mode = "user"
        guards["out"] = Guarded(torch.full(b.q.shape, SENTINEL, device=b.q.device).to(b.q.dtype), 2 * row(b.q))
    return Prepared(entry, b, guards, out_mode)


def call(p: Prepared, validate):
    """Run the entry point; returns its output tensor (None for the write op)."""
    import pagedattn
    from pagedattn.attention import attention, paged_attention, prefix_prefill
    from pagedattn.compat import vllm
    from pagedattn.kernels.write import write_kv
    b, t, name = p.batch, p.t, p.entry.name
    out = t("out") if "out" in p.guards else None
    meta = (t("cu_seqlens_q"), t("seq_lens"), t("block_table"))
    kc, vc = t("k_cache"), t("v_cache")
    scales = dict(k_scale=b.k_scale, v_scale=b.v_scale)
    if kc.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) and name not in ("planner", "planner_context"):
        scales = {}
    sizes = dict(max_query_len=b.max_query_len, max_seq_len=b.max_seq_len)
    if name in ("paged_attention", "paged_attention_hnd"):
        return paged_attention(t("q"), kc, vc, *meta, **sizes, **scales, out=out, kv_layout=p.entry.layout,
                               validate=validate)
    if name == "ops_paged_attention":
        from pagedattn import ops
        return ops.paged_attention(t("q"), kc, vc, *meta, **sizes, **scales, out=out, validate=validate)
    if name == "prefix_prefill":
        return prefix_prefill(t("q"), t("k_new"), t("v_new"), kc, vc, *meta, **sizes, **scales, out=out,
                              validate=validate)
    if name == "attention":
        cache = pagedattn.PagedKVCache(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=b.q.dtype,
                                       device=b.q.device, poison=False)
        cache.k, cache.v = kc, vc
        batch = pagedattn.BatchMetadata(*meta, **sizes)
        return attention(t("q"), cache, batch, out=out, validate=validate)
    if name in ("planner", "planner_context"):
        options = pagedattn.AttentionOptions(**scales)
        planner = pagedattn.PagedAttention(
            options, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE,
            block_size=BLOCK_SIZE, dtype=b.q.dtype, kv_cache_dtype=b.k_cache.dtype, num_blocks=NUM_BLOCKS,
            device=b.q.device, contract="context" if name == "planner_context" else "full")
        hosts = {}
        if p.entry.host_copies and all(m.device.type != "meta" for m in meta):
            cu = meta[0].flatten().tolist()
            hosts = dict(query_lens_host=tuple(y - x for x, y in zip(cu, cu[1:])),
                         seq_lens_host=tuple(meta[1].flatten().tolist()), block_table_host=meta[2].cpu())
        planner.plan(*meta, **hosts, **sizes, validate=validate)
        news = dict(k_new=t("k_new"), v_new=t("v_new")) if name == "planner_context" else {}
        return planner.run(t("q"), kc, vc, out=out, **news)
    if name == "unified_attention":
        return vllm.unified_attention(
            t("q"), kc, vc, out, meta[0], b.max_query_len, meta[1], b.max_seq_len, HEAD_SIZE ** -0.5, True,
            (-1, -1), meta[2], 0, None, scales.get("k_scale"), scales.get("v_scale"), validate=validate)
    if name in ("context_attention_fwd", "chunked_prefill_paged_decode"):
        fp8 = kc.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        kv_dtype = "fp8_e4m3" if fp8 else "auto"
        ks, vs = (b.k_scale, b.v_scale) if fp8 else (1.0, 1.0)
        if name == "context_attention_fwd":
            return vllm.context_attention_fwd(t("q"), t("k_new"), t("v_new"), out, kv_dtype, kc, vc, meta[2],
                                              meta[0], meta[1], b.max_seq_len, b.max_query_len, ks, vs,
                                              validate=validate)
        return vllm.chunked_prefill_paged_decode(t("q"), t("k_new"), t("v_new"), out, kv_dtype, kc, vc, meta[2],
                                                 meta[0], meta[1], b.max_seq_len, b.max_query_len, ks, vs,
                                                 validate=validate)
    if name == "write_kv":
        write_kv(t("k_new"), t("v_new"), kc, vc, t("slot_mapping"), validate=validate)
        return None
    if name == "reshape_and_cache_flash":
        vllm.reshape_and_cache_flash(t("k_new"), t("v_new"), kc, vc, t("slot_mapping"), "auto", 1.0, 1.0,
                                     validate=validate)
        return None
    raise ValueError(f"unknown entry point {name!r}")


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------
def row_owners(cu: list[int], num_tokens: int) -> list[list[int]]:
    """For each row of q, the sequences whose [cu[s], cu[s + 1]) range claims it."""
    owners = [[] for _ in range(num_tokens)]
    for s in range(len(cu) - 1):
        for r in range(max(cu[s], 0), min(cu[s + 1], num_tokens)):
            owners[r].append(s)
    return owners


def reference_rows(b: Batch, entry: EntryPoint, s: int, rows: list[int]) -> torch.Tensor:
    """The reference output of sequence s (whose metadata is valid) at q's `rows`."""
    from pagedattn import reference
    cu = b.cu_seqlens_q.tolist()
    r0, r1 = cu[s], cu[s + 1]
    ctx = entry.contract == "context"
    ref = reference.attention(
        b.q[r0:r1].cpu(), b.k_cache.cpu(), b.v_cache.cpu(), torch.tensor([0, r1 - r0], dtype=torch.int32),
        b.seq_lens[s:s + 1].cpu(), b.block_table[s:s + 1].cpu(),
        k_new=b.k_new[r0:r1].cpu() if ctx else None, v_new=b.v_new[r0:r1].cpu() if ctx else None,
        decode_from_cache=entry.decode_from_cache)
    return ref[[r - r0 for r in rows]]


def _error_class(name: str):
    from pagedattn import errors
    return getattr(errors, name)


def check(case: Case | None, entry_name: str, device="cpu", *, validate: bool | None = False,
          out_mode: str = "user", dtype=torch.float16) -> list[str]:
    """Run `case` (None: the valid base batch) through an entry point; the broken promises.
    validate=None: the library's default, which validates on the CPU and with host copies."""
    entry = ENTRY_POINTS[entry_name]
    b = base_batch(device, dtype)
    if case is not None:
        b = case.mutate(b)
    p = prepare(entry, b, out_mode)
    problems = []
    validated = validate if validate is not None else (torch.device(device).type == "cpu" or entry.host_copies)
    expect_error = case is not None and bool(case.error) and (validated or case.host_check or _host_count_differs(p))
    try:
        out = call(p, validate)
    except Exception as e:  # noqa: BLE001  (the kind of exception is what is checked)
        if not expect_error:
            return [f"raised {type(e).__name__}: {e}"]
        if not any(isinstance(e, _error_class(c)) for c in case.error):
            problems.append(f"raised {type(e).__name__}, expected {'/'.join(case.error)}: {e}")
        elif not names_argument(str(e), entry, case.args):
            problems.append(f"{type(e).__name__} does not name {' or '.join(case.args)}: {e}")
        problems += [f"{n} changed by a refused call" for n, g in p.guards.items() if not g.unchanged()]
        return problems
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    if expect_error:
        return [f"accepted; expected {'/'.join(case.error)} naming {' or '.join(case.args)}"]
    for name, g in p.guards.items():
        if name == "out":
            if not g.margins_intact():
                problems.append("written past the ends of out")
        elif entry.contract == "write" and name in ("k_cache", "v_cache"):
            problems += _check_write(case, p, name)
        elif not g.unchanged():
            problems.append(f"{name} changed (only out may be written)")
    if entry.contract != "write":
        problems += _check_rows(case, p, out)
    return problems


def _host_count_differs(p: Prepared) -> bool:
    """Where the batch's token count is known on the host (host copies given, or a planner's CPU
    metadata, which is its own host copy), q's rows are checked against it always."""
    cu_on_host = p.entry.name.startswith("planner") and p.batch.cu_seqlens_q.device.type == "cpu"
    if not (p.entry.host_copies or cu_on_host) or p.batch.cu_seqlens_q.device.type == "meta" \
            or p.batch.cu_seqlens_q.dim() != 1:
        return False
    cu = p.batch.cu_seqlens_q.tolist()
    return cu[-1] - cu[0] != p.batch.q.shape[0]


def _check_write(case: Case | None, p: Prepared, name: str) -> list[str]:
    g = p.guards[name]
    if not g.margins_intact():
        return [f"written outside {name}"]
    src = p.batch.k_new if name == "k_cache" else p.batch.v_new
    expected = p.batch.k_cache.clone() if name == "k_cache" else p.batch.v_cache.clone()
    slots = p.batch.slot_mapping.tolist()
    for i, slot in enumerate(slots):
        if case is not None and i in case.bad_slots:
            continue
        expected[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = src[i]
    if not torch.equal(_bits(g.view), _bits(expected)):
        row = HEAD_SIZE * g.view.element_size()
        wrong = (_bits(g.view).view(-1, row) != _bits(expected).view(-1, row)).any(1)
        rows = wrong.nonzero().flatten().tolist()
        return [f"{name}: {len(rows)} (slot, head) rows differ from the expected write, first "
                f"{[(r // NUM_KV_HEADS, r % NUM_KV_HEADS) for r in rows[:3]]}"]
    return []


def _check_rows(case: Case | None, p: Prepared, out) -> list[str]:
    try:
        from pagedattn.tolerances import TOLERANCES
    except ImportError:  # before the tolerance table had its own module
        from pagedattn.verify import TOLERANCES
    b = p.batch
    if out is None or tuple(out.shape) != tuple(b.q.shape):
        return [f"returned {None if out is None else tuple(out.shape)}, expected q's shape {tuple(b.q.shape)}"]
    out = out.float().cpu()
    bad = set(case.bad_seqs) if case is not None else set()
    owners = row_owners(b.cu_seqlens_q.tolist(), b.q.shape[0])
    problems = []
    not_nan = [r for r, o in enumerate(owners) if o and set(o) <= bad and not out[r].isnan().all()]
    if not_nan:
        problems.append(f"rows {not_nan} of invalid sequences {sorted(bad)} are not all NaN "
                        f"(max |value| {float(out[not_nan].nan_to_num().abs().max()):.3g})")
    if p.out_mode == "library":
        unowned = [r for r, o in enumerate(owners) if not o and not out[r].isnan().all()]
        if unowned:
            problems.append(f"rows {unowned} belong to no sequence but are not NaN")
    atol, rtol = TOLERANCES[b.q.dtype]
    either = set(case.nan_or_right) if case is not None else set()
    for s in range(b.seq_lens.shape[0]):
        rows = [r for r, o in enumerate(owners) if o == [s]]
        if s in bad or not rows:
            continue
        if s in either:  # whole NaN rows are fine here; the others must be right
            rows = [r for r in rows if not out[r].isnan().all()]
            if not rows:
                continue
        ref = reference_rows(b, p.entry, s, rows)
        got = out[rows]
        err = (got - ref).abs()
        if got.isnan().any() or bool((err > atol + rtol * ref.abs()).any()):
            what = "neither NaN nor the reference" if s in either else "valid, but differ from the reference"
            problems.append(f"sequence {s} rows {rows}: {what}: max |out-ref| "
                            f"{float(err.nan_to_num(nan=float('inf')).max()):.3g}, {int(got.isnan().sum())} NaN")
    return problems


def applicable(entries=None, cases=None) -> list[tuple[Case, str]]:
    """(case, entry point) pairs, in catalogue order."""
    return [(c, e) for c in CASES if cases is None or c.name in cases
            for e in c.entry_points if entries is None or e in entries]


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
            if out_mode != "user" and ENTRY_POINTS[e].library_out and not case.host_check and \
                    (out_mode == "library" or case.name in LIBRARY_OUT_CASES):
                runs.append((case, e, "library"))
    return runs


def run_label(case: Case | None, entry: str, out_mode: str) -> str:
    return f"{case.name if case else 'valid'}/{entry}/{out_mode}"


# ---------------------------------------------------------------------------------------------
# command line: one line (or one JSON object) per run
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m pagedattn.catalogue", description=__doc__.split("\n")[0])
    parser.add_argument("--entry", action="append", help="entry point(s) (default: all)")
    parser.add_argument("--case", action="append", help="case name(s) (default: all); 'valid' = the base batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--validate", action="store_true", help="the validated run (default: unvalidated)")
    parser.add_argument("--out-mode", choices=("user", "library", "both"), default="both")
    parser.add_argument("--skip", action="append", default=[], help="case name(s) to leave out")
    parser.add_argument("--select", choices=("full", "ci"), default="full")
    parser.add_argument("--from", dest="start", type=int, default=0, help="skip the first N runs (resume)")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object a line (a 'start' line before each run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [c for c in (args.case or ["valid", *CASES_BY_NAME]) if c not in args.skip]
    runs = planned_runs(args.entry, cases, args.out_mode, args.select)
    failed = 0
    for index, (case, e, out_mode) in enumerate(runs):
        if index < args.start:
            continue
        label = dict(index=index, run=run_label(case, e, out_mode))
        if args.jsonl:
            print(json.dumps(dict(label, status="start")), flush=True)
        try:
            problems = check(case, e, args.device, validate=True if args.validate else False, out_mode=out_mode)
        except Exception as ex:  # noqa: BLE001  (a harness error is a failure of the run)
            problems = [f"harness error {type(ex).__name__}: {ex}"]
        failed += bool(problems)
        if args.jsonl:
            print(json.dumps(dict(label, status="done", problems=problems)), flush=True)
        else:
            print(f"{'FAIL' if problems else 'ok  '} {label['run']:62} {'; '.join(problems)}", flush=True)
    if not args.jsonl:
        print(f"{len(runs) - args.start - failed} of {len(runs) - args.start} runs kept every promise; "
              f"{failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
