"""fp8 (e4m3) queries and outputs, and per-KV-head fp8 scales (issue 19).

Every path of the unified kernel (full and context contracts, decode_from_cache, mixed
prefill + decode launches, split-KV) with fp8 q and/or an fp8 output against the float64
reference computed from the same (dequantized) values: fp8 q needs only the output dtype's
tolerance, an fp8 output is compared dequantized (out * out_scale). Outputs are poisoned
(NaN) before the kernel runs; caches hold NaN in every slot not written. On CPU the kernels run
through Triton's interpreter at tiny shapes (q.k is upcast there: fp8 dots are GPU-only); the
GPU tests use realistic shapes and, on sm_89+, the fp8 tensor-core q.k.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pagedattn import AttentionOptions, PagedAttention, reference
from pagedattn.compat import vllm
from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.errors import DeviceError, DTypeError, ScaleError, ShapeError, UnsupportedConfigError
from pagedattn.kernels.write import write_kv
from pagedattn.testing import DEVICE, assert_close_to_reference, geometry, make_inputs, split_plan
from pagedattn.tolerances import FP8_QUERY_TOLERANCE

E4M3 = torch.float8_e4m3fn
Q_SCALE = 0.021  # randn / 0.021 stays well inside e4m3's 448
OUT_SCALE = 0.013  # attention outputs (|v| <~ 4) / 0.013 stay inside 448 too
KV_HEAD_SCALES = (0.29, 0.41)  # per KV head (2 KV heads), different: a head reading the other's scale shows
SMALL = AttentionConfig(4, 2, 32, 16, torch.bfloat16)
MIXED = BatchShape((5, 1, 1, 3), (3, 20, 40, 0))  # prefill, decode, decode, fresh prefill


def _e4m3(x: torch.Tensor, scale) -> torch.Tensor:
    """x / scale in e4m3 (scale: a float, or one per KV head of x [..., num_kv_heads, head_size])."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.numel() > 1:
        s = s.reshape(-1, 1)
    return (x.float() / s).to(E4M3)


def _poisoned(shape, dtype, device) -> torch.Tensor:
    if dtype == E4M3:
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(E4M3)  # e4m3's NaN
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@dataclasses.dataclass
class Case:
    q: torch.Tensor  # fp8
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: object
    v_scale: object
    x: object  # the make_inputs Inputs (metadata, k_new / v_new, unquantized q)
    contract: str


def _case(config, shape, contract, cache, *, seed=0, device=DEVICE, q_dtype=E4M3) -> Case:
    """Inputs for `contract` ("full", "context", "context-decode") with the caches in `cache`
    ("bf16", "e4m3", "e4m3-head" (per-KV-head scales), "e5m2", "e5m2-head"); q quantized to e4m3."""
    x = make_inputs(config, shape, device=device, seed=seed, contract=contract)  # context-decode: decode K/V cached
    kc, vc, ks, vs = x.k_cache, x.v_cache, None, None
    if cache != "bf16":
        fmt = E4M3 if cache.startswith("e4m3") else torch.float8_e5m2
        heads = config.num_kv_heads
        if cache.endswith("-head"):
            ks = torch.tensor([KV_HEAD_SCALES[i % 2] * (1 + 0.1 * i) for i in range(heads)], device=device)
            vs = torch.flip(ks, (0,)) * 1.3
            k_div, v_div = ks.reshape(-1, 1), vs.reshape(-1, 1)
        else:
            ks, vs = 0.37, 0.53
            k_div, v_div = ks, vs
        kc = (x.k_cache.float() / k_div).to(fmt)  # NaN (unwritten) stays NaN
        vc = (x.v_cache.float() / v_div).to(fmt)
    q = _e4m3(x.q, Q_SCALE) if q_dtype == E4M3 else x.q
    return Case(q, kc, vc, ks, vs, x, contract)


def _attn(c: Case, config, out_dtype, *, q_scale=Q_SCALE, out_scale=OUT_SCALE, **kwargs) -> PagedAttention:
    opts = AttentionOptions(
        scale=config.head_size**-0.5,
        k_scale=c.k_scale,
        v_scale=c.v_scale,
        q_scale=q_scale,
        out_scale=out_scale if out_dtype == E4M3 else None,
        **kwargs.pop("options", {}),
    )
    return PagedAttention(
        opts,
        **geometry(config),
        dtype=c.q.dtype,
        kv_cache_dtype=c.k_cache.dtype,
        out_dtype=out_dtype,
        device=c.q.device,
        contract="full" if c.contract == "full" else "context",
        decode_from_cache=c.contract == "context-decode",
        **kwargs,
    )


def _reference(c: Case, *, q_scale=Q_SCALE, k_scale=None, v_scale=None, **options) -> torch.Tensor:
    context = c.contract != "full"
    return reference.attention(
        c.q,
        c.k_cache,
        c.v_cache,
        c.x.cu_seqlens_q,
        c.x.seq_lens,
        c.x.block_table,
        k_scale=c.k_scale if k_scale is None else k_scale,
        v_scale=c.v_scale if v_scale is None else v_scale,
        q_scale=q_scale if c.q.dtype == E4M3 else None,
        k_new=c.x.k_new if context else None,
        v_new=c.x.v_new if context else None,
        decode_from_cache=c.contract == "context-decode",
        compute_dtype=torch.float64,
        **options,
    )


