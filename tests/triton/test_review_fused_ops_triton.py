"""Review of the fused LM-head ops on the Triton backend (the CPU interpreter under
TRITON_INTERPRET=1, or a GPU): defects found by comparing it with the unfused reference on
awkward inputs. The CPU backends are in tests/test_review_fused_ops.py."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rlhf_fast import ops

from .conftest import device


def _batch(B=2, T=3, H=8, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    old = torch.randn(B, T, generator=g) * 0.3 - 3
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, 2] = 0
    ref = torch.randn(B, T, generator=g) * 0.3 - 3
    return [t.to(device()) for t in (hidden, weight, labels, old, adv, mask, ref)]


def _coefficient_grads(backend, batch):
    hidden, weight, labels, old, adv, mask, ref = batch
    kl_coef = torch.tensor(0.3, device=device(), requires_grad=True)
    entropy_coef = torch.tensor([0.05], device=device(), requires_grad=True)
    with ops.use_backend(backend):
        loss, _ = ops.fused_linear_policy_loss(hidden, weight, labels, old, adv, mask, ref_logp=ref, kl_coef=kl_coef,
                                               entropy_coef=entropy_coef, agg="seq-mean-token-mean")
    return (loss.detach(), *torch.autograd.grad(loss, [kl_coef, entropy_coef]))


def test_policy_loss_tensor_coefficients_keep_their_gradient():
    """ops.fused_linear_policy_loss takes kl_coef / entropy_coef as 1-element tensors (an adaptive
    coefficient kept on the device, "its value is not read") and keeps their gradient. The Triton
    backend turned them into Python floats for its kernel: the loss had no gradient to them
    ("element 0 of tensors does not require grad"; the reference gives dL/dkl_coef = the KL term)
    and, on a GPU, each call synchronised with the host."""
    batch = _batch()
    want = _coefficient_grads("torch", batch)
    got = _coefficient_grads("triton", batch)
    for name, g, w in zip(("loss", "d_kl_coef", "d_entropy_coef"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_linear_logprobs_backward_inside_autocast():
    """fp32 inputs, forward and backward inside a bf16 autocast region: the Triton forward keeps
    the inputs' dtype, and so must the backward. Its chunked backward recomputed the logits with
    ``h @ weight.t()``, which the region made bf16, and then failed ("Expected out tensor to have
    dtype BFloat16, but got float") where the reference's backward runs."""
    hidden, weight, labels = (t for t in _batch()[:3])
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)

    def run(autocast):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with ops.use_backend("triton"), torch.autocast(device().type, dtype=torch.bfloat16, enabled=autocast):
            logp, ent = ops.fused_linear_logprobs(h, w, labels, return_entropy=True)
            (logp.sum() + 0.3 * ent.sum()).backward()
        return logp.detach(), h.grad, w.grad

    for name, g, w in zip(("logp", "d_hidden", "d_weight"), run(True), run(False)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


class _LargestNew(TorchDispatchMode):
    """The largest tensor storage created by an op inside the region, those of ``keep`` (the
    inputs, whose views are no allocation) left out."""

    def __init__(self, *keep):
        super().__init__()
        self.largest = 0
        self.keep = {t.untyped_storage().data_ptr() for t in keep}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.keep:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backward", ["chunked", "triton"])
def test_frozen_head_backward_allocates_no_weight_gradient(backward):
    """A frozen LM head (LoRA on the backbone): the backward gives the hidden states' gradient and
    allocates nothing of the weight's size. Both Triton backwards computed the [V, H] fp32 weight
    gradient anyway (then its copy in the weight's dtype; Qwen2.5-7B's head: 2.2 GB each and a
    third of the head's backward FLOPs, thrown away)."""
    from rlhf_fast.kernels import fused_linear as kernels

    N, H, V = 8, 32, 512
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(N, H, generator=g).to(device()), torch.randn(V, H, generator=g).to(device())
    labels = torch.randint(0, V, (N,), generator=g).to(device())
    h_ref = hidden.clone().requires_grad_()
    ops.reference.fused_linear_logprobs(h_ref, weight, labels).sum().backward()
    h = hidden.clone().requires_grad_()
    logp = kernels.fused_linear_logprobs(h, weight, labels, chunk_size=4, backward=backward)
    with _LargestNew(h, weight) as seen:
        logp.sum().backward()
    assert seen.largest < V * H * 4 // 2, f"the backward allocated {seen.largest} bytes ([V, H] fp32 = {V * H * 4})"
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
