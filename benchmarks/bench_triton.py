"""Triton kernels of rlhf_fast against the PyTorch reference, torch.compile(reference) and
the peers that are installed (Liger-Kernel, TRL, flash-attn).

GPU (default shapes): bf16 logits, hidden states and weights (kl_penalty and the PPO losses:
fp32 log-probs, :func:`op_dtype`), B·T ∈ {4096, 16384, 65536}, H = 4096, V ∈ {32000, 151936}
(fused_linear_divergence: a Qwen2.5-0.5B student, H = 896, distilled from a 1.5B teacher,
Ht = 1536, V = 151936, against TRL 1.16's ChunkedDivergenceFunction); modes ``fwd`` and
``fwd+bwd``; per row the median time with 20th/80th percentiles (on our rows also the
reference's and the fastest peer's time ÷ ours at the same shape and mode), the extra peak memory
of one call, and the fraction of a measured device limit reached: the copy bandwidth (a
large ``clone``) for the memory-bound ops — counting the minimum bytes the op must move, each
input and output once (with the backward, each input gradient once too) —
or the bf16 matmul peak (a large ``torch.mm``) for the fused LM-head ops. A provider that
runs out of memory is recorded as ``OOM``.

CPU (``--quick``, or no GPU): correctness only, through Triton's interpreter on tiny
shapes (needs ``TRITON_INTERPRET=1`` in the environment before Python starts): the max
error of each op against the reference, forward and gradient.

    TRITON_INTERPRET=1 python -m rlhf_fast.benchmarks.bench_triton --quick   # CPU
    python -m rlhf_fast.benchmarks.bench_triton [--ops token_logprobs,fused_linear_logprobs]

Importable without a GPU or Triton: kernels and peers are imported inside the functions.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

from .common import Table, bench, cuda_extra_peak_bytes, fmt_bytes, write_results

BT_SIZES = (4096, 16384, 65536)
VOCABS = (32000, 151936)
HIDDEN = 4096
OPS = ("token_logprobs", "fused_linear_logprobs", "fused_linear_policy_loss", "kl_penalty", "ppo_policy_loss",
       "ppo_value_loss", "fused_linear_divergence")
# fused_linear_divergence: student width, teacher width and vocabulary of Qwen2.5-0.5B / 1.5B
DIVERGENCE_H, DIVERGENCE_HT, DIVERGENCE_V = 896, 1536, 151936
COLUMNS = ["op", "shape", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "vs_reference", "vs_best_peer",
           "best_peer", "peak_mem", "frac_of_limit", "limit", "error"]


def op_dtype(op: str) -> str:
    """The dtype of ``op``'s main inputs in the GPU tables: bf16 logits, hidden states and weights;
    kl_penalty and the PPO losses take fp32 log-probs, values and advantages (as the trainers pass them)."""
    return "bf16" if op == "token_logprobs" or op.startswith("fused_linear") else "fp32"


def _add_ratios(rows: List[dict]) -> None:
    """On each of our rows (provider ``rlhf_fast-…``) of one (shape, mode): ``vs_reference`` = the
    reference's median ÷ ours, ``vs_best_peer`` = the fastest peer's median ÷ ours (> 1: ours is
    faster), that peer named in ``best_peer``. The peers are every other provider that ran (not
    OOM, not failed) but the reference: torch.compile of it, TRL, Liger, flash-attn."""
    def ms(r):
        return r.get("median_ms")

    ref = next((ms(r) for r in rows if r["provider"] == "reference" and ms(r)), None)
    peers = [r for r in rows if not r["provider"].startswith("rlhf_fast") and r["provider"] != "reference" and ms(r)]
    best = min(peers, key=ms) if peers else None
    for r in rows:
        if not r["provider"].startswith("rlhf_fast") or not ms(r):
            continue
        if ref:
            r["vs_reference"] = ref / ms(r)
        if best is not None:
            r.update(vs_best_peer=ms(best) / ms(r), best_peer=best["provider"])


# --------------------------------------------------------------------------- device limits


def measured_limits(device: str = "cuda") -> Dict[str, float]:
    """Copy bandwidth (bytes/s, read + write of a 1 GiB clone) and bf16 matmul peak
    (FLOP/s, 8192³ ``torch.mm``), measured on ``device``."""
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)
    t = bench(lambda: x.clone(), warmup=2, rep=10, device=device)
    bw = 2 * x.numel() * x.element_size() / (t.median_ms / 1e3)
    del x
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t = bench(lambda: a @ b, warmup=2, rep=10, device=device)
    return {"copy_Bps": bw, "mm_flops": 2 * 8192 ** 3 / (t.median_ms / 1e3)}


# --------------------------------------------------------------------------- peers


def _peer(name: str) -> Optional[Callable]:
    """A peer implementation, or None when its package is not installed (or changed API)."""
    try:
        if name == "trl_selective_log_softmax":
            from trl.trainer.utils import selective_log_softmax

            return selective_log_softmax
        if name == "trl_entropy_from_logits":
            from trl.trainer.utils import entropy_from_logits

            return entropy_from_logits
        if name == "flash_attn_ce":
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

            return cross_entropy_loss
        if name == "liger_flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss
        if name == "liger_grpo":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            return LigerFusedLinearGRPOLoss
        if name == "trl_chunked_divergence":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            return ChunkedDivergenceFunction
    except Exception:
        return None
    return None


# --------------------------------------------------------------------------- cases


def _make_inputs(op: str, BT: int, V: int, H: int, dtype, device, *, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    B = max(1, BT // 1024) if BT >= 1024 else 1
    T = BT // B
    lab = torch.randint(0, V, (BT,), generator=g).to(device)
    if op == "token_logprobs":
        return dict(logits=rn(BT, V, scale=2.0).requires_grad_(grad), labels=lab)
    if op == "fused_linear_logprobs":
        return dict(hidden=rn(BT, H).requires_grad_(grad), weight=rn(V, H, scale=H ** -0.5).requires_grad_(grad),
                    labels=lab)
    if op == "fused_linear_divergence":
        Ht = H * DIVERGENCE_HT // DIVERGENCE_H  # the teacher wider than the student, as in the GPU table
        return dict(student_hidden=rn(BT, H).requires_grad_(grad),
                    student_weight=rn(V, H, scale=H ** -0.5).requires_grad_(grad),
                    teacher_hidden=rn(BT, Ht), teacher_weight=rn(V, Ht, scale=Ht ** -0.5))
    if op == "fused_linear_policy_loss":
        f32 = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
        return dict(hidden=rn(B, T, H).requires_grad_(grad), weight=rn(V, H, scale=H ** -0.5).requires_grad_(grad),
                    labels=lab.reshape(B, T), old_logp=f32(B, T) - 10, advantages=f32(B, T),
                    mask=torch.ones(B, T, dtype=torch.bool, device=device), ref_logp=f32(B, T) - 10)
    f32 = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    if op == "kl_penalty":
        return dict(logp=f32(B, T).requires_grad_(grad), ref_logp=f32(B, T))
    if op == "ppo_policy_loss":
        return dict(logp=f32(B, T).requires_grad_(grad), old_logp=f32(B, T), advantages=f32(B, T),
                    mask=torch.rand(B, T, generator=g).to(device) > 0.2)
    if op == "ppo_value_loss":
        return dict(values=f32(B, T).requires_grad_(grad), old_values=f32(B, T), returns=f32(B, T),
                    mask=torch.rand(B, T, generator=g).to(device) > 0.2)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _call(op: str, impl: Callable, x: Dict[str, torch.Tensor]):
    """Run one implementation with the op's public argument layout; returns a tensor to sum."""
    if op == "token_logprobs":
        lp, ent = impl(x["logits"], x["labels"], return_entropy=True)
        return lp.sum() + ent.sum()
    if op == "fused_linear_logprobs":
        lp, ent = impl(x["hidden"], x["weight"], x["labels"], return_entropy=True)
        return lp.sum() + ent.sum()
    if op == "fused_linear_policy_loss":
        return impl(x["hidden"], x["weight"], x["labels"], x["old_logp"], x["advantages"], x["mask"],
                    ref_logp=x["ref_logp"], kl_coef=0.05, entropy_coef=0.01)[0]
    if op == "fused_linear_divergence":
        # the trainer's call: one summed loss (ours then makes the gradients in its forward)
        return impl(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], beta=0.5,
                    reduction="sum")
    if op == "kl_penalty":
        return impl(x["logp"], x["ref_logp"], "k3").sum()
    if op == "ppo_policy_loss":
        return impl(x["logp"], x["old_logp"], x["advantages"], x["mask"], dual_clip=3.0)[0]
    return impl(x["values"], x["old_values"], x["returns"], x["mask"])[0]


