"""Validation at the public boundary: one place for every rule about arguments.

Two kinds of check, with different costs:

    host checks      ranks, shapes, dtypes, devices, strides, option values: attributes of the
                     tensors, never their contents. They always run and never sync the device.
    metadata values  offsets, lengths, block ids: read from *host copies* (the lists and CPU
                     tensors an engine already has, or the metadata itself when it lives on the
                     CPU). `check_metadata_values` runs at plan time on those, vectorised.

Every message names the argument, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .config import (  # noqa: F401  (the configuration rules: one definition each, re-exported here)
    FP8_DTYPES,
    KV_LAYOUTS,
    QUERY_DTYPES,
    check_choice,
    check_geometry,
    check_option_scalars,
)
from .errors import (
    BatchMetadataError,
    DeviceError,
    DTypeError,
    LayoutError,
    ScaleError,
    ShapeError,
    UnsupportedConfigError,
)
from .kernels.write import check_scale, check_scale_values  # noqa: F401  (check_scale re-exported)

CONTRACTS = ("full", "context")
FP8_Q_DTYPE = torch.float8_e4m3fn  # fp8 queries and outputs are e4m3 (what fp8 tensor cores take)
Q_DTYPES = QUERY_DTYPES + (FP8_Q_DTYPE,)  # what a query may be (fp8: e4m3 only)


def check_tensor(name: str, t, rank: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """`t` is a tensor (of `rank` dimensions, on `device`)."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ShapeError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise DeviceError(f"{name} is on {t.device}, expected {device}")
    return t


# ---------------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------------
def cache_geometry(k_cache, v_cache, kv_layout: str, device: torch.device | None = None) -> tuple[int, int, int, int]:
    """(num_blocks, block_size, num_kv_heads, head_size) of a K/V cache pair in `kv_layout`."""
    check_choice("kv_layout", kv_layout, KV_LAYOUTS)
    if kv_layout in ("nhd", "hnd"):
        check_tensor("k_cache", k_cache, 4, device)
        check_tensor("v_cache", v_cache, 4, device)
        if k_cache.shape != v_cache.shape:
            raise ShapeError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
        if kv_layout == "nhd":
            return tuple(k_cache.shape)
        num_blocks, num_kv_heads, block_size, head_size = k_cache.shape
        return num_blocks, block_size, num_kv_heads, head_size
    check_tensor("k_cache", k_cache, 5, device)
    check_tensor("v_cache", v_cache, 4, device)
    num_blocks, num_kv_heads, chunks, block_size, x = k_cache.shape
    expected_v = (num_blocks, num_kv_heads, chunks * x, block_size)
    if tuple(v_cache.shape) != expected_v:
        raise ShapeError(
            f"v_cache must be [num_blocks, num_kv_heads, head_size, block_size] = {list(expected_v)} "
            f"to match k_cache {list(k_cache.shape)}, got {list(v_cache.shape)}"
        )
    return num_blocks, block_size, num_kv_heads, chunks * x


