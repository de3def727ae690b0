"""`PagedAttention`: plan once per step, run once per layer.

    attn = PagedAttention(options, num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                          dtype=torch.bfloat16, device="cuda")
    attn.plan(cu_seqlens_q, seq_lens, block_table, query_lens_host=..., seq_lens_host=...)  # per step
    for layer in range(num_layers):
        out[layer] = attn.run(q[layer], k_cache[layer], v_cache[layer])                    # launches only

`plan` does everything that depends on the batch: host checks of the metadata tensors, the value
rules on host copies (no device sync), dispatch, and the kernels' argument lists. `run` checks
what it is handed against the plan (host attributes only), then launches with pre-bound
arguments. Different layers may pass different caches of the same geometry, with any strides.

When are metadata values validated? At plan time, on host copies: always when the metadata is on
the CPU (it costs nothing there), when `query_lens_host`/`seq_lens_host` (and
`block_table_host` for block ids) are given, and in checked mode (one sync to read them). A GPU
plan from device tensors alone is not validated: the kernels stay inside every tensor whatever
the values, and a sequence whose metadata is inconsistent gets NaN rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import dispatch, reference
from . import shared_prefix as sharing
from .config import FP8_DTYPES
from .errors import BatchMetadataError, PagedAttentionError, ShapeError, UnsupportedConfigError
from .kernels import cascade as cascade_kernels
from .kernels import unified
from .options import AttentionOptions
from .validate import (
    CONTRACTS,
    cache_geometry,
    cache_strides,
    check_caches,
    check_choice,
    check_fp8_dtypes,
    check_geometry,
    check_metadata_tensors,
    check_metadata_values,
    check_new_kv,
    check_no_overlap,
    check_options,
    check_out,
    check_query,
    check_run_scales,
    check_scale,
    default_out_dtype,
    extent,
    nhd_views,
)

# Bindings shared by one-shot calls (`paged_attention` & co. build a PagedAttention per call):
# keyed on everything a binding depends on (see PagedAttention._shared_key), the oldest dropped
# past SHARED_BINDINGS_MAX. Each holds its metadata and option tensors (the split-KV workspace is
# the kernels' own, shared by every binding anyway).
SHARED_BINDINGS_MAX = 16
_SHARED_BINDINGS: dict[tuple, _Binding] = {}


def clear_shared_bindings() -> None:
    """Drop the one-shot calls' cached bindings (and the tensors and workspaces they hold)."""
    _SHARED_BINDINGS.clear()


def _device_values(cu_seqlens_q, seq_lens, block_table, query_lens_host, seq_lens_host, block_table_host):
    """Host copies of the device metadata (one sync), refusing host copies that disagree with them
    (the kernels read the device tensors: a host copy that differs would validate the wrong values)."""
    cu, seqs, table = cu_seqlens_q.cpu().numpy(), seq_lens.cpu().numpy(), block_table.cpu()
    pairs = (
        ("query_lens_host", query_lens_host, np.diff(cu.astype(np.int64)), "cu_seqlens_q's differences"),
        ("seq_lens_host", seq_lens_host, seqs, "seq_lens"),
        ("block_table_host", block_table_host, table.numpy(), "block_table"),
    )
    for name, given, device_value, what in pairs:
        if given is None:
            continue
        given = np.asarray(given.cpu() if isinstance(given, torch.Tensor) else given)
        if given.shape != device_value.shape or not np.array_equal(given, device_value):
            raise BatchMetadataError(
                f"{name} disagrees with {what} on the device (the values the kernels read): "
                f"host {given.tolist()[:8]}, device {device_value.tolist()[:8]}"
            )
    return cu, seqs, table


def checked_default(checked: bool | None) -> bool:
    """`checked`, or the environment's PAGEDATTN_CHECKED=1 when it is None."""
    if checked is None:
        return os.environ.get("PAGEDATTN_CHECKED", "0") not in ("", "0")
    return bool(checked)


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """One [1] float32 tensor per device for the scale slots no launch reads: made once, so a
    one-shot call (a planner per call) allocates no device memory on its hot path. Never written."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.ones(1, dtype=torch.float32, device=device)
    return t


def _scalar_tensor(value, device: torch.device) -> torch.Tensor:
    """A scale as the kernels read it: [1] float32 (or [num_kv_heads], per KV head) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    return torch.tensor([float(value)], dtype=torch.float32, device=device)


@dataclass
class _Batch:
    """What plan() knows about the step."""

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    num_tokens: int | None  # None: not known on the host (taken from q at the first run)
    max_query_len: int | None
    max_seq_len: int
    query_lens: np.ndarray | None  # host copies, when there were some
    validated: bool
    seq_lens_host: np.ndarray | None = None


