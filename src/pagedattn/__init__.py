"""pagedattn: fast, verifiably correct attention over a paged KV cache.

The public API, re-exported. Names load on first use (PEP 562), so `import pagedattn` and the
`pagedattn` command start without importing torch or triton until something needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "attention": ".attention",
    "paged_attention": ".attention",
    "prefix_prefill": ".attention",
    "reference_attention": ".attention",
    "BatchMetadata": ".batch",
    "PagedAttention": ".planner",
    "AttentionOptions": ".options",
    "write_kv": ".kernels.write",
    "PagedKVCache": ".cache",
    "Report": ".forensics",
    "compare": ".forensics",
    "compare_saved": ".forensics",
    "poison_": ".poison",
    "empty_kv_cache": ".poison",
    "AttentionConfig": ".config",
    "BatchShape": ".config",
    "Case": ".config",
    **{
        name: ".errors"
        for name in (
            "BatchMetadataError",
            "CacheFullError",
            "ContractError",
            "DeviceError",
            "DTypeError",
            "LayoutError",
            "PagedAttentionError",
            "ScaleError",
            "SequenceError",
            "ShapeError",
            "SlotConflictError",
            "UnsupportedConfigError",
            "UnwrittenKVError",
            "NonFiniteKVError",
        )
    },
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule `pagedattn.attention` must not replace the function `pagedattn.attention`
    (the import system sets the package attribute to the submodule). For the module itself use
    `importlib.import_module("pagedattn.attention")`."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static tools see the plain imports
    from .attention import attention, paged_attention, prefix_prefill, reference_attention
    from .batch import BatchMetadata
    from .cache import PagedKVCache
    from .config import AttentionConfig, BatchShape, Case
    from .errors import (
        BatchMetadataError,
        CacheFullError,
        ContractError,
        DeviceError,
        DTypeError,
        LayoutError,
        NonFiniteKVError,
        PagedAttentionError,
        ScaleError,
        SequenceError,
        ShapeError,
        SlotConflictError,
        UnsupportedConfigError,
        UnwrittenKVError,
    )
    from .forensics import Report, compare, compare_saved
    from .kernels.write import write_kv
    from .options import AttentionOptions
    from .planner import PagedAttention
    from .poison import empty_kv_cache, poison_
