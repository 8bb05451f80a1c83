"""ppo_policy_loss / ppo_value_loss Triton kernels against rlhf_fast.ops.reference."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

from .conftest import device

AGGS = list(reference.AGG_MODES)


def _batch(B, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g) * 0.4 - 1).to(dtype)
    old = (lp.float() + torch.randn(B, T, generator=g) * 0.3).to(dtype)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    if B > 1:
        mask[1] = False  # a fully masked row
    return [t.to(device()) for t in (lp, old, adv, mask)]


def _cmp_stats(a, b, tol):
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k].float(), b[k].float(), msg=k, **tol)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [(0.2, None, None), (0.1, 0.3, 3.0)])
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (2, 1500)])
def test_policy_matches_reference(agg, dtype, clip, shape):
    clip_low, clip_high, dual = clip
    lp, old, adv, mask = _batch(*shape, dtype)
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg=agg)
    with ops.use_backend("triton"):
        assert _dispatch.select("ppo_policy_loss", a.device)[0] == "triton"
        la, sa = ops.ppo_policy_loss(a, old, adv, mask, **kw)
    lb, sb = reference.ppo_policy_loss(b, old, adv, mask, **kw)
    assert la.dtype == torch.float32 and la.dim() == 0
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(la, lb, **tol)
    _cmp_stats(sa, sb, tol)
    (ga,) = torch.autograd.grad(la, a)
    (gb,) = torch.autograd.grad(lb, b)
    torch.testing.assert_close(ga.float(), gb.float(), rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)


def test_policy_ties_extremes_and_tensor_normalizer():
    # ratios exactly at the clip bounds, log-ratios beyond ±20, A = 0
    old = torch.zeros(2, 6, device=device())
    lp = torch.tensor([[0.0, 25.0, -25.0, 0.5, -0.5, 0.0], [1e4, -1e4, 0.1, 0.0, 2.0, -3.0]], device=device())
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, 0.0, -1.0], [-1.0, 1.0, 2.0, 0.0, -5.0, 1.0]], device=device())
    mask = torch.ones(2, 6, dtype=torch.float32, device=device())
    norm = torch.tensor(7.0, device=device())
    for agg in AGGS:
        a = lp.clone().requires_grad_()
        b = lp.clone().requires_grad_()
        with ops.use_backend("triton"):
            la, sa = ops.ppo_policy_loss(a, old, adv, mask, dual_clip=3.0, agg=agg, normalizer=norm)
        lb, sb = reference.ppo_policy_loss(b, old, adv, mask, dual_clip=3.0, agg=agg, normalizer=norm)
        torch.testing.assert_close(la, lb)
        _cmp_stats(sa, sb, dict(rtol=1e-5, atol=1e-6))
        torch.testing.assert_close(torch.autograd.grad(la, a)[0], torch.autograd.grad(lb, b)[0])


def test_policy_all_masked_and_fp64_gradcheck():
    lp, old, adv, mask = _batch(2, 5, torch.float32)
    mask = torch.zeros_like(mask)
    with ops.use_backend("triton"):
        la, sa = ops.ppo_policy_loss(lp, old, adv, mask)
    lb, sb = reference.ppo_policy_loss(lp, old, adv, mask)
    torch.testing.assert_close(la, lb)
    _cmp_stats(sa, sb, dict(rtol=0, atol=0))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    o, A, m = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.ones(3, 4)
    with ops.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda t: ops.ppo_policy_loss(t, o, A, m, clip_low=10.0)[0], (x,))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (2, 1500)])
def test_value_matches_reference(agg, dtype, clip, shape):
    g = torch.Generator().manual_seed(3)
    B, T = shape
    v = torch.randn(B, T, generator=g).to(dtype).to(device())
    old = (v.float() + 0.3 * torch.randn(B, T, generator=g).to(device())).to(dtype)
    ret = torch.randn(B, T, generator=g).to(device())
    mask = (torch.rand(B, T, generator=g) > 0.3).to(device())
    if B > 1:
        mask[1] = False
    a = v.clone().requires_grad_()
    b = v.clone().requires_grad_()
    with ops.use_backend("triton"):
        assert _dispatch.select("ppo_value_loss", a.device)[0] == "triton"
        la, sa = ops.ppo_value_loss(a, old, ret, mask, clip=clip, agg=agg)
    lb, sb = reference.ppo_value_loss(b, old, ret, mask, clip=clip, agg=agg)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    _cmp_stats(sa, sb, dict(rtol=1e-5, atol=1e-6))
    (ga,) = torch.autograd.grad(la, a)
    (gb,) = torch.autograd.grad(lb, b)
    torch.testing.assert_close(ga.float(), gb.float(), rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)


def test_value_tensor_normalizer_and_fp64_gradcheck():
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    old, R = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    m = torch.ones(3, 4)
    with ops.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda t: ops.ppo_value_loss(t, old, R, m, clip=0.5)[0], (v,))
        la, _ = ops.ppo_value_loss(v.float(), old.float(), R.float(), m, normalizer=torch.tensor(5.0))
    lb, _ = reference.ppo_value_loss(v.float(), old.float(), R.float(), m, normalizer=torch.tensor(5.0))
    torch.testing.assert_close(la, lb)


@pytest.mark.cuda
@pytest.mark.parametrize("agg", AGGS)
def test_cuda_large(agg):
    lp, old, adv, mask = _batch(64, 4096, torch.bfloat16)
    with ops.use_backend("triton"):
        la, sa = ops.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, agg=agg)
    lb, sb = reference.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, agg=agg)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-6)
    _cmp_stats(sa, sb, dict(rtol=1e-4, atol=1e-6))


def test_masked_out_nan_inf_padding_never_leaks():
    """-inf / NaN at masked-out positions (padding) reach neither loss, stats nor gradients:
    the kernels select with the mask instead of multiplying by it (0 · inf = NaN)."""
    nan, inf = float("nan"), float("inf")
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool, device=device())
    lp0 = torch.tensor([[-1.0, -2.0, -inf], [-1.0, nan, -inf]], device=device())
    old = torch.tensor([[-1.1, -2.0, -inf], [-1.0, 0.0, -inf]], device=device())
    adv = torch.tensor([[1.0, -1.0, inf], [1.0, nan, 0.0]], device=device())
    v0 = torch.tensor([[1.0, 2.0, nan], [1.0, inf, 0.0]], device=device())
    fin = lambda t: torch.where(m, t, torch.zeros_like(t))  # noqa: E731 (the same batch, padding zeroed)
    for agg in AGGS:
        for clean in (False, True):
            lp = (fin(lp0) if clean else lp0.clone()).requires_grad_()
            v = (fin(v0) if clean else v0.clone()).requires_grad_()
            args = (fin(old), fin(adv)) if clean else (old, adv)
            with ops.use_backend("triton"):
                loss, st = ops.ppo_policy_loss(lp, *args, m, dual_clip=3.0, agg=agg)
                vloss, vst = ops.ppo_value_loss(v, torch.zeros_like(v), torch.ones_like(v), m, agg=agg)
            (g,) = torch.autograd.grad(loss, lp)
            (gv,) = torch.autograd.grad(vloss, v)
            got = (loss, *st.values(), vloss, *vst.values(), g, gv)
            if clean:
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b)
            else:
                assert all(torch.isfinite(t).all() for t in got), (agg, got)
                assert (g[~m] == 0).all() and (gv[~m] == 0).all()
                want = got
