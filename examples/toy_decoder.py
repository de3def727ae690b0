"""A toy decoder served through pagedattn: chunked prefill and decode over a PagedKVCache, through
the custom ops of `pagedattn.ops`, optionally torch.compile'd and CUDA-graph captured.

    TRITON_INTERPRET=1 python examples/toy_decoder.py       # CPU, tiny, Triton interpreter (pip install -e . first)
    python examples/toy_decoder.py --device cuda --compile --cuda-graphs

The model: random weights, token + position embeddings, `--layers` pre-norm blocks of GQA
attention (`--num-q-heads` query heads over `--num-kv-heads` KV heads) and a gated MLP. Every
layer writes its new K/V with `pagedattn::write_kv` and attends with `pagedattn::paged_attention`
(full-cache contract). One PagedKVCache allocates the blocks and holds layer 0's K/V; the other
layers' caches are tensors of the same shape indexed by the same block tables and slots.

Serving: every request starts at once; a step takes the decodes first, then prompt chunks up to
`--step-tokens` tokens, so short prompts decode while long ones are still in prefill (mixed
steps). Steps with only decodes run at a fixed batch size (`--requests` rows, finished requests
padded), so one captured CUDA graph serves them all: each step copies new tokens, positions,
slots, seq_lens and block tables into the same tensors and replays.

The check: every logit the served model produced (each prompt position and each decode step) is
compared with the same weights run densely in float32 over the request's whole token sequence
(plain causal attention, no cache, no paging). Exit status 1 if the error exceeds the dtype's
tolerance or a graph replay differs from the same step run directly.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import pagedattn.ops as ops  # registers torch.ops.pagedattn.*
from pagedattn import PagedKVCache

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |logit - dense fp32 reference| allowed; logits have a standard deviation of about 2
TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}
DEFAULTS = dict(  # option: (cpu default, cuda default)
    layers=(2, 4),
    hidden=(32, 512),
    num_q_heads=(4, 8),
    num_kv_heads=(2, 2),
    head_size=(16, 64),
    vocab=(64, 2048),
    block_size=(8, 16),
    requests=(3, 8),
    prompt_len=(20, 1000),
    new_tokens=(6, 32),
    step_tokens=(16, 512),
    bench_iters=(2, 50),
)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class Layer(torch.nn.Module):
    def __init__(self, a, init):
        super().__init__()
        qkv = (a.num_q_heads + 2 * a.num_kv_heads) * a.head_size
        self.register_buffer("wqkv", init(a.hidden, qkv))
        self.register_buffer("wo", init(a.num_q_heads * a.head_size, a.hidden))
        self.register_buffer("w_in", init(a.hidden, 4 * a.hidden))  # gate and up, 2 x 2 * hidden
        self.register_buffer("w_out", init(2 * a.hidden, a.hidden))


class ToyDecoder(torch.nn.Module):
    def __init__(self, a, max_len: int, device, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(a.seed)

        def init(rows, cols, std=None):  # well-scaled: activations and logits stay O(1)
            w = torch.randn(rows, cols, generator=g) * (std if std is not None else rows**-0.5)
            return w.to(device=device, dtype=dtype)

        self.heads = (a.num_q_heads, a.num_kv_heads, a.head_size)
        self.register_buffer("embed", init(a.vocab, a.hidden, 1.0))
        self.register_buffer("pos", init(max_len, a.hidden, 0.5))
        self.layers = torch.nn.ModuleList(Layer(a, init) for _ in range(a.layers))
        self.register_buffer("lm_head", init(a.hidden, a.vocab, 2 * a.hidden**-0.5))

    def forward(
        self,
        tokens,
        positions,
        slot_mapping,
        cu_seqlens_q,
        seq_lens,
        block_table,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_query_len: int,
        max_seq_len: int,
    ) -> torch.Tensor:
        """tokens, positions, slot_mapping: [num_tokens]; returns logits [num_tokens, vocab]. No
        host sync, no value-dependent Python: safe to compile and to capture."""
        hq, hkv, d = self.heads
        x = self.embed[tokens] + self.pos[positions]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            q, k, v = (rms_norm(x) @ layer.wqkv).split([hq * d, hkv * d, hkv * d], dim=-1)
            q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
            ops.write_kv(k, v, k_cache, v_cache, slot_mapping)  # full-cache contract: write first
            o = ops.paged_attention(
                q,
                k_cache,
                v_cache,
                cu_seqlens_q,
                seq_lens,
                block_table,
                max_query_len=max_query_len,
                max_seq_len=max_seq_len,
            )
            x = x + o.flatten(-2) @ layer.wo
            gate, up = (rms_norm(x) @ layer.w_in).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.w_out
        return rms_norm(x) @ self.lm_head


def dense_reference_logits(model: ToyDecoder, tokens: list[int]) -> torch.Tensor:
    """The same weights in float32 over a whole sequence at once: causal attention, no cache."""
    hq, hkv, d = model.heads
    w = {name: t.float() for name, t in model.named_buffers()}
    n = len(tokens)
    ids = torch.tensor(tokens, device=model.embed.device)
    x = w["embed"][ids] + w["pos"][:n]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    for i in range(len(model.layers)):
        q, k, v = (rms_norm(x) @ w[f"layers.{i}.wqkv"]).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = q.unflatten(-1, (hq, d))
        k = k.unflatten(-1, (hkv, d)).repeat_interleave(hq // hkv, dim=1)  # query head h reads KV head h // group
        v = v.unflatten(-1, (hkv, d)).repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", probs, v).flatten(-2) @ w[f"layers.{i}.wo"]
        gate, up = (rms_norm(x) @ w[f"layers.{i}.w_in"]).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[f"layers.{i}.w_out"]
    return (rms_norm(x) @ w["lm_head"]).cpu()


# ---------------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------------
@dataclass
class Request:
    prompt: list[int]
    max_new: int
    seq_id: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # one row per position fed

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def finished(self) -> bool:
        return len(self.generated) >= self.max_new


class DecodeInputs:
    """The fixed tensors a decode step reads: a captured graph replays over their new contents."""

    def __init__(self, batch: int, max_blocks: int, device):
        z = dict(device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, **z)
        self.positions = torch.zeros(batch, dtype=torch.long, **z)
        self.slot_mapping = torch.full((batch,), -1, dtype=torch.long, **z)
        self.cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, **z)  # one token each, always
        self.seq_lens = torch.ones(batch, dtype=torch.int32, **z)
        self.block_table = torch.zeros(batch, max_blocks, dtype=torch.int32, **z)

    def fill(self, tokens, positions, slots, batch) -> None:
        self.tokens.copy_(torch.tensor(tokens))
        self.positions.copy_(torch.tensor(positions))
        self.slot_mapping.copy_(torch.tensor(slots))
        self.seq_lens.copy_(batch.seq_lens)
        self.block_table.zero_()
        self.block_table[:, : batch.block_table.shape[1]].copy_(batch.block_table)

    def args(self):
        return (self.tokens, self.positions, self.slot_mapping, self.cu_seqlens_q, self.seq_lens, self.block_table)


class Server:
    def __init__(self, a, device, dtype):
        self.a, self.device, self.cuda = a, device, device.type == "cuda"
        max_len = a.prompt_len + a.new_tokens
        self.max_blocks = -(-max_len // a.block_size)
        # a fixed bound, not this step's maximum: the launch plan (tiles, KV splits) depends only
        # on shapes and these bounds, so one compiled graph and one captured graph serve all steps
        self.max_seq_len = self.max_blocks * a.block_size
        self.model = ToyDecoder(a, self.max_blocks * a.block_size, device, dtype)
        self.cache = PagedKVCache(
            a.requests * self.max_blocks + 1, a.block_size, a.num_kv_heads, a.head_size, dtype=dtype, device=device
        )
        self.kv = [(self.cache.k, self.cache.v)] + [
            (torch.full_like(self.cache.k, float("nan")), torch.full_like(self.cache.v, float("nan")))
            for _ in range(a.layers - 1)
        ]
        # padding rows of a decode step read this one-token sequence and write nothing (slot -1)
        self.pad_seq = self.cache.new_sequence()
        self.cache.reserve(self.pad_seq, 1)
        pad_slot = self.cache.slot_mapping([self.pad_seq], [1])
        for k_cache, v_cache in self.kv:
            kv = torch.randn(2, 1, a.num_kv_heads, a.head_size, device=device).to(dtype)
            ops.write_kv(kv[0], kv[1], k_cache, v_cache, pad_slot)
        self.decode_inputs = DecodeInputs(a.requests, self.max_blocks, device)
        forward = self.model.forward
        if a.compile:
            # two entry points (two code objects, two caches): one graph with dynamic token and
            # sequence counts for the prefill and mixed steps (see _mixed_step), one specialized
            # to the fixed decode batch
            self.prefill_fn = torch.compile(lambda *x: forward(*x), fullgraph=True, backend=a.compile_backend)
            self.decode_fn = torch.compile(
                lambda *x: forward(*x), fullgraph=True, backend=a.compile_backend, dynamic=False
            )
        else:
            self.prefill_fn = self.decode_fn = forward
        self.graph = None
        self.times = {"prefill": [], "decode": []}
        self.checks: dict[str, float] = {}
        self.bench: dict[str, float] = {}

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _timed(self, kind, fn):
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        self.times[kind].append(time.perf_counter() - t0)
        return out

    def serve(self, requests: list[Request]) -> None:
        for r in requests:
            r.seq_id = self.cache.new_sequence()
        while any(not r.finished for r in requests):
            decodes = [r for r in requests if not r.in_prefill and not r.finished]
            budget = self.a.step_tokens - len(decodes)
            chunks = []
            for r in requests:
                if r.in_prefill and budget > 0:
                    n = min(budget, len(r.prompt) - r.prefilled)
                    chunks.append((r, n))
                    budget -= n
            if chunks:
                self._mixed_step([(r, 1) for r in decodes] + chunks)
            else:
                self._decode_step(decodes)
            for r in requests:
                if r.finished and r.seq_id in self.cache.sequences:
                    self.cache.free(r.seq_id)

    def _feed(self, r: Request, n: int) -> tuple[list[int], list[int]]:
        if r.in_prefill:
            pos = list(range(r.prefilled, r.prefilled + n))
            return r.prompt[r.prefilled : r.prefilled + n], pos
        return [r.generated[-1]], [len(r.prompt) + len(r.generated) - 1]

    def _mixed_step(self, work: list[tuple[Request, int]]) -> None:
        seq_ids, lens = [r.seq_id for r, _ in work], [n for _, n in work]
        tokens, positions = [], []
        for r, n in work:
            t, p = self._feed(r, n)
            tokens += t
            positions += p
        self.cache.reserve(seq_ids, lens)
        slots = self.cache.slot_mapping(seq_ids, lens)
        batch = self.cache.batch(seq_ids, lens)
        block_table = torch.zeros(len(work), self.max_blocks, dtype=torch.int32, device=self.device)
        block_table[:, : batch.block_table.shape[1]] = batch.block_table
        args = (
            torch.tensor(tokens, device=self.device),
            torch.tensor(positions, device=self.device),
            slots,
            batch.cu_seqlens_q,
            batch.seq_lens,
            block_table,
            self.kv,
            self.a.step_tokens,
            self.max_seq_len,
        )
        for t in args[:6]:  # num_tokens, num_seqs vary from step to step: one graph for all of them
            torch._dynamo.maybe_mark_dynamic(t, 0)
        logits = self._timed("prefill", lambda: self.prefill_fn(*args))
        self._record(work, logits)

    def _decode_step(self, active: list[Request]) -> None:
        pad = self.a.requests - len(active)
        seq_ids = [r.seq_id for r in active]
        self.cache.reserve(seq_ids, [1] * len(active))
        batch = self.cache.batch(seq_ids + [self.pad_seq] * pad, [1] * self.a.requests)
        tokens, positions, slots = [], [], []
        for r in active:
            t, p = self._feed(r, 1)
            tokens += t
            positions += p
            slots.append(
                self.cache.block_table(r.seq_id)[p[0] // self.a.block_size] * self.a.block_size
                + p[0] % self.a.block_size
            )
        slots += [-1] * pad
        self.decode_inputs.fill(tokens + [0] * pad, positions + [0] * pad, slots, batch)
        args = self.decode_inputs.args() + (self.kv, 1, self.max_seq_len)
        if self.a.cuda_graphs and self.graph is None:
            self._capture(args)
        if self.graph is not None:
            logits = self._timed("decode", lambda: (self.graph.replay(), self.graph_logits)[1])
        else:
            if not self.bench:
                self._check_and_bench(args)
            logits = self._timed("decode", lambda: self.decode_fn(*args))
        self._record([(r, 1) for r in active], logits)

    def _capture(self, args) -> None:
        """Warm up (compilation, Triton JIT, split-KV workspace) on a side stream, capture one
        decode step, then check replay against direct calls and time both. Every call of this step
        writes the same K/V to the same slots, so the repeats leave the cache as one call would."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.decode_fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self.decode_fn(*args)
        self.graph.replay()
        replayed = self.graph_logits.clone()
        self._check_and_bench(args, replayed)
        self.bench["graph"] = self._bench(self.graph.replay)

    def _check_and_bench(self, args, replayed=None) -> None:
        direct = self.decode_fn(*args)
        if replayed is not None:
            self.checks["graph replay vs direct call"] = (replayed.float() - direct.float()).abs().max().item()
        if self.a.compile:
            eager = self.model(*args)
            self.checks["compiled vs eager"] = (direct.float() - eager.float()).abs().max().item()
        self.bench["no graph"] = self._bench(lambda: self.decode_fn(*args))

    def _bench(self, fn) -> float:
        fn()
        self._sync()
        t0 = time.perf_counter()
        for _ in range(self.a.bench_iters):
            fn()
        self._sync()
        return (time.perf_counter() - t0) / self.a.bench_iters

    def _record(self, work, logits) -> None:
        logits = logits.float().cpu()
        row = 0
        for r, n in work:
            r.logits.append(logits[row : row + n])
            if r.in_prefill:
                r.prefilled += n
            row += n
            if not r.in_prefill:  # the last row predicts the next token (greedy)
                r.generated.append(int(logits[row - 1].argmax()))


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the model step")
    p.add_argument("--compile-backend", default="inductor", help="inductor (default), aot_eager, eager")
    p.add_argument("--cuda-graphs", action="store_true", help="capture one decode step and replay it (cuda)")
    for name, (cpu, cuda) in DEFAULTS.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=int, default=None, help=f"default {cpu} on cpu, {cuda} on cuda"
        )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, (cpu, cuda) in DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, cuda if a.device == "cuda" else cpu)
    a.dtype = DTYPES[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    if a.cuda_graphs and a.device != "cuda":
        p.error("--cuda-graphs needs --device cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    if a.step_tokens < a.requests:
        p.error("--step-tokens must be at least --requests (every decode takes one token of a step)")
    if a.num_q_heads % a.num_kv_heads:
        p.error("--num-q-heads must be a multiple of --num-kv-heads")
    return a


def make_requests(a) -> list[Request]:
    g = torch.Generator().manual_seed(a.seed + 1)
    requests = []
    for i in range(a.requests):  # prompt lengths and output lengths spread over [1/4, 1] x the maximum
        frac = 1.0 if a.requests == 1 else 0.25 + 0.75 * i / (a.requests - 1)
        n = max(1, round(a.prompt_len * frac))
        prompt = torch.randint(a.vocab, (n,), generator=g).tolist()
        requests.append(Request(prompt, max(1, round(a.new_tokens * (1.25 - frac)))))
    return requests


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    mode = "eager" if not a.compile else f"torch.compile({a.compile_backend})"
    mode += " + CUDA graphs" if a.cuda_graphs else ""
    print(
        f"toy decoder: {a.layers} layers, hidden {a.hidden}, {a.num_q_heads} q / {a.num_kv_heads} kv heads "
        f"x {a.head_size}, {str(a.dtype).replace('torch.', '')} on {device}; {mode}"
    )
    with torch.no_grad():
        server = Server(a, device, a.dtype)
        requests = make_requests(a)
        t0 = time.perf_counter()
        server.serve(requests)
        serve_s = time.perf_counter() - t0
        max_err = 0.0
        for r in requests:
            fed = r.prompt + r.generated[:-1]
            got = torch.cat(r.logits)
            max_err = max(max_err, (got - dense_reference_logits(server.model, fed)).abs().max().item())
    tol = TOLERANCE[a.dtype]
    ok = max_err <= tol
    print(
        f"requests: {len(requests)} (prompts {len(requests[0].prompt)}..{len(requests[-1].prompt)} tokens, "
        f"{sum(len(r.generated) for r in requests)} tokens generated) in {serve_s:.2f} s"
    )
    for kind, ts in server.times.items():
        if ts:  # the first step of each kind pays for compilation (Triton JIT, torch.compile)
            rest = ts[1:] or ts
            print(
                f"{kind} steps: {len(ts)}, forward {1e3 * ts[0]:.3f} ms the first, "
                f"{1e3 * sum(rest) / len(rest):.3f} ms mean of the others"
            )
    for name, seconds in server.bench.items():
        print(f"decode step ({name}): {1e3 * seconds:.3f} ms  (mean of {a.bench_iters}, batch {a.requests})")
    for name, diff in server.checks.items():
        limit = 0.0 if name.startswith("graph") else tol
        ok &= diff <= limit
        print(f"max |{name}|: {diff:.3e}  (limit {limit:g})")
    print(f"max |logits - dense fp32 reference|: {max_err:.3e}  (tolerance {tol:g})")
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
