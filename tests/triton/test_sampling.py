"""The Triton sampler: greedy, temperature, top-k, top-p, min-p.

The draws are checked exactly against an independent NumPy Philox4x32-10 + Gumbel-max written
here (the counter layout of csrc/cuda/sampling.cu), so a few rows under the interpreter prove
the kernel draws what it should; the distribution tests with 1e6 draws run on a GPU."""

import math

import numpy as np
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

from .conftest import device

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _philox(c, key):
    """Philox4x32-10 of counters c [n, 4] (uint64 holding 32-bit words) under key (k0, k1)."""
    c = c.astype(np.uint64).copy()
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(M0) * c[:, 0]
        p1 = np.uint64(M1) * c[:, 2]
        c = np.stack([((p1 >> np.uint64(32)) ^ c[:, 1] ^ k0) & np.uint64(MASK32), p1 & np.uint64(MASK32),
                      ((p0 >> np.uint64(32)) ^ c[:, 3] ^ k1) & np.uint64(MASK32), p0 & np.uint64(MASK32)], 1)
        k0 = (k0 + np.uint64(W0)) & np.uint64(MASK32)
        k1 = (k1 + np.uint64(W1)) & np.uint64(MASK32)
    return c


def _noise(seed, offset, row, V):
    """Gumbel noise [V] of one row, in float64 from the same 32 random bits per entry."""
    s = seed % 2**64
    i = np.arange(V)
    sub = row * ((V + 3) // 4) + i // 4
    ctr = offset // 4
    c = np.stack([np.full(V, ctr & MASK32), np.full(V, ctr >> 32), sub & MASK32, sub >> 32], 1).astype(np.uint64)
    bits = _philox(c, (s & MASK32, s >> 32))[np.arange(V), i % 4].astype(np.float64)
    v = np.minimum((bits + 0.5) * 2.0**-32, 0.99999994)
    return -np.log(-np.log1p(-v))


def _expected(logits, seed, offset, **filters):
    """Gumbel-max over the reference's kept set with the kernel's noise."""
    kept = torch.isfinite(reference.process_logits(logits, **filters)).numpy()
    x = (logits.double() / filters.get("temperature", 1.0)).numpy()
    out = []
    for b in range(x.shape[0]):
        score = np.where(kept[b], x[b] + _noise(seed, offset, b, x.shape[1]), -np.inf)
        out.append(int(np.argmax(score)))
    return torch.tensor(out)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-logit tiles on the interpreter, so a short row crosses several tiles."""
    from rlhf_fast.kernels import sampling

    if device().type == "cpu":
        monkeypatch.setattr(sampling, "BLOCK_V", 16)


def _seed_offset_of_next_call(gen):
    """The (seed, offset) the sampler's next call will draw from ``gen`` (a clone runs it)."""
    from rlhf_fast.kernels import sampling

    clone = torch.Generator(device=gen.device)
    clone.set_state(gen.get_state())
    return sampling._seed_offset(torch.device(gen.device.type), clone)


FILTERS = [dict(), dict(temperature=0.7), dict(temperature=1.3, min_p=0.2), dict(top_k=3), dict(top_p=0.8),
           dict(temperature=0.8, top_k=10, top_p=0.9), dict(top_k=20, top_p=0.95, min_p=0.05), dict(top_p=0.3)]


@pytest.mark.parametrize("V", [7, 37])
@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_draws_are_philox_gumbel_max_over_the_kept_set(V, filters, small_tiles):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(6, V, generator=g) * 2).to(device())
    gen = torch.Generator(device=device()).manual_seed(11)
    seed, offset = _seed_offset_of_next_call(gen)
    with ops.use_backend("triton"):
        assert _dispatch.select("sample", logits.device)[0] == "triton"
        tok, lp = ops.sample(logits, generator=gen, **filters)
    exp = _expected(logits.cpu(), seed, offset, **filters)
    # fp32 scores in the kernel: a near-tie between the two best scores may go either way
    assert (tok.cpu() == exp).float().mean() >= 5 / 6, (tok, exp)
    target = reference.process_logits(logits.cpu(), **filters)
    torch.testing.assert_close(lp.cpu(), target.gather(1, tok.cpu()[:, None])[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filters", [dict(top_k=5), dict(top_p=0.26), dict(top_k=7, top_p=0.5),
                                     dict(top_k=3, top_p=0.99)], ids=str)
def test_ties_at_the_boundary_keep_the_lowest_indices(filters, small_tiles):
    # a flat row and a row of two plateaus: the kept ties are the first ones by index, as the
    # reference's stable sort keeps them (top_p off the exact multiples of a tie's mass, where
    # the reference's float cumsum and the kernel's integer mass may round apart)
    z = torch.zeros(2, 40)
    z[1, ::2] = 1.0
    z = z.to(device())
    gen = torch.Generator(device=device()).manual_seed(2)
    seed, offset = _seed_offset_of_next_call(gen)
    with ops.use_backend("triton"):
        tok, lp = ops.sample(z, generator=gen, **filters)
    assert torch.equal(tok.cpu(), _expected(z.cpu(), seed, offset, **filters))
    target = reference.process_logits(z.cpu(), **filters)
    torch.testing.assert_close(lp.cpu(), target.gather(1, tok.cpu()[:, None])[:, 0], rtol=1e-5, atol=1e-5)