class _Binding:
    """The launches of a plan for one layout of the per-layer tensors."""

    __slots__ = ("launches", "spans", "fp8", "reference", "join")

    def __init__(self, launches, spans, fp8, reference=None, join=0):
        self.launches = launches
        self.spans = spans  # byte extents of (q, k_cache, v_cache, k_new, v_new, out) from their data_ptr (0: none)
        self.fp8 = fp8
        self.reference = reference
        # a cascade's launches on a GPU: [shared prefix (a side stream), suffix..., merge (joins), ...];
        # join is the first merge's index (0: one stream, in order)
        self.join = join


class PagedAttention:
    """Paged attention planned once per step and run once per layer.

    Parameters
    ----------
    options : AttentionOptions, optional
        scale, sliding window, ALiBi, softcap, sinks, fp8 scales, cache layout.
    num_q_heads, num_kv_heads, head_size, block_size : int
        The geometry every layer shares.
    dtype : torch.dtype
        Query dtype: fp16, bf16, fp32, or float8_e4m3fn (real q = q_fp8 * options.q_scale; q.k
        runs on fp8 tensor cores over an e4m3 cache where the GPU has them, sm_89+).
    out_dtype : torch.dtype, optional
        Output dtype: default `dtype` (bf16 for fp8 q); float8_e4m3fn stores out / options.out_scale.
    kv_cache_dtype : torch.dtype, optional
        The caches' dtype when it differs from `dtype` (fp8 e4m3 / e5m2, or another float dtype).
    num_blocks : int, optional
        Cache size in blocks; bounds block ids at plan time (otherwise checked at the first run).
    device : torch.device or str
    contract : {"full", "context"}
        "full": every sequence's seq_len tokens are in the cache before `run` (vLLM v1, FlashInfer).
        "context": the cache holds ctx_len = seq_len - query_len tokens and `run` takes the query
        tokens' K/V as `k_new`/`v_new` (vLLM's context_attention_fwd).
    decode_from_cache : bool
        Context contract only: sequences with query_len == 1 read all seq_len tokens from the cache
        (vLLM's chunked_prefill_paged_decode), so their own K/V must be in the cache.
    checked : bool, optional
        Validate metadata values at plan time (one sync when there are no host copies) and prove,
        before each run, that every cache slot to be read holds no poison. Default: the
        environment's PAGEDATTN_CHECKED.
    backend : {"auto", "triton", "reference"}
    fp8_pv : bool
        fp8 q over an e4m3 cache, on a GPU with fp8 tensor cores: run P.V on them too, with P
        quantized to e4m3 (FlashAttention-3's fp8 mode). Experimental, default off: on the H200
        (2026-11-29) the 4k prefill ran 0.61x the bf16 speed with fp8_pv and its max error (0.22)
        exceeded vLLM's fp8 tolerance (0.15); without it fp8 q is within tolerance (BENCHMARKS.md).
    cuda_graph : bool
        Capturable runs that stay valid across plans: plan() copies the metadata into buffers this
        object owns (allocated by the first plan), and the launches depend on shapes and bounds
        only (max_query_len / max_seq_len as given, never the host lengths). Every later plan must
        have the first one's num_seqs, num_tokens and bounds. Shared-prefix (cascade) attention is
        on for every later plan when the first one used it (a step with no sharing runs its
        launches with no group), off for all of them when it did not.

    Shared-prefix (cascade) attention: when sequences share leading block-table entries (detected
    on the host copies, or told through plan's `shared_prefix`), the shared keys are read once for
    all their queries and merged with each sequence's own keys through the log-sum-exp
    (`pagedattn.shared_prefix`, `kernels/cascade.py`). The thresholds of detection are the
    attributes `cascade_min_prefix` (tokens) and `cascade_min_saved_keys`.
    """

    cascade_min_prefix = sharing.MIN_PREFIX_TOKENS
    cascade_min_saved_keys = sharing.MIN_SAVED_KEYS
    cascade_prefix_splits: int | None = None  # None: chosen to fill the GPU
    _cascade: sharing.Cascade | None = None
    _cascade_why = "not planned"
    _side_stream: torch.cuda.Stream | None = None  # the cascade's shared-prefix launches (GPU)
    # one-shot calls set these: their bindings go to (and come from) the shared cache; in checked
    # mode, whether run() scans the cache (False: the caller proved the reads, `attention`)
    _share_bindings = False
    _scan_reads = True

    def __init__(
        self,
        options: AttentionOptions | None = None,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_size: int,
        block_size: int,
        dtype: torch.dtype = torch.bfloat16,
        kv_cache_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        num_blocks: int | None = None,
        device: torch.device | str = "cuda",
        contract: str = "full",
        decode_from_cache: bool = False,
        checked: bool | None = None,
        backend: str = "auto",
        cuda_graph: bool = False,
        fp8_pv: bool = False,
    ):
        options = AttentionOptions() if options is None else options
        if not isinstance(options, AttentionOptions):
            raise UnsupportedConfigError(f"options must be an AttentionOptions, got {type(options).__name__}")
        check_geometry(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size)
        check_choice("contract", contract, CONTRACTS)
        check_choice("backend", backend, ("auto", "triton", "reference"))
        check_fp8_dtypes(dtype, kv_cache_dtype, out_dtype)
        if num_blocks is not None and (
            not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks <= 0
        ):
            raise UnsupportedConfigError(f"num_blocks must be None or a positive int, got {num_blocks!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        check_options(options, num_q_heads=num_q_heads, device=self.device)
        self.options = options
        self.num_q_heads, self.num_kv_heads, self.head_size, self.block_size = (
            num_q_heads,
            num_kv_heads,
            head_size,
            block_size,
        )
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.q_fp8 = dtype == torch.float8_e4m3fn
        self.out_dtype = out_dtype or default_out_dtype(dtype)
        self.out_fp8 = self.out_dtype == torch.float8_e4m3fn
        if self.q_fp8 and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise UnsupportedConfigError(
                f"dtype=torch.float8_e4m3fn (fp8 q) needs an sm_89+ GPU (Triton converts e4m3 only there); "
                f"{self.device} is sm_{''.join(map(str, torch.cuda.get_device_capability(self.device)))}"
            )
        self.num_blocks = num_blocks
        self.contract = contract
        self.decode_from_cache = bool(decode_from_cache) and contract == "context"
        self.checked = checked_default(checked)
        self.cuda_graph = bool(cuda_graph)
        if not isinstance(fp8_pv, bool):
            raise UnsupportedConfigError(f"fp8_pv must be True or False, got {fp8_pv!r}")
        self.fp8_pv = fp8_pv
        self.fp8 = self.kv_cache_dtype in FP8_DTYPES
        self.scale = 1.0 / math.sqrt(head_size) if options.scale is None else float(options.scale)
        self._kernel_options = dict(
            scale=self.scale,
            softcap=float(options.softcap or 0.0),
            sliding_window=int(options.sliding_window or 0),
            alibi=options.alibi_slopes,
            sinks=options.sinks,
            context=contract == "context",
            decode_from_cache=self.decode_from_cache,
        )
        # the scales the kernels read (k, v, q, out): per-model defaults, replaced per run() call
        # by per-layer tensors; a scale nothing reads is any small tensor
        scales = [_placeholder(self.device)] * 4
        wanted = (
            ("k_scale", self.fp8, self.num_kv_heads, "an fp8 cache (the cache holds k / k_scale)"),
            ("v_scale", self.fp8, self.num_kv_heads, "an fp8 cache (the cache holds v / v_scale)"),
            ("q_scale", self.q_fp8, None, "fp8 queries (real q = q_fp8 * q_scale)"),
            ("out_scale", self.out_fp8, None, "an fp8 output (it holds out / out_scale)"),
        )
        for i, (name, used, heads, what) in enumerate(wanted):
            if used:
                value = getattr(options, name)
                check_scale(name, value, self.device, checked=self.checked, num_kv_heads=heads, what=what)
                scales[i] = _scalar_tensor(value, self.device)
        self._scales = tuple(scales)
        self._scale_ptrs = tuple(t.data_ptr() for t in self._scales)
        self._scale_used = tuple(w[1] for w in wanted)
        self._seen_scales: dict[tuple, tuple] = {}
        self.backend = backend
        self._batch: _Batch | None = None
        self._plans: dict[int, dispatch.Plan] = {}
        self._bindings: dict[tuple, _Binding] = {}
        self._graph_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._forced: dispatch.Plan | None = None

    # ------------------------------------------------------------------------------------------
    # plan: once per step
    # ------------------------------------------------------------------------------------------
    def plan(
        self,
        cu_seqlens_q: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        *,
        query_lens_host: Sequence[int] | None = None,
        seq_lens_host: Sequence[int] | None = None,
        block_table_host: torch.Tensor | np.ndarray | None = None,
        max_query_len: int | None = None,
        max_seq_len: int | None = None,
        num_tokens: int | None = None,
        validate: bool | None = None,
        dispatch_plan: dispatch.Plan | None = None,
        shared_prefix: Sequence[tuple[Sequence[int], int]] | bool | None = None,
    ) -> PagedAttention:
        """Plan a step from its metadata.

        Parameters
        ----------
        cu_seqlens_q : torch.Tensor
            [num_seqs + 1] int32 on the device: query-token offsets (vLLM's query_start_loc).
        seq_lens : torch.Tensor
            [num_seqs] int32: tokens each sequence attends to (ctx_len + query_len).
        block_table : torch.Tensor
            [num_seqs, max_blocks_per_seq] int32: logical block -> physical block.
        query_lens_host, seq_lens_host : sequences of int, optional
            Host copies of the lengths (an engine has them): plan reads nothing from the device.
        block_table_host : CPU tensor or array, optional
            Host copy of the block table: block ids are then checked at plan time too.
        max_query_len, max_seq_len : int, optional
            Bounds; default the host maxima, else num_tokens and the block table's capacity.
        num_tokens : int, optional
            Query tokens of the step, when no host lengths are given (else taken from q at run).
        validate : bool, optional
            Check metadata values (default: whenever host copies exist, or in checked mode).
            False trusts them: a GPU call then never syncs, and inconsistent sequences give NaN rows.
        shared_prefix : list of (member sequence indices, shared tokens), False or None
            Shared-prefix attention. None: detected on the host copies (needs `block_table_host`, or
            CPU metadata, and host lengths). A list: these groups share the first `tokens` tokens
            (rounded down to whole blocks of the same block ids, below each member's first query
            token): needs host lengths, which it is checked against, and is checked against
            `block_table_host` when given (otherwise the first member's row is read). False: never.

        Returns self. Raises BatchMetadataError (or ShapeError/DTypeError/DeviceError) naming the
        argument."""
        if validate not in (None, True, False):
            raise UnsupportedConfigError(f"validate must be None, True or False, got {validate!r}")
        if dispatch_plan is not None and not isinstance(dispatch_plan, dispatch.Plan):
            raise UnsupportedConfigError(f"dispatch_plan must be a dispatch.Plan, got {type(dispatch_plan).__name__}")
        for name, value in (("max_query_len", max_query_len), ("max_seq_len", max_seq_len), ("num_tokens", num_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise UnsupportedConfigError(f"{name} must be None or an int >= 0, got {value!r}")
        check_metadata_tensors(cu_seqlens_q, seq_lens, block_table, self.device)
        num_seqs = seq_lens.shape[0]
        on_cpu = self.device.type == "cpu"
        cu_host = cu_seqlens_q.numpy() if on_cpu else None
        if on_cpu:
            seq_lens_host = seq_lens.numpy() if seq_lens_host is None else seq_lens_host
            block_table_host = block_table if block_table_host is None else block_table_host
        have_host = (cu_host is not None or query_lens_host is not None) and seq_lens_host is not None
        if not on_cpu and (validate is True or (validate is None and self.checked)):
            # asked to check the values (validate=True, checked mode): check the device tensors
            # themselves, one sync; host copies the caller gave must agree with them
            cu_host, seq_lens_host, block_table_host = _device_values(
                cu_seqlens_q, seq_lens, block_table, query_lens_host, seq_lens_host, block_table_host
            )
            query_lens_host, have_host, validate = None, True, True
        if validate is None:
            validate = have_host
        query_lens = None
        if have_host:
            if query_lens_host is not None and len(query_lens_host) != num_seqs:
                raise BatchMetadataError(
                    f"query_lens_host has {len(query_lens_host)} entries but seq_lens has {num_seqs} sequences"
                )
            if len(seq_lens_host) != num_seqs:
                raise BatchMetadataError(
                    f"seq_lens_host has {len(seq_lens_host)} entries but seq_lens has {num_seqs} sequences"
                )
            if validate:
                query_lens, seqs = check_metadata_values(
                    cu_seqlens_q=cu_host,
                    query_lens=None if cu_host is not None else query_lens_host,
                    seq_lens=seq_lens_host,
                    block_table=block_table_host,
                    block_size=self.block_size,
                    num_blocks=self.num_blocks,
                    num_tokens=num_tokens,
                    max_query_len=max_query_len,
                    max_seq_len=max_seq_len,
                    contract=self.contract,
                    decode_from_cache=self.decode_from_cache,
                )
            else:
                query_lens = np.diff(np.asarray(cu_host)) if cu_host is not None else np.asarray(query_lens_host)
                seqs = np.asarray(seq_lens_host)
            seqs = np.asarray(seqs)
            if num_tokens is None:
                num_tokens = int(query_lens.sum())
            if not self.cuda_graph:
                max_query_len = int(query_lens.max()) if max_query_len is None else max_query_len
                max_seq_len = int(seqs.max()) if max_seq_len is None else max_seq_len
        if max_seq_len is None:
            max_seq_len = block_table.shape[1] * self.block_size
        first_graph_plan = self._graph_buffers is None
        if self.cuda_graph:
            cu_seqlens_q, seq_lens, block_table = self._into_graph_buffers(
                cu_seqlens_q, seq_lens, block_table, (num_tokens, max_query_len, max_seq_len)
            )
        else:
            self._bindings.clear()
            self._plans.clear()
        self._batch = _Batch(
            cu_seqlens_q,
            seq_lens,
            block_table,
            num_tokens,
            max_query_len,
            max_seq_len,
            None if self.cuda_graph else query_lens,
            bool(validate),
            None if (self.cuda_graph or not have_host) else seqs,
        )
        self._forced = dispatch_plan
        self._cascade, self._cascade_why = sharing.plan(
            self,
            shared_prefix,
            cu_seqlens_q=cu_seqlens_q,
            seq_lens=seq_lens,
            block_table=block_table,
            host=(cu_host, query_lens, seqs, block_table_host) if have_host else None,
            num_tokens=num_tokens,
            max_seq_len=max_seq_len,
            previous=self._cascade if self.cuda_graph else None,
            locked=self.cuda_graph and not first_graph_plan and self._cascade is None,
        )
        return self

    def _into_graph_buffers(self, cu_seqlens_q, seq_lens, block_table, bounds):
        if self._graph_buffers is None:
            self._graph_buffers = (cu_seqlens_q.clone(), seq_lens.clone(), block_table.clone())
            self._graph_bounds = bounds
            return self._graph_buffers
        buffers = self._graph_buffers
        for name, buf, new in zip(
            ("cu_seqlens_q", "seq_lens", "block_table"), buffers, (cu_seqlens_q, seq_lens, block_table)
        ):
            if buf.shape != new.shape:
                raise ShapeError(
                    f"cuda_graph=True: {name} has shape {tuple(new.shape)}, but this PagedAttention "
                    f"was first planned with {tuple(buf.shape)} (captured graphs keep their shapes: "
                    "make one PagedAttention per captured batch size)"
                )
        if bounds != self._graph_bounds:
            raise ShapeError(
                f"cuda_graph=True: (num_tokens, max_query_len, max_seq_len) = {bounds}, but the first "
                f"plan had {self._graph_bounds}; pass the same bounds every step"
            )
        for buf, new in zip(buffers, (cu_seqlens_q, seq_lens, block_table)):
            if buf.data_ptr() != new.data_ptr():
                buf.copy_(new, non_blocking=True)
        return buffers

    def _dispatch(self, num_tokens: int) -> dispatch.Plan:
        if self._forced is not None:
            return self._forced
        plan = self._plans.get(num_tokens)
        if plan is None:
            b = self._batch
            plan = dispatch.plan(
                num_seqs=b.seq_lens.shape[0],
                num_tokens=num_tokens,
                max_query_len=num_tokens if b.max_query_len is None else b.max_query_len,
                max_seq_len=b.max_seq_len if self._cascade is None else self._cascade.max_seq_len,
                num_q_heads=self.num_q_heads,
                num_kv_heads=self.num_kv_heads,
                head_size=self.head_size,
                block_size=self.block_size,
                dtype=self.dtype,
                cache_dtype=self.kv_cache_dtype,
                sliding_window=int(self.options.sliding_window or 0),
                context_contract=self.contract == "context",
                alibi=self.options.alibi_slopes is not None,
                device=self.device,
                backend=self.backend,
            )
            self._plans[num_tokens] = plan
        return plan

    def explain(self, num_tokens: int | None = None) -> str:
        """The plan of the current step: kernel, parameters and the rule that chose them."""
        if self._batch is None:
            raise PagedAttentionError("explain() before plan()")
        p = self._dispatch(num_tokens or self._batch.num_tokens or 1)
        launches = [part for part in p.launches if self._has_work(part)] if p.kernel != "reference" else []
        text = f"{p.kernel} [{p.params()}] ({len(launches)} launch(es) with work): {p.rule}"
        text += self._fp8_note(p.kernel)
        if p.kernel == "reference":
            return text
        if self._cascade is None:
            return f"{text}; no shared prefix: {self._cascade_why}"
        return f"{self._cascade.describe()}; suffix: {text}"

    def _fp8_note(self, kernel: str) -> str:
        """What explain says about fp8 queries and outputs (nothing when there are none)."""
        notes = []
        if self.q_fp8:
            if kernel == "reference":
                how = "dequantized by the reference"
            elif self.kv_cache_dtype == torch.float8_e4m3fn and unified.fp8_dot_available(self.device):
                how = "q.k on fp8 tensor cores (e4m3 x e4m3, fp32 accumulation)"
                if self.fp8_pv:
                    how += ", P.V too (P quantized to e4m3)"
            else:
                e4m3 = self.kv_cache_dtype == torch.float8_e4m3fn
                why = "no fp8 tensor cores here" if e4m3 else "the cache is not e4m3"
                how = f"q upcast exactly for the q.k dot ({why})"
            notes.append(f"fp8 q (e4m3, real q = q * q_scale): {how}")
        if self.out_fp8:
            notes.append("fp8 out (e4m3): stores out / out_scale, saturated to +-448")
        return "".join(f"; {n}" for n in notes)

    def _has_work(self, part) -> bool:
        q = self._batch.query_lens
        return q is None or bool(((q >= part.min_query_len) & (q <= part.max_query_len)).any())

    # ------------------------------------------------------------------------------------------
    # run: once per layer
    # ------------------------------------------------------------------------------------------
    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        q_scale: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of `q` over the caches, for the planned step.

        Parameters
        ----------
        q : torch.Tensor
            [num_tokens, num_q_heads, head_size] in the planned dtype; any strides.
        k_cache, v_cache : torch.Tensor
            In the options' kv_layout (NHD: [num_blocks, block_size, num_kv_heads, head_size]); any
            strides: K and V may be views into one tensor.
        out : torch.Tensor, optional
            Like q (any strides); allocated when not given.
        k_new, v_new : torch.Tensor, optional
            Context contract: [num_tokens, num_kv_heads, head_size], the query tokens' K/V.
        k_scale, v_scale, q_scale, out_scale : torch.Tensor, optional
            This layer's scales, replacing the options' for this call: float32 on the plan's device,
            [1] ([1] or [num_kv_heads] for k_scale / v_scale). Passed by pointer (nothing is copied
            or synced; values are checked in checked mode and on the CPU). Ignored where the options'
            would be (k/v for non-fp8 caches, q for non-fp8 q, out for a non-fp8 output).

        Returns out."""
        b = self._batch
        if b is None:
            raise PagedAttentionError("run() before plan(): plan the step first")
        scales, sptrs = self._scales, self._scale_ptrs
        if k_scale is not None or v_scale is not None or q_scale is not None or out_scale is not None:
            scales, sptrs = self._run_scales(k_scale, v_scale, q_scale, out_scale)
        # the layout key: everything a binding and the host checks depend on (no addresses)
        key = (
            scales[0].shape,
            scales[1].shape,
            q.shape,
            q.stride(),
            q.dtype,
            q.device,
            k_cache.shape,
            k_cache.stride(),
            k_cache.dtype,
            k_cache.device,
            v_cache.shape,
            v_cache.stride(),
            v_cache.dtype,
            v_cache.device,
            None if out is None else (out.shape, out.stride(), out.dtype, out.device),
            None if k_new is None else (k_new.shape, k_new.stride(), k_new.dtype, k_new.device),
            None if v_new is None else (v_new.shape, v_new.stride(), v_new.dtype, v_new.device),
        )
        binding = self._bindings.get(key)
        if binding is None:  # a new layout: full host checks (and the checked reads) first
            binding = self._bindings[key] = self._bind(q, k_cache, v_cache, out, k_new, v_new, key, scales)
        elif self.checked and self._scan_reads:
            self._check_reads(k_cache, v_cache)
        pq, pk, pv = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()
        pkn = pq if k_new is None else k_new.data_ptr()
        pvn = pq if v_new is None else v_new.data_ptr()
        if out is None:
            out = torch.empty(q.shape, dtype=self.out_dtype, device=q.device)
            if not b.validated and self.out_fp8:  # rows no sequence covers (unvalidated offsets) stay NaN
                out.view(torch.uint8).fill_(0x7F)  # e4m3's NaN
            elif not b.validated:
                out.fill_(float("nan"))
            po = out.data_ptr()
        else:  # out may not share memory with what the kernel reads (spans: from the binding)
            po = out.data_ptr()
            o1 = po + binding.spans[5]
            sq, sk, sv, skn, svn, _ = binding.spans
            if (
                (po < pq + sq and pq < o1)
                or (po < pk + sk and pk < o1)
                or (po < pv + sv and pv < o1)
                or (k_new is not None and po < pkn + skn and pkn < o1)
                or (v_new is not None and po < pvn + svn and pvn < o1)
            ):
                check_no_overlap(out, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k_new": k_new, "v_new": v_new})
        if binding.reference is not None:
            return binding.reference(q, k_cache, v_cache, out, k_new, v_new, scales)
        if binding.fp8:  # Triton's own path (first call per alignment) keys pointers on the dtype
            k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        o = out.view(torch.uint8) if self.out_fp8 else out
        if self.q_fp8:
            q = q.view(torch.uint8)
        ptrs = (pq, po, pk, pv, pkn, pvn, *sptrs)
        tensors = (q, o, k_cache, v_cache, q if k_new is None else k_new, q if v_new is None else v_new, *scales)
        if binding.join:
            self._run_overlapped(binding, ptrs, tensors)
        else:
            for launch in binding.launches:
                launch(ptrs, tensors)
        return out

    def _run_overlapped(self, binding, ptrs, tensors) -> None:
        """A cascade on a GPU: the shared prefix (compute-bound) on a side stream while the
        suffix (bandwidth-bound) runs on the current one; the merge waits for both. The side
        stream first waits for everything queued before (the inputs, and an earlier layer's merge
        still reading the prefix workspace this launch overwrites). Capturable: the fork and the
        join are event waits, which a CUDA graph records as edges."""
        main = torch.cuda.current_stream(self.device)
        side = self._side_stream
        if side is None:
            side = self._side_stream = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        launches, join = binding.launches, binding.join
        with torch.cuda.stream(side):
            launches[0](ptrs, tensors)
        for launch in launches[1:join]:
            launch(ptrs, tensors)
        main.wait_stream(side)
        for launch in launches[join:]:
            launch(ptrs, tensors)

    def _run_scales(self, k_scale, v_scale, q_scale, out_scale) -> tuple:
        """The scales a run() reads, its own where given, and their addresses. An engine passes
        the same per-layer tensors every step: those seen before (the same objects) skip the host
        checks, unless their values are read (checked mode, CPU)."""
        given = (k_scale, v_scale, q_scale, out_scale)
        read_values = self.checked or self.device.type == "cpu"
        key = (id(k_scale), id(v_scale), id(q_scale), id(out_scale))
        seen = self._seen_scales.get(key)
        if seen is not None and not read_values and all(a is b for a, b in zip(seen[0], given)):
            return seen[1]
        scales = check_run_scales(
            given,
            self._scales,
            self._scale_used,
            device=self.device,
            num_kv_heads=self.num_kv_heads,
            read_values=read_values,
        )
        if len(self._seen_scales) >= 4096:  # layers x distinct scale sets: bounded
            self._seen_scales.clear()
        found = (scales, tuple(t.data_ptr() for t in scales))
        self._seen_scales[key] = (given, found)  # holding `given` keeps the ids from being reused
        return found

    def _bind(self, q, k_cache, v_cache, out, k_new, v_new, key, scales) -> _Binding:
        """A binding for a new layout (`key`, from run): from the shared cache of one-shot
        instances when an equal one is there, else full host checks and the launches bound."""
        if not self._share_bindings:
            return self._new_binding(q, k_cache, v_cache, out, k_new, v_new, scales)
        shared_key = self._shared_key(key, q.shape[0], k_cache)
        if shared_key is None:
            return self._new_binding(q, k_cache, v_cache, out, k_new, v_new, scales)
        binding = _SHARED_BINDINGS.get(shared_key)
        if binding is not None:
            if self.checked and self._scan_reads:
                self._check_reads(k_cache, v_cache)
            return binding
        binding = self._new_binding(q, k_cache, v_cache, out, k_new, v_new, scales)
        if binding.reference is None:
            while len(_SHARED_BINDINGS) >= SHARED_BINDINGS_MAX:  # the oldest first
                del _SHARED_BINDINGS[next(iter(_SHARED_BINDINGS))]
            _SHARED_BINDINGS[shared_key] = binding
        return binding

    def _shared_key(self, key, num_tokens: int, k_cache) -> tuple | None:
        """What a binding depends on besides the layout: this object's configuration, the
        addresses (and shapes, strides) of every tensor it binds, and the launches with work.
        Never the metadata values: the kernels read those at launch, and plan() validates them
        per call; nor the scales, passed per call (their shapes, which fix the per-head strides,
        are in the layout key). Every tensor whose address is in the key is held by the binding, so
        no other tensor can take that address while the entry lives. None: do not share (a cascade
        plan, whose launches depend on the step's groups; the reference backend's binding, which is
        this object's own method)."""
        b = self._batch
        if self._cascade is not None:  # its launches depend on the step's shared-prefix groups
            return None
        plan = self._dispatch(num_tokens)
        if plan.kernel == "reference":
            return None
        parts = tuple(p for p in plan.launches if self.cuda_graph or self._has_work(p))
        o = self._kernel_options
        tensors = [b.cu_seqlens_q, b.seq_lens, b.block_table, o["alibi"], o["sinks"]]
        return (
            key,
            parts,
            tuple(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.device) for t in tensors),
            (self.num_q_heads, self.num_kv_heads, self.head_size, self.block_size),
            (self.dtype, self.kv_cache_dtype, self.num_blocks, self.device, self.contract, self.decode_from_cache),
            (self.out_dtype, self.fp8_pv, unified.FP8_CVT_ASM),
            (self.cuda_graph, self.backend, self.options.kv_layout, b.num_tokens, unified.interpreter_enabled()),
            (o["scale"], o["softcap"], o["sliding_window"], o["context"], o["decode_from_cache"]),
        )

    def _new_binding(self, q, k_cache, v_cache, out, k_new, v_new, scales) -> _Binding:
        """Full host checks of a new layout, then the launches with its strides bound."""
        b = self._batch
        check_query(
            q,
            num_q_heads=self.num_q_heads,
            head_size=self.head_size,
            dtype=self.dtype,
            device=self.device,
            num_tokens=b.num_tokens,
        )
        num_tokens = q.shape[0]
        layout = self.options.kv_layout
        check_caches(
            k_cache,
            v_cache,
            kv_layout=layout,
            device=self.device,
            geometry=(self.num_blocks, self.block_size, self.num_kv_heads, self.head_size),
            cache_dtype=self.kv_cache_dtype,
        )
        check_new_kv(
            k_new,
            v_new,
            num_tokens=num_tokens,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            device=self.device,
            context=self.contract == "context",
        )
        if out is not None:
            check_out(out, q, self.out_dtype)
        # byte spans of (q, k_cache, v_cache, k_new, v_new, out) from their data_ptr, for run's overlap test
        spans = tuple(0 if t is None else extent(t)[1] - t.data_ptr() for t in (q, k_cache, v_cache, k_new, v_new, out))
        if out is not None:
            check_no_overlap(out, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k_new": k_new, "v_new": v_new})
        if self.checked and self._scan_reads:
            self._check_reads(k_cache, v_cache)
        num_blocks = self.num_blocks
        if num_blocks is None:
            num_blocks = cache_geometry(k_cache, v_cache, layout)[0]
        plan = self._dispatch(num_tokens)
        if plan.kernel == "reference":
            return _Binding([], spans, False, reference=self._reference)
        fp8 = k_cache.dtype in FP8_DTYPES
        kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
        head_pad = unified.head_pad_for(self.head_size)
        k_strides, k_x, v_strides = cache_strides(kc, vc, layout, head_pad)
        o_strides = q.stride() if out is None else out.stride()  # out=None: a contiguous tensor like q
        if out is None and not q.is_contiguous():
            o_strides = torch.empty(q.shape, dtype=q.dtype, device="meta").stride()
        zero = (0, 0, 0)
        strides = (
            q.stride(),
            o_strides,
            k_strides,
            v_strides,
            zero if k_new is None else k_new.stride(),
            zero if v_new is None else v_new.stride(),
        )
        parts = [p for p in plan.launches if self.cuda_graph or self._has_work(p)]
        idx64 = max(kc.numel(), vc.numel(), extent(kc)[1] - kc.data_ptr(), extent(vc)[1] - vc.data_ptr()) >= 2**31
        shapes = (
            num_tokens,
            self.num_q_heads,
            self.num_kv_heads,
            self.head_size,
            self.block_size,
            k_x,
            num_blocks,
            self.dtype,
            k_cache.dtype,
        )
        scale_strides = (int(scales[0].shape[0] > 1), int(scales[1].shape[0] > 1))
        metadata, prefix, merge = (b.cu_seqlens_q, b.seq_lens, b.block_table), [], None
        c = self._cascade
        if c is not None:  # the shared prefix once per group, each sequence's suffix, the merge
            metadata = (b.cu_seqlens_q, c.seq_lens, c.block_table)
            options = dict(
                self._kernel_options,
                suffix=(b.cu_seqlens_q, c.seq_lens, c.shared, c.block_table.shape[1] * self.block_size),
            )
            launch, merge = cascade_kernels.bind_cascade(
                c.launch,
                strides=strides,
                shapes=shapes,
                groups=c.packed,
                num_groups=c.capacity,
                block_table=b.block_table,
                options=options,
                idx64=idx64,
                device=self.device,
                scale_strides=scale_strides,
            )
            prefix = [launch]
        launches = prefix + unified.bind_attention(
            parts,
            strides=strides,
            shapes=shapes,
            metadata=metadata,
            options=self._kernel_options,
            idx64=idx64,
            device=self.device,
            out_dtype=self.out_dtype,
            new_dtype=None if k_new is None else k_new.dtype,
            scale_strides=scale_strides,
            fp8_pv=self.fp8_pv,
            partials=merge,
        )
        join = 0
        if prefix and self.device.type == "cuda" and not unified.interpreter_enabled():
            join = next(i for i, launch in enumerate(launches) if launch.kernel is cascade_kernels.MERGE)
        return _Binding(launches, spans, fp8, join=join)

    def _check_reads(self, k_cache, v_cache) -> None:
        from . import checks  # checked mode only

        b = self._batch
        k, v = nhd_views(k_cache, v_cache, self.options.kv_layout)
        checks.check_cache_finite(
            k,
            v,
            b.cu_seqlens_q,
            b.seq_lens,
            b.block_table,
            contract=self.contract,
            decode_from_cache=self.decode_from_cache,
            query_lens_host=None if b.query_lens is None else b.query_lens.tolist(),
            seq_lens_host=None if b.seq_lens_host is None else b.seq_lens_host.tolist(),
        )

    def _reference(self, q, k_cache, v_cache, out, k_new, v_new, scales) -> torch.Tensor:
        b = self._batch
        o = self.options
        k_scale, v_scale, q_scale, out_scale = scales
        ref = reference.attention(
            q,
            *nhd_views(k_cache, v_cache, o.kv_layout),
            b.cu_seqlens_q,
            b.seq_lens,
            b.block_table,
            scale=self.scale,
            sliding_window=o.sliding_window,
            alibi_slopes=o.alibi_slopes,
            softcap=o.softcap,
            sinks=o.sinks,
            k_scale=k_scale,
            v_scale=v_scale,
            q_scale=q_scale if self.q_fp8 else None,
            k_new=k_new,
            v_new=v_new,
            decode_from_cache=self.decode_from_cache,
        )
        if self.out_fp8:  # out / out_scale, saturated and rounded as the kernels store it
            ref = reference.quantize_output(ref, out_scale, self.out_dtype)
        out.copy_(ref)
        return out
