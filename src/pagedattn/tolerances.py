"""Default comparison tolerances by output dtype: one table for `verify`, `compare` and the tests.

(atol, rtol) such that a correct kernel's output, against the fp32/fp64 reference on well-scaled
random data, passes with margin; a bug misses by far more (see `diagnosis`' numerical-noise rule).
"""

from __future__ import annotations

import torch

TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.5e-2, 1.5e-2),
    # an fp8 (e4m3) output, compared dequantized (out * out_scale): rounding to 3 mantissa bits is
    # off by up to 2^-4 relative, and the fp16/bf16 arithmetic before it (~2^-8) can move a value
    # near a rounding boundary to the next step: up to 2^-3 relative at the bottom of a binade
    # (H200 run of 2026-11-28: rtol 0.1 failed 0.14% of a 1.5M-element output by exactly one
    # step). Small values: bf16's atol. A wrong out_scale misses by 2x or more.
    torch.float8_e4m3fn: (1.5e-2, 1.5e-1),
}

# fp8 queries against a reference computed from the *unquantized* queries (and K/V): the
# quantization error itself, vLLM's tolerance in its fp8-query kernel tests. Against a reference
# from the dequantized fp8 values, fp8 queries need only their output dtype's tolerance.
FP8_QUERY_TOLERANCE = (1.5e-1, 1.5e-1)


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for outputs of `dtype`; float64 and other wider types use float32's."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])
