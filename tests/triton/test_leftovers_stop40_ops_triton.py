"""Leftovers of the last stop in rlhf_fast.ops on the Triton kernels (under TRITON_INTERPRET=1 on
the CPU, or on a GPU): the PPO losses at a counted token whose inputs are NaN or infinite must
match reference.py, forward, statistics and torch's autograd of it (the CPU backends' side and
the reasons are in tests/test_leftovers_stop40_ops.py)."""

import pytest
import torch

from rlhf_fast import ops

from .conftest import device

nan, inf = float("nan"), float("inf")


def _inputs(where: int, value: float, adv: float = -1.0):
    """[2, 5] inputs, every token counted; row 0's third token ``value`` in input ``where``."""
    x = [torch.full((2, 5), -1.0), torch.full((2, 5), -1.2), torch.full((2, 5), adv)]
    x[where][0, 2] = value
    return [t.to(device()) for t in x]


def _run(backend, op, x, **kw):
    lp = x[0].clone().requires_grad_()
    mask = torch.ones(2, 5, dtype=torch.bool, device=device())
    with ops.use_backend(backend):
        f = ops.ppo_policy_loss if op == "policy" else ops.ppo_value_loss
        loss, stats = f(lp, x[1], x[2], mask, **kw)
        (grad,) = torch.autograd.grad(loss, lp)
    return loss, stats, grad


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("where", [0, 1])
def test_ratio_max_is_nan_when_a_counted_ratio_is_nan(dual_clip, where):
    """The reference's ratio_max is NaN (torch.max propagates it); the kernel's per-tile tl.max
    returned the largest non-NaN ratio (1.22)."""
    x = _inputs(where, nan)
    want = _run("torch", "policy", x, dual_clip=dual_clip)[1]
    got = _run("triton", "policy", x, dual_clip=dual_clip)[1]
    assert want["ratio_max"].isnan()
    for k in want:
        torch.testing.assert_close(got[k], want[k], equal_nan=True, msg=k)


def test_fused_linear_policy_loss_ratio_max_is_nan_when_a_counted_ratio_is_nan():
    """The same statistic from the fused LM-head op, whose Triton epilogue is the same kernel."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 3, 8, 11
    hidden = torch.randn(B, T, H, generator=g).to(device())
    weight = torch.randn(V, H, generator=g).to(device())
    labels = torch.randint(0, V, (B, T), generator=g).to(device())
    old = torch.full((B, T), -2.0, device=device())
    old[1, 1] = nan
    adv = torch.ones(B, T, device=device())
    mask = torch.ones(B, T, dtype=torch.bool, device=device())
    stats = {}
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            stats[backend] = ops.fused_linear_policy_loss(hidden, weight, labels, old, adv, mask)[1]
    assert stats["torch"]["ratio_max"].isnan()
    assert stats["triton"]["ratio_max"].isnan(), stats["triton"]["ratio_max"]


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("adv", [1.0, -1.0])
@pytest.mark.parametrize("where", [0, 1])
def test_policy_gradient_at_a_nan_log_ratio_is_the_references(dual_clip, adv, where):
    """0 at the NaN token (the log-ratio clamp passes no gradient at NaN), the others unchanged:
    the kernel already agreed (the C++ one did not); kept as a regression test."""
    x = _inputs(where, nan, adv)
    want = _run("torch", "policy", x, dual_clip=dual_clip)[2]
    got = _run("triton", "policy", x, dual_clip=dual_clip)[2]
    assert want[0, 2] == 0
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("value", [nan, inf, -inf])
def test_value_gradient_at_a_non_finite_old_value_is_the_references(value):
    """torch.maximum(err, NaN) sends the whole gradient to both operands; the kernel split it in
    half as at a tie (0.5·(v − R)·g instead of (v − R)·g) when the clipped error was NaN (±inf
    already agreed: 0)."""
    x = _inputs(1, value, adv=-1.1)
    want = _run("torch", "value", x)[2]
    got = _run("triton", "value", x)[2]
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, equal_nan=True)