def nhd_views(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches as [num_blocks, block_size, num_kv_heads, head_size] (for the reference and
    checks): views for "nhd" and "hnd", copies for "vllm_v0". The kernels read every layout in place."""
    if kv_layout == "nhd":
        return k_cache, v_cache
    if kv_layout == "hnd":
        return k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    nb, kvh, chunks, bs, x = k_cache.shape
    return k_cache.permute(0, 3, 1, 2, 4).reshape(nb, bs, kvh, chunks * x), v_cache.permute(0, 3, 1, 2)


def cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_layout: str, head_pad: int):
    """((k block, slot, head, dim-chunk, dim), K_X, (v block, slot, head, dim)): element d of a K row
    sits at (d // K_X) * chunk stride + (d % K_X) * dim stride."""
    if kv_layout == "nhd":
        kb, kt, kh, kd = k_cache.stride()
        vb, vt, vh, vd = v_cache.stride()
        return (kb, kt, kh, 0, kd), head_pad, (vb, vt, vh, vd)
    if kv_layout == "hnd":
        kb, kh, kt, kd = k_cache.stride()
        vb, vh, vt, vd = v_cache.stride()
        return (kb, kt, kh, 0, kd), head_pad, (vb, vt, vh, vd)
    kb, kh, kx, kt, kd = k_cache.stride()
    vb, vh, vd, vt = v_cache.stride()
    return (kb, kt, kh, kx, kd), k_cache.shape[4], (vb, vt, vh, vd)


# ---------------------------------------------------------------------------------------------
# per-call tensors (host checks only)
# ---------------------------------------------------------------------------------------------
def check_query_tensor(q, device: torch.device | None = None) -> None:
    """q: a tensor of 3 dimensions (on `device`) in a query dtype (fp16/bf16/fp32, fp8 e4m3)."""
    check_tensor("q", q, 3, device)
    if q.dtype not in Q_DTYPES:
        raise DTypeError(f"q must be one of {Q_DTYPES}, got {q.dtype}")


def check_query(
    q, *, num_q_heads: int, head_size: int, dtype: torch.dtype | None, device: torch.device, num_tokens: int | None
) -> None:
    """q: [num_tokens, num_q_heads, head_size] of the planned dtype on the planned device."""
    check_query_tensor(q, device)
    if dtype is not None and q.dtype != dtype:
        raise DTypeError(f"q is {q.dtype} but this attention was planned for {dtype}")
    if (q.shape[1], q.shape[2]) != (num_q_heads, head_size):
        raise ShapeError(
            f"q must be [num_tokens, num_q_heads, head_size] with num_q_heads={num_q_heads}, "
            f"head_size={head_size}, got {list(q.shape)}"
        )
    if num_tokens is not None and q.shape[0] != num_tokens:
        raise ShapeError(
            f"q has {q.shape[0]} rows (tokens) but the batch has {num_tokens} query tokens "
            f"(cu_seqlens_q[-1]); the kernel would read and write rows that are not there"
        )


def check_caches(
    k_cache,
    v_cache,
    *,
    kv_layout: str,
    device: torch.device,
    geometry: tuple[int, int, int, int],
    cache_dtype: torch.dtype | None,
) -> None:
    """The caches have the planned geometry, a supported dtype, contiguous head dims."""
    got = cache_geometry(k_cache, v_cache, kv_layout, device)
    num_blocks, block_size, num_kv_heads, head_size = geometry
    if got[1:] != (block_size, num_kv_heads, head_size) or (num_blocks is not None and got[0] != num_blocks):
        raise ShapeError(
            f"k_cache has (num_blocks, block_size, num_kv_heads, head_size) = {got}, planned for "
            f"{(num_blocks if num_blocks is not None else got[0], block_size, num_kv_heads, head_size)} "
            f"(kv_layout {kv_layout!r})"
        )
    if k_cache.dtype != v_cache.dtype:
        raise DTypeError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share a dtype")
    if k_cache.dtype not in QUERY_DTYPES + FP8_DTYPES:
        raise DTypeError(f"k_cache must be fp16/bf16/fp32 or an fp8 dtype, got {k_cache.dtype}")
    if cache_dtype is not None and k_cache.dtype != cache_dtype:
        raise DTypeError(f"k_cache is {k_cache.dtype} but this attention was planned for {cache_dtype}")


def check_new_kv(k_new, v_new, *, num_tokens: int, num_kv_heads: int, head_size: int, device, context: bool) -> None:
    if not context:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t is not None:
                raise UnsupportedConfigError(
                    f"{name} was given to a full-cache attention (the new tokens' K/V must already be in "
                    f"the cache); plan with contract='context' to pass them separately"
                )
        return
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is None:
            raise UnsupportedConfigError(f"{name} is required under the context-cache contract")
        check_tensor(name, t, 3, device)
        if tuple(t.shape) != (num_tokens, num_kv_heads, head_size):
            raise ShapeError(
                f"{name} must be [num_tokens, num_kv_heads, head_size] = "
                f"{[num_tokens, num_kv_heads, head_size]}, got {list(t.shape)}"
            )
        if t.dtype not in QUERY_DTYPES:
            raise DTypeError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")


def check_out(out, q, dtype: torch.dtype | None = None) -> None:
    """out: q's shape, on q's device, in `dtype` (default q's dtype)."""
    check_tensor("out", out, 3, q.device)
    if out.shape != q.shape:
        raise ShapeError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if dtype is None or dtype == q.dtype:
        if out.dtype != q.dtype:
            raise DTypeError(f"out must have q's dtype {q.dtype}, got {out.dtype}")
    elif out.dtype != dtype:
        raise DTypeError(f"out must be {dtype} (the planned output dtype), got {out.dtype}")


def default_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The output dtype when none is given: the query's, bf16 for fp8 queries."""
    return torch.bfloat16 if dtype == FP8_Q_DTYPE else dtype


def check_fp8_dtypes(dtype, kv_cache_dtype, out_dtype) -> None:
    """The query / cache / output dtypes of a planned attention, fp8 queries and outputs included."""
    if dtype == torch.float8_e5m2:
        raise DTypeError("dtype (of q): float8_e5m2 queries are not supported; fp8 queries are torch.float8_e4m3fn")
    if dtype not in Q_DTYPES:
        raise DTypeError(f"dtype (of q) must be one of {Q_DTYPES}, got {dtype}")
    if kv_cache_dtype is not None and kv_cache_dtype not in QUERY_DTYPES + FP8_DTYPES:
        raise DTypeError(f"kv_cache_dtype: k_cache must be fp16/bf16/fp32 or an fp8 dtype, got {kv_cache_dtype}")
    if out_dtype is not None and out_dtype not in Q_DTYPES:
        raise DTypeError(f"out_dtype must be one of {Q_DTYPES} (fp8 outputs are e4m3), got {out_dtype}")
    if dtype == FP8_Q_DTYPE or out_dtype == FP8_Q_DTYPE:
        if torch.version.hip is not None:
            raise UnsupportedConfigError(
                "fp8 q / out (torch.float8_e4m3fn) is not supported on ROCm (its fp8 is e4m3fnuz)"
            )
    if dtype == FP8_Q_DTYPE and (kv_cache_dtype or dtype) == torch.float32:
        raise UnsupportedConfigError(
            "dtype=torch.float8_e4m3fn (fp8 q) over an fp32 cache (kv_cache_dtype=torch.float32) is not "
            "supported: fp8 queries compute in fp8/fp16/bf16; use an fp16, bf16 or fp8 cache"
        )


def extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses a tensor's elements span."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    return start, start + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def check_no_overlap(out: torch.Tensor, named: dict[str, torch.Tensor | None]) -> None:
    """out shares no memory with a tensor the kernel reads while writing it."""
    o0, o1 = extent(out)
    for name, t in named.items():
        if t is None:
            continue
        t0, t1 = extent(t)
        if o0 < t1 and t0 < o1:
            raise LayoutError(f"out overlaps {name}: the kernel reads {name} while writing out")


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def check_options(options, *, num_q_heads: int, device: torch.device) -> None:
    """The values of an `AttentionOptions` (its scalar fields are checked when it is built)."""
    for name in ("alibi_slopes", "sinks"):
        t = getattr(options, name)
        if t is None:
            continue
        check_tensor(name, t, 1, device)
        if t.shape[0] != num_q_heads:
            raise ShapeError(f"{name} must have num_q_heads = {num_q_heads} entries, got {t.shape[0]}")
        if t.dtype != torch.float32:
            raise DTypeError(f"{name} must be float32, got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# batch metadata
# ---------------------------------------------------------------------------------------------
def check_metadata_tensors(cu_seqlens_q, seq_lens, block_table, device: torch.device | None = None) -> None:
    """Ranks, sizes, dtypes, devices of the metadata (no device sync)."""
    for name, t, rank in (
        ("cu_seqlens_q", cu_seqlens_q, 1),
        ("seq_lens", seq_lens, 1),
        ("block_table", block_table, 2),
    ):
        check_tensor(name, t)
        if t.dtype != torch.int32:
            raise DTypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != rank:
            raise ShapeError(f"{name} must have {rank} dimension(s), got shape {tuple(t.shape)}")
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        raise BatchMetadataError("the batch is empty: seq_lens has 0 sequences")
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ShapeError(
            f"cu_seqlens_q must have num_seqs + 1 = {num_seqs + 1} entries (num_seqs from "
            f"seq_lens), got {cu_seqlens_q.shape[0]}"
        )
    if block_table.shape[0] < num_seqs:
        raise ShapeError(f"block_table must have at least num_seqs = {num_seqs} rows, got {block_table.shape[0]}")
    device = device or seq_lens.device
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens), ("block_table", block_table)):
        if t.device != device:
            raise DeviceError(f"{name} is on {t.device}, expected {device}")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_metadata_values(
    *,
    cu_seqlens_q: Sequence[int] | None,
    query_lens: Sequence[int] | None,
    seq_lens: Sequence[int],
    block_table: torch.Tensor | np.ndarray | None,
    block_size: int,
    num_blocks: int | None,
    num_tokens: int | None,
    max_query_len: int | None,
    max_seq_len: int | None,
    contract: str = "full",
    decode_from_cache: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Every value rule of a batch, on host copies, vectorised (no device sync). Give the offsets
    (`cu_seqlens_q`) or the lengths (`query_lens`). Returns (query_lens, seq_lens) as int64 arrays.

    Rules: cu_seqlens_q starts at 0, never decreases and ends at the token count; 0 <= query_len
    <= seq_len; max_query_len / max_seq_len are not below the real maxima; each sequence's block
    table row is wide enough for the positions read from the cache, and those blocks' ids are in
    [0, num_blocks)."""
    seq = np.asarray(seq_lens, dtype=np.int64)
    if cu_seqlens_q is not None:
        cu = np.asarray(cu_seqlens_q, dtype=np.int64)
        if cu.shape[0] != seq.shape[0] + 1:
            raise ShapeError(f"cu_seqlens_q must have num_seqs + 1 = {seq.shape[0] + 1} entries, got {cu.shape[0]}")
        if cu[0] != 0:
            raise BatchMetadataError(f"cu_seqlens_q[0] must be 0, got {int(cu[0])}")
        q = np.diff(cu)
        if (q < 0).any():
            i = _first(q < 0)
            raise BatchMetadataError(
                f"cu_seqlens_q must be non-decreasing: cu_seqlens_q[{i}] = {int(cu[i])} > "
                f"cu_seqlens_q[{i + 1}] = {int(cu[i + 1])} (sequence {i})"
            )
    else:
        q = np.asarray(query_lens, dtype=np.int64)
        if q.shape != seq.shape:
            raise BatchMetadataError(f"query_lens has {q.shape[0]} entries but seq_lens has {seq.shape[0]}")
        if (q < 0).any():
            i = _first(q < 0)
            raise BatchMetadataError(f"query_lens[{i}] = {int(q[i])} is negative")
    total = int(q.sum())
    if num_tokens is not None and total != num_tokens:
        raise BatchMetadataError(
            f"cu_seqlens_q[-1] = {total} (the batch's query tokens) but q has {num_tokens} rows: they must be equal"
        )
    if (seq < 0).any():
        i = _first(seq < 0)
        raise BatchMetadataError(f"seq_lens[{i}] = {int(seq[i])} is negative")
    if (q > seq).any():
        i = _first(q > seq)
        raise BatchMetadataError(
            f"sequence {i}: query_len {int(q[i])} (cu_seqlens_q[{i + 1}] - cu_seqlens_q[{i}]) "
            f"exceeds seq_lens[{i}] = {int(seq[i])}"
        )
    if max_query_len is not None and q.size and int(q.max()) > max_query_len:
        i = int(q.argmax())
        raise BatchMetadataError(f"max_query_len = {max_query_len} but sequence {i} has query_len {int(q[i])}")
    if max_seq_len is not None and seq.size and int(seq.max()) > max_seq_len:
        i = int(seq.argmax())
        raise BatchMetadataError(f"max_seq_len = {max_seq_len} but sequence {i} has seq_len {int(seq[i])}")
    if block_table is not None:
        reads = seq
        if contract == "context":
            reads = np.where(decode_from_cache & (q == 1), seq, seq - q)
        _check_block_table(block_table, reads, block_size, num_blocks)
    return q, seq


def _check_block_table(block_table, reads: np.ndarray, block_size: int, num_blocks: int | None) -> None:
    table = block_table.numpy() if isinstance(block_table, torch.Tensor) else np.asarray(block_table)
    width = table.shape[1]
    needed = -(-reads // block_size)
    if needed.size and int(needed.max()) > width:
        i = int(needed.argmax())
        raise BatchMetadataError(
            f"sequence {i}: reading {int(reads[i])} positions needs {int(needed[i])} blocks of "
            f"{block_size} tokens, but block_table has only {width} columns"
        )
    if num_blocks is None or not needed.size:
        return
    used = np.arange(width)[None, :] < needed[:, None]
    rows = table[: needed.shape[0]]
    if rows.dtype == np.int32:  # one comparison: a negative id is >= num_blocks as uint32
        bad = used & (rows.view(np.uint32) >= num_blocks)
    else:
        bad = used & ((rows < 0) | (rows >= num_blocks))
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise BatchMetadataError(
            f"block_table[{i}, {j}] = {int(rows[i, j])} is out of range for a cache of {num_blocks} blocks"
        )


RUN_SCALE_NAMES = ("k_scale", "v_scale", "q_scale", "out_scale")


def check_run_scales(given, defaults, used, *, device, num_kv_heads: int, read_values: bool) -> tuple:
    """Per-call scales of `PagedAttention.run` (k, v, q, out; None = the plan's default): float32
    tensors on the plan's device, [1] (or 0-dim), k/v also [num_kv_heads]. Values are read (finite,
    > 0) only when `read_values` (checked mode, or on the CPU where it is free). Returns the scales
    the kernels read: a given tensor where it is used, else the default."""
    scales = list(defaults)
    for i, t in enumerate(given):
        if t is None:
            continue
        name = RUN_SCALE_NAMES[i]
        if not isinstance(t, torch.Tensor):
            raise ScaleError(
                f"run(): {name} must be a float32 tensor on {device} (per-layer scales are read by "
                f"pointer; floats go in AttentionOptions), got {type(t).__name__}"
            )
        if t.dtype != torch.float32:
            raise DTypeError(f"run(): {name} must be float32, got {t.dtype}")
        if t.device != device:
            raise DeviceError(f"run(): {name} is on {t.device}, expected {device} (the kernels read it in place)")
        heads = num_kv_heads if i < 2 else 1
        if t.dim() > 1 or t.numel() not in (1, heads):
            allowed = "[1]" if heads == 1 else f"[1] or [num_kv_heads] = [{heads}]"
            raise ShapeError(f"run(): {name} must be {allowed}, got shape {tuple(t.shape)}")
        if t.numel() > 1 and t.stride(0) != 1:
            raise LayoutError(f"run(): {name} must be contiguous, got stride {t.stride()}")
        if not used[i]:
            continue
        if read_values:
            check_scale_values(f"run(): {name}", t.detach().double().cpu().flatten().tolist())
        scales[i] = t if t.dim() == 1 else t.reshape(1)
    return tuple(scales)
