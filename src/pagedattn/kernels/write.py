"""Cache write: scatter new K/V tokens into the paged cache by slot (vLLM's reshape_and_cache_flash).

    k, v:              [num_tokens, num_kv_heads, head_size]            fp16 / bf16 / fp32
    k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_size]  same dtype, or fp8
    slot_mapping:      [num_tokens] int64; slot = block * block_size + offset; -1 = padding, skipped

fp8 caches hold x / scale rounded to nearest even, saturated to +-finfo.max (never inf; NaN stays
NaN), bit-identical to `(x.float() / scale).clamp(-max, max).to(fp8_dtype)` in PyTorch.

The fp32 -> fp8 rounding is done by hand with integer ops (`_fp32_to_fp8_bits`) rather than by
`.to(tl.float8e4nv)`: the Triton 3.6 interpreter's float conversion rounds half up, drops the
mantissa carry into the exponent (500 -> 256 in e5m2) and turns NaN into 384 in e4m3, so the
hardware conversion could not be tested on CPU. The hand-written one is exact on every backend
(checked against torch over every fp8 value, every rounding midpoint and its neighbours), needs
no fp8 hardware (sm80 included), and costs a few integer ops in a kernel bound by memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import FP8_DTYPES, MAX_HEAD_SIZE, QUERY_DTYPES, fp8_dtype_of
from ..errors import (
    BatchMetadataError,
    DeviceError,
    DTypeError,
    LayoutError,
    ScaleError,
    ShapeError,
    SlotConflictError,
    UnsupportedConfigError,
)
from .launch import FastKernel, interpreter_enabled

# (exponent bits, mantissa bits) of each fp8 format
_FP8_FORMATS = {torch.float8_e4m3fn: (4, 3), torch.float8_e5m2: (5, 2)}


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fp32_to_fp8_bits(x, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, SUBNORMAL_SCALE: tl.constexpr):
    """fp32 (already within +-max, or NaN) -> fp8 bit pattern as uint8, round to nearest even."""
    BIAS: tl.constexpr = (1 << (EXP_BITS - 1)) - 1
    SHIFT: tl.constexpr = 23 - MAN_BITS
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits >> 31
    mag = bits & 0x7FFFFFFF
    # normal range: round the fp32 mantissa to MAN_BITS (ties to even), then re-bias the exponent;
    # a mantissa carry rolls into the exponent, which is the right answer
    normal = (mag + ((1 << (SHIFT - 1)) - 1) + ((mag >> SHIFT) & 1)) >> SHIFT
    normal = normal - ((127 - BIAS) << MAN_BITS)
    # subnormal range (|x| < 2^(1 - BIAS)): count units of the smallest subnormal; adding 2^23 in
    # fp32 rounds that count to an integer, ties to even. A count of 2^MAN_BITS is the smallest normal.
    scaled = mag.to(tl.float32, bitcast=True) * SUBNORMAL_SCALE
    subnormal = (scaled + 8388608.0).to(tl.uint32, bitcast=True) - 0x4B000000
    out = tl.where(mag < ((128 - BIAS) << 23), subnormal, normal)
    out = tl.where(mag > 0x7F800000, 0x7F, out)  # NaN (0x7F is NaN in both e4m3fn and e5m2)
    return (out | (sign << 7)).to(tl.uint8)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,  # [num_tokens, num_kv_heads, head_size]
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size] (uint8 view if fp8)
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale,
    v_scale,  # fp32 scalars, or pointers to [1] or [num_kv_heads] fp32 (SCALE_IS_TENSOR)
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    block_size,
    head_size,
    num_slots,
    HEAD_PAD: tl.constexpr,
    FP8: tl.constexpr,
    SCALE_IS_TENSOR: tl.constexpr,
    K_SCALE_PER_HEAD: tl.constexpr,
    V_SCALE_PER_HEAD: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EXP_BITS: tl.constexpr,
    MAN_BITS: tl.constexpr,
    SUBNORMAL_SCALE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    # padding tokens (slot -1) do nothing: every load and store is masked off
    # slots outside [0, num_slots) (padding -1, or values no validation caught) write nothing
    valid = (slot >= 0) & (slot < num_slots)
    slot = tl.where(valid, slot, 0)
    # int64 from here on: num_blocks * stride_kc_block may exceed 2^31 elements
    block = slot // block_size
    offset = slot % block_size
    dims = tl.arange(0, HEAD_PAD)
    # not `(dims < head_size) & valid`: Triton 3.9's interpreter rejects a block mask & a scalar bool as a
    # load mask ("mask has unsupported dtype"); this form is the same mask on every version
    mask = dims < tl.where(valid, head_size, 0)

    k = tl.load(k_ptr + token * stride_k_token + head * stride_k_head + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + head * stride_v_head + dims, mask=mask)
    if FP8:
        if SCALE_IS_TENSOR:
            ks = tl.load(k_scale + head * K_SCALE_PER_HEAD)  # per KV head, or one value
            vs = tl.load(v_scale + head * V_SCALE_PER_HEAD)
        else:
            ks = k_scale
            vs = v_scale
        # div_rn: correctly rounded like torch's division, so both paths give the same bits
        k = tl.math.div_rn(k.to(tl.float32), ks)
        v = tl.math.div_rn(v.to(tl.float32), vs)
        # saturate; NaN fails both comparisons and stays NaN
        k = tl.where(k > FP8_MAX, FP8_MAX, tl.where(k < -FP8_MAX, -FP8_MAX, k))
        v = tl.where(v > FP8_MAX, FP8_MAX, tl.where(v < -FP8_MAX, -FP8_MAX, v))
        k_out = _fp32_to_fp8_bits(k, EXP_BITS, MAN_BITS, SUBNORMAL_SCALE)
        v_out = _fp32_to_fp8_bits(v, EXP_BITS, MAN_BITS, SUBNORMAL_SCALE)
    else:
        k_out = k.to(k_cache_ptr.dtype.element_ty)
        v_out = v.to(v_cache_ptr.dtype.element_ty)
    tl.store(
        k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + head * stride_kc_head + dims, k_out, mask=mask
    )
    tl.store(
        v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + head * stride_vc_head + dims, v_out, mask=mask
    )


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------
def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    fp8_dtype: torch.dtype | str | None = None,
    checked: bool = False,
    validate: bool | None = None,
) -> None:
    """Write k[i], v[i] to slot slot_mapping[i] of k_cache, v_cache (in place); slot -1 is skipped.

    fp8 caches (float8_e4m3fn / float8_e5m2, or uint8 storage with `fp8_dtype=`) need `k_scale`
    and `v_scale` (floats, one-element tensors, or [num_kv_heads] tensors: one scale per KV head)
    and hold x / scale saturated to +-finfo.max.
    Runs the Triton kernel on CUDA or under TRITON_INTERPRET=1, plain PyTorch otherwise.
    Slot values are checked to be -1 or in [0, num_blocks * block_size) when `validate` is True, or
    when it is None and slot_mapping is on the CPU (free there) or `checked=True`; unvalidated, the
    kernel skips a slot out of range (it never writes outside the caches). With `checked=True`, no
    slot may be written by two tokens either."""
    fp8 = check_write_inputs(
        k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale, fp8_dtype=fp8_dtype, checked=checked
    )
    if k.shape[0] == 0:
        return
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if checked:
        check_slot_values(slot_mapping, num_slots=num_slots)
    elif validate or (validate is None and slot_mapping.device.type == "cpu"):
        check_slot_values(slot_mapping, num_slots=num_slots, duplicates=False)
    if _use_triton(k.device):
        _launch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, fp8)
    else:
        _write_torch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, fp8)


_WRITE_KV = FastKernel(_write_kv_kernel)


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or interpreter_enabled()


def _launch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, fp8):
    num_tokens, num_kv_heads, head_size = k.shape
    block_size = k_cache.shape[1]
    scale_is_tensor = False
    exp_bits = man_bits = 0
    fp8_max = subnormal_scale = 0.0
    if fp8 is not None:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        exp_bits, man_bits = _FP8_FORMATS[fp8]
        bias = (1 << (exp_bits - 1)) - 1
        fp8_max = float(torch.finfo(fp8).max)
        subnormal_scale = float(2.0 ** (bias - 1 + man_bits))
        scale_is_tensor = isinstance(k_scale, torch.Tensor) or isinstance(v_scale, torch.Tensor)
        if scale_is_tensor:
            k_scale, v_scale = (_scale_tensor(s, k.device) for s in (k_scale, v_scale))
            per_head = (int(k_scale.numel() > 1), int(v_scale.numel() > 1))
        else:
            k_scale, v_scale = float(k_scale), float(v_scale)
    else:
        k_scale = v_scale = 1.0
    if not scale_is_tensor:
        per_head = (0, 0)
    head_pad = triton.next_power_of_2(head_size)
    # one program per (token, KV head); a row is at most 256 elements, so a warp or two suffices
    _WRITE_KV[(num_tokens, num_kv_heads)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_size,
        head_size,
        k_cache.shape[0] * block_size,
        HEAD_PAD=head_pad,
        FP8=fp8 is not None,
        SCALE_IS_TENSOR=scale_is_tensor,
        K_SCALE_PER_HEAD=per_head[0],
        V_SCALE_PER_HEAD=per_head[1],
        FP8_MAX=fp8_max,
        EXP_BITS=exp_bits,
        MAN_BITS=man_bits,
        SUBNORMAL_SCALE=subnormal_scale,
        num_warps=1 if head_pad <= 64 else 2,
    )


def _scale_tensor(scale, device) -> torch.Tensor:
    """A [1] (or [num_kv_heads], per KV head) float32 tensor on `device` (not 0-dim: torch treats
    a 0-dim CPU divisor as a scalar and may multiply by its reciprocal instead of dividing)."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def quantize_fp8(x: torch.Tensor, scale, fp8_dtype: torch.dtype) -> torch.Tensor:
    """x / scale saturated to +-finfo(fp8_dtype).max, in fp8_dtype (NaN stays NaN). A scale of
    several values is per KV head: x is [num_tokens, num_kv_heads, head_size]."""
    fp8_max = torch.finfo(fp8_dtype).max
    s = _scale_tensor(scale, x.device)
    if s.numel() > 1:
        s = s.reshape(1, -1, 1)
    return (x.float() / s).clamp(-fp8_max, fp8_max).to(fp8_dtype)