def _run(c: Case, attn: PagedAttention, out_dtype, dispatch_plan=None, **run_kwargs) -> torch.Tensor:
    x = c.x
    attn.plan(
        x.cu_seqlens_q,
        x.seq_lens,
        x.block_table,
        max_query_len=x.max_query_len,
        max_seq_len=x.max_seq_len,
        dispatch_plan=dispatch_plan,
    )
    out = _poisoned(tuple(c.q.shape), out_dtype, c.q.device)
    extra = dict(k_new=x.k_new, v_new=x.v_new) if c.contract != "full" else {}
    result = attn.run(c.q, c.k_cache, c.v_cache, out=out, **extra, **run_kwargs)
    assert result is out
    return out


def _check(out, ref, out_dtype, label, out_scale=OUT_SCALE):
    if out_dtype == E4M3:  # dequantized (out * out_scale) against the reference, saturated as the output is
        ref = ref.clamp(-448 * out_scale, 448 * out_scale)
        out = out.float() * out_scale
    assert_close_to_reference(out, ref, out_dtype, label)


# ---------------------------------------------------------------------------------------------
# every path, interpreter-sized (also runs on a GPU)
# ---------------------------------------------------------------------------------------------
PATHS = [
    ("full", "e4m3-head", E4M3),
    ("full", "bf16", torch.bfloat16),
    ("full", "e4m3", torch.float16),
    ("context", "e4m3", torch.bfloat16),
    ("context", "bf16", E4M3),
    ("context-decode", "e5m2-head", E4M3),
]


@pytest.mark.kernels
@pytest.mark.parametrize("contract,cache,out_dtype", PATHS, ids=[f"{a}-{b}-{str(c)[6:]}" for a, b, c in PATHS])
def test_fp8_q_mixed_batch_every_contract(contract, cache, out_dtype):
    c = _case(SMALL, MIXED, contract, cache, seed=1)
    attn = _attn(c, SMALL, out_dtype)
    out = _run(c, attn, out_dtype)
    assert len(attn._bindings) == 1
    _check(out, _reference(c), out_dtype, f"fp8 q {contract} {cache} -> {out_dtype}")


@pytest.mark.kernels
@pytest.mark.parametrize("cache,out_dtype", [("e4m3-head", E4M3), ("bf16", torch.bfloat16)])
def test_fp8_q_split_kv(cache, out_dtype):
    """Split-KV partials and the merge kernel (which writes the fp8 output) with fp8 q."""
    shape = BatchShape((1, 1, 1), (69, 0, 16))
    c = _case(SMALL, shape, "full", cache, seed=2)
    plan = split_plan(SMALL, shape, 4, cache_dtype=c.k_cache.dtype)
    assert plan.kernel == "split_kv" and plan.num_splits == 4
    out = _run(c, _attn(c, SMALL, out_dtype), out_dtype, dispatch_plan=plan)
    _check(out, _reference(c), out_dtype, f"split-kv {cache} -> {out_dtype}")


@pytest.mark.kernels
def test_fp8_out_with_bf16_q_and_options():
    """An fp8 output is independent of fp8 q: bf16 q, e4m3 cache, softcap + sinks + window."""
    config = SMALL.replace(sliding_window=9, softcap=4.0, use_sinks=True)
    c = _case(config, MIXED, "full", "e4m3", seed=3, q_dtype=torch.bfloat16)
    options = dict(sliding_window=9, softcap=4.0, sinks=c.x.options["sinks"])
    attn = _attn(c, config, E4M3, options=options)
    out = _run(c, attn, E4M3)
    _check(out, _reference(c, **options), E4M3, "bf16 q -> fp8 out")


@pytest.mark.kernels
def test_fp8_q_with_alibi_context():
    config = SMALL.replace(use_alibi=True)
    c = _case(config, MIXED, "context", "e4m3-head", seed=4)
    options = dict(alibi_slopes=c.x.options["alibi_slopes"])
    out = _run(c, _attn(c, config, torch.float32, options=options), torch.float32)
    _check(out, _reference(c, **options), torch.bfloat16, "alibi context fp8 q -> fp32")


