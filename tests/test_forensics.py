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


PATTERNS = ["missing-decode-kv", "missing-decode-kv-nan", "unwritten-read", "causal-off-by-one",
            "sliding-window-edge", "gqa-head-mapping", "block-table", "block-boundary", "scale",
            "numerical-noise"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_planted_pattern_is_diagnosed(pattern, ref, batch):
    out = plant(pattern, ref)
    report = compare(out, ref, batch, **TOL, num_kv_heads=NUM_KV_HEADS, block_size=BLOCK_SIZE,
                     sliding_window=WINDOW if pattern == "sliding-window-edge" else None)
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
