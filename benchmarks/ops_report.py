"""Correctness and speed of every public op of :mod:`rlhf_fast.ops` on every live CPU backend.

For each op and backend (``torch`` = the reference as dispatched, ``cpp`` when
``rlhf_fast._C`` is built, ``triton`` only when live, i.e. under ``TRITON_INTERPRET=1``)
the table shows the largest absolute error of the forward outputs — and, for
differentiable ops, of the input gradients — against the float64 reference on the same
inputs, the median time of forward (+ backward) and the speed-up over the ``torch`` row.
The ``torch`` row's own error is PyTorch's float32 rounding: the yardstick for the others.

``make demo`` prints this table (through ``rlhf_fast/demo/cli.py``) until the RL demo lands.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .common import Table, bench

# Modest sizes: the whole report stays under ~60 s on 2 busy cores, --quick under ~15 s.
_SIZES = {
    False: dict(N=512, V=8192, H=128, B=16, T=256, BS=32, G=8, VS=8192),
    True: dict(N=128, V=2048, H=64, B=4, T=64, BS=16, G=4, VS=2048),
}
# The Triton interpreter runs kernels in Python: keep its shapes tiny whatever the mode.
_TRITON_SIZES = dict(N=16, V=512, H=32, B=2, T=16, BS=4, G=4, VS=512)


@dataclass
class OpCase:
    """One op at one size: ``make(sizes, generator)`` gives ``(args, kwargs)``; ``grad_args``
    are the positions of the arguments that get gradients (empty: not differentiable)."""

    op: str
    label: str
    make: Callable[[dict, torch.Generator], Tuple[tuple, dict]]
    grad_args: Sequence[int] = field(default_factory=tuple)
    # sample draws randomness: both sides get a generator seeded identically
    seeded: bool = False


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def _mask(g, B, T):
    m = torch.rand(B, T, generator=g) < 0.8
    m[0] = False  # a fully masked row: an edge case every backend must handle
    if B > 1:
        m[1] = True
    return m


def _cases() -> List[OpCase]:
    def tl(s, g, dtype=torch.float32):
        logits = _randn(g, s["N"], s["V"], dtype=dtype) * 3
        labels = torch.randint(0, s["V"], (s["N"],), generator=g)
        labels[::17] = -100
        return (logits, labels), dict(return_entropy=True, temperature=0.9)

    def fl(s, g):
        hidden = _randn(g, s["N"], s["H"])
        weight = _randn(g, s["V"], s["H"]) / math.sqrt(s["H"])
        labels = torch.randint(0, s["V"], (s["N"],), generator=g)
        return (hidden, weight, labels), dict(return_entropy=True)

    def flpl(s, g):
        B, T = s["B"] // 2 or 1, s["T"] // 2 or 1
        hidden = _randn(g, B, T, s["H"])
        weight = _randn(g, s["V"], s["H"]) / math.sqrt(s["H"])
        labels = torch.randint(0, s["V"], (B, T), generator=g)
        old = -torch.rand(B, T, generator=g) * 8 - 4
        adv = _randn(g, B, T)
        ref = old + _randn(g, B, T) * 0.1
        return (hidden, weight, labels, old, adv, _mask(g, B, T)), dict(
            ref_logp=ref, kl_coef=0.05, entropy_coef=0.01, clip_high=0.28, dual_clip=3.0)

    def kl(s, g):
        lp = -torch.rand(s["B"], s["T"], generator=g) * 5
        return (lp, lp + _randn(g, s["B"], s["T"]) * 0.3), dict(kind="k3")

    def gae(s, g):
        B, T = s["B"], s["T"]
        return (_randn(g, B, T), _randn(g, B, T), _mask(g, B, T)), dict(gamma=0.99, lam=0.95)

    def dret(s, g):
        return (_randn(g, s["B"], s["T"]), _mask(g, s["B"], s["T"])), dict(gamma=0.99)

    def grp(s, g):
        return (_randn(g, s["BS"] * s["G"]), s["G"]), dict(kind="grpo")

    def mmean(s, g):
        return (_randn(g, s["B"], s["T"]), _mask(g, s["B"], s["T"])), {}

    def mwhiten(s, g):
        return (_randn(g, s["B"], s["T"]) * 2 + 1, _mask(g, s["B"], s["T"])), {}

    def ppo(s, g):
        B, T = s["B"], s["T"]
        old = -torch.rand(B, T, generator=g) * 5
        lp = old + _randn(g, B, T) * 0.2
        return (lp, old, _randn(g, B, T), _mask(g, B, T)), dict(clip_high=0.28, dual_clip=3.0)

    def vloss(s, g):
        B, T = s["B"], s["T"]
        old = _randn(g, B, T)
        return (old + _randn(g, B, T) * 0.3, old, _randn(g, B, T), _mask(g, B, T)), dict(clip=0.2)

    def smp(s, g):
        return (_randn(g, s["BS"], s["VS"]) * 3,), dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01)

    def fld(s, g):
        N, H, V = s["N"], s["H"], s["V"]
        student = (_randn(g, N, H), _randn(g, V, H) / math.sqrt(H))
        teacher = (_randn(g, N, 2 * H), _randn(g, V, 2 * H) / math.sqrt(2 * H))  # a wider teacher
        mask = torch.rand(N, generator=g) < 0.8
        return (*student, *teacher), dict(beta=0.5, temperature=0.9, mask=mask, return_entropy=True)

    return [
        OpCase("token_logprobs", "token_logprobs fp32", tl, (0,)),
        OpCase("token_logprobs", "token_logprobs bf16", lambda s, g: tl(s, g, torch.bfloat16), (0,)),
        OpCase("fused_linear_logprobs", "fused_linear_logprobs", fl, (0, 1)),
        OpCase("fused_linear_policy_loss", "fused_linear_policy_loss", flpl, (0, 1)),
        OpCase("fused_linear_divergence", "fused_linear_divergence jsd", fld, (0, 1)),
        OpCase("kl_penalty", "kl_penalty k3", kl, (0,)),
        OpCase("gae", "gae", gae),
        OpCase("discounted_returns", "discounted_returns", dret),
        OpCase("group_advantages", "group_advantages grpo", grp),
        OpCase("masked_mean", "masked_mean", mmean, (0,)),
        OpCase("masked_whiten", "masked_whiten", mwhiten, (0,)),
        OpCase("ppo_policy_loss", "ppo_policy_loss", ppo, (0,)),
        OpCase("ppo_value_loss", "ppo_value_loss", vloss, (0,)),
        OpCase("sample", "sample top-k/p/min-p", smp, seeded=True),
    ]


# --------------------------------------------------------------------------- helpers


def _tensors(out) -> List[torch.Tensor]:
    """Every tensor in an op's output (tuples and stats dicts flattened, in a fixed order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _max_err(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise RuntimeError(f"backends returned {len(a)} vs {len(b)} tensors")
    err = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise RuntimeError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        if not x.is_floating_point():
            err = max(err, float((x != y).sum()))  # integer outputs (tokens): count mismatches
            continue
        xd, yd = x.double(), y.double()
        both_inf = torch.isinf(xd) & torch.isinf(yd) & (torch.sign(xd) == torch.sign(yd))
        d = torch.where(both_inf, torch.zeros_like(xd), (xd - yd).abs())
        err = max(err, float(torch.nan_to_num(d, nan=float("inf")).max()))
    return err