# ---------------------------------------------------------------------------------------------
# per-layer scales through run(), saturation, NaN, reference backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.kernels
def test_per_layer_scales_per_run_call():
    """Two layers with their own q / k / v / out scales through one plan: the scales are per-call
    tensors (no rebinding for same-shaped ones), and switching per-tensor <-> per-head works."""
    c = _case(SMALL, MIXED, "full", "e4m3-head", seed=5)
    attn = _attn(c, SMALL, E4M3)
    dev = c.q.device
    layers = [
        dict(k_scale=c.k_scale, v_scale=c.v_scale, q_scale=Q_SCALE, out_scale=OUT_SCALE),
        dict(k_scale=c.k_scale * 0.5, v_scale=c.v_scale * 2.0, q_scale=Q_SCALE * 3, out_scale=OUT_SCALE * 4),
        dict(k_scale=torch.tensor([0.7], device=dev), v_scale=c.v_scale, q_scale=Q_SCALE, out_scale=OUT_SCALE),
    ]
    x = c.x
    attn.plan(x.cu_seqlens_q, x.seq_lens, x.block_table, max_query_len=x.max_query_len, max_seq_len=x.max_seq_len)
    for i, layer in enumerate(layers):
        tensors = {k: torch.as_tensor(v, dtype=torch.float32, device=dev).reshape(-1) for k, v in layer.items()}
        out = _poisoned(tuple(c.q.shape), E4M3, dev)
        attn.run(c.q, c.k_cache, c.v_cache, out=out, **tensors)
        ref = _reference(c, q_scale=layer["q_scale"], k_scale=tensors["k_scale"], v_scale=tensors["v_scale"])
        _check(out, ref, E4M3, f"layer {i}", out_scale=layer["out_scale"])
    # layers 0 and 1 share a binding; layer 2's per-tensor k_scale needs its own launch arguments
    assert len(attn._bindings) == 2


@pytest.mark.kernels
def test_fp8_out_saturates_and_keeps_nan():
    """out / out_scale beyond 448 saturates to +-448 (never inf or NaN); a sequence with
    inconsistent metadata (seq_len < query_len, unvalidated) gets e4m3 NaN rows."""
    shape = BatchShape((3, 2), (5, 9))
    c = _case(SMALL, shape, "full", "e4m3", seed=6)
    tiny = 1e-3  # |out| up to ~2 / 1e-3 >> 448
    out = _run(c, _attn(c, SMALL, E4M3, out_scale=tiny), E4M3)
    ref = _reference(c) / tiny
    big = ref.abs() > 460
    assert big.any()
    assert torch.equal(out.float()[big].cpu(), (torch.sign(ref[big]) * 448).float().cpu())
    _check(out, _reference(c), E4M3, "saturated", out_scale=tiny)

    bad_lens = c.x.seq_lens.clone()
    bad_lens[0] = 1  # seq_len 1 < query_len 3
    attn = _attn(c, SMALL, E4M3)
    attn.plan(c.x.cu_seqlens_q, bad_lens, c.x.block_table, validate=False, max_query_len=3, num_tokens=5)
    out = _poisoned(tuple(c.q.shape), E4M3, c.q.device).view(torch.uint8).zero_().view(E4M3)
    attn.run(c.q, c.k_cache, c.v_cache, out=out)
    rows = out.view(torch.uint8)
    assert bool(((rows[:3] & 0x7F) == 0x7F).all()), "the bad sequence's rows must be e4m3 NaN"
    assert not bool(((rows[3:] & 0x7F) == 0x7F).any()), "the good sequence's rows must be numbers"


def test_reference_backend_fp8_q_and_out():
    c = _case(SMALL, MIXED, "context", "e4m3-head", seed=7, device="cpu")
    attn = _attn(c, SMALL, E4M3, backend="reference")
    out = _run(c, attn, E4M3)
    _check(out, _reference(c), E4M3, "reference backend")
    assert "dequantized by the reference" in attn.explain()


@pytest.mark.kernels
def test_explain_states_fp8_q_and_out():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton backend's device
    c = _case(SMALL, MIXED, "full", "e4m3", device=device)
    attn = _attn(c, SMALL, E4M3, backend="triton")
    attn.plan(c.x.cu_seqlens_q, c.x.seq_lens, c.x.block_table)
    text = attn.explain()
    assert "fp8 q (e4m3, real q = q * q_scale)" in text and "fp8 out (e4m3)" in text
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        assert "upcast" in text
    plain = PagedAttention(num_q_heads=4, num_kv_heads=2, head_size=32, block_size=16, device=device, backend="triton")
    plain.plan(c.x.cu_seqlens_q, c.x.seq_lens, c.x.block_table)
    assert "fp8" not in plain.explain()


# ---------------------------------------------------------------------------------------------
# per-KV-head scales in the cache write
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [pytest.param(True, marks=pytest.mark.kernels), False], ids=["triton", "torch"])
def test_write_per_head_scales(monkeypatch, kernel):
    """The write kernel (GPU or interpreter) and the plain-PyTorch write (CPU) give the bytes
    PyTorch's own division and fp8 conversion give, with one scale per KV head."""
    if not kernel:
        if DEVICE == "cuda":
            pytest.skip("the plain-PyTorch write runs only on the CPU without the interpreter")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    heads, d = 3, 16
    k = torch.randn(6, heads, d, device=DEVICE) * 3
    v = torch.randn(6, heads, d, device=DEVICE) * 3
    k[3, 1, 5] = float("nan")
    k[4, 0, 0] = 1e6  # saturates
    # poisoned (e4m3 NaN bytes): slots the write must not touch keep it
    k_cache = torch.full((4, 4, heads, d), 0x7F, dtype=torch.uint8, device=DEVICE).view(E4M3)
    v_cache = k_cache.clone()
    ks = torch.tensor([0.05, 0.2, 1.3], device=DEVICE)
    slots = torch.tensor([0, 5, -1, 9, 15, 2], device=DEVICE)
    write_kv(k, v, k_cache, v_cache, slots, k_scale=ks, v_scale=0.07)
    kept = slots >= 0
    want_k = (k[kept] / ks.reshape(1, -1, 1)).clamp(-448, 448).to(E4M3)
    want_v = (v[kept] / 0.07).clamp(-448, 448).to(E4M3)
    got_k = k_cache.view(torch.uint8).view(-1, heads, d)[slots[kept]]
    got_v = v_cache.view(torch.uint8).view(-1, heads, d)[slots[kept]]
    assert torch.equal(got_k, want_k.view(torch.uint8)) and torch.equal(got_v, want_v.view(torch.uint8))
    untouched = torch.ones(16, dtype=torch.bool, device=DEVICE)
    untouched[slots[kept]] = False
    for cache in (k_cache, v_cache):
        assert bool((cache.view(torch.uint8).view(16, heads, d)[untouched] == 0x7F).all()), "a slot not written changed"


