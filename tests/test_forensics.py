"""forensics.compare / diagnose: each known corruption pattern, planted on random data, is named by
its cause id; clean data reports clean; reports serialise and render."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from pagedattn.batch import BatchMetadata
from pagedattn.errors import ShapeError
from pagedattn.forensics import CAUSES, compare, print_report
from pagedattn.testing import cu_seqlens

# Five sequences: prefills with and without context, one decode; positions straddle block
# boundaries (16) and the window edge (W = 16).
QUERY_LENS = (12, 20, 7, 16, 1)
CTX_LENS = (0, 5, 30, 17, 40)
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, WINDOW = 8, 2, 16, 16, 16
TOL = dict(atol=1e-3, rtol=1e-3)


@pytest.fixture
def batch() -> BatchMetadata:
    seq_lens = [q + c for q, c in zip(QUERY_LENS, CTX_LENS)]
    return BatchMetadata.from_lens(QUERY_LENS, seq_lens, [[0] * 4 for _ in QUERY_LENS])


@pytest.fixture
def ref() -> torch.Tensor:
    return torch.randn(sum(QUERY_LENS), NUM_Q_HEADS, HEAD_SIZE)


def token_geometry():
    """(query index i, tokens from the end, absolute position p) per token."""
    q = torch.tensor(QUERY_LENS)
    starts = torch.repeat_interleave(torch.cumsum(q, 0) - q, q)
    i = torch.arange(int(q.sum())) - starts
    from_end = torch.repeat_interleave(q, q) - 1 - i
    pos = torch.repeat_interleave(torch.tensor(CTX_LENS), q) + i
    return i, from_end, pos


def perturb(out: torch.Tensor, mask, amount: float = 0.1) -> torch.Tensor:
    out[mask] += amount * torch.randn_like(out[mask])
    return out


def plant(pattern: str, ref: torch.Tensor) -> torch.Tensor:
    out = ref.clone()
    _, from_end, pos = token_geometry()
    if pattern == "missing-decode-kv":  # the decode token read a stale (finite) slot
        return perturb(out, -1)
    if pattern == "missing-decode-kv-nan":  # ... or a poisoned one
        out[-1] = float("nan")
        return out
    if pattern == "unwritten-read":  # NaN in a few heads of two prefill tokens
        out[5, 2] = float("nan")
        out[30, :3] = float("nan")
        return out
    if pattern == "causal-off-by-one":  # every query but the last of each sequence saw a future key
        return perturb(out, from_end > 0)
    if pattern == "sliding-window-edge":  # W + 1 keys: every token the window cuts
        return perturb(out, pos >= WINDOW, 0.05)
    if pattern == "gqa-head-mapping":  # h % num_kv_heads instead of h // 4: heads 1, 3, 4, 6
        return perturb(out, (slice(None), [1, 3, 4, 6]))
    if pattern == "block-table":  # sequences 1 and 3 read each other's blocks
        perturb(out, slice(12, 32))
        return perturb(out, slice(39, 55))
    if pattern == "block-boundary":  # the first token after each block boundary
        return perturb(out, (pos % BLOCK_SIZE == 0) & (pos > 0))
    if pattern == "scale":  # v_scale twice too large
        return out * 2
    if pattern == "numerical-noise":  # two elements just past tolerance
        out[3, 1, 2] += 0.003
        out[40, 5, 7] -= 0.004
        return out
    raise AssertionError(pattern)


PATTERNS = [
    "missing-decode-kv",
    "missing-decode-kv-nan",
    "unwritten-read",
    "causal-off-by-one",
    "sliding-window-edge",
    "gqa-head-mapping",
    "block-table",
    "block-boundary",
    "scale",
    "numerical-noise",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_planted_pattern_is_diagnosed(pattern, ref, batch):
    out = plant(pattern, ref)
    report = compare(
        out,
        ref,
        batch,
        **TOL,
        num_kv_heads=NUM_KV_HEADS,
        block_size=BLOCK_SIZE,
        sliding_window=WINDOW if pattern == "sliding-window-edge" else None,
    )
    expected = pattern.removesuffix("-nan")
    assert not report.ok
    causes = report.diagnose()
    assert causes[0].id == expected, [(c.id, c.score) for c in causes]
    assert all(c.id in CAUSES for c in causes)
    assert causes == sorted(causes, key=lambda c: -c.score)
    assert expected in report.summary()


def test_seed_signature(ref, batch):
    """One decode token, all heads, all dims, NaN: the seed's pattern, named as such."""
    out = plant("missing-decode-kv-nan", ref)
    report = compare(out.half(), ref, batch, **TOL, num_kv_heads=NUM_KV_HEADS, block_size=BLOCK_SIZE)
    assert report.mismatched == NUM_Q_HEADS * HEAD_SIZE == report.nan
    assert report.num_bad_tokens == 1 and len(report.sequences) == 1
    seq = report.sequences[0]
    assert (seq.index, seq.kind, seq.query_len, seq.ctx_len) == (4, "decode", 1, 40)
    token = report.tokens[0]
    assert (token.token, token.seq, token.position, token.from_end, token.block_offset) == (55, 4, 40, 0, 8)
    assert report.bad_heads == list(range(NUM_Q_HEADS)) and report.bad_dims == list(range(HEAD_SIZE))
    assert [c.id for c in report.diagnose()][:2] == ["missing-decode-kv", "unwritten-read"]
    assert "1 token (seq 4, decode, position 40) x all 8 heads x all 16 dims" in report.summary()


