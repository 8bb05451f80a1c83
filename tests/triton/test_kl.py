"""kl_penalty Triton kernels against rlhf_fast.ops.reference, forward and backward."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

from .conftest import device

KINDS = ["k1", "k2", "k3", "abs", "mse"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 7), (2, 1100)])
def test_matches_reference(kind, dtype, shape):
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(shape, generator=g) * 3).to(dtype).to(device()).requires_grad_()
    ref = (torch.randn(shape, generator=g) * 3).to(dtype).to(device())
    with ops.use_backend("triton"):
        assert _dispatch.select("kl_penalty", lp.device)[0] == "triton"
        out = ops.kl_penalty(lp, ref, kind)
    exp = reference.kl_penalty(lp, ref, kind)
    assert out.dtype == torch.float32 and out.shape == lp.shape
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    w = torch.randn(shape, generator=g).to(device())
    (ga,) = torch.autograd.grad((out * w).sum(), lp)
    (gb,) = torch.autograd.grad((exp * w).sum(), lp)
    assert ga.dtype == dtype
    torch.testing.assert_close(ga.float(), gb.float(), rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_log_ratios(kind):
    lp = torch.tensor([[-1e4, -20.0, 0.0, 20.0, 1e4, 3.0]], device=device(), requires_grad=True)
    ref = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 3.0]], device=device())
    with ops.use_backend("triton"):
        out = ops.kl_penalty(lp, ref, kind)
    exp = reference.kl_penalty(lp, ref, kind)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)
    (ga,) = torch.autograd.grad(out.sum(), lp)
    (gb,) = torch.autograd.grad(exp.sum(), lp)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)


def test_no_gradient_to_reference_and_fp64_gradcheck():
    # on the kernel's device: CPU tensors on a GPU machine would leave the triton backend
    dev = device()
    lp = torch.randn(4, 6, dtype=torch.float64, device=dev, requires_grad=True)
    ref = torch.randn(4, 6, dtype=torch.float64, device=dev)
    with ops.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda a: ops.kl_penalty(a, ref, "k3"), (lp,))
        r = torch.randn(3, device=dev, requires_grad=True)
        ops.kl_penalty(torch.randn(3, device=dev, requires_grad=True), r, "k3").sum().backward()
    assert r.grad is None


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_large(kind):
    lp = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    with ops.use_backend("triton"):
        out = ops.kl_penalty(lp, ref, kind)
    torch.testing.assert_close(out, reference.kl_penalty(lp, ref, kind), rtol=1e-5, atol=1e-5)