def test_write_per_head_scale_errors():
    k = torch.randn(2, 3, 16)
    cache = torch.zeros(4, 4, 3, 16, dtype=E4M3)
    slots = torch.tensor([0, 1])
    for bad, words in [
        (torch.ones(2), "k_scale must be one value (per-tensor scale) or [num_kv_heads] = [3]"),
        (torch.ones(3, 1), "got shape (3, 1)"),
        (torch.tensor([1.0, 0.0, 1.0]), "k_scale[1] must be finite and > 0"),
        (torch.tensor([1.0, 1.0, float("inf")]), "k_scale[2] must be finite and > 0"),
    ]:
        with pytest.raises(ScaleError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            write_kv(k, k.clone(), cache, cache.clone(), slots, k_scale=bad, v_scale=1.0)


@pytest.mark.kernels
def test_paged_kv_cache_per_head_scales():
    from pagedattn.attention import attention, reference_attention
    from pagedattn.cache import PagedKVCache

    ks, vs = torch.tensor([0.3, 0.45]), torch.tensor([0.5, 0.25])
    cache = PagedKVCache(8, 16, 2, 32, torch.bfloat16, kv_dtype="fp8_e4m3", device=DEVICE, k_scale=ks, v_scale=vs)
    ids = [cache.new_sequence() for _ in range(2)]
    lens = [20, 3]
    kv = torch.randn(2, 23, 2, 32).to(torch.bfloat16).to(DEVICE)
    cache.append(ids, kv[0], kv[1], lens)
    batch = cache.batch(ids, lens)
    q = torch.randn(23, 4, 32).to(torch.bfloat16).to(DEVICE)
    out = attention(q, cache, batch)
    ref = reference_attention(q, cache, batch, compute_dtype=torch.float64)
    assert_close_to_reference(out, ref, torch.bfloat16, "PagedKVCache per-head scales")


@pytest.mark.kernels
def test_compat_reshape_and_cache_flash_per_head_scales():
    """vLLM's per-head ("attn_head") fp8 scales in its cache write: [num_kv_heads] tensors."""
    heads, d = 2, 32
    key = torch.randn(5, heads, d, device=DEVICE).to(torch.bfloat16)
    value = torch.randn(5, heads, d, device=DEVICE).to(torch.bfloat16)
    kc = torch.full((3, 16, heads, d), 0x7F, dtype=torch.uint8, device=DEVICE)  # e4m3 NaN: poison
    vc = kc.clone()
    ks, vs = torch.tensor([0.02, 0.05], device=DEVICE), torch.tensor([0.03, 0.01], device=DEVICE)
    slots = torch.tensor([3, 17, -1, 40, 0], device=DEVICE)
    vllm.reshape_and_cache_flash(key, value, kc, vc, slots, "fp8", ks, vs)
    kept = slots >= 0
    want = (key[kept].float() / ks.reshape(1, -1, 1)).clamp(-448, 448).to(E4M3).view(torch.uint8)
    assert torch.equal(kc.view(-1, heads, d)[slots[kept]], want)
    want = (value[kept].float() / vs.reshape(1, -1, 1)).clamp(-448, 448).to(E4M3).view(torch.uint8)
    assert torch.equal(vc.view(-1, heads, d)[slots[kept]], want)
    untouched = torch.ones(48, dtype=torch.bool, device=DEVICE)
    untouched[slots[kept]] = False
    for cache in (kc, vc):
        assert bool((cache.view(48, heads, d)[untouched] == 0x7F).all()), "a slot not written changed"


# ---------------------------------------------------------------------------------------------
# vLLM's unified_attention keywords
# ---------------------------------------------------------------------------------------------
def _vllm_call(c, out, **changes):
    x = c.x
    n, heads = x.seq_lens.shape[0], c.k_cache.shape[2]
    args = dict(
        q=c.q,
        k=c.k_cache,
        v=c.v_cache,
        out=out,
        cu_seqlens_q=x.cu_seqlens_q,
        max_seqlen_q=x.max_query_len,
        seqused_k=x.seq_lens,
        max_seqlen_k=x.max_seq_len,
        softmax_scale=SMALL.head_size**-0.5,
        causal=True,
        window_size=(-1, -1),
        block_table=x.block_table,
        softcap=0,
        # flash-attn's descale layout: [num_seqs, num_kv_heads], expanded
        q_descale=torch.tensor(Q_SCALE, device=c.q.device).expand(n, heads),
        k_descale=c.k_scale.reshape(1, -1).expand(n, heads),
        v_descale=c.v_scale.reshape(1, -1).expand(n, heads),
        output_scale=torch.tensor([OUT_SCALE], device=c.q.device),
    )
    args.update(changes)
    return vllm.unified_attention(**args)


@pytest.mark.kernels
def test_compat_unified_attention_fp8_q_and_output_scale():
    c = _case(SMALL, MIXED, "full", "e4m3-head", seed=8)
    out = _poisoned(tuple(c.q.shape), E4M3, c.q.device)
    assert _vllm_call(c, out, use_td=True) is out
    _check(out, _reference(c), E4M3, "compat fp8 q + output_scale")
    # fp8 q, bf16 out: output_scale None; per-tensor k/v descale as vLLM expands it
    out16 = _poisoned(tuple(c.q.shape), torch.bfloat16, c.q.device)
    n = c.x.seq_lens.shape[0]
    kd = torch.tensor([0.4], device=c.q.device)
    c2 = dataclasses.replace(c, k_cache=(c.k_cache.float() * c.k_scale.reshape(-1, 1) / 0.4).to(E4M3), k_scale=kd)
    _vllm_call(c2, out16, output_scale=None, k_descale=kd.expand(n, 2))
    _check(out16, _reference(c2), torch.bfloat16, "compat fp8 q, bf16 out")


def test_compat_unified_attention_fp8_errors():
    c = _case(SMALL, MIXED, "full", "e4m3-head", device="cpu")
    out8 = _poisoned(tuple(c.q.shape), E4M3, "cpu")
    out16 = _poisoned(tuple(c.q.shape), torch.bfloat16, "cpu")
    with pytest.raises(ScaleError, match="q_descale is required"):
        _vllm_call(c, out8, q_descale=None)
    with pytest.raises(UnsupportedConfigError, match="output_scale needs an fp8 out"):
        _vllm_call(c, out16)
    with pytest.raises(ScaleError, match="output_scale is required"):
        _vllm_call(c, out8, output_scale=None)
    per_seq = torch.tensor([[0.3, 0.4], [0.5, 0.4], [0.3, 0.4], [0.3, 0.4]])
    with pytest.raises(ScaleError, match="k_descale must hold one per-tensor scale or one per KV head"):
        _vllm_call(c, out8, k_descale=per_seq)
    with pytest.raises(ScaleError, match="q_descale must hold one per-tensor scale"):
        _vllm_call(c, out8, q_descale=torch.tensor([[0.1, 0.2]]).expand(4, 2))
    with pytest.raises(ScaleError, match="output_scale"):
        _vllm_call(c, out8, output_scale=torch.tensor([-1.0]))


# ---------------------------------------------------------------------------------------------
# vLLM's context ops (older cache layout): fp8_out_scale / output_scale
# ---------------------------------------------------------------------------------------------
CTX3 = BatchShape((5, 1, 3), (3, 20, 0))  # prefill over a cached prefix, decode, fresh prefill
KV_CACHE_DTYPE = {"bf16": "auto", "e4m3": "fp8", "e4m3-head": "fp8", "e5m2": "fp8_e5m2", "e5m2-head": "fp8_e5m2"}


def _older_layout(cache: torch.Tensor, which: str) -> torch.Tensor:
    """An nhd cache [num_blocks, block_size, num_kv_heads, head_size] in vLLM's older layout, fp8 as
    uint8 storage (as vLLM allocates it): k [nb, kvh, d // x, bs, x] (x = 16 bytes), v [nb, kvh, d, bs]."""
    if cache.dtype in (E4M3, torch.float8_e5m2):
        cache = cache.view(torch.uint8)
    nb, bs, kvh, d = cache.shape
    if which == "v":
        return cache.permute(0, 2, 3, 1).contiguous()
    x = 16 // cache.element_size()
    while d % x:
        x //= 2
    return cache.reshape(nb, bs, kvh, d // x, x).permute(0, 2, 3, 1, 4).contiguous()


def _context_op_call(c: Case, cache: str, out, *, op: str, **changes):
    """context_attention_fwd or chunked_prefill_paged_decode, called positionally as vLLM does;
    `changes` by the op's own argument names (fp8_out_scale / output_scale, q / query, ...)."""
    x = c.x
    q_name, out_name = ("q", "o") if op == "context" else ("query", "output")
    scales = (c.k_scale, c.v_scale) if c.k_scale is not None else (torch.tensor(1.0), torch.tensor(1.0))
    args = {
        q_name: c.q,
        "k": x.k_new,
        "v": x.v_new,
        out_name: out,
        "kv_cache_dtype": KV_CACHE_DTYPE[cache],
        "k_cache": _older_layout(c.k_cache, "k"),
        "v_cache": _older_layout(c.v_cache, "v"),
        "block_table": x.block_table,
        "cu_seqlens_q": x.cu_seqlens_q,
        "seq_lens": x.seq_lens,
        "max_seq_len": x.max_seq_len,
        "max_query_len": x.max_query_len,
        "k_scale": scales[0],
        "v_scale": scales[1],
    }
    if q_name in changes:
        args[q_name] = changes.pop(q_name)
    positional = list(args.values())
    fn = vllm.context_attention_fwd if op == "context" else vllm.chunked_prefill_paged_decode
    return fn(*positional, **changes)


@pytest.mark.kernels
@pytest.mark.parametrize("skip_decode", [False, True], ids=["all-rows", "skip_decode"])
def test_compat_context_attention_fwd_fp8_out_scale(skip_decode):
    """o in e4m3 holds attention / fp8_out_scale (per-KV-head e4m3 cache, bf16 q); with
    skip_decode=True the decode rows keep their bytes exactly and every other row is written."""
    c = _case(SMALL, CTX3, "context", "e4m3-head", seed=11, q_dtype=torch.bfloat16)
    shape = tuple(c.q.shape)
    if skip_decode:  # random finite e4m3 bytes: anything the kernel or the restore wrote shows
        sentinel = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 50).to(E4M3).to(c.q.device)
        out = sentinel.clone()
    else:
        out = _poisoned(shape, E4M3, c.q.device)
    scale = torch.tensor([OUT_SCALE], device=c.q.device)
    assert _context_op_call(c, "e4m3-head", out, op="context", fp8_out_scale=scale, skip_decode=skip_decode) is out
    ref = _reference(c)
    if not skip_decode:
        _check(out, ref, E4M3, "context_attention_fwd fp8 o")
        return
    decode = torch.zeros(shape[0], dtype=torch.bool, device=c.q.device)
    decode[5] = True  # the decode sequence's one token
    bits = out.view(torch.uint8)
    assert torch.equal(bits[decode], sentinel.view(torch.uint8)[decode]), (
        "skip_decode=True must leave the decode rows of an fp8 o untouched"
    )
    _check(bits[~decode].view(E4M3), ref[~decode], E4M3, "context_attention_fwd fp8 o, skip_decode")


@pytest.mark.kernels
@pytest.mark.parametrize("cache", ["e5m2", "bf16"])
def test_compat_chunked_prefill_paged_decode_output_scale(cache):
    """A mixed batch (prefill over a prefix, decode reading its own token from the cache, fresh
    prefill) into an e4m3 output holding attention / output_scale; output_scale a float or a tensor."""
    c = _case(SMALL, CTX3, "context-decode", cache, seed=12, q_dtype=torch.bfloat16)
    out = _poisoned(tuple(c.q.shape), E4M3, c.q.device)
    scale = OUT_SCALE if cache == "bf16" else torch.tensor([OUT_SCALE], device=c.q.device)
    assert _context_op_call(c, cache, out, op="chunked", output_scale=scale) is out
    _check(out, _reference(c), E4M3, f"chunked_prefill_paged_decode {cache} -> fp8 output")


@pytest.mark.parametrize("op", ["context", "chunked"])
def test_compat_context_ops_fp8_output_errors(op, monkeypatch):
    """Each bad fp8 output argument is refused by name, before anything is launched."""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched for a bad call")

    monkeypatch.setattr(vllm, "prefix_prefill", launched)
    c = _case(SMALL, CTX3, "context", "e4m3", device="cpu", q_dtype=torch.bfloat16)
    shape = tuple(c.q.shape)
    out8, out16 = _poisoned(shape, E4M3, "cpu"), _poisoned(shape, torch.bfloat16, "cpu")
    scale, out, q = ("fp8_out_scale", "o", "q") if op == "context" else ("output_scale", "output", "query")
    good = torch.tensor([OUT_SCALE])
    cases = [
        (dict(out=out16, scale=good), UnsupportedConfigError, f"{scale} needs an fp8 {out} .*bfloat16"),
        (dict(out=_poisoned(shape, torch.float8_e5m2, "cpu"), scale=good), UnsupportedConfigError, "float8_e5m2"),
        (dict(out=out8, scale=None), ScaleError, f"{out} is torch.float8_e4m3fn: {scale} is required"),
        (dict(out=out8, scale=torch.tensor([0.1, 0.2])), ScaleError, f"{scale} must hold one per-tensor scale"),
        (dict(out=out8, scale=torch.tensor([1], dtype=torch.int32)), ScaleError, f"{scale} must be a floating-point"),
        (dict(out=out8, scale=torch.tensor([-1.0])), ScaleError, f"{scale} must be finite and > 0"),
        (dict(out=out8, scale=float("nan")), ScaleError, f"{scale} must be finite and > 0"),
        (dict(out=out8, scale="0.1x"), ScaleError, f"{scale} must be a float or a one-element tensor"),
        (dict(out=out8, scale=good, q=_e4m3(c.q, Q_SCALE)), UnsupportedConfigError, f"{q} is torch.float8_e4m3fn"),
    ]
    if torch.cuda.is_available():
        cases.append((dict(out=out8, scale=good.cuda()), DeviceError, f"{scale} is on cuda"))
    for change, error, words in cases:
        extra = {scale: change["scale"]}
        if "q" in change:
            extra[q] = change["q"]
        with pytest.raises(error, match=words):
            _context_op_call(c, "e4m3", change["out"], op=op, **extra)


# ---------------------------------------------------------------------------------------------
# bad inputs: each names the argument, before any launch
# ---------------------------------------------------------------------------------------------
def _planner(**changes):
    kwargs = dict(
        num_q_heads=4,
        num_kv_heads=2,
        head_size=32,
        block_size=16,
        dtype=E4M3,
        kv_cache_dtype=E4M3,
        device="cpu",
    )
    options = dict(k_scale=0.5, v_scale=0.5, q_scale=0.1)
    options.update(changes.pop("options", {}))
    kwargs.update(changes)
    return PagedAttention(AttentionOptions(**options), **kwargs)


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(dtype=torch.float8_e5m2), DTypeError, "float8_e5m2 queries are not supported"),
        (dict(out_dtype=torch.float8_e5m2), DTypeError, "out_dtype must be one of"),
        (dict(kv_cache_dtype=torch.float32), UnsupportedConfigError, "over an fp32 cache"),
        (dict(options=dict(q_scale=None)), ScaleError, "q_scale is required for fp8 queries"),
        (dict(options=dict(q_scale=0.0)), ScaleError, "q_scale must be finite and > 0"),
        (dict(options=dict(q_scale=float("nan"))), ScaleError, "q_scale must be finite and > 0"),
        (dict(options=dict(q_scale=torch.ones(2))), ScaleError, r"q_scale must be one value \(per-tensor scale\), got"),
        (dict(out_dtype=E4M3), ScaleError, "out_scale is required for an fp8 output"),
        (dict(out_dtype=E4M3, options=dict(out_scale=-2.0)), ScaleError, "out_scale must be finite and > 0"),
        (dict(options=dict(k_scale=torch.ones(3))), ScaleError, r"k_scale must be one value \(per-tensor scale\) or"),
        (dict(options=dict(v_scale=torch.tensor([1.0, math.inf]))), ScaleError, r"v_scale\[1\] must be finite"),
        (dict(options=dict(k_scale=torch.ones(2, dtype=torch.int32))), ScaleError, "floating-point"),
        (dict(options=dict(q_scale=torch.ones(1, device="meta"))), DeviceError, "q_scale is on meta"),
        (dict(fp8_pv="yes"), UnsupportedConfigError, "fp8_pv must be True or False, got 'yes'"),
    ],
)
def test_bad_fp8_configurations(changes, error, words):
    with pytest.raises(error, match=words):
        _planner(**changes)