def test_zeroed_decode_token_still_names_missing_kv(ref, batch):
    """A kernel whose empty-row guard turns the poisoned NaN into 0 leaves the same diagnosis."""
    out = ref.clone()
    out[-1] = 0.0
    report = compare(out, ref, batch, **TOL)
    assert report.zeroed
    assert [c.id for c in report.diagnose()][:2] == ["missing-decode-kv", "unwritten-read"]


def test_clean(ref, batch):
    out = ref + 1e-5 * torch.randn_like(ref)
    report = compare(out, ref, batch, **TOL)
    assert report.ok and report.mismatched == 0 and report.diagnose() == []
    assert report.summary().startswith("clean: all 7168 elements within")
    assert "\n" not in report.summary()


def test_uniform_scale_factor(ref, batch):
    report = compare(ref * 2, ref, batch, **TOL)
    assert report.uniform_scale == pytest.approx(2.0, rel=1e-3)
    assert compare(plant("block-table", ref), ref, batch, **TOL).uniform_scale is None


def test_groups(ref, batch):
    out = plant("gqa-head-mapping", ref)
    report = compare(out, ref, batch, **TOL, num_kv_heads=NUM_KV_HEADS)
    assert report.bad_heads == [1, 3, 4, 6]
    assert report.bad_dims == list(range(HEAD_SIZE))
    assert [s.index for s in report.sequences] == [0, 1, 2, 3, 4]
    assert report.num_bad_tokens == sum(QUERY_LENS)
    assert all(t.bad_heads == 4 for t in report.tokens)


def test_to_dict_is_json(ref, batch):
    report = compare(plant("causal-off-by-one", ref), ref, batch, **TOL, block_size=BLOCK_SIZE)
    d = json.loads(report.to_json())
    assert d["ok"] is False and d["mismatched"] == report.mismatched
    assert d["causes"][0]["id"] == "causal-off-by-one" and d["causes"][0]["evidence"]
    assert len(d["tokens"]) == report.num_bad_tokens and "_tok" not in d
    clean = json.loads(compare(ref, ref, batch, **TOL).to_json())
    assert clean["ok"] is True and clean["causes"] == []


def test_render(ref, batch):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=160)
    print_report(compare(plant("missing-decode-kv-nan", ref), ref, batch, **TOL, block_size=BLOCK_SIZE), console)
    text = buf.getvalue()
    assert "missing-decode-kv" in text and "by sequence" in text and "likely causes" in text
    buf = io.StringIO()
    print_report(compare(ref, ref, batch, **TOL), Console(file=buf, width=160))
    assert buf.getvalue().strip().startswith("clean")


def test_shape_errors(ref, batch):
    with pytest.raises(ShapeError, match="out"):
        compare(ref[:-1], ref, batch)
    with pytest.raises(ShapeError, match="query tokens"):
        compare(ref[:-1], ref[:-1], batch)
    with pytest.raises(ShapeError, match="num_kv_heads"):
        compare(ref, ref, batch, num_kv_heads=3)


def test_large_output_is_vectorised():
    """~8M elements (a fifth of the seed's 43.7M): a handful of tensor passes, no per-element Python."""
    query_lens = (900, 600, 500, 1)
    batch = BatchMetadata.from_lens(query_lens, [q + 100 for q in query_lens], [[0]] * 4)
    ref = torch.randn(sum(query_lens), 32, 128, dtype=torch.float16)
    out = ref.clone()
    out[-1] = float("nan")
    compare(out[:2], ref[:2], BatchMetadata.from_lens((2,), (2,), [[0]]))  # warm up
    start = time.perf_counter()
    report = compare(out, ref, batch, atol=2e-3, rtol=2e-3)
    assert time.perf_counter() - start < 3.0
    assert report.mismatched == 32 * 128 and report.top.id == "missing-decode-kv"


