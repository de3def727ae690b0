"""Checked reads through each vLLM compat op over raw, poisoned caches (issue 18): an unwritten slot
the op would read is named (UnwrittenKVError: sequence, position, block, slot, contract) before any
kernel runs, turned on by `checked=True` or by PAGEDATTN_CHECKED=1 (an unmodified test suite); a
fully written batch passes."""

from __future__ import annotations

import pytest
import torch

from pagedattn.compat import vllm
from pagedattn.errors import UnwrittenKVError
from pagedattn.poison import empty_kv_cache

HEADS, KV_HEADS, HEAD, BLOCK = 4, 2, 32, 16
QUERY_LENS, CTX_LENS = [20, 1], [18, 21]  # a prefill and the seed's decode
SENTINEL = 7.0


def harness(layout: str, write: str):
    """vLLM's test_contexted_kv_attention set-up over raw caches from empty_kv_cache (poisoned).
    write: "ctx" (the seed's bug: only ctx_len tokens), "all" (ctx_len + the decode's own token, or
    every token for "full"), "ctx-minus-one" (one context token of the prefill left out)."""
    torch.manual_seed(0)
    seq_lens = [q + c for q, c in zip(QUERY_LENS, CTX_LENS)]
    k_cache, v_cache = empty_kv_cache(16, BLOCK, KV_HEADS, HEAD, dtype=torch.float16, layout=layout)
    table = torch.tensor([[5, 2, 9], [7, 1, 12]], dtype=torch.int32)
    key = torch.randn(sum(seq_lens), KV_HEADS, HEAD, dtype=torch.float16)
    value = torch.randn_like(key)
    start = [0, seq_lens[0]]
    rows, slots = [], []
    for s in range(2):
        n = {
            "ctx": CTX_LENS[s],
            "ctx-minus-one": CTX_LENS[s],
            "all": CTX_LENS[s] + (QUERY_LENS[s] == 1),
            "full": seq_lens[s],
        }[write]
        for p in range(n):
            if write == "ctx-minus-one" and s == 0 and p == 3:
                continue
            rows.append(start[s] + p)
            slots.append(int(table[s, p // BLOCK]) * BLOCK + p % BLOCK)
    write_op = vllm.reshape_and_cache if layout == "vllm_v0" else vllm.reshape_and_cache_flash
    one = torch.tensor(1.0)
    write_op(key[rows], value[rows], k_cache, v_cache, torch.tensor(slots), "auto", one, one)
    new = [start[s] + CTX_LENS[s] + i for s in range(2) for i in range(QUERY_LENS[s])]
    q = torch.randn(sum(QUERY_LENS), HEADS, HEAD, dtype=torch.float16)
    meta = dict(
        cu=torch.tensor([0, QUERY_LENS[0], sum(QUERY_LENS)], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        table=table,
    )
    return q, key[new], value[new], k_cache, v_cache, meta


def call(op, q, k, v, k_cache, v_cache, meta, out, **checked):
    one = torch.tensor(1.0)
    if op == "unified_attention":
        return vllm.unified_attention(
            q,
            k_cache,
            v_cache,
            out,
            meta["cu"],
            max(QUERY_LENS),
            meta["seq_lens"],
            int(meta["seq_lens"].max()),
            HEAD**-0.5,
            True,
            (-1, -1),
            meta["table"],
            0,
            None,
            one,
            one,
            **checked,
        )
    fn = getattr(vllm, op)
    return fn(
        q,
        k,
        v,
        out,
        "auto",
        k_cache,
        v_cache,
        meta["table"],
        meta["cu"],
        meta["seq_lens"],
        int(meta["seq_lens"].max()),
        max(QUERY_LENS),
        one,
        one,
        **checked,
    )


# op -> (layout, what to write so that the op reads an unwritten slot, the position it names, contract)
BROKEN = {
    "context_attention_fwd": ("vllm_v0", "ctx-minus-one", (0, 3), "context-cache"),
    "chunked_prefill_paged_decode": ("vllm_v0", "ctx", (1, CTX_LENS[1]), "decode_from_cache=True"),
    "unified_attention": ("nhd", "ctx", (0, CTX_LENS[0]), "full-cache"),
}
# the sequences that read an unwritten slot (unified_attention: under the full-cache contract both
# sequences' query tokens were never written)
READERS = {"context_attention_fwd": [0], "chunked_prefill_paged_decode": [1], "unified_attention": [0, 1]}
FIXED = {"context_attention_fwd": "ctx", "chunked_prefill_paged_decode": "all", "unified_attention": "full"}


def turn_on(mode, monkeypatch) -> dict:
    if mode == "env":
        monkeypatch.setenv("PAGEDATTN_CHECKED", "1")
        return {}
    return dict(checked=True)


@pytest.mark.parametrize("mode", ["kwarg", "env"])
@pytest.mark.parametrize("op", list(BROKEN))
def test_checked_read_names_the_unwritten_slot_before_any_kernel_runs(op, mode, monkeypatch, request):
    layout, write, (seq, position), contract = BROKEN[op]
    q, k, v, k_cache, v_cache, meta = harness(layout, write)
    out = torch.full_like(q, SENTINEL)
    with pytest.raises(UnwrittenKVError) as info:
        call(op, q, k, v, k_cache, v_cache, meta, out, **turn_on(mode, monkeypatch))
    block = int(meta["table"][seq, position // BLOCK])
    message = str(info.value)
    assert f"sequence {seq} (" in message
    assert f"position {position} (block {block}, slot {block * BLOCK + position % BLOCK})" in message
    assert "never written" in message and contract in message
    assert (out == SENTINEL).all()  # refused before launch: nothing was written


@pytest.mark.parametrize("mode", ["kwarg", "env"])
@pytest.mark.parametrize("op", list(BROKEN))
def test_checked_read_passes_a_fully_written_batch(op, mode, monkeypatch, request):
    layout = BROKEN[op][0]
    q, k, v, k_cache, v_cache, meta = harness(layout, FIXED[op])
    out = torch.full_like(q, SENTINEL)
    call(op, q, k, v, k_cache, v_cache, meta, out, **turn_on(mode, monkeypatch))
    assert torch.isfinite(out).all() and not (out == SENTINEL).all(dim=(1, 2)).any()


@pytest.mark.parametrize("op", list(BROKEN))
def test_unchecked_the_unwritten_slot_shows_as_nan_in_its_rows(op):
    """Without checked mode the poison makes the bad read visible: NaN in exactly the rows that read it
    (every query of those sequences reads the slot: it lies before all of them)."""
    layout, write, _, _ = BROKEN[op]
    q, k, v, k_cache, v_cache, meta = harness(layout, write)
    out = call(op, q, k, v, k_cache, v_cache, meta, torch.empty_like(q))
    bad_rows = (~torch.isfinite(out)).flatten(1).any(1).nonzero().flatten().tolist()
    expected = [r for s in READERS[op] for r in range(meta["cu"][s], meta["cu"][s + 1])]
    assert bad_rows == expected