def _ours(op: str) -> Callable:
    """The Triton entry of ``op`` (rlhf_fast/kernels)."""
    from rlhf_fast.kernels import fused_divergence, fused_linear, kl, ppo_loss, token_logprobs

    return {"token_logprobs": token_logprobs.token_logprobs, "fused_linear_logprobs": fused_linear.fused_linear_logprobs,
            "fused_linear_policy_loss": fused_linear.fused_linear_policy_loss, "kl_penalty": kl.kl_penalty,
            "ppo_policy_loss": ppo_loss.ppo_policy_loss, "ppo_value_loss": ppo_loss.ppo_value_loss,
            "fused_linear_divergence": fused_divergence.fused_linear_divergence}[op]


def _providers(op: str, compile_peer: bool = True) -> Dict[str, Callable]:
    """name -> callable(x) returning a scalar to backpropagate; ``compile_peer``: include
    torch.compile(reference), which compiles anew for every shape and mode (tens of seconds
    each on a GPU machine)."""
    from rlhf_fast.ops import reference

    ours = _ours(op)
    ref = getattr(reference, op)
    out = {"rlhf_fast-triton": lambda x: _call(op, ours, x), "reference": lambda x: _call(op, ref, x)}
    if op in ("fused_linear_logprobs", "fused_linear_policy_loss"):
        import functools

        atomics = functools.partial(ours, backward="triton")
        out["rlhf_fast-triton (backward=triton, atomics)"] = lambda x: _call(op, atomics, x)
    if compile_peer:
        compiled = torch.compile(ref, dynamic=False)
        out["torch.compile(reference)"] = lambda x: _call(op, compiled, x)
    if op == "token_logprobs":
        sel, ent = _peer("trl_selective_log_softmax"), _peer("trl_entropy_from_logits")
        if sel is not None and ent is not None:
            out["trl selective_log_softmax+entropy_from_logits"] = (
                lambda x: sel(x["logits"], x["labels"]).sum() + ent(x["logits"]).sum())
        ce = _peer("flash_attn_ce")
        if ce is not None:  # cross-entropy = −logp (no entropy): the closest fused peer
            out["flash-attn triton CE (logp only)"] = lambda x: -ce(x["logits"], x["labels"])[0].sum()
    if op == "fused_linear_logprobs":
        cls = _peer("liger_flce")
        if cls is not None:
            loss_fn = cls(reduction="sum")
            out["liger fused_linear_cross_entropy (logp only)"] = (
                lambda x: -loss_fn(x["weight"], x["hidden"], x["labels"]))
    if op == "fused_linear_divergence":
        # per-row divergences, summed by autograd: the backward re-projects each chunk
        out["rlhf_fast-triton (reduction=none)"] = lambda x: ours(
            x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], beta=0.5).sum()
        fn = _peer("trl_chunked_divergence")
        if fn is not None:
            out["trl ChunkedDivergenceFunction"] = lambda x: fn.apply(
                x["student_hidden"], x["student_weight"], None, x["teacher_hidden"], x["teacher_weight"], None, 0.5,
                1.0)[0].sum()
    if op == "fused_linear_policy_loss":
        cls = _peer("liger_grpo")
        if cls is not None:
            try:
                grpo = cls(beta=0.05, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")

                def liger(x):
                    B, T, H = x["hidden"].shape
                    return grpo(x["hidden"], x["weight"], x["labels"], x["mask"].int(), x["advantages"][:, 0],
                                ref_per_token_logps=x["ref_logp"], old_per_token_logps=x["old_logp"])[0]

                out["liger fused_linear_grpo"] = liger
            except Exception:
                pass
    return out


def _bytes_moved(op: str, x: Dict[str, torch.Tensor], backward: bool) -> int:
    """Minimum bytes an op must read and write: every input once and every output once — forward
    kl_penalty's ``[B, T]`` penalty (the losses return scalars); with ``backward`` also the gradient
    of each input that gets one (not the inputs a second time)."""
    if op == "token_logprobs":
        n = x["logits"].numel() * x["logits"].element_size()
        return n * (3 if backward else 1)  # backward: read logits again, write dlogits
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    total = sum(size(t) for t in x.values())
    if op == "kl_penalty":
        total += size(x["logp"])  # the penalty, logp's shape and dtype
    if backward:
        total += sum(size(t) for t in x.values() if t.requires_grad)
    return total


def _flops(op: str, x: Dict[str, torch.Tensor], backward: bool) -> int:
    if op == "fused_linear_divergence":
        # the minimum: both projections once, then dHidden and dW of the student
        (n, h), (v, ht) = x["student_hidden"].shape, x["teacher_weight"].shape
        return 2 * n * v * (h + ht) + (4 * n * v * h if backward else 0)
    w = x["weight"]
    n = x["hidden"].numel() // x["hidden"].shape[-1]
    f = 2 * n * w.shape[0] * w.shape[1]
    return f * (4 if backward else 1)  # backward: recompute + two gradient GEMMs


def run_gpu(ops=OPS, sizes=BT_SIZES, vocabs=VOCABS, hidden=HIDDEN, *, rep=10, device="cuda",
            compile_peer: bool = True) -> List[Table]:
    """The GPU benchmark: every op × shape × mode × provider. (``device="cpu"`` with tiny
    sizes under the interpreter only exercises this code path; its numbers mean nothing.)
    ``compile_peer=False`` leaves out torch.compile(reference), whose per-shape compiles
    take most of a short GPU lease."""
    on_gpu = torch.device(device).type == "cuda"
    limits = measured_limits(device) if on_gpu else {"copy_Bps": float("nan"), "mm_flops": float("nan")}
    tables = []
    for op in ops:
        t = Table(f"bench_triton: {op} ({op_dtype(op)})", list(COLUMNS))
        t.notes.append(f"limits measured here: copy {limits['copy_Bps'] / 1e9:.0f} GB/s, "
                       f"bf16 mm {limits['mm_flops'] / 1e12:.0f} TFLOP/s")
        t.notes.append("vs_reference / vs_best_peer (our rows): the reference's / the fastest peer's median ÷ ours "
                       "at the same shape and mode (> 1: ours faster); best_peer names it")
        matmul = op.startswith("fused_linear")
        vs = vocabs if (matmul or op == "token_logprobs") else (None,)
        h_op, extra = hidden, ""
        if op == "fused_linear_divergence":  # one model pair: the student/teacher sizes of the docstring
            vs, h_op, extra = (DIVERGENCE_V,), DIVERGENCE_H, f" Ht={DIVERGENCE_HT}"
        providers = _providers(op, compile_peer)  # once per op: torch.compile caches per callable
        for BT in sizes:
            for V in vs:
                shape = f"BT={BT}" + (f" V={V}" if V else "") + (f" H={h_op}{extra}" if matmul else "")
                for mode in ("fwd", "fwd+bwd"):
                    backward = mode == "fwd+bwd"
                    for name, fn in providers.items():
                        row = dict(op=op, shape=shape, mode=mode, provider=name)
                        try:
                            x = _make_inputs(op, BT, V or 1, h_op, torch.bfloat16, device, grad=backward)

                            def step():
                                y = fn(x)
                                if backward:
                                    y.backward()
                                return y

                            tm = bench(step, warmup=2, rep=rep, device=device)
                            row.update(median_ms=tm.median_ms, p20_ms=tm.p20_ms, p80_ms=tm.p80_ms,
                                       peak_mem=fmt_bytes(cuda_extra_peak_bytes(step)) if on_gpu else None)
                            if matmul:
                                row.update(frac_of_limit=_flops(op, x, backward) / (tm.median_ms / 1e3) / limits["mm_flops"],
                                           limit="bf16 mm peak")
                            else:
                                row.update(frac_of_limit=_bytes_moved(op, x, backward) / (tm.median_ms / 1e3)
                                           / limits["copy_Bps"], limit="copy bandwidth")
                        except torch.cuda.OutOfMemoryError:
                            row.update(error=None, median_ms=None, peak_mem="OOM")
                        except Exception as e:  # a peer's API changed: record, keep going
                            row.update(error=f"{type(e).__name__}: {str(e)[:120]}")
                        finally:
                            x = None
                            if on_gpu:
                                torch.cuda.empty_cache()
                        t.add(**row)
                        # one line per measurement as it lands: a device lease that runs out
                        # mid-table still leaves the rows measured so far in the log
                        print(f"bench_triton: {op} {shape} {mode} {name}: "
                              + (f"{row['median_ms']:.3f} ms" if row.get("median_ms") is not None
                                 else str(row.get("error") or row.get("peak_mem"))), file=sys.stderr, flush=True)
                    _add_ratios(t.rows[-len(providers):])  # this (shape, mode)'s rows, measured together
        tables.append(t)
    return tables


# --------------------------------------------------------------------------- CPU: correctness


def run_quick_cpu() -> List[Table]:
    """Correctness of every kernel under Triton's CPU interpreter on tiny shapes: max abs
    error against the reference, forward value and gradient (fp32 inputs)."""
    t = Table("bench_triton --quick (CPU, Triton interpreter): max |ours − reference|",
              ["op", "shape", "fwd_err", "grad_err", "error"])
    if os.environ.get("TRITON_INTERPRET") != "1":
        t.notes.append("skipped: set TRITON_INTERPRET=1 before Python starts to run the Triton kernels on the CPU")
        return [t]
    t.notes.append("interpreter timings mean nothing for the GPU, so none are reported")
    for op in OPS:
        BT, V, H = 64, 1000, 32
        for_ours = _providers_quick(op)
        try:
            x1 = _make_inputs(op, BT, V, H, torch.float32, "cpu", grad=True)
            x2 = {k: (v.detach().clone().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
                  for k, v in x1.items()}
            a = for_ours["ours"](x1)
            b = for_ours["reference"](x2)
            leaves1 = [v for v in x1.values() if v.requires_grad]
            leaves2 = [v for v in x2.values() if v.requires_grad]
            ga = torch.autograd.grad(a, leaves1)
            gb = torch.autograd.grad(b, leaves2)
            t.add(op=op, shape=f"BT={BT} V={V} H={H}", fwd_err=(a - b).abs().item(),
                  grad_err=max((p - q).abs().max().item() for p, q in zip(ga, gb)))
        except Exception as e:
            t.add(op=op, error=f"{type(e).__name__}: {e}")
    return [t]


def _providers_quick(op: str) -> Dict[str, Callable]:
    from rlhf_fast.ops import reference

    ours = _ours(op)
    return {"ours": lambda x: _call(op, ours, x), "reference": lambda x: _call(op, getattr(reference, op), x)}


def run_suite(device: str = "cpu", quick: bool = False) -> List[Table]:
    """Entry point of `rlhf-fast bench ops`: the GPU benchmark on ``cuda`` (``quick``: the
    smallest size only), the interpreter correctness run on ``cpu``."""
    if device == "cuda" and torch.cuda.is_available():
        return run_gpu(sizes=BT_SIZES[:1] if quick else BT_SIZES, rep=5 if quick else 10)
    return run_quick_cpu()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU correctness run (or the smallest GPU size)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops")
    p.add_argument("--sizes", default=",".join(map(str, BT_SIZES)), help="comma-separated B·T values")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to benchmarks/results")
    a = p.parse_args(argv)
    ops = [o for o in a.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"--ops must be among {OPS}, got {bad}")
    if torch.cuda.is_available() and not (a.quick and os.environ.get("TRITON_INTERPRET") == "1"):
        sizes = tuple(int(s) for s in a.sizes.split(","))
        tables = run_gpu(ops, sizes[:1] if a.quick else sizes)
        device = "cuda"
    else:
        tables = run_quick_cpu()
        device = "cpu"
    for t in tables:
        print(t.markdown() + "\n")
    if not a.no_write:
        write_results(tables, device=device, suite="bench_triton" + (" --quick" if a.quick else ""))
    return 1 if any(r.get("error") for t in tables for r in t.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
