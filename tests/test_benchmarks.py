"""`pagedattn bench` on the CPU: the accounting, the dry run, the roofline plot, the tables, and the
refusal without CUDA. The GPU path is exercised with a fake timer over the reference backend."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

from pagedattn.bench import host, runner
from pagedattn.bench.plot import roofline
from pagedattn.bench.workloads import DECODE_BASE, PREFILL_BASE, build_paged, load_workloads, sweeps
from pagedattn.cli import bench as bench_cli

WORKLOADS = load_workloads()
BY_NAME = {w.name: w for w in WORKLOADS}
CEILINGS = dict(read_tbs=3.0, copy_tbs=2.9, mm_tflops=680.0)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run thousands of tiny CPU ops; extra threads only contend (10x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_workloads_json_is_a_copy_of_the_shared_one():
    from pathlib import Path

    from pagedattn.bench.workloads import WORKLOADS_JSON

    shared = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workloads.json"
    if not shared.exists():
        pytest.skip("no ../shared checkout here (the GPU machine gets only the repository)")
    assert json.loads(WORKLOADS_JSON.read_text()) == json.loads(shared.read_text())


def test_every_standard_workload_is_there():
    assert list(BY_NAME) == [
        "decode-b64-ctx4k",
        "decode-b256-ctx1k",
        "decode-b4-ctx32k",
        "decode-mha-b32-ctx2k",
        "prefill-b4-4k",
        "prefix-prefill-b4-q1k-ctx4k",
        "mixed-chunk2k-plus-63dec",
        "seed-mixed-h64-g1",
    ]


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.name)
def test_accounting_reproduces_workloads_json(w):
    assert w.kv_bytes_bf16 == w.expected_kv_bytes_bf16
    assert w.kv_bytes == w.expected_kv_bytes_bf16  # the standard workloads are bf16
    assert w.flops == w.expected_flops
    # the anchors' derived rates were computed with the same byte and flop counts
    for name, anchor in w.anchors.items():
        if "tb_per_s" in anchor and "page_size" not in anchor:
            assert w.kv_bytes / anchor["ms"] / 1e9 == pytest.approx(anchor["tb_per_s"], rel=0.01, abs=1e-3), name
        if "tflop_per_s" in anchor:
            assert w.flops / anchor["ms"] / 1e9 == pytest.approx(anchor["tflop_per_s"], rel=0.01, abs=0.05), name


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.name)
def test_accounting_matches_counting_on_built_inputs(w):
    small = w.scaled(64)
    counted = runner.count_accounting(small)
    assert counted["slots_distinct"], "two sequences (or two rotation sets) share a cache slot"
    assert counted["kv_bytes"] == small.kv_bytes
    assert counted["pairs"] == small.pairs


def test_block_ids_are_scattered_and_disjoint_between_sets():
    w = BY_NAME["decode-b4-ctx32k"].scaled(64)
    inputs = build_paged(w, "cpu", num_sets=3, fill=False)
    ids = [s.block_table.flatten() for s in inputs.sets]
    assert torch.cat(ids).unique().numel() == sum(t.numel() for t in ids) == inputs.k_cache.shape[0]
    assert not torch.equal(ids[0], torch.arange(ids[0].numel(), dtype=torch.int32)), "block ids not permuted"


def test_sweeps_cover_the_brief():
    full = {(s.name, s.base): s for s in sweeps(WORKLOADS)}
    for base in (DECODE_BASE, PREFILL_BASE):
        assert [v.config.dtype for v in full["dtype", base].variants] == [torch.float16, torch.bfloat16]
        assert [v.config.head_size for v in full["head_size", base].variants] == [64, 128, 256]
        assert [v.config.num_queries_per_kv for v in full["gqa", base].variants] == [1, 4, 8, 64]
        assert {v.config.num_q_heads for v in full["gqa", base].variants} == {64}
        assert [v.config.block_size for v in full["block_size", base].variants] == [16, 32, 64]
    # decode GQA variants read the same K/V bytes; fp8 reads half of bf16 on the same batch
    assert len({v.kv_bytes for v in full["gqa", DECODE_BASE].variants}) == 1
    bf16, fp8 = full["kv_dtype", DECODE_BASE].variants
    assert bf16.shape == fp8.shape and fp8.config.cache_dtype == torch.float8_e4m3fn
    assert 2 * fp8.kv_bytes == bf16.kv_bytes
    assert all(len(s.variants) <= 3 for s in sweeps(WORKLOADS, quick=True))


def test_dry_run_completes(tmp_path, capsys):
    assert runner.run(parse("--dry-run", "--out", str(tmp_path))) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] and len(results["rows"]) == len(WORKLOADS) + sum(
        len(s.variants) for s in sweeps(WORKLOADS, quick=True)
    )
    for row in results["rows"]:
        assert "error" not in row and row["all_written"] and row["check"]["ok"], row
    for row in results["rows"][: len(WORKLOADS)]:
        assert row["peers"]["math"]["rel_err_vs_ours"] < 2e-2, row  # the dense peer's masks are right
    assert "all checks passed" in capsys.readouterr().out


def test_bench_pipeline_with_a_fake_timer(tmp_path):
    """The GPU path (rows, metrics, anchors, peers, sweep ranking, tables, plot) over the reference."""

    def fake_timer(fn):
        fn()
        return dict(ms=1.0, ms_p20=0.9, ms_p80=1.1, reps=1)

    bench = runner.Bench(device="cpu", backend="reference", timer=fake_timer, ceilings=CEILINGS, peers=("math",))
    mixed = BY_NAME["mixed-chunk2k-plus-63dec"]
    small = type(mixed)(mixed.name, mixed.config, mixed.scaled(64).shape, mixed.anchors)
    rows = [bench.run_workload(small)]
    sweep = next(s for s in sweeps(WORKLOADS, quick=True) if s.name == "kv_dtype")
    small_sweep = type(sweep)(sweep.name, sweep.base, tuple(v.scaled(64) for v in sweep.variants))
    rows += [bench.run_workload(v, sweep=small_sweep) for v in small_sweep.variants]
    runner.rank_sweeps(rows)
    assert all("error" not in r for r in rows), rows
    r = rows[0]
    assert r["tb_per_s"] == pytest.approx(small.kv_bytes / 1e9)
    assert r["pct_mm"] == pytest.approx(100 * small.flops / 1e9 / CEILINGS["mm_tflops"])
    assert r["anchors"]["vllm-unified"]["ratio"] == pytest.approx(1.5568)
    assert r["peers"]["math"]["ms"] == 2.0 and r["peers"]["math"]["groups"] == 2  # chunk + decodes
    assert r["check"]["ok"]
    assert [x["vs_best"] for x in rows[1:]] == pytest.approx([1.0, 0.5])  # fp8: half the bytes, same time

    results = dict(meta=runner.metadata("cpu"), ceilings=CEILINGS, rows=rows)
    runner.write_results(results, tmp_path)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(runner.sweep_table(results))
    console.print(runner.workload_table(results))
    text = console.export_text()
    assert "mixed-chunk2k-plus-63dec" in text and "1.56" in text and "kv fp8_e4m3" in text
    assert roofline(json.loads((tmp_path / "results.json").read_text()), tmp_path / "r.png").stat().st_size > 0


def test_timed_run_end_to_end_with_a_fake_timer(tmp_path, capsys):
    """run_gpu (progress, rows, results.json, roofline.png, tables) on the CPU: the SDPA peers'
    flash/cuDNN backends fail there, which exercises the error path."""

    def fake_timer(fn):
        fn()
        return dict(ms=2.0, ms_p20=1.9, ms_p80=2.1, reps=1)

    chosen = [BY_NAME["decode-b4-ctx32k"], BY_NAME["prefix-prefill-b4-q1k-ctx4k"]]
    small = [type(w)(w.name, w.config, w.scaled(64).shape, w.anchors) for w in chosen]
    sweep = next(s for s in sweeps(WORKLOADS, quick=True) if s.name == "block_size")
    small_sweep = type(sweep)(sweep.name, sweep.base, tuple(v.scaled(64) for v in sweep.variants))
    args = parse("--quick", "--out", str(tmp_path))
    from rich.console import Console

    code = runner.run_gpu(
        args,
        small,
        [small_sweep],
        Console(width=200),
        device="cpu",
        backend="reference",
        timer=fake_timer,
        ceilings=CEILINGS,
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["rows"]][:2] == [w.name for w in chosen]
    assert all("ms" in r and r["check"]["ok"] for r in results["rows"])
    assert all("error" in r["peers"]["cudnn"] for r in results["rows"][:2])  # no cuDNN on the CPU
    assert (tmp_path / "roofline.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "results.md").read_text()
    assert report.count("| decode-b4-ctx32k |") == 1 and "| block_size |" in report
    assert "| 2.0000 |" in report and "| ok |" in report and "| err |" in report  # cuDNN failed on the CPU
    assert "| plan us | run us | one-shot us | SDPA us |" in report  # host time: none measured off CUDA
    out = capsys.readouterr().out
    assert out.index("sweeps (vs best") < out.index("x SDPA cuDNN")  # the workload table comes last
    assert "SDPA cudnn: RuntimeError" in out


def test_plot_writes_a_png_from_fake_results(tmp_path):
    rows = []
    for i, w in enumerate(WORKLOADS):
        ms = 0.4 + i
        rows.append(
            dict(
                name=w.name,
                kind="workload",
                kv_bytes=w.kv_bytes,
                flops=w.flops,
                ms=ms,
                pct_roofline=50.0,
                anchors={"vllm-unified": {"ms": w.anchors["vllm-unified"]["ms"]}},
            )
        )
    rows.append(dict(name="v", kind="sweep", sweep="dtype", base="x", kv_bytes=10**9, flops=4 * 10**9, ms=0.5))
    rows.append(dict(name="failed", kind="workload", kv_bytes=10**9, flops=10**9, error="boom"))
    results = dict(meta=dict(device="fake H100", date="today"), ceilings=CEILINGS, rows=rows)
    path = roofline(results, tmp_path / "sub" / "roofline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.run(parse("--quick", "--out", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err
    assert not (tmp_path / "results.json").exists()


def test_unknown_workload_is_refused(capsys):
    assert runner.run(parse("--workloads", "decode-b64-ctx4k,nope", "--dry-run")) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_maps_bench_to_the_runner():
    from pagedattn.cli import SUBCOMMANDS

    assert "bench" in SUBCOMMANDS and bench_cli.run is not None and callable(runner.run)


def test_host_time_on_the_cpu_times_the_calls():
    import time

    times = host.queued_host_times_us(lambda: time.sleep(2e-4), "cpu", calls=3, rounds=2)
    assert len(times) == 2 and all(t >= 200 for t in times)


@pytest.mark.gpu
def test_host_time_counts_the_host_only():
    """Calls queued behind a GPU sleep return at once: a 2 ms GPU op costs microseconds of host time,
    and a host-side 1 ms sleep shows as >= 1000 us."""
    import time

    x = torch.randn(1 << 24, device="cuda")
    drained: list[int] = []
    gpu_heavy = statistics.median(
        host.queued_host_times_us(lambda: torch.cuda._sleep(1 << 22) or x.sum(), "cuda", drained=drained)
    )
    host_heavy = host.queued_host_us(lambda: time.sleep(1e-3), "cuda", calls=5)
    assert 0 < gpu_heavy < 1000, gpu_heavy
    assert host_heavy >= 1000
    assert drained == [0]  # the GPU never caught up with the host


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.kernels
def test_streaming_read_kernel_sums_every_element():
    """The ceiling's kernel reads every element once (the partial sums add up to the sum), with
    a tail that is not a whole tile."""
    from pagedattn.kernels.stream import stream_programs, stream_sum

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3 * 256 + 37, dtype=dtype, device=KERNEL_DEVICE) + 0.5
        partials = stream_sum(x, block=64, unroll=4, num_warps=1)
        assert partials.shape == (stream_programs(x.numel(), 64, 4),) == (4,)
        assert float(partials.double().sum()) == pytest.approx(float(x.double().sum()), rel=1e-5)


@pytest.mark.kernels
def test_ceilings_report_the_streaming_read_and_the_datasheet():
    seen = []

    def fake_timer(fn):
        fn()
        seen.append(getattr(fn, "func", fn))
        return dict(ms=1.0 if len(seen) == 1 else 2.0)  # the streaming kernel first, and fastest

    c = runner.measure_ceilings(fake_timer, KERNEL_DEVICE, read_bytes=1 << 16, others=False)
    assert c["read_source"] == "read_tbs_stream" and c["read_tbs"] == c["read_tbs_stream"] == pytest.approx(6.5536e-5)
    assert c["read_tbs_sum_bf16"] == c["read_tbs_sum_fp32"] == pytest.approx(c["read_tbs"] / 2)
    assert "copy_tbs" not in c
    assert runner.datasheet_read_tbs("NVIDIA H200") == 4.8 and runner.datasheet_read_tbs("Tesla T4") is None
    line = runner.ceiling_line(dict(c, read_tbs_datasheet=4.8 * 1e-5))
    assert "streaming-read kernel" in line and "torch.sum" in line and "datasheet" in line


def test_host_only_table_with_a_fake_timer(tmp_path, capsys):
    """--host-only on the CPU through the reference: every column filled, the run() targets
    judged per batch kind, host.json and host.md written."""

    def fake_timer(fn):
        fn()
        return dict(ms=1.0)

    chosen = [BY_NAME["decode-b4-ctx32k"], BY_NAME["mixed-chunk2k-plus-63dec"], BY_NAME["prefill-b4-4k"]]
    small = [type(w)(w.name, w.config, w.scaled(64).shape, w.anchors) for w in chosen]
    args = parse("--host-only", "--out", str(tmp_path))
    from rich.console import Console

    code = runner.run_host(
        args,
        small,
        Console(width=200),
        device="cpu",
        backend="reference",
        timer=fake_timer,
        ceilings=CEILINGS,
        calls=1,
        rounds=1,
    )
    assert code == 0
    rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    for r in rows:
        assert r["check"]["ok"] and r["all_written"], r
        assert all(r[k] > 0 for k in ("plan_us", "run_us", "run_alloc_us", "oneshot_us")), r
        assert r["pct_read_bw"] == pytest.approx(100 * r["kv_bytes"] / 1e9 / CEILINGS["read_tbs"])
        assert ("sdpa_us" in r) != ("sdpa_error" in r)  # the peer timed, or its failure recorded
    out = capsys.readouterr().out
    assert "decode-b4-ctx32k: run" in out and "decode target <= 15 us" in out
    assert "mixed target <= 25 us" in out and "prefill-b4-4k: run" not in out
    assert "| workload | plan us | run us |" in (tmp_path / "host.md").read_text()


def test_host_columns_and_run_targets_from_rows():
    """The full bench's host cells (the flash peer's host time from its entry) and --host-only's
    verdicts against issue 13's run() targets: decode <= 15 us, mixed <= 25 us, prefill none."""
    row = dict(plan_us=41.25, run_us=9.96, oneshot_us=80.0, peers={"flash": {"host_us": 23.4}})
    assert runner.host_cells(row) == ["41.2", "10.0", "80.0", "23.4"]
    assert runner.host_cells(dict(host_us=120.0)) == ["—", "—", "120.0", "—"]  # a sweep row: one-shot only
    rows = [
        dict(name="d", query_kinds=["decode"], run_us=15.2, all_written=True, check={"ok": True}),
        dict(name="m", query_kinds=["decode", "prefill"], run_us=24.0, all_written=True, check={"ok": True}),
        dict(name="p", query_kinds=["prefill"], run_us=30.0, all_written=True, check={"ok": True}, graph_ok=False),
    ]
    text = runner.host_table(dict(meta=dict(device="x"), ceilings=CEILINGS, rows=rows))
    assert "d: run 15.2 us, decode target <= 15 us: NOT met" in text
    assert "m: run 24.0 us, mixed target <= 25 us: met" in text
    assert "p: run" not in text and "FAILED graph" in text
