"""Every kernel configuration dispatch can choose must be launchable on an H100. Triton ships
ptxas, so the kernels compile for sm_90 here without a GPU: check each representative plan's
stack frame (spilled registers: kilobytes of it made fp32 launches fail on the H100), shared memory
(227 KB per block) and registers x threads (64K per SM)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import triton

from pagedattn import dispatch  # noqa: F401  (used by the compile subprocess)
from pagedattn.config import AttentionConfig, BatchShape

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
compile_check = pytest.importorskip("compile_check")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")

MIXED = BatchShape((700, 1, 1), (100, 3000, 9000))
CASES = [
    AttentionConfig(32, 8, 128, 16, torch.bfloat16),  # the standard workloads
    AttentionConfig(64, 64, 128, 16, torch.float16, kv_dtype="fp8_e4m3"),  # the seed's failing config
    AttentionConfig(8, 8, 80, 8, torch.float32, sliding_window=7),  # run 6's failing fp32 launches
    AttentionConfig(8, 1, 256, 16, torch.float32),
    AttentionConfig(8, 2, 256, 16, torch.bfloat16, use_alibi=True, softcap=5.0, use_sinks=True),
]


def _compile_all() -> list[dict]:
    """Compile in a fresh interpreter without TRITON_INTERPRET (under the interpreter the kernels
    are not compilable objects); one process for all cases."""
    import json
    import subprocess
    code = (
        "import json, sys; sys.path.insert(0, 'scripts'); sys.path.insert(0, 'tests');"
        "import test_compile_sm90 as t, compile_check as c\n"
        "rows = []\n"
        "for config in t.CASES:\n"
        "    plan = t.dispatch.plan_for(config, t.MIXED, device='cuda')\n"
        "    for part in (plan, plan.decode_part):\n"
        "        shared, regs, stack, _ = c.compile_plan(config, part, context=False, seq_grid=part.phase == 'decode')\n"
        "        rows.append(dict(config=config.label(), params=part.params(), warps=part.num_warps,\n"
        "                         shared=shared, regs=regs, stack=stack))\n"
        "print(json.dumps(rows))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_chosen_kernel_is_launchable_on_sm90():
    rows = _compile_all()
    assert len(rows) == 2 * len(CASES)
    for r in rows:
        where = f"{r['config']} [{r['params']}]"
        assert r["shared"] <= compile_check.SHARED_PER_BLOCK, f"{where}: shared {r['shared']}"
        assert r["regs"] * 32 * r["warps"] <= compile_check.REGISTERS_PER_SM, f"{where}: {r['regs']} regs"
        assert r["stack"] <= 1024, f"{where}: {r['stack']} B of stack per thread (spilled registers)"
