"""Review of the Triton kernels (run on the CPU under TRITON_INTERPRET=1, or on a GPU) on
awkward inputs the per-op files do not cover: logits divided by the temperature that are large
(ties of large logits, low temperatures) and infinite log-ratios. Each test pins one defect
found against a float64 oracle (reference.py run in float64)."""

import math

import pytest
import torch

from rlhf_fast import ops

from .conftest import device


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grads(backend, x, y, temperature, dtype, op):
    """(logp, d(Σ c·logp + Σ c'·entropy)/d(logits)) through ``op`` on ``backend``."""
    x = x.to(device=device(), dtype=dtype).requires_grad_(True)
    y = y.to(device())
    c1 = torch.randn(y.shape, dtype=torch.float64, generator=_gen(1)).to(device())
    c2 = torch.randn(y.shape, dtype=torch.float64, generator=_gen(2)).to(device())
    with ops.use_backend(backend):
        if op == "token_logprobs":
            lp, ent = ops.token_logprobs(x, y, temperature=temperature, return_entropy=True)
        elif op == "fused_linear_logprobs" or backend == "torch":  # an identity LM head: logits = hidden
            eye = torch.eye(x.shape[1], dtype=dtype, device=device())
            lp, ent = ops.fused_linear_logprobs(x, eye, y, temperature=temperature, return_entropy=True)
        else:  # the fused head's one-kernel backward (not the op's default)
            from rlhf_fast.kernels.fused_linear import fused_linear_logprobs

            eye = torch.eye(x.shape[1], dtype=dtype, device=device())
            lp, ent = fused_linear_logprobs(x, eye, y, temperature=temperature, return_entropy=True,
                                            backward="triton")
    (g,) = torch.autograd.grad((lp * c1.to(lp.dtype)).sum() + (ent * c2.to(ent.dtype)).sum(), x)
    return lp.detach().double().cpu(), g.double().cpu()


@pytest.mark.parametrize("op", ["token_logprobs", "fused_linear_logprobs"])
def test_logp_of_tied_large_logits_is_exact(op):
    """Five logits tied at the max of 1e4 (T = 1e-3: z = 1e7, where a float32 ulp is 1): the
    label's logp is −log 5 exactly; the kernels returned z − fl(z + log 5) = 0 (an error of
    1.6, where the reference's log_softmax keeps z − max exact)."""
    x = torch.zeros(3, 40)
    x[:, 10:15] = 1e4
    x[1] = 30 * torch.randn(40, generator=_gen(0))
    y = torch.tensor([12, int(x[1].argmax()), 0])
    exact, _ = _grads("torch", x, y, 1e-3, torch.float64, op)
    got, _ = _grads("triton", x, y, 1e-3, torch.float32, op)
    assert exact[0].item() == pytest.approx(-math.log(5.0))
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("op", ["token_logprobs", "fused_linear_logprobs", "fused_linear_triton_backward"])
@pytest.mark.parametrize("offset,scale,temperature", [(1e4, 1.0, 1.0)])
def test_logits_gradient_is_exact_when_logits_over_t_are_large(op, offset, scale, temperature):
    """Logits of 1e4 ± a few (T = 1): p = exp(z − lse) with lse rounded to float32 (ulp 1e-3)
    put the gradient 2e-4 off relative to its scale (the float32 reference: 1e-6)."""
    g = _gen(3)
    x = offset + scale * torch.randn(12, 40, generator=g)
    y = torch.randint(0, 40, (12,), generator=g)
    y[3] = -100
    _, exact = _grads("torch", x, y, temperature, torch.float64, op)
    _, got = _grads("triton", x, y, temperature, torch.float32, op)
    size = exact.abs().max().item()
    assert torch.isfinite(got).all()
    assert (got - exact).abs().max().item() <= 1e-5 * size, ((got - exact).abs().max().item(), size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_k1_gradient_is_one_for_infinite_log_ratios(dtype):
    """k1 = logp − ref has gradient 1 everywhere (reference, cpp); the kernel computed it as
    d·0 + 1, NaN where a log-prob is ±inf (a -inf reference log-prob of a masked token)."""
    lp = torch.tensor([float("inf"), float("-inf"), 0.0, -1.0], dtype=dtype, device=device())
    lp.requires_grad_(True)
    ref = torch.tensor([0.0, 0.0, float("-inf"), -2.0], dtype=dtype, device=device())
    with ops.use_backend("triton"):
        out = ops.kl_penalty(lp, ref, "k1")
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert g.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_ignored_row_of_all_minus_inf_logits_has_zero_gradient():
    """An ignored position (label ignore_index) of all -inf logits: logp 0 and a zero gradient
    (the reference and the C++ kernel); the kernel's 0·p with p = exp(-inf + inf) was NaN."""
    x = torch.randn(2, 5, generator=_gen(4))
    x[1] = float("-inf")
    x = x.to(device()).requires_grad_(True)
    with ops.use_backend("triton"):
        logp, ent = ops.token_logprobs(x, torch.tensor([1, -100], device=device()), return_entropy=True)
    (g,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    assert logp[1].item() == 0.0 and ent[1].item() == 0.0
    assert torch.isfinite(g).all() and g[1].abs().sum().item() == 0.0, g