def test_bad_run_time_scales_and_tensors():
    c = _case(SMALL, MIXED, "full", "e4m3", device="cpu")
    attn = _attn(c, SMALL, torch.bfloat16, backend="reference")
    attn.plan(c.x.cu_seqlens_q, c.x.seq_lens, c.x.block_table)
    good = torch.ones(1)
    for kwargs, error, words in [
        (dict(q_scale=0.5), ScaleError, "run\\(\\): q_scale must be a float32 tensor"),
        (dict(q_scale=torch.ones(1, dtype=torch.float64)), DTypeError, "q_scale must be float32"),
        (dict(k_scale=torch.ones(3)), ShapeError, r"k_scale must be \[1\] or \[num_kv_heads\] = \[2\]"),
        (dict(q_scale=torch.ones(2)), ShapeError, r"q_scale must be \[1\]"),
        (dict(out_scale=torch.ones(2, 1)), ShapeError, "out_scale"),
        (dict(v_scale=torch.tensor([1.0, -1.0])), ScaleError, r"v_scale\[1\] must be finite and > 0"),
        (dict(q_scale=torch.tensor([math.nan])), ScaleError, "q_scale must be finite and > 0"),
        (dict(k_scale=torch.ones(4)[::2]), Exception, "k_scale"),
    ]:
        with pytest.raises(error, match=words):
            attn.run(c.q, c.k_cache, c.v_cache, **kwargs)
    # q in the wrong dtype, out in the wrong dtype
    with pytest.raises(DTypeError, match="q is torch.bfloat16 but this attention was planned for"):
        attn.run(c.x.q, c.k_cache, c.v_cache, q_scale=good)
    with pytest.raises(DTypeError, match="out must be torch.bfloat16 \\(the planned output dtype\\)"):
        attn.run(c.q, c.k_cache, c.v_cache, out=torch.empty(c.q.shape, dtype=E4M3))


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes, fp8 tensor-core q.k on sm_89+
# ---------------------------------------------------------------------------------------------
BIG = AttentionConfig(32, 8, 128, 16, torch.bfloat16)
BIG_MIXED = BatchShape((300, 1, 1, 1, 77), (0, 2000, 3000, 700, 900))


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize("contract,cache,out_dtype", PATHS, ids=[f"{a}-{b}-{str(c)[6:]}" for a, b, c in PATHS])
def test_gpu_fp8_q_every_path(contract, cache, out_dtype):
    c = _case(BIG, BIG_MIXED, contract, cache, seed=11, device="cuda")
    out = _run(c, _attn(c, BIG, out_dtype), out_dtype)
    _check(out, _reference(c), out_dtype, f"GPU fp8 q {contract} {cache} -> {out_dtype}")


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, E4M3])
def test_gpu_fp8_q_split_kv_decode(out_dtype):
    shape = BatchShape((1,) * 8, (8000, 3000, 100, 20000, 1, 5000, 4096, 777))
    c = _case(BIG, shape, "full", "e4m3-head", seed=12, device="cuda")
    attn = _attn(c, BIG, out_dtype)
    out = _run(c, attn, out_dtype)
    assert "splits=" in attn.explain(), attn.explain()
    _check(out, _reference(c), out_dtype, f"GPU split-KV fp8 q -> {out_dtype}")


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize(
    "contract,cache", [("full", "e4m3"), ("full", "e4m3-head"), ("context", "e4m3"), ("full", "e5m2-head")]
)
def test_gpu_fp8_cvt_asm_matches_the_plain_conversion(contract, cache, monkeypatch):
    """unified.FP8_CVT_ASM (experimental: fp8 tiles converted by inline PTX): a bf16 q over an fp8
    cache, decode, split-KV and prefill rows in one batch, against the reference and against the
    default conversion; an unwritten (NaN-poisoned) slot still surfaces as NaN rows."""
    from pagedattn.kernels import unified

    shape = BatchShape((300, 1, 1, 1, 77, 1), (0, 2000, 9000, 700, 900, 20000))
    c = _case(BIG, shape, contract, cache, seed=15, device="cuda", q_dtype=torch.bfloat16)
    plain = _run(c, _attn(c, BIG, torch.bfloat16), torch.bfloat16)
    monkeypatch.setattr(unified, "FP8_CVT_ASM", True)
    out = _run(c, _attn(c, BIG, torch.bfloat16), torch.bfloat16)
    _check(out, _reference(c), torch.bfloat16, f"GPU fp8 cvt asm {contract} {cache}")
    torch.testing.assert_close(out, plain, atol=2e-3, rtol=2e-3)
    # a slot the decode sequence 1 reads, poisoned with the format's NaN: its rows must be NaN
    slot = int(c.x.block_table[1, 0]) * BIG.block_size
    c.k_cache.view(torch.uint8).view(-1, BIG.num_kv_heads, BIG.head_size)[slot] = 0x7F if cache[:4] == "e4m3" else 0x7E
    poisoned = _run(c, _attn(c, BIG, torch.bfloat16), torch.bfloat16)
    assert torch.isnan(poisoned[300]).all() and not torch.isnan(poisoned[:300]).any()


