"""Rollout and log-prob benchmark on a small model built from a config (CPU by default).

Providers side by side:
* log-prob pass (no grad, as for old/reference log-probs) and forward+backward (training):
  ours (``rlhf_fast.models.sequence_logprobs``, LM head fused, no [B, T, V] logits), the same
  with the backbone run by transformers' modules instead of ``models/llama_forward.py``, and a
  plain ``model(...).logits`` + ``log_softmax`` + gather;
* generation: ours (``HFRolloutEngine`` on ``rlhf_fast.ops.sample``) vs ``model.generate``
  with transformers' sampling processors (temperature, top-k, top-p).

Reports the median time with 20th/80th percentiles, peak memory (the allocator's own
timeline from torch.profiler on CPU, ``max_memory_allocated`` on CUDA) and tokens/s.

    .venv/bin/python benchmarks/bench_rollout.py --vocab 32000 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_fast.models import llama_forward, sequence_logprobs, tiny_causal_lm  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, SamplingParams  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, repeats):
    """Median, 20th and 80th percentile seconds of ``fn`` after one warm-up call."""
    fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return statistics.median(ts), q(0.2), q(0.8)


def peak_bytes(fn, device):
    """Peak bytes allocated while ``fn`` runs, above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # replay the allocator's alloc/free events in time order
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def plain_logprobs(model, ids, am, resp, temperature=1.0):
    """The baseline: full [B, T, V] logits, log_softmax, gather."""
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros_like(logp[:, :1]), logp * resp[:, 1:]], 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query attention); "
                                                                 "default: --heads")
    ap.add_argument("--family", default="llama", choices=["llama", "qwen2", "qwen3", "mistral", "gpt2"])
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2 x --hidden)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--resp", type=int, default=256, help="response tokens per row (the computed positions)")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="append a JSON line with the results to this file")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="after the timings, profile one call of our generate (torch.profiler) and print where "
                         "its time goes: the top ops by self CPU time and, on CUDA, the top kernels and GPU busy time")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = tiny_causal_lm(args.vocab, family=args.family, hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                           max_position_embeddings=max(args.seq, args.prompt_len + args.max_new) + 8,
                           dtype=dtype).to(device)
    B, T, V = args.batch, args.seq, args.vocab
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (B, T), generator=g).to(device)
    am = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, T - args.resp:] = 1
    rows = []

    def record(name, mode, fn):
        med, p20, p80 = time_it(fn, device, args.repeats)
        peak = peak_bytes(fn, device)
        rows.append({"provider": name, "mode": mode, "ms": med * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3,
                     "peak_MiB": peak / 2**20})

    def ours_nograd():
        with torch.no_grad():
            sequence_logprobs(model, ids, am, response_mask=resp)

    def plain_nograd():
        with torch.no_grad():
            plain_logprobs(model, ids, am, resp)

    # gradients zeroed in place, not freed: on the CPU the peak is replayed from the allocator's
    # events of the call, where freeing the last call's gradients first would count as negative
    # and hide that much of the call's own peak (ours measured 165 MiB, plain 25 MiB, at V=32000,
    # H=512, 4 layers; 116 and 132 MiB with the gradients kept)
    def ours_train():
        model.zero_grad(set_to_none=False)
        sequence_logprobs(model, ids, am, response_mask=resp).sum().backward()

    def plain_train():
        model.zero_grad(set_to_none=False)
        plain_logprobs(model, ids, am, resp).sum().backward()

    def on_transformers_backbone(fn):
        # the same call with the backbone run by transformers' modules instead of
        # models/llama_forward.py: what that forward alone changes
        def call():
            with mock.patch.object(llama_forward, "supported", lambda *a: False):
                fn()
        return call

    record("ours (fused head)", "logprob no-grad", ours_nograd)
    record("ours, transformers backbone", "logprob no-grad", on_transformers_backbone(ours_nograd))
    record("logits + log_softmax", "logprob no-grad", plain_nograd)
    record("ours (fused head)", "logprob fwd+bwd", ours_train)
    record("ours, transformers backbone", "logprob fwd+bwd", on_transformers_backbone(ours_train))
    record("logits + log_softmax", "logprob fwd+bwd", plain_train)
    model.zero_grad(set_to_none=True)

    gen_rows = []
    if not args.skip_generate:
        prompts = torch.randint(4, V, (args.gen_batch, args.prompt_len), generator=g).tolist()
        engine = HFRolloutEngine(model, _IdTokenizer(V), device=device)
        params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=args.max_new, seed=0,
                                ignore_eos=True)

        def ours_gen():
            return engine.generate(prompts, params)

        enc = torch.tensor(prompts, device=device)

        def hf_gen():
            with torch.no_grad():
                return model.generate(input_ids=enc, attention_mask=torch.ones_like(enc), do_sample=True,
                                      temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=args.max_new,
                                      min_new_tokens=args.max_new, pad_token_id=0)

        providers = [("ours (HFRolloutEngine + ops.sample)", ours_gen)]
        if device.type == "cuda":  # the decode step replayed as a CUDA graph (the default) vs eager
            eager_engine = HFRolloutEngine(model, _IdTokenizer(V), device=device, cuda_graphs=False)
            providers.append(("ours, eager decode (no CUDA graph)", lambda: eager_engine.generate(prompts, params)))
        providers.append(("transformers generate", hf_gen))
        n_tok = args.gen_batch * args.max_new
        for name, fn in providers:
            med, p20, p80 = time_it(fn, device, max(1, args.repeats // 2))
            gen_rows.append({"provider": name, "mode": "generate", "ms": med * 1e3, "p20_ms": p20 * 1e3,
                             "p80_ms": p80 * 1e3, "tokens_per_s": n_tok / med})

    if args.profile and not args.skip_generate:
        print(profile_summary(ours_gen, device))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    from rlhf_fast.ops import _dispatch

    backends = ",".join(f"{op}:{_dispatch.select(op, device)[0]}" for op in ("fused_linear_logprobs", "sample"))
    load = f" load={os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    header = (f"device={dev_name} threads={torch.get_num_threads()}{load} backends={backends} "
              f"torch={torch.__version__} commit={commit} "
              f"family={args.family} V={V} H={args.hidden} I={getattr(model.config, 'intermediate_size', None)} "
              f"L={args.layers} heads={args.heads}/{args.kv_heads or args.heads} B={B} T={T} resp={args.resp} "
              f"dtype={args.dtype}")
    print(header)
    print(f"{'provider':38s} {'mode':18s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'peak MiB':>9s} {'tok/s':>8s}")
    for r in rows + gen_rows:
        print(f"{r['provider']:38s} {r['mode']:18s} {r['ms']:10.1f} {r['p20_ms']:8.1f} {r['p80_ms']:8.1f} "
              f"{r.get('peak_MiB', float('nan')):9.1f} {r.get('tokens_per_s', float('nan')):8.1f}")
    for mode in ("logprob no-grad", "logprob fwd+bwd"):
        o, t, p = [r for r in rows if r["mode"] == mode]  # ours, ours on transformers' backbone, plain
        print(f"{mode}: peak memory {p['peak_MiB'] / max(o['peak_MiB'], 1e-9):.1f}x lower, "
              f"time {p['ms'] / o['ms']:.2f}x (plain / ours); backbone forward alone: peak "
              f"{t['peak_MiB'] / max(o['peak_MiB'], 1e-9):.2f}x lower, time {t['ms'] / o['ms']:.2f}x "
              f"(transformers' / ours); B*T*V*4 = {B * T * V * 4 / 2**20:.0f} MiB")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"header": header, "rows": rows + gen_rows}) + "\n")


def profile_summary(fn, device: torch.device, rows: int = 15) -> str:
    """One profiled call of ``fn`` (after the timed ones, so nothing is compiled or captured
    for the first time in it): wall time, the top ops by self CPU time and, on CUDA, the top
    kernels by self CUDA time and their sum (GPU busy time; wall minus it is host-bound time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    avg = prof.key_averages()
    out = [f"profile of one generate call: {wall * 1e3:.1f} ms wall (profiler overhead included)",
           avg.table(sort_by="self_cpu_time_total", row_limit=rows)]
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in avg) / 1e3
        out += [f"GPU busy {busy:.1f} ms of {wall * 1e3:.1f} ms wall", avg.table(sort_by="self_device_time_total",
                                                                                row_limit=rows)]
    return "\n".join(out)


class _IdTokenizer:
    """Just enough of a tokenizer for token-id prompts (the benchmark needs no text)."""

    def __init__(self, vocab_size):
        self.pad_token_id, self.eos_token_id = 0, 1
        self.vocab_size = vocab_size

    def __call__(self, text):
        raise TypeError("the benchmark passes token ids")

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))

    def batch_decode(self, seqs, skip_special_tokens=False):
        return [self.decode(s) for s in seqs]


if __name__ == "__main__":
    main()