def _write_torch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, fp8):
    block_size = k_cache.shape[1]
    keep = (slot_mapping >= 0) & (slot_mapping < k_cache.shape[0] * block_size)
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k, v = k[keep], v[keep]
    if fp8 is not None:
        # index_put on fp8 tensors is not implemented everywhere: write the bytes
        k = quantize_fp8(k, k_scale, fp8).view(torch.uint8)
        v = quantize_fp8(v, v_scale, fp8).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def resolve_fp8_dtype(cache_dtype: torch.dtype, fp8_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The fp8 format a cache holds, or None for a plain fp16/bf16/fp32 cache."""
    if isinstance(fp8_dtype, str):
        fp8_dtype = fp8_dtype_of(fp8_dtype)
    if fp8_dtype is not None and fp8_dtype not in FP8_DTYPES:
        raise DTypeError(f"fp8_dtype must be one of {FP8_DTYPES} (or a kv_dtype name), got {fp8_dtype}")
    if cache_dtype == torch.uint8:
        if fp8_dtype is None:
            raise DTypeError(
                "k_cache is uint8 storage: pass fp8_dtype=torch.float8_e4m3fn or torch.float8_e5m2 "
                "to say which fp8 format it holds"
            )
        return fp8_dtype
    if cache_dtype in FP8_DTYPES:
        if fp8_dtype is not None and fp8_dtype != cache_dtype:
            raise DTypeError(f"fp8_dtype is {fp8_dtype} but k_cache is {cache_dtype}")
        return cache_dtype
    if cache_dtype not in QUERY_DTYPES:
        raise DTypeError(f"k_cache must be fp16/bf16/fp32, fp8, or uint8 with fp8_dtype=, got {cache_dtype}")
    if fp8_dtype is not None:
        raise DTypeError(f"fp8_dtype={fp8_dtype} was given but k_cache is {cache_dtype}, not fp8 or uint8")
    return None


def check_scale(
    name: str,
    scale,
    device: torch.device,
    *,
    checked: bool = False,
    num_kv_heads: int | None = None,
    what: str = "an fp8 cache (the cache holds x / {name})",
) -> None:
    """A scale: a float or a one-element floating tensor (on `device` or the CPU), or with
    `num_kv_heads` also a [num_kv_heads] tensor (one scale per KV head); every value finite and
    > 0 (device values are read in checked mode only: reading them syncs)."""
    if scale is None:
        raise ScaleError(f"{name} is required for " + what.format(name=name))
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 and (num_kv_heads is None or tuple(scale.shape) != (num_kv_heads,)):
            heads = "" if num_kv_heads is None else f" or [num_kv_heads] = [{num_kv_heads}] (one per KV head)"
            raise ScaleError(f"{name} must be one value (per-tensor scale){heads}, got shape {tuple(scale.shape)}")
        if not scale.dtype.is_floating_point:
            raise ScaleError(f"{name} must be a floating-point tensor, got {scale.dtype}")
        if scale.device != device and scale.device.type != "cpu":
            raise DeviceError(f"{name} is on {scale.device}, expected {device} or cpu")
        if scale.device.type != "cpu" and not checked:
            return  # reading a device scale would sync: its value is checked in checked mode only
        values = scale.detach().double().flatten().cpu().tolist()
    else:
        try:
            values = [float(scale)]
        except (TypeError, ValueError):
            raise ScaleError(f"{name} must be a float or a one-element tensor, got {type(scale).__name__}") from None
    check_scale_values(name, values)


def check_scale_values(name: str, values: list[float]) -> None:
    """Every scale value finite and > 0 (ScaleError naming the element of a per-head scale)."""
    for i, value in enumerate(values):
        if not math.isfinite(value) or value <= 0:
            at = f"[{i}]" if len(values) > 1 else ""
            raise ScaleError(f"{name}{at} must be finite and > 0, got {value}")


# write_kv's tensor arguments, in order, and their ranks
WRITE_RANKS = (("k", 3), ("v", 3), ("k_cache", 4), ("v_cache", 4), ("slot_mapping", 1))


def check_write_inputs(
    k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None, fp8_dtype=None, checked=False
) -> torch.dtype | None:
    """Host-side checks of write_kv's arguments (no device sync); returns the cache's fp8 dtype or None."""
    for (name, rank), t in zip(WRITE_RANKS, (k, v, k_cache, v_cache, slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ShapeError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    device = k_cache.device
    for name, t in (("k", k), ("v", v), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != device:
            raise DeviceError(f"{name} is on {t.device}, expected {device} (the device of k_cache)")
    if k_cache.shape != v_cache.shape:
        raise ShapeError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.dtype != v_cache.dtype:
        raise DTypeError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share a dtype")
    num_blocks, block_size, num_kv_heads, head_size = k_cache.shape
    if head_size == 0 or head_size > MAX_HEAD_SIZE:
        raise UnsupportedConfigError(f"head_size (k_cache.shape[3]) must be in 1..{MAX_HEAD_SIZE}, got {head_size}")
    expected = (k.shape[0], num_kv_heads, head_size)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected:
            raise ShapeError(
                f"{name} must be [num_tokens, num_kv_heads, head_size] = {list(expected)} "
                f"(num_kv_heads and head_size from k_cache), got {list(t.shape)}"
            )
        if t.dtype not in QUERY_DTYPES:
            raise DTypeError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise LayoutError(f"{name} must be contiguous in head_size, got strides {t.stride()}")
    if k.dtype != v.dtype:
        raise DTypeError(f"k ({k.dtype}) and v ({v.dtype}) must share a dtype")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise LayoutError(f"{name} must be contiguous in head_size, got strides {t.stride()}")
    if k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr():
        raise LayoutError("k_cache and v_cache are the same memory: K would overwrite V")
    if slot_mapping.dtype != torch.int64:
        raise DTypeError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ShapeError(
            f"slot_mapping must have num_tokens = {k.shape[0]} entries (k.shape[0]), got {slot_mapping.shape[0]}"
        )
    fp8 = resolve_fp8_dtype(k_cache.dtype, fp8_dtype)
    if fp8 is None:
        if k.dtype != k_cache.dtype:
            raise DTypeError(
                f"k is {k.dtype} but k_cache is {k_cache.dtype}: a non-fp8 cache takes K/V in its own dtype"
            )
    else:
        check_scale("k_scale", k_scale, device, checked=checked, num_kv_heads=num_kv_heads)
        check_scale("v_scale", v_scale, device, checked=checked, num_kv_heads=num_kv_heads)
    return fp8


def check_slot_values(slot_mapping: torch.Tensor, *, num_slots: int, duplicates: bool = True) -> None:
    """Checked mode: every slot is -1 or in [0, num_slots), and no slot is written by two tokens."""
    slots = slot_mapping.cpu()
    bad = ((slots < -1) | (slots >= num_slots)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise BatchMetadataError(
            f"slot_mapping[{i}] = {int(slots[i])} is out of range: expected -1 (padding) or a slot "
            f"in [0, {num_slots}) (num_blocks * block_size)"
        )
    tokens = (slots >= 0).nonzero().flatten()
    if not duplicates or tokens.numel() < 2:
        return
    ordered, order = torch.sort(slots[tokens], stable=True)
    same = (ordered[1:] == ordered[:-1]).nonzero()
    if same.numel():
        j = int(same[0, 0])
        first, second = int(tokens[order[j]]), int(tokens[order[j + 1]])
        raise SlotConflictError(
            f"slot_mapping[{first}] and slot_mapping[{second}] are both slot {int(ordered[j])}: "
            f"tokens {first} and {second} would write the same cache slot (the result depends on "
            "which write lands last)"
        )