@pytest.mark.gpu
@pytest.mark.kernels
def test_gpu_fp8_q_accuracy_against_unquantized_inputs():
    """The fp8 pipeline (q and K/V quantized, fp8 q.k) against the reference of the unquantized
    bf16 inputs: within vLLM's fp8-query tolerance."""
    shape = BatchShape((512, 512), (0, 1024))
    c = _case(BIG, shape, "full", "e4m3", seed=13, device="cuda")
    out = _run(c, _attn(c, BIG, torch.bfloat16), torch.bfloat16)
    x = c.x  # x.q, x.k_cache, x.v_cache: the bf16 values before quantization
    ref = reference.attention(
        x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, compute_dtype=torch.float64
    )
    atol, rtol = FP8_QUERY_TOLERANCE
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize("contract", ["full", "context"])
def test_gpu_fp8_pv(contract):
    """fp8_pv (P.V on fp8 tensor cores, P quantized): within vLLM's fp8 tolerance of the reference
    of the same dequantized values; explain says so on an sm_89+ GPU."""
    shape = BatchShape((700, 1, 33), (0, 3000, 1500))
    c = _case(BIG, shape, contract, "e4m3", seed=14, device="cuda")
    attn = _attn(c, BIG, torch.bfloat16, fp8_pv=True)
    out = _run(c, attn, torch.bfloat16)
    if torch.cuda.get_device_capability() >= (8, 9):
        assert "P.V too" in attn.explain(), attn.explain()
    ref = _reference(c)
    atol, rtol = FP8_QUERY_TOLERANCE
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    # and closer on average: e4m3 rounds P by <= 2^-4 relative, about 2.5% RMS
    assert float((out.double() - ref).norm() / ref.norm()) < 0.05


@pytest.mark.gpu
@pytest.mark.kernels
def test_gpu_per_layer_scales_are_read_by_pointer():
    """A per-layer scale tensor is checked once and then read in place: a value changed in the
    tensor (as a captured CUDA graph would see it) is what the next run uses."""
    c = _case(SMALL, MIXED, "full", "e4m3", seed=15, device="cuda")
    attn = _attn(c, SMALL, torch.bfloat16)
    x = c.x
    attn.plan(x.cu_seqlens_q, x.seq_lens, x.block_table, max_query_len=x.max_query_len, max_seq_len=x.max_seq_len)
    qs = torch.tensor([Q_SCALE], device="cuda")
    for factor in (1.0, 2.5):
        if factor != 1.0:
            qs.mul_(factor)
        out = _poisoned(tuple(c.q.shape), torch.bfloat16, "cuda")
        attn.run(c.q, c.k_cache, c.v_cache, out=out, q_scale=qs)
        _check(out, _reference(c, q_scale=Q_SCALE * factor), torch.bfloat16, f"q_scale x{factor}")
    assert len(attn._seen_scales) == 1
