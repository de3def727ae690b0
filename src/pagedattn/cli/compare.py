"""`pagedattn compare OUT REF --batch META`: forensics from tensors a failing test saved.

    torch.save(out, "out.pt"); torch.save(ref, "ref.pt")
    # meta.json: {"query_lens": [...], "seq_lens": [...], "block_table": [[...]], "decode_from_cache": true}
    pagedattn compare out.pt ref.pt --batch meta.json

prints the grouped mismatch table and the ranked causes (`forensics.compare_saved` does the work).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="the output under test (torch.save of one tensor)")
    parser.add_argument("ref", metavar="REF", help="the expected output (torch.save of one tensor)")
    parser.add_argument(
        "--batch",
        required=True,
        metavar="META",
        help="batch metadata: a JSON file (query_lens or cu_seqlens_q, seq_lens or ctx_lens, "
        "optional block_table, contract, decode_from_cache, num_kv_heads, block_size, "
        "sliding_window, num_q_heads; q/k_new/v_new/k_cache/v_cache as paths to saved "
        "tensors) or a torch.save'd dict with the same keys",
    )
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: by OUT's dtype)")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: by OUT's dtype)")
    parser.add_argument("--max-rows", type=int, default=12, help="rows shown per table")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from rich.console import Console

    from ..errors import PagedAttentionError
    from ..forensics import compare_saved

    options = {k: v for k, v in (("atol", args.atol), ("rtol", args.rtol)) if v is not None}
    try:
        report = compare_saved(args.out, args.ref, args.batch, **options)
    except (OSError, ValueError, KeyError, PagedAttentionError) as e:
        raise SystemExit(f"pagedattn compare: {type(e).__name__}: {e}") from None
    if args.json:
        print(report.to_json(indent=1))
    else:
        Console().print(report.render(args.max_rows))
    return 0 if report.ok else 1
