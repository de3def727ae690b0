"""Poison: a NaN bit pattern of pagedattn's own that marks cache memory nobody wrote.

A read of a poisoned slot turns the outputs that depend on it into NaN, and because the pattern is
a specific NaN (a payload for fp16/bf16/fp32, a specific byte for fp8), checked mode and forensics
can tell "this slot was never written" from "this slot holds a NaN the user wrote":

    dtype           poison bits   what writing a user NaN gives instead
    float32         0x7FC0BAD0    0x7FC00000 (float('nan')), 0xFFC00000 (x86 0/0), 0x7FFFFFFF (CUDA)
    float16         0x7EAD        0x7E00, 0xFE00, 0x7FFF
    bfloat16        0x7FED        0x7FC0, 0xFFC0, 0x7FFF
    float8_e4m3fn   0xFF          0x7F (any positive NaN); see below
    float8_e5m2     0xFD          0x7F / 0xFF (torch and pagedattn's write kernel), 0x7E / 0xFE

float8_e4m3fn has only two NaN codes, 0x7F and 0xFF. Quantizing a positive NaN (float('nan'),
torch.nan, CUDA's canonical NaN) gives 0x7F, so 0xFF is the poison; a *negative* NaN (what 0/0 gives
on an x86 CPU) quantizes to 0xFF too and is then indistinguishable from poison. Every other dtype
has room for a pattern that no conversion or arithmetic produces (arithmetic makes canonical NaNs;
e5m2's 0xFD is a signalling NaN, which arithmetic never makes).

    poison_(t)                  fill any cache tensor (any dtype above, any strides, views of a
                                larger buffer included) with the pattern, in place
    is_poison(t) / is_nonfinite(t)
                                elementwise bool masks, from the bits (no float conversion)
    empty_kv_cache(...)         a poisoned (k_cache, v_cache) pair in one of the layouts pagedattn reads

uint8 tensors (vLLM's fp8 storage) carry no fp8 format: pass `dtype=torch.float8_e4m3fn` or
`torch.float8_e5m2` to say which.
"""

from __future__ import annotations

import torch

from .config import FP8_DTYPES
from .errors import DTypeError, LayoutError, UnsupportedConfigError

__all__ = ["POISON_BITS", "poison_", "poison_bits", "is_poison", "is_nonfinite", "empty_kv_cache", "KV_LAYOUTS"]

# dtype -> (poison bit pattern, the integer dtype of the same width it is compared in, exponent mask)
POISON_BITS = {
    torch.float32: 0x7FC0BAD0,
    torch.float16: 0x7EAD,
    torch.bfloat16: 0x7FED,
    torch.float8_e4m3fn: 0xFF,
    torch.float8_e5m2: 0xFD,
}
_INT_VIEW = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
# a value is NaN or inf iff all its exponent bits are set (e4m3fn: exponent and mantissa, no inf)
_NONFINITE_MASK = {
    torch.float32: 0x7F800000,
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
    torch.float8_e4m3fn: 0x7F,
    torch.float8_e5m2: 0x7C,
}
CACHE_DTYPES = tuple(POISON_BITS)


def _format(t: torch.Tensor, dtype: torch.dtype | None, name: str = "tensor") -> torch.dtype:
    """The float format `t` holds: its own dtype, or `dtype` for uint8 fp8 storage."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.uint8:
        if dtype not in FP8_DTYPES:
            raise DTypeError(
                f"{name} is torch.uint8 (fp8 storage): pass dtype=torch.float8_e4m3fn or "
                f"torch.float8_e5m2 to say which format it holds, got dtype={dtype}"
            )
        return dtype
    if dtype is not None and dtype != t.dtype:
        raise DTypeError(f"{name} is {t.dtype} but dtype={dtype} was given (dtype= is only for uint8 storage)")
    if t.dtype not in POISON_BITS:
        raise DTypeError(f"{name} must be one of {CACHE_DTYPES} (or uint8 fp8 storage), got {t.dtype}")
    return t.dtype


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """`t` reinterpreted as integers of its width: same shape and strides, no copy."""
    return t if t.dtype == torch.uint8 else t.view(_INT_VIEW[t.element_size()])


def _signed(bits: int, width: int) -> int:
    """A bit pattern as the signed value torch's int16/int32 hold (uint8 stays unsigned)."""
    if width == 1:
        return bits
    top = 1 << (8 * width - 1)
    return bits - 2 * top if bits & top else bits


