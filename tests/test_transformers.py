"""pagedattn inside Hugging Face transformers' continuous batching (pagedattn.integrations.transformers).

Tiny random-weight models built from configs (no download): greedy `generate_batch` through
pagedattn gives exactly the tokens of transformers' `generate()` with sdpa, for prompts of mixed
lengths that are prefilled in chunks while other requests decode. On CPU the kernels run through
the Triton interpreter (TRITON_INTERPRET=1). Skipped when transformers is not installed.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pagedattn.errors import ContractError, UnsupportedConfigError  # noqa: E402
from pagedattn.integrations import transformers as pa_hf  # noqa: E402
from pagedattn.integrations import transformers_harness as harness  # noqa: E402

SUPPORTED = (
    pa_hf._version_tuple(pa_hf.SUPPORTED_RANGE[0])
    <= pa_hf._version_tuple(transformers.__version__)
    < pa_hf._version_tuple(pa_hf.SUPPORTED_RANGE[1])
)
requires_supported = pytest.mark.skipif(
    not SUPPORTED, reason=f"transformers {transformers.__version__} is outside {pa_hf.SUPPORTED_RANGE}"
)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["5.16.1", "5.18.0", "5.19.0", "5.24.0", "4.57.6", "6.0.0"])
def test_unsupported_versions_are_refused_naming_the_range(version):
    with pytest.raises(pa_hf.TransformersVersionError, match=r">=5\.17\.0,<5\.18\.0") as info:
        pa_hf.check_transformers_version(version)
    assert version in str(info.value)


@pytest.mark.parametrize("version", ["5.17.0", "5.17.1", "5.17.0.dev0"])
def test_supported_versions_pass(version):
    pa_hf.check_transformers_version(version)


@requires_supported
def test_register_returns_the_name_transformers_resolves():
    from transformers import AttentionInterface

    name = pa_hf.register()
    assert name == "paged|pagedattn"
    assert AttentionInterface()[name] is pa_hf.paged_attention_forward
    with pytest.raises(UnsupportedConfigError, match="'paged\\|'"):
        pa_hf.register("pagedattn")


@requires_supported
def test_without_the_paged_cache_the_function_refuses():
    module = torch.nn.Module()
    module.layer_idx = 0
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(UnsupportedConfigError, match="paged cache"):
        pa_hf.paged_attention_forward(module, q, q[:, :2], q[:, :2], None)


# ---------------------------------------------------------------------------------------------
# metadata: transformers' own allocators produce the slot lists; the derived block tables must
# reproduce every slot (verify_block_table), padding sequences included
# ---------------------------------------------------------------------------------------------
def _allocators(block_size, window):
    from transformers.generation.continuous_batching.cache_manager import (
        BlockManager,
        FullAttentionCacheAllocator,
        SlidingAttentionCacheAllocator,
    )

    num_blocks = 256
    manager = BlockManager(num_blocks, block_size, tp_on=False)
    full = FullAttentionCacheAllocator(0, block_size, allow_block_sharing=False)
    sentinel, trash = num_blocks * block_size + 1, (num_blocks + 1) * block_size
    sliding = SlidingAttentionCacheAllocator(1, block_size, window, sentinel, trash)
    return manager, full, sliding


# (past_length, query_length) per request: fresh prefills, chunks, decodes, ring wrap-arounds
REQUESTS = [(0, 5), (7, 1), (40, 9), (31, 1), (100, 1), (64, 30), (3, 50), (95, 17)]


@requires_supported
@pytest.mark.parametrize("padding", [0, 3])
def test_block_tables_reproduce_transformers_slot_lists(padding):
    block_size, window = 8, 32
    manager, full, sliding = _allocators(block_size, window)
    reads = {"full": [], "sliding": []}
    cu_q, cu_full, cu_sliding = [0], [0], [0]
    for i, (past, q) in enumerate(REQUESTS):
        rid = f"r{i}"
        for alloc in (full, sliding):
            alloc.allocate_blocks(-(-(past + q) // block_size), rid, manager)
        # scramble the free list between requests so block ids are not consecutive
        manager.get_free_blocks(1, None, False, 0)
        reads["full"] += full.get_read_indices(rid, past, q)
        reads["sliding"] += sliding.get_read_indices(rid, past, q)
        cu_q.append(cu_q[-1] + q)
        cu_full.append(cu_full[-1] + past + q)
        cu_sliding.append(cu_sliding[-1] + q + min(past, window - 1))
    for cu in (cu_q, cu_full, cu_sliding):  # CUDA-graph padding: empty sequences at the end
        cu += [cu[-1]] * padding
    trash = [256 * block_size] * padding
    cu_q, cu_full, cu_sliding = (torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_full, cu_sliding))
    full_slots = torch.tensor(reads["full"] + trash)
    sliding_slots = torch.tensor(reads["sliding"] + trash)

    seq_lens, bt = pa_hf.full_attention_metadata(
        full_slots, cu_full, block_size, max_seq_len=int((cu_full[1:] - cu_full[:-1]).max())
    )
    assert seq_lens.tolist() == [p + q for p, q in REQUESTS] + [0] * padding
    pa_hf.verify_block_table(full_slots, cu_full[:-1], seq_lens, torch.zeros_like(seq_lens), bt, block_size)

    max_k = int((cu_sliding[1:] - cu_sliding[:-1]).max())
    seq_lens, bt, max_seq_len = pa_hf.sliding_window_metadata(
        sliding_slots, cu_q, cu_sliding, block_size, window, max_k
    )
    query_lens = cu_q[1:] - cu_q[:-1]
    cached = cu_sliding[1:] - cu_sliding[:-1] - query_lens
    assert cached.tolist() == [min(p, window - 1) for p, _ in REQUESTS] + [0] * padding
    assert int(seq_lens.max()) <= max_seq_len
    v0 = seq_lens - query_lens - cached
    assert ((v0 >= 0) & (v0 < block_size)).all()
    pa_hf.verify_block_table(sliding_slots, cu_sliding[:-1], cached, v0, bt, block_size)
    # the window of every query starts at or after v0: keys before it are never visible
    assert ((seq_lens - query_lens) - (window - 1) >= v0)[cached == window - 1].all()


@requires_supported
def test_a_wrong_block_table_is_caught():
    slots = torch.tensor([16, 17, 18, 40, 41])
    bt = torch.tensor([[2, 6]], dtype=torch.int32)  # position 3 should be block 5 (slot 40)
    with pytest.raises(ContractError, match="position 3 maps to slot 19 .* says 40"):
        pa_hf.verify_block_table(slots, torch.tensor([0]), torch.tensor([5]), torch.tensor([0]), bt, 8)


@requires_supported
def test_window_not_a_multiple_of_the_block_size_is_refused():
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(UnsupportedConfigError, match=r"sliding_window \(24\) must be a multiple.*\(16\)"):
        pa_hf.sliding_window_metadata(torch.tensor([0]), cu, cu, 16, 24, 1)


# ---------------------------------------------------------------------------------------------
# end to end: generate_batch through pagedattn == generate() with sdpa
# ---------------------------------------------------------------------------------------------
PROMPT_LENGTHS = [5, 37, 70]  # 70 > max_batch_tokens and > the window: chunked prefill
NEW_TOKENS = 4
CB_OPTIONS = dict(block_size=16, num_blocks=64, max_batch_tokens=48)
TOLERANCE = {torch.float32: 1e-4}  # |logprob difference| of the chosen tokens


@requires_supported
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-sliding", "neox-mha"])
def test_generate_batch_matches_generate(kind, monkeypatch):
    plans, calls = [], []
    group_plan, forward = pa_hf._group_plan, pa_hf.paged_attention_forward
    monkeypatch.setattr(pa_hf, "_group_plan", lambda *a: plans.append(a[1]) or group_plan(*a))
    windows, sliding_metadata = [], pa_hf.sliding_window_metadata

    def recording_sliding_metadata(read, cu_q, cu_k, *rest):
        query_lens = cu_q[1:] - cu_q[:-1]
        windows.extend(zip(query_lens.tolist(), (cu_k[1:] - cu_k[:-1] - query_lens).tolist()))
        return sliding_metadata(read, cu_q, cu_k, *rest)

    monkeypatch.setattr(pa_hf, "sliding_window_metadata", recording_sliding_metadata)

    def counting_forward(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return forward(module, *args, **kwargs)

    from transformers import AttentionInterface

    name = pa_hf.register(checked=True)
    AttentionInterface.register(name, counting_forward)

    config = harness.model_config(kind)
    model = harness.build_model(config, dtype=torch.float32)
    prompts = harness.make_prompts(PROMPT_LENGTHS, config.vocab_size)
    reference = harness.reference_generate(model, prompts, NEW_TOKENS)
    got = harness.batch_generate(model, name, prompts, NEW_TOKENS, **CB_OPTIONS)

    result = harness.compare(got, reference)
    assert result.all_identical, result.summary()
    assert result.max_logprob_diff <= TOLERANCE[torch.float32], result.summary()
    # metadata once per step and layer group, not once per layer
    num_groups = 2 if kind == "qwen2-sliding" else 1
    steps = len(calls) // config.num_hidden_layers
    assert steps >= NEW_TOKENS + 1 and len(plans) == steps * num_groups
    if kind == "qwen2-sliding":  # the case a write-then-read order gets wrong: a chunk over a full window
        window = config.sliding_window
        assert any(q > 1 and cached == window - 1 for q, cached in windows), windows
