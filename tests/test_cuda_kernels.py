"""CUDA C++ kernels (csrc/cuda/*.cu) against reference.py. Run with ``pytest -m cuda`` on a
GPU; skipped elsewhere (conftest), where `make check-cuda` only compiles them."""

import math

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    ok, why = _dispatch.backend_available("cuda")
    if not ok:
        pytest.skip(why)


def _mask(B, T, g, kind):
    if kind == "random":
        return torch.rand(B, T, generator=g) > 0.3
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "left_pad":
        for b in range(B):
            m[b, : (b * 7) % max(T, 1)] = False
    if kind == "empty_rows":
        m[::2] = False
    return m


SHAPES = [(1, 1), (3, 37), (5, 257), (4, 5000), (2, 20000), (300, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["full", "random", "left_pad", "empty_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gae_and_returns_match_reference(shape, mask_kind, dtype):
    g = torch.Generator().manual_seed(0)
    B, T = shape
    r = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    m = _mask(B, T, g, mask_kind)
    for gamma, lam in ((1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.0, 0.5)):
        with ops.use_backend("cuda"):
            adv, ret = ops.gae(r.cuda(), v.cuda(), m.cuda(), gamma=gamma, lam=lam)
            dr = ops.discounted_returns(r.cuda(), m.cuda(), gamma=gamma)
        # the oracle in float64 on the CPU: the scan reassociates the sums
        ea, er = reference.gae(r.double(), v.double(), m, gamma=gamma, lam=lam)
        ed = reference.discounted_returns(r.double(), m, gamma=gamma)
        assert adv.dtype == reference.out_dtype(dtype)
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * math.sqrt(T))
        torch.testing.assert_close(adv.cpu().double(), ea, **tol)
        torch.testing.assert_close(ret.cpu().double(), er, **tol)
        torch.testing.assert_close(dr.cpu().double(), ed, **tol)


def test_gae_long_single_row():
    # B = 1, T = 131072: the parallel scan path over many tiles
    g = torch.Generator().manual_seed(1)
    T = 131072
    r = torch.randn(1, T, generator=g, dtype=torch.float64)
    v = torch.randn(1, T, generator=g, dtype=torch.float64)
    m = torch.rand(1, T, generator=g) > 0.1
    with ops.use_backend("cuda"):
        adv, ret = ops.gae(r.cuda(), v.cuda(), m.cuda(), gamma=0.999, lam=0.95)
    # independent oracle: a plain backward loop over the unmasked tokens, in float64
    rr, vv, mm = r[0].tolist(), v[0].tolist(), m[0].tolist()
    exp = [0.0] * T
    a = nv = 0.0
    for t in range(T - 1, -1, -1):
        if mm[t]:
            a = rr[t] + 0.999 * nv - vv[t] + 0.999 * 0.95 * a
            nv = vv[t]
            exp[t] = a
    torch.testing.assert_close(adv.cpu()[0], torch.tensor(exp, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["grpo", "rloo", "dr_grpo"])
@pytest.mark.parametrize("group_size", [1, 2, 5, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_advantages(kind, group_size, dtype):
    if kind == "rloo" and group_size < 2:
        pytest.skip("rloo needs groups of 2+")
    s = torch.randn(group_size * 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    for normalize_std in (True, False):
        with ops.use_backend("cuda"):
            out = ops.group_advantages(s.cuda(), group_size, kind=kind, normalize_std=normalize_std)
        exp = reference.group_advantages(s.double(), group_size, kind=kind, normalize_std=normalize_std)
        assert out.dtype == reference.out_dtype(dtype)
        torch.testing.assert_close(out.cpu().double(), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (7, 13), (64, 4096), (3, 1000003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_mean_and_whiten(shape, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    m = torch.rand(shape, generator=g) > 0.4
    for mask in (m, m.float(), torch.zeros_like(m)):
        with ops.use_backend("cuda"):
            mean = ops.masked_mean(x.cuda(), mask.cuda())
            w = ops.masked_whiten(x.cuda(), mask.cuda())
            w2 = ops.masked_whiten(x.cuda(), mask.cuda(), shift_mean=False)
        torch.testing.assert_close(mean.cpu().double(), reference.masked_mean(x.double(), mask), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.cpu().double(), reference.masked_whiten(x.double(), mask), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w2.cpu().double(), reference.masked_whiten(x.double(), mask, shift_mean=False),
                                   rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- sampling

FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("filt", FILTERS, ids=str)
@pytest.mark.parametrize("V", [1013, 32000, 151936, 262147])
def test_sample_with_uniforms_matches_reference(filt, V):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, V, generator=g) * 3
    u = torch.rand(16, generator=g, dtype=torch.float64)
    tok, lp = torch.ops.rlhf_fast.sample(logits.cuda(), u.cuda(), filt.get("temperature", 1.0), filt.get("top_k", 0),
                                         filt.get("top_p", 1.0), filt.get("min_p", 0.0))
    ref_tok, ref_lp = reference.sample(logits, uniforms=u, **filt)
    assert torch.equal(tok.cpu(), ref_tok)
    torch.testing.assert_close(lp.cpu(), ref_lp, rtol=1e-4, atol=1e-4)


def _tv_bound(p, n):
    # E[TV] <= ½·Σ sqrt(p(1-p)/n); McDiarmid: exceeding it by 5/sqrt(n) has probability < 2e-21
    return 0.5 * float(torch.sqrt(p * (1 - p) / n).sum()) + 5.0 / math.sqrt(n)


@pytest.mark.parametrize("filt", FILTERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_philox_sampler_distribution_1e6_draws(filt, dtype):
    n, V = 1_000_000, 64
    row = (torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    logits = row.cuda().expand(n, V).contiguous()
    gen = torch.Generator(device="cuda").manual_seed(6)
    with ops.use_backend("cuda"):
        tok, lp = ops.sample(logits, generator=gen, **filt)
    target = reference.process_logits(row.float(), **filt)[0].double()
    p = target.exp()
    counts = torch.bincount(tok.cpu(), minlength=V).double()
    assert counts[p == 0].sum() == 0, "mass outside the kept set"
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < _tv_bound(p, n), tv
    torch.testing.assert_close(lp.cpu().double(), target[tok.cpu()], rtol=1e-4, atol=1e-4)


def test_philox_sampler_large_vocab_support():
    # V = 151936 with a top-k/top-p kept set: every draw inside it, logp as the reference's
    V = 151936
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(7)) * 4
    logits = row.cuda().expand(20000, V).contiguous()
    with ops.use_backend("cuda"):
        tok, lp = ops.sample(logits, temperature=0.8, top_k=50, top_p=0.9)
    target = reference.process_logits(row, temperature=0.8, top_k=50, top_p=0.9)[0]
    assert torch.isfinite(target[tok.cpu()]).all()
    torch.testing.assert_close(lp.cpu(), target[tok.cpu()], rtol=1e-4, atol=1e-4)


def test_sample_greedy_ties_and_reproducibility():
    logits = torch.randn(9, 5001, generator=torch.Generator().manual_seed(8)).cuda()
    logits[3, 10] = logits[3, 20] = 100.0
    with ops.use_backend("cuda"):
        tok, lp = ops.sample(logits, temperature=0.0)
        assert torch.equal(tok, logits.argmax(-1)) and tok[3].item() == 10 and (lp == 0).all()
        a = ops.sample(logits, top_p=0.9, generator=torch.Generator(device="cuda").manual_seed(1))
        b = ops.sample(logits, top_p=0.9, generator=torch.Generator(device="cuda").manual_seed(1))
        assert torch.equal(a[0], b[0])


def test_sample_ties_keep_lowest_indices():
    row = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0]])
    logits = row.cuda().expand(100000, 8).contiguous()
    for filt in (dict(top_k=3), dict(top_p=0.5), dict(top_k=5, top_p=0.6), dict(min_p=0.5)):
        with ops.use_backend("cuda"):
            tok, _ = ops.sample(logits, **filt)
        kept = torch.isfinite(reference.process_logits(row, **filt)[0])
        assert set(tok.unique().cpu().tolist()) == set(kept.nonzero().flatten().tolist()), filt


def test_sample_invalid_rows_are_defined():
    logits = torch.randn(4, 300).cuda()
    logits[0, 5] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    with ops.use_backend("cuda"):
        for filt in (dict(), dict(top_p=0.9, top_k=5)):
            tok, lp = ops.sample(logits, **filt)
            assert ((tok >= 0) & (tok < 300)).all()
            assert torch.isnan(lp[:3]).all() and torch.isfinite(lp[3])
            assert tok[1].item() == 7


def test_opcheck_cuda_ops():
    x = torch.randn(6, 40, device="cuda")
    m = torch.rand(6, 40, device="cuda") > 0.5
    u = torch.rand(6, device="cuda", dtype=torch.float64)
    tu = ("test_schema",)
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, (x, x.clone(), m, 0.99, 0.95), test_utils=tu)
    torch.library.opcheck(torch.ops.rlhf_fast.sample.default, (x, u, 1.0, 5, 0.9, 0.0), test_utils=tu)
    torch.library.opcheck(torch.ops.rlhf_fast.sample_philox.default, (x, 1, 0, 1.0, 5, 0.9, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
