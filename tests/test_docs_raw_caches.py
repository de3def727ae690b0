"""docs/raw-caches.md: its example runs as written and says what the page says it says."""

import re
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "raw-caches.md"


def test_raw_caches_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/raw-caches.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    message, report = namespace["message"], namespace["report"]
    assert message.startswith(
        "chunked_prefill_paged_decode: sequence 2 (decode, query_len 1, seq_len 41): position 40 (block "
    )
    assert "never written (poisoned NaN)" in message and "decode_from_cache=True" in message
    summary = capsys.readouterr().out
    assert "1 token (seq 2, decode, position 40) x all 8 heads x all 64 dims" in summary
    assert "-> missing-decode-kv" in summary
    assert report.top.id == "missing-decode-kv" and "position 40 (block" in report.top.evidence
