"""Mismatch forensics: where do `out` and `ref` differ, and what usually causes that pattern.

`compare(out, ref, batch)` finds the mismatched elements (|out - ref| > atol + rtol * |ref|, or a
non-finite `out`) and groups them by sequence, query token, head and dim; `Report.diagnose()` then
matches the pattern against the shapes known bugs leave, ranked, each with one sentence of
evidence. The seed's failure, for instance, reads

    8192 / 43720704 elements mismatch: 1 token (seq 9, decode) x all 64 heads x all 128 dims
    -> missing-decode-kv: that token's K/V is not in the cache (write-before-attend contract)

Every pass over the elements is a vectorised torch op on the outputs' device; only per-token
([num_tokens]), per-head and per-dim aggregates come back to the host, so a 43.7M-element
comparison costs a handful of tensor passes and no per-element Python.

Default tolerances come from `tolerances` (by out's dtype, the table `verify` uses). Given the
inputs (`q`, `k_new`/`v_new`, the caches `k_cache`/`v_cache`), compare also records where NaN/inf sit
in them (`Report.inputs`), so the diagnosis tells a NaN the user wrote from a read of poisoned,
never-written memory (`pagedattn.poison`). `compare_saved` does all of it from files a failing test
saved with torch.save, plus a small JSON of batch metadata (`pagedattn compare` on the command line).

Cause ids are stable (tests and the CLI key on them): see `CAUSES` (defined in `diagnosis`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from .batch import BatchMetadata
from .checks import K_NONFINITE, K_POISON, V_NONFINITE, V_POISON, scan_reads
from .diagnosis import CAUSES, Cause, diagnose
from .errors import BatchMetadataError, ShapeError
from .text import plural, runs
from .tolerances import default_tolerance

__all__ = ["compare", "compare_saved", "load_batch", "Report", "InputEvidence", "Cause", "CAUSES"]

TOKENS_LISTED = 1000  # bad tokens kept in to_dict(); render() shows fewer
READS_LISTED = 64  # flagged cache reads kept in InputEvidence


@dataclass
class InputEvidence:
    """Where the inputs hold NaN/inf, for the inputs compare() was given.

    Reads are (sequence, position, block, slot) of cache slots the kernel reads under the contract;
    poisoned = the poison pattern (never written), nonfinite = NaN/inf that is not the poison (the
    user wrote it). Lists hold the first READS_LISTED; the num_ fields count all."""

    given: list[str]  # which inputs were scanned: "q", "k_new", "v_new", "cache"
    contract: str | None = None
    decode_from_cache: bool = False
    q_nonfinite_tokens: list[int] = field(default_factory=list)
    new_kv_nonfinite_tokens: list[int] = field(default_factory=list)
    poisoned_reads: list[tuple[int, int, int, int]] = field(default_factory=list)
    num_poisoned_reads: int = 0
    nonfinite_reads: list[tuple[int, int, int, int]] = field(default_factory=list)
    num_nonfinite_reads: int = 0
    nonfinite_read_seqs: list[int] = field(default_factory=list)
    poisoned_read_seqs: list[int] = field(default_factory=list)

    @property
    def cache_scanned(self) -> bool:
        return "cache" in self.given

    def explains_nan(self, seqs: set[int], tokens: list[int]) -> bool:
        """Some input NaN the user wrote can reach these sequences / tokens."""
        return bool(
            set(self.nonfinite_read_seqs) & seqs
            or set(self.q_nonfinite_tokens) & set(tokens)
            or set(self.new_kv_nonfinite_tokens)
        )


@dataclass
class SequenceGroup:
    index: int
    kind: str  # "prefill" | "decode"
    query_len: int
    ctx_len: int
    bad_tokens: int
    bad_elements: int
    max_abs_err: float


@dataclass
class TokenGroup:
    token: int  # row of out
    seq: int
    query_index: int  # i: position relative to the context end (0 = first new token)
    position: int  # p = ctx_len + i
    from_end: int  # query_len - 1 - i (0 = the sequence's last query token)
    block_offset: int | None  # p % block_size
    first_in_block: bool | None  # p % block_size == 0 and p > 0: first token after a block boundary
    window_distance: int | None  # p + 1 - W: keys the window cuts off (<= 0: the window does not bite)
    bad_heads: int
    bad_elements: int
    nonfinite: int
    max_abs_err: float


@dataclass
class Report:
    shape: tuple[int, int, int]
    atol: float
    rtol: float
    total: int
    mismatched: int
    nan: int
    inf: int
    max_abs_err: float  # over finite differences
    max_abs_err_index: tuple[int, int, int] | None
    worst_excess: float  # max |out - ref| / (atol + rtol |ref|) over finite elements
    num_kv_heads: int | None
    block_size: int | None
    sliding_window: int | None
    sequences: list[SequenceGroup]  # every sequence with a bad token
    tokens: list[TokenGroup]  # bad tokens (first TOKENS_LISTED)
    num_bad_tokens: int
    bad_heads: list[int]
    bad_dims: list[int]
    uniform_scale: float | None  # out ~= s * ref over the mismatches, when one s fits them
    zeroed: bool  # the mismatched outputs are exactly 0 (an empty-row guard fired, e.g. on a NaN)
    shared_nonfinite: int = 0  # mismatched elements where out AND ref are NaN/inf (the inputs hold it)
    inputs: InputEvidence | None = None  # where the inputs hold NaN/inf, when compare() had them
    # Per-token aggregates (host tensors of [num_tokens]), the public input of the diagnosis rules:
    # seq, i (index in the sequence's query), pos (position p), from_end, qlen, bad (elements),
    # heads (bad heads), nonfinite, max, full (every element bad); block_off and window_dist when
    # block_size / sliding_window were given.
    per_token: dict = field(default_factory=dict, repr=False)
    _causes: list[Cause] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def diagnose(self) -> list[Cause]:
        """Likely causes, best first (empty when clean)."""
        if self._causes is None:
            self._causes = diagnose(self)
        return self._causes

    @property
    def top(self) -> Cause | None:
        causes = self.diagnose()
        return causes[0] if causes else None

    # ------------------------------------------------------------------ descriptions
    def pattern(self) -> str:
        """'1 token (seq 9, decode) x all 64 heads x all 128 dims'"""
        h, d = self.shape[1], self.shape[2]
        if self.num_bad_tokens == 1:
            t = self.tokens[0]
            kind = self.sequences[0].kind if self.sequences else "?"
            toks = f"1 token (seq {t.seq}, {kind}, position {t.position})"
        else:
            toks = f"{plural(self.num_bad_tokens, 'token')} in {plural(len(self.sequences), 'sequence')}"
        heads = f"all {h} heads" if len(self.bad_heads) == h else f"heads {runs(self.bad_heads)}"
        dims = f"all {d} dims" if len(self.bad_dims) == d else f"dims {runs(self.bad_dims)}"
        return f"{toks} x {heads} x {dims}"

    def summary(self) -> str:
        """One line: 'clean: ...' or the mismatch count, its pattern and the top cause."""
        if self.ok:
            return (
                f"clean: all {self.total} elements within atol={self.atol:g}, rtol={self.rtol:g} "
                f"(max |out-ref| {self.max_abs_err:.3g})"
            )
        bits = [f"{self.mismatched} / {self.total} elements mismatch: {self.pattern()}"]
        if self.nan or self.inf:
            bits.append(f"{self.nan} NaN, {self.inf} inf")
        top = self.top
        return "; ".join(bits) + (f" -> {top.id}" if top else "")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "per_token"}
        d["tokens"] = d["tokens"][:TOKENS_LISTED]
        d["ok"] = self.ok
        d["summary"] = self.summary()
        d["causes"] = [
            dict(id=c.id, score=round(c.score, 3), meaning=c.meaning, evidence=c.evidence) for c in self.diagnose()
        ]
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def render(self, max_rows: int = 12):
        """A rich renderable (a one-line Text when clean)."""
        return render(self, max_rows)


# ---------------------------------------------------------------------------------------------
# compare: all the per-element work, vectorised
# ---------------------------------------------------------------------------------------------
def compare(
    out: torch.Tensor,
    ref: torch.Tensor,
    batch: BatchMetadata,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    num_kv_heads: int | None = None,
    block_size: int | None = None,
    sliding_window: int | None = None,
    q: torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    contract: str | None = None,
    decode_from_cache: bool = False,
) -> Report:
    """Compare `out` with `ref` ([num_tokens, num_q_heads, head_size], rows as in `batch`).

    atol/rtol default to `tolerances.default_tolerance(out.dtype)` (fp32 2e-5, fp16 2e-3, bf16
    1.5e-2: the table `verify` uses). `num_kv_heads`, `block_size` and `sliding_window` are
    optional: with them the report also groups heads by KV group, tokens by block offset and by
    distance to the window edge.

    The inputs are optional too: `q` [num_tokens, ...], `k_new`/`v_new` (the context contract's new
    K/V) and the caches `k_cache`/`v_cache` (NHD views [num_blocks, block_size, num_kv_heads,
    head_size], as the kernel read them, with `batch.block_table`). With them, `Report.inputs` says
    which rows hold NaN/inf and which read slots hold the poison pattern (never written) or a NaN
    the user wrote, and the diagnosis uses it. `contract` ("full" or "context"; default: the
    batch's own `contract` attribute, else "context" when k_new is given, else "full") and
    `decode_from_cache` say which slots the kernel read. Scanning the caches costs one pass over the
    read slots (`checks.scan_reads`)."""
    default_atol, default_rtol = default_tolerance(out.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if out.dim() != 3 or tuple(out.shape) != tuple(ref.shape):
        raise ShapeError(
            f"out {tuple(out.shape)} and ref {tuple(ref.shape)} must both be [num_tokens, num_q_heads, head_size]"
        )
    num_tokens, num_q_heads, head_size = out.shape
    query_lens = torch.tensor(batch.host_query_lens(), dtype=torch.long)
    seq_lens = torch.tensor(batch.host_seq_lens(), dtype=torch.long)
    if int(query_lens.sum()) != num_tokens:
        raise ShapeError(f"batch has {int(query_lens.sum())} query tokens but out has {num_tokens} rows")
    if num_kv_heads is not None and (num_kv_heads <= 0 or num_q_heads % num_kv_heads):
        raise ShapeError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    sliding_window = sliding_window or None

    with torch.no_grad():
        o = out.detach().float()
        r = ref.detach().to(o.device).float()
        # Few passes, in place, over float buffers: bool reductions are several times slower on CPU.
        diff = torch.sub(o, r).abs_()  # NaN / inf where either side is non-finite
        # the tolerance, then |out - ref| / tolerance (in r's buffer when r is our own copy)
        ratio = (r.abs_() if r.data_ptr() != ref.data_ptr() else r.abs()).mul_(rtol).add_(atol)
        del r
        nan = inf = shared_nonfinite = 0
        tok_nonfinite = torch.zeros(num_tokens, dtype=torch.long)
        nonfinite = None
        if not bool(torch.isfinite(diff.sum())):  # rare path: some element is not finite
            nonfinite = diff.lt(float("inf")).logical_not_()  # NaN or inf in out or ref
            rows = nonfinite.view(num_tokens, -1).any(dim=1).nonzero().flatten()
            o_rows = o[rows].view(len(rows), -1)  # only the affected tokens: usually few
            nan = int(torch.isnan(o_rows).sum())
            inf = int(torch.isinf(o_rows).sum())
            r_rows = ref.detach()[rows.to(ref.device)].float().view(len(rows), -1).to(o_rows.device)
            shared_nonfinite = int((~torch.isfinite(o_rows) & ~torch.isfinite(r_rows)).sum())
            tok_nonfinite[rows.cpu()] = (~torch.isfinite(o_rows)).sum(1).cpu()
            diff.masked_fill_(nonfinite, -1.0)  # -1: "no finite difference here"
        tok_max = diff.amax(dim=(1, 2)).cpu() if num_tokens else torch.zeros(0)
        max_abs_err, max_index = 0.0, None
        if num_tokens and float(tok_max.max()) >= 0:
            t = int(tok_max.argmax())
            flat = int(diff[t].argmax())
            max_abs_err, max_index = float(tok_max[t]), (t, flat // head_size, flat % head_size)
        ratio = torch.div(diff, ratio, out=ratio)
        del diff
        worst_excess = float(ratio.amax()) if ratio.numel() else 0.0
        bad = ratio.gt_(1.0)  # float 0/1 indicator, in place
        if nonfinite is not None:
            bad.add_(nonfinite)
        bad_th = bad.sum(dim=2)  # [num_tokens, num_q_heads]
        tok_bad = bad_th.sum(dim=1).round().long().cpu()
        tok_heads = (bad_th > 0).sum(dim=1).cpu()
        head_bad = bad_th.sum(dim=0).cpu()
        dim_bad = bad.view(-1, head_size).sum(dim=0).cpu()
        mismatched = int(tok_bad.sum())
        uniform, zero_share = (
            _fit_scale(out.detach(), ref.detach().to(out.device), bad, mismatched, atol, rtol)
            if mismatched
            else (None, 0.0)
        )
        del bad, ratio, o

    # per-token geometry (host, [num_tokens])
    num_seqs = len(query_lens)
    seq_of = torch.repeat_interleave(torch.arange(num_seqs), query_lens)
    starts = torch.cumsum(query_lens, 0) - query_lens
    qi = torch.arange(num_tokens) - starts[seq_of]
    ctx = (seq_lens - query_lens)[seq_of]
    pos = ctx + qi
    tok = dict(
        seq=seq_of,
        i=qi,
        pos=pos,
        from_end=query_lens[seq_of] - 1 - qi,
        qlen=query_lens[seq_of],
        bad=tok_bad,
        heads=tok_heads,
        nonfinite=tok_nonfinite,
        max=tok_max,
        full=tok_bad == num_q_heads * head_size,
    )
    if block_size:
        tok["block_off"] = pos % block_size
    if sliding_window:
        tok["window_dist"] = pos + 1 - sliding_window

    is_bad = tok_bad > 0
    seq_bad_tokens = torch.zeros(num_seqs, dtype=torch.long).index_add_(0, seq_of, is_bad.long())
    seq_bad_elems = torch.zeros(num_seqs, dtype=torch.long).index_add_(0, seq_of, tok_bad)
    seq_max = torch.full((num_seqs,), -1.0).scatter_reduce_(0, seq_of, tok_max.float(), "amax")
    sequences = [
        SequenceGroup(
            s,
            "decode" if int(query_lens[s]) == 1 else "prefill",
            int(query_lens[s]),
            int(seq_lens[s] - query_lens[s]),
            int(seq_bad_tokens[s]),
            int(seq_bad_elems[s]),
            float(seq_max[s]),
        )
        for s in seq_bad_tokens.nonzero().flatten().tolist()
    ]
    bad_tokens = is_bad.nonzero().flatten()
    tokens = [
        TokenGroup(
            t,
            int(seq_of[t]),
            int(qi[t]),
            int(pos[t]),
            int(tok["from_end"][t]),
            int(tok["block_off"][t]) if block_size else None,
            bool(tok["block_off"][t] == 0 and pos[t] > 0) if block_size else None,
            int(tok["window_dist"][t]) if sliding_window else None,
            int(tok_heads[t]),
            int(tok_bad[t]),
            int(tok_nonfinite[t]),
            float(tok_max[t]),
        )
        for t in bad_tokens[:TOKENS_LISTED].tolist()
    ]
    return Report(
        shape=(num_tokens, num_q_heads, head_size),
        atol=atol,
        rtol=rtol,
        total=num_tokens * num_q_heads * head_size,
        mismatched=mismatched,
        nan=nan,
        inf=inf,
        max_abs_err=max_abs_err,
        max_abs_err_index=max_index,
        worst_excess=worst_excess,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        sliding_window=sliding_window,
        sequences=sequences,
        tokens=tokens,
        num_bad_tokens=len(bad_tokens),
        bad_heads=(head_bad > 0).nonzero().flatten().tolist(),
        bad_dims=(dim_bad > 0).nonzero().flatten().tolist(),
        uniform_scale=uniform,
        zeroed=zero_share >= 0.95,
        shared_nonfinite=shared_nonfinite,
        inputs=_input_evidence(batch, q, k_new, v_new, k_cache, v_cache, contract, decode_from_cache),
        per_token=tok,
    )


def _nonfinite_rows(t: torch.Tensor) -> list[int]:
    """Rows (dim 0) of t holding a NaN/inf anywhere."""
    if t.dtype.itemsize == 1 and t.dtype.is_floating_point:
        t = t.float()
    return (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()


def _input_evidence(batch, q, k_new, v_new, k_cache, v_cache, contract, decode_from_cache) -> InputEvidence | None:
    if q is None and k_new is None and v_new is None and k_cache is None and v_cache is None:
        return None
    if (k_cache is None) != (v_cache is None):
        raise ShapeError("pass both k_cache and v_cache (or neither)")
    if contract is None:
        contract = getattr(batch, "contract", None) or ("context" if k_new is not None else "full")
    e = InputEvidence(given=[], contract=contract, decode_from_cache=decode_from_cache)
    if q is not None:
        e.given.append("q")
        e.q_nonfinite_tokens = _nonfinite_rows(q.detach())
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is not None:
            e.given.append(name)
            e.new_kv_nonfinite_tokens = sorted(set(e.new_kv_nonfinite_tokens) | set(_nonfinite_rows(t.detach())))
    if k_cache is not None:
        e.given.append("cache")
        scan = scan_reads(
            k_cache,
            v_cache,
            batch.cu_seqlens_q,
            batch.seq_lens,
            batch.block_table,
            contract,
            decode_from_cache,
            query_lens_host=batch.host_query_lens(),
            seq_lens_host=batch.host_seq_lens(),
        )
        if scan is not None:
            bs = scan.block_size
            for flags, kind in ((K_POISON | V_POISON, "poisoned"), (K_NONFINITE | V_NONFINITE, "nonfinite")):
                mask = (scan.code & flags) != 0
                sel = scan.select(mask)
                reads = [
                    (int(s), int(p), int(b), int(b) * bs + int(o))
                    for s, p, b, o in zip(
                        sel.seq[:READS_LISTED],
                        sel.pos[:READS_LISTED],
                        sel.block[:READS_LISTED],
                        sel.offset[:READS_LISTED],
                    )
                ]
                setattr(e, f"{kind}_reads", reads)
                setattr(e, f"num_{kind}_reads", int(mask.sum()))
                setattr(e, f"{kind}_read_seqs", sorted(set(sel.seq.tolist())))
    return e


# ---------------------------------------------------------------------------------------------
# from saved tensors
# ---------------------------------------------------------------------------------------------
def load_batch(meta) -> tuple[BatchMetadata, dict]:
    """Batch metadata from a dict (a JSON file's contents, or saved tensors): `query_lens` or
    `cu_seqlens_q`, and `seq_lens` (or `ctx_lens`, seq_len = ctx_len + query_len); optional
    `block_table`. Returns the batch and the other keys compare() takes (contract, decode_from_cache,
    num_kv_heads, block_size, sliding_window, atol, rtol)."""

    def ints(x):
        return [int(v) for v in (x.flatten().tolist() if isinstance(x, torch.Tensor) else x)]

    if "query_lens" in meta:
        query_lens = ints(meta["query_lens"])
    elif "cu_seqlens_q" in meta:
        cu = ints(meta["cu_seqlens_q"])
        query_lens = [b - a for a, b in zip(cu, cu[1:])]
    else:
        raise BatchMetadataError("the batch metadata needs query_lens or cu_seqlens_q (vLLM: query_start_loc)")
    if "seq_lens" in meta:
        seq_lens = ints(meta["seq_lens"])
    elif "ctx_lens" in meta:
        seq_lens = [c + q for c, q in zip(ints(meta["ctx_lens"]), query_lens)]
    else:
        raise BatchMetadataError("the batch metadata needs seq_lens (or ctx_lens)")
    if len(seq_lens) != len(query_lens):
        raise BatchMetadataError(f"seq_lens has {len(seq_lens)} entries but the batch has {len(query_lens)} sequences")
    table = meta.get("block_table")
    rows = [ints(r) for r in table] if table is not None else [[0] for _ in query_lens]
    batch = BatchMetadata.from_lens(query_lens, seq_lens, rows)
    if "contract" in meta:
        batch.contract = meta["contract"]
    options = {
        k: meta[k]
        for k in ("contract", "decode_from_cache", "num_kv_heads", "block_size", "sliding_window", "atol", "rtol")
        if meta.get(k) is not None
    }
    return batch, options


TENSOR_KEYS = ("q", "k_new", "v_new", "k_cache", "v_cache")


def _load(path):
    if isinstance(path, torch.Tensor):
        return path
    return torch.load(path, map_location="cpu", weights_only=True)


def compare_saved(out_path, ref_path, batch_path, **options) -> Report:
    """`compare` on tensors a failing test saved: `torch.save(out, ...)`, `torch.save(ref, ...)` and
    the batch metadata, a JSON file (see `load_batch`; it may also name saved input tensors, paths
    relative to it: "q", "k_new", "v_new", "k_cache", "v_cache" as NHD views) or a torch.save'd dict
    of tensors and values with the same keys. Outputs of shape [num_tokens, num_q_heads * head_size]
    are reshaped with the metadata's `num_q_heads`. Keyword `options` override the file's."""
    if str(batch_path).endswith(".json"):
        with open(batch_path) as f:
            meta = json.load(f)
        base = os.path.dirname(os.path.abspath(batch_path))
        for key in TENSOR_KEYS:
            if isinstance(meta.get(key), str):
                meta[key] = _load(os.path.join(base, meta[key]))
    else:
        meta = dict(_load(batch_path))
    batch, file_options = load_batch(meta)
    out, ref = _load(out_path), _load(ref_path)
    for name, t in (("out", out), ("ref", ref)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{name} file must hold one tensor (torch.save(tensor, path)), got {type(t).__name__}")
    heads = meta.get("num_q_heads")
    if out.dim() == 2 and heads:
        out, ref = out.reshape(out.shape[0], int(heads), -1), ref.reshape(ref.shape[0], int(heads), -1)
    inputs = {k: meta[k] for k in TENSOR_KEYS if isinstance(meta.get(k), torch.Tensor)}
    return compare(out, ref, batch, **{**file_options, **inputs, **options})


def _fit_scale(
    o: torch.Tensor,
    r: torch.Tensor,
    bad: torch.Tensor,
    mismatched: int,
    atol: float,
    rtol: float,
    sample: int = 1 << 20,
) -> tuple[float | None, float]:
    """(s, zero share): s if out ~= s * ref on >= 95% of the finite mismatched elements (else None),
    and the share of mismatched outputs that are exactly 0. Works on at most `sample` mismatches
    (all of them when sparse, a strided sample when dense)."""
    o, r, bad = o.reshape(-1), r.reshape(-1), bad.reshape(-1)
    if mismatched <= sample:
        idx = bad.nonzero().flatten()
    else:
        idx = torch.arange(0, o.numel(), o.numel() // sample, device=o.device)
        idx = idx[bad[idx] > 0]
    ob, rb = o[idx].double(), r[idx].double()  # original dtypes: only the sample is converted
    zero_share = float((ob == 0).double().mean()) if ob.numel() else 0.0
    keep = torch.isfinite(ob) & torch.isfinite(rb)
    ob, rb = ob[keep], rb[keep]
    denom = float((rb * rb).sum())
    if ob.numel() < 8 or denom == 0.0:
        return None, zero_share
    s = float((ob * rb).sum()) / denom
    fits = (ob - s * rb).abs() <= 2 * (atol + rtol * (s * rb).abs())
    if float(fits.double().mean()) < 0.95 or abs(s - 1.0) < 4 * rtol or abs(s) < 1e-3:
        return None, zero_share
    return s, zero_share


def render(report: Report, max_rows: int = 12):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if report.ok:
        return Text(report.summary(), style="green")
    n, h, d = report.shape
    lines = [
        Text(
            f"{report.mismatched} / {report.total} elements mismatch "
            f"({report.mismatched / report.total:.4%}): {report.pattern()}",
            style="bold red",
        ),
        Text(
            f"NaN {report.nan}, inf {report.inf}; "
            + (
                f"greatest finite |out-ref| {report.max_abs_err:.4g} at index {report.max_abs_err_index}"
                if report.max_abs_err_index
                else "no finite difference"
            )
            + f"; tolerance atol={report.atol:g} rtol={report.rtol:g}"
        ),
    ]
    seqs = Table(title="by sequence", title_justify="left")
    for col in ("seq", "kind", "query_len", "ctx_len", "bad tokens", "bad elements", "max err"):
        seqs.add_column(col, justify="right")
    for s in report.sequences[:max_rows]:
        seqs.add_row(
            str(s.index),
            s.kind,
            str(s.query_len),
            str(s.ctx_len),
            f"{s.bad_tokens}/{s.query_len}",
            str(s.bad_elements),
            _fmt(s.max_abs_err),
        )
    toks = Table(title=f"by token ({report.num_bad_tokens} bad)", title_justify="left")
    cols = ["token", "seq", "i", "p", "from end"]
    cols += ["block off"] if report.block_size else []
    cols += ["p+1-W"] if report.sliding_window else []
    cols += ["heads", "elems", "nonfin", "max err"]
    for col in cols:
        toks.add_column(col, justify="right")
    for tg in report.tokens[:max_rows]:
        row = [tg.token, tg.seq, tg.query_index, tg.position, tg.from_end]
        row += [f"{tg.block_offset}{' *' if tg.first_in_block else ''}"] if report.block_size else []
        row += [tg.window_distance] if report.sliding_window else []
        row += [f"{tg.bad_heads}/{h}", tg.bad_elements, tg.nonfinite, _fmt(tg.max_abs_err)]
        toks.add_row(*map(str, row))
    heads = "all" if len(report.bad_heads) == h else runs(report.bad_heads)
    if report.num_kv_heads and len(report.bad_heads) < h:
        qpk = h // report.num_kv_heads
        heads += f" (KV groups {sorted({x // qpk for x in report.bad_heads})})"
    dims = "all" if len(report.bad_dims) == d else runs(report.bad_dims)
    scale = f"out ~= {report.uniform_scale:.4g} x ref" if report.uniform_scale else "no uniform factor"
    scale += "; the mismatched outputs are exactly 0" if report.zeroed else ""
    lines.append(Text(f"heads: {heads} of {h}; dims: {dims} of {d}; {scale}"))
    causes = Table(title="likely causes", title_justify="left")
    for col, justify in (("#", "right"), ("id", "left"), ("score", "right"), ("evidence", "left")):
        causes.add_column(col, justify=justify, overflow="fold")
    for k, c in enumerate(report.diagnose(), 1):
        causes.add_row(str(k), c.id, f"{c.score:.2f}", c.evidence, style="bold" if k == 1 else None)
    return Group(*lines, seqs, toks, causes)


def _fmt(x: float) -> str:
    return "nan" if x < 0 else f"{x:.3g}"


def print_report(report: Report, console=None) -> None:
    from rich.console import Console

    (console or Console()).print(report.render())
