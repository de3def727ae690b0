"""pagedattn: fast, verifiably correct attention over a paged KV cache."""

from .attention import attention, paged_attention, prefix_prefill
from .batch import BatchMetadata
from .config import AttentionConfig, BatchShape, Case
from .errors import (BatchMetadataError, CacheFullError, ContractError, DeviceError, DTypeError,
                     LayoutError, PagedAttentionError, ScaleError, SequenceError, ShapeError,
                     SlotConflictError, UnsupportedConfigError, UnwrittenKVError)

__all__ = [
    "attention", "paged_attention", "prefix_prefill", "BatchMetadata", "AttentionConfig",
    "BatchShape", "Case", "PagedAttentionError", "ShapeError", "DTypeError", "DeviceError",
    "LayoutError", "BatchMetadataError", "UnsupportedConfigError", "ScaleError", "CacheFullError",
    "SequenceError", "ContractError", "UnwrittenKVError", "SlotConflictError",
]
