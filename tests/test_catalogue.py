"""The bad-metadata catalogue (`pagedattn.catalogue`) over every entry point, both ways:

    validated    in process, with every attention/write launch replaced by a trap: the exact error
                 class, the argument named, nothing touched (caches, q, metadata, out), no launch.
    unvalidated  in a subprocess (`python -m pagedattn.catalogue --jsonl`), so a segfault or a glibc
                 abort is a failed case, not a dead worker, and a case that runs longer than
                 CASE_TIMEOUT_S fails as a hang: no crash, no write outside any tensor (guard
                 margins), NaN rows for the bad sequences, reference rows for the rest.

PAGEDATTN_CATALOGUE=full runs every unvalidated case through every entry point (about a minute of
one core under the interpreter); the default "ci" selection runs each kernel-running case through
one entry point per contract in turn, and every host-side check everywhere (see
`catalogue.planned_runs`; the runner is `pagedattn.catalogue_run`).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import subprocess
import sys
import threading

import pytest
import torch

from pagedattn import catalogue as cat
from pagedattn import catalogue_run as run

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SELECT = os.environ.get("PAGEDATTN_CATALOGUE", "ci")
CASE_TIMEOUT_S = float(os.environ.get("PAGEDATTN_CATALOGUE_CASE_TIMEOUT", "30"))  # a run takes < 1 s

pytestmark = pytest.mark.kernels  # skipped without CUDA or TRITON_INTERPRET=1 (tests/conftest.py)


# ---------------------------------------------------------------------------------------------
# the catalogue itself
# ---------------------------------------------------------------------------------------------
def test_catalogue_covers_the_contract():
    names = {c.name for c in cat.CASES}
    assert len(cat.CASES) >= 25
    required = {
        "block-id-past-cache",
        "block-id-negative",
        "seq-len-negative",
        "seq-len-below-query-len",
        "block-table-too-narrow",
        "cu-decreasing",
        "cu-not-starting-at-0",
        "cu-ends-before-tokens",
        "cu-ends-after-tokens",
        "max-query-len-too-small",
        "max-seq-len-too-small",
        "q-fewer-rows",
        "q-more-rows",
        "out-wrong-shape",
        "out-wrong-dtype",
        "k-new-wrong-rows",
        "v-new-wrong-rows",
        "ctx-len-negative",
        "fp8-cache-no-k-scale",
        "slot-equals-num-slots",
        "slot-below-minus-one",
        "seq-lens-fewer-entries",
        "block-table-fewer-rows",
        "cu-more-entries",
    }
    assert required <= names, f"missing: {sorted(required - names)}"
    from pagedattn import errors

    used = set()
    for c in cat.CASES:
        assert c.entry_points and set(c.entry_points) <= set(cat.ENTRY_POINTS), c.name
        used |= set(c.entry_points)
        for e in c.error:
            assert issubclass(getattr(errors, e), errors.PagedAttentionError), (c.name, e)
        assert c.args
        assert (c.bad_slots != ()) == (cat.ENTRY_POINTS[c.entry_points[0]].contract == "write" and not c.host_check), (
            c.name
        )
    assert used == set(cat.ENTRY_POINTS)


def test_base_batch_is_what_the_docstring_says():
    b = cat.base_batch()
    assert b.cu_seqlens_q.tolist() == [0, 5, 6, 9] and b.seq_lens.tolist() == [17, 21, 3]
    assert b.k_cache.isfinite().all() and b.v_cache.isfinite().all()
    used = {x for row, s in zip(cat.BLOCK_TABLE, cat.SEQ_LENS) for x in row[: -(-s // cat.BLOCK_SIZE)]}
    assert not used & {s // cat.BLOCK_SIZE for s in cat.WRITE_SLOTS}, "write slots must be in unused blocks"


def test_names_argument_accepts_aliases_and_rejects_lookalikes():
    ua = cat.ENTRY_POINTS["unified_attention"]
    assert cat.names_argument("seqused_k[1] = -3 is negative", ua, ("seq_lens[1]",))
    assert cat.names_argument("seq_lens[1] = -3 is negative", ua, ("seq_lens[1]",))
    assert not cat.names_argument("seq_lens[11] = -3", ua, ("seq_lens[1]",))
    assert not cat.names_argument("max_seq_lens", ua, ("seq_lens",))


# ---------------------------------------------------------------------------------------------
# validated: in process, no launch allowed
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_launches(monkeypatch):
    """Any kernel launch raises: a validated bad input must be refused before one."""
    from pagedattn.kernels import unified, write

    def trap(*args, **kwargs):
        raise AssertionError("a kernel was launched: validation must refuse the input before any launch")

    if hasattr(unified, "bind_attention"):
        real = unified.bind_attention
        monkeypatch.setattr(unified, "bind_attention", lambda *a, **k: [trap for _ in real(*a, **k)])
    if hasattr(unified, "launch"):
        monkeypatch.setattr(unified, "launch", trap)
    monkeypatch.setattr(write, "_launch", trap)
    monkeypatch.setattr(write, "_write_torch", trap)


PAIRS = [pytest.param(c, e, id=f"{c.name}-{e}") for c, e in cat.applicable()]


@pytest.mark.parametrize("case, entry", PAIRS)
def test_validated(case, entry, no_launches):
    problems = run.check(case, entry, DEVICE, validate=True)
    assert not problems, "\n".join(problems)


DEFAULT_CASES = ("block-id-past-cache", "seq-len-negative", "cu-decreasing", "q-fewer-rows", "slot-equals-num-slots")


@pytest.mark.skipif(CUDA, reason="the default validates on the CPU; on a GPU only with host copies")
@pytest.mark.parametrize("case, entry", [p for p in PAIRS if p.values[0].name in DEFAULT_CASES])
def test_validated_by_default_on_cpu(case, entry, no_launches):
    """validate=None (the default) validates metadata values on the CPU, where it is free."""
    problems = run.check(case, entry, DEVICE, validate=None)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# unvalidated: a subprocess, shared by the xdist workers through a lock and a results file
# ---------------------------------------------------------------------------------------------
RUNS = cat.planned_runs(select=SELECT)


def _pump(stream, sink) -> None:
    """A thread's body: every line of `stream` into `sink` (a queue gets None at the end)."""
    for line in stream:
        sink.put(line) if isinstance(sink, queue.Queue) else sink.append(line)
    if isinstance(sink, queue.Queue):
        sink.put(None)


