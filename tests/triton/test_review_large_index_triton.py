"""Index arithmetic past 2^31 elements in the Triton kernels (review).

The interpreter cannot hold 2^31 elements, but the launchers pass row strides through without
a copy: a [n, V] view whose rows lie 2^30 + 7 elements apart in a ~4 GiB storage that is never
written outside those rows (its pages stay unallocated) puts row 2 past element 2^31 while the
stride itself fits in int32 — exactly where ``row * stride`` in int32 wraps. Kernels that take
contiguous copies (kl, ppo losses, gae) are covered by reading their ``program_id(...).to(tl.int64)``
in review, not here. Also: launch grids within CUDA's limits (axes 1 and 2 at most 65535).
"""

import math

import torch

from rlhf_fast import ops
from rlhf_fast.ops import reference

from .conftest import device

GAP = (1 << 30) + 7  # row stride: fits int32, 2·GAP does not


def _far_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` [n, V] copied into a view whose row r starts at element r·GAP of one storage."""
    n, V = rows.shape
    base = torch.empty(GAP * (n - 1) + V, dtype=rows.dtype, device=rows.device)
    view = base.as_strided((n, V), (GAP, 1))
    view.copy_(rows)
    return view


def test_token_logprobs_rows_past_2_pow_31(triton_backend):
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(3, 96, generator=g) * 3).to(torch.bfloat16).to(device())
    labels = torch.tensor([5, 17, 90], device=device())
    x = _far_rows(rows).requires_grad_(True)
    assert x.stride(0) * 2 >= 1 << 31
    logp, ent = ops.token_logprobs(x, labels, return_entropy=True)
    want_lp, want_ent = reference.token_logprobs(rows.float(), labels, return_entropy=True)
    torch.testing.assert_close(logp.float(), want_lp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent.float(), want_ent, rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad((logp + ent).sum(), x)
    ref_rows = rows.float().requires_grad_(True)
    lp_r, ent_r = reference.token_logprobs(ref_rows, labels, return_entropy=True)
    (want_grad,) = torch.autograd.grad((lp_r + ent_r).sum(), ref_rows)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2e-2, atol=2e-2)


def test_sample_rows_past_2_pow_31(triton_backend):
    rows = torch.zeros(3, 64, device=device())
    rows[0, 7] = rows[1, 33] = rows[2, 50] = 30.0  # each row's mass sits on one token
    z = _far_rows(rows.to(torch.bfloat16))
    assert z.stride(0) * 2 >= 1 << 31
    for kw in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.0, "top_k": 2}):
        tok, _ = ops.sample(z, **kw, generator=torch.Generator(device()).manual_seed(1))
        assert tok.tolist() == [7, 33, 50], kw


def test_fused_linear_rows_past_2_pow_31(triton_backend):
    g = torch.Generator().manual_seed(2)
    h_rows = torch.randn(3, 16, generator=g).to(device())
    w = torch.randn(40, 16, generator=g).to(device())
    labels = torch.tensor([1, 20, 39], device=device())
    hidden = _far_rows(h_rows)  # fp32: the interpreter's exact matmul; 8 GiB never touched
    assert hidden.stride(0) * 2 >= 1 << 31
    logp = ops.fused_linear_logprobs(hidden, w, labels)
    want = reference.fused_linear_logprobs(h_rows, w, labels)
    torch.testing.assert_close(logp, want, rtol=1e-4, atol=1e-4)


def test_divergence_rows_past_2_pow_31():
    from rlhf_fast.kernels import fused_divergence as fd

    g = torch.Generator().manual_seed(3)
    s_rows = torch.randn(3, 80, generator=g).to(device())
    t_rows = torch.randn(3, 80, generator=g).to(device())
    zs = _far_rows(s_rows)
    zt = _far_rows(t_rows)
    params = fd._params(0.5, 1.0, torch.float32, zs.device)
    div = torch.empty(3, device=zs.device)
    fd.divergence_rows(zs, zt, params, fd._mode(0.5), div=div, grad=True)
    ps, pt = s_rows.log_softmax(-1), t_rows.log_softmax(-1)
    m = torch.logsumexp(torch.stack([ps + math.log(0.5), pt + math.log(0.5)]), 0)
    want = 0.5 * (ps.exp() * (ps - m)).sum(-1) + 0.5 * (pt.exp() * (pt - m)).sum(-1)
    torch.testing.assert_close(div, want, rtol=1e-4, atol=1e-5)
    # the gradient went over the student's rows in place, where they are
    s = s_rows.clone().requires_grad_(True)
    ls = s.log_softmax(-1)
    mm = torch.logsumexp(torch.stack([ls + math.log(0.5), pt + math.log(0.5)]), 0)
    jsd = (0.5 * (ls.exp() * (ls - mm)).sum(-1) + 0.5 * (pt.exp() * (pt - mm)).sum(-1)).sum()
    (want_g,) = torch.autograd.grad(jsd, s)
    torch.testing.assert_close(zs.clone(), want_g, rtol=1e-4, atol=1e-5)


class _GridRecorder:
    """Stands in for a Triton kernel: records the launch grid, runs nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_gae_split_rows_grid_within_cuda_limits(monkeypatch):
    # few long rows spread their tiles over programs; a packed row of 67M tokens has 65537
    # tiles of 1024: on grid axis 1 that launch fails on a GPU ("invalid grid")
    from rlhf_fast.kernels import advantages

    grids = []
    for name in ("_tile_maps_kernel", "_carry_kernel", "_apply_kernel"):
        monkeypatch.setattr(advantages, name, _GridRecorder(grids))
    monkeypatch.setattr(advantages, "_split_rows", lambda B, n_tiles, dev: True)
    monkeypatch.setattr(advantages, "BLOCK", 16)
    T = 16 * 65536 + 1  # 65537 tiles of 16
    r = torch.zeros(1, T)
    m = torch.ones(1, T, dtype=torch.uint8)
    out = torch.empty(1, T)
    advantages._launch(r, r, m, out, out, 0.99, 0.99, False)
    assert len(grids) == 3
    for grid in grids:
        assert grid[0] < 1 << 31 and all(d <= 65535 for d in grid[1:]), grid
