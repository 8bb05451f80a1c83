"""fused_linear_divergence at the edges of its inputs: the C++ kernel at the temperature below
which it hands calls to the reference (both sides of reference.NATIVE_DIVERGENCE_MIN_TEMPERATURE),
NaN logits of either model (the reference's NaNs, the student's entropy kept for a NaN teacher),
and numpy temperatures (accepted, bad values still refused)."""

import numpy as np
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import reference

from .conftest import live_cpu_backends

needs_cpp = pytest.mark.skipif("cpp" not in live_cpu_backends(), reason="rlhf_fast._C is not built")
pytestmark = pytest.mark.usefixtures("one_thread")

T_MIN = reference.NATIVE_DIVERGENCE_MIN_TEMPERATURE


def _heads(seed, scale=1.0, n=6, h=16, v=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g) * scale, torch.randn(v, h, generator=g)


def _div(backend, sh, sw, th, tw, **kw):
    with ops.use_backend(backend):
        return ops.fused_linear_divergence(sh, sw, th, tw, **kw)


@needs_cpp
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_cpp_at_the_routing_temperature_matches_reference(beta):
    # logits up to ~100 (|z| / T ~ 1e8): the C++ float path, still in use at T_MIN, agrees with
    # the reference to float rounding there (it drifts from |z| / T ~ 2e9: measured at 1e-8)
    h, w = _heads(0, scale=5.0)
    th, tw = _heads(1, scale=5.0)
    got = _div("cpp", h, w, th, tw, beta=beta, temperature=T_MIN)
    ref = _div("torch", h, w, th, tw, beta=beta, temperature=T_MIN)
    # the small-T regime: the KLs ~ |Δz| / T (the JSD stays below log 2)
    assert torch.isfinite(ref).all() and (ref > (1e3 if beta in (0.0, 1.0) else 0.1)).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0.0)


@needs_cpp
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_cpp_below_the_routing_temperature_is_the_reference(reduction):
    h, w = _heads(0)
    th, tw = _heads(1)
    T = T_MIN * 0.99
    hs = [h.clone().requires_grad_(), h.clone().requires_grad_()]
    ws = [w.clone().requires_grad_(), w.clone().requires_grad_()]
    outs = []
    for b, hh, ww in zip(("cpp", "torch"), hs, ws):
        d, e = _div(b, hh, ww, th, tw, beta=0.5, temperature=T, reduction=reduction, return_entropy=True)
        d.sum().backward()
        outs.append((d, e, hh.grad, ww.grad))
    for a, r in zip(*outs):
        assert torch.equal(a, r)


@needs_cpp
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_cpp_nan_teacher_logits_give_nan_divergence_and_the_students_entropy(beta):
    h, w = _heads(0)
    tw = w.clone()
    tw[3] = float("nan")
    d, e = _div("cpp", h, w, h, tw, beta=beta, return_entropy=True)
    rd, re = _div("torch", h, w, h, tw, beta=beta, return_entropy=True)
    assert rd.isnan().all() and d.isnan().all(), d
    torch.testing.assert_close(e, re)  # the entropy is the student's alone: finite


@needs_cpp
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_cpp_nan_student_logits_give_nan_everywhere(beta, reduction):
    h, w = _heads(0)
    th, tw = _heads(1)
    w_nan = w.clone()
    w_nan[5] = float("nan")
    hh = h.clone().requires_grad_()
    d, e = _div("cpp", hh, w_nan, th, tw, beta=beta, reduction=reduction, return_entropy=True)
    d.sum().backward()
    assert d.isnan().all() and e.isnan().all(), (d, e)
    assert hh.grad.isnan().all()  # as the reference's: every row's log-softmax is NaN


@needs_cpp
def test_cpp_nan_in_one_row_leaves_the_others():
    h, w = _heads(0)
    th, tw = _heads(1)
    h_nan = h.clone()
    h_nan[2, 0] = float("nan")
    d = _div("cpp", h_nan, w, th, tw, beta=0.5)
    ref = _div("cpp", h, w, th, tw, beta=0.5)
    assert d[2].isnan() and torch.equal(torch.cat([d[:2], d[3:]]), torch.cat([ref[:2], ref[3:]]))


@pytest.mark.parametrize("t", [np.float64(0.7), np.float32(0.5), np.int32(2), np.int64(1)])
def test_numpy_temperatures_give_the_floats_result(t):
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    lab = torch.arange(4)
    assert torch.equal(ops.token_logprobs(x, lab, temperature=t), ops.token_logprobs(x, lab, temperature=float(t)))


@pytest.mark.parametrize("t", [np.float32("nan"), np.float64("inf"), np.int64(0), np.float32(-1.0)])
def test_bad_numpy_temperatures_are_refused(t):
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.token_logprobs(x, torch.arange(2), temperature=t)


@pytest.mark.parametrize("t", [np.bool_(True), True, "1.0", torch.tensor(1.0)])
def test_non_numbers_are_refused_as_temperatures(t):
    with pytest.raises(TypeError, match="temperature must be a number"):
        ops.token_logprobs(torch.randn(2, 5), torch.arange(2), temperature=t)


def test_triton_below_the_routing_temperature_is_the_reference():
    # the hand-off happens before any launch, so it is checked on CPU tensors without a GPU
    pytest.importorskip("triton")
    from rlhf_fast.kernels import fused_divergence as tk

    h, w = _heads(0)
    th, tw = _heads(1)
    for T in (T_MIN * 0.99, 1e-40):
        got = tk.fused_linear_divergence(h, w, th, tw, beta=0.5, temperature=T, return_entropy=True)
        ref = reference.fused_linear_divergence(h, w, th, tw, beta=0.5, temperature=T, return_entropy=True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
