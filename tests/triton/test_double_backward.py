"""Second derivatives through the Triton ops: a backward run with create_graph=True recomputes
through reference.py with autograd, so Hessian-vector products equal the reference's (the
kernels' gradients used to enter the graph as constants, dropping the op's own term)."""

import pytest
import torch

from rlhf_fast import ops

from .conftest import device


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _t(*shape, seed, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(*shape, generator=_gen(seed))).to(device())


def _cases():
    B, T, V, H = 2, 3, 7, 4
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], device=device())
    old, adv, ref = _t(B, T, seed=1, shift=-2), _t(B, T, seed=2), _t(B, T, seed=3, shift=-2)
    y = torch.tensor([[0, 6, 3], [2, 2, 5]], device=device())
    return {
        "token_logprobs": (lambda z: sum(o.sum() for o in ops.token_logprobs(
            z, y, temperature=0.8, return_entropy=True)), [_t(B, T, V, seed=4)]),
        "kl_penalty": (lambda lp: ops.kl_penalty(lp, ref, "k3").sum(), [_t(B, T, seed=5, shift=-2)]),
        "ppo_policy_loss": (lambda lp: ops.ppo_policy_loss(lp, old, adv, mask, clip_low=10.0)[0],
                            [old + 0.05 * _t(B, T, seed=6)]),
        "ppo_value_loss": (lambda v: ops.ppo_value_loss(v, old, adv, mask, clip=None)[0], [_t(B, T, seed=7)]),
        "fused_linear_logprobs": (lambda h, w: sum(o.sum() for o in ops.fused_linear_logprobs(
            h, w, y.reshape(-1), return_entropy=True)), [_t(B * T, H, seed=8), _t(V, H, seed=9)]),
        "fused_linear_policy_loss": (lambda h, w: ops.fused_linear_policy_loss(
            h, w, y, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, clip_low=10.0)[0],
            [_t(B, T, H, seed=10, scale=0.5), _t(V, H, seed=11, scale=0.5)]),
    }


def _hvp(f, xs, backend):
    xs = [x.clone().requires_grad_(True) for x in xs]
    vs = [torch.randn(x.shape, generator=_gen(20 + i)).to(device()) for i, x in enumerate(xs)]
    with ops.use_backend(backend):
        gs = torch.autograd.grad(f(*xs), xs, create_graph=True)
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(gs, vs)), xs)


@pytest.mark.parametrize("op", sorted(_cases()))
def test_hessian_vector_product_matches_the_reference(op):
    f, xs = _cases()[op]
    expected = _hvp(f, xs, "torch")
    for a, b in zip(_hvp(f, xs, "triton"), expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