def run_isolated(
    select: str, device: str, timeout_s: float, module: str = "pagedattn.catalogue", startup_s: float = 300.0
) -> dict[str, list[str]]:
    """Every planned unvalidated run, in subprocesses that are restarted after a crash or a hang
    (a run without a result after `timeout_s`; a process gets `startup_s` for its imports)."""
    results: dict[str, list[str]] = {}
    labels = [cat.run_label(*r) for r in cat.planned_runs(select=select)]
    start = 0
    while start < len(labels):
        cmd = [sys.executable, "-m", module, "--jsonl", "--select", select, "--device", device, "--from", str(start)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
        lines: queue.Queue = queue.Queue()
        stderr: list[str] = []
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, stderr), daemon=True).start()
        current = None
        while True:
            try:
                line = lines.get(timeout=startup_s if current is None else timeout_s)
            except queue.Empty:
                proc.kill()
                proc.wait()
                if current is None:
                    raise RuntimeError(f"the catalogue runner started no run in {startup_s:.0f} s") from None
                results[labels[current]] = [f"hung: no result after {timeout_s:.0f} s"]
                break
            if line is None:
                rc = proc.wait()
                if current is None:
                    raise RuntimeError(f"the catalogue runner ran nothing: rc {rc}\n{''.join(stderr)[-3000:]}")
                if labels[current] not in results:
                    tail = "".join(stderr)[-600:].strip().replace("\n", " | ")
                    results[labels[current]] = [f"crashed: the process died with status {rc}: {tail}"]
                break
            record = json.loads(line)
            current = record["index"]
            assert record["run"] == labels[current], "the subprocess planned other runs"
            if record["status"] == "done":
                results[record["run"]] = record["problems"]
        start = current + 1
    return results