# sample backends that turn the reference's uniforms into tokens (the rest draw Gumbel noise
# from their own Philox stream: other tokens, the same distribution)
_SAME_UNIFORMS = ("torch", "cpp")


def _own_stream_err(got: Sequence[torch.Tensor], args, kwargs) -> float:
    """For a sampler with its own random stream: the largest |logp − the reference's log-prob
    of the token drawn|, inf when a token lies outside the reference's kept set."""
    from rlhf_fast.ops import reference

    tok, logp = got
    target = reference.process_logits(args[0].double(), **kwargs).gather(1, tok[:, None])[:, 0]
    if not torch.isfinite(target).all():
        return float("inf")
    return float((logp.double() - target).abs().max())


def _prepare(args, grad_args, upcast: bool):
    """Fresh leaf copies of the inputs (float64 when ``upcast``), gradients where needed."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(torch.float64) if upcast else a.detach().clone()
            if i in grad_args:
                a.requires_grad_(True)
        out.append(a)
    return out


def _upcast_kwargs(kwargs, upcast: bool):
    if not upcast:
        return kwargs
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def _cotangents(outs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    # fixed pseudo-random weights so every element of every differentiable output matters
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def _run(fn, args, kwargs, case: OpCase, upcast: bool, prepared: Optional[list] = None):
    """Forward (+ backward): returns ``(forward tensors, gradient tensors)``. ``prepared``: leaf inputs
    from :func:`_prepare` to run on (their gradients reset) instead of fresh copies — the timed calls,
    which time the op, not the copy of its inputs."""
    if prepared is None:
        a = _prepare(args, case.grad_args, upcast)
    else:
        a = prepared
        for i in case.grad_args:
            a[i].grad = None
    kw = _upcast_kwargs(kwargs, upcast)
    if case.seeded:
        kw = dict(kw, generator=torch.Generator().manual_seed(7))
    out = fn(*a, **kw)
    outs = _tensors(out)
    grads: List[torch.Tensor] = []
    if case.grad_args:
        diff = [o for o in outs if o.requires_grad]
        cots = _cotangents(diff)
        total = sum((o.double() * c).sum() for o, c in zip(diff, cots))
        total.backward()
        grads = [a[i].grad for i in case.grad_args]
    return [o.detach() for o in outs], grads


def live_cpu_backends(op: str) -> List[str]:
    """Backends with an implementation of ``op`` that can run CPU tensors here."""
    from rlhf_fast.ops import _dispatch

    out = []
    for name in _dispatch.implemented(op):
        if not _dispatch._runs_on(name, torch.device("cpu")):
            continue
        if _dispatch.backend_available(name)[0]:
            out.append(name)
    order = {b: i for i, b in enumerate(_dispatch.BACKENDS)}
    return sorted(out, key=lambda b: order[b])


# --------------------------------------------------------------------------- report


def collect(quick: bool = False, ops: Optional[Sequence[str]] = None) -> Table:
    """Run every case on every live CPU backend; return the result :class:`Table`.

    Each row: ``op``, ``backend``, ``fwd_err`` / ``bwd_err`` (max abs error against the
    float64 reference; integer outputs such as sampled tokens count mismatches), ``ms``
    (median forward + backward time), ``p20``/``p80``, ``speedup`` (torch row ÷ this row),
    ``error`` (the exception, if the backend failed).
    """
    import rlhf_fast.ops as ops_mod
    from rlhf_fast.ops import reference, use_backend

    table = Table(
        "rlhf_fast ops on the CPU: error vs the float64 reference, time, speed-up vs torch",
        ["op", "backend", "fwd_err", "bwd_err", "ms", "p20", "p80", "speedup", "error"],
    )
    # many repeats for fast calls (a median robust to other processes' bursts), few for slow ones
    rep = 10 if quick else 30
    max_time = 0.2 if quick else 0.6
    for case in _cases():
        if ops is not None and case.op not in ops:
            continue
        backends = live_cpu_backends(case.op)
        ref_ms = None
        for backend in backends:
            sizes = _TRITON_SIZES if backend == "triton" else _SIZES[quick]
            g = torch.Generator().manual_seed(0)
            args, kwargs = case.make(sizes, g)
            row = dict(op=case.label, backend=backend)
            try:
                # oracle: the reference in float64 (sample: same dtype, so ties break alike)
                want = _run(getattr(reference, case.op), args, kwargs, case, upcast=not case.seeded)
                fn = getattr(ops_mod, case.op)

                def call():
                    with use_backend(backend):
                        return _run(fn, args, kwargs, case, upcast=False)

                got = call()
                if case.seeded and backend not in _SAME_UNIFORMS:
                    row["fwd_err"] = _own_stream_err(got[0], args, kwargs)
                else:
                    row["fwd_err"] = _max_err(got[0], want[0])
                row["bwd_err"] = _max_err(got[1], want[1]) if case.grad_args else None
                inputs = _prepare(args, case.grad_args, False)  # copied once, outside the timed calls

                def timed():
                    with use_backend(backend):
                        return _run(fn, args, kwargs, case, upcast=False, prepared=inputs)

                t = bench(timed, warmup=1, rep=rep, max_time_s=max_time)
                row.update(ms=t.median_ms, p20=t.p20_ms, p80=t.p80_ms)
                if backend == "torch":
                    ref_ms = t.median_ms
                row["speedup"] = (ref_ms / t.median_ms) if (ref_ms and backend != "triton") else None
                # _max_err reads a NaN as inf: either is a broken backend, not a large error
                bad = [k for k in ("fwd_err", "bwd_err") if row.get(k) is not None and not math.isfinite(row[k])]
                if bad:
                    row["error"] = (f"non-finite {' / '.join(bad)}: NaN or inf where the reference is finite "
                                    f"(or a sampled token outside the kept set)")
            except Exception as e:  # a broken backend is a row in the report, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            table.rows.append(row)
    table.notes.append("fwd_err/bwd_err: max |backend − float64 reference| over every output / input "
                       "gradient; for sampled tokens, the number of rows whose token differs from the "
                       "reference's for the same uniforms (torch, cpp) or, for a backend drawing its own "
                       "Philox noise (triton), max |logp − the reference's log-prob of the drawn token| "
                       "(inf if a token is outside the kept set)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        table.notes.append("triton rows run under TRITON_INTERPRET=1 at tiny sizes: no speed-up shown")
    return table


def main(quick: bool = False) -> int:
    """Print the ops table. Returns 0, or 1 when a backend raised or returned NaN / inf where the
    reference is finite (an infinite error)."""
    import rlhf_fast

    t0 = time.perf_counter()
    info = rlhf_fast.backends()
    live = [n for n, b in info["backends"].items() if b["available"]]
    print(f"rlhf_fast {info['rlhf_fast']} · torch {info['torch']} · triton {info['triton']} · "
          f"{info['cpu_threads']} CPU threads · live backends: {', '.join(live)}")
    table = collect(quick=quick)
    print(table.markdown())
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    bad = [r for r in table.rows if r.get("error") or any(
        isinstance(r.get(k), float) and not math.isfinite(r[k]) for k in ("fwd_err", "bwd_err"))]
    return 1 if bad else 0


if __name__ == "__main__":
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    sys.exit(main(quick=p.parse_args().quick))
