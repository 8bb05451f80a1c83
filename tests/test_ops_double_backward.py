"""Second derivatives through every op with a backward, on the default dispatch (the C++ kernels
when built): a backward run with ``create_graph=True`` recomputes through reference.py with
autograd (rlhf_fast/ops/_native.py, ``differentiable_backward``), so ``gradgradcheck`` passes;
a first-order backward stays the native kernel's."""

import pytest
import torch

import rlhf_fast.ops as ops

from .conftest import live_cpu_backends

NATIVE = [b for b in live_cpu_backends() if b != "torch"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64, generator=_gen(seed))).requires_grad_(True)


def _token_logprobs():
    y = torch.tensor([0, 4, -100, 2])
    return (lambda z: ops.token_logprobs(z, y, temperature=0.7, return_entropy=True)), (_r(4, 5, seed=1),)


def _token_logprobs_logp_only():
    y = torch.tensor([[1, 3], [0, 2]])
    return (lambda z: ops.token_logprobs(z, y)), (_r(2, 2, 5, seed=2),)


def _fused_linear_logprobs():
    y = torch.tensor([0, 6, 3])
    return (lambda h, w, b: ops.fused_linear_logprobs(h, w, y, bias=b, temperature=1.3, return_entropy=True,
                                                      chunk_size=2)), (_r(3, 4, seed=3), _r(7, 4, seed=4),
                                                                       _r(7, seed=5))


def _fused_linear_policy_loss():
    B, T, V, H = 2, 3, 6, 4
    y = torch.randint(0, V, (B, T), generator=_gen(6))
    old, adv = torch.randn(B, T, generator=_gen(7), dtype=torch.float64) - 2, torch.randn(B, T, generator=_gen(8))
    ref = torch.randn(B, T, generator=_gen(9), dtype=torch.float64) - 2
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])

    def f(h, w):
        # clip limits wide enough that no ratio sits on a kink of the clipped loss
        return ops.fused_linear_policy_loss(h, w, y, old, adv.double(), mask, ref_logp=ref, kl_coef=0.1,
                                            entropy_coef=0.01, clip_low=10.0, agg="seq-mean-token-mean")[0]

    return f, (_r(B, T, H, seed=10, scale=0.5), _r(V, H, seed=11, scale=0.5))


def _kl(kind):
    ref = torch.randn(6, dtype=torch.float64, generator=_gen(12))

    def make():
        return (lambda lp: ops.kl_penalty(lp, ref, kind)), (_r(6, seed=13) + 0.0,)

    return make


def _ppo_policy_loss():
    old = torch.randn(2, 4, dtype=torch.float64, generator=_gen(14))
    adv = torch.randn(2, 4, dtype=torch.float64, generator=_gen(15))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    # logp within ±0.05 of old_logp: every ratio inside the clip range, away from its kinks
    lp = (old + 0.05 * torch.rand(2, 4, dtype=torch.float64, generator=_gen(16))).requires_grad_(True)
    return (lambda x: ops.ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-sum")[0]), (lp,)


def _ppo_value_loss():
    old = torch.randn(2, 4, dtype=torch.float64, generator=_gen(17))
    ret = torch.randn(2, 4, dtype=torch.float64, generator=_gen(18))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    v = (old + 0.1 * torch.rand(2, 4, dtype=torch.float64, generator=_gen(19))).requires_grad_(True)
    return (lambda x: ops.ppo_value_loss(x, old, ret, mask, clip=0.2, normalizer=5)[0]), (v,)


def _divergence(reduction):
    def make():
        th = torch.randn(3, 5, dtype=torch.float64, generator=_gen(20))
        tw = torch.randn(7, 5, dtype=torch.float64, generator=_gen(21))
        return (lambda h, w: ops.fused_linear_divergence(h, w, th, tw, beta=0.3, temperature=0.9,
                                                         reduction=reduction)), (_r(3, 4, seed=22), _r(7, 4, seed=23))

    return make


CASES = {
    "token_logprobs": _token_logprobs,
    "token_logprobs_logp_only": _token_logprobs_logp_only,
    "fused_linear_logprobs": _fused_linear_logprobs,
    "fused_linear_policy_loss": _fused_linear_policy_loss,
    **{f"kl_penalty_{k}": _kl(k) for k in ("k1", "k2", "k3", "mse")},
    "ppo_policy_loss": _ppo_policy_loss,
    "ppo_value_loss": _ppo_value_loss,
    "fused_linear_divergence_none": _divergence("none"),
    "fused_linear_divergence_sum": _divergence("sum"),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_gradgradcheck_on_the_default_dispatch(op):
    f, inputs = CASES[op]()
    assert torch.autograd.gradgradcheck(f, inputs)


def _grads(f, inputs, create_graph):
    out = f(*inputs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    ws = [torch.randn(o.shape, dtype=o.dtype, generator=_gen(30 + i)) for i, o in enumerate(outs)]
    return torch.autograd.grad(outs, inputs, ws, create_graph=create_graph)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("op", sorted(CASES))
def test_first_order_stays_native_and_matches_the_differentiable_backward(op, backend):
    """create_graph=False runs the native kernel (a graph-free gradient); create_graph=True the
    reference's, with a graph; both agree."""
    f, inputs = CASES[op]()
    with ops.use_backend(backend):
        fast = _grads(f, inputs, False)
        exact = _grads(f, inputs, True)
    assert all(g.grad_fn is None for g in fast)
    if op != "kl_penalty_k1":  # d(logp − ref)/dlogp = 1 is a constant: no graph to build
        assert all(g.grad_fn is not None for g in exact)
    for a, b in zip(fast, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", NATIVE)
def test_hessian_vector_product_matches_the_reference(backend):
    """A Hessian-vector product of token_logprobs' entropy (float32 logits): the native backend's
    equals the reference's (the op's own second-order term used to be dropped)."""
    z = torch.randn(3, 2100, generator=_gen(40))
    y = torch.tensor([0, 5, 2099])
    v = torch.randn(z.shape, generator=_gen(41))

    def hvp(name):
        x = z.clone().requires_grad_(True)
        with ops.use_backend(name):
            (g,) = torch.autograd.grad(ops.token_logprobs(x, y, return_entropy=True)[1].sum(), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    expected = hvp("torch")
    assert expected.abs().max() > 0
    torch.testing.assert_close(hvp(backend), expected)
