"""The C++ kernels of the training forward (csrc/cpu/train_layer.cpp: RMSNorm forward and
backward, the SwiGLU backward, RoPE on q / k) against the torch code they replace in
rlhf_fast/models/llama_forward.py, which ``use_backend("torch")`` selects and which stays the
reference: forward values bit for bit, gradients within float32 rounding (bf16 / fp16: no
further from the float64 truth than the torch code's own), on awkward shapes, non-contiguous
inputs and each subset of inputs needing a gradient; and that float64, CUDA, double backward
and a forced torch backend keep the torch code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.models import llama_forward, tiny_causal_lm  # noqa: E402
from rlhf_fast.models.llama_forward import _RMSNormFn, _rope, _rope_qk, _SwiGLUDownFn  # noqa: E402
from rlhf_fast.models.logprobs import backbone, default_position_ids  # noqa: E402

needs_kernels = pytest.mark.skipif(llama_forward._kernels() is None,
                                   reason="rlhf_fast._C not built (or built before these kernels)")
pytestmark = pytest.mark.usefixtures("one_thread")
LOW = (torch.bfloat16, torch.float16)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _run(fn, inputs, needs, seed=1):
    """``fn(*inputs)`` and the gradients, of a random projection of its outputs, of the inputs
    flagged in ``needs`` (the others do not require grad)."""
    leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]  # strides kept
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    wanted = [t for t, n in zip(leaves, needs) if n]
    if not wanted:
        return outs, []
    proj = [_randn(*o.shape, seed=seed + i).to(o.dtype) for i, o in enumerate(outs)]
    loss = sum((o.float() * p.float()).sum() for o, p in zip(outs, proj))
    return outs, list(torch.autograd.grad(loss, wanted))


def _both(fn, inputs, needs):
    """(kernels, torch code) results of :func:`_run`."""
    ours = _run(fn, inputs, needs)
    with ops.use_backend("torch"):
        ref = _run(fn, inputs, needs)
    return ours, ref


def _check_grads(ours, ref, truth, dtype):
    """float32: within float32 rounding of the torch code; bf16 / fp16: no further from the
    float64 truth than the torch code's gradient is (twice, plus a small atol)."""
    assert len(ours) == len(ref)
    for a, b, t in zip(ours, ref, truth if truth is not None else [None] * len(ours)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * (float(b.abs().max()) + 1e-3))
        else:
            err_ours, err_ref = (a.double() - t).norm(), (b.double() - t).norm()
            assert err_ours <= 2 * err_ref + 1e-3 * t.norm() + 1e-6, (err_ours.item(), err_ref.item())


NEEDS2 = list(itertools.product((True, False), repeat=2))


# ------------------------------------------------------------------ RMSNorm


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", [(1, 37), (5, 1), (3, 7, 37), (2, 300, 64), (4, 80)])
@pytest.mark.parametrize("needs", NEEDS2)
def test_rms_norm_matches_the_torch_code(dtype, shape, needs):
    x = _randn(*shape, dtype=dtype, scale=3.0)
    w = _randn(shape[-1], dtype=dtype, seed=2)

    def fn(x, w):
        return _RMSNormFn.apply(x, w, 1e-6)

    (y, g), (y_ref, g_ref) = _both(fn, (x, w), needs)
    assert torch.equal(y[0], y_ref[0])  # the forward's bits: transformers' module's
    truth = _run(fn, (x.double(), w.double()), needs)[1]
    _check_grads(g, g_ref, truth, dtype)


@needs_kernels
def test_rms_norm_non_contiguous_input_and_expanded_gradient():
    base = _randn(37, 6, scale=2.0)
    x = base.t()  # [6, 37], last-dim stride 6
    w = _randn(37, seed=3)

    def fn(x, w):
        return _RMSNormFn.apply(x, w, 1e-5)

    (y, g), (y_ref, g_ref) = _both(fn, (x, w), (True, True))
    assert torch.equal(y[0], y_ref[0])  # torch's sums over a strided row run in another order: so do ours
    _check_grads(g, g_ref, None, torch.float32)
    # .sum()'s gradient reaches the backward as an expanded (stride 0) tensor
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    fn(xs, ws).sum().backward()
    with ops.use_backend("torch"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xr, wr).sum().backward()
    torch.testing.assert_close((xs.grad, ws.grad), (xr.grad, wr.grad), rtol=2e-5, atol=1e-5)


