"""pagedattn: fast, verifiably correct attention over a paged KV cache."""

from .attention import attention, paged_attention, prefix_prefill, reference_attention
from .batch import BatchMetadata
from .cache import PagedKVCache
from .forensics import Report, compare
from .config import AttentionConfig, BatchShape, Case
from .errors import (BatchMetadataError, CacheFullError, ContractError, DeviceError, DTypeError,
                     LayoutError, PagedAttentionError, ScaleError, SequenceError, ShapeError,
                     SlotConflictError, UnsupportedConfigError, UnwrittenKVError)

__all__ = [
    "attention", "paged_attention", "prefix_prefill", "reference_attention", "PagedKVCache",
    "compare", "Report", "BatchMetadata", "AttentionConfig",
    "BatchShape", "Case", "PagedAttentionError", "ShapeError", "DTypeError", "DeviceError",
    "LayoutError", "BatchMetadataError", "UnsupportedConfigError", "ScaleError", "CacheFullError",
    "SequenceError", "ContractError", "UnwrittenKVError", "SlotConflictError",
]
