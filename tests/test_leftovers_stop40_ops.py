"""Leftovers of the last stop in rlhf_fast.ops, on the live CPU backends (reference, C++):
the PPO losses at a counted token whose inputs are NaN or infinite, which every backend must
answer as reference.py does (its forward and torch's autograd of it). The Triton side is in
tests/triton/test_leftovers_stop40_ops_triton.py.

The reference's answers, and why they are the contract:
- a NaN at a counted token makes the loss NaN (the last stop's rule), and the statistics that
  read that token's ratio NaN too: ``ratio_mean`` and ``ratio_max`` (``torch.max`` propagates
  NaN), as verl's ``ratio.max()`` would;
- the gradient is torch's autograd of the documented formula: the log-ratio clamp passes no
  gradient outside [-20, 20] (a NaN log-ratio included, as in verl's clamped ratio), and
  ``torch.maximum`` with a NaN operand sends the whole gradient to both operands.
"""

import pytest
import torch

from rlhf_fast import ops

from .conftest import live_cpu_backends

NATIVE = [b for b in live_cpu_backends() if b != "torch"]
nan, inf = float("nan"), float("inf")


def _inputs(where: int, value: float, adv: float = -1.0):
    """[2, 5] inputs (logp / values, old_logp / old_values, advantages / returns), every token
    counted; row 0's third token ``value`` in input ``where``."""
    x = [torch.full((2, 5), -1.0), torch.full((2, 5), -1.2), torch.full((2, 5), adv)]
    x[where][0, 2] = value
    return x


def _run(backend, op, x, **kw):
    lp = x[0].clone().requires_grad_()
    mask = torch.ones(2, 5, dtype=torch.bool)
    with ops.use_backend(backend):
        f = ops.ppo_policy_loss if op == "policy" else ops.ppo_value_loss
        loss, stats = f(lp, x[1], x[2], mask, **kw)
        (grad,) = torch.autograd.grad(loss, lp)
    return loss, stats, grad


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("where", [0, 1])
def test_ratio_max_is_nan_when_a_counted_ratio_is_nan(backend, dual_clip, where):
    """A NaN log-prob (or old log-prob) at a counted token: the reference's ratio_max is NaN, as
    its ratio_mean and loss; the C++ kernel's running max dropped the NaN (std::max keeps its
    first operand when a comparison is unordered) and reported 1.22, the max of the other
    tokens, so a diverged step's ratio_max looked healthy."""
    x = _inputs(where, nan)
    want = _run("torch", "policy", x, dual_clip=dual_clip)[1]
    got = _run(backend, "policy", x, dual_clip=dual_clip)[1]
    assert want["ratio_max"].isnan() and want["ratio_mean"].isnan()  # torch.max / mean propagate NaN
    assert got["ratio_max"].isnan(), got["ratio_max"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], equal_nan=True, msg=k)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("adv", [1.0, -1.0])
@pytest.mark.parametrize("where", [0, 1])
def test_policy_gradient_at_a_nan_log_ratio_is_the_references(backend, dual_clip, adv, where):
    """d loss / d logp at a counted token whose log-ratio is NaN: the reference gives 0 there
    (the clamp to ±20 passes no gradient outside its interval, and NaN is not inside), and the
    other tokens' gradients unchanged. The C++ backward multiplied by the 0/1 'inside' flag, and
    NaN · 0 is NaN: the token's gradient was NaN where the reference's is 0."""
    x = _inputs(where, nan, adv)
    loss_w, _, want = _run("torch", "policy", x, dual_clip=dual_clip)
    loss, _, got = _run(backend, "policy", x, dual_clip=dual_clip)
    assert loss_w.isnan() and loss.isnan()
    assert want[0, 2] == 0  # torch.clamp's backward at NaN
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_is_nan_when_a_counted_old_value_is_nan(backend, agg):
    """A NaN old value at a counted token: the clipped branch is NaN, and the reference's
    0.5·max(err, err_clipped) is NaN (torch.maximum propagates NaN). The C++ kernel's std::max
    returned the unclipped error and the loss came out finite (0.005): a NaN that nothing saw."""
    x = _inputs(1, nan, adv=-1.1)
    want = _run("torch", "value", x, agg=agg)[0]
    got = _run(backend, "value", x, agg=agg)[0]
    assert want.isnan()
    assert got.isnan(), got


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("value", [nan, inf, -inf])
def test_value_gradient_at_a_non_finite_old_value_is_the_references(backend, value):
    """d loss / d values at a counted token with a non-finite old value, as torch's autograd of
    the reference: NaN gives the unclipped branch's (v − R)·g (torch.maximum sends the gradient
    to both operands when one is NaN, and the clamp passes none at NaN); ±inf gives 0 (the
    clipped branch, infinite, wins, and v − old is outside the clip range). The C++ backward
    gave NaN for both: the clipped branch's (vc − R) · 0 with vc − R infinite or NaN."""
    x = _inputs(1, value, adv=-1.1)
    _, _, want = _run("torch", "value", x)
    _, _, got = _run(backend, "value", x)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, equal_nan=True)


# ------------------------------------------------------------------ frozen LM head: one chunk loop


@pytest.mark.skipif(not NATIVE, reason="rlhf_fast._C not built")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_backward_without_weight_gradient(bias, dtype):
    """The C++ backward's need_weight=False (a frozen head: LoRA on the backbone) is the one chunk
    loop that the frozen path used to repeat in Python: hidden and bias gradients equal to the
    full backward's, bit for bit, no [V, H] buffer returned; its fake passes opcheck."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 7, 8, 13
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    _, ent, lse, _ = torch.ops.rlhf_fast.fused_linear_logprobs_fwd(hidden, weight, b, labels, 0.7, True, -100, 3)
    args = (torch.randn(N, generator=g), torch.randn(N, generator=g), hidden, weight, b, labels, lse, ent, 0.7,
            -100, 3)
    bwd = torch.ops.rlhf_fast.fused_linear_logprobs_bwd.default
    full = bwd(*args)
    frozen = bwd(*args, False)
    assert frozen[1].numel() == 0
    assert torch.equal(frozen[0], full[0])
    assert torch.equal(frozen[2], full[2])
    torch.library.opcheck(bwd, args + (False,))


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("bias_grad", [False, True])
def test_frozen_head_gradients_match_the_reference(backend, bias_grad):
    """Through the public op: a frozen weight with a bias that does or does not train gets the
    reference's hidden (and bias) gradients, and no weight gradient."""
    g = torch.Generator().manual_seed(4)
    N, H, V = 9, 8, 21
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    bias, labels = torch.randn(V, generator=g), torch.randint(0, V, (N,), generator=g)
    grads = {}
    for bk in ("torch", backend):
        h, b = hidden.clone().requires_grad_(), bias.clone().requires_grad_(bias_grad)
        with ops.use_backend(bk):
            logp, ent = ops.fused_linear_logprobs(h, weight, labels, bias=b, return_entropy=True, chunk_size=4)
            (logp.sum() + 0.3 * ent.sum()).backward()
        grads[bk] = (h.grad, b.grad)
    assert weight.grad is None
    torch.testing.assert_close(grads[backend][0], grads["torch"][0], rtol=1e-5, atol=1e-6)
    if bias_grad:
        torch.testing.assert_close(grads[backend][1], grads["torch"][1], rtol=1e-5, atol=1e-6)
    else:
        assert grads[backend][1] is None