@needs_kernels
def test_rms_norm_weight_gradient_over_many_rows_keeps_its_digits():
    """dw sums 40000 rows: blocks of float32 rows added in float64 stay as close to the float64
    truth as torch's pairwise sum."""
    x, w = _randn(40000, 24, scale=2.0), _randn(24, seed=5)
    fn = lambda x, w: _RMSNormFn.apply(x, w, 1e-6)  # noqa: E731
    (_, g), (_, g_ref) = _both(fn, (x, w), (False, True))
    truth = _run(fn, (x.double(), w.double()), (False, True))[1][0]
    assert (g[0].double() - truth).abs().max() <= 2 * (g_ref[0].double() - truth).abs().max() + 1e-6


# ------------------------------------------------------------------ SwiGLU


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("rows,inter", [((1,), 1), ((3, 5), 37), ((2, 9), 80), ((600,), 128)])
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, True, False, False),
                                   (False, False, True, True), (True, False, False, False),
                                   (False, True, True, False)])
def test_swiglu_matches_the_torch_code(dtype, rows, inter, needs):
    out = 6
    gate = _randn(*rows, inter, dtype=dtype, scale=4.0)  # wide enough to reach both tails of sigmoid
    up = _randn(*rows, inter, dtype=dtype, seed=2)
    w = _randn(out, inter, dtype=dtype, seed=3)
    b = _randn(out, dtype=dtype, seed=4)

    def fn(gate, up, w, b):
        return _SwiGLUDownFn.apply(gate, up, w, b)

    (y, g), (y_ref, g_ref) = _both(fn, (gate, up, w, b), needs)
    assert torch.equal(y[0], y_ref[0])  # the forward is the torch code's in both
    truth = _run(fn, (gate.double(), up.double(), w.double(), b.double()), needs)[1]
    _check_grads(g, g_ref, truth, dtype)


@needs_kernels
def test_swiglu_non_contiguous_gate_and_up():
    gate, up = _randn(37, 9, scale=3.0).t(), _randn(37, 9, seed=2).t()  # [9, 37] views
    w = _randn(5, 37, seed=3)
    fn = lambda gate, up, w: _SwiGLUDownFn.apply(gate, up, w, None)  # noqa: E731
    (y, g), (y_ref, g_ref) = _both(fn, (gate, up, w), (True, True, True))
    assert torch.equal(y[0], y_ref[0])
    _check_grads(g, g_ref, None, torch.float32)


@needs_kernels
def test_swiglu_kernels_extreme_gates():
    """silu and its derivative where exp under- and overflows: finite, and torch's values."""
    gate = torch.tensor([-1e4, -200.0, -90.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 90.0, 200.0, 1e4])
    up, dp = torch.full_like(gate, 1.5), torch.full_like(gate, -0.7)
    k = llama_forward._kernels()
    torch.testing.assert_close(k.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-30)
    d = dp.clone()
    d_up = k.swiglu_bwd_(d, gate, up)
    torch.testing.assert_close(d_up, F.silu(gate) * dp, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(d, torch.ops.aten.silu_backward(dp * up, gate), rtol=1e-6, atol=1e-30)
    nan = torch.tensor([float("nan")])
    assert k.silu_mul(nan, nan.clone().fill_(1.0)).isnan().all()


# ------------------------------------------------------------------ RoPE


def _cos_sin(B, T, d, dtype, batch_one=False):
    angles = _randn(1 if batch_one else B, T, d // 2, seed=7, scale=3.0)
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    half = d // 2
    sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], -1)
    return cos[:, None], sin_signed[:, None]  # [B or 1, 1, T, d]


def _torch_rope_qk(q, k, cos, sin):
    return _rope(q, cos, sin), _rope(k, cos, sin)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("B,hq,hk,T,d", [(1, 1, 1, 1, 2), (3, 4, 2, 7, 6), (2, 3, 1, 37, 32),
                                         (2, 8, 8, 40, 64)])
@pytest.mark.parametrize("layout", ["transposed", "contiguous", "strided"])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True), (False, False)])
def test_rope_matches_the_torch_code(dtype, B, hq, hk, T, d, layout, needs):
    def make(h, seed):
        if layout == "transposed":  # the training forward's q / k: a projection's [B, T, h, d] transposed
            return _randn(B, T, h, d, dtype=dtype, seed=seed).transpose(1, 2)
        if layout == "contiguous":
            return _randn(B, h, T, d, dtype=dtype, seed=seed)
        return _randn(B, h, T, 2 * d, dtype=dtype, seed=seed)[..., ::2]  # last-dim stride 2

    q, k = make(hq, 1), make(hk, 2)
    cos, sin = _cos_sin(B, T, d, dtype, batch_one=(layout == "contiguous"))
    fn = lambda q, k: _rope_qk(q, k, cos, sin)  # noqa: E731
    (y, g) = _run(fn, (q, k), needs)
    (y_ref, g_ref) = _run(lambda q, k: _torch_rope_qk(q, k, cos, sin), (q, k), needs)
    for a, b in zip(y, y_ref):
        assert torch.equal(a, b)  # torch's bits: separate roundings, no FMA
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)  # the backward too: two products and a sum, as autograd does it
    if layout == "transposed":  # laid out as the projection was: transposes back without a copy
        assert all(t.transpose(1, 2).is_contiguous() for t in y)


