"""The standard workloads behind `pagedattn bench`: what each one is, what it must read and
compute, the sweeps around them, and how to build their inputs on a device.

`workloads.json` beside this file is a copy of shared/bench/workloads.json (the GPU machine gets
only the repository). Each workload is a name, an `AttentionConfig`, a `BatchShape` and the anchor
times measured on an H100 (vLLM's kernels, dense SDPA).

Accounting (the formulas that produced workloads.json's `kv_bytes_bf16` and `flops`):
    kv_bytes = 2 (K and V) * sum(seq_lens) * num_kv_heads * head_size * bytes per cache element
    flops    = 4 * num_q_heads * head_size * pairs
    pairs    = sum over sequences of query_len * ctx_len + query_len * (query_len + 1) / 2
               (the query tokens are the last ones of their sequence, causal)

Inputs follow the full-cache contract: all seq_len tokens of every sequence are in the cache,
layout [num_blocks, block_size, num_kv_heads, head_size], random data, block ids drawn from one
random permutation so sequences are scattered over the cache as in a serving engine. A workload
is built as `num_sets` batches over disjoint blocks (each with its own query), so a timing loop
can rotate among them and the working set between two calls of one batch is far larger than L2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import testing
from ..config import DTYPE_NAMES, AttentionConfig, BatchShape
from ..testing import PagedInputs

WORKLOADS_JSON = Path(__file__).with_name("workloads.json")
DECODE_BASE = "decode-b64-ctx4k"  # the sweeps vary these two
PREFILL_BASE = "prefill-b4-4k"


# ---------------------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------------------
def attended_pairs(query_lens, ctx_lens) -> int:
    """(query, key) pairs attended with causal masking, queries at the end of their sequence."""
    return sum(q * c + q * (q + 1) // 2 for q, c in zip(query_lens, ctx_lens))


def kv_bytes(shape: BatchShape, num_kv_heads: int, head_size: int, element_size: int) -> int:
    """Every K and V element of every sequence read once."""
    return 2 * sum(shape.seq_lens) * num_kv_heads * head_size * element_size


def flops(shape: BatchShape, num_q_heads: int, head_size: int) -> int:
    """2 for q.k and 2 for p.v per attended pair, head and dim."""
    return 4 * num_q_heads * head_size * attended_pairs(shape.query_lens, shape.ctx_lens)


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    config: AttentionConfig
    shape: BatchShape
    anchors: dict = field(default_factory=dict, compare=False, hash=False)  # name -> {"ms": ...}
    expected_kv_bytes_bf16: int | None = None  # from workloads.json, checked by the tests
    expected_flops: int | None = None

    @property
    def kv_bytes(self) -> int:
        element_size = torch.empty(0, dtype=self.config.cache_dtype).element_size()
        return kv_bytes(self.shape, self.config.num_kv_heads, self.config.head_size, element_size)

    @property
    def kv_bytes_bf16(self) -> int:
        return kv_bytes(self.shape, self.config.num_kv_heads, self.config.head_size, 2)

    @property
    def flops(self) -> int:
        return flops(self.shape, self.config.num_q_heads, self.config.head_size)

    @property
    def pairs(self) -> int:
        return attended_pairs(self.shape.query_lens, self.shape.ctx_lens)

    @property
    def intensity(self) -> float:
        """FLOP per byte of K/V: the x axis of the roofline."""
        return self.flops / self.kv_bytes

    @property
    def is_decode(self) -> bool:
        return max(self.shape.query_lens) == 1

    def with_config(self, name: str, **changes) -> Workload:
        """A variant: same batch, changed configuration; anchors and expectations dropped."""
        return Workload(name, self.config.replace(**changes), self.shape)

    def with_shape(self, name: str, shape: BatchShape, **changes) -> Workload:
        return Workload(name, self.config.replace(**changes), shape)

    def scaled(self, factor: int = 64) -> Workload:
        """The same mix at 1/factor of the lengths (decodes stay decodes), for CPU dry runs."""
        query_lens = tuple(1 if q == 1 else max(1, q // factor) for q in self.shape.query_lens)
        ctx_lens = tuple(-(-c // factor) for c in self.shape.ctx_lens)
        return Workload(f"{self.name}@1/{factor}", self.config, BatchShape(query_lens, ctx_lens))

    def describe(self) -> dict:
        c, s = self.config, self.shape
        return dict(
            num_q_heads=c.num_q_heads,
            num_kv_heads=c.num_kv_heads,
            head_size=c.head_size,
            block_size=c.block_size,
            dtype=_dtype_name(c.dtype),
            kv_dtype=c.kv_dtype,
            num_seqs=s.num_seqs,
            num_tokens=s.num_tokens,
            max_query_len=max(s.query_lens),
            max_seq_len=max(s.seq_lens),
            batch=s.label(),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return next((n for n, d in DTYPE_NAMES.items() if d == dtype), str(dtype))


def load_workloads(path: Path | str = WORKLOADS_JSON) -> list[Workload]:
    data = json.loads(Path(path).read_text())
    out = []
    for w in data["workloads"]:
        config = AttentionConfig(
            num_q_heads=w["num_q_heads"],
            num_kv_heads=w["num_kv_heads"],
            head_size=w["head_size"],
            block_size=w["block_size"],
            dtype=torch.bfloat16,
        )
        shape = BatchShape(tuple(w["query_lens"]), tuple(w["ctx_lens"]))
        out.append(
            Workload(w["name"], config, shape, w.get("anchors_h100", {}), w.get("kv_bytes_bf16"), w.get("flops"))
        )
    return out


def reference_ceilings(path: Path | str = WORKLOADS_JSON) -> dict:
    """The ceilings measured on the H100 where the anchors were taken (for comparison only)."""
    return json.loads(Path(path).read_text()).get("ceilings_h100", {})


# ---------------------------------------------------------------------------------------------
# sweeps: small lists of variants around one decode and one prefill workload
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sweep:
    name: str  # what varies: "dtype", "head_size", "gqa", "block_size", "kv_dtype"
    base: str  # the workload varied
    variants: tuple[Workload, ...]


def sweeps(workloads: list[Workload], *, quick: bool = False) -> list[Sweep]:
    by_name = {w.name: w for w in workloads}
    decode, prefill = by_name[DECODE_BASE], by_name[PREFILL_BASE]
    head_sizes = (128, 256) if quick else (64, 128, 256)
    ratios = (1, 8) if quick else (1, 4, 8, 64)
    block_sizes = (16, 64) if quick else (16, 32, 64)
    out = []
    for base in (decode, prefill):
        out.append(
            Sweep(
                "dtype",
                base.name,
                tuple(base.with_config(f"{base.name} {n}", dtype=DTYPE_NAMES[n]) for n in ("fp16", "bf16")),
            )
        )
        out.append(
            Sweep("head_size", base.name, tuple(base.with_config(f"{base.name} d{d}", head_size=d) for d in head_sizes))
        )
        out.append(Sweep("gqa", base.name, tuple(_gqa_variant(base, r) for r in ratios)))
        out.append(
            Sweep(
                "block_size",
                base.name,
                tuple(base.with_config(f"{base.name} bs{b}", block_size=b) for b in block_sizes),
            )
        )
    out.append(
        Sweep(
            "kv_dtype",
            decode.name,
            tuple(decode.with_config(f"{decode.name} kv {k}", kv_dtype=k) for k in ("auto", "fp8_e4m3")),
        )
    )
    return out


def _gqa_variant(base: Workload, ratio: int, num_q_heads: int = 64) -> Workload:
    """num_q_heads fixed at 64, num_queries_per_kv = ratio. Decode batches keep base's K/V bytes
    (more sequences when there are fewer KV heads) so every variant reads the same ~1 GiB."""
    num_kv_heads = num_q_heads // ratio
    name = f"{base.name} gqa{ratio} (h{num_q_heads}/kv{num_kv_heads})"
    if not base.is_decode:
        return base.with_config(name, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    num_seqs = max(1, base.shape.num_seqs * base.config.num_kv_heads // num_kv_heads)
    shape = BatchShape(base.shape.query_lens[:1] * num_seqs, base.shape.ctx_lens[:1] * num_seqs)
    return base.with_shape(f"{name} b{num_seqs}", shape, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def blocks_per_seq(w: Workload) -> list[int]:
    return [-(-s // w.config.block_size) for s in w.shape.seq_lens]


def input_bytes(w: Workload, num_sets: int) -> int:
    """Device memory `build_paged` allocates (cache rounded up to whole blocks, q and out)."""
    c = w.config
    cache_el = torch.empty(0, dtype=c.cache_dtype).element_size()
    q_el = torch.empty(0, dtype=c.dtype).element_size()
    cache = 2 * sum(blocks_per_seq(w)) * c.block_size * c.num_kv_heads * c.head_size * cache_el
    q = 2 * w.shape.num_tokens * c.num_q_heads * c.head_size * q_el
    return num_sets * (cache + q)


def build_paged(w: Workload, device, *, num_sets: int = 2, seed: int = 0, fill: bool = True) -> PagedInputs:
    """`pagedattn.testing.build_paged` for a workload: `num_sets` batches over disjoint blocks of one cache."""
    return testing.build_paged(w.config, w.shape, device, num_sets=num_sets, seed=seed, fill=fill)


# ---------------------------------------------------------------------------------------------
# the dense peer: SDPA on the same data, gathered into dense per-sequence tensors
# ---------------------------------------------------------------------------------------------
@dataclass
class DenseGroup:
    """Sequences with equal (query_len, ctx_len), batched: q [B, num_q_heads, query_len, head_size],
    k/v [B, num_kv_heads, seq_len, head_size] (views of [B, len, heads, head_size] tensors)."""

    seq_ids: list[int]
    query_len: int
    ctx_len: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @property
    def mask_kind(self) -> str:
        if self.query_len == 1:
            return "none"  # one query at the end sees every key
        return "causal" if self.ctx_len == 0 else "causal-lower-right"


def group_sequences(shape: BatchShape) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for s, (q, c) in enumerate(zip(shape.query_lens, shape.ctx_lens)):
        groups.setdefault((q, c), []).append(s)
    return groups


def build_dense(inputs: PagedInputs, set_index: int = 0, dtype: torch.dtype | None = None) -> list[DenseGroup]:
    """One DenseGroup per distinct (query_len, ctx_len), holding the same K/V and queries as set
    `set_index` of the paged inputs (so the dense output must equal the paged output)."""
    s, config = inputs.sets[set_index], inputs.config
    bs = config.block_size
    cu = s.cu_seqlens_q.tolist()
    groups = []
    for (query_len, ctx_len), ids in group_sequences(inputs.shape).items():
        seq_len, nb = query_len + ctx_len, -(-(query_len + ctx_len) // bs)
        index = s.block_table[torch.tensor(ids, device=s.block_table.device), :nb].long()  # [B, nb]

        def gather(cache, scale, index=index, seq_len=seq_len):
            t = cache[index].flatten(1, 2)[:, :seq_len]  # [B, seq_len, num_kv_heads, head_size]
            t = t.to(dtype or config.dtype)
            return (t * scale if scale is not None else t).contiguous().transpose(1, 2)

        rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in ids]).to(s.q.device)
        q = s.q[rows].view(len(ids), query_len, *s.q.shape[1:]).to(dtype or s.q.dtype)
        groups.append(
            DenseGroup(
                ids,
                query_len,
                ctx_len,
                q.transpose(1, 2),
                gather(inputs.k_cache, inputs.k_scale),
                gather(inputs.v_cache, inputs.v_scale),
            )
        )
    return groups


def lower_right_mask(query_len: int, seq_len: int, device) -> torch.Tensor:
    """[query_len, seq_len] bool, True = attend: query i sits at position seq_len - query_len + i."""
    pos_q = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    return torch.arange(seq_len, device=device)[None, :] <= pos_q


def repeat_kv(g: DenseGroup) -> DenseGroup:
    """The group with K/V heads expanded to num_q_heads (for a backend that refuses enable_gqa)."""
    r = g.q.shape[1] // g.k.shape[1]
    return DenseGroup(
        g.seq_ids, g.query_len, g.ctx_len, g.q, g.k.repeat_interleave(r, dim=1), g.v.repeat_interleave(r, dim=1)
    )


def dense_attention(g: DenseGroup, backend: str) -> torch.Tensor:
    """SDPA over one group through `backend` ("flash", "cudnn" or "math"), GQA through enable_gqa.
    Returns [B, num_q_heads, query_len, head_size]."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = g.q, g.k, g.v
    if backend == "flash" and g.mask_kind == "causal-lower-right":
        # flash's own causal flag is aligned bottom-right (torch.nn.attention.bias relies on it);
        # calling the op directly keeps SDPA from quietly picking another kernel for the mask.
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal=True)[0]
    mask = lower_right_mask(g.query_len, k.shape[2], q.device) if g.mask_kind == "causal-lower-right" else None
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    with sdpa_kernel([which]):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=g.mask_kind == "causal", enable_gqa=k.shape[1] != q.shape[1]
        )


