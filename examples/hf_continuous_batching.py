"""Hugging Face transformers continuous batching (`generate_batch`) on pagedattn's kernels.

A random-weight model built from a config (nothing downloaded) serves a batch of prompts of mixed
lengths through pagedattn, and the same requests through transformers' own paged implementations
and its plain `generate()`; the script reports whether the tokens are identical, the generated
tokens/s of each, and (with --profile) the share of the GPU time spent in pagedattn's kernels.

    python examples/hf_continuous_batching.py --device cpu --model-config llama-gqa --requests 4   # TRITON_INTERPRET=1
    python examples/hf_continuous_batching.py --device cuda --model-config llama-1b --requests 64 \
        --min-prompt 100 --max-prompt 2000 --new-tokens 64 --against generate,paged|sdpa --profile
    # two GPUs, tensor parallel (tokens compared with a one-GPU run saved by --save-tokens):
    torchrun --nproc-per-node 2 examples/hf_continuous_batching.py --tp --model-config llama-1b ... \
        --load-model DIR --expect-tokens tokens.json

--json PATH writes every number printed. Model configs: pagedattn.integrations.transformers_harness.CONFIGS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from pagedattn.integrations import transformers as pa_hf
from pagedattn.integrations import transformers_harness as harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_KERNELS = ("_paged_attention_kernel", "_merge_splits_kernel", "_write_kv_kernel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-config", default="llama-gqa", choices=sorted(harness.CONFIGS))
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--tp", action="store_true", help="tensor parallel over torchrun's ranks (tp_plan='auto', NCCL)")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--min-prompt", type=int, default=5)
    p.add_argument("--max-prompt", type=int, default=70)
    p.add_argument("--new-tokens", type=int, default=5)
    p.add_argument(
        "--against",
        default="generate",
        help="comma-separated: 'generate' (generate() per prompt with sdpa) and/or paged "
        "implementations of transformers ('paged|sdpa', 'paged|eager', 'paged|flash_attention_2')",
    )
    p.add_argument("--block-size", type=int, default=None, help="default: 16 on cpu, transformers' on cuda")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="default: 48 on cpu, transformers' on cuda")
    p.add_argument("--cuda-graphs", choices=["default", "on", "off"], default="default")
    p.add_argument("--profile", action="store_true", help="torch.profiler over one more pagedattn generate_batch")
    p.add_argument("--save-model", help="save the random-weight model here (for a --tp run to load)")
    p.add_argument("--load-model", help="load the model from here instead of building it")
    p.add_argument("--save-tokens", help="write pagedattn's tokens (JSON)")
    p.add_argument("--expect-tokens", help="compare pagedattn's tokens with these (JSON from --save-tokens)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cb_options(args) -> dict:
    cpu = args.device == "cpu"
    options = {}
    block_size = args.block_size or (16 if cpu else None)
    if block_size:
        options["block_size"] = block_size
    max_batch_tokens = args.max_batch_tokens or (48 if cpu else None)
    if max_batch_tokens:
        options["max_batch_tokens"] = max_batch_tokens
    if cpu:
        options["num_blocks"] = 64 + args.requests * (-(-(args.max_prompt + args.new_tokens) // block_size))
    if args.cuda_graphs != "default":
        options["use_cuda_graph"] = args.cuda_graphs == "on"
    return options


def prompt_lengths(args) -> list[int]:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,), generator=g).tolist()


def attention_share(prof, device: str, host_seconds: float, wall_seconds: float) -> dict:
    """GPU: device time of pagedattn's kernels over all kernels' device time (CUPTI sees the kernels
    that generate_batch's background thread launches). CPU (interpreter, synchronous): host time
    inside the attention function over the run's wall time."""
    if device.startswith("cuda"):
        events = prof.key_averages()

        def dev_time(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(dev_time(e) for e in kernels)
        attn = sum(dev_time(e) for e in kernels if any(k in e.key for k in ATTENTION_KERNELS))
        top = sorted(kernels, key=dev_time, reverse=True)[:8]
        return {
            "attention_us": attn,
            "total_us": total,
            "share": attn / total if total else float("nan"),
            "basis": "device time of kernels",
            "top_kernels": [(e.key[:80], dev_time(e)) for e in top],
        }
    return {
        "attention_us": host_seconds * 1e6,
        "total_us": wall_seconds * 1e6,
        "share": host_seconds / wall_seconds if wall_seconds else float("nan"),
        "basis": "host time (interpreter, synchronous)",
    }


ATTENTION_SECONDS = [0.0]


def register_profiled(checked: bool) -> str:
    """register(), with each call timed on the host and wrapped in a named profiler range."""
    import time

    from transformers import AttentionInterface

    name = pa_hf.register(checked=checked)

    def forward(*a, **k):
        start = time.perf_counter()
        with torch.profiler.record_function("pagedattn::attention"):
            result = pa_hf.paged_attention_forward(*a, **k)
        ATTENTION_SECONDS[0] += time.perf_counter() - start
        return result

    AttentionInterface.register(name, forward)
    return name


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
    name = register_profiled(checked=args.device == "cpu")
    say = print if rank == 0 else (lambda *a, **k: None)

    if args.load_model:
        from transformers import AutoModelForCausalLM

        # tp_plan "auto": transformers starts the process group (NCCL on cuda, gloo on cpu) and shards
        # the heads, so each rank's paged cache holds its own num_kv_heads / world_size heads
        kwargs = {}
        if args.tp:
            from transformers import DistributedConfig

            kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
        model = AutoModelForCausalLM.from_pretrained(
            args.load_model, dtype=dtype, attn_implementation="sdpa", **kwargs
        ).eval()
        if not args.tp:
            model = model.to(args.device)
        config = model.config
    else:
        if args.tp:
            sys.exit("--tp needs --load-model (transformers shards weights while loading)")
        config = harness.model_config(args.model_config)
        model = harness.build_model(config, dtype=dtype, device=args.device, seed=args.seed)
    if args.save_model and rank == 0:
        model.save_pretrained(args.save_model)
    if args.tp:  # evidence that the heads were sharded: this rank's K projection rows
        k_proj = model.model.layers[0].self_attn.k_proj.weight
        local = k_proj.to_local() if hasattr(k_proj, "to_local") else k_proj
        print(
            f"rank {rank}/{world}: k_proj {tuple(local.shape)} of {config.num_key_value_heads} KV heads "
            f"x {config.hidden_size // config.num_attention_heads if not getattr(config, 'head_dim', None) else config.head_dim}"  # noqa: E501
        )
    prompts = harness.make_prompts(prompt_lengths(args), config.vocab_size, seed=args.seed)
    options = cb_options(args)
    new_tokens = args.new_tokens
    say(
        f"{args.model_config} {dtype} on {args.device} x{world}: {len(prompts)} requests, prompts "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {new_tokens} new each, cb options {options}"
    )

    results = {
        "model": args.model_config,
        "dtype": str(dtype),
        "device": args.device,
        "world_size": world,
        "requests": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "new_tokens": new_tokens,
        "cb_options": options,
        "runs": {},
        "comparisons": {},
    }

    def dump():  # after every stage, so a run cut short still leaves what it measured
        if args.json and rank == 0:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    ours = harness.batch_generate(model, name, prompts, new_tokens, **options)
    ours = harness.batch_generate(model, name, prompts, new_tokens, **options) if args.device != "cpu" else ours
    runs = {name: ours}
    results["runs"][name] = {
        "seconds": ours.seconds,
        "generated_tokens_per_s": len(prompts) * new_tokens / ours.seconds,
    }
    dump()
    generated = len(prompts) * new_tokens

    def compare(impl: str, run) -> None:  # recorded as soon as each run ends (a cut-off run keeps it)
        results["runs"][impl] = {"seconds": run.seconds, "generated_tokens_per_s": generated / run.seconds}
        c = harness.compare(ours, run)
        results["comparisons"][f"{name} vs {impl}"] = c.record()
        say(f"{name} vs {impl}: {c.summary()}")
        dump()

    for other in filter(None, args.against.split(",")):
        if other == "generate":
            runs[other] = harness.reference_generate(model, prompts, new_tokens)
            compare(other, runs[other])
            continue
        try:
            harness.batch_generate(model, other, prompts[:2], 2, **options)  # warm up (compiles, graphs)
            runs[other] = harness.batch_generate(model, other, prompts, new_tokens, **options)
        except Exception as exc:  # an implementation this machine lacks (e.g. no flash-attn package)
            say(f"{other}: not run ({type(exc).__name__}: {str(exc)[:200]})")
            results["runs"][other] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            dump()
            continue
        compare(other, runs[other])
    if args.expect_tokens:
        with open(args.expect_tokens) as f:
            expected = json.load(f)
        ref = harness.Generation(expected["tokens"], expected["logprobs"], None, 0.0)
        c = harness.compare(ours, ref)
        results["comparisons"][f"{name} x{world} vs saved"] = c.record()
        say(f"{name} x{world} vs {args.expect_tokens}: {c.summary()}")
        if "paged|sdpa" in runs and "sdpa_tokens" in expected:  # the control: transformers' own under TP
            c2 = harness.compare(
                runs["paged|sdpa"], harness.Generation(expected["sdpa_tokens"], expected["sdpa_logprobs"], None, 0.0)
            )
            results["comparisons"][f"paged|sdpa x{world} vs saved"] = {
                "identical": c2.identical,
                "requests": c2.requests,
            }
            say(f"paged|sdpa x{world} vs saved paged|sdpa: {c2.summary()}")
    if args.save_tokens and rank == 0:
        saved = {"tokens": ours.tokens, "logprobs": ours.logprobs}
        if "paged|sdpa" in runs:
            saved.update(sdpa_tokens=runs["paged|sdpa"].tokens, sdpa_logprobs=runs["paged|sdpa"].logprobs)
        with open(args.save_tokens, "w") as f:
            json.dump(saved, f)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        ATTENTION_SECONDS[0] = 0.0
        with profile(activities=activities) as prof:
            run = harness.batch_generate(model, name, prompts, new_tokens, **options)
        results["profile"] = attention_share(prof, args.device, ATTENTION_SECONDS[0], run.seconds)
        dump()
        say(
            f"attention share of {results['profile']['basis']}: {results['profile']['share']:.1%} "
            f"({results['profile']['attention_us'] / 1e3:.1f} of {results['profile']['total_us'] / 1e3:.1f} ms)"
        )
    for impl, r in results["runs"].items():
        if "seconds" in r:
            say(f"{impl:28s} {r['seconds']:8.2f} s  {r['generated_tokens_per_s']:10.1f} generated tokens/s")
    dump()
    return results


if __name__ == "__main__":
    main()
