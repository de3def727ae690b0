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
}


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for outputs of `dtype`; float64 and other wider types use float32's."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])
