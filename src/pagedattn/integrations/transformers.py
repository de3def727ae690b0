"""pagedattn as a paged attention implementation of Hugging Face transformers' continuous batching.

    import pagedattn.integrations.transformers as pa_hf
    name = pa_hf.register()                        # "paged|pagedattn"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)   # or set_attn_implementation
    outputs = model.generate_batch(prompts, generation_config)

What transformers 5.17 hands a registered `paged|<name>` function, once per layer per step
(`generation/continuous_batching/input_outputs.py: get_model_kwargs`):
    query, key, value   [1, num_heads, num_tokens, head_size]: the step's tokens, packed
    cache               PagedAttentionCache; layer l of layer group g stores its K/V in
                        cache.key_cache[j] / value_cache[j] ((g, j) = layer_index_to_group_indices[l]),
                        [(num_blocks + 2) * block_size, num_kv_heads, head_size]: viewed as
                        [-1, block_size, num_kv_heads, head_size] it is pagedattn's "nhd" layout
    cu_seq_lens_q       [num_seqs + 1] int32
    cu_seq_lens_k       [num_seqs + 1] int32 (a dict by layer type when full and sliding layers mix)
    max_seqlen_q / _k   host ints (max_seqlen_k a dict like cu_seq_lens_k)
    write_index[g]      [num_tokens] int64: the cache row (slot = block * block_size + offset) of
                        each new token; padding and tokens that fall out of a window go to a trash
                        block that is never read
    read_index[g]       the cache rows to read, per sequence in batch order (cu_seq_lens_k): for
                        full attention the slots of positions 0..seq_len-1 (new tokens included);
                        for sliding attention the min(past, window - 1) newest cached positions in
                        ring order, then one sentinel per new token. Empty when no sequence has a
                        past (first prefills only).
    block_table         None (transformers fills it only for its flash decode fast path)
The function must write the new K/V itself and return [1, num_tokens, num_heads, head_size].

How the slot lists become pagedattn metadata, with no copy of the cache and no device sync:
- Full attention: transformers reads whole blocks in order (positions 0..seq_len-1 of a sequence
  occupy its blocks b0, b1, ... from offset 0), so the slot of position p is
  block_table[p // block_size] * block_size + p % block_size exactly, and the block table is the
  slots at p = 0, block_size, 2 * block_size, ... divided by block_size. The new K/V are written
  first (write kernel, in place), then a `PagedAttention` (full-cache contract) reads the cache:
  planned by the step's first layer of each cache group, `run` by every layer.
- Sliding window: each sequence owns window / block_size blocks used as a ring. Writing first
  would overwrite keys that earlier queries of a chunk still need, so these layers use the
  context-cache contract (a `PagedAttention` with contract="context"): the cached window is read
  through the ring, the new
  tokens' K/V come from the projections, and the write follows the attention. The ring is a
  block table in shifted coordinates: the first cached key sits at virtual position
  v0 = its slot % block_size, key i at v0 + i; when window % block_size == 0 every block
  boundary of the ring falls on a multiple of block_size, so block j of the virtual sequence is
  the block of key j * block_size - v0. Keys before v0 are outside every query's window.
  A window that is not a multiple of the block size is refused (UnsupportedConfigError).
The metadata is built once per generation step (the first layer to see a step's cu_seq_lens_q
tensor) and reused by every layer of that layer group; all of it is device-side tensor algebra,
so a captured CUDA graph replays it with the next step's indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedConfigError
from ..options import AttentionOptions
from ..planner import PagedAttention

SUPPORTED_RANGE = ("5.17.0", "5.18.0")  # [first supported, first unsupported)
DEFAULT_NAME = "paged|pagedattn"


class TransformersVersionError(UnsupportedConfigError):
    """The installed transformers has a continuous batching interface this integration does not speak."""


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if not piece.isdigit() else piece
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # 5.18.0.dev0, 5.17.0rc1: stop at the pre-release tag
            break
    return tuple(parts)


def check_transformers_version(version: str) -> None:
    """Raise TransformersVersionError unless `version` is in SUPPORTED_RANGE."""
    low, high = (_version_tuple(v) for v in SUPPORTED_RANGE)
    if not low <= _version_tuple(version) < high:
        raise TransformersVersionError(
            f"transformers {version} is not supported: pagedattn's continuous batching integration needs "
            f">={SUPPORTED_RANGE[0]},<{SUPPORTED_RANGE[1]} (pip install 'pagedattn[transformers]'). "
            "5.18 moved the paged cache into per-group allocators; 5.19-5.23 accept only 'paged|eager', "
            "'sdpa' or flash implementations for continuous batching; from 5.24 the model writes and "
            "gathers the cache before calling the attention function (see docs/transformers.md)."
        )


_CHECKED = False


def register(name: str = DEFAULT_NAME, *, checked: bool = False) -> str:
    """Register pagedattn with transformers' AttentionInterface under `name` ("paged|..." so that
    continuous batching hands it the paged cache) and return the name, for
    `attn_implementation=` / `model.set_attn_implementation`. `checked=True` verifies, every step,
    that the block tables derived from transformers' slot lists reproduce those slots exactly
    (one device sync per step and layer group: for tests)."""
    global _CHECKED
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise TransformersVersionError(
            f"transformers is not installed: pip install 'pagedattn[transformers]' "
            f"(>={SUPPORTED_RANGE[0]},<{SUPPORTED_RANGE[1]})"
        ) from exc
    check_transformers_version(transformers.__version__)
    if not name.startswith("paged|"):
        raise UnsupportedConfigError(f"name must start with 'paged|' (continuous batching's prefix), got {name!r}")
    from transformers import AttentionInterface

    _CHECKED = checked
    AttentionInterface.register(name, paged_attention_forward)
    return name


# ---------------------------------------------------------------------------------------------
# metadata: transformers' slot lists -> seq_lens + block_table (device only, no sync)
# ---------------------------------------------------------------------------------------------
def full_attention_metadata(
    slots: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_lens [num_seqs] int32, block_table [num_seqs, max_blocks_per_seq] int32) from the slots
    of positions 0..seq_len-1 of each sequence, laid out back to back as cu_seqlens_k says."""
    seq_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    max_blocks_per_seq = max(1, -(-max_seq_len // block_size))
    starts = cu_seqlens_k[:-1].long()
    key = torch.arange(max_blocks_per_seq, device=slots.device) * block_size  # first position of block j
    valid = key[None, :] < seq_lens[:, None]
    return seq_lens, _gather_blocks(slots, starts[:, None] + key[None, :], valid, block_size)


def sliding_window_metadata(
    read_slots: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    sliding_window: int,
    max_seqlen_k: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(seq_lens, block_table, max_seq_len) in shifted coordinates for the context-cache contract:
    sequence i has ctx_len = v0 + cached keys, where its cached key c sits at virtual position
    v0 + c and v0 = (slot of its first cached key) % block_size; its query tokens follow."""
    if sliding_window % block_size:
        raise UnsupportedConfigError(
            f"sliding_window ({sliding_window}) must be a multiple of the cache's block_size ({block_size}): "
            "transformers keeps a window's keys in a ring of blocks, which is a block table only when ring "
            "and block boundaries coincide (set ContinuousBatchingConfig(block_size=...) to a divisor)"
        )
    query_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    cached = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]) - query_lens  # <= window - 1
    starts = cu_seqlens_k[:-1].long()
    if read_slots.numel():
        first = read_slots[starts.clamp(max=read_slots.numel() - 1)]
        v0 = torch.where(cached > 0, first % block_size, 0).to(cached.dtype)
    else:
        v0 = torch.zeros_like(cached)
    ctx_lens = v0 + cached
    max_ctx = block_size - 1 + min(max_seqlen_k, sliding_window - 1)
    max_blocks_per_seq = max(1, -(-max_ctx // block_size))
    key = torch.arange(max_blocks_per_seq, device=cu_seqlens_q.device) * block_size
    valid = key[None, :] < ctx_lens[:, None]
    index = starts[:, None] + (key[None, :] - v0[:, None].long()).clamp(min=0)
    block_table = _gather_blocks(read_slots, index, valid, block_size)
    return (ctx_lens + query_lens).to(torch.int32), block_table, block_size - 1 + max_seqlen_k


def _gather_blocks(slots: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, block_size: int) -> torch.Tensor:
    if slots.numel() == 0:
        return torch.zeros(index.shape, dtype=torch.int32, device=index.device)
    blocks = slots[index.clamp(0, slots.numel() - 1)] // block_size
    return torch.where(valid, blocks, 0).to(torch.int32)


def verify_block_table(
    slots: torch.Tensor, starts, lengths, first_pos, block_table: torch.Tensor, block_size: int
) -> None:
    """Checked mode: position first_pos[i] + c of sequence i maps through block_table to
    slots[starts[i] + c] for every c < lengths[i]. One device sync; raises ContractError."""
    from ..errors import ContractError

    for i, (start, length, v0) in enumerate(zip(starts.tolist(), lengths.tolist(), first_pos.tolist())):
        if length == 0:
            continue
        pos = torch.arange(v0, v0 + length, device=slots.device)
        mapped = block_table[i, pos // block_size].long() * block_size + pos % block_size
        expected = slots[start : start + length]
        bad = (mapped != expected).nonzero()
        if bad.numel():
            c = int(bad[0, 0])
            raise ContractError(
                f"sequence {i}: position {v0 + c} maps to slot {int(mapped[c])} through the derived block table, "
                f"transformers' slot list says {int(expected[c])}"
            )


# ---------------------------------------------------------------------------------------------
# the step plan: built by the first layer of a step, reused by the others
# ---------------------------------------------------------------------------------------------
@dataclass
class GroupPlan:
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int
    sliding_window: int  # 0: full attention (full-cache contract); > 0: context-cache contract
    planners: dict = field(default_factory=dict)  # one planned PagedAttention per (scale, dtypes, heads)

    def planner(self, q: torch.Tensor, k_cache: torch.Tensor, scaling: float | None) -> PagedAttention:
        """The step's PagedAttention for these layers: planned by the first layer, run by every layer."""
        key = (scaling, q.dtype, k_cache.dtype, q.shape[1], k_cache.shape[2], q.shape[2])
        attn = self.planners.get(key)
        if attn is None:
            attn = PagedAttention(
                AttentionOptions(scale=scaling, sliding_window=self.sliding_window or None),
                num_q_heads=q.shape[1],
                num_kv_heads=k_cache.shape[2],
                head_size=q.shape[2],
                block_size=k_cache.shape[1],
                dtype=q.dtype,
                kv_cache_dtype=k_cache.dtype,
                device=q.device,
                contract="context" if self.sliding_window else "full",
            )
            attn.plan(
                self.cu_seqlens_q,
                self.seq_lens,
                self.block_table,
                max_query_len=self.max_query_len,
                max_seq_len=self.max_seq_len,
            )
            self.planners[key] = attn
        return attn


@dataclass
class _Step:
    cu_seqlens_q: torch.Tensor  # identity of the step: transformers makes new views every step
    capturing: bool  # a plan made outside a CUDA graph capture is not replayed by it
    groups: dict


def _layer_type(sliding_window: int) -> str:
    return "full_attention" if sliding_window <= 1 else "sliding_attention"


def _per_type(value, layer_type: str):
    return value[layer_type] if isinstance(value, dict) else value


def _group_plan(cache, group: int, sliding_window: int, kwargs) -> GroupPlan:
    layer_type = _layer_type(sliding_window)
    cu_q = kwargs["cu_seq_lens_q"]
    cu_k = _per_type(kwargs["cu_seq_lens_k"], layer_type)
    max_q = int(kwargs["max_seqlen_q"])
    max_k = int(_per_type(kwargs["max_seqlen_k"], layer_type))
    read, write = kwargs["read_index"][group], kwargs["write_index"][group]
    bs = cache.block_size
    if layer_type == "full_attention":
        # no past anywhere: read_index is empty and the written slots are positions 0..q-1
        slots = read if read.numel() else write
        seq_lens, block_table = full_attention_metadata(slots, cu_k, bs, max_k)
        if _CHECKED:
            verify_block_table(slots, cu_k[:-1], seq_lens, torch.zeros_like(seq_lens), block_table, bs)
        return GroupPlan(cu_q, seq_lens, block_table, max_q, max_k, 0)
    seq_lens, block_table, max_seq_len = sliding_window_metadata(read, cu_q, cu_k, bs, sliding_window, max_k)
    if _CHECKED and read.numel():
        query_lens = cu_q[1:] - cu_q[:-1]
        ctx = seq_lens - query_lens
        cached = cu_k[1:] - cu_k[:-1] - query_lens
        verify_block_table(read, cu_k[:-1], cached, ctx - cached, block_table, bs)
    return GroupPlan(cu_q, seq_lens, block_table, max_q, max_seq_len, sliding_window)


def _plan_for(cache, group: int, sliding_window: int, kwargs) -> GroupPlan:
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    step = getattr(cache, "_pagedattn_step", None)
    if step is None or step.cu_seqlens_q is not kwargs["cu_seq_lens_q"] or step.capturing != capturing:
        step = _Step(kwargs["cu_seq_lens_q"], capturing, {})
        cache._pagedattn_step = step
    plan = step.groups.get(group)
    if plan is None:
        plan = step.groups[group] = _group_plan(cache, group, sliding_window, kwargs)
    return plan


# ---------------------------------------------------------------------------------------------
# the attention function transformers calls
# ---------------------------------------------------------------------------------------------
def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers' AttentionInterface signature; query/key/value [1, heads, num_tokens, head_size].
    Returns ([1, num_tokens, num_q_heads, head_size], None)."""
    from ..kernels.write import write_kv

    cache = kwargs.get("cache")
    if cache is None:
        raise UnsupportedConfigError(
            "pagedattn's transformers attention needs continuous batching's paged cache (generate_batch / "
            "ContinuousBatchingManager); for a plain forward or generate() use 'sdpa'"
        )
    if dropout:
        raise UnsupportedConfigError(f"dropout must be 0 for paged attention, got {dropout}")
    for feature in ("s_aux", "softcap"):
        if kwargs.get(feature) is not None:
            raise UnsupportedConfigError(
                f"the model passes {feature!r} to its attention; this integration does not forward it yet"
            )
    if kwargs.get("block_table") is not None:
        raise UnsupportedConfigError("transformers' flash decode fast path (block_table) is not used with pagedattn")
    layer_idx = module.layer_idx
    group, in_group = cache.layer_index_to_group_indices[layer_idx]
    sliding_window = cache.sliding_windows[layer_idx]
    plan = _plan_for(cache, group, sliding_window, kwargs)

    bs, num_kv_heads, head_size = cache.block_size, key.shape[1], key.shape[3]
    k_cache = cache.key_cache[in_group].view(-1, bs, num_kv_heads, head_size)
    v_cache = cache.value_cache[in_group].view(-1, bs, num_kv_heads, head_size)
    q = query[0].transpose(0, 1)  # [num_tokens, num_q_heads, head_size] (strided view)
    k = key[0].transpose(0, 1)  # [num_tokens, num_kv_heads, head_size]
    v = value[0].transpose(0, 1)
    write_index = kwargs["write_index"][group]
    # rows of padding tokens (CUDA-graph padding) belong to no sequence: zeros, not garbage
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    attn = plan.planner(q, k_cache, scaling)  # planned once per step and group; this layer only runs it
    if plan.sliding_window == 0:
        write_kv(k, v, k_cache, v_cache, write_index)
        attn.run(q, k_cache, v_cache, out=out)
    else:
        attn.run(q, k_cache, v_cache, out=out, k_new=k, v_new=v)
        write_kv(k, v, k_cache, v_cache, write_index)
    return out.unsqueeze(0), None
