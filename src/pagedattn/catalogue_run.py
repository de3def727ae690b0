"""Running the bad-metadata catalogue (`pagedattn.catalogue`): lay a case's batch out for an entry
point with every tensor inside a guarded buffer, call it, and list the promises it broke.

    check(case, entry, device, validate=...)   -> [] when every promise held
    main()                                      the command line (`python -m pagedattn.catalogue`)

Guards: every tensor the call reads or writes is a view into a larger buffer whose margins hold
SENTINEL, a finite value; a write past a view changes a margin, and a read past one brings finite
numbers into rows that must come out NaN. Rows are checked against the reference, one valid
sequence at a time, over the mutated metadata.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from .catalogue import (
    BLOCK_SIZE,
    CASES_BY_NAME,
    ENTRY_POINTS,
    HEAD_SIZE,
    NUM_BLOCKS,
    NUM_KV_HEADS,
    NUM_Q_HEADS,
    SENTINEL,
    Batch,
    Case,
    EntryPoint,
    base_batch,
    names_argument,
    planned_runs,
    run_label,
)


class Guarded:
    """`t`'s values in the middle of a larger buffer whose margins hold SENTINEL: a write past the
    view changes a margin; a read past it gets finite numbers where NaN is due."""

    def __init__(self, t: torch.Tensor, margin: int):
        self.buffer = torch.full((2 * margin + t.numel(),), SENTINEL, device=t.device).to(t.dtype)
        self.view = self.buffer[margin : margin + t.numel()].view(t.shape)
        self.view.copy_(t)
        self.before = _bits(self.buffer)

    def margins_intact(self) -> bool:
        n = self.view.numel()
        margin = (self.buffer.numel() - n) // 2
        now = _bits(self.buffer)
        return torch.equal(now[: margin * self._size], self.before[: margin * self._size]) and torch.equal(
            now[(margin + n) * self._size :], self.before[(margin + n) * self._size :]
        )

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
    return (k.reshape(nb, bs, kvh, d // x, x).permute(0, 2, 3, 1, 4).contiguous(), v.permute(0, 2, 3, 1).contiguous())


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
        return paged_attention(
            t("q"), kc, vc, *meta, **sizes, **scales, out=out, kv_layout=p.entry.layout, validate=validate
        )
    if name == "ops_paged_attention":
        from pagedattn import ops

        return ops.paged_attention(t("q"), kc, vc, *meta, **sizes, **scales, out=out, validate=validate)
    if name == "prefix_prefill":
        return prefix_prefill(
            t("q"), t("k_new"), t("v_new"), kc, vc, *meta, **sizes, **scales, out=out, validate=validate
        )
    if name == "attention":
        cache = pagedattn.PagedKVCache(
            NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=b.q.dtype, device=b.q.device, poison=False
        )
        cache.k, cache.v = kc, vc
        batch = pagedattn.BatchMetadata(*meta, **sizes)
        return attention(t("q"), cache, batch, out=out, validate=validate)
    if name in ("planner", "planner_context"):
        options = pagedattn.AttentionOptions(**scales)
        planner = pagedattn.PagedAttention(
            options,
            num_q_heads=NUM_Q_HEADS,
            num_kv_heads=NUM_KV_HEADS,
            head_size=HEAD_SIZE,
            block_size=BLOCK_SIZE,
            dtype=b.q.dtype,
            kv_cache_dtype=b.k_cache.dtype,
            num_blocks=NUM_BLOCKS,
            device=b.q.device,
            contract="context" if name == "planner_context" else "full",
        )
        hosts = {}
        if p.entry.host_copies and all(m.device.type != "meta" for m in meta):
            cu = meta[0].flatten().tolist()
            hosts = dict(
                query_lens_host=tuple(y - x for x, y in zip(cu, cu[1:])),
                seq_lens_host=tuple(meta[1].flatten().tolist()),
                block_table_host=meta[2].cpu(),
            )
        planner.plan(*meta, **hosts, **sizes, validate=validate)
        news = dict(k_new=t("k_new"), v_new=t("v_new")) if name == "planner_context" else {}
        return planner.run(t("q"), kc, vc, out=out, **news)
    if name == "unified_attention":
        return vllm.unified_attention(
            t("q"),
            kc,
            vc,
            out,
            meta[0],
            b.max_query_len,
            meta[1],
            b.max_seq_len,
            HEAD_SIZE**-0.5,
            True,
            (-1, -1),
            meta[2],
            0,
            None,
            scales.get("k_scale"),
            scales.get("v_scale"),
            validate=validate,
        )
    if name in ("context_attention_fwd", "chunked_prefill_paged_decode"):
        fp8 = kc.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        kv_dtype = "fp8_e4m3" if fp8 else "auto"
        ks, vs = (b.k_scale, b.v_scale) if fp8 else (1.0, 1.0)
        op = getattr(vllm, name)  # the two take the same positional arguments
        return op(
            t("q"),
            t("k_new"),
            t("v_new"),
            out,
            kv_dtype,
            kc,
            vc,
            meta[2],
            meta[0],
            meta[1],
            b.max_seq_len,
            b.max_query_len,
            ks,
            vs,
            validate=validate,
        )
    if name == "write_kv":
        write_kv(t("k_new"), t("v_new"), kc, vc, t("slot_mapping"), validate=validate)
        return None
    if name == "reshape_and_cache_flash":
        vllm.reshape_and_cache_flash(
            t("k_new"), t("v_new"), kc, vc, t("slot_mapping"), "auto", 1.0, 1.0, validate=validate
        )
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
        b.q[r0:r1].cpu(),
        b.k_cache.cpu(),
        b.v_cache.cpu(),
        torch.tensor([0, r1 - r0], dtype=torch.int32),
        b.seq_lens[s : s + 1].cpu(),
        b.block_table[s : s + 1].cpu(),
        k_new=b.k_new[r0:r1].cpu() if ctx else None,
        v_new=b.v_new[r0:r1].cpu() if ctx else None,
        decode_from_cache=entry.decode_from_cache,
    )
    return ref[[r - r0 for r in rows]]


def _error_class(name: str):
    from pagedattn import errors

    return getattr(errors, name)


def check(
    case: Case | None,
    entry_name: str,
    device="cpu",
    *,
    validate: bool | None = False,
    out_mode: str = "user",
    dtype=torch.float16,
) -> list[str]:
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
    if p.out_mode == "library":
        # a library-allocated `out` starts as whatever memory the allocator hands back; leave
        # finite numbers there (freed memory of out's size is the likeliest to come back), so
        # rows the library forgets cannot pass as NaN by the luck of an earlier NaN output
        torch.full(b.q.shape, SENTINEL, dtype=b.q.dtype, device=b.q.device).untyped_storage()
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
    if (
        not (p.entry.host_copies or cu_on_host)
        or p.batch.cu_seqlens_q.device.type == "meta"
        or p.batch.cu_seqlens_q.dim() != 1
    ):
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
        return [
            f"{name}: {len(rows)} (slot, head) rows differ from the expected write, first "
            f"{[(r // NUM_KV_HEADS, r % NUM_KV_HEADS) for r in rows[:3]]}"
        ]
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
        problems.append(
            f"rows {not_nan} of invalid sequences {sorted(bad)} are not all NaN "
            f"(max |value| {float(out[not_nan].nan_to_num().abs().max()):.3g})"
        )
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
            problems.append(
                f"sequence {s} rows {rows}: {what}: max |out-ref| "
                f"{float(err.nan_to_num(nan=float('inf')).max()):.3g}, {int(got.isnan().sum())} NaN"
            )
    return problems


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
        print(
            f"{len(runs) - args.start - failed} of {len(runs) - args.start} runs kept every promise; {failed} failed",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
