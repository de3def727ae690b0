"""`pagedattn explain`: which kernel and launch parameters `dispatch` picks, and the rule that decided."""

from __future__ import annotations

import argparse

from ._args import lengths

KV_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vllm-grid",
        action="store_true",
        help="explain every configuration of vLLM's chunked-prefill test grid instead",
    )
    parser.add_argument("--seed-grid", dest="vllm_grid", action="store_true", help=argparse.SUPPRESS)  # old name
    parser.add_argument("--num-q-heads", type=int, default=32, help="query heads")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-size", type=int, default=128, help="head size")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    parser.add_argument("--sliding-window", type=int, default=0, help="0: no window")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="bf16", help="query and output dtype")
    parser.add_argument(
        "--kv-dtype",
        default="auto",
        metavar="{" + ",".join(KV_DTYPES) + "}",
        help="cache dtype: auto (= --dtype) or an fp8 format",
    )
    parser.add_argument(
        "--query-lens",
        type=lengths,
        default="1,1,1,1",
        metavar="N,...",
        help="query tokens per sequence, comma-separated",
    )
    parser.add_argument(
        "--ctx-lens",
        type=lengths,
        default="32767,32767,32767,32767",
        metavar="N,...",
        help="tokens already in the cache per sequence, comma-separated",
    )
    parser.add_argument("--sms", type=int, default=None, help="plan for this many SMs (default: the GPU's, or 132)")
    parser.add_argument(
        "--platform",
        type=platforms,
        default=(),
        metavar="{cuda,rocm-cdna,rocm-gfx1x,all}[,...]",
        help="also show the kernel vLLM 0.33 itself picks on these platforms for its decode rows "
        "(use_rocm_custom_paged_attention; comma-separated, or all)",
    )
    parser.add_argument(
        "--vllm-op",
        default="chunked_prefill_paged_decode",
        choices=["chunked_prefill_paged_decode", "context_attention_fwd", "unified_attention"],
        help="the vLLM op whose choice --platform shows",
    )
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")


def platforms(value: str) -> tuple[str, ...]:
    """--platform: comma-separated names from pagedattn.platforms.PLATFORMS, or all."""
    names = ("cuda", "rocm-cdna", "rocm-gfx1x")
    chosen = names if value == "all" else tuple(v.strip() for v in value.split(","))
    bad = [v for v in chosen if v not in names]
    if bad:
        raise argparse.ArgumentTypeError(f"--platform takes {', '.join(names)} or all, got {', '.join(bad)}")
    return chosen


def plans(args) -> tuple[list[dict], str]:
    """One row per configuration: config, batch, kernel, params, rule; and the table's title."""
    import torch

    from .. import dispatch
    from ..config import DTYPE_NAMES, AttentionConfig, BatchShape, seed_grid
    from ..errors import UnsupportedConfigError

    if args.sms is not None and args.sms <= 0:
        raise SystemExit(f"pagedattn explain: --sms must be > 0, got {args.sms}")
    device = "cuda" if torch.cuda.is_available() else "cpu-as-h100"
    if args.vllm_grid:
        cases = [(c.config, c.shape) for c in seed_grid()]
    else:
        try:
            shape = BatchShape(args.query_lens, args.ctx_lens)
            config = AttentionConfig(
                args.num_q_heads,
                args.num_kv_heads,
                args.head_size,
                args.block_size,
                DTYPE_NAMES[args.dtype],
                args.kv_dtype,
                args.sliding_window,
            )
        except (ValueError, UnsupportedConfigError) as e:
            raise SystemExit(f"pagedattn explain: {e}") from None
        cases = [(config, shape)]
    rows = []
    for config, shape in cases:
        p = dispatch.plan_for(config, shape, device="cuda", sms=args.sms)
        row = dict(config=config.label(), batch=shape.label(), kernel=p.kernel, params=p.params(), rule=p.rule)
        for name in getattr(args, "platform", ()):
            from ..platforms import VllmCase, vllm_kernel

            choice = vllm_kernel(name, VllmCase.from_config(config, max(shape.seq_lens)), args.vllm_op)
            row[f"vllm {name}"] = f"decode: {choice.decode_kernel}; prefill: {choice.prefill_kernel} ({choice.why})"
        rows.append(row)
    title = f"dispatch ({device}, {args.sms or dispatch.sm_count('cuda')} SMs)"
    if getattr(args, "platform", ()):
        from ..platforms import VLLM_VERSION

        title += f"; vLLM {VLLM_VERSION}'s own choice in {args.vllm_op} per platform"
    return rows, title


def run(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    rows, title = plans(args)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title=title, expand=True)
    columns = [("config", 1), ("batch", 1), ("kernel", None), ("params", 2), ("rule", 4)]
    columns += [(f"vllm {name}", 3) for name in args.platform]
    for col, ratio in columns:
        table.add_column(col, overflow="fold", ratio=ratio, no_wrap=ratio is None)
    for r in rows:
        table.add_row(*r.values())
    Console().print(table)  # the terminal's width; a pipe gets 80 columns (COLUMNS= widens it)
    return 0
