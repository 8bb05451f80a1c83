"""CUDA C++ kernels (csrc/cuda/*.cu) against reference.py. The kernel tests run with
``pytest -m cuda`` on a GPU and are skipped elsewhere (conftest), where `make check-cuda` only
compiles the sources; the host-side glue of rlhf_fast/ops/_cuda.py is tested everywhere."""

import math
import types

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _cuda, _dispatch, reference

from .gae_cases import gae_loop, gae_mask


@pytest.fixture
def _cuda_backend():
    ok, why = _dispatch.backend_available("cuda")
    if not ok:
        pytest.skip(why)


def gpu(fn):
    """A test that runs the CUDA kernels: marked `cuda`, skipped without the cuda backend."""
    return pytest.mark.cuda(pytest.mark.usefixtures("_cuda_backend")(fn))


# ---------------------------------------------------------------- host glue (no GPU needed)


class _FakeCudaGenerator:
    """The part of a CUDA torch.Generator that philox_seed_offset touches."""

    def __init__(self, seed, offset=0, index=0):
        self.device = torch.device("cuda", index)
        self._seed, self._offset = seed, offset

    def initial_seed(self):
        return self._seed

    def get_offset(self):
        return self._offset

    def set_offset(self, o):
        assert o % 4 == 0, "torch refuses offsets that are not multiples of 4"
        self._offset = o


@pytest.fixture
def _no_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def test_philox_offsets_advance_and_never_repeat(_no_capture):
    g = _FakeCudaGenerator(seed=(1 << 64) - 5, offset=8)
    dev = torch.device("cuda", 0)
    seen = [_cuda.philox_seed_offset(dev, g) for _ in range(5)]
    assert [o for _, o in seen] == [8, 12, 16, 20, 24]  # one 128-bit Philox block per launch
    assert g.get_offset() == 28
    assert {s for s, _ in seen} == {-5}  # uint64 seed as the int64 the schema takes
    g2 = _FakeCudaGenerator(seed=3, offset=6)  # not a multiple of 4: round up, never overlap
    assert _cuda.philox_seed_offset(dev, g2) == (3, 8) and g2.get_offset() == 12


def test_philox_rejects_foreign_generators_and_graph_capture(monkeypatch, _no_capture):
    with pytest.raises(TypeError, match="generator"):
        _cuda.philox_seed_offset(torch.device("cuda", 0), torch.Generator())  # a CPU generator
    with pytest.raises(TypeError, match="generator"):
        _cuda.philox_seed_offset(torch.device("cuda", 0), _FakeCudaGenerator(1, index=1))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph"):
        _cuda.philox_seed_offset(torch.device("cuda", 0), _FakeCudaGenerator(1))


def test_greedy_consumes_no_randomness(monkeypatch):
    calls = []
    monkeypatch.setattr(_cuda, "philox_seed_offset", lambda *a, **k: calls.append(1) or (0, 0))
    fake_ops = types.SimpleNamespace(sample_philox=lambda *a: a)
    monkeypatch.setattr(torch.ops, "rlhf_fast", fake_ops, raising=False)
    args = _cuda._sample_cuda(torch.zeros(2, 3), temperature=0.0)
    assert calls == [] and args[1:3] == (0, 0)
    _cuda._sample_cuda(torch.zeros(2, 3), temperature=1.0)
    assert calls == [1]


def test_wrappers_keep_gradients_like_the_cpp_glue():
    # the wrappers run on any device's tensors; with CPU tensors this checks the glue only
    r = torch.randn(3, 7, requires_grad=True)
    v = torch.randn(3, 7, requires_grad=True)
    m = torch.rand(3, 7) > 0.3
    adv, ret = _cuda._gae_cuda(r, v, m, gamma=0.9, lam=0.8)
    assert adv.requires_grad and ret.requires_grad  # handed to the reference, graph kept
    assert _cuda._discounted_returns_cuda(r, m, gamma=0.9).requires_grad
    assert _cuda._group_advantages_cuda(r.reshape(-1)[:20], 5).requires_grad
    assert _cuda._masked_whiten_cuda(r, m).requires_grad
    if _dispatch.backend_available("cpp")[0]:
        x = torch.randn(3, 7, requires_grad=True)
        _cuda._masked_mean_cuda(x, m).backward()  # the op's registered backward, not detached
        torch.testing.assert_close(x.grad, m.float() / m.sum())


