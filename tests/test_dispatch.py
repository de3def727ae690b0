"""The dispatch rules, pinned: which kernel and parameters for which batch, and why."""

from __future__ import annotations

import torch

from pagedattn import dispatch
from pagedattn.cli import main as cli_main
from pagedattn.config import AttentionConfig, BatchShape, seed_grid

H100 = "cuda"  # planning never touches the device; sm_count falls back to 132 without CUDA
GQA4 = AttentionConfig(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, dtype=torch.bfloat16)


def plan(config, shape, **kw):
    dispatch.sm_count.cache_clear()
    return dispatch.plan_for(config, shape, device=H100, **kw)


def test_long_context_decode_splits_keys_to_fill_the_sms(monkeypatch):
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 132)
    p = dispatch.plan_for(GQA4, BatchShape((1,) * 4, (32767,) * 4), device=H100)
    assert p.kernel == "split_kv" and p.phase == "decode"
    assert p.num_splits > 1 and p.partition_size % p.block_n == 0
    assert p.num_splits * p.partition_size >= 32768
    low, high = dispatch.SPLIT_PROGRAMS_PER_SM
    assert low * 132 <= 4 * 8 * p.num_splits <= high * 132  # one wave of at least 2 programs per SM
    assert "32 programs would leave most of 132 SMs idle" in p.rule
    # the measured best on the H100 (run 11): 12 splits of 2752 keys, 384 programs, 2.91 per SM
    assert (p.num_splits, p.partition_size) == (12, 2752)


def test_split_count_spreads_programs_evenly_over_the_sms():
    assert dispatch.spread(384, 132) == 384 / 396 and dispatch.spread(264, 132) == 1.0
    # 32 (sequence, KV head) items on 132 SMs: of 9..12 splits (288..384 programs), 12 is the most even
    splits, _, _ = dispatch.choose_splits(num_seqs=4, num_kv_heads=8, max_seq_len=32768, block_n=64, sm_count=132)
    assert splits == 12
    # a tie goes to fewer splits (fewer partials to merge): 8 items on 8 SMs fill them at 2 and at 3 per SM
    splits, _, _ = dispatch.choose_splits(num_seqs=1, num_kv_heads=8, max_seq_len=32768, block_n=64, sm_count=8)
    assert splits == 2
    # the length caps the split: partitions never cover fewer than PARTITION_MIN_TOKENS keys
    splits, partition, why = dispatch.choose_splits(
        num_seqs=1, num_kv_heads=1, max_seq_len=1024, block_n=64, sm_count=132
    )
    assert splits == 1024 // dispatch.PARTITION_MIN_TOKENS and partition == 256
    assert "allows no more partitions" in why
    # enough (sequence, KV head) items already: no split
    assert dispatch.choose_splits(num_seqs=33, num_kv_heads=8, max_seq_len=32768, block_n=64, sm_count=132)[0] == 1


def test_many_decodes_need_no_split(monkeypatch):
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 132)
    p = dispatch.plan_for(GQA4, BatchShape((1,) * 64, (4095,) * 64), device=H100)
    assert p.kernel == "unified" and p.num_splits == 1
    assert p.block_m == 16 and p.block_q == 4  # 4 query heads of one KV head share a 16-row tile


def test_short_decode_is_not_split_below_two_partitions(monkeypatch):
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 132)
    p = dispatch.plan_for(GQA4, BatchShape((1,), (300,)), device=H100)
    assert p.num_splits == 1 and "too short to split" in p.rule


def test_prefill_uses_large_tiles_and_packs_query_heads():
    p = plan(GQA4, BatchShape((4096,) * 4, (0,) * 4))
    assert (p.kernel, p.phase) == ("unified", "prefill")
    assert (p.block_m, p.block_q, p.block_n) == (128, 32, 128)


def test_large_gqa_ratio_gets_a_tile_per_token():
    mqa = AttentionConfig(num_q_heads=64, num_kv_heads=1, head_size=128, dtype=torch.float16)
    p = plan(mqa, BatchShape((100, 1), (0, 50)))
    assert p.block_m >= 64 and p.block_q == p.block_m // 64


def test_fp8_decode_reads_twice_the_keys_per_tile():
    bf16 = plan(GQA4, BatchShape((1,) * 64, (4095,) * 64))
    fp8 = plan(GQA4.replace(kv_dtype="fp8_e4m3"), BatchShape((1,) * 64, (4095,) * 64))
    assert fp8.block_n == 2 * bf16.block_n


def test_context_contract_never_splits():
    p = plan(GQA4, BatchShape((1,) * 4, (32767,) * 4), context_contract=True)
    assert p.num_splits == 1


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = dispatch.plan_for(GQA4, BatchShape((5,), (0,)), device="cpu")
    assert p.kernel == "reference" and "TRITON_INTERPRET" in p.rule


def test_same_shapes_same_plan_for_every_seed_grid_case():
    for case in seed_grid():
        assert plan(case.config, case.shape) == plan(
            case.config, BatchShape(case.shape.query_lens, case.shape.ctx_lens)
        )


def test_explain_names_kernel_parameters_and_rule(monkeypatch):
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 132)
    text = dispatch.explain(GQA4.replace(num_q_heads=8), BatchShape((1,) * 4, (32767,) * 4), device=H100)
    assert "num_queries_per_kv=1" in text and "head_size=128" in text and "split_kv" in text
    assert "partitions of" in text and "132 SMs" in text


def test_explain_cli_prints_the_vllm_grid_table(capsys):
    assert cli_main(["explain", "--vllm-grid"]) == 0
    out = capsys.readouterr().out
    assert out.count("h64/") == len(seed_grid())
    assert "unified" in out


def test_mixed_batch_runs_decodes_in_their_own_decode_tiles(monkeypatch):
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 132)
    p = dispatch.plan_for(GQA4, BatchShape((2048,) + (1,) * 63, (2048,) + (2047,) * 63), device=H100)
    assert p.phase == "prefill" and p.decode_part is not None
    assert p.decode_part.phase == "decode" and p.decode_part.block_m == 16
    # the two launches partition the sequences by query length, with no gap and no overlap
    assert p.min_query_len == p.decode_part.max_query_len + 1 and p.decode_part.min_query_len == 0
    assert "second launch" in p.rule


def test_decode_only_plan_is_one_tile_per_sequence():
    p = plan(GQA4, BatchShape((1,) * 8, (100,) * 8))
    assert p.decode_part is None and p.phase == "decode" and p.block_q >= 1
