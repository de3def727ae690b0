"""Diagnosis: the rules that match a mismatch pattern to the shapes known bugs leave.

Each rule reads a report through its public API (`forensics.Report`: the counts and groups, the
per-token aggregates in `report.per_token`, the optional input evidence in `report.inputs`) and
returns a `Cause` with a score and one sentence of evidence, or None; `diagnose` ranks what fired.
This module imports nothing from `forensics` (which imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import runs

# id -> what it means. The evidence sentence of each diagnosis says why it was chosen. Ids are
# stable: tests and the CLI key on them.
CAUSES = {
    "missing-decode-kv": "a decode token's own K/V is not in the cache (write-before-attend contract)",
    "unwritten-read": "the kernel read poisoned (never-written) cache memory",
    "nan-in-inputs": "NaN/inf in the inputs (q, or K/V as written by the user): not a read of unwritten memory",
    "causal-off-by-one": "the causal mask is off by one (a future key admitted, or the diagonal mishandled)",
    "sliding-window-edge": "the sliding-window bound is off by one (W + 1 or W - 1 keys)",
    "gqa-head-mapping": "query head -> KV head mapping (h // num_queries_per_kv) is wrong for some heads",
    "block-table": "a sequence read another sequence's blocks (block table / sequence indexing)",
    "block-boundary": "block table or slot arithmetic at block boundaries (p % block_size == 0)",
    "scale": "a scale is wrong (uniform factor: fp8 v_scale / output scale; otherwise softmax scale / k_scale)",
    "numerical-noise": "accumulation order or precision: errors just above tolerance, no structure",
    "unclassified": "no known pattern: read the groups",
}


@dataclass
class Cause:
    id: str
    score: float  # 0..1, how well the pattern fits; causes are ranked by it
    evidence: str

    @property
    def meaning(self) -> str:
        return CAUSES[self.id]


def diagnose(report) -> list[Cause]:
    """Rank the known causes by how well each explains the mismatch pattern of `report` (a
    `forensics.Report`), best first; empty when the report is clean."""
    if report.ok:
        return []
    rules = _RULES
    if report.shared_nonfinite >= report.mismatched:
        # every mismatch is NaN/inf in the reference too: the kernel agrees with the reference, so
        # the patterns of kernel bugs (heads, masks, blocks) say nothing; the inputs hold the NaN
        rules = (_rule_missing_decode_kv, _rule_unwritten_read, _rule_nan_in_inputs)
    causes = [c for rule in rules if (c := rule(report)) is not None]
    if not causes or max(c.score for c in causes) < 0.3:
        causes.append(Cause("unclassified", 0.2, f"{report.pattern()}: no known pattern fits"))
    return sorted(causes, key=lambda c: -c.score)  # stable: rule order breaks ties


def _shared_nan(r) -> bool:
    """Every non-finite output is non-finite in the reference too (no input evidence needed)."""
    return bool(r.nan or r.inf) and r.shared_nonfinite >= r.nan + r.inf


def _slots(reads, limit: int = 3) -> str:
    shown = ", ".join(f"seq {s} position {p} (block {b}, slot {x})" for s, p, b, x in reads[:limit])
    return shown + (" ..." if len(reads) > limit else "")


def _where(t: dict, mask: torch.Tensor) -> str:
    """'seq 9 (p 500)' for up to three tokens of `mask`."""
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(f"seq {int(t['seq'][i])} p {int(t['pos'][i])}" for i in idx[:3])
    return shown + (f" and {len(idx) - 3} more" if len(idx) > 3 else "")


def _rule_missing_decode_kv(r) -> Cause | None:
    t = r.per_token
    bad, decode = t["bad"] > 0, t["qlen"] == 1
    if not bool(bad.any()) or bool((bad & ~decode).any()):
        return None
    n = int(bad.sum())
    full = bool(t["full"][bad].all())
    nan = bool((t["nonfinite"][bad] > 0).any())
    score = 0.95 if full else 0.75
    what = "all heads and all dims" if full else "some heads or dims"
    why = ""
    if nan:
        why = " (NaN: the slot was never written)"
    elif r.zeroed:
        why = " (exactly 0: a NaN from the unwritten slot reset by the kernel's empty-row guard)"
    bad_seqs = set(t["seq"][bad].tolist())
    own = _own_token_reads(r, bad_seqs)
    if r.inputs is not None and r.inputs.cache_scanned:
        if own:
            return Cause(
                "missing-decode-kv",
                0.98,
                f"exactly {n} decode token(s) wrong in {what}, every prefill token right, and the cache "
                f"holds the poison pattern at their own token's slot ({_slots(own)}): never written; "
                f"write K/V before attending",
            )
        if r.inputs.explains_nan(bad_seqs, t["seq"][bad].tolist()):
            score = 0.4  # the inputs hold the NaN: nan-in-inputs says where
    elif nan and _shared_nan(r):
        score = 0.6  # the reference is NaN there too: it read the same input
    return Cause(
        "missing-decode-kv",
        score,
        f"exactly {n} token(s), all decode tokens ({_where(t, bad)}), wrong in {what}{why}, "
        f"every prefill token right: the decode token's own K/V is missing from the cache; "
        f"write K/V before attending",
    )


def _own_token_reads(r, seqs: set[int]) -> list:
    """Poisoned reads at the last position (the decode token's own slot) of sequences in `seqs`."""
    if r.inputs is None:
        return []
    last = {g.seq: g.position for g in r.tokens}
    return [x for x in r.inputs.poisoned_reads if x[0] in seqs and last.get(x[0]) == x[1]]


def _rule_unwritten_read(r) -> Cause | None:
    t = r.per_token
    if r.inputs is not None and r.inputs.cache_scanned:
        if not r.inputs.num_poisoned_reads:
            return None  # the cache holds no poison where the kernel reads: the NaN came from elsewhere
        return Cause(
            "unwritten-read",
            0.96,
            f"{r.inputs.num_poisoned_reads} read slot(s) hold the poison pattern (never written): "
            f"{_slots(r.inputs.poisoned_reads)}",
        )
    if r.zeroed and not r.nan:
        return Cause(
            "unwritten-read",
            0.7,
            f"the {r.mismatched} mismatched outputs are exactly 0 ({_where(t, t['bad'] > 0)}): an "
            f"empty-row guard (l > 0 ? acc / l : 0) fired, as it does when a poisoned NaN reaches the "
            f"softmax sum, or those rows saw no key",
        )
    if not r.nan:
        return None
    share = r.nan / r.mismatched
    if _shared_nan(r):
        return Cause(
            "unwritten-read",
            0.5,
            f"{r.nan} NaN outputs, NaN in the reference too: a poisoned slot both read, or a NaN in "
            f"the inputs (pass k_cache/v_cache to compare to tell which)",
        )
    return Cause(
        "unwritten-read",
        0.6 + 0.3 * share,
        f"{r.nan} NaN outputs in {int((t['nonfinite'] > 0).sum())} token(s) "
        f"({_where(t, t['nonfinite'] > 0)}): a read of poisoned, never-written cache memory",
    )


def _rule_nan_in_inputs(r) -> Cause | None:
    e = r.inputs
    if e is not None and (e.q_nonfinite_tokens or e.new_kv_nonfinite_tokens or e.num_nonfinite_reads):
        where = []
        if e.q_nonfinite_tokens:
            where.append(f"q rows {runs(e.q_nonfinite_tokens, 4)}")
        if e.new_kv_nonfinite_tokens:
            where.append(f"k_new/v_new rows {runs(e.new_kv_nonfinite_tokens, 4)}")
        if e.num_nonfinite_reads:
            where.append(f"{e.num_nonfinite_reads} cache slot(s) written with NaN/inf ({_slots(e.nonfinite_reads)})")
        score = 0.97 if (r.nan or r.inf) else 0.5
        return Cause(
            "nan-in-inputs",
            score,
            "the inputs hold NaN/inf that is not the poison pattern: "
            + "; ".join(where)
            + ": the user's data, not a read of unwritten memory",
        )
    if e is None and _shared_nan(r):
        return Cause(
            "nan-in-inputs",
            0.8,
            f"the reference is NaN/inf at the same {r.shared_nonfinite} elements: both computations read a "
            f"non-finite input (q, K/V as written, or a poisoned slot the reference reads too; pass "
            f"q/k_cache/v_cache to compare to tell which)",
        )
    return None


def _rule_causal(r) -> Cause | None:
    t = r.per_token
    bad = t["bad"] > 0
    not_last = t["from_end"] > 0
    prefill_last = (t["from_end"] == 0) & (t["qlen"] > 1)
    if bool(not_last.any()) and not bool((bad & ~not_last).any()):
        covered = float(bad[not_last].float().mean())
        if covered >= 0.9:
            return Cause(
                "causal-off-by-one",
                0.9,
                f"{covered:.0%} of query tokens before the last one of each sequence are wrong, "
                f"every last token (and every decode) is right: the causal mask admits a key "
                f"after the query (j <= p + 1 instead of j <= p)",
            )
    if bool((bad & prefill_last).any()) and not bool((bad & ~(t["from_end"] == 0)).any()):
        return Cause(
            "causal-off-by-one",
            0.85,
            f"only the last query token of sequences is wrong ({_where(t, bad)}), including "
            f"prefill sequences: causal mask / query-tile end off by one at the diagonal",
        )
    return None


def _rule_window(r) -> Cause | None:
    t = r.per_token
    if "window_dist" not in t:
        return None
    bad, dist = t["bad"] > 0, t["window_dist"]
    if bool((bad & (dist < 0)).any()) or not bool((dist >= 1).any()):
        return None
    covered = float(bad[dist >= 1].float().mean())
    inside = int((dist < 0).sum())
    if covered < 0.8:
        return None
    score = 0.9 if inside else 0.5
    w = r.sliding_window
    return Cause(
        "sliding-window-edge",
        score,
        f"{covered:.0%} of tokens whose window cuts the prefix (p >= W = {w}) are wrong, all "
        f"{inside} tokens with p < W - 1 (window does not bite) are right: the window "
        f"admits W + 1 or W - 1 keys",
    )


def _rule_gqa(r) -> Cause | None:
    h = r.shape[1]
    if not r.bad_heads or len(r.bad_heads) == h:
        return None
    t = r.per_token
    per_token = float((t["heads"][t["bad"] > 0] == len(r.bad_heads)).float().mean())
    every_token = float((t["bad"] > 0).float().mean())
    if every_token < 0.8:
        return None
    groups = ""
    score = 0.85
    if r.num_kv_heads:
        qpk = h // r.num_kv_heads
        touched = sorted({x // qpk for x in r.bad_heads})
        whole = all(all(x in r.bad_heads for x in range(g * qpk, (g + 1) * qpk)) for g in touched)
        groups = (
            f" = all heads of KV group(s) {touched}"
            if whole
            else f" (part of KV group(s) {touched}, {qpk} query heads per KV head)"
        )
        score = 0.9
    return Cause(
        "gqa-head-mapping",
        score,
        f"only query heads {runs(r.bad_heads)} of {h} are wrong{groups}, in {every_token:.0%} "
        f"of tokens ({per_token:.0%} of bad tokens show exactly that head set), the others are "
        f"right: those heads read the wrong KV head",
    )


def _rule_block_table(r) -> Cause | None:
    if not r.sequences:
        return None
    t = r.per_token
    whole = [s for s in r.sequences if s.bad_tokens >= 0.9 * s.query_len]
    if len(whole) < len(r.sequences):
        return None
    num_seqs = int(t["seq"].max()) + 1 if len(t["seq"]) else 0
    every = all(s.bad_tokens == s.query_len for s in whole)
    if all(s.kind == "decode" for s in whole):
        score = 0.5  # missing-decode-kv explains this better
    elif len(whole) == num_seqs:
        score = 0.4  # everything is wrong: not specific
    else:
        score = 0.8 if every else 0.6
    names = ", ".join(str(s.index) for s in whole[:8]) + (" ..." if len(whole) > 8 else "")
    rest = f", the other {num_seqs - len(whole)} right" if len(whole) < num_seqs else ""
    return Cause(
        "block-table",
        score,
        f"whole sequences wrong ({len(whole)} of {num_seqs}: {names}){rest}: they read another "
        f"sequence's blocks (block table / wrong sequence's blocks)",
    )


def _rule_block_boundary(r) -> Cause | None:
    t = r.per_token
    if "block_off" not in t:
        return None
    bad = t["bad"] > 0
    first = (t["block_off"] == 0) & (t["pos"] > 0)
    n = int(bad.sum())
    if n < 2 or not bool(first.any()):
        return None
    at_boundary = float(first[bad].float().mean())
    covered = float(bad[first].float().mean())
    if at_boundary < 0.9 or covered < 0.5 or bool(first.all()):
        return None
    return Cause(
        "block-boundary",
        0.85,
        f"{at_boundary:.0%} of the {n} bad tokens are the first token after a block boundary "
        f"(p % {r.block_size} == 0; {covered:.0%} of such tokens are bad): block table or slot "
        f"arithmetic",
    )


def _rule_scale(r) -> Cause | None:
    if r.uniform_scale is not None:
        spread = float((r.per_token["bad"] > 0).float().mean())  # one factor on a few tokens is weak evidence
        return Cause(
            "scale",
            0.95 if spread >= 0.5 else 0.6,
            f"out = {r.uniform_scale:.4g} x ref on the mismatched elements: one uniform factor, "
            f"the fp8 v_scale (or an output scale) is wrong",
        )
    everywhere = float((r.per_token["bad"] > 0).float().mean()) > 0.9
    if everywhere and len(r.bad_heads) == r.shape[1] and len(r.bad_dims) == r.shape[2] and not r.nan:
        return Cause(
            "scale",
            0.35,
            "every token, head and dim is off without one common factor: softmax scale or "
            "fp8 k_scale (logit temperature), or a global bug",
        )
    return None


def _rule_noise(r) -> Cause | None:
    if r.nan or r.inf or r.worst_excess > 10:
        return None
    share = r.mismatched / r.total
    score = 0.7 if share < 0.01 else 0.3
    return Cause(
        "numerical-noise",
        score,
        f"all {r.mismatched} mismatches are within {r.worst_excess:.1f}x the tolerance "
        f"({share:.2%} of elements): accumulation order or precision; a bug usually misses by "
        f"far more",
    )


_RULES = (
    _rule_missing_decode_kv,
    _rule_unwritten_read,
    _rule_nan_in_inputs,
    _rule_causal,
    _rule_window,
    _rule_gqa,
    _rule_block_table,
    _rule_block_boundary,
    _rule_scale,
    _rule_noise,
)
