"""fused_linear_divergence Triton kernels against rlhf_fast.ops.reference (fp64 oracle) and
TRL 1.16's ChunkedDivergenceFunction.

fp32 inputs are compared with the reference directly. bf16 / fp16 inputs: both the reference
and ours round the logits to 16 bits, then compute in fp32; both are compared with an fp64
oracle on the same (16-bit-valued) inputs, and ours must be at most twice as far from it as
the 16-bit reference is, plus a small atol. ``block_v`` makes the row kernel take several vocabulary
tiles on small V (the interpreter's default tile covers a whole small row).
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

from .conftest import assert_close_to_oracle, device

# the interpreter evaluates both branches of tl.where with numpy: −inf − −inf warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _fld(*args, **kw):
    from rlhf_fast.kernels.fused_divergence import fused_linear_divergence

    return fused_linear_divergence(*args, **kw)


def _models(N, H, Ht, V, dtype, tdtype=None, seed=0, bias=True):
    """Student and teacher heads: logits of a few units, as LM heads give."""
    g = torch.Generator().manual_seed(seed)
    tdtype = tdtype or dtype
    dev = device()
    sh = torch.randn(N, H, generator=g).to(dtype).to(dev)
    sw = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(dtype).to(dev)
    sb = (torch.randn(V, generator=g) * 0.5).to(dtype).to(dev) if bias else None
    th = torch.randn(N, Ht, generator=g).to(tdtype).to(dev)
    tw = (torch.randn(V, Ht, generator=g) * 2 / Ht ** 0.5).to(tdtype).to(dev)
    tb = (torch.randn(V, generator=g) * 0.5).to(tdtype).to(dev) if bias else None
    return sh, sw, sb, th, tw, tb


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


def _run(fn, student, teacher, kw, upstream, dtype=None):
    """(div, entropy, *grads of the student's hidden/weight/bias) for sum(div · upstream)."""
    sh, sw, sb = _leaves(*student, dtype=dtype)
    th, tw, tb = (None if t is None else t.to(dtype or t.dtype) for t in teacher)
    div, ent = fn(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, return_entropy=True, **kw)
    leaves = [t for t in (sh, sw, sb) if t is not None]
    grads = torch.autograd.grad((div * upstream.to(div.dtype)).sum(), leaves)
    return [div, ent, *grads]


CASES = [  # beta, reduction, masked rows, chunk_size, block_v
    (0.0, "none", False, None, None),
    (0.3, "none", True, 4, 64),
    (1.0, "none", True, 5, 128),
    (0.0, "sum", True, 3, 64),
    (0.3, "sum", False, None, 128),
    (1.0, "sum", True, 16, None),
    (0.5, "none", True, 1, 256),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(dtype, case):
    beta, reduction, masked, chunk, block_v = CASES[case]
    N, H, Ht, V = 13, 24, 40, 300  # V not a multiple of any tile; widths differ
    models = _models(N, H, Ht, V, dtype, seed=case)
    g = torch.Generator().manual_seed(100 + case)
    mask = (torch.rand(N, generator=g) > 0.3).to(device()) if masked else None
    upstream = torch.randn(N if reduction == "none" else (), generator=g).to(device())
    kw = dict(beta=beta, temperature=0.7, mask=mask, reduction=reduction)
    ours = _run(lambda *a, **k: _fld(*a, chunk_size=chunk, block_v=block_v, **k), models[:3], models[3:], kw,
                upstream)
    ref = _run(reference.fused_linear_divergence, models[:3], models[3:], kw, upstream)
    orc = _run(reference.fused_linear_divergence, models[:3], models[3:], kw, upstream, dtype=torch.float64)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ((N,) if reduction == "none" else ())
    assert ours[1].dtype == torch.float32 and ours[1].shape == (N,) and not ours[1].requires_grad
    for a, t in zip(ours[2:], models[:3]):
        assert a.dtype == t.dtype and a.shape == t.shape
    if mask is not None:
        out = ~mask.bool()
        assert (ours[1][out] == 0).all() and (ours[2][out] == 0).all()  # entropy, grad of hidden
        if reduction == "none":
            assert (ours[0][out] == 0).all()
    if dtype == torch.float32:
        for a, e in zip(ours, ref):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
        return
    if reduction == "sum":
        # a sum of a few rows: the reference's error may cancel by chance; bound by its per-row errors
        none = dict(kw, reduction="none")
        ref_rows = _run(reference.fused_linear_divergence, models[:3], models[3:], none, upstream.expand(N))[0]
        orc_rows = _run(reference.fused_linear_divergence, models[:3], models[3:], none, upstream.expand(N),
                        dtype=torch.float64)[0]
        bound = 2 * (ref_rows.double() - orc_rows).abs().sum().item() + 1e-4
        assert (ours[0].double() - orc[0]).abs().item() <= bound
    else:
        assert_close_to_oracle(ours[0], ref[0], orc[0], atol=1e-4, what="divergence")
    assert_close_to_oracle(ours[1], ref[1], orc[1], atol=1e-4, what="entropy")
    for a, e, o in zip(ours[2:], ref[2:], orc[2:]):
        assert_close_to_oracle(a, e, o, atol=1e-4, what="gradient")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_float64_gradcheck_runs_the_kernels(beta, reduction):
    """fp64 computes in fp64 inside the row kernel, so gradcheck checks its gradient formulas."""
    sh, sw, sb, th, tw, tb = _models(4, 3, 4, 29, torch.float64, seed=3)
    mask = torch.tensor([1, 0, 1, 1], device=device())

    def f(a, b, c):
        return _fld(a, b, th, tw, beta=beta, temperature=1.3, mask=mask, student_bias=c, teacher_bias=tb,
                    reduction=reduction, chunk_size=2, block_v=16)

    # fast mode (one random projection per input) keeps the interpreter's ~100 kernel runs per
    # check to a few; the full Jacobian took a minute per case
    assert torch.autograd.gradcheck(f, tuple(_leaves(sh, sw, sb)), fast_mode=True)
    exp = reference.fused_linear_divergence(sh, sw, th, tw, beta=beta, temperature=1.3, mask=mask, student_bias=sb,
                                            teacher_bias=tb, reduction=reduction)
    torch.testing.assert_close(f(sh, sw, sb), exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_huge_logits_and_neg_inf_teacher_bias(beta):
    """Logits of ~1e4 (the online KL keeps its sums relative to the running maxima) and −inf
    teacher entries (tokens the teacher rules out)."""
    N, H, V = 6, 16, 300
    sh, sw, sb, th, tw, tb = _models(N, H, 16, V, torch.float32, seed=7)
    sw, tw = sw * 1e3, tw * 1e3
    tb = tb.clone()
    # KL(s‖t) is +inf where the student has mass the teacher rules out (next test)
    tb[10:60] = -1e4 if beta == 1.0 else float("-inf")
    kw = dict(beta=beta, temperature=1.0, reduction="none")
    upstream = torch.ones(N, device=device())
    ours = _run(lambda *a, **k: _fld(*a, block_v=64, **k), (sh, sw, sb), (th, tw, tb), kw, upstream)
    ref = _run(reference.fused_linear_divergence, (sh, sw, sb), (th, tw, tb), kw, upstream)
    orc = _run(reference.fused_linear_divergence, (sh, sw, sb), (th, tw, tb), kw, upstream, dtype=torch.float64)
    assert torch.isfinite(orc[0]).all()
    # fp32 logits of 1e4 are only good to ~1e-3: measured against what fp32 torch does with them
    for a, e, o, what in zip(ours, ref, orc, ("divergence", "entropy", "d hidden", "d weight", "d bias")):
        assert_close_to_oracle(a, e, o, atol=1e-6, what=what)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_neg_inf_student_bias(beta):
    """−inf student entries: values as the reference's (KL(t‖s) is +inf: the teacher has mass
    there); for beta > 0 their gradient is exactly 0 (the reference's autograd gives NaN there:
    0·(−inf) in the backward of p·log p), for beta = 0 TRL's (p − q)/T, finite."""
    N, H, V = 5, 8, 100
    sh, sw, sb, th, tw, tb = _models(N, H, 8, V, torch.float32, seed=9)
    sb = sb.clone()
    sb[30:45] = float("-inf")
    kw = dict(beta=beta, temperature=0.9, reduction="none")
    ours = _run(lambda *a, **k: _fld(*a, block_v=32, **k), (sh, sw, sb), (th, tw, tb), kw, torch.ones(N))
    with torch.no_grad():
        exp, ent = reference.fused_linear_divergence(sh.double(), sw.double(), th.double(), tw.double(),
                                                     student_bias=sb.double(), teacher_bias=tb.double(),
                                                     return_entropy=True, **kw)
    torch.testing.assert_close(ours[0].double(), exp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1].double(), ent, rtol=1e-4, atol=1e-5)
    d_w, d_b = ours[3], ours[4]
    assert torch.isfinite(ours[2]).all() and torch.isfinite(d_w).all() and torch.isfinite(d_b).all()
    if beta > 0:
        assert (d_w[30:45] == 0).all() and (d_b[30:45] == 0).all() and (d_b[:30] != 0).any()
    else:
        assert torch.isinf(ours[0]).all()


def test_reverse_kl_infinite_where_teacher_rules_out_student_mass():
    sh, sw, sb, th, tw, tb = _models(3, 8, 8, 50, torch.float32, seed=1)
    tb = torch.zeros(50, device=device())
    tb[:25] = float("-inf")
    with torch.no_grad():
        div = _fld(sh, sw, th, tw, beta=1.0, student_bias=sb, teacher_bias=tb, block_v=16)
        exp = reference.fused_linear_divergence(sh, sw, th, tw, beta=1.0, student_bias=sb, teacher_bias=tb)
    assert torch.isinf(exp).all() and torch.equal(div, exp)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fully_masked_and_teacher_gets_no_gradient(reduction):
    sh, sw, sb, th, tw, tb = _models(4, 8, 12, 40, torch.float32)
    s_in = _leaves(sh, sw, sb)
    t_in = _leaves(th, tw, tb)  # requires_grad on the teacher must not make it a leaf of the loss
    for mask in (torch.zeros(4, dtype=torch.bool, device=device()), torch.tensor([1, 0, 1, 1], device=device())):
        div, ent = _fld(s_in[0], s_in[1], t_in[0], t_in[1], beta=0.3, mask=mask, student_bias=s_in[2],
                        teacher_bias=t_in[2], reduction=reduction, return_entropy=True)
        div.sum().backward()
        assert all(t.grad is None for t in t_in)
        if not mask.any():
            assert (div == 0).all() and (ent == 0).all()
            assert all((t.grad == 0).all() for t in s_in)
        for t in s_in:
            t.grad = None


def test_matches_trl_chunked_divergence():
    """TRL 1.16 trl/kernels/chunked_divergence.py::ChunkedDivergenceFunction (its torch tiles on
    the CPU), values and gradients, every beta."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    N, H, Ht, V = 7, 16, 24, 333
    models = _models(N, H, Ht, V, torch.float32, seed=11)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(device())
    for beta in (0.0, 0.3, 1.0):
        def trl(sh, sw, th, tw, *, student_bias, teacher_bias, beta, temperature, return_entropy):
            return ChunkedDivergenceFunction.apply(sh, sw, student_bias, th, tw, teacher_bias, beta, temperature)

        kw = dict(beta=beta, temperature=0.8)
        ours = _run(lambda *a, **k: _fld(*a, block_v=64, **k), models[:3], models[3:], kw, upstream)
        theirs = _run(trl, models[:3], models[3:], kw, upstream)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_mixed_dtypes_student_bf16_teacher_fp32():
    N, H, Ht, V = 9, 16, 24, 200
    s = _models(N, H, Ht, V, torch.bfloat16, seed=4)[:3]
    t = _models(N, H, Ht, V, torch.float32, seed=5)[3:]
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device())
    kw = dict(beta=0.3, temperature=1.0)
    ours = _run(lambda *a, **k: _fld(*a, chunk_size=4, **k), s, t, kw, upstream)
    ref = _run(reference.fused_linear_divergence, s, t, kw, upstream)
    orc = _run(reference.fused_linear_divergence, s, t, kw, upstream, dtype=torch.float64)
    for a, e, o in zip(ours, ref, orc):
        assert_close_to_oracle(a, e, o, atol=1e-4, what="mixed")


@pytest.mark.parametrize("reduction,fwd,bwd", [("sum", 2, 0), ("none", 2, 2)])
def test_projections_per_chunk(monkeypatch, reduction, fwd, bwd):
    """The design's cost: "sum" under grad projects each model once per chunk, in the forward
    only (gradients made there); "none" projects again in the backward."""
    from rlhf_fast.kernels import fused_divergence as fd

    calls = []
    real = fd._project
    monkeypatch.setattr(fd, "_project", lambda *a: calls.append(1) or real(*a))
    sh, sw, sb, th, tw, tb = _models(10, 8, 8, 30, torch.float32)
    s_in = _leaves(sh, sw, sb)
    div = fd.fused_linear_divergence(s_in[0], s_in[1], th, tw, student_bias=s_in[2], reduction=reduction,
                                     chunk_size=4)
    assert len(calls) == fwd * 3  # 3 chunks
    div.sum().backward()
    assert len(calls) == (fwd + bwd) * 3


def test_default_chunk_bounds_both_models_logits():
    from rlhf_fast.kernels.fused_divergence import _default_chunk

    for V, b in ((151936, 4), (32000, 4), (151936, 8), (10 ** 8, 4)):
        c = _default_chunk(V, b)
        assert c == 1 or c * V * b <= 256 << 20
    assert _default_chunk(151936, 4) == 384


def test_bad_arguments():
    sh, sw, sb, th, tw, tb = _models(2, 4, 4, 8, torch.float32)
    for kw, word in ((dict(reduction="mean"), "reduction"), (dict(beta=1.5), "beta"),
                     (dict(temperature=0.0), "temperature"), (dict(chunk_size=0), "chunk_size"),
                     (dict(block_v=48), "block_v")):
        with pytest.raises(ValueError, match=word):
            _fld(sh, sw, th, tw, **kw)


def test_public_op_dispatches_to_triton():
    if not hasattr(ops, "fused_linear_divergence"):
        pytest.skip("rlhf_fast.ops.fused_linear_divergence (the front end) is not there yet")
    models = _models(6, 8, 12, 70, torch.float32, seed=2)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], device=device())
    upstream = torch.randn(6, generator=torch.Generator().manual_seed(3)).to(device())
    kw = dict(beta=0.3, temperature=0.9, mask=mask, chunk_size=4)
    with ops.use_backend("triton"):
        assert _dispatch.select("fused_linear_divergence", models[0].device)[0] == "triton"
        ours = _run(ops.fused_linear_divergence, models[:3], models[3:], kw, upstream)
    ref = _run(reference.fused_linear_divergence, models[:3], models[3:], kw, upstream)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


_SM90 = """
import sys
sys.path.insert(0, "tests/triton")
import triton.language as tl
from _compile_sm90 import compile_kernel
from rlhf_fast.kernels import fused_divergence as fd

def types(dt, tdt, acc):
    return dict(zs_ptr=f"*{dt}", zt_ptr=f"*{tdt}", g_ptr=f"*{dt}", gscale_ptr=f"*{acc}", params_ptr=f"*{acc}",
                div_ptr=f"*{acc}", ent_ptr=f"*{acc}", stats_ptr=f"*{acc}", N="i32", V="i32", stride_s="i32",
                stride_t="i32", stride_g="i32")

# (ENTROPY, GRAD, HAS_GSCALE, STATS_IN, STATS_OUT): forward without gradient, "sum" forward with
# the gradient, "none" forward saving the statistics, "none" backward
CALLS = ((True, False, False, False, False), (True, True, False, False, False), (False, False, False, False, True),
         (False, True, True, True, False))
for dt, tdt, acc, bv, modes in (("bf16", "bf16", "fp32", 2048, (0, 1, 2)), ("fp16", "fp32", "fp32", 2048, (2,)),
                                ("fp64", "fp64", "fp64", 1024, (2,))):
    for mode in modes:
        for ent, grad, gs, sin, sout in CALLS:
            compile_kernel(fd._divergence_rows_kernel, types(dt, tdt, acc), dict(
                MODE=mode, ENTROPY=ent, GRAD=grad, HAS_GSCALE=gs, STATS_IN=sin, STATS_OUT=sout,
                ACC=tl.float64 if acc == "fp64" else tl.float32, ROWS=1, BLOCK_V=bv), num_warps=8)
            print("ok", dt, mode, ent, grad, sin, sout, flush=True)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernel for real")
def test_row_kernel_compiles_for_sm90():
    """Every variant the launcher uses goes through Triton's real compiler and ptxas for an H100
    (what the interpreter never checks), as tests/triton/test_compile.py does for the others."""
    from .test_compile import _ptxas_available

    if not _ptxas_available():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    root = Path(__file__).resolve().parent.parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", _SM90], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") == 20, r.stdout


# --------------------------------------------------------------------------- GPU, real shapes


def _cuda_models(N=4096, H=896, Ht=1536, V=151936):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return rn(N, H), rn(V, H, scale=2 / H ** 0.5), None, rn(N, Ht), rn(V, Ht, scale=2 / Ht ** 0.5), None


@pytest.mark.cuda
@pytest.mark.parametrize("beta,reduction", [(0.0, "sum"), (0.5, "sum"), (1.0, "none"), (0.5, "none")])
def test_cuda_qwen_shapes(beta, reduction):
    """Qwen2.5-0.5B student (H = 896) and 1.5B teacher (Ht = 1536), V = 151936, 4096 tokens, bf16."""
    models = _cuda_models()
    N = models[0].shape[0]
    mask = torch.rand(N, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) > 0.1
    upstream = torch.ones(N if reduction == "none" else (), device="cuda")
    kw = dict(beta=beta, temperature=1.0, mask=mask, reduction=reduction)
    ours = _run(_fld, models[:3], models[3:], kw, upstream)
    torch.cuda.empty_cache()
    ref = _run(reference.fused_linear_divergence, models[:3], models[3:], kw, upstream)
    torch.cuda.empty_cache()
    orc = _run(reference.fused_linear_divergence, models[:3], models[3:], kw, upstream, dtype=torch.float32)
    if reduction == "sum":
        err, ref_err = (ours[0] - orc[0]).abs().item(), (ref[0] - orc[0]).abs().item()
        assert err <= 2 * ref_err + 1e-3 * orc[0].abs().item()
    else:
        assert_close_to_oracle(ours[0], ref[0], orc[0], atol=1e-3, what="divergence")
    assert_close_to_oracle(ours[1], ref[1], orc[1], atol=1e-3, what="entropy")
    for a, e, o in zip(ours[2:], ref[2:], orc[2:]):
        assert_close_to_oracle(a.float(), e.float(), o.float(), atol=1e-3, what="gradient")


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_peak_memory_is_a_chunk(reduction):
    """Extra memory of a forward + backward: a chunk of both logits (≤ 256 MiB), the fp32 dW
    accumulator (V·H·4 = 519 MiB) and the bf16 gradients (~270 MiB) — about 1.1 GiB, where the
    reference holds several [N, V] fp32 tensors (2.3 GiB each)."""
    sh, sw, _, th, tw, _ = _cuda_models()
    sh.requires_grad_()
    sw.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fld(sh, sw, th, tw, beta=0.5, reduction=reduction).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1.6 * (1 << 30), f"{extra / 2 ** 20:.0f} MiB"
