"""fused_linear_divergence on every live CPU backend against the reference (and an fp64 oracle):
forward, entropy, gradients to the student (reduction none with per-row grad_output, and sum),
masks, chunking, widths and dtypes that differ between the models, -inf teacher logits, TRL's
ChunkedDivergenceFunction, gradcheck, torch.compile, opcheck, memory (one chunk of logits of
each model) and argument validation."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import reference

from .conftest import live_cpu_backends, timeline_memory

BACKENDS = live_cpu_backends()
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="rlhf_fast._C not built")
BETAS = [0.0, 0.3, 0.5, 1.0]

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _models(N, H, Ht, V, sdtype=torch.float32, tdtype=None, seed=0, sbias=True, tbias=True):
    """(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)."""
    g = torch.Generator().manual_seed(seed)
    tdtype = tdtype or sdtype
    sh = torch.randn(N, H, generator=g).to(sdtype)
    sw = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(sdtype)
    sb = (torch.randn(V, generator=g) * 0.5).to(sdtype) if sbias else None
    th = torch.randn(N, Ht, generator=g).to(tdtype)
    tw = (torch.randn(V, Ht, generator=g) * (2.0 / Ht ** 0.5)).to(tdtype)
    tb = (torch.randn(V, generator=g) * 0.5).to(tdtype) if tbias else None
    return sh, sw, sb, th, tw, tb


def _run(backend, models, grad, **kw):
    """(outputs, gradients of Σ out·grad to the student's hidden, weight, bias); ``backend=None``
    runs the reference in fp64 on the same values (the oracle)."""
    sh, sw, sb, th, tw, tb = models
    leaves = [t.detach().clone() for t in (sh, sw, sb) if t is not None]
    teacher = [t.detach().clone() if t is not None else None for t in (th, tw, tb)]
    if backend is None:
        leaves = [t.double() for t in leaves]
        teacher = [t.double() if t is not None else None for t in teacher]
    leaves = [t.requires_grad_() for t in leaves]
    b = leaves[2] if sb is not None else None
    args = (leaves[0], leaves[1], teacher[0], teacher[1])
    kw = dict(kw, student_bias=b, teacher_bias=teacher[2], return_entropy=True)
    if backend is None:
        div, ent = reference.fused_linear_divergence(*args, **kw)
    else:
        with ops.use_backend(backend):
            div, ent = ops.fused_linear_divergence(*args, **kw)
    gs = torch.autograd.grad((div * grad.to(div.dtype)).sum(), leaves)
    return [div.detach(), ent], list(gs)


def _near(ours, ref, oracle, atol, what, rtol=0.0):
    """Error against the fp64 oracle at most twice the reference's own, plus atol (and rtol of
    the oracle, for low-precision outputs whose rounding differs element by element)."""
    assert ours.shape == oracle.shape, (what, ours.shape, oracle.shape)
    err = ((ours.double() - oracle).abs() - rtol * oracle.abs()).max().item() if ours.numel() else 0.0
    base = (ref.double() - oracle).abs().max().item() if ours.numel() else 0.0
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} vs reference's {base:.3g} (atol {atol}, rtol {rtol})"


def _check(backend, models, atol_out, atol_grad, **kw):
    sh, sw, sb = models[:3]
    N = sh.shape[0]
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(() if kw.get("reduction") == "sum" else (N,), generator=g)
    outs, gs = _run(backend, models, grad, **kw)
    ref_outs, ref_gs = (outs, gs) if backend == "torch" else _run("torch", models, grad, **kw)
    ora_outs, ora_gs = _run(None, models, grad, **kw)
    mask = kw.get("mask")
    for o, r, a, name in zip(outs, ref_outs, ora_outs, ("divergence", "entropy")):
        assert o.dtype == reference.out_dtype(sh.dtype), name
        if mask is not None and o.dim() == 1:
            assert (o[~mask.bool()] == 0).all(), name
        _near(o, r, a, atol_out * (N if o.dim() == 0 else 1), name)
    for t, gt, r, a, name in zip((sh, sw, sb), gs, ref_gs, ora_gs, ("hidden", "weight", "bias")):
        assert gt.dtype == t.dtype and gt.shape == t.shape, name
        assert torch.isfinite(gt).all(), name
        if mask is not None and name == "hidden":
            assert (gt[~mask.bool()] == 0).all()  # masked rows get no gradient
        # bf16: the gradients of the logits are rounded to bf16 (as the reference's), not always
        # to the same neighbour, and weight/bias sum N of them: allow 2 bf16 ulps
        rtol = 2 * torch.finfo(gt.dtype).eps if gt.dtype in (torch.bfloat16, torch.float16) else 0.0
        _near(gt, r, a, atol_grad * (1 if name == "hidden" else N), f"grad_{name}", rtol)


def _mask(N, seed=0):
    m = torch.rand(N, generator=torch.Generator().manual_seed(seed)) > 0.4
    m[0], m[-1] = False, True
    return m


# (student dtype, teacher dtype, V, chunk_size, mask, student bias, teacher bias, temperature)
CONFIGS = {
    "fp32-V129": (torch.float32, None, 129, None, False, True, False, 1.0),
    "fp32-V1000-chunk3-mask-T0.7": (torch.float32, None, 1000, 3, True, False, True, 0.7),
    "bf16-V1000-chunk4-mask-T1.3": (torch.bfloat16, None, 1000, 4, True, True, True, 1.3),
    "fp32-student-bf16-teacher-V129-chunk2": (torch.float32, torch.bfloat16, 129, 2, False, True, True, 0.7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(backend, beta, reduction, config):
    sdt, tdt, V, chunk, masked, sbias, tbias, T = CONFIGS[config]
    N = 7
    models = _models(N, 16, 24, V, sdt, tdt, seed=V + int(10 * beta), sbias=sbias, tbias=tbias)
    kw = dict(beta=beta, temperature=T, reduction=reduction, chunk_size=chunk, mask=_mask(N) if masked else None)
    bf16 = sdt == torch.bfloat16 or tdt == torch.bfloat16
    _check(backend, models, 1e-4 if bf16 else 2e-6, 1e-4 if bf16 else 2e-6, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_results_do_not_depend_on_chunking(backend, beta):
    models = _models(11, 8, 12, 300, seed=3)
    mask = _mask(11, seed=3)
    g = torch.randn(11, generator=torch.Generator().manual_seed(2))
    runs = [_run(backend, models, g, beta=beta, mask=mask, chunk_size=c) for c in (1, 4, None)]
    for outs, gs in runs[1:]:
        for a, b in zip(outs + gs, runs[0][0] + runs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fully_masked_one_row_and_empty(backend, reduction):
    sh, sw, sb, th, tw, tb = _models(5, 4, 6, 33, seed=4)
    leaves = [t.clone().requires_grad_() for t in (sh, sw, sb)]
    with ops.use_backend(backend):
        # no kept row: zeros, and a backward that gives zero gradients instead of an error
        div, ent = ops.fused_linear_divergence(*leaves[:2], th, tw, student_bias=leaves[2], teacher_bias=tb,
                                               mask=torch.zeros(5, dtype=torch.bool), reduction=reduction,
                                               return_entropy=True)
        assert div.shape == (() if reduction == "sum" else (5,)) and (div == 0).all() and (ent == 0).all()
        for g in torch.autograd.grad(div.sum(), leaves):
            assert (g == 0).all()
        # N = 0
        div0 = ops.fused_linear_divergence(sh[:0], sw, th[:0], tw, reduction=reduction)
        assert div0.shape == (() if reduction == "sum" else (0,)) and div0.sum() == 0
    # one row, one kept row (0/1 int mask)
    for mask in (None, torch.tensor([0, 0, 1, 0, 0])):
        models = (sh[2:3], sw, sb, th[2:3], tw, tb) if mask is None else (sh, sw, sb, th, tw, tb)
        _check(backend, models, 2e-6, 2e-6, beta=0.5, reduction=reduction, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_teacher_bias_with_neg_inf(backend, beta):
    # tokens the teacher gives probability 0: forward KL and the JSD stay finite (their terms of
    # zero probability are 0); the reverse KL is +inf wherever the student puts mass on them
    models = list(_models(6, 8, 8, 257, seed=5))
    models[5][::4] = float("-inf")
    g = torch.randn(6, generator=torch.Generator().manual_seed(1))
    kw = dict(beta=beta, temperature=0.8, chunk_size=4)
    (div, ent), gs = _run(backend, models, g, **kw)
    (odiv, oent), ogs = _run(None, models, g, **kw)
    if beta == 1.0:
        assert torch.isposinf(div).all() and torch.isposinf(odiv).all()
        return
    torch.testing.assert_close(div.double(), odiv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.double(), oent, rtol=1e-5, atol=1e-6)
    for a, b in zip(gs, ogs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_teacher_gets_no_gradient(backend, reduction):
    sh, sw, sb, th, tw, tb = _models(4, 4, 6, 17, seed=6)
    th, tw, tb = (t.clone().requires_grad_() for t in (th, tw, tb))
    with ops.use_backend(backend):
        # only the teacher requires grad: nothing to differentiate
        div = ops.fused_linear_divergence(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, reduction=reduction)
        assert not div.requires_grad
        shg = sh.clone().requires_grad_()
        div = ops.fused_linear_divergence(shg, sw, th, tw, student_bias=sb, teacher_bias=tb, reduction=reduction)
    div.sum().backward()
    assert shg.grad is not None and all(t.grad is None for t in (th, tw, tb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_an_enclosing_cpu_autocast_changes_nothing(backend, reduction, dtype, backward_inside):
    """Inside a trainer's autocast region the op computes in its inputs' dtypes (float32 here):
    the same values and gradients as outside it (the C++ kernel's matmuls once followed the
    autocast into half precision and failed: "expected scalar type Float but found Half"). Its
    own backward kernel too, when backward() is called inside the region; the torch reference's
    backward is torch's autograd there, which follows the region (torch's behaviour, not ours)."""
    if backward_inside and backend == "torch":
        pytest.skip("the reference's backward is torch autograd's own under autocast")
    sh, sw, sb, th, tw, tb = _models(5, 4, 6, 17, seed=3)
    out = []
    for autocast in (False, True):
        shg, swg = sh.clone().requires_grad_(), sw.clone().requires_grad_()
        with ops.use_backend(backend), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            div = ops.fused_linear_divergence(shg, swg, th, tw, student_bias=sb, teacher_bias=tb,
                                              reduction=reduction)
            if backward_inside:
                div.sum().backward()
        if not backward_inside:
            div.sum().backward()
        out.append((div.detach(), shg.grad, swg.grad))
    assert out[1][0].dtype == torch.float32
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gradcheck(backend, reduction, beta):
    sh, sw, sb, th, tw, tb = _models(5, 3, 4, 9, torch.float64, seed=7)
    mask = torch.tensor([True, False, True, True, True])

    def f(h, w, b):
        return ops.fused_linear_divergence(h, w, th, tw, beta=beta, temperature=0.7, mask=mask, student_bias=b,
                                           teacher_bias=tb, reduction=reduction, chunk_size=2)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (sh, sw, sb)))


def test_matches_trl_chunked_divergence_function():
    # TRL 1.16's DistillationTrainer loss (trl/kernels/chunked_divergence.py), called as it is:
    # per-token divergence and entropy, and the student's gradients for a per-row grad_output
    chunked = pytest.importorskip("trl.kernels.chunked_divergence")
    models = _models(6, 16, 24, 300, seed=8)
    g = torch.randn(6, generator=torch.Generator().manual_seed(3))
    for beta in BETAS:
        leaves = [t.clone().requires_grad_() for t in models[:3]]
        div, ent = chunked.ChunkedDivergenceFunction.apply(leaves[0], leaves[1], leaves[2], *models[3:], beta, 0.7)
        trl_gs = torch.autograd.grad((div * g).sum(), leaves)
        for backend in BACKENDS:
            (ours, our_ent), gs = _run(backend, models, g, beta=beta, temperature=0.7)
            torch.testing.assert_close(ours, div.detach(), rtol=1e-5, atol=2e-6, msg=f"{backend} beta={beta}")
            torch.testing.assert_close(our_ent, ent, rtol=1e-5, atol=2e-6)
            for a, b in zip(gs, trl_gs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_torch_compile_fullgraph(backend, reduction):
    # with a mask: under torch.compile the kept count would be data-dependent, so the cpp backend
    # passes the mask to the kernel instead of compacting
    sh, sw, sb, th, tw, tb = _models(6, 8, 4, 37, seed=9)
    mask = _mask(6, seed=9)

    def loss(h, w, b):
        div, ent = ops.fused_linear_divergence(h, w, th, tw, beta=0.3, mask=mask, student_bias=b, teacher_bias=tb,
                                               reduction=reduction, return_entropy=True, chunk_size=4)
        return div.sum() * 1.5 + ent.sum()

    leaves = [t.clone().requires_grad_() for t in (sh, sw, sb)]
    with ops.use_backend(backend):
        out = torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves)
        out.backward()
    ref = [t.clone().requires_grad_() for t in (sh, sw, sb)]
    div, ent = reference.fused_linear_divergence(ref[0], ref[1], th, tw, beta=0.3, mask=mask, student_bias=ref[2],
                                                 teacher_bias=tb, return_entropy=True)
    exp = div.sum() * 1.5 + ent.sum()
    exp.backward()
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    for a, r in zip(leaves, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(dtype, with_mask):
    sh, sw, sb, th, tw, tb = _models(5, 4, 3, 11, dtype, seed=10)
    mask = _mask(5) if with_mask else None
    req = [t.clone().requires_grad_() for t in (sh, sw, sb)]
    common = (th, tw, tb, mask, 0.3, 0.7)
    ns = torch.ops.rlhf_fast
    torch.library.opcheck(ns.fused_linear_divergence_fwd.default, (*req, *common, True, 2))
    torch.library.opcheck(ns.fused_linear_divergence_sum_fwd.default, (*req, *common, True, True, True, True, 2))
    torch.library.opcheck(ns.fused_linear_divergence_bwd.default,
                          (torch.randn(5, dtype=reference.out_dtype(dtype)), sh, sw, sb, *common, True, True, False, 2))


@needs_cpp
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_holds_one_chunk_of_logits_per_model(reduction):
    N, H, Ht, V, C = 256, 16, 8, 4096, 16
    sh, sw, sb, th, tw, tb = _models(N, H, Ht, V, seed=11)
    chunk, full, w_bytes = C * V * 4, N * V * 4, V * H * 4
    sh.requires_grad_()
    sw.requires_grad_()
    mask = _mask(N)

    def step(backend):
        with ops.use_backend(backend):
            div, ent = ops.fused_linear_divergence(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, mask=mask,
                                                   reduction=reduction, return_entropy=True, chunk_size=C)
        (div.sum() + ent.sum()).backward()

    # the measurement sees the reference's full [N, V] logits (so it can fail) ...
    _, ref_big = timeline_memory(lambda: step("torch"))
    assert ref_big >= full * mask.float().mean()
    # ... the native op at most the two models' chunks, the weight-gradient accumulator and
    # its copy in the weight's dtype, and [N, H] / [N] tensors
    peak, big = timeline_memory(lambda: step("cpp"))
    assert big <= max(chunk, w_bytes), f"largest allocation {big} B, one chunk {chunk} B"
    budget = 2 * chunk + 2 * w_bytes + 3 * N * (H + Ht) * 4 + 16 * N * 4
    assert peak <= budget, f"peak {peak} B > {budget} B (full logits {full} B)"


@needs_cpp
def test_auto_chunk_is_bounded():
    # chunk_size=None: one chunk of fp32 logits of each model stays <= 32 MiB, whatever N
    N, V = 512, 32768 * 2  # full logits 128 MiB per model; auto chunk = 128 rows = 32 MiB
    sh, sw, _, th, tw, _ = _models(N, 2, 2, V, seed=12, sbias=False, tbias=False)
    with ops.use_backend("cpp"):
        peak, big = timeline_memory(lambda: ops.fused_linear_divergence(sh, sw, th, tw))
    assert big <= 32 * 2 ** 20 + 4096, big
    assert peak <= 2 * 32 * 2 ** 20 + 64 * N, peak


def _bad_calls():
    sh, sw, sb, th, tw, tb = _models(4, 3, 5, 7, seed=0)
    ok = dict(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw)
    return [
        (dict(ok, student_hidden=sh.long()), TypeError, "student_hidden"),
        (dict(ok, student_hidden=sh[0]), ValueError, "student_hidden"),
        (dict(ok, student_weight=torch.randn(7, 4)), ValueError, "student_weight"),
        (dict(ok, student_weight=sw.double()), TypeError, "student_weight"),
        (dict(ok, student_weight=[[1.0]]), TypeError, "student_weight"),
        (dict(ok, teacher_hidden=th[:3]), ValueError, "teacher_hidden"),
        (dict(ok, teacher_hidden=th.half()), TypeError, "teacher_weight"),
        (dict(ok, teacher_weight=torch.randn(8, 5)), ValueError, "teacher_weight"),
        (dict(ok, teacher_weight=torch.randn(7, 3)), ValueError, "teacher_weight"),
        (dict(ok, student_bias=torch.zeros(6)), ValueError, "student_bias"),
        (dict(ok, student_bias=sb.double()), TypeError, "student_bias"),
        (dict(ok, teacher_bias=torch.zeros(7, 1)), ValueError, "teacher_bias"),
        (dict(ok, teacher_bias=tb.bfloat16()), TypeError, "teacher_bias"),
        (dict(ok, mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask"),
        (dict(ok, mask=[1, 1, 1, 1]), TypeError, "mask"),
        (dict(ok, beta=-0.1), ValueError, "beta"),
        (dict(ok, beta=1.5), ValueError, "beta"),
        (dict(ok, beta=float("nan")), ValueError, "beta"),
        (dict(ok, beta=True), TypeError, "beta"),
        (dict(ok, beta="0.5"), TypeError, "beta"),
        (dict(ok, temperature=0.0), ValueError, "temperature"),
        (dict(ok, temperature=None), TypeError, "temperature"),
        (dict(ok, reduction="mean"), ValueError, "reduction"),
        (dict(ok, return_entropy="yes"), TypeError, "return_entropy"),
        (dict(ok, chunk_size=0), ValueError, "chunk_size"),
        (dict(ok, chunk_size=True), ValueError, "chunk_size"),
        (dict(ok, chunk_size=2.0), ValueError, "chunk_size"),
        (dict(ok, student_weight=sw.to("meta")), ValueError, "student_weight"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_is_named(backend, i):
    kwargs, exc, match = _bad_calls()[i]
    with ops.use_backend(backend), pytest.raises(exc, match=match):
        ops.fused_linear_divergence(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_chunk_size_is_whole_batch(backend):
    models = _models(4, 3, 5, 7, seed=13)
    sh, sw, sb, th, tw, tb = models
    with ops.use_backend(backend):
        got = ops.fused_linear_divergence(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=10 ** 30)
    torch.testing.assert_close(got, reference.fused_linear_divergence(sh, sw, th, tw, student_bias=sb,
                                                                      teacher_bias=tb))