def paged_rows(out: torch.Tensor, cu_seqlens_q: list[int], g: DenseGroup) -> torch.Tensor:
    """The paged output rows of group g, shaped like dense_attention's result."""
    rows = torch.cat([torch.arange(cu_seqlens_q[i], cu_seqlens_q[i + 1]) for i in g.seq_ids]).to(out.device)
    return out[rows].view(len(g.seq_ids), g.query_len, *out.shape[1:]).transpose(1, 2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# shared-prefix decode (cascade attention, issue 19): many sequences, one long common prefix
# ---------------------------------------------------------------------------------------------
SHARED_PREFIX = "decode-b256-shared32k-own512"


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """`num_seqs` decoding sequences whose first `prefix_len` tokens are the same cache blocks (a
    system prompt, parallel samples of one prompt), then `own_len` tokens each (the last one the
    query). FlashInfer's cascade figure: 256 sequences, 32k shared tokens, on an H100."""

    name: str
    config: AttentionConfig
    num_seqs: int
    prefix_len: int  # a multiple of the block size
    own_len: int

    @property
    def shape(self) -> BatchShape:
        return BatchShape((1,) * self.num_seqs, (self.prefix_len + self.own_len - 1,) * self.num_seqs)

    @property
    def kv_bytes(self) -> int:
        """What the plain path reads: every sequence's whole context."""
        c = self.config
        element_size = torch.empty(0, dtype=c.cache_dtype).element_size()
        return kv_bytes(self.shape, c.num_kv_heads, c.head_size, element_size)

    @property
    def kv_bytes_unique(self) -> int:
        """The distinct K/V bytes: the prefix once, each sequence's own tokens."""
        c = self.config
        element_size = torch.empty(0, dtype=c.cache_dtype).element_size()
        return 2 * (self.prefix_len + self.num_seqs * self.own_len) * c.num_kv_heads * c.head_size * element_size

    @property
    def flops(self) -> int:
        return flops(self.shape, self.config.num_q_heads, self.config.head_size)


def shared_prefix_workload(
    num_seqs: int = 256, prefix_len: int = 32768, own_len: int = 512, **config
) -> SharedPrefixWorkload:
    """The standard shared-prefix workload (32 query heads, 8 KV heads, head 128, block 16, bf16);
    keyword arguments change the configuration (smaller variants for dry runs)."""
    c = dict(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, dtype=torch.bfloat16) | config
    name = (
        SHARED_PREFIX
        if (num_seqs, prefix_len, own_len) == (256, 32768, 512) and not config
        else f"decode-b{num_seqs}-shared{prefix_len}-own{own_len}"
    )
    if prefix_len % c["block_size"]:
        raise ValueError(f"prefix_len {prefix_len} must be a multiple of block_size {c['block_size']}")
    return SharedPrefixWorkload(name, AttentionConfig(**c), num_seqs, prefix_len, own_len)


def build_shared_prefix(w: SharedPrefixWorkload, device, *, num_sets: int = 2, seed: int = 0) -> PagedInputs:
    """`num_sets` batches over disjoint blocks of one cache; in each, every block-table row starts
    with the same prefix blocks (stored once) and continues with the sequence's own blocks."""
    from ..testing import PagedSet, cu_seqlens, random_tensor

    c = w.config
    torch.manual_seed(seed)
    prefix_blocks = w.prefix_len // c.block_size
    own_blocks = -(-(w.prefix_len + w.own_len) // c.block_size) - prefix_blocks
    needed = prefix_blocks + w.num_seqs * own_blocks
    num_blocks = needed * num_sets
    cache_shape = (num_blocks, c.block_size, c.num_kv_heads, c.head_size)
    k_cache = random_tensor(cache_shape, c.cache_dtype, device)
    v_cache = random_tensor(cache_shape, c.cache_dtype, device)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    shape = w.shape
    sets = []
    for i in range(num_sets):
        ids = perm[i * needed : (i + 1) * needed]
        own = ids[prefix_blocks:].view(w.num_seqs, own_blocks)
        table = torch.cat([ids[:prefix_blocks].expand(w.num_seqs, prefix_blocks), own], dim=1).contiguous()
        q = random_tensor((shape.num_tokens, c.num_q_heads, c.head_size), c.dtype, device)
        sets.append(
            PagedSet(
                q=q,
                out=torch.full_like(q, float("nan")),
                cu_seqlens_q=torch.tensor(cu_seqlens(shape.query_lens), dtype=torch.int32, device=device),
                seq_lens=torch.tensor(shape.seq_lens, dtype=torch.int32, device=device),
                block_table=table.to(device),
            )
        )
    return PagedInputs(c, shape, k_cache, v_cache, sets, None, None)
