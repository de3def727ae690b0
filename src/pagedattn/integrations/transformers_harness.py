"""Models, prompts and token comparisons for checking the transformers integration: one harness for
tests/test_transformers.py, examples/hf_continuous_batching.py and scripts/gpu_transformers.sh.

Models have random weights built from configs (nothing downloaded). `initializer_range` is raised
above the usual 0.02 so the logits are peaked: with near-uniform logits greedy decoding would turn
on ties that no two correct kernels need to break the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# the tiny models' common sizes: they run through the Triton interpreter in CI
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
# kind -> (architecture, config arguments)
CONFIGS = {
    "llama-gqa": ("llama", dict(TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    # layer 0 full attention, layer 1 a 32-token sliding window: two cache groups, dict metadata
    "qwen2-sliding": (
        "qwen2",
        dict(
            TINY,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=32,
            max_window_layers=1,
        ),
    ),
    "neox-mha": ("gpt_neox", dict(TINY, num_attention_heads=2, rotary_pct=0.5)),
    # 1B-class (Llama 3.2 1B shapes): 16 layers, 32 query / 8 KV heads of 64, hidden 2048
    "llama-1b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rope_theta=500000.0,
        ),
    ),
}


def model_config(kind: str, *, initializer_range: float = 0.1, max_position_embeddings: int = 4096, **overrides):
    from transformers import AutoConfig

    arch, args = CONFIGS[kind]
    return AutoConfig.for_model(
        arch,
        **{
            **args,
            "initializer_range": initializer_range,
            "max_position_embeddings": max_position_embeddings,
            **overrides,
        },
    )


def build_model(config, *, dtype=torch.float32, device="cpu", seed: int = 0, attn_implementation="sdpa", **kwargs):
    """A causal LM with random weights (seeded), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype, **kwargs)
    return model.to(device).eval()


def make_prompts(lengths, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


def greedy_config(max_new_tokens: int):
    from transformers import GenerationConfig

    # eos -1: never stops early, so every request makes exactly max_new_tokens steps
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt, the generated tokens
    logprobs: list[list[float]]  # log-softmax of each generated token
    margins: list[list[float]] | None  # top-1 minus top-2 logit at each step (reference only)
    seconds: float


@torch.no_grad()
def reference_generate(model, prompts, max_new_tokens: int) -> Generation:
    """transformers' generate() with sdpa, one prompt at a time (no padding)."""
    model.set_attn_implementation("sdpa")
    tokens, logprobs, margins = [], [], []
    start = time.perf_counter()
    device = next(model.parameters()).device
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt], device=device),
            generation_config=greedy_config(max_new_tokens),
            output_logits=True,
            return_dict_in_generate=True,
        )
        new = out.sequences[0, len(prompt) :].tolist()
        logits = torch.stack(out.logits, 0)[:, 0].float()  # [steps, vocab]
        top2 = logits.topk(2, dim=-1).values
        tokens.append(new)
        logprobs.append(logits.log_softmax(-1).gather(1, torch.tensor(new, device=device)[:, None])[:, 0].tolist())
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return Generation(tokens, logprobs, margins, time.perf_counter() - start)


@torch.no_grad()
def batch_generate(model, attn_implementation: str, prompts, max_new_tokens: int, **cb_options) -> Generation:
    """generate_batch (continuous batching) with `attn_implementation`; `cb_options` go to
    ContinuousBatchingConfig (block_size, num_blocks, max_batch_tokens, use_cuda_graph, ...)."""
    from transformers import ContinuousBatchingConfig

    model.set_attn_implementation(attn_implementation)
    cb = ContinuousBatchingConfig(return_logprobs=True, **cb_options)
    start = time.perf_counter()
    out = model.generate_batch(
        prompts, generation_config=greedy_config(max_new_tokens), continuous_batching_config=cb, progress_bar=False
    )
    seconds = time.perf_counter() - start
    by_index = sorted(out.values(), key=lambda r: int(r.request_id.rsplit("_", 1)[1]))
    if len(by_index) != len(prompts) or any(r.error for r in by_index):
        errors = [r.error for r in by_index if r.error]
        raise RuntimeError(f"generate_batch returned {len(by_index)} of {len(prompts)} requests; errors: {errors[:3]}")
    return Generation([list(r.generated_tokens) for r in by_index], [list(r.logprobs) for r in by_index], None, seconds)


@dataclass
class Comparison:
    requests: int
    identical: int  # requests whose tokens all match
    first_divergence: list  # (request, step, reference margin at that step)
    max_logprob_diff: float  # over the steps before each request's first divergence

    @property
    def all_identical(self) -> bool:
        return self.identical == self.requests

    def summary(self) -> str:
        text = (
            f"{self.identical}/{self.requests} requests token-identical, "
            f"max |logprob diff| {self.max_logprob_diff:.2e} on the common prefix"
        )
        if self.first_divergence:
            text += "; first divergences (request, step, reference top1-top2 logit margin): " + ", ".join(
                f"({r}, {s}, {m if m is None else round(m, 4)})" for r, s, m in self.first_divergence[:5]
            )
        return text

    def record(self) -> dict:
        """What a results file keeps of the comparison (the first 10 divergences)."""
        return {
            "identical": self.identical,
            "requests": self.requests,
            "max_logprob_diff": self.max_logprob_diff,
            "first_divergences": self.first_divergence[:10],
        }


def compare(candidate: Generation, reference: Generation) -> Comparison:
    identical, divergences, max_diff = 0, [], 0.0
    for i, (a, b) in enumerate(zip(candidate.tokens, reference.tokens)):
        common = next((s for s, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a == b:
            identical += 1
        else:
            margin = reference.margins[i][common] if reference.margins and common < len(reference.margins[i]) else None
            divergences.append((i, common, margin))
        # the logprob of step `common` is still computed from identical inputs
        upto = min(common + 1, len(a), len(b))
        for x, y in zip(candidate.logprobs[i][:upto], reference.logprobs[i][:upto]):
            max_diff = max(max_diff, abs(x - y))
    return Comparison(len(reference.tokens), identical, divergences, max_diff)