@pytest.fixture(scope="session")
def unvalidated_results(tmp_path_factory, worker_id) -> dict[str, list[str]]:
    """The results of every unvalidated run, computed once per test session (xdist workers share
    them through a file next to their temporary directories)."""
    if worker_id == "master":
        return run_isolated(SELECT, DEVICE, CASE_TIMEOUT_S)
    root = tmp_path_factory.getbasetemp().parent
    path = root / f"catalogue-{SELECT}-{DEVICE}.json"
    with open(root / "catalogue.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.write_text(json.dumps(run_isolated(SELECT, DEVICE, CASE_TIMEOUT_S)))
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def worker_id(request) -> str:
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.mark.parametrize("label", [cat.run_label(*r) for r in RUNS])
def test_unvalidated(label, unvalidated_results):
    assert label in unvalidated_results, "the run produced no result"
    assert not unvalidated_results[label], "\n".join(unvalidated_results[label])


def test_isolation_reports_a_crash_and_a_hang(tmp_path, monkeypatch):
    """The subprocess harness turns a dying or hanging run into a failed case and goes on."""
    (tmp_path / "fake_catalogue.py").write_text(
        "import os, sys, time\n"
        "import pagedattn.catalogue as cat\n"
        "import pagedattn.catalogue_run as run\n"
        "def check(case, entry, *a, **k):\n"
        "    label = cat.run_label(case, entry, k.get('out_mode', 'user'))\n"
        "    if label == os.environ['CRASH_RUN']: os.abort()\n"
        "    if label == os.environ['HANG_RUN']: time.sleep(60)\n"
        "    return ['a problem'] if label == os.environ['FAIL_RUN'] else []\n"
        "run.check = check\n"
        "sys.exit(run.main())\n"
    )
    runs = [cat.run_label(*r) for r in cat.planned_runs(select="ci")]
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("CRASH_RUN", runs[2])
    monkeypatch.setenv("HANG_RUN", runs[5])
    monkeypatch.setenv("FAIL_RUN", runs[-1])
    results = run_isolated("ci", "cpu", timeout_s=4, module="fake_catalogue")
    assert results[runs[2]][0].startswith("crashed"), results[runs[2]]
    assert results[runs[5]][0].startswith("hung"), results[runs[5]]
    assert results[runs[-1]] == ["a problem"]
    assert set(results) == set(runs)
    assert all(results[r] == [] for r in runs if r not in (runs[2], runs[5], runs[-1]))


# ---------------------------------------------------------------------------------------------
# valid inputs the checks must not refuse
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [-1, cat.NUM_BLOCKS + 100])
@pytest.mark.parametrize("entry", ["paged_attention", "prefix_prefill"])
@pytest.mark.parametrize("validate", [None, False])
def test_block_table_padding_beyond_seq_len_is_not_read(entry, padding, validate):
    """Entries past ceil(seq_len / block_size) are padding an engine may fill with anything."""
    case = cat.Case("padding", (entry,), cat._set("block_table", (slice(None), 2), padding), (), ("",), ())
    problems = run.check(case, entry, DEVICE, validate=validate)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "q_dtype, cache_dtype",
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("entry", ["paged_attention", "prefix_prefill"])
def test_query_dtype_differs_from_cache(entry, q_dtype, cache_dtype):
    """attention.py documents q of any float dtype over a cache of another: the kernel converts
    K/V to q's dtype. The answer must be the reference's, in q's dtype."""
    from pagedattn import reference
    from pagedattn.attention import paged_attention, prefix_prefill
    from pagedattn.tolerances import TOLERANCES

    b = cat.base_batch(DEVICE, cache_dtype)
    q = b.q.to(q_dtype)
    k_new, v_new = b.k_new.to(q_dtype), b.v_new.to(q_dtype)
    meta = (b.cu_seqlens_q, b.seq_lens, b.block_table)
    if entry == "paged_attention":
        out = paged_attention(q, b.k_cache, b.v_cache, *meta)
        ref = reference.attention(q.cpu(), b.k_cache.cpu(), b.v_cache.cpu(), *(m.cpu() for m in meta))
    else:
        out = prefix_prefill(q, k_new, v_new, b.k_cache, b.v_cache, *meta)
        ref = reference.attention(
            q.cpu(), b.k_cache.cpu(), b.v_cache.cpu(), *(m.cpu() for m in meta), k_new=k_new.cpu(), v_new=v_new.cpu()
        )
    assert out.dtype == q_dtype
    coarser = max((q_dtype, cache_dtype), key=lambda d: TOLERANCES[d][0])  # the dot products run in q's dtype
    atol, rtol = TOLERANCES[coarser]
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# the harness can fail: each promise, broken on purpose, is reported
# ---------------------------------------------------------------------------------------------
def _patch_paged_attention(monkeypatch, fn):
    import importlib

    api = importlib.import_module("pagedattn.attention")  # the module (pagedattn.attention is the function)
    real = api.paged_attention
    monkeypatch.setattr(api, "paged_attention", lambda *a, **k: fn(real, *a, **k))


def test_harness_reports_an_accepted_bad_input(monkeypatch):
    _patch_paged_attention(monkeypatch, lambda real, *a, validate=None, **k: real(*a, validate=False, **k))
    problems = run.check(cat.CASES_BY_NAME["block-id-past-cache"], "paged_attention", DEVICE, validate=True)
    assert problems and problems[0].startswith("accepted"), problems


def test_harness_reports_plausible_rows_and_wrong_rows(monkeypatch):
    def zeros(real, q, *a, out=None, **k):
        out = torch.zeros_like(q) if out is None else out.zero_()
        return out

    _patch_paged_attention(monkeypatch, zeros)
    problems = run.check(cat.CASES_BY_NAME["seq-len-negative"], "paged_attention", DEVICE, validate=False)
    assert any("not all NaN" in p for p in problems), problems
    assert any("differ from the reference" in p for p in problems), problems


def test_harness_reports_a_write_past_out_and_into_the_cache(monkeypatch):
    def overrun(real, q, k_cache, v_cache, *a, out=None, **k):
        result = real(q, k_cache, v_cache, *a, out=out, **k)
        flat = torch.as_strided(out, (out.numel() + 1,), (1,))  # one element past the end
        flat[-1] = 7.0
        k_cache.view(-1)[0] = 7.0
        return result

    _patch_paged_attention(monkeypatch, overrun)
    problems = run.check(None, "paged_attention", DEVICE, validate=False, out_mode="user")
    assert "written past the ends of out" in problems, problems
    assert "k_cache changed (only out may be written)" in problems, problems
