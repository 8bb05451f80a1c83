"""Review of the CPU backends (C++ kernels in csrc/cpu, and the pure-PyTorch reference that is
the fallback) on awkward inputs the contract review (tests/test_review_ops_contract.py) did not
cover: low temperatures or logits of 1e4, where the logits divided by T are large; temperatures
beyond float32's range at either end; a token masked (-inf) in both models of a distillation loss.

Each test pins one defect found by comparing the backends with a float64 oracle.
"""

import math

import pytest
import torch

import rlhf_fast.ops as ops
from rlhf_fast.ops import reference

from .conftest import live_cpu_backends

BACKENDS = live_cpu_backends()
NATIVE = [b for b in BACKENDS if b != "torch"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ gradients at large |logits / T|


def _logits_grad(op, backend, x, y, temperature, dtype):
    """d(Σ c·logp + Σ c'·entropy)/d(logits), through ``op`` on ``backend``, in ``dtype``."""
    x = x.to(dtype).requires_grad_(True)
    c1 = torch.randn(y.shape, dtype=torch.float64, generator=_gen(1))
    c2 = torch.randn(y.shape, dtype=torch.float64, generator=_gen(2))
    with ops.use_backend(backend):
        if op == "token_logprobs":
            lp, ent = ops.token_logprobs(x, y, temperature=temperature, return_entropy=True)
        else:  # the LM head with an identity weight: its logits are the hidden states themselves
            eye = torch.eye(x.shape[1], dtype=dtype)
            lp, ent = ops.fused_linear_logprobs(x, eye, y, temperature=temperature, return_entropy=True,
                                                chunk_size=3)
    (g,) = torch.autograd.grad((lp * c1.to(lp.dtype)).sum() + (ent * c2.to(ent.dtype)).sum(), x)
    return g.double()


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("op", ["token_logprobs", "fused_linear_logprobs"])
@pytest.mark.parametrize("offset,scale,temperature", [(1e4, 1.0, 1.0), (0.0, 30.0, 0.05), (0.0, 10.0, 1e-4),
                                                     (0.0, 10.0, 1e-15)])
def test_logits_gradient_is_exact_when_logits_over_t_are_large(op, backend, offset, scale, temperature):
    """With |z| = |logits / T| large, the C++ backward read p = exp(z − lse) from the saved lse,
    rounded to float32 (an error of ulp(lse)/2 in log p), with z·(1/T) fused into z − lse by a
    multiply-add (not the forward's rounded z): 2e-4 of the gradient's scale at logits of 1e4,
    1e-4 at z ~ 600, 0.5% at z ~ 1e5, inf/NaN at T = 1e-15. The reference's log_softmax keeps
    z − max exact (1e-6)."""
    g = _gen(0)
    x = offset + scale * torch.randn(12, 40, generator=g)  # logits of ~1e4 with T = 1, or low T
    y = torch.randint(0, 40, (12,), generator=g)
    y[3] = -100
    exact = _logits_grad(op, "torch", x, y, temperature, torch.float64)
    got = _logits_grad(op, backend, x, y, temperature, torch.float32)
    ref32 = _logits_grad(op, "torch", x, y, temperature, torch.float32)
    size = exact.abs().max().item()
    assert torch.isfinite(got).all()
    # float32 rounding of the reference itself is ~1e-6 of the gradient's scale
    assert (ref32 - exact).abs().max().item() <= 1e-5 * size
    assert (got - exact).abs().max().item() <= 1e-5 * size, ((got - exact).abs().max().item(), size)


# ------------------------------------------------------------------ temperatures beyond float32's range

_X = torch.tensor([[1.0, 3.0, 2.0, float("-inf")]])  # argmax 1; a vocabulary-masked token


def _at_temperature(op, temperature):
    """(log-prob of label 1 or of the drawn token, the drawn token or None) of ``op`` on ``_X``."""
    if op == "token_logprobs":
        return ops.token_logprobs(_X, torch.tensor([1]), temperature=temperature), None
    if op == "fused_linear_logprobs":  # the same logits, the -inf one from the bias
        bias = torch.tensor([0.0, 0.0, 0.0, float("-inf")])
        return ops.fused_linear_logprobs(_X[:, :3], torch.eye(4, 3), torch.tensor([1]), bias=bias,
                                         temperature=temperature), None
    tok, logp = ops.sample(_X, temperature=temperature, top_p=0.9, generator=_gen(0))
    return logp, tok


_OPS = ["token_logprobs", "fused_linear_logprobs", "sample"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", _OPS)
def test_temperature_below_float32_range_is_greedy_or_refused(op, backend):
    """T = 1e-50 rounds to 0 in float32: (z − max) / T was 0 / 0 = NaN at the argmax on the
    reference (the fallback backend, and where the Triton / CUDA launchers send tiny
    temperatures), so logp was NaN and sample drew the least likely finite token."""
    with ops.use_backend(backend):
        try:
            logp, tok = _at_temperature(op, 1e-50)
        except ValueError as e:
            assert "temperature" in str(e), str(e)
            return
    torch.testing.assert_close(logp, torch.zeros(1))
    if tok is not None:
        assert tok.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", _OPS)
def test_temperature_above_float32_range_is_uniform_or_refused(op, backend):
    """T = 1e39 is inf in float32: -inf logits over it were NaN (reference: NaN log-probs;
    C++ sample: "logits contain NaN", which they do not). The limit is uniform over the
    finite logits, as the contract test asks of T = inf itself."""
    with ops.use_backend(backend):
        try:
            logp, tok = _at_temperature(op, 1e39)
        except ValueError as e:
            assert "temperature" in str(e) and "NaN" not in str(e), str(e)
            return
    torch.testing.assert_close(logp, torch.full((1,), -math.log(3.0)))


# ------------------------------------------------------------------ divergence with shared -inf logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_divergence_gradient_with_a_token_masked_in_both_models(beta, backend):
    """A token of -inf logit in the student and the teacher (a padded vocabulary entry masked in
    both): the loss is finite and the entry contributes 0. The reference's mixture
    log m = logaddexp(log s + log(1-beta), log t + log beta) had a NaN gradient there, which
    filled the whole row's gradient with NaN (the C++ and Triton kernels: finite)."""
    V = 6
    bs = torch.tensor([float("-inf"), 0.5, 1.0, 2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    bt = torch.tensor([float("-inf"), 1.0, 0.5, 2.0, float("-inf"), 0.3], dtype=torch.float64)
    zeros = torch.zeros(1, 1, dtype=torch.float64)
    with ops.use_backend(backend):
        div = ops.fused_linear_divergence(zeros, torch.zeros(V, 1, dtype=torch.float64), zeros,
                                          torch.zeros(V, 1, dtype=torch.float64), student_bias=bs,
                                          teacher_bias=bt, beta=beta)
    (g,) = torch.autograd.grad(div.sum(), bs)
    # the oracle: the same divergence over the 5 tokens the student can emit (token 0 dropped)
    zs, zt = bs.detach()[1:].clone().requires_grad_(True), bt[1:]
    exp_div, _ = reference.divergence_from_logits(zs[None], zt[None], beta)
    (exp_g,) = torch.autograd.grad(exp_div.sum(), zs)
    torch.testing.assert_close(div, exp_div)
    assert g[0].item() == 0.0
    torch.testing.assert_close(g[1:], exp_g)


# ------------------------------------------------------------------ an ignored row of -inf logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_row_of_all_minus_inf_logits_has_zero_gradient(backend):
    """A position whose label is ignore_index gives 0 and no gradient, whatever its logits; an
    all -inf row there (a fully masked padding position) gave a NaN gradient on the reference,
    which reaches the model's weights (the C++ kernel skips ignored rows: 0)."""
    x = torch.randn(2, 5, generator=_gen(4))
    x[1] = float("-inf")
    x.requires_grad_(True)
    with ops.use_backend(backend):
        logp, ent = ops.token_logprobs(x, torch.tensor([1, -100]), return_entropy=True)
    (g,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    assert logp[1].item() == 0.0 and ent[1].item() == 0.0
    assert torch.isfinite(g).all() and g[1].abs().sum().item() == 0.0, g
