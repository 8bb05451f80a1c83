"""The foundation benchmark: the C++ CPU kernels against the PyTorch reference and the peers.

One run, same inputs. Per case the providers are ``torch`` (reference.py as dispatched),
``cpp`` (rlhf_fast._C) and the peers: what TRL / verl / OpenRLHF / transformers do for the
same computation on the CPU, and ``torch.compile(reference)``. For each: the median time with
20th/80th percentiles and the extra peak memory of one call, measured in a fresh subprocess
(peak RSS, see :mod:`rlhf_fast.benchmarks.common`). The goals of the foundation issue are
printed next to the measured ratios, against the reference and against the best peer; they
are stated, never asserted.

Cases (``scale`` multiplies the token/row counts, 1.0 = the issue's sizes):

* token_logprobs, B·T = 4096, V = 32000, fp32 and bf16, forward; fp32 with entropy too;
* fused_linear_logprobs, N = 4096, H = 512, V = 32000, chunk 256 rows, forward;
* fused_linear_divergence (distillation, beta = 0.5, reduction sum), N = 2048 rows, student
  H = 896, teacher Ht = 1536, V = 32000, auto chunk, forward + backward;
* gae and discounted_returns, B = 64, T = 2048, right-padded responses;
* ppo_policy_loss, B·T = 65536, forward + backward;
* sample, B = 64, V = 32000, top_p = 0.9 (the reference is the sort-based top-p) and plain
  temperature.

Peers (a peer whose package is missing gets a ``not installed`` row):

* token_logprobs: ``trl.trainer.utils.selective_log_softmax`` (+ ``entropy_from_logits``);
* fused_linear_logprobs: TRL's way, ``hidden @ weight.T`` then ``selective_log_softmax``;
* fused_linear_divergence: TRL 1.16's ``ChunkedDivergenceFunction`` (DistillationTrainer's loss,
  trl/kernels/chunked_divergence.py; its CPU path is the torch tile functions);
* gae / discounted_returns: the Python loop over T of TRL / verl / OpenRLHF;
* ppo_policy_loss: the clipped loss composed of torch ops as TRL's PPOTrainer writes it;
* sample: transformers' sort-based top-p warper + ``torch.multinomial``; plain
  ``torch.multinomial`` for temperature only;
* every case but sample: ``torch.compile(reference.<op>)``, in a subprocess with a time
  limit (compiling takes tens of seconds per op on the CPU), only in full-scale runs unless
  asked for. Liger-Kernel, flash-attn's cross-entropy and FlashInfer's sampler are CUDA
  kernels: they are compared in bench_triton / bench_gae_sampling on a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .common import (Table, Timing, bench, extra_peak_bytes_subprocess, fmt_bytes, profiler_extra_peak_bytes,
                     rss_extra_peak_bytes_here)

V = 32000
FL_CHUNK = 256  # rows of logits per chunk in fused_linear_logprobs: one chunk = 256·V·4 bytes
MEM_RESOLUTION = 65536  # glibc's mmap threshold as set for the memory subprocesses (see common.py)
COMPILE_TIMEOUT_S = 300.0
MODULE = "rlhf_fast.benchmarks.bench_cpu_ops"  # importable by the subprocesses even when run as __main__
COLUMNS = ["case", "backend", "ms", "p20", "p80", "extra_peak", "speedup", "mem_ratio", "best_peer", "goal",
           "verdict", "note", "error"]


def _scale() -> float:
    # read from the environment so the memory subprocesses build the same sizes
    s = float(os.environ.get("RLHF_FAST_BENCH_SCALE", "1.0"))
    if not (0 < s <= 1.0):
        raise ValueError(f"RLHF_FAST_BENCH_SCALE must be in (0, 1], got {s}")
    return s


def _n(x: int) -> int:
    return max(1, int(round(x * _scale())))


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------ inputs of each case (dicts of tensors and settings)


def _inputs_token_logprobs(dtype: torch.dtype, entropy: bool) -> dict:
    g = _g()
    logits = (torch.randn(_n(4096), V, generator=g) * 3).to(dtype)  # [N, V]
    labels = torch.randint(0, V, (logits.shape[0],), generator=g)  # [N] int64
    return dict(logits=logits, labels=labels, entropy=entropy)


def inputs_token_logprobs_fp32() -> dict:
    return _inputs_token_logprobs(torch.float32, False)


def inputs_token_logprobs_bf16() -> dict:
    return _inputs_token_logprobs(torch.bfloat16, False)


def inputs_token_logprobs_entropy() -> dict:
    return _inputs_token_logprobs(torch.float32, True)


def inputs_fused_linear_logprobs() -> dict:
    g = _g()
    N, H = _n(4096), 512
    hidden = torch.randn(N, H, generator=g)  # [N, H] fp32
    weight = torch.randn(V, H, generator=g) / H ** 0.5  # [V, H] fp32
    labels = torch.randint(0, V, (N,), generator=g)
    return dict(hidden=hidden, weight=weight, labels=labels)


DIV_BETA = 0.5  # TRL DistillationConfig's generalised JSD (the mixture: both models' log-sum-exps)


def inputs_fused_linear_divergence() -> dict:
    g = _g()
    N, H, Ht = _n(2048), 896, 1536  # a Qwen2.5-0.5B student, a Qwen2.5-1.5B teacher (widths)
    sh = torch.randn(N, H, generator=g).requires_grad_(True)  # [N, H] fp32
    sw = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)  # [V, H] fp32
    th = torch.randn(N, Ht, generator=g)  # [N, Ht] fp32, the frozen teacher
    tw = torch.randn(V, Ht, generator=g) / Ht ** 0.5  # [V, Ht]
    return dict(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw, beta=DIV_BETA)


def _right_padded_mask(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    # responses of random length in [T/2, T], padding on the right: the layout the peers'
    # loops assume (they zero masked positions instead of skipping them, which agrees with
    # ours only when the padding is at the end)
    lengths = torch.randint(max(1, T // 2), T + 1, (B, 1), generator=g)
    return torch.arange(T).unsqueeze(0) < lengths  # [B, T] bool


def inputs_gae() -> dict:
    g = _g()
    B, T = 64, _n(2048)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return dict(rewards=rewards, values=values, mask=_right_padded_mask(B, T, g), gamma=0.99, lam=0.95)


def inputs_discounted_returns() -> dict:
    g = _g()
    B, T = 64, _n(2048)
    return dict(rewards=torch.randn(B, T, generator=g), mask=_right_padded_mask(B, T, g), gamma=0.99)


def inputs_ppo_policy_loss() -> dict:
    g = _g()
    B, T = 64, _n(1024)  # B·T = 65536
    old = -torch.rand(B, T, generator=g) * 5
    logp = (old + torch.randn(B, T, generator=g) * 0.2).requires_grad_(True)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.9
    return dict(logp=logp, old_logp=old, advantages=adv, mask=mask, clip=0.2)


def _inputs_sample(kw: dict) -> dict:
    logits = torch.randn(_n(64), V, generator=_g()) * 3  # [B, V] fp32
    return dict(logits=logits, generator=torch.Generator().manual_seed(1), kw=kw)


def inputs_sample_top_p() -> dict:
    return _inputs_sample(dict(top_p=0.9))


def inputs_sample_temperature() -> dict:
    return _inputs_sample(dict(temperature=1.0))


# ------------------------------------------------ our op on those inputs (backend chosen by use_backend)


def ours_token_logprobs(x: dict) -> Callable:
    from rlhf_fast.ops import token_logprobs

    return lambda: token_logprobs(x["logits"], x["labels"], return_entropy=x["entropy"])


def ours_fused_linear_logprobs(x: dict) -> Callable:
    from rlhf_fast.ops import fused_linear_logprobs

    return lambda: fused_linear_logprobs(x["hidden"], x["weight"], x["labels"], chunk_size=FL_CHUNK)


def _divergence_fwd_bwd(loss_fn: Callable, x: dict) -> Callable:
    """Forward + backward of the summed divergence; gradients to the student's hidden and weight."""

    def fwd_bwd():
        x["student_hidden"].grad = x["student_weight"].grad = None
        loss = loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
        loss.backward()
        return loss

    return fwd_bwd


