"""gae / discounted_returns Triton kernels against rlhf_fast.ops.reference (float64 oracle):
masks with padding on either side, holes and empty rows, rows longer than one tile, every
input dtype, and the edge values of γ and λ."""

import math

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

from ..gae_cases import gae_loop, gae_mask
from .conftest import device


def _check(r, v, m, gamma, lam, *, tol):
    dev = device()
    with ops.use_backend("triton"):
        assert _dispatch.select("gae", dev)[0] == "triton"
        adv, ret = ops.gae(r.to(dev), v.to(dev), m.to(dev), gamma=gamma, lam=lam)
        dr = ops.discounted_returns(r.to(dev), m.to(dev), gamma=gamma)
    mb = m.bool()
    # the oracle in float64: the scan reassociates the recurrence
    ea, er = reference.gae(r.double(), v.double(), mb, gamma=gamma, lam=lam)
    ed = reference.discounted_returns(r.double(), mb, gamma=gamma)
    want = reference.out_dtype(torch.promote_types(r.dtype, v.dtype))
    assert adv.dtype == ret.dtype == want and dr.dtype == reference.out_dtype(r.dtype)
    for got, exp in ((adv, ea), (ret, er), (dr, ed)):
        torch.testing.assert_close(got.cpu().double(), exp, **tol)
        assert (got.cpu()[~mb] == 0).all()


@pytest.fixture
def small_tiles(monkeypatch):
    """64-token tiles on the interpreter (whose scan costs Python time per element), so a few
    hundred tokens cross several tiles; on a GPU the real tile size."""
    from rlhf_fast.kernels import advantages

    if device().type == "cpu":
        monkeypatch.setattr(advantages, "BLOCK", 64)


@pytest.fixture(params=["rows", "split"])
def layout(request, monkeypatch):
    """One program per row, or each row's tiles spread over programs (a tile-map pass, a carry
    scan over tiles in chunks of 4, and an apply pass) — the GPU's choice for few long rows."""
    from rlhf_fast.kernels import advantages

    if request.param == "split":
        monkeypatch.setattr(advantages, "_split_rows", lambda B, n_tiles, dev: n_tiles > 1)
        monkeypatch.setattr(advantages, "CARRY_CHUNK", 4)
    return request.param


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (5, 130)])
@pytest.mark.parametrize("mask_kind", ["full", "random", "left_pad", "empty_rows", "holes"])
def test_matches_reference(shape, mask_kind, small_tiles):
    g = torch.Generator().manual_seed(0)
    B, T = shape
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    m = gae_mask(B, T, g, mask_kind)
    for gamma, lam in ((1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.0, 0.5)):
        _check(r, v, m, gamma, lam, tol=dict(rtol=1e-4, atol=1e-4 * math.sqrt(T)))


@pytest.mark.parametrize("mask_kind", ["random", "left_pad", "empty_rows", "holes"])
def test_split_rows_match_reference(mask_kind, small_tiles, monkeypatch):
    from rlhf_fast.kernels import advantages

    monkeypatch.setattr(advantages, "_split_rows", lambda B, n_tiles, dev: True)
    monkeypatch.setattr(advantages, "CARRY_CHUNK", 4)
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(3, 500, generator=g), torch.randn(3, 500, generator=g)  # 8 tiles, 2 carry chunks
    _check(r, v, gae_mask(3, 500, g, mask_kind), 0.99, 0.9, tol=dict(rtol=1e-4, atol=1e-3))


def test_real_tile_size_across_two_tiles():
    g = torch.Generator().manual_seed(4)
    r, v = torch.randn(2, 1100, generator=g), torch.randn(2, 1100, generator=g)
    _check(r, v, gae_mask(2, 1100, g, "holes"), 0.99, 0.95, tol=dict(rtol=1e-4, atol=4e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype, small_tiles, layout):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 300, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(4, 300, generator=g, dtype=torch.float64).to(dtype)
    m = gae_mask(4, 300, g, "random")
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=4e-3)
    _check(r, v, m, 0.999, 0.95, tol=tol)


def test_mixed_dtypes_strides_float_mask_and_empty():
    g = torch.Generator().manual_seed(9)
    r = torch.randn(6, 33, generator=g).to(torch.bfloat16)
    v = torch.randn(33, 6, generator=g).t()  # non-contiguous fp32
    m = (torch.rand(6, 33, generator=g) > 0.5).float()  # 0/1 float mask
    _check(r, v, m, 0.97, 0.9, tol=dict(rtol=1e-5, atol=1e-5))
    _check(r[:, ::2], v[:, ::2], m[:, ::2].long(), 0.97, 0.9, tol=dict(rtol=1e-5, atol=1e-5))
    for B, T in ((0, 5), (5, 0), (0, 0)):
        z = torch.zeros(B, T, device=device())
        with ops.use_backend("triton"):
            a, b = ops.gae(z, z, z.bool(), gamma=0.9)
            c = ops.discounted_returns(z, z.bool())
        assert a.shape == b.shape == c.shape == (B, T)


def test_long_row_against_a_plain_loop(small_tiles, layout):
    # many tiles in one row; the oracle is a plain loop over the unmasked tokens, not reference.py
    g = torch.Generator().manual_seed(3)
    T = 600 if device().type == "cpu" else 131072
    r = torch.randn(1, T, generator=g, dtype=torch.float64)
    v = torch.randn(1, T, generator=g, dtype=torch.float64)
    m = torch.rand(1, T, generator=g) > 0.1
    with ops.use_backend("triton"):
        adv, _ = ops.gae(r.to(device()), v.to(device()), m.to(device()), gamma=0.999, lam=0.95)
    torch.testing.assert_close(adv.cpu()[0], gae_loop(r[0], v[0], m[0], 0.999, 0.95), rtol=1e-9, atol=1e-9)


def test_inputs_that_require_grad_keep_their_graph():
    # as the native backends: the reference's differentiable result, never a silent detach
    dev = device()
    r = torch.randn(2, 9, device=dev, requires_grad=True)
    v = torch.randn(2, 9, device=dev, requires_grad=True)
    m = torch.ones(2, 9, dtype=torch.bool, device=dev)
    with ops.use_backend("triton"):
        adv, ret = ops.gae(r, v, m, gamma=0.9, lam=0.8)
        dr = ops.discounted_returns(r, m, gamma=0.9)
    (adv.sum() + ret.sum() + dr.sum()).backward()
    assert r.grad is not None and v.grad is not None
