"""The custom ops of `pagedattn.ops`: schemas and mutation annotations, torch.library.opcheck for
every op, fake implementations, torch.compile(fullgraph=True) without graph breaks; on a GPU,
inductor-compiled and CUDA-graph-replayed steps against eager, and a hot path with no host sync
and no allocation. On CPU the kernels run through Triton's interpreter at small shapes."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pagedattn
import pagedattn.ops as ops
from pagedattn.config import AttentionConfig, BatchShape
from pagedattn.errors import DTypeError, ScaleError, ShapeError
from pagedattn.testing import DEVICE, capture_graph, dispatch_plan, make_inputs

MIXED = BatchShape((5, 1, 9, 1), (11, 40, 0, 3))  # prefill with and without prefix, decodes
SPLIT = BatchShape((1, 1), (700, 300))  # decode long enough for split-KV (2 partitions)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def slots_of_new_tokens(x, shape: BatchShape, block_size: int) -> torch.Tensor:
    """[num_tokens] int64: the cache slots of each sequence's query tokens (its last query_len)."""
    table = x.block_table.cpu().long()
    slots = []
    for i, (q, s) in enumerate(zip(shape.query_lens, shape.seq_lens)):
        pos = torch.arange(s - q, s)
        slots.append(table[i, pos // block_size] * block_size + pos % block_size)
    return torch.cat(slots).to(x.q.device)


def scale_tensors(x) -> dict:
    """The fp8 scales as the ops take them: one-element float32 tensors on the device."""
    opts = dict(x.options)
    for name in ("k_scale", "v_scale"):
        if opts[name] is not None:
            opts[name] = torch.tensor([opts[name]], dtype=torch.float32, device=x.q.device)
    return opts


def attention_args(x, options: dict) -> tuple[tuple, dict]:
    """Positional tensors (optional ones included) and keyword options of the attention ops."""
    tensors = (options.get("alibi_slopes"), options.get("sinks"), options["k_scale"], options["v_scale"])
    kwargs = dict(
        max_query_len=x.max_query_len,
        max_seq_len=x.max_seq_len,
        sliding_window=options["sliding_window"],
        softcap=options["softcap"],
    )
    return tensors, kwargs


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN included (caches keep NaN in unwritten slots)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.isnan(), b.isnan())) and bool(torch.equal(a.nan_to_num(), b.nan_to_num()))


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
EXPECTED_SCHEMAS = {
    "write_kv": "pagedattn::write_kv(Tensor k, Tensor v, Tensor(a2!) k_cache, Tensor(a3!) v_cache, "
    "Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None, *, "
    "ScalarType? fp8_dtype=None, bool checked=False) -> ()",
    "paged_attention": "pagedattn::paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, "
    "Tensor cu_seqlens_q, Tensor seq_lens, Tensor block_table, Tensor(a6!) out, "
    "Tensor? alibi_slopes=None, Tensor? sinks=None, Tensor? k_scale=None, "
    "Tensor? v_scale=None, Tensor? q_scale=None, Tensor? out_scale=None, *, "
    "SymInt? max_query_len=None, SymInt? max_seq_len=None, "
    "float? scale=None, SymInt? sliding_window=None, float? softcap=None, "
    'str kv_layout="nhd", str backend="auto", bool checked=False, bool? validate=None) -> ()',
    "prefix_prefill": "pagedattn::prefix_prefill(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, "
    "Tensor v_cache, Tensor cu_seqlens_q, Tensor seq_lens, Tensor block_table, "
    "Tensor(a8!) out, Tensor? alibi_slopes=None, Tensor? sinks=None, "
    "Tensor? k_scale=None, Tensor? v_scale=None, Tensor? q_scale=None, "
    "Tensor? out_scale=None, *, bool decode_from_cache=False, "
    "SymInt? max_query_len=None, SymInt? max_seq_len=None, float? scale=None, "
    'SymInt? sliding_window=None, float? softcap=None, str kv_layout="nhd", '
    'str backend="auto", bool checked=False, bool? validate=None) -> ()',
}
MUTATED = {"write_kv": {"k_cache", "v_cache"}, "paged_attention": {"out"}, "prefix_prefill": {"out"}}


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_schema_and_mutations(name):
    """The schemas docs/torch-integration.md documents; exactly the caches / `out` are mutated."""
    op = getattr(torch.ops.pagedattn, name).default
    assert str(op._schema) == EXPECTED_SCHEMAS[name]
    written = {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == MUTATED[name]
    assert not op._schema.returns
    assert ops.OPS[name]._opoverload is op


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake tensor, autograd registration, AOT dispatch with dynamic shapes
# ---------------------------------------------------------------------------------------------
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def checks_for(*tensors) -> tuple[str, ...]:
    """opcheck's test_schema compares every argument before and after with torch.allclose, which
    has no float8 kernel: with an fp8 tensor argument it is left out (the uint8-storage case and the
    other dtypes check the same schema's mutations)."""
    if any(isinstance(t, torch.Tensor) and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in tensors):
        return ALL_CHECKS[1:]
    return ALL_CHECKS


WRITE_CASES = {
    "fp32": (torch.float32, torch.float32, None),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "fp8_e4m3": (torch.float16, torch.float8_e4m3fn, None),
    "uint8_e5m2": (torch.bfloat16, torch.uint8, torch.float8_e5m2),
}


@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_opcheck_write_kv(case):
    dtype, cache_dtype, fp8_dtype = WRITE_CASES[case]
    num_blocks, block_size, kvh, d = 6, 8, 2, 16
    k = torch.randn(5, kvh, d, device=DEVICE).to(dtype)
    v = torch.randn(5, kvh, d, device=DEVICE).to(dtype)
    caches = [torch.full((num_blocks, block_size, kvh, d), float("nan"), device=DEVICE) for _ in range(2)]
    caches = [c.to(cache_dtype) if cache_dtype != torch.uint8 else c.to(fp8_dtype).view(torch.uint8) for c in caches]
    slots = torch.tensor([3, 17, -1, 40, 8], device=DEVICE)  # -1: a padding token, skipped
    fp8 = cache_dtype != dtype
    scales = [torch.tensor([s], device=DEVICE) for s in (0.5, 0.25)] if fp8 else [None, None]
    torch.library.opcheck(
        ops.write_kv_op, (k, v, *caches, slots, *scales), dict(fp8_dtype=fp8_dtype), test_utils=checks_for(*caches)
    )


ATTENTION_CASES = {
    "mixed-fp32": (AttentionConfig(4, 2, 16, 8, torch.float32), MIXED, {}),
    "mixed-bf16-options": (
        AttentionConfig(4, 2, 32, 16, torch.bfloat16, sliding_window=7, use_alibi=True, softcap=5.0, use_sinks=True),
        MIXED,
        {},
    ),
    "split-kv-fp16": (AttentionConfig(4, 2, 16, 16, torch.float16), SPLIT, {}),
    "fp8-e4m3": (AttentionConfig(4, 1, 16, 8, torch.float16, kv_dtype="fp8_e4m3"), MIXED, {}),
    "checked": (AttentionConfig(2, 2, 16, 8, torch.float32), MIXED, dict(checked=True)),
    "reference-backend": (AttentionConfig(4, 2, 16, 8, torch.float32), MIXED, dict(backend="reference")),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_opcheck_paged_attention(case):
    config, shape, extra = ATTENTION_CASES[case]
    x = make_inputs(config, shape, device=DEVICE, contract="full")
    tensors, kwargs = attention_args(x, scale_tensors(x))
    out = torch.full_like(x.q, float("nan"))
    torch.library.opcheck(
        ops.paged_attention_op,
        (x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, out, *tensors),
        dict(kwargs, **extra),
        test_utils=checks_for(x.k_cache),
    )


@pytest.mark.parametrize("decode_from_cache", [False, True])
def test_opcheck_prefix_prefill(decode_from_cache):
    config = AttentionConfig(4, 2, 16, 8, torch.float32, sliding_window=9)
    # decode_from_cache: decodes read their whole seq_len from the cache, so write everything
    x = make_inputs(config, MIXED, device=DEVICE, contract="full" if decode_from_cache else "context")
    tensors, kwargs = attention_args(x, scale_tensors(x))
    out = torch.full_like(x.q, float("nan"))
    torch.library.opcheck(
        ops.prefix_prefill_op,
        (x.q, x.k_new, x.v_new, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, out, *tensors),
        dict(kwargs, decode_from_cache=decode_from_cache),
        test_utils=checks_for(x.k_cache),
    )


E4M3 = torch.float8_e4m3fn


def fp8_inputs(contract: str):
    """bf16 inputs with q quantized to e4m3 (real q = q8 * 0.05), the scales as op tensors."""
    x = make_inputs(AttentionConfig(4, 2, 16, 8, torch.bfloat16), MIXED, device=DEVICE, contract=contract, seed=4)
    q_scale = torch.tensor([0.05], device=DEVICE)
    out_scale = torch.tensor([0.02], device=DEVICE)  # |out| <~ 4: / 0.02 stays inside e4m3's 448
    return x, (x.q.float() / q_scale).to(E4M3), q_scale, out_scale


@pytest.mark.parametrize("op", ["paged_attention", "prefix_prefill"])
def test_opcheck_fp8_q_and_out(op):
    """fp8 q (q_scale) into an fp8 output (out_scale) through each attention op; the op's result
    is the plain function's, bit for bit."""
    contract = "full" if op == "paged_attention" else "context"
    x, q8, q_scale, out_scale = fp8_inputs(contract)
    out = torch.full(x.q.shape, 0x7F, dtype=torch.uint8, device=DEVICE).view(E4M3)  # e4m3 NaN
    new = (x.k_new, x.v_new) if contract == "context" else ()
    metadata = (x.cu_seqlens_q, x.seq_lens, x.block_table)
    kwargs = dict(max_query_len=x.max_query_len, max_seq_len=x.max_seq_len)
    args = (q8, *new, x.k_cache, x.v_cache, *metadata, out, None, None, None, None, q_scale, out_scale)
    torch.library.opcheck(ops.OPS[op], args, kwargs, test_utils=checks_for(q8))  # on copies of args
    ops.OPS[op](*args, **kwargs)
    assert not out.float().isnan().any(), "every element of out written"
    plain = getattr(pagedattn, op)
    scales = dict(q_scale=q_scale, out_scale=out_scale)
    want = plain(q8, *new, x.k_cache, x.v_cache, *metadata, **scales, out=out.clone(), **kwargs)
    assert same(out, want)
    # the wrapper: float scales, and for fp8 q with no `out`, a bf16 output (the planner's default)
    got = getattr(ops, op)(q8, *new, x.k_cache, x.v_cache, *metadata, q_scale=0.05, **kwargs)
    assert got.dtype == torch.bfloat16
    assert same(got, plain(q8, *new, x.k_cache, x.v_cache, *metadata, q_scale=0.05, **kwargs))


def test_fake_impls_check_shapes():
    """Tracing with a wrong `out` or slot_mapping fails at trace time, naming the argument."""
    with FakeTensorMode():
        q = torch.empty(6, 4, 16)
        cache = torch.empty(8, 8, 2, 16)
        meta = (
            torch.empty(3, dtype=torch.int32),
            torch.empty(2, dtype=torch.int32),
            torch.empty(2, 4, dtype=torch.int32),
        )
        ops.paged_attention_op(q, cache, cache, *meta, torch.empty(6, 4, 16))  # fine: no data read
        with pytest.raises(ShapeError, match="out must have q's shape"):
            ops.paged_attention_op(q, cache, cache, *meta, torch.empty(5, 4, 16))
        # fp8 q / out: out may differ from q's dtype, and each fp8 tensor needs its scale
        q8, out8, s = q.to(E4M3), torch.empty(6, 4, 16, dtype=E4M3), torch.empty(1)
        ops.paged_attention_op(q8, cache, cache, *meta, torch.empty(6, 4, 16, dtype=torch.bfloat16), q_scale=s)
        ops.paged_attention_op(q, cache, cache, *meta, out8, out_scale=s)
        with pytest.raises(ScaleError, match="out is torch.float8_e4m3fn: out_scale is required"):
            ops.paged_attention_op(q, cache, cache, *meta, out8)
        with pytest.raises(ScaleError, match="q is torch.float8_e4m3fn: q_scale is required"):
            ops.paged_attention_op(q8, cache, cache, *meta, out8, out_scale=s)
        with pytest.raises(DTypeError, match="out must have q's dtype"):
            ops.paged_attention_op(q, cache, cache, *meta, torch.empty(6, 4, 16, dtype=torch.float16))
        kv = torch.empty(6, 2, 16)
        with pytest.raises(ShapeError, match="slot_mapping must have num_tokens = 6"):
            ops.write_kv_op(kv, kv, cache, cache.clone(), torch.empty(5, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# the wrappers keep the plain functions' results
# ---------------------------------------------------------------------------------------------
def test_wrappers_match_the_plain_functions():
    config = AttentionConfig(4, 2, 16, 8, torch.float16, kv_dtype="fp8_e4m3")
    x = make_inputs(config, MIXED, device=DEVICE, contract="context")
    common = dict(max_query_len=x.max_query_len, max_seq_len=x.max_seq_len, **x.options)  # float scales
    want = pagedattn.prefix_prefill(
        x.q, x.k_new, x.v_new, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, **common
    )
    got = ops.prefix_prefill(
        x.q, x.k_new, x.v_new, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, **common
    )
    assert same(got, want)
    # write the new tokens through the op wrapper (float scales), then the full-cache contract
    slots = slots_of_new_tokens(x, MIXED, config.block_size)
    k_plain, v_plain = x.k_cache.clone(), x.v_cache.clone()
    pagedattn.kernels.write.write_kv(
        x.k_new, x.v_new, k_plain, v_plain, slots, k_scale=x.options["k_scale"], v_scale=x.options["v_scale"]
    )
    ops.write_kv(
        x.k_new, x.v_new, x.k_cache, x.v_cache, slots, k_scale=x.options["k_scale"], v_scale=x.options["v_scale"]
    )
    assert same(x.k_cache, k_plain) and same(x.v_cache, v_plain)
    out = torch.full_like(x.q, float("nan"))
    assert (
        ops.paged_attention(x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, out=out, **common)
        is out
    )
    want = pagedattn.paged_attention(x.q, x.k_cache, x.v_cache, x.cu_seqlens_q, x.seq_lens, x.block_table, **common)
    assert same(out, want)


# ---------------------------------------------------------------------------------------------
# torch.compile: one graph, no breaks, the same outputs and cache contents as eager
# ---------------------------------------------------------------------------------------------
def model_step(
    q,
    k_new,
    v_new,
    k_cache,
    v_cache,
    slot_mapping,
    cu_seqlens_q,
    seq_lens,
    block_table,
    k_scale,
    v_scale,
    max_query_len: int,
    max_seq_len: int,
):
    """What a model layer does: write the new tokens' K/V, attend (both contracts), project."""
    ops.write_kv(k_new, v_new, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    common = dict(k_scale=k_scale, v_scale=v_scale, max_query_len=max_query_len, max_seq_len=max_seq_len)
    full = ops.paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, **common)
    context = ops.prefix_prefill(q, k_new, v_new, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table, **common)
    return full, context, (full.float() - context.float()).abs().amax(dim=(1, 2))


def step_inputs(config: AttentionConfig, shape: BatchShape, seed: int = 0):
    x = make_inputs(config, shape, device=DEVICE, seed=seed, contract="context")
    opts = scale_tensors(x)
    return (
        x.q,
        x.k_new,
        x.v_new,
        x.k_cache,
        x.v_cache,
        slots_of_new_tokens(x, shape, config.block_size),
        x.cu_seqlens_q,
        x.seq_lens,
        x.block_table,
        opts["k_scale"],
        opts["v_scale"],
        x.max_query_len,
        x.max_seq_len,
    )


def clone_caches(args):
    return args[:3] + (args[3].clone(), args[4].clone()) + args[5:]


def assert_step_equal(got, want, got_args, want_args):
    for name, a, b in zip(("paged_attention", "prefix_prefill", "difference"), got, want):
        assert same(a, b), f"{name}: compiled/replayed output differs from eager"
    assert same(got_args[3], want_args[3]) and same(got_args[4], want_args[4]), "caches differ"


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
def test_compile_fullgraph_no_graph_breaks(kv_dtype):
    """dynamo captures the whole step in one graph holding the three ops; aot_eager (functionalized:
    the mutations become auto_functionalized and are copied back) gives eager's bits, and a second
    call with new contents in the same tensors runs the same graph without recompiling."""
    torch._dynamo.reset()
    config = AttentionConfig(4, 2, 16, 8, torch.float16, kv_dtype=kv_dtype)
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    compiled = torch.compile(model_step, fullgraph=True, backend=recording_aot_eager)
    args = step_inputs(config, MIXED)
    eager_args = clone_caches(args)
    assert_step_equal(compiled(*args), model_step(*eager_args), args, eager_args)
    assert len(graphs) == 1
    targets = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    for name in ("write_kv", "paged_attention", "prefix_prefill"):
        assert getattr(torch.ops.pagedattn, name).default in targets, name
    # new contents, same tensors: no recompilation
    fresh = step_inputs(config, MIXED, seed=1)
    for t, new in zip(args[:9], fresh[:9]):
        t.copy_(new)
    eager_args = clone_caches(args)
    assert_step_equal(compiled(*args), model_step(*eager_args), args, eager_args)
    assert len(graphs) == 1, "recompiled for new metadata contents"


# ---------------------------------------------------------------------------------------------
# GPU: inductor, CUDA graphs, no sync and no allocation on the hot path
# ---------------------------------------------------------------------------------------------
GPU_CONFIGS = {
    "bf16": AttentionConfig(8, 2, 128, 16, torch.bfloat16),
    "fp16-fp8": AttentionConfig(8, 2, 64, 16, torch.float16, kv_dtype="fp8_e4m3"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
@pytest.mark.parametrize(
    "shape",
    [BatchShape((1, 1, 1, 1), (900, 5, 1500, 60)), BatchShape((300, 1, 40, 1), (0, 2000, 500, 7))],
    ids=["decode", "mixed"],
)
def test_inductor_compile_matches_eager(name, shape):
    """The default backend: inductor fuses around the opaque ops and reinplaces their mutations;
    outputs and caches are eager's bits."""
    torch._dynamo.reset()
    config = GPU_CONFIGS[name]
    compiled = torch.compile(model_step, fullgraph=True)  # inductor
    for seed in (0, 1):
        args = step_inputs(config, shape, seed=seed)
        eager_args = clone_caches(args)
        want = model_step(*eager_args)
        assert_step_equal(compiled(*args), want, args, eager_args)


class DecodeBatch:
    """The fixed tensors of a captured decode step; `refill` copies a new step into them."""

    def __init__(self, config: AttentionConfig, num_seqs: int, max_seq_len: int, seed: int = 0):
        self.config, self.num_seqs, self.max_seq_len = config, num_seqs, max_seq_len
        self.width = max_seq_len // config.block_size
        self.num_blocks = num_seqs * self.width + 4
        g = torch.Generator().manual_seed(seed)
        shape = (self.num_blocks, config.block_size, config.num_kv_heads, config.head_size)
        fp8 = config.fp8_dtype
        self.k_scale = torch.tensor([0.37], device=DEVICE) if fp8 else None
        self.v_scale = torch.tensor([0.61], device=DEVICE) if fp8 else None
        self.k_cache = (torch.randn(shape, generator=g) / (0.37 if fp8 else 1)).to(fp8 or config.dtype).to(DEVICE)
        self.v_cache = (torch.randn(shape, generator=g) / (0.61 if fp8 else 1)).to(fp8 or config.dtype).to(DEVICE)
        z = dict(device=DEVICE, dtype=config.dtype)
        self.q = torch.empty(num_seqs, config.num_q_heads, config.head_size, **z)
        self.k_new = torch.empty(num_seqs, config.num_kv_heads, config.head_size, **z)
        self.v_new = torch.empty_like(self.k_new)
        self.out = torch.empty_like(self.q)
        self.slot_mapping = torch.empty(num_seqs, dtype=torch.long, device=DEVICE)
        self.cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.empty(num_seqs, dtype=torch.int32, device=DEVICE)
        self.block_table = torch.empty(num_seqs, self.width, dtype=torch.int32, device=DEVICE)

    def refill(self, seed: int, seq_lens: list[int]) -> None:
        """A new step in the same tensors: new lengths, new block tables, new q / k / v."""
        g = torch.Generator().manual_seed(seed)
        c = self.config
        table = torch.randperm(self.num_blocks, generator=g)[: self.num_seqs * self.width]
        table = table.reshape(self.num_seqs, self.width).to(torch.int32)
        pos = torch.tensor(seq_lens) - 1  # the decode token is each sequence's last position
        slots = table[torch.arange(self.num_seqs), pos // c.block_size].long() * c.block_size + pos % c.block_size
        for t, new in (
            (self.q, torch.randn(self.q.shape, generator=g)),
            (self.k_new, torch.randn(self.k_new.shape, generator=g)),
            (self.v_new, torch.randn(self.v_new.shape, generator=g)),
            (self.seq_lens, torch.tensor(seq_lens, dtype=torch.int32)),
            (self.block_table, table),
            (self.slot_mapping, slots),
        ):
            t.copy_(new)

    def step(self, fn, k_cache=None, v_cache=None):
        """One decode step: write the decode tokens' K/V, then attend over the whole cache."""
        k_cache = self.k_cache if k_cache is None else k_cache
        v_cache = self.v_cache if v_cache is None else v_cache
        return fn(
            self.q,
            self.k_new,
            self.v_new,
            k_cache,
            v_cache,
            self.slot_mapping,
            self.cu_seqlens_q,
            self.seq_lens,
            self.block_table,
            self.out,
            self.k_scale,
            self.v_scale,
            self.max_seq_len,
        )


def decode_step(
    q,
    k_new,
    v_new,
    k_cache,
    v_cache,
    slot_mapping,
    cu_seqlens_q,
    seq_lens,
    block_table,
    out,
    k_scale,
    v_scale,
    max_seq_len: int,
):
    ops.write_kv(k_new, v_new, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    # max_query_len=1 and max_seq_len a fixed bound: the plan (decode tiles, KV splits) is the same
    # for every replay; None would be num_tokens and pick a prefill plan for a decode batch
    ops.paged_attention(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_table,
        out=out,
        k_scale=k_scale,
        v_scale=v_scale,
        max_query_len=1,
        max_seq_len=max_seq_len,
    )
    return out


REPLAY_LENS = [[1800, 7, 2048, 300], [1, 1, 1, 1], [2048, 2048, 2048, 2048], [17, 1024, 513, 2000]]


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_cuda_graph_replay_matches_eager(name, compiled):
    """Capture one decode step (optionally inductor-compiled), replay it over new metadata and new
    query/key/value contents copied into the same tensors: bit-equal to eager every time."""
    torch._dynamo.reset()
    config = GPU_CONFIGS[name]
    batch = DecodeBatch(config, num_seqs=4, max_seq_len=2048)
    plan = dispatch_plan(config, BatchShape((1,) * 4, (2047,) * 4))  # 4 decodes, max_seq_len 2048
    assert plan.num_splits > 1, "the captured step should exercise split-KV and its merge"
    fn = torch.compile(decode_step, fullgraph=True) if compiled else decode_step
    batch.refill(0, REPLAY_LENS[0])
    graph, out = capture_graph(lambda: batch.step(fn), warmup=2)
    assert out.data_ptr() == batch.out.data_ptr()
    for seed, seq_lens in enumerate(REPLAY_LENS):
        batch.refill(seed + 10, seq_lens)
        k_eager, v_eager = batch.k_cache.clone(), batch.v_cache.clone()
        want = batch.step(decode_step, k_eager, v_eager).clone()
        graph.replay()
        torch.cuda.synchronize()
        assert same(batch.out, want), f"replay {seed} (seq_lens {seq_lens}) differs from eager"
        assert same(batch.k_cache, k_eager) and same(batch.v_cache, v_eager), f"replay {seed}: caches differ"
        ref = pagedattn.reference.attention(
            batch.q,
            k_eager,
            v_eager,
            batch.cu_seqlens_q,
            batch.seq_lens,
            batch.block_table,
            k_scale=batch.k_scale,
            v_scale=batch.v_scale,
        )
        atol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[config.dtype]
        assert torch.allclose(batch.out.float(), ref, atol=atol, rtol=atol), f"replay {seed} vs reference"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_hot_path_has_no_sync_and_no_allocation(name):
    """After warm-up, a decode step through the ops (out given, checked=False) neither synchronizes
    with the host (torch.cuda.set_sync_debug_mode would raise) nor allocates device memory."""
    batch = DecodeBatch(GPU_CONFIGS[name], num_seqs=4, max_seq_len=2048)
    batch.refill(0, REPLAY_LENS[0])
    batch.step(decode_step)
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.memory._record_memory_history(max_entries=10_000, clear_history=True)
    torch.cuda.set_sync_debug_mode("error")  # a sync raises here, its traceback names the call
    try:
        for _ in range(3):
            batch.step(decode_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    torch.cuda.synchronize()
    made = torch.cuda.memory_stats()["allocation.all.allocated"] - allocations
    assert made == 0, f"{made} device allocations in 3 steps, made at:\n" + _allocation_sites(snapshot)


def _allocation_sites(snapshot) -> str:
    """Where the recorded allocations were made: the innermost Python frames of each, counted."""
    sites: dict[str, int] = {}
    for trace in snapshot["device_traces"]:
        for entry in trace:
            if entry["action"] != "alloc":
                continue
            frames = [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in entry["frames"]]
            frames = [f for f in frames if ".py:" in f][:6]
            key = f"{entry['size']} B  " + " <- ".join(frames)
            sites[key] = sites.get(key, 0) + 1
    return "\n".join(f"  {n} x {site}" for site, n in sites.items()) or "  (none recorded)"


def test_split_kv_workspace_outgrown_buffers_stay_alive():
    """A captured graph holds the workspace's address: growing it must not free the old buffer."""
    from pagedattn.kernels import unified

    dev = torch.device("cpu")
    small = unified.workspace(3, 4, 5, 16, dev)
    assert small[1].numel() >= 60 and small[0].numel() == small[1].numel() * 16
    assert unified.workspace(2, 4, 5, 16, dev) is small  # fits: reused, nothing allocated
    big = unified.workspace(64, 8, 9, 16, dev)
    assert big is not small and big[1].numel() >= 64 * 8 * 9
    assert any(ws is small for ws in unified._retired_workspaces)  # outgrown, kept alive
    # growth by powers of two: the outgrown buffers together stay under the current one's size
    rows = [
        ws[1].numel()
        for ws in unified._retired_workspaces
        if ws[0].device == dev and ws[0].numel() == ws[1].numel() * 16
    ]
    assert sum(rows) < big[1].numel()