@needs_kernels
def test_rope_gradient_layout_transposes_back_to_the_projection():
    B, T, h, d = 2, 5, 3, 8
    x = _randn(B, T, h * d).requires_grad_()
    cos, sin = _cos_sin(B, T, d, torch.float32)
    q = x.view(B, T, h, d).transpose(1, 2)
    yq, yk = _rope_qk(q, q, cos, sin)
    (yq.sum() + 2 * yk.sum()).backward()
    xr = x.detach().clone().requires_grad_()
    qr = xr.view(B, T, h, d).transpose(1, 2)
    (_rope(qr, cos, sin).sum() + 2 * _rope(qr, cos, sin).sum()).backward()
    # q's and k's gradients reach x summed in another order than autograd's four terms
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the whole forward


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hidden_states_with_and_without_the_kernels(family, monkeypatch):
    """The kernels change no bit of the training forward and its gradients only within float32
    rounding (the transformers comparisons are tests/test_llama_forward.py's)."""
    m = tiny_causal_lm(97, family=family, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=88, seed=0)
    base = backbone(m)
    ids = torch.randint(3, 97, (3, 21), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[0, :4] = 0
    pos = default_position_ids(am)
    params = list(base.parameters())

    def run():
        h = llama_forward.hidden_states(base, ids, am, pos)
        return h, torch.autograd.grad((h * _randn(*h.shape, seed=9)).sum(), params)

    calls = []
    real = llama_forward._kernels_for
    monkeypatch.setattr(llama_forward, "_kernels_for", lambda *t: calls.append(1) or real(*t))
    h, g = run()
    assert calls
    monkeypatch.setattr(llama_forward, "_kernels_for", lambda *t: None)
    h_ref, g_ref = run()
    assert torch.equal(h, h_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ where the torch code stays


def _no_kernels(monkeypatch):
    def fail():
        raise AssertionError("the C++ kernels were asked for")

    monkeypatch.setattr(llama_forward, "_kernels", fail)


def test_float64_keeps_the_torch_code(monkeypatch):
    """float64 (gradcheck) never reaches the kernels, nor mixed dtypes."""
    _no_kernels(monkeypatch)
    x, w = _randn(3, 6, dtype=torch.float64).requires_grad_(), _randn(6, dtype=torch.float64).requires_grad_()
    _RMSNormFn.apply(x, w, 1e-6).sum().backward()
    gate, up = (_randn(2, 5, dtype=torch.float64, seed=s).requires_grad_() for s in (1, 2))
    _SwiGLUDownFn.apply(gate, up, _randn(3, 5, dtype=torch.float64), None).sum().backward()
    q = _randn(1, 2, 3, 4, dtype=torch.float64).requires_grad_()
    cos, sin = _cos_sin(1, 3, 4, torch.float64)
    sum(t.sum() for t in _rope_qk(q, q, cos, sin)).backward()
    # mixed dtypes (autocast: bf16 activations, float32 tables) keep it too
    qb = q.detach().to(torch.bfloat16)
    assert llama_forward._kernels_for(qb, qb, cos.float(), sin.float()) is None
    assert llama_forward._kernels_for(x.detach().float(), w.detach().bfloat16()) is None


def test_other_devices_keep_the_torch_code():
    for device in ("meta",) + (("cuda",) if torch.cuda.is_available() else ()):
        t = torch.empty(2, 3, device=device)
        assert llama_forward._kernels_for(t, t) is None


@pytest.mark.cuda
def test_cuda_keeps_the_torch_code(monkeypatch):
    _no_kernels(monkeypatch)
    x, w = (_randn(4, 8, seed=1).cuda().requires_grad_(), _randn(8, seed=2).cuda().requires_grad_())
    _RMSNormFn.apply(x, w, 1e-6).sum().backward()
    q = _randn(1, 2, 3, 4).cuda().requires_grad_()
    cos, sin = (t.cuda() for t in _cos_sin(1, 3, 4, torch.float32))
    sum(t.sum() for t in _rope_qk(q, q, cos, sin)).backward()


def test_forced_torch_backend_keeps_the_torch_code(monkeypatch):
    _no_kernels(monkeypatch)
    with ops.use_backend("torch"):
        x, w = _randn(3, 6).requires_grad_(), _randn(6).requires_grad_()
        _RMSNormFn.apply(x, w, 1e-6).sum().backward()
        gate, up = (_randn(2, 5, seed=s).requires_grad_() for s in (1, 2))
        _SwiGLUDownFn.apply(gate, up, _randn(3, 5), None).sum().backward()
        q = _randn(1, 2, 3, 4).requires_grad_()
        cos, sin = _cos_sin(1, 3, 4, torch.float32)
        sum(t.sum() for t in _rope_qk(q, q, cos, sin)).backward()


@needs_kernels
def test_create_graph_keeps_the_torch_code():
    """A backward that is itself differentiated (create_graph=True) runs the torch code, so its
    gradients are the torch code's bit for bit and, for RoPE, differentiable again (the torch
    RMSNorm and SwiGLU backwards work in place and never were)."""
    x, w = _randn(4, 6, scale=2.0).requires_grad_(), _randn(6, seed=2).requires_grad_()
    gate, up = _randn(4, 6, seed=3, scale=2.0).requires_grad_(), _randn(4, 6, seed=4).requires_grad_()
    wd = _randn(5, 6, seed=5).requires_grad_()
    q = _randn(1, 2, 4, 6, seed=6).transpose(1, 2).detach().requires_grad_()  # [1, 4 heads, T = 2, 6]
    k = _randn(1, 2, 2, 6, seed=7).transpose(1, 2).detach().requires_grad_()
    cos, sin = _cos_sin(1, 2, 6, torch.float32)

    def first(fn, inputs):
        out = fn(*inputs)
        out = sum(t.square().sum() for t in out) if isinstance(out, tuple) else out.square().sum()
        return torch.autograd.grad(out, inputs, create_graph=True)

    cases = [(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), (x, w)),
             (lambda g, u, w: _SwiGLUDownFn.apply(g, u, w, None), (gate, up, wd)),
             (lambda q, k: _rope_qk(q, k, cos, sin), (q, k))]
    for fn, inputs in cases:
        ours = first(fn, inputs)
        with ops.use_backend("torch"):
            ref = first(fn, inputs)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
    gq, gk = first(cases[2][0], (q, k))
    second = torch.autograd.grad(gq.square().sum() + gk.square().sum(), (q, k))
    with ops.use_backend("torch"):
        gq, gk = first(cases[2][0], (q, k))
        second_ref = torch.autograd.grad(gq.square().sum() + gk.square().sum(), (q, k))
    torch.testing.assert_close(second, second_ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the ops themselves


@needs_kernels
def test_opcheck():
    k = torch.ops.rlhf_fast
    x, w = _randn(5, 37), _randn(37, seed=2)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    gate, up = _randn(3, 37, seed=3), _randn(3, 37, seed=4)
    q = _randn(2, 5, 3, 8, seed=5).transpose(1, 2)
    cos, sin = _cos_sin(2, 5, 8, torch.float32)
    torch.library.opcheck(k.rms_norm_fwd, (x, w, 1e-6))
    torch.library.opcheck(k.rms_norm_bwd, (_randn(5, 37, seed=6), x, w, rstd, True, True))
    torch.library.opcheck(k.rms_norm_bwd, (_randn(5, 37, seed=6), x, w, rstd, False, True))
    torch.library.opcheck(k.silu_mul, (gate, up))
    torch.library.opcheck(k.swiglu_bwd_, (_randn(3, 37, seed=7), gate, up))
    torch.library.opcheck(k.rope, (q, q, cos, sin, False))
    torch.library.opcheck(k.rope, (q, q, cos, sin, True))


@needs_kernels
def test_ops_refuse_what_they_do_not_compute():
    k = llama_forward._kernels()
    x = _randn(3, 4)
    with pytest.raises(ValueError):
        k.rms_norm_fwd(x.double(), x[0].double(), 1e-6)  # float64
    with pytest.raises(ValueError):
        k.rms_norm_bwd(x, x, x[0].bfloat16(), x[:, 0], True, True)  # mixed dtypes
    with pytest.raises(ValueError):
        k.swiglu_bwd_(x.t(), x.t(), x.t())  # grad written in place must be contiguous
    cos, sin = _cos_sin(1, 3, 4, torch.float32)
    with pytest.raises(ValueError):
        k.rope(_randn(1, 2, 3, 5), _randn(1, 2, 3, 5), cos, sin, False)  # d of q / k is not cos'
    with pytest.raises(ValueError):
        k.rope(_randn(1, 2, 3, 3), _randn(1, 2, 3, 3), cos[..., :3], sin[..., :3], False)  # odd d