def test_dispatch_picks_cuda_only_for_cuda_tensors():
    for op in ("gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten", "sample"):
        assert "cuda" in _dispatch.implemented(op)
        assert _dispatch.select(op, torch.device("cpu"))[0] != "cuda"
        with ops.use_backend("cuda"):  # forcing cuda never sends CPU tensors to it
            assert _dispatch.select(op, torch.device("cpu"))[0] != "cuda"


# ---------------------------------------------------------------- advantages


SHAPES = [(1, 1), (3, 37), (5, 257), (4, 5000), (2, 20000), (300, 64), (257, 1000), (2, 4097)]


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["full", "random", "left_pad", "empty_rows", "holes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gae_and_returns_match_reference(shape, mask_kind, dtype):
    g = torch.Generator().manual_seed(0)
    B, T = shape
    r = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    m = gae_mask(B, T, g, mask_kind)
    for gamma, lam in ((1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.0, 0.5)):
        with ops.use_backend("cuda"):
            adv, ret = ops.gae(r.cuda(), v.cuda(), m.cuda(), gamma=gamma, lam=lam)
            dr = ops.discounted_returns(r.cuda(), m.cuda(), gamma=gamma)
        # the oracle in float64 on the CPU: the scan reassociates the sums
        ea, er = reference.gae(r.double(), v.double(), m, gamma=gamma, lam=lam)
        ed = reference.discounted_returns(r.double(), m, gamma=gamma)
        assert adv.dtype == ret.dtype == dr.dtype == reference.out_dtype(dtype)
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * math.sqrt(T))
        torch.testing.assert_close(adv.cpu().double(), ea, **tol)
        torch.testing.assert_close(ret.cpu().double(), er, **tol)
        torch.testing.assert_close(dr.cpu().double(), ed, **tol)


@gpu
def test_gae_mixed_dtypes_strides_float_mask_and_empty():
    g = torch.Generator().manual_seed(9)
    r = torch.randn(40, 33, generator=g).to(torch.bfloat16)
    v = torch.randn(33, 40, generator=g).t()  # non-contiguous fp32
    m = (torch.rand(40, 33, generator=g) > 0.5).float()  # 0/1 float mask
    with ops.use_backend("cuda"):
        adv, ret = ops.gae(r.cuda(), v.cuda(), m.cuda(), gamma=0.97, lam=0.9)
        dr = ops.discounted_returns(r.cuda()[:, ::2], m.cuda()[:, ::2], gamma=0.97)
    ea, er = reference.gae(r.double(), v.double(), m, gamma=0.97, lam=0.9)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.cpu().double(), ea, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dr.cpu().double(), reference.discounted_returns(r[:, ::2].double(), m[:, ::2], gamma=0.97),
                               rtol=1e-5, atol=1e-5)
    for B, T in ((0, 5), (5, 0), (0, 0)):
        z = torch.zeros(B, T, device="cuda")
        with ops.use_backend("cuda"):
            a, b = ops.gae(z, z, z.bool(), gamma=0.9)
            c = ops.discounted_returns(z, z.bool())
        assert a.shape == b.shape == c.shape == (B, T)


@gpu
def test_gae_long_single_row():
    # B = 1, T = 131072: the parallel scan path over many tiles
    g = torch.Generator().manual_seed(1)
    T = 131072
    r = torch.randn(1, T, generator=g, dtype=torch.float64)
    v = torch.randn(1, T, generator=g, dtype=torch.float64)
    m = torch.rand(1, T, generator=g) > 0.1
    with ops.use_backend("cuda"):
        adv, ret = ops.gae(r.cuda(), v.cuda(), m.cuda(), gamma=0.999, lam=0.95)
    torch.testing.assert_close(adv.cpu()[0], gae_loop(r[0], v[0], m[0], 0.999, 0.95), rtol=1e-9, atol=1e-9)