def test_greedy_ties_infinities_and_broken_rows(small_tiles):
    z = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    z[0, 7] = z[0, 30] = 50.0  # a tie: the first maximum
    z[1, 25] = float("inf")  # greedy with +inf: the first +inf, logp 0
    z[2, 3] = float("nan")
    z[3] = float("-inf")
    z = z.to(device())
    with ops.use_backend("triton"):
        tok, lp = ops.sample(z, temperature=0.0)
        stok, slp = ops.sample(z, temperature=1.0, generator=torch.Generator(device=device()).manual_seed(0))
    assert tok[0].item() == 7 and tok[1].item() == 25 and tok[4].item() == int(z[4].argmax())
    assert (lp[[0, 1, 4]] == 0).all() and torch.isnan(lp[[2, 3]]).all()
    # sampling: +inf, NaN and all -inf rows have no distribution: logp NaN, a token inside [0, V)
    assert stok[1].item() == 25 and torch.isnan(slp[1:4]).all() and torch.isfinite(slp[[0, 4]]).all()
    assert ((stok >= 0) & (stok < 40)).all()


@pytest.fixture
def split_rows(monkeypatch):
    """Plain and greedy rows spread over 3 programs each (partial statistics, then a merge):
    the GPU's layout for few long rows."""
    from rlhf_fast.kernels import sampling

    monkeypatch.setattr(sampling, "_split_chunks", lambda B, V, blk, dev: 3)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_split_rows_draw_the_same_tokens(temperature, small_tiles, split_rows):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 70, generator=g) * 2).to(device())  # 5 tiles over 3 chunks
    logits[1, 10] = logits[1, 60] = 30.0  # a tie across chunks: the lower index wins greedy
    gen = torch.Generator(device=device()).manual_seed(12)
    seed, offset = _seed_offset_of_next_call(gen)
    with ops.use_backend("triton"):
        tok, lp = ops.sample(logits, temperature=temperature, generator=gen)
        gtok, glp = ops.sample(logits, temperature=0.0)
    assert torch.equal(tok.cpu(), _expected(logits.cpu(), seed, offset, temperature=temperature))
    target = reference.process_logits(logits.cpu(), temperature=temperature)
    torch.testing.assert_close(lp.cpu(), target.gather(1, tok.cpu()[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(gtok.cpu(), logits.cpu().argmax(-1)) and gtok[1].item() == 10 and (glp == 0).all()


def test_split_rows_broken_rows(small_tiles, split_rows):
    z = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    z[0, 40] = float("inf")
    z[1, 20] = float("nan")
    z[2] = float("-inf")
    z = z.to(device())
    with ops.use_backend("triton"):
        tok, lp = ops.sample(z, generator=torch.Generator(device=device()).manual_seed(0))
        gtok, glp = ops.sample(z, temperature=0.0)
    assert tok[0].item() == 40 and torch.isnan(lp[:3]).all() and torch.isfinite(lp[3])
    assert gtok[0].item() == 40 and glp[0].item() == 0 and torch.isnan(glp[1:3]).all()


def test_generator_reproduces_and_advances():
    z = torch.zeros(64, 100, device=device())  # uniform: two fresh draws agree on ~1% of rows
    with ops.use_backend("triton"):
        gen = torch.Generator(device=device()).manual_seed(5)
        a, _ = ops.sample(z, generator=gen)
        b, _ = ops.sample(z, generator=gen)
        c, _ = ops.sample(z, generator=torch.Generator(device=device()).manual_seed(5))
    assert torch.equal(a, c)
    assert (a == b).float().mean() < 0.2


def test_distribution_small_sample():
    # 400 draws of a 6-token row: catches a wrong distribution, not a subtle bias (the GPU
    # test below draws 1e6)
    row = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    n = 400
    with ops.use_backend("triton"):
        tok, _ = ops.sample(row.expand(n, 6).contiguous().to(device()), temperature=0.9,
                            generator=torch.Generator(device=device()).manual_seed(8))
    p = reference.process_logits(row, temperature=0.9)[0].double().exp()
    counts = torch.bincount(tok.cpu(), minlength=6).double()
    stat = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert stat < 25.0, stat  # chi-square, 5 degrees of freedom: p < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6), dict(min_p=0.05), dict(top_k=10),
                                dict(top_p=0.9), dict(temperature=0.8, top_k=20, top_p=0.8, min_p=0.02)], ids=str)
def test_distribution_1e6_draws_on_gpu(kw):
    n, V = 1_000_000, 64
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 2
    with ops.use_backend("triton"):
        tok, lp = ops.sample(row.cuda().expand(n, V).contiguous(), generator=torch.Generator("cuda").manual_seed(6),
                             **kw)
    target = reference.process_logits(row, **kw)[0].double()
    p = target.exp()
    counts = torch.bincount(tok.cpu(), minlength=V).double()
    assert counts[p == 0].sum() == 0
    keep = p > 0
    stat = ((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum().item()
    df = int(keep.sum()) - 1
    assert stat < df + 6 * math.sqrt(2 * max(df, 1)) + 10, (stat, df)
    torch.testing.assert_close(lp.cpu().double(), target[tok.cpu()], rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_noise_as_the_cuda_kernel():
    if not _dispatch.backend_available("cuda")[0]:
        pytest.skip("rlhf_fast._C has no CUDA kernels")
    z = torch.randn(4096, 32000, device="cuda") * 3
    for kw in (dict(), dict(top_k=50, top_p=0.9)):
        out = {}
        for backend in ("triton", "cuda"):
            with ops.use_backend(backend):
                out[backend] = ops.sample(z, generator=torch.Generator("cuda").manual_seed(3), **kw)[0]
        # the same Philox words; the fast log on the CUDA side may flip a near-tie now and then
        assert (out["triton"] == out["cuda"]).float().mean() > 0.999, kw