def ours_fused_linear_divergence(x: dict) -> Callable:
    from rlhf_fast.ops import fused_linear_divergence

    return _divergence_fwd_bwd(lambda *a: fused_linear_divergence(*a, beta=x["beta"], reduction="sum"), x)


def ours_gae(x: dict) -> Callable:
    from rlhf_fast.ops import gae

    return lambda: gae(x["rewards"], x["values"], x["mask"], gamma=x["gamma"], lam=x["lam"])


def ours_discounted_returns(x: dict) -> Callable:
    from rlhf_fast.ops import discounted_returns

    return lambda: discounted_returns(x["rewards"], x["mask"], gamma=x["gamma"])


def _policy_fwd_bwd(loss_fn: Callable, x: dict) -> Callable:
    def fwd_bwd():
        x["logp"].grad = None
        loss, _ = loss_fn(x["logp"], x["old_logp"], x["advantages"], x["mask"])
        loss.backward()
        return loss

    return fwd_bwd


def ours_ppo_policy_loss(x: dict) -> Callable:
    from rlhf_fast.ops import ppo_policy_loss

    return _policy_fwd_bwd(lambda *a: ppo_policy_loss(*a, clip_low=x["clip"]), x)


def ours_sample(x: dict) -> Callable:
    from rlhf_fast.ops import sample

    return lambda: sample(x["logits"], generator=x["generator"], **x["kw"])


