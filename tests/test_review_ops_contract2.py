"""Second review of the public op contract (DESIGN.md, "Public op API") on the CPU backends:
the reference and the C++ kernels must agree forward and backward on awkward inputs. The
first review (tests/test_review_ops_contract.py) covers most of the contract; each test here
pins one defect that review missed.
"""

import warnings

import pytest
import torch

import rlhf_fast.ops as ops

from .conftest import live_cpu_backends

BACKENDS = live_cpu_backends()
NATIVE = [b for b in BACKENDS if b != "torch"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ masked_mean's second derivative


def _masked_mean_hvp(backend):
    """H·v of masked_mean(k3 KL(z) · z, m) + ½|z|² (a KL term in a loss whose Hessian-vector
    product a natural-gradient / TRPO-CG step forms), through ``backend``."""
    g = _gen(0)
    z = (0.3 * torch.randn(3, 5, dtype=torch.float64, generator=g)).requires_grad_(True)
    ref = torch.randn(3, 5, dtype=torch.float64, generator=g)
    m = torch.rand(3, 5, generator=g) > 0.3
    v = torch.randn(3, 5, dtype=torch.float64, generator=g)
    with ops.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = ops.masked_mean(ops.kl_penalty(z, ref, "k3") * z, m) + 0.5 * (z * z).sum()
        (grad,) = torch.autograd.grad(y, z, create_graph=True)
        (h,) = torch.autograd.grad((grad * v).sum(), z)
    return h


@pytest.mark.parametrize("backend", NATIVE)
def test_masked_mean_second_derivative_matches_the_reference(backend):
    """masked_mean is linear in x; its backward (m / n · grad) is differentiable. The C++
    backend registered it without a differentiable form, so any double backward through it
    (a Hessian-vector product, a gradient penalty) raised RuntimeError on the CPU, where the
    torch backend, and the native kl_penalty / PPO losses / token_logprobs, give the exact one."""
    torch.testing.assert_close(_masked_mean_hvp(backend), _masked_mean_hvp("torch"), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ degenerate groups keep the graph


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,B,G", [("grpo", 0, 4), ("rloo", 0, 4), ("dr_grpo", 0, 4), ("grpo", 3, 1)])
def test_group_advantages_of_degenerate_groups_keep_the_graph(kind, B, G, backend):
    """Scores that require grad (a learned scorer) keep their graph through group_advantages
    (every backend hands them to the reference), as through gae / masked_whiten and the losses,
    so a step summing micro-batch terms can call backward(). An empty micro-batch (B = 0) got a
    new empty tensor, and grpo's groups of one a zeros_like, both without a graph: backward()
    raised 'element 0 of tensors does not require grad'."""
    scores = torch.randn(B, generator=_gen(3)).requires_grad_(True)
    with ops.use_backend(backend):
        adv = ops.group_advantages(scores, G, kind=kind)
    assert adv.shape == (B,) and adv.dtype == torch.float32
    (grad,) = torch.autograd.grad(adv.sum(), scores)
    assert torch.equal(grad, torch.zeros(B))  # advantages sum to 0 in a group (and groups of one are 0)


# ------------------------------------------------------------------ masked_mean's dim argument


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [(0, 0), (1, -1), [0, -2]])
def test_masked_mean_repeated_dim_is_a_value_error_naming_dim(dim, backend):
    """dim is checked up front (type, range: ValueError / TypeError naming it), but the same
    dimension twice — (1, -1) on a 2-D x is a typo away — reached torch.sum, whose
    RuntimeError ('dim 1 appears multiple times in the list of dims') is not the contract's
    ValueError for a bad argument."""
    x, m = torch.randn(3, 4, generator=_gen(1)), torch.rand(3, 4, generator=_gen(2)) > 0.3
    with ops.use_backend(backend), pytest.raises(ValueError, match="dim"):
        ops.masked_mean(x, m, dim)


# ------------------------------------------------------------------ constant inputs: exactly 0

# "cpp-grad": the C++ backend with inputs that require grad, which it hands to the reference
_ROUTES = ["torch"] + (["cpp", "cpp-grad"] if "cpp" in BACKENDS else [])


@pytest.mark.parametrize("route", _ROUTES)
@pytest.mark.parametrize("op", ["group_advantages", "masked_whiten"])
@pytest.mark.parametrize("c", [0.7, 3.3, 1000.1])
def test_constant_inputs_give_exactly_zero(c, op, route):
    """A group whose answers all score the same (identical answers, a partial-credit rule reward
    of 0.7) has GRPO advantage (s − mean) / (std + eps) = 0, and a whitened constant is 0. The
    C++ and CUDA kernels take the statistics in float64 and give exactly 0. The reference (the
    torch backend; the GPU path without the CUDA extension for group_advantages; every call with
    inputs that require grad, or, for masked_whiten, a process group) took the mean in float32,
    an ulp off the constant, and divided that ulp by a std of ~1e-7 plus eps: a group of 7
    scores of 3.3 got advantages of ±0.19, a whitened constant 1000.1 ±0.77."""
    x = torch.full((1000,), c, requires_grad=route == "cpp-grad")
    m = torch.ones(1000, dtype=torch.bool)
    with ops.use_backend(route.split("-")[0]):
        if op == "group_advantages":
            out = torch.cat([ops.group_advantages(x[:n], n) for n in (3, 7, 100, 1000)])
        else:
            out = torch.cat([ops.masked_whiten(x[:n], m[:n], shift_mean=s) - (0.0 if s else x[:n])
                             for n in (3, 7, 100, 1000) for s in (True, False)])
    assert out.abs().max().item() == 0.0, out.abs().max()
