"""token_logprobs (+ entropy) Triton kernels against rlhf_fast.ops.reference, forward and backward."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

from .conftest import device

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}
# gradients are rounded to the logits' dtype: one bf16 ulp
GTOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


def _inputs(shape, V, dtype, seed=0, scale=3.0, n_ignore=1):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    flat = labels.view(-1)
    flat[: min(n_ignore, flat.numel() - 1)] = -100
    return logits.to(device()), labels.to(device())


def _check(logits, labels, *, temperature, entropy, grad=True, tol=None):
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_()
    xr = logits.detach().clone().requires_grad_()
    with ops.use_backend("triton"):
        assert _dispatch.select("token_logprobs", x.device)[0] == "triton"
        out = ops.token_logprobs(x, labels, temperature=temperature, return_entropy=entropy)
    exp = reference.token_logprobs(xr, labels, temperature=temperature, return_entropy=entropy)
    out = out if entropy else (out,)
    exp = exp if entropy else (exp,)
    for a, b in zip(out, exp):
        assert a.dtype == torch.float32 and a.shape == labels.shape
        torch.testing.assert_close(a, b, **(tol or TOL[dtype]))
    if not grad:
        return
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(labels.shape, generator=g).to(labels.device) for _ in out]
    (ga,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, ws)), x)
    (gb,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(exp, ws)), xr)
    assert ga.dtype == dtype
    torch.testing.assert_close(ga.float(), gb.float(), **GTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,V", [((1, 1), 37), ((2, 5), 1000), ((7,), 4099)])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(dtype, shape, V, entropy, temperature):
    logits, labels = _inputs(shape, V, dtype)
    _check(logits, labels, temperature=temperature, entropy=entropy)


@pytest.mark.parametrize("V", [129920, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab(V, dtype):
    logits, labels = _inputs((2,), V, dtype, n_ignore=0)
    # float32 sums of ~1.5e5 terms in another order carry ~sqrt(V)·eps ≈ 2e-5 relative noise
    # (1.3e-5 on an AMD EPYC's numpy, which the interpreter runs on)
    _check(logits, labels, temperature=1.0, entropy=True, tol=dict(rtol=1e-4, atol=1e-4))


def test_extreme_and_neg_inf_logits():
    logits, labels = _inputs((4,), 300, torch.float32, n_ignore=0)
    logits[0, 5] = 1e4
    logits[1, :] = -1e4
    logits[1, 7] = 1e4
    logits[2, :150] = float("-inf")
    labels[2] = 200
    # forward (logp and entropy) everywhere, including -inf entries
    _check(logits, labels, temperature=1.0, entropy=True, grad=False)
    # gradients of logp everywhere; the reference's entropy gradient is NaN at -inf
    # entries (0·-inf in its autograd), so the entropy gradient is checked on finite rows
    _check(logits, labels, temperature=1.0, entropy=False)
    _check(logits[:2], labels[:2], temperature=0.5, entropy=True)
    x = logits.clone().requires_grad_()
    with ops.use_backend("triton"):
        lp, ent = ops.token_logprobs(x, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(ent).all()
    assert (x.grad[2, :150] == 0).all()


def test_fully_ignored_rows_give_zero():
    logits, labels = _inputs((3, 4), 50, torch.float32)
    labels[1] = -100
    x = logits.clone().requires_grad_()
    with ops.use_backend("triton"):
        lp, ent = ops.token_logprobs(x, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert (lp[1] == 0).all() and (ent[1] == 0).all() and (x.grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_reuses_logits_storage(dtype):
    from rlhf_fast.kernels.token_logprobs import token_logprobs as tl_triton

    logits, labels = _inputs((3, 6), 333, dtype)
    expected_grad = None
    xr = logits.clone().requires_grad_()
    lp, ent = reference.token_logprobs(xr, labels, return_entropy=True, temperature=1.3)
    (expected_grad,) = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), xr)
    x = logits.clone()
    leaf = x.requires_grad_()
    lp2, ent2 = tl_triton(leaf, labels, return_entropy=True, temperature=1.3, inplace_backward=True)
    (g,) = torch.autograd.grad(lp2.sum() + 0.5 * ent2.sum(), leaf)
    assert g.data_ptr() == leaf.data_ptr()  # no new [N, V] buffer
    torch.testing.assert_close(g.float(), expected_grad.float(), **GTOL[dtype])


def test_float64_gradcheck():
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 10])
    with ops.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda a: ops.token_logprobs(a, labels, return_entropy=True, temperature=0.9), (logits,))


@pytest.mark.cuda
@pytest.mark.parametrize("V", [32000, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large(V, dtype):
    logits, labels = _inputs((8, 256), V, dtype, n_ignore=17)
    _check(logits, labels, temperature=0.9, entropy=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_sliced_logits_read_in_place(inplace):
    """logits[:, :-1] (the usual shift) is strided in B and T: read without a copy, and the
    gradient (into the slice itself with inplace_backward) equals the reference's."""
    from rlhf_fast.kernels.token_logprobs import token_logprobs as tl_triton

    full, labels = _inputs((3, 6), 129, torch.bfloat16)
    labels = labels[:, 1:]
    exp_in = full.clone().requires_grad_()
    lp, ent = reference.token_logprobs(exp_in[:, :-1], labels, return_entropy=True)
    (expected,) = torch.autograd.grad(lp.sum() + ent.sum(), exp_in)
    base = full.clone().requires_grad_()
    sl = base[:, :-1] if not inplace else full.clone()[:, :-1].requires_grad_()
    assert not sl.is_contiguous()
    lp2, ent2 = tl_triton(sl, labels, return_entropy=True, inplace_backward=inplace)
    torch.testing.assert_close(lp2, lp, **TOL[torch.bfloat16])
    torch.testing.assert_close(ent2, ent, **TOL[torch.bfloat16])
    (g,) = torch.autograd.grad(lp2.sum() + ent2.sum(), sl)
    if inplace:
        assert g.data_ptr() == sl.data_ptr()
    torch.testing.assert_close(g.float(), expected[:, :-1].float(), **GTOL[torch.bfloat16])


@pytest.mark.parametrize("inplace", [False, True])
def test_logits_copied_for_the_kernel(inplace):
    """Logits whose vocabulary dimension is strided (a transposed [V, N]) or of four dims are
    copied for the kernel; the copy is made again in the backward (not kept beside the logits),
    and the gradient equals the reference's."""
    from rlhf_fast.kernels.token_logprobs import token_logprobs as tl_triton

    g = torch.Generator().manual_seed(3)
    for logits, labels in ((torch.randn(131, 6, generator=g).t(), torch.randint(0, 131, (6,), generator=g)),
                           (torch.randn(2, 2, 3, 67, generator=g), torch.randint(0, 67, (2, 2, 3), generator=g))):
        logits, labels = logits.to(device()), labels.to(device())
        x = logits.detach().clone() if logits.dim() == 4 else logits.detach().t().clone().t()
        x.requires_grad_()
        xr = logits.detach().clone().requires_grad_()
        lp, ent = tl_triton(x, labels, return_entropy=True, inplace_backward=inplace)
        lpr, entr = reference.token_logprobs(xr, labels, return_entropy=True)
        torch.testing.assert_close(lp, lpr, **TOL[torch.float32])
        (ga,) = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), x)
        (gb,) = torch.autograd.grad(lpr.sum() + 0.5 * entr.sum(), xr)
        torch.testing.assert_close(ga, gb, **GTOL[torch.float32])