def poison_bits(dtype: torch.dtype) -> int:
    """The poison bit pattern of a cache dtype, as an unsigned int (0x7EAD for float16)."""
    try:
        return POISON_BITS[dtype]
    except KeyError:
        raise DTypeError(f"dtype must be one of {CACHE_DTYPES}, got {dtype}") from None


def poison_(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fill `t` in place with the poison pattern of its dtype and return it.

    Any strides: a view of a larger buffer (the K half of [num_blocks, block_size, num_kv_heads,
    2 * head_size], one side of [2, num_blocks, ...], a permuted HND view) is filled without touching
    the elements outside it. `dtype` names the fp8 format of uint8 storage."""
    fmt = _format(t, dtype)
    view = _bits_view(t)
    view.fill_(_signed(POISON_BITS[fmt], t.element_size()))
    return t


def poison_fill_value(dtype: torch.dtype) -> int:
    """The value to `fill_`/`index_fill_` a `t.view(int dtype of the same width)` with (signed)."""
    return _signed(poison_bits(dtype), dtype.itemsize)


def nonfinite_mask_value(dtype: torch.dtype) -> int:
    """x is NaN or inf iff (bits(x) & m) == m, with m this value (signed, for the int view)."""
    poison_bits(dtype)
    return _signed(_NONFINITE_MASK[dtype], dtype.itemsize)


def int_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as integers of its element width (int32, int16 or uint8), sharing its memory."""
    return _bits_view(t)


def is_poison(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise: the element holds exactly the poison pattern (bool, same shape, same device)."""
    fmt = _format(t, dtype)
    return _bits_view(t) == _signed(POISON_BITS[fmt], t.element_size())


def is_nonfinite(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise: NaN or inf, poison included, from the bits (works for fp8 on any device)."""
    mask = nonfinite_mask_value(_format(t, dtype))
    return (_bits_view(t) & mask) == mask


# ---------------------------------------------------------------------------------------------
# allocation
# ---------------------------------------------------------------------------------------------
KV_LAYOUTS = {
    "nhd": "k, v: [num_blocks, block_size, num_kv_heads, head_size] (vLLM's flash layout, pagedattn's own)",
    "hnd": "k, v: [num_blocks, num_kv_heads, block_size, head_size] (FlashInfer's HND)",
    "vllm_v0": "k: [num_blocks, num_kv_heads, head_size // x, block_size, x], x = 16 bytes / element size; "
    "v: [num_blocks, num_kv_heads, head_size, block_size] (vLLM's older layout, "
    "context_attention_fwd / chunked_prefill_paged_decode)",
}


def empty_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    *,
    dtype: torch.dtype = torch.float16,
    layout: str = "nhd",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k_cache, v_cache) pair, every element poisoned: any slot read before it is written turns
    the outputs that read it into NaN, and checked mode names it.

    Parameters: `dtype` is the cache dtype (float16, bfloat16, float32, float8_e4m3fn, float8_e5m2;
    vLLM code that wants uint8 fp8 storage can `.view(torch.uint8)` the result); `layout` one of
    `KV_LAYOUTS` ("nhd", "hnd", "vllm_v0"). Returns two separate contiguous tensors in that layout.
    The cost is one fill pass over the memory, like torch.full."""
    for name, value in (
        ("num_blocks", num_blocks),
        ("block_size", block_size),
        ("num_kv_heads", num_kv_heads),
        ("head_size", head_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnsupportedConfigError(f"{name} must be a positive int, got {value!r}")
    if dtype not in POISON_BITS:
        raise DTypeError(f"dtype (the cache dtype) must be one of {CACHE_DTYPES}, got {dtype}")
    if layout == "nhd":
        k_shape = v_shape = (num_blocks, block_size, num_kv_heads, head_size)
    elif layout == "hnd":
        k_shape = v_shape = (num_blocks, num_kv_heads, block_size, head_size)
    elif layout == "vllm_v0":
        x = 16 // dtype.itemsize
        if head_size % x:
            raise LayoutError(
                f"layout 'vllm_v0' packs head_size in chunks of x = 16 bytes / {dtype.itemsize} = {x} "
                f"elements; head_size {head_size} is not a multiple of {x}"
            )
        k_shape = (num_blocks, num_kv_heads, head_size // x, block_size, x)
        v_shape = (num_blocks, num_kv_heads, head_size, block_size)
    else:
        raise UnsupportedConfigError(f"layout must be one of {sorted(KV_LAYOUTS)}, got {layout!r}")
    k = poison_(torch.empty(k_shape, dtype=dtype, device=device))
    v = poison_(torch.empty(v_shape, dtype=dtype, device=device))
    return k, v