def _free_gpu_bytes():
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@gpu
def test_int64_offsets_past_2_pow_31_elements():
    # B·T and B·V above 2^31: a 32-bit row offset would wrap and read/write the wrong rows
    if _free_gpu_bytes() < 40 * 2**30:
        pytest.skip("needs ~40 GiB of free GPU memory")
    B, T = (1 << 16) + 1, 1 << 15  # B·T = 2^31 + 2^15
    r = torch.zeros(B, T, device="cuda", dtype=torch.bfloat16)
    r[-1] = torch.randn(T, device="cuda").to(torch.bfloat16)
    m = torch.ones(B, T, device="cuda", dtype=torch.bool)
    with ops.use_backend("cuda"):
        dr = ops.discounted_returns(r, m, gamma=0.99)
    torch.testing.assert_close(dr[-1:].cpu().double(), reference.discounted_returns(r[-1:].cpu().double(), m[-1:].cpu(),
                                                                                   gamma=0.99), rtol=1e-4, atol=1e-3)
    assert (dr[:-1] == 0).all()
    del r, m, dr
    Bs, V = 16385, 1 << 17  # B·V = 2^31 + 2^17
    logits = torch.zeros(Bs, V, device="cuda", dtype=torch.bfloat16)
    logits[-1, 12345] = 5.0
    logits[-1, 777] = 4.0
    with ops.use_backend("cuda"):
        tok, _ = ops.sample(logits, temperature=0.0)
        tok_k, lp_k = ops.sample(logits, top_k=2, temperature=0.5)
    assert tok[-1].item() == 12345 and tok_k[-1].item() in (777, 12345) and torch.isfinite(lp_k[-1])