# ------------------------------------------------ peers


def _trl_utils() -> Tuple[Callable, Callable]:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return selective_log_softmax, entropy_from_logits


def peer_trl_token_logprobs(x: dict) -> Callable:
    """TRL's per-token log-prob (and entropy) of given labels: a loop over rows."""
    sel, ent = _trl_utils()
    if x["entropy"]:
        return lambda: (sel(x["logits"], x["labels"]), ent(x["logits"]))
    return lambda: sel(x["logits"], x["labels"])


def peer_trl_fused_linear(x: dict) -> Callable:
    """What TRL does with a policy's last hidden states: the full logits, then selective_log_softmax."""
    sel, _ = _trl_utils()
    return lambda: sel(x["hidden"] @ x["weight"].T, x["labels"])


def peer_trl_chunked_divergence(x: dict) -> Callable:
    """TRL's DistillationTrainer loss: ChunkedDivergenceFunction (per-token divergence, summed)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    def loss(sh, sw, th, tw):
        div, _ = ChunkedDivergenceFunction.apply(sh, sw, None, th, tw, None, x["beta"])
        return div.sum()

    return _divergence_fwd_bwd(loss, x)


def discounted_returns_python_loop(rewards: torch.Tensor, mask: torch.Tensor,
                                   gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE returns as OpenRLHF's ``get_cumulative_returns`` computes them: a Python loop
    over T on ``[B, T]`` tensors, masked rewards zeroed (right padding), float32 ``[B, T]``."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def peer_gae_loop(x: dict) -> Callable:
    from .bench_gae_sampling import gae_python_loop

    m = x["mask"].float()
    return lambda: gae_python_loop(x["rewards"], x["values"], m, gamma=x["gamma"], lam=x["lam"])


def peer_discounted_loop(x: dict) -> Callable:
    m = x["mask"].float()
    return lambda: discounted_returns_python_loop(x["rewards"], m, gamma=x["gamma"])


def ppo_policy_loss_composed(logp, old_logp, advantages, mask, clip: float = 0.2):
    """The clipped PPO policy loss as TRL's PPOTrainer writes it, in plain torch ops.

    logp, old_logp, advantages, mask ``[B, T]``. Token mean over the mask, plus the statistics
    it logs (clip fraction, approx KL, mean ratio) as masked means. Returns ``(loss, stats)``.
    """
    ratio = torch.exp(logp - old_logp)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    m = mask.to(logp.dtype)
    n = m.sum()
    loss = (torch.max(pg_losses, pg_losses2) * m).sum() / n
    with torch.no_grad():
        stats = {"clip_frac": ((pg_losses2 > pg_losses).to(m.dtype) * m).sum() / n,
                 "approx_kl": (0.5 * (logp - old_logp) ** 2 * m).sum() / n,
                 "ratio_mean": (ratio * m).sum() / n}
    return loss, stats


def peer_ppo_composed(x: dict) -> Callable:
    return _policy_fwd_bwd(lambda *a: ppo_policy_loss_composed(*a, clip=x["clip"]), x)


def peer_sample_sort(x: dict) -> Callable:
    from .bench_gae_sampling import sample_torch_sort

    return lambda: sample_torch_sort(x["logits"], generator=x["generator"], **x["kw"])


def peer_sample_multinomial(x: dict) -> Callable:
    from .bench_gae_sampling import sample_multinomial

    return lambda: sample_multinomial(x["logits"], generator=x["generator"], **x["kw"])


def _compiled(op: str) -> Callable:
    from rlhf_fast.ops import reference

    # dynamic=False: one graph per shape, as a training loop with fixed shapes would get
    return torch.compile(getattr(reference, op), dynamic=False)


def compiled_token_logprobs(x: dict) -> Callable:
    f = _compiled("token_logprobs")
    return lambda: f(x["logits"], x["labels"], return_entropy=x["entropy"])


def compiled_fused_linear_logprobs(x: dict) -> Callable:
    f = _compiled("fused_linear_logprobs")
    return lambda: f(x["hidden"], x["weight"], x["labels"])


def compiled_fused_linear_divergence(x: dict) -> Callable:
    f = _compiled("fused_linear_divergence")
    return _divergence_fwd_bwd(lambda *a: f(*a, beta=x["beta"], reduction="sum"), x)


def compiled_gae(x: dict) -> Callable:
    f = _compiled("gae")
    return lambda: f(x["rewards"], x["values"], x["mask"], gamma=x["gamma"], lam=x["lam"])


def compiled_discounted_returns(x: dict) -> Callable:
    f = _compiled("discounted_returns")
    return lambda: f(x["rewards"], x["mask"], gamma=x["gamma"])


def compiled_ppo_policy_loss(x: dict) -> Callable:
    f = _compiled("ppo_policy_loss")
    return _policy_fwd_bwd(lambda *a: f(*a, clip_low=x["clip"]), x)


@dataclass(frozen=True)
class Peer:
    """A peer implementation of a case: ``make(inputs)`` returns the zero-argument call to time.

    ``requires``: the PyPI package it comes from (None: plain torch); ``compiled``: a
    torch.compile peer, timed in a subprocess with a time limit.
    """

    name: str
    make: Callable[[dict], Callable]
    requires: Optional[str] = None
    compiled: bool = False


COMPILE_NAME = "torch.compile(reference)"
TRL_TL = Peer("trl selective_log_softmax", peer_trl_token_logprobs, "trl")
TRL_TL_ENT = Peer("trl selective_log_softmax + entropy_from_logits", peer_trl_token_logprobs, "trl")


@dataclass
class Case:
    """A benchmark case, its peers and its goals (C++ vs reference and vs the best peer);
    ``None`` = no goal on that axis."""

    name: str
    key: str  # inputs_<key> and case_<key> in this module
    op: str
    ours: Callable[[dict], Callable]
    peers: Tuple[Peer, ...]
    goal_speedup: Optional[float]
    goal_mem: Optional[float]  # other provider's extra peak ÷ cpp extra peak
    goal_text: str

    def inputs(self) -> dict:
        return globals()[f"inputs_{self.key}"]()


CASES = [
    Case("token_logprobs fp32 N=4096 V=32000", "token_logprobs_fp32", "token_logprobs", ours_token_logprobs,
         (TRL_TL, Peer(COMPILE_NAME, compiled_token_logprobs, compiled=True)), 2.0, 10.0,
         "≥ 2× faster, ≥ 10× less extra memory"),
    Case("token_logprobs bf16 N=4096 V=32000", "token_logprobs_bf16", "token_logprobs", ours_token_logprobs,
         (TRL_TL, Peer(COMPILE_NAME, compiled_token_logprobs, compiled=True)), 2.0, 10.0,
         "≥ 2× faster, ≥ 10× less extra memory"),
    Case("token_logprobs+entropy fp32 N=4096 V=32000", "token_logprobs_entropy", "token_logprobs",
         ours_token_logprobs, (TRL_TL_ENT, Peer(COMPILE_NAME, compiled_token_logprobs, compiled=True)),
         2.0, 10.0,
         "≥ 2× faster, ≥ 10× less extra memory"),
    Case("fused_linear_logprobs N=4096 H=512 V=32000", "fused_linear_logprobs", "fused_linear_logprobs",
         ours_fused_linear_logprobs,
         (Peer("trl: h @ W.T + selective_log_softmax", peer_trl_fused_linear, "trl"),
          Peer(COMPILE_NAME, compiled_fused_linear_logprobs, compiled=True)),
         None, None, "extra peak ≤ one chunk of logits (256·V·4 B = 31.2 MiB)"),
    Case("fused_linear_divergence N=2048 H=896 Ht=1536 V=32000 fwd+bwd", "fused_linear_divergence",
         "fused_linear_divergence", ours_fused_linear_divergence,
         (Peer("trl ChunkedDivergenceFunction", peer_trl_chunked_divergence, "trl"),
          Peer(COMPILE_NAME, compiled_fused_linear_divergence, compiled=True)),
         1.5, 2.0, "≥ 1.5× faster, ≥ 2× less extra memory (4 matmuls vs TRL's 8 for the JSD)"),
    Case("gae B=64 T=2048", "gae", "gae", ours_gae,
         (Peer("python loop over T (TRL/verl/OpenRLHF)", peer_gae_loop),
          Peer(COMPILE_NAME, compiled_gae, compiled=True)), 50.0, None, "≥ 50× faster"),
    Case("discounted_returns B=64 T=2048", "discounted_returns", "discounted_returns",
         ours_discounted_returns,
         (Peer("python loop over T (OpenRLHF)", peer_discounted_loop),
          Peer(COMPILE_NAME, compiled_discounted_returns, compiled=True)), None, None, "–"),
    Case("ppo_policy_loss B·T=65536 fwd+bwd", "ppo_policy_loss", "ppo_policy_loss", ours_ppo_policy_loss,
         (Peer("composed torch ops (TRL PPOTrainer)", peer_ppo_composed),
          Peer(COMPILE_NAME, compiled_ppo_policy_loss, compiled=True)), 2.0, None, "≥ 2× faster"),
    Case("sample B=64 V=32000 top_p=0.9", "sample_top_p", "sample", ours_sample,
         (Peer("sort-based top-p (transformers warpers) + multinomial", peer_sample_sort),), 3.0, None,
         "≥ 3× faster than sort-based top-p"),
    Case("sample B=64 V=32000 temperature=1", "sample_temperature", "sample", ours_sample,
         (Peer("softmax + torch.multinomial", peer_sample_multinomial),), None, None, "–"),
]
CASES_BY_KEY = {c.key: c for c in CASES}


def _ours_case(key: str) -> Callable:
    case = CASES_BY_KEY[key]
    return case.ours(case.inputs())


# zero-argument builders for the memory subprocess of rlhf_fast.benchmarks.common ("module:function")
def case_token_logprobs_fp32() -> Callable:
    return _ours_case("token_logprobs_fp32")


def case_token_logprobs_bf16() -> Callable:
    return _ours_case("token_logprobs_bf16")


def case_token_logprobs_entropy() -> Callable:
    return _ours_case("token_logprobs_entropy")


def case_fused_linear_logprobs() -> Callable:
    return _ours_case("fused_linear_logprobs")


def case_fused_linear_divergence() -> Callable:
    return _ours_case("fused_linear_divergence")


def case_gae() -> Callable:
    return _ours_case("gae")


def case_discounted_returns() -> Callable:
    return _ours_case("discounted_returns")


def case_ppo_policy_loss() -> Callable:
    return _ours_case("ppo_policy_loss")


def case_sample_top_p() -> Callable:
    return _ours_case("sample_top_p")


def case_sample_temperature() -> Callable:
    return _ours_case("sample_temperature")


# ------------------------------------------------ peers: availability and the subprocess runner


def peer_missing(peer: Peer) -> Optional[str]:
    """Why ``peer`` cannot run here (``"not installed (pip install trl)"``), or None."""
    if peer.requires is None:
        return None
    import importlib

    try:
        importlib.import_module(peer.requires)
    except ImportError:
        return f"not installed (pip install {peer.requires})"
    except Exception as e:  # installed but broken (e.g. a version clash on import): say so, go on
        return f"import {peer.requires} failed: {_first_line(e)}"
    return None


def _find_peer(case: Case, name: str) -> Peer:
    for p in case.peers:
        if p.name == name:
            return p
    raise ValueError(f"peer must be one of {[p.name for p in case.peers]} for {case.key}, got {name!r}")


def _peer_in_this_process(key: str, peer_name: str, *, time_it: bool, memory: bool, rep: int,
                          max_time_s: float) -> Dict[str, object]:
    case = CASES_BY_KEY[key]
    fn = _find_peer(case, peer_name).make(case.inputs())
    t0 = time.perf_counter()
    fn()  # warm-up; for torch.compile the compilation
    out: Dict[str, object] = {"first_call_s": time.perf_counter() - t0}
    if memory:
        b, method = rss_extra_peak_bytes_here(fn), "rss"
        if b is None:
            b, method = profiler_extra_peak_bytes(fn), "profiler"
        out.update(bytes=int(b), method=method)
    if time_it:
        t = bench(fn, warmup=0, rep=rep, max_time_s=max_time_s)
        out.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, n=t.n)
    return out


def run_peer_subprocess(key: str, peer_name: str, *, time_it: bool, memory: bool, rep: int = 50,
                        max_time_s: float = 3.0, timeout_s: float = COMPILE_TIMEOUT_S) -> Dict[str, object]:
    """Run one peer of case ``key`` in a fresh interpreter: first call, then optionally the
    extra peak memory of one call and the timing. Returns the measurements as a dict
    (``first_call_s``, ``bytes``/``method``, ``median_ms``/``p20_ms``/``p80_ms``/``n``).

    Raises ``subprocess.TimeoutExpired`` after ``timeout_s`` (the whole process group is
    killed, inductor's compile workers included) and ``RuntimeError`` when it fails.
    """
    env = dict(os.environ)
    # as in common.extra_peak_bytes_subprocess: mmap blocks >= 64 KiB and trim at once, so memory
    # freed by the warm-up call goes back to the OS and cannot hide the measured call's
    env["MALLOC_MMAP_THRESHOLD_"] = str(MEM_RESOLUTION)
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    cmd = [sys.executable, "-m", MODULE, "--peer-run", key, "--peer", peer_name, "--threads",
           str(torch.get_num_threads()), "--rep", str(rep), "--max-time", str(max_time_s)]
    cmd += (["--time"] if time_it else []) + (["--memory"] if memory else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException:  # the time limit, or Ctrl-C: the new session does not get the parent's SIGINT
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    if proc.returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1][:200] if lines else f"exit status {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------ the suite


def _cpp_has(op: str) -> bool:
    from rlhf_fast.ops import _dispatch

    return "cpp" in _dispatch.implemented(op) and _dispatch.backend_available("cpp")[0]


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}"


def _mem_ratio(other: Optional[int], cpp: Optional[int]) -> Optional[float]:
    # blocks under glibc's 64 KiB mmap threshold may come from heap pages already resident,
    # so 64 KiB is the resolution: a smaller peak on either side counts as 64 KiB (a smaller cpp
    # peak understates the ratio; a smaller peer peak gives an upper bound, ≤ 1 since cpp is above
    # it), and only when both sides are below it can the two not be told apart (no ratio)
    if other is None or cpp is None or (other < MEM_RESOLUTION and cpp < MEM_RESOLUTION):
        return None
    return max(other, MEM_RESOLUTION) / max(cpp, MEM_RESOLUTION)


def _goal_verdict(case: Case, sp: Optional[float], mr: Optional[float], mem_measured: bool) -> List[str]:
    out = []
    if case.goal_speedup is not None and sp is not None:
        met = "meets" if sp >= case.goal_speedup else "misses"
        out.append(f"speed {sp:.2f}× {met} {case.goal_speedup:g}×")
    if case.goal_mem is not None and mr is not None:
        out.append(f"memory {mr:.1f}× {'meets' if mr >= case.goal_mem else 'misses'} {case.goal_mem:g}×")
    elif case.goal_mem is not None and mem_measured:
        out.append("memory: both extra peaks below the 64 KiB resolution, no ratio")
    return out


def _run_peer(case: Case, peer: Peer, row: dict, *, memory: bool, compile_: bool, rep: int, max_time_s: float,
              compile_timeout_s: float) -> Optional[Tuple[Timing, Optional[int]]]:
    """Measure one peer into ``row``; returns (timing, extra peak) or None when it did not run."""
    missing = peer_missing(peer)
    if missing:
        row["note"] = missing
        return None
    if peer.compiled and not compile_:
        row["note"] = ("skipped: small-scale run (torch.compile takes tens of seconds per op on the CPU; "
                       "it runs at scale 1 or with --compile)")
        return None
    try:
        if peer.compiled:
            r = run_peer_subprocess(case.key, peer.name, time_it=True, memory=memory, rep=rep,
                                    max_time_s=max_time_s, timeout_s=compile_timeout_s)
            t = Timing(r["median_ms"], r["p20_ms"], r["p80_ms"], r["n"])
            row["note"] = f"compile (first call) {r['first_call_s']:.1f} s"
        else:
            t = bench(peer.make(case.inputs()), warmup=1, rep=rep, max_time_s=max_time_s)
            r = run_peer_subprocess(case.key, peer.name, time_it=False, memory=True) if memory else {}
    except subprocess.TimeoutExpired:
        what = "compile + timing" if peer.compiled else "memory subprocess"
        row["note"] = f"no result: did not finish within {compile_timeout_s:g} s ({what})"
        return None
    except Exception as e:  # a peer that fails is reported on its row, the suite goes on
        row["note"] = f"failed: {_first_line(e)}"
        return None
    mem = r.get("bytes")
    if "method" in r:
        row["mem_method"] = r["method"]
    row.update(ms=t.median_ms, p20=t.p20_ms, p80=t.p80_ms, extra_peak=fmt_bytes(mem), extra_peak_bytes=mem)
    return t, mem


def run_suite(*, scale: float = 1.0, memory: bool = True, rep: int = 50, max_time_s: float = 3.0,
              cases: Optional[List[str]] = None, with_compile: Optional[bool] = None,
              compile_timeout_s: float = COMPILE_TIMEOUT_S) -> Table:
    """Run the cases; return a table with one row per (case, provider) and two summaries per case.

    ``scale`` in (0, 1] shrinks the sizes (smoke runs); ``memory=False`` skips the subprocess
    memory measurements; ``cases`` keeps the cases whose op is
    listed; ``with_compile`` runs the torch.compile peers (default: only at ``scale == 1``), each
    limited to ``compile_timeout_s``. Goals are compared in the ``verdict`` column as text.
    """
    if not (0 < scale <= 1.0):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if compile_timeout_s <= 0:
        raise ValueError(f"compile_timeout_s must be > 0, got {compile_timeout_s}")
    compile_ = scale >= 1.0 if with_compile is None else bool(with_compile)
    before = os.environ.get("RLHF_FAST_BENCH_SCALE")
    os.environ["RLHF_FAST_BENCH_SCALE"] = str(scale)  # the subprocesses build the same sizes
    try:
        return _run_cases(scale, memory, rep, max_time_s, cases, compile_, compile_timeout_s)
    finally:
        if before is None:
            os.environ.pop("RLHF_FAST_BENCH_SCALE", None)
        else:
            os.environ["RLHF_FAST_BENCH_SCALE"] = before


def _run_cases(scale, memory, rep, max_time_s, cases, compile_, compile_timeout_s) -> Table:
    from rlhf_fast.ops import use_backend

    table = Table(f"C++ CPU kernels vs the PyTorch reference and peers ({torch.get_num_threads()} threads, "
                  f"scale {scale:g})", list(COLUMNS))
    for case in CASES:
        if cases is not None and case.op not in cases:
            continue
        measured: Dict[str, Tuple[Timing, Optional[int]]] = {}
        for backend in ("torch", "cpp"):
            row = dict(case=case.name, backend=backend)
            if backend == "cpp" and not _cpp_has(case.op):
                row["verdict"] = "cpp kernel not built for this op"
                table.rows.append(row)
                continue
            try:
                with use_backend(backend):
                    fn = case.ours(case.inputs())
                    t = bench(fn, warmup=1, rep=rep, max_time_s=max_time_s)
                    del fn
                mem = None
                if memory:
                    m = extra_peak_bytes_subprocess(f"{MODULE}:case_{case.key}", backend,
                                                    threads=torch.get_num_threads())
                    mem = m["bytes"]
                    row["mem_method"] = m["method"]
            except Exception as e:  # a backend that fails is reported, the suite goes on
                row["error"] = _first_line(e)
                table.rows.append(row)
                continue
            measured[backend] = (t, mem)
            row.update(ms=t.median_ms, p20=t.p20_ms, p80=t.p80_ms, extra_peak=fmt_bytes(mem),
                       extra_peak_bytes=mem)
            table.rows.append(row)
        cpp = measured.get("cpp")
        peers: Dict[str, Tuple[Timing, Optional[int]]] = {}
        for peer in case.peers:
            row = dict(case=case.name, backend=f"peer: {peer.name}")
            res = _run_peer(case, peer, row, memory=memory, compile_=compile_, rep=rep, max_time_s=max_time_s,
                            compile_timeout_s=compile_timeout_s)
            if res is not None:
                peers[peer.name] = res
                if cpp is not None:  # how many times faster / leaner our kernel is than this peer
                    row.update(speedup=res[0].median_ms / cpp[0].median_ms,
                               mem_ratio=_mem_ratio(res[1], cpp[1]))
            table.rows.append(row)
        if cpp is None or "torch" not in measured:
            continue
        (tr, mr), (tc, mc) = measured["torch"], cpp
        sp, mr_ratio = tr.median_ms / tc.median_ms, _mem_ratio(mr, mc)
        verdict = _goal_verdict(case, sp, mr_ratio, mr is not None and mc is not None)
        if case.op == "fused_linear_logprobs" and mc is not None:
            chunk = FL_CHUNK * V * 4
            verdict.append(f"extra peak {mc / chunk:.2f} chunks ({'meets' if mc <= chunk else 'misses'} ≤ 1)")
        table.rows.append(dict(case=case.name, backend="cpp vs torch", speedup=sp, mem_ratio=mr_ratio,
                               goal=case.goal_text, verdict="; ".join(verdict) or None))
        row = dict(case=case.name, backend="cpp vs best peer", goal=case.goal_text)
        if not peers:
            row["verdict"] = "no peer measured"
        else:
            fastest = min(peers, key=lambda k: peers[k][0].median_ms)
            with_mem = [k for k in peers if peers[k][1] is not None]
            leanest = min(with_mem, key=lambda k: peers[k][1]) if with_mem else None
            sp_p = peers[fastest][0].median_ms / tc.median_ms
            mr_p = _mem_ratio(peers[leanest][1], mc) if leanest is not None else None
            verdict = _goal_verdict(case, sp_p, mr_p, leanest is not None and mc is not None)
            row.update(speedup=sp_p, mem_ratio=mr_p,
                       best_peer=f"fastest: {fastest}" + (f"; leanest: {leanest}" if leanest else ""),
                       verdict="; ".join(verdict) or None)
        table.rows.append(row)
    table.notes += [
        "ms: median per call, p20/p80 the 20th/80th percentiles",
        "extra_peak: peak resident memory of one call above its inputs, in a fresh subprocess "
        "(VmHWM after /proc/self/clear_refs; glibc forced to mmap ≥ 64 KiB blocks)",
        "speedup / mem_ratio: on 'cpp vs torch' reference ÷ cpp; on a peer row that peer ÷ cpp; on "
        "'cpp vs best peer' the fastest peer's time ÷ cpp and the leanest peer's extra peak ÷ cpp "
        "(a peak below the 64 KiB resolution counts as 64 KiB; no memory ratio when both sides are "
        "below it)",
        "goals are the foundation issue's targets, stated next to the measured ratios (against the reference "
        "and against the best peer), not asserted",
        "gae / discounted_returns use right-padded masks: the peers' loops zero masked positions instead of "
        "skipping them, which equals our ops' result only for padding at the end",
        "torch.compile(reference) runs in its own subprocess, limited to "
        f"{compile_timeout_s:g} s; its time excludes the compile (first call, given in note)"
        + ("" if compile_ else "; skipped in this run (small scale): pass --compile to include it"),
        "Liger-Kernel, flash-attn's Triton cross-entropy and FlashInfer's sampler are CUDA kernels: "
        "compared on a GPU by bench_triton / bench_gae_sampling, not here",
    ]
    return table


def main(scale: float = 1.0, memory: bool = True, with_compile: Optional[bool] = None,
         compile_timeout_s: float = COMPILE_TIMEOUT_S, cases: Optional[List[str]] = None) -> Table:
    """Run the suite, print the table and return it."""
    t0 = time.perf_counter()
    table = run_suite(scale=scale, memory=memory, with_compile=with_compile,
                      compile_timeout_s=compile_timeout_s, cases=cases)
    print(table.markdown())
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return table


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="C++ CPU kernels vs the PyTorch reference and peers")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile(reference) peers (default: only at --scale 1)")
    p.add_argument("--compile-timeout", type=float, default=COMPILE_TIMEOUT_S,
                   help="seconds allowed per torch.compile peer (compile + timing)")
    p.add_argument("--cases", default=None, help="comma-separated ops to run (default: all)")
    p.add_argument("--write", action="store_true", help="append to benchmarks/results/cpu-<date>.{json,md}")
    # internal: one peer in a fresh process (see run_peer_subprocess)
    p.add_argument("--peer-run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    p.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=50, help=argparse.SUPPRESS)
    p.add_argument("--max-time", type=float, default=3.0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.peer_run is not None:
        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps(_peer_in_this_process(a.peer_run, a.peer, time_it=a.time, memory=a.memory, rep=a.rep,
                                               max_time_s=a.max_time)))
        sys.exit(0)
    tab = main(scale=a.scale, memory=not a.no_memory, with_compile=a.compile,
               compile_timeout_s=a.compile_timeout, cases=a.cases.split(",") if a.cases else None)
    if a.write:
        from .common import write_results

        print(write_results([tab], device="cpu", suite="bench_cpu_ops"))
