"""Review of the fused LM-head ops (fused_linear_logprobs, fused_linear_policy_loss,
fused_linear_divergence) on the live CPU backends (reference, C++): defects found by comparing
them with the unfused reference on awkward inputs. The Triton side is in
tests/triton/test_review_fused_ops_triton.py."""

import pytest
import torch

from rlhf_fast import ops

from .conftest import live_cpu_backends

BACKENDS = live_cpu_backends()


def _head(N=6, H=16, V=67, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    return hidden, weight, bias, labels


def _logprobs_and_grads(backend, hidden, weight, bias, labels, *, autocast, backward_inside):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with ops.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, ent = ops.fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=4)
        loss = (logp * torch.linspace(-1, 1, logp.numel())).sum() + 0.3 * ent.sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, b.grad


# ------------------------------------------------------------------ autocast


@pytest.mark.parametrize("backend,backward_inside",
                         [(b, False) for b in BACKENDS] + [("cpp", True)] * ("cpp" in BACKENDS))
def test_fused_linear_logprobs_computes_in_its_inputs_dtype_under_autocast(backend, backward_inside):
    """Like fused_linear_divergence, the op computes in its inputs' dtypes whatever autocast
    region encloses it, on every backend. It followed the region in the forward only: the C++
    kernel's saved lse came from bf16 logits while its backward recomputed fp32 ones (weight
    gradient 0.17 off, 6x the reference's own bf16 error), its backward inside the region failed
    ("Expected out tensor to have dtype BFloat16"), and the reference's logits were bf16. (A
    backward inside the region runs the reference's autograd in bf16, as any torch op's.)"""
    hidden, weight, bias, labels = _head()
    want = _logprobs_and_grads(backend, hidden, weight, bias, labels, autocast=False, backward_inside=False)
    got = _logprobs_and_grads(backend, hidden, weight, bias, labels, autocast=True, backward_inside=backward_inside)
    for name, g, w in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), got, want):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------ empty vocabulary


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_vocabulary_is_refused_by_name(backend):
    """A [0, H] LM head has no distribution (fused_linear_divergence refuses it). With every
    label ignored it passed the label check and then failed unclearly (the reference: "index 0
    is out of bounds", Triton: ZeroDivisionError) or, on C++, returned log-probs of 0."""
    hidden, labels = torch.randn(3, 4), torch.full((3,), -100)
    with ops.use_backend(backend), pytest.raises(ValueError, match="weight"):
        ops.fused_linear_logprobs(hidden, torch.randn(0, 4), labels)
    B, T = 1, 3
    with ops.use_backend(backend), pytest.raises(ValueError, match="weight"):
        ops.fused_linear_policy_loss(hidden.reshape(B, T, 4), torch.randn(0, 4), labels.reshape(B, T),
                                     torch.zeros(B, T), torch.ones(B, T), torch.ones(B, T))


# ------------------------------------------------------------------ frozen LM head


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_backward_allocates_no_weight_gradient(backend):
    """A frozen LM head (LoRA on the backbone, or a head-free fine-tune): the backward gives
    the hidden states' gradient and allocates nothing of the weight's size. The C++ backward
    computed the [V, H] fp32 weight gradient anyway (Qwen2.5-7B's head: 2.2 GB and a third of
    the head's backward FLOPs, thrown away); the reference never did."""
    from .conftest import timeline_memory

    N, H, V = 16, 64, 1024
    hidden, weight, _, labels = _head(N, H, V)
    want = _hidden_grad("torch", hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    with ops.use_backend(backend):
        logp = ops.fused_linear_logprobs(h, weight, labels, chunk_size=4)
    _, largest = timeline_memory(lambda: logp.sum().backward())
    assert largest < V * H * 4 // 2, f"the backward allocated {largest} bytes at once ([V, H] fp32 = {V * H * 4})"
    torch.testing.assert_close(h.grad, want, rtol=1e-5, atol=1e-6)


def _hidden_grad(backend, hidden, weight, labels):
    h = hidden.clone().requires_grad_()
    with ops.use_backend(backend):
        ops.fused_linear_logprobs(h, weight, labels, chunk_size=4).sum().backward()
    return h.grad