@gpu
@pytest.mark.parametrize("kind", ["grpo", "rloo", "dr_grpo"])
@pytest.mark.parametrize("group_size", [1, 2, 5, 31, 33, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_group_advantages(kind, group_size, dtype):
    if kind == "rloo" and group_size < 2:
        pytest.skip("rloo needs groups of 2+")
    s = torch.randn(group_size * 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    s[:group_size] = 1.5  # one group without spread: std 0, advantage 0 (not NaN)
    for normalize_std in (True, False):
        with ops.use_backend("cuda"):
            out = ops.group_advantages(s.cuda(), group_size, kind=kind, normalize_std=normalize_std)
        exp = reference.group_advantages(s.double(), group_size, kind=kind, normalize_std=normalize_std)
        assert out.dtype == reference.out_dtype(dtype)
        torch.testing.assert_close(out.cpu().double(), exp, rtol=1e-5, atol=1e-5)
    with ops.use_backend("cuda"):
        assert ops.group_advantages(s.cuda()[:0], group_size, kind=kind).shape == (0,)


@gpu
@pytest.mark.parametrize("shape", [(1,), (7, 13), (64, 4096), (3, 1000003), (0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masked_mean_and_whiten(shape, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    m = torch.rand(shape, generator=g) > 0.4
    one = torch.zeros_like(m)
    one.view(-1)[:1] = True  # a single entry: variance 0 by the reference's convention
    for mask in (m, m.float(), torch.zeros_like(m), one):
        with ops.use_backend("cuda"):
            mean = ops.masked_mean(x.cuda(), mask.cuda())
            w = ops.masked_whiten(x.cuda(), mask.cuda())
            w2 = ops.masked_whiten(x.cuda(), mask.cuda(), shift_mean=False)
        assert mean.dtype == w.dtype == reference.out_dtype(dtype)
        torch.testing.assert_close(mean.cpu().double(), reference.masked_mean(x.double(), mask), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.cpu().double(), reference.masked_whiten(x.double(), mask), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w2.cpu().double(), reference.masked_whiten(x.double(), mask, shift_mean=False),
                                   rtol=1e-4, atol=1e-4)


@gpu
def test_masked_mean_gradient_and_grad_fallbacks():
    x = torch.randn(5, 9, device="cuda", requires_grad=True)
    m = torch.rand(5, 9, device="cuda") > 0.5
    with ops.use_backend("cuda"):
        ops.masked_mean(x, m).backward()
        adv, _ = ops.gae(x, x, m)
    torch.testing.assert_close(x.grad, m.float() / m.sum())
    assert adv.requires_grad


# ---------------------------------------------------------------- sampling

FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=1),
]


@gpu
@pytest.mark.parametrize("filt", FILTERS + [dict(temperature=0.0), dict(top_k=10**9, top_p=1.0, min_p=0.0)], ids=str)
@pytest.mark.parametrize("V", [1, 1013, 32000, 151936, 262147])
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


def _chi2_stat(counts, p, n):
    """Pearson's statistic over the cells with n·p >= 5 (the rest pooled into one cell)."""
    e = n * p
    big = e >= 5
    stat = float(((counts[big] - e[big]) ** 2 / e[big]).sum())
    df = int(big.sum()) - 1
    if (~big & (p > 0)).any():
        rest_e, rest_c = float(e[~big].sum()), float(counts[~big].sum())
        stat += (rest_c - rest_e) ** 2 / max(rest_e, 1e-9)
        df += 1
    return stat, max(df, 1)


def _chi2_bound(df, z=5.3):
    # Wilson–Hilferty upper quantile; z = 5.3 is a false-alarm rate of about 6e-8
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@gpu
@pytest.mark.parametrize("filt", FILTERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_philox_sampler_distribution_1e6_draws(filt, dtype):
    n, V = 1_000_000, 64
    row = (torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    logits = row.cuda().expand(n, V).contiguous()  # identical rows: only the per-row noise differs
    gen = torch.Generator(device="cuda").manual_seed(6)
    with ops.use_backend("cuda"):
        tok, lp = ops.sample(logits, generator=gen, **filt)
    target = reference.process_logits(row.float(), **filt)[0].double()
    p = target.exp()
    counts = torch.bincount(tok.cpu(), minlength=V).double()
    assert counts.shape == (V,), "token out of range"
    assert counts[p == 0].sum() == 0, "mass outside the kept set"
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < _tv_bound(p, n), tv
    stat, df = _chi2_stat(counts, p, n)
    assert stat < _chi2_bound(df), (stat, df)
    torch.testing.assert_close(lp.cpu().double(), target[tok.cpu()], rtol=1e-4, atol=1e-4)


def test_statistical_bounds_reject_a_wrong_sampler():
    # the bounds above must fail a sampler that is slightly off: here, temperature 1.05 for 1
    g = torch.Generator().manual_seed(12)
    n, V = 1_000_000, 64
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 2
    p = reference.process_logits(row)[0].double().exp()
    q = reference.process_logits(row, temperature=1.05)[0].double().exp()
    counts = torch.bincount(torch.multinomial(q, n, replacement=True, generator=g), minlength=V).double()
    stat, df = _chi2_stat(counts, p, n)
    assert stat > _chi2_bound(df)
    good = torch.bincount(torch.multinomial(p, n, replacement=True, generator=g), minlength=V).double()
    assert _chi2_stat(good, p, n)[0] < _chi2_bound(df)


@gpu
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


@gpu
def test_sample_greedy_ties_and_reproducibility():
    logits = torch.randn(9, 5001, generator=torch.Generator().manual_seed(8)).cuda()
    logits[3, 10] = logits[3, 20] = 100.0
    with ops.use_backend("cuda"):
        tok, lp = ops.sample(logits, temperature=0.0)
        assert torch.equal(tok, logits.argmax(-1)) and tok[3].item() == 10 and (lp == 0).all()
        a = ops.sample(logits, top_p=0.9, generator=torch.Generator(device="cuda").manual_seed(1))
        b = ops.sample(logits, top_p=0.9, generator=torch.Generator(device="cuda").manual_seed(1))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.manual_seed(3)
        c = ops.sample(logits)
        torch.manual_seed(3)
        d = ops.sample(logits)
        assert torch.equal(c[0], d[0])  # the default generator is honoured


@gpu
def test_consecutive_calls_draw_fresh_noise():
    # a flat distribution over 1000 tokens: two draws agree with probability 1/1000 unless
    # the second call reused the first call's Philox counters
    logits = torch.zeros(4096, 1000, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    off = gen.get_offset()
    with ops.use_backend("cuda"):
        for filt, n_kept in ((dict(), 1000), (dict(top_k=500), 500)):  # ties: the first 500 indices
            a, _ = ops.sample(logits, generator=gen, **filt)
            b, _ = ops.sample(logits, generator=gen, **filt)
            assert (a == b).float().mean().item() < 0.01, filt
            assert (a < n_kept).all() and a.unique().numel() > 0.9 * n_kept  # rows draw independently
    assert gen.get_offset() == off + 4 * _cuda.PHILOX_INCREMENT


@gpu
def test_sample_ties_keep_lowest_indices():
    row = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0]])
    for dtype in (torch.float32, torch.bfloat16):
        logits = row.to(dtype).cuda().expand(100000, 8).contiguous()
        for filt in (dict(top_k=3), dict(top_p=0.5), dict(top_k=5, top_p=0.6), dict(min_p=0.5), dict(top_k=6)):
            with ops.use_backend("cuda"):
                tok, _ = ops.sample(logits, **filt)
            kept = torch.isfinite(reference.process_logits(row, **filt)[0])
            assert set(tok.unique().cpu().tolist()) == set(kept.nonzero().flatten().tolist()), filt
    # -0.0 and +0.0 are one value: the lower index wins the single top-k slot
    z = torch.tensor([[-5.0, 0.0, -0.0, -5.0]]).cuda().expand(1000, 4).contiguous()
    z2 = torch.tensor([[-5.0, -0.0, 0.0, -5.0]]).cuda().expand(1000, 4).contiguous()
    with ops.use_backend("cuda"):
        assert (ops.sample(z, top_k=1)[0] == 1).all() and (ops.sample(z2, top_k=1)[0] == 1).all()


@gpu
def test_sample_invalid_rows_are_defined():
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(5, 300).to(dtype).cuda()
        logits[0, 5] = float("nan")
        logits[1, 7] = float("inf")
        logits[1, 9] = float("inf")
        logits[2] = float("-inf")
        logits[4, :290] = float("-inf")  # valid: only the last 10 tokens can be drawn
        with ops.use_backend("cuda"):
            for filt in (dict(), dict(top_p=0.9, top_k=5), dict(min_p=0.2), dict(top_k=50)):
                tok, lp = ops.sample(logits, **filt)
                assert ((tok >= 0) & (tok < 300)).all()
                assert torch.isnan(lp[:3]).all() and torch.isfinite(lp[3:]).all()
                assert tok[1].item() == 7 and tok[4].item() >= 290
            tok, lp = ops.sample(logits, temperature=0.0)
            # greedy: +inf is a well-defined argmax (first one), NaN / all -inf are not
            assert tok[1].item() == 7 and lp[1].item() == 0.0
            assert torch.isnan(lp[0]) and torch.isnan(lp[2]) and tok[4].item() >= 290


def _padded_rows(x, n_rows=None):
    """x [B, V] then zero rows up to n_rows (default: the sampler's block target, 4 per SM),
    enough rows that the sampler gives each one block."""
    n_rows = n_rows or 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return torch.cat([x, torch.zeros(n_rows - x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)])


def _misaligned(x):
    """x's values in a contiguous tensor whose data starts one element past an aligned address
    (no vector loads)."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = flat[1:].view(x.shape)
    out.copy_(x)
    return out


def _kernels_run(fn):
    """Names of the CUDA kernels that ``fn()`` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


@gpu
@pytest.mark.parametrize("V", [151936, 100003, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_few_row_draws_split_over_blocks_equal_the_one_block_kernel(V, dtype, temperature):
    """Few rows of a long vocabulary are split over several blocks (a partial kernel, then a
    merge); every entry keeps its Philox noise, so the tokens are exactly those of the same rows
    drawn one block per row (here: the same rows among 4·SMs, with the same generator state).
    A constant row sums exactly (exp(0) = 1 per entry), so its log-prob is the same bits on
    both paths, whatever a chunk boundary would drop or count twice."""
    B = 6
    x = (torch.randn(B, V, generator=torch.Generator().manual_seed(V)) * 3).to(dtype).cuda()
    x[1, V - 1] = 40.0  # the winner in the last entry: the last, partly filled chunk counts
    x[2, :V // 2] = float("-inf")  # whole chunks of -inf
    x[3, 7] = x[3, V - 2] = 50.0  # greedy: the first of two maxima in different chunks
    x[5] = 0.0
    draw = lambda z: ops.sample(z, temperature=temperature, generator=torch.Generator("cuda").manual_seed(11))  # noqa: E731
    with ops.use_backend("cuda"):
        assert "plain_partial_kernel" in _kernels_run(lambda: draw(x))
        assert "plain_partial_kernel" not in _kernels_run(lambda: draw(_padded_rows(x)))
        for name, split_in, whole_in in (("aligned", x, _padded_rows(x)),
                                          ("misaligned", _misaligned(x), _misaligned(_padded_rows(x)))):
            split, whole = draw(split_in), draw(whole_in)
            assert torch.equal(split[0], whole[0][:B]), name
            torch.testing.assert_close(split[1], whole[1][:B], rtol=1e-5, atol=1e-5)
            assert torch.equal(split[1][5], whole[1][5]), name
            target = reference.process_logits(x.double().cpu(), temperature=temperature)
            if temperature == 0.0:
                assert torch.equal(split[0].cpu(), x.double().cpu().argmax(-1)) and split[0][3].item() == 7
                assert (split[1] == 0).all()
            else:
                assert split[0][1].item() == V - 1
                torch.testing.assert_close(split[1].cpu().double(), target[torch.arange(B), split[0].cpu()],
                                           rtol=1e-4, atol=1e-4)
                assert split[1][5].item() == pytest.approx(-math.log(V), abs=1e-5)
            assert split[0][2].item() >= V // 2


@gpu
def test_few_row_draws_split_over_blocks_draw_from_softmax():
    """The split path's draws follow softmax: rows of one distribution, 8 at a time (split) for
    2e5 draws, a chi-squared test against the reference's probabilities over 64 tokens that hold
    nearly all of the mass of a 65536-entry vocabulary."""
    V, n, B = 65536, 200_000, 8
    row = torch.full((1, V), -30.0)
    row[0, :64] = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 2
    logits = row.cuda().expand(B, V).contiguous()
    gen = torch.Generator(device="cuda").manual_seed(6)
    toks = []
    with ops.use_backend("cuda"):
        for _ in range(n // B):
            toks.append(ops.sample(logits, generator=gen)[0])
    tok = torch.cat(toks).cpu()
    p = reference.process_logits(row)[0].double().exp()
    counts = torch.bincount(tok, minlength=V).double()
    assert counts[64:].sum() <= 5  # p of the tail: 65472 · e^-30 / Z, ~1e-8 per draw
    stat, df = _chi2_stat(counts[:64], p[:64] / p[:64].sum(), n)
    assert stat < _chi2_bound(df), (stat, df)


@gpu
@pytest.mark.parametrize("V", [70000, 70001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_draws_of_invalid_rows_are_defined(V, dtype):
    """NaN / +inf / all -inf rows on the split path, also where V is not a multiple of 4 (no
    vector loads; the bad entry in the last, partly filled group of the last chunk)."""
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(2))
    logits[0, 60000] = float("nan")
    logits[1, 50000] = logits[1, 65000] = float("inf")
    logits[2] = float("-inf")
    logits[4, V - 1] = float("inf")  # the only +inf, in the last entry
    logits[5, V - 1] = float("nan")  # the only NaN, in the last entry
    logits = logits.to(dtype).cuda()
    with ops.use_backend("cuda"):
        assert "plain_partial_kernel" in _kernels_run(lambda: ops.sample(logits))
        for t in (1.0, 0.0):
            tok, lp = ops.sample(logits, temperature=t, generator=torch.Generator("cuda").manual_seed(2))
            assert ((tok >= 0) & (tok < V)).all() and tok[1].item() == 50000 and tok[4].item() == V - 1
            assert torch.isnan(lp[0]) and torch.isnan(lp[2]) and torch.isnan(lp[5]) and torch.isfinite(lp[3])
            assert tok[0].item() == 0 and tok[2].item() == 0 and tok[5].item() == 0
            if t:
                assert torch.isnan(lp[1]) and torch.isnan(lp[4])
            else:  # greedy: the first +inf is the argmax, logp 0
                assert lp[1].item() == 0.0 and lp[4].item() == 0.0
            # as the one-block kernel defines them
            whole = ops.sample(_padded_rows(logits), temperature=t, generator=torch.Generator("cuda").manual_seed(2))
            assert torch.equal(tok, whole[0][:6])
            assert torch.equal(torch.isnan(lp), torch.isnan(whole[1][:6]))


@gpu
def test_split_draws_with_empty_chunks():
    """B = 1 with a vocabulary whose last chunk gets no group: with c = 4·SMs chunks and
    c·512 + 1 groups of 4 entries, each chunk takes 513 groups and c - 1 of them already cover
    the row (when c >= 514: 132 SMs give 528). The empty chunk is an identity in the merge."""
    chunks = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    groups = chunks * 512 + 1
    per = -(-groups // chunks)
    if (chunks - 1) * per < groups:
        pytest.skip(f"no empty chunk with {chunks} chunks")
    V = 4 * groups
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(1)).cuda()
    draw = lambda z: ops.sample(z, generator=torch.Generator("cuda").manual_seed(4))  # noqa: E731
    with ops.use_backend("cuda"):
        tok, lp = draw(x)
        whole = draw(_padded_rows(x))
    assert torch.equal(tok, whole[0][:1])
    torch.testing.assert_close(lp, whole[1][:1], rtol=1e-5, atol=1e-5)


# An independent NumPy Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32_R(10, ...)),
# the oracle of the Philox draws: key = seed, counter = (offset / 4 as 64 bits, row·⌈V/4⌉ + i/4
# as 64 bits), word i mod 4 for entry i (csrc/cuda/sampling.cu's file comment).
_PHILOX_M0, _PHILOX_M1, _PHILOX_W0, _PHILOX_W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _philox4x32_10(c, key):
    """Philox4x32-10 of counters c [n, 4] (32-bit words in uint64) under key (k0, k1)."""
    import numpy as np

    u = np.uint64
    c = np.asarray(c, dtype=np.uint64).copy()
    k0, k1 = u(key[0]), u(key[1])
    for _ in range(10):
        p0 = u(_PHILOX_M0) * c[:, 0]
        p1 = u(_PHILOX_M1) * c[:, 2]
        c = np.stack([((p1 >> u(32)) ^ c[:, 1] ^ k0) & u(_MASK32), p1 & u(_MASK32),
                      ((p0 >> u(32)) ^ c[:, 3] ^ k1) & u(_MASK32), p0 & u(_MASK32)], 1)
        k0 = (k0 + u(_PHILOX_W0)) & u(_MASK32)
        k1 = (k1 + u(_PHILOX_W1)) & u(_MASK32)
    return c


def _philox_gumbel(seed, offset, row, V):
    """The Gumbel noise [V] (float64) that the kernel gives row ``row`` of a [B, V] draw."""
    import numpy as np

    s, ctr = seed % 2**64, offset // 4
    i = np.arange(V, dtype=np.int64)
    sub = (row * ((V + 3) // 4) + i // 4).astype(np.uint64)
    c = np.stack([np.full(V, ctr & _MASK32, np.uint64), np.full(V, ctr >> 32, np.uint64),
                  sub & np.uint64(_MASK32), sub >> np.uint64(32)], 1)
    bits = _philox4x32_10(c, (s & _MASK32, s >> 32))[np.arange(V), i % 4].astype(np.float64)
    v = np.minimum((bits + 0.5) * 2.0**-32, 0.99999994)
    return -np.log(-np.log1p(-v))


def test_philox_oracle_known_answers():
    # Random123's kat_vectors for philox4x32_10 (the generator common.cuh writes out)
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((_MASK32,) * 4, (_MASK32, _MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert tuple(int(w) for w in _philox4x32_10([ctr], key)[0]) == want


@gpu
@pytest.mark.parametrize("V", [4099, 65537, 65538, 65539, 65540])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_split_draws_are_the_philox_gumbel_max_oracle(V, dtype, temperature):
    """Few rows of a long vocabulary (the split path), every residue of V mod 4, a seed and a
    Philox offset whose high 32-bit words are not 0: the tokens are the argmax of x + the NumPy
    Philox oracle's Gumbel noise (exactly, wherever the oracle's best score leads the next one
    by more than the kernel's fast-log error), greedy the first maximum; the Triton sampler
    (its own split path on a GPU) draws the same tokens from the same generator state."""
    import numpy as np

    B = 3
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(V)) * 3
    x[0] = 0.0  # constant row: the token is the entry with the smallest Philox word
    x[2, V - 1] = x[2].max()  # a tie for the greedy maximum in the last entry: the first wins
    x = x.to(dtype)
    gen = torch.Generator("cuda").manual_seed(2**64 - 2**33 - 7)  # key (low, high) 0xfffffff9, 0xfffffffd
    gen.set_offset(2**36 + 8)  # counter words 2, 4
    seed, offset = gen.initial_seed(), gen.get_offset()
    xc = x.cuda()
    with ops.use_backend("cuda"):
        if temperature == 1.0 and dtype == torch.float32:
            assert "plain_partial_kernel" in _kernels_run(lambda: ops.sample(xc, temperature=temperature))
        tok, lp = ops.sample(xc, temperature=temperature, generator=gen)
    tok, lp = tok.cpu(), lp.cpu()
    # the scaled logits as the kernel computes them: fp32, IEEE division
    xs = (x.float() / temperature if temperature else x.float()).double().numpy()
    if temperature == 0.0:
        assert gen.get_offset() == offset  # greedy consumes no randomness
        assert torch.equal(tok, torch.from_numpy(xs.argmax(-1)))
        assert (lp == 0).all()
        return
    assert gen.get_offset() == offset + _cuda.PHILOX_INCREMENT
    nears = []
    for b in range(B):
        score = xs[b] + _philox_gumbel(seed, offset, b, V)
        nears.append(np.flatnonzero(score >= score.max() - 1e-3).tolist())  # one entry but for near-ties
        assert tok[b].item() in nears[b], (b, tok[b].item(), nears[b])
    target = reference.process_logits(x.double(), temperature=temperature)
    torch.testing.assert_close(lp.double(), target[torch.arange(B), tok], rtol=1e-4, atol=1e-4)
    if _dispatch.backend_available("triton")[0]:
        g2 = torch.Generator("cuda").manual_seed(2**64 - 2**33 - 7)
        g2.set_offset(2**36 + 8)
        with ops.use_backend("triton"):
            t_tok, t_lp = ops.sample(xc, temperature=temperature, generator=g2)
        assert g2.get_offset() == gen.get_offset()  # both backends advance the generator alike
        # the same Philox words; the two fast logs may only flip a near-tie
        assert all(t_tok[b].item() in nears[b] for b in range(B)), (t_tok, nears)
        torch.testing.assert_close(t_lp.cpu(), target[torch.arange(B), t_tok.cpu()].float(),
                                   rtol=1e-4, atol=1e-4)


@gpu
def test_sample_rejects_bad_generator():
    logits = torch.randn(2, 10, device="cuda")
    with ops.use_backend("cuda"), pytest.raises(TypeError, match="generator"):
        ops.sample(logits, generator=torch.Generator())


@gpu
def test_opcheck_cuda_ops():
    x = torch.randn(6, 40, device="cuda")
    m = torch.rand(6, 40, device="cuda") > 0.5
    u = torch.rand(6, device="cuda", dtype=torch.float64)
    tu = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, (x, x.clone(), m, 0.99, 0.95), test_utils=tu)
    torch.library.opcheck(torch.ops.rlhf_fast.discounted_returns.default, (x, m, 0.99), test_utils=tu)
    torch.library.opcheck(torch.ops.rlhf_fast.group_advantages.default, (x[0], 8, "grpo", True, 1e-6), test_utils=tu)
    torch.library.opcheck(torch.ops.rlhf_fast.masked_whiten.default, (x, m, True, 1e-8), test_utils=tu)
    torch.library.opcheck(torch.ops.rlhf_fast.sample.default, (x, u, 1.0, 5, 0.9, 0.0), test_utils=tu)
    torch.library.opcheck(torch.ops.rlhf_fast.sample_philox.default, (x, 1, 0, 1.0, 5, 0.9, 0.0), test_utils=tu)