# ---------------------------------------------------------------------------------------------
# default tolerances, input evidence (user NaN vs poison), saved tensors
# ---------------------------------------------------------------------------------------------
def test_correct_bf16_output_is_clean_with_the_default_tolerance(ref, batch):
    """bf16 output rounded from the fp32 reference: within verify's bf16 tolerance, not a 'scale' bug."""
    from pagedattn.tolerances import TOLERANCES

    out = ref.to(torch.bfloat16)
    assert compare(out, ref, batch).ok
    assert (compare(out, ref, batch).atol, compare(out, ref, batch).rtol) == TOLERANCES[torch.bfloat16]
    assert not compare(out, ref, batch, atol=1e-3, rtol=1e-3).ok  # the old 1e-3 default called it a mismatch
    wrong = out.clone()
    wrong[3] *= 1.5
    assert not compare(wrong, ref, batch).ok


def small_raw_batch():
    """Two sequences over a poisoned raw cache: a 6-token prefill (ctx 3) and a decode (ctx 5), context
    contract with decode_from_cache=True; every context token written, the decode's own token not."""
    from pagedattn.poison import empty_kv_cache

    torch.manual_seed(0)
    heads, kvh, d, bs = 4, 2, 16, 4
    query_lens, ctx_lens = [6, 1], [3, 5]
    seq_lens = [q + c for q, c in zip(query_lens, ctx_lens)]
    table = torch.tensor([[3, 0, 5], [1, 4, 0]], dtype=torch.int32)
    batch = BatchMetadata.from_lens(query_lens, seq_lens, table)
    k_cache, v_cache = empty_kv_cache(6, bs, kvh, d, dtype=torch.float32)
    keys, values = torch.randn(sum(seq_lens), kvh, d), torch.randn(sum(seq_lens), kvh, d)
    starts = [0, seq_lens[0]]
    for s in range(2):
        for p in range(ctx_lens[s]):
            b, o = int(table[s, p // bs]), p % bs
            k_cache[b, o], v_cache[b, o] = keys[starts[s] + p], values[starts[s] + p]
    new_rows = [starts[s] + ctx_lens[s] + i for s in range(2) for i in range(query_lens[s])]
    q = torch.randn(sum(query_lens), heads, d)
    return batch, q, k_cache, v_cache, keys[new_rows], values[new_rows], table, ctx_lens


def run_reference(batch, q, k_cache, v_cache, k_new, v_new, decode_from_cache):
    from pagedattn import reference

    return reference.attention(
        q,
        k_cache,
        v_cache,
        batch.cu_seqlens_q,
        batch.seq_lens,
        batch.block_table,
        k_new=k_new,
        v_new=v_new,
        decode_from_cache=decode_from_cache,
    )


def test_a_poisoned_read_is_named_from_the_caches():
    batch, q, k_cache, v_cache, k_new, v_new, table, ctx_lens = small_raw_batch()
    out = run_reference(batch, q, k_cache, v_cache, k_new, v_new, decode_from_cache=True)  # reads the poison
    ref = run_reference(batch, q, k_cache, v_cache, k_new, v_new, decode_from_cache=False)  # intended
    inputs = dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, decode_from_cache=True)
    alone = compare(out, ref, batch)
    assert alone.top.id == "missing-decode-kv" and alone.inputs is None
    report = compare(out, ref, batch, **inputs)
    block = int(table[1, ctx_lens[1] // 4])
    slot = block * 4 + ctx_lens[1] % 4
    assert report.inputs.poisoned_reads == [(1, ctx_lens[1], block, slot)] and report.inputs.num_nonfinite_reads == 0
    assert report.top.id == "missing-decode-kv" and report.top.score > alone.top.score
    assert f"seq 1 position {ctx_lens[1]} (block {block}, slot {slot})" in report.top.evidence
    assert "nan-in-inputs" not in [c.id for c in report.diagnose()]
    # the reference read the same poisoned cache (README-style): the caches still say "unwritten"
    same = compare(out, out.clone(), batch, **inputs)
    assert same.shared_nonfinite == same.nan > 0
    assert same.top.id == "missing-decode-kv" and "nan-in-inputs" not in [c.id for c in same.diagnose()]


@pytest.mark.parametrize("where", ["cache", "q", "k_new"])
def test_a_nan_the_user_wrote_is_not_blamed_on_an_unwritten_slot(where):
    batch, q, k_cache, v_cache, k_new, v_new, table, ctx_lens = small_raw_batch()
    b, o = int(table[1, ctx_lens[1] // 4]), ctx_lens[1] % 4
    k_cache[b, o], v_cache[b, o] = 0.5, 0.5  # the decode token's slot is written: no poison read
    if where == "cache":
        k_cache[int(table[0, 0]), 1, 0, 3] = float("nan")  # the user's NaN in sequence 0's context
    elif where == "q":
        q[2, 1, 0] = float("nan")
    else:
        k_new[4, 0, 0] = float("nan")
    out = run_reference(batch, q, k_cache, v_cache, k_new, v_new, decode_from_cache=True)
    ref = out.clone()  # the reference read the same inputs: NaN at the same elements
    alone = compare(out, ref, batch)
    assert alone.nan > 0 and alone.shared_nonfinite == alone.nan
    assert alone.top.id == "nan-in-inputs"  # without the inputs: "the reference is NaN there too"
    report = compare(
        out, ref, batch, q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, decode_from_cache=True
    )
    ids = [c.id for c in report.diagnose()]
    assert ids[0] == "nan-in-inputs" and report.top.score >= 0.95, report.diagnose()
    assert "unwritten-read" not in ids and report.inputs.num_poisoned_reads == 0
    expected = {"cache": "cache slot(s) written with NaN", "q": "q rows 2", "k_new": "k_new/v_new rows 4"}[where]
    assert expected in report.top.evidence


def save_case(tmp_path, out, ref, batch, **meta):
    torch.save(out, tmp_path / "out.pt")
    torch.save(ref, tmp_path / "ref.pt")
    meta = dict(
        query_lens=list(batch.host_query_lens()),
        seq_lens=list(batch.host_seq_lens()),
        block_table=batch.block_table.tolist(),
        **meta,
    )
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "out.pt", tmp_path / "ref.pt", tmp_path / "meta.json"


def test_the_seed_case_from_saved_tensors_alone(tmp_path, ref, batch):
    """NaN in one decode token, all heads, all dims, saved by a failing test: missing-decode-kv."""
    from pagedattn.forensics import compare_saved

    out = plant("missing-decode-kv-nan", ref).half()
    paths = save_case(tmp_path, out, ref.half(), batch)
    report = compare_saved(*paths)
    assert report.top.id == "missing-decode-kv" and report.nan == NUM_Q_HEADS * HEAD_SIZE
    # vLLM-style metadata: cu_seqlens_q and ctx_lens, outputs flattened to [tokens, heads * dims]
    cu = cu_seqlens(QUERY_LENS)
    torch.save(out.flatten(1), tmp_path / "flat.pt")
    torch.save(ref.half().flatten(1), tmp_path / "flat_ref.pt")
    torch.save(
        dict(cu_seqlens_q=torch.tensor(cu), ctx_lens=torch.tensor(CTX_LENS), num_q_heads=NUM_Q_HEADS),
        tmp_path / "meta.pt",
    )
    flat = compare_saved(tmp_path / "flat.pt", tmp_path / "flat_ref.pt", tmp_path / "meta.pt")
    assert flat.to_dict() == report.to_dict()


def test_saved_inputs_are_read_from_the_json(tmp_path):
    from pagedattn.forensics import compare_saved

    batch, q, k_cache, v_cache, k_new, v_new, table, ctx_lens = small_raw_batch()
    out = run_reference(batch, q, k_cache, v_cache, k_new, v_new, decode_from_cache=True)
    ref = run_reference(batch, q, k_cache, v_cache, k_new, v_new, decode_from_cache=False)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        torch.save(t, tmp_path / f"{name}.pt")
    paths = save_case(
        tmp_path,
        out,
        ref,
        batch,
        contract="context",
        decode_from_cache=True,
        k_cache="k_cache.pt",
        v_cache="v_cache.pt",
        block_size=4,
    )
    report = compare_saved(*paths)
    assert report.inputs.given == ["cache"] and report.inputs.num_poisoned_reads == 1
    assert report.top.id == "missing-decode-kv" and report.top.score == 0.98 and report.block_size == 4


def test_compare_cli(tmp_path, ref, batch, capsys):
    from pagedattn.cli import main

    paths = [
        str(p) for p in save_case(tmp_path, plant("missing-decode-kv-nan", ref), ref, batch, block_size=BLOCK_SIZE)
    ]
    assert main(["compare", paths[0], paths[1], "--batch", paths[2]]) == 1
    text = capsys.readouterr().out
    assert "missing-decode-kv" in text and "by token" in text and "likely causes" in text
    assert main(["compare", paths[0], paths[1], "--batch", paths[2], "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["causes"][0]["id"] == "missing-decode-kv"
    torch.save(ref, tmp_path / "same.pt")
    assert main(["compare", str(tmp_path / "same.pt"), paths[1], "--batch", paths[2]]) == 0
    with pytest.raises(SystemExit, match="needs seq_lens"):
        (tmp_path / "bad.json").write_text(json.dumps(dict(query_lens=[1])))
        main(["compare", paths[0], paths[1], "--batch", str(tmp_path / "bad.json")])
