"""Index arithmetic past 2^31 elements (review): the C++ CPU kernels on inputs that really hold
more than 2^31 elements, and (``-m cuda``) the CUDA kernels' paths that
tests/test_cuda_kernels.py::test_int64_offsets_past_2_pow_31_elements does not take.

The CPU inputs are numpy's zeros (calloc: a fresh mapping whose pages read as zeros and are
never allocated unless written), so a [16385, 131072] bf16 tensor costs a few written pages
while the kernels read all of it (about 2 s each on two cores). Only the entries past element
2^31 are set, where a 32-bit ``row * V`` or flat index would wrap (a crash or a wrong row).
"""

import math

import numpy as np
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

N_ROWS, VOCAB = (1 << 14) + 1, 1 << 17  # N·V = 2^31 + 2^17: the last row starts at element 2^31


def _lazy_zeros(*shape, dtype):
    """Zeros of ``shape`` whose memory is allocated only where written."""
    if dtype == torch.bool:
        return torch.from_numpy(np.zeros(shape, dtype=np.bool_))
    assert dtype == torch.bfloat16
    return torch.from_numpy(np.zeros(shape, dtype=np.uint16)).view(torch.bfloat16)


def _cpp():
    ok, why = _dispatch.backend_available("cpp")
    if not ok:
        pytest.skip(why)
    return ops.use_backend("cpp")


def test_cpp_token_logprobs_and_greedy_sample_rows_past_2_pow_31():
    x = _lazy_zeros(N_ROWS, VOCAB, dtype=torch.bfloat16)
    x[-1, 12345] = 10.0
    labels = torch.zeros(N_ROWS, dtype=torch.long)
    labels[-1] = 12345
    with _cpp():
        logp = ops.token_logprobs(x, labels)
        tok, _ = ops.sample(x, temperature=0.0)
    assert logp[-1].item() == pytest.approx(10.0 - math.log(math.exp(10.0) + VOCAB - 1), abs=1e-5)
    assert tok[-1].item() == 12345


def test_cpp_masked_mean_past_2_pow_31():
    n = N_ROWS * VOCAB
    x = _lazy_zeros(n, dtype=torch.bfloat16)
    m = _lazy_zeros(n, dtype=torch.bool)  # all False but the last two entries
    x[-2:] = torch.tensor([3.0, 5.0])
    m[-2:] = True
    with _cpp():
        assert ops.masked_mean(x, m).item() == 4.0


# ---------------------------------------------------------------- CUDA (-m cuda)


@pytest.fixture
def _cuda_backend():
    ok, why = _dispatch.backend_available("cuda")
    if not ok:
        pytest.skip(why)


def _need_gpu_gib(gib):
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs ~{gib} GiB of free GPU memory")


@pytest.mark.cuda
@pytest.mark.usefixtures("_cuda_backend")
def test_cuda_gae_and_masked_stats_past_2_pow_31():
    # the values path of the scan (discounted_returns is covered elsewhere) and the grid-stride
    # loops of masked_mean / masked_whiten, with only the last row set / masked in
    _need_gpu_gib(40)
    B, T = (1 << 16) + 1, 1 << 15  # B·T = 2^31 + 2^15
    g = torch.Generator().manual_seed(0)
    last_r, last_v = torch.randn(1, T, generator=g), torch.randn(1, T, generator=g)
    r = torch.zeros(B, T, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros_like(r)
    r[-1:] = last_r.to(r)
    v[-1:] = last_v.to(v)
    m = torch.zeros(B, T, device="cuda", dtype=torch.bool)
    m[-1] = True
    with ops.use_backend("cuda"):
        mean = ops.masked_mean(r, m)
        w = ops.masked_whiten(r, m)
    lr = r[-1:].cpu().double()
    torch.testing.assert_close(mean.cpu().double(), lr.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w[-1:].cpu().double(), reference.masked_whiten(lr, m[-1:].cpu()), rtol=1e-4,
                               atol=1e-4)
    assert not w[:-1].any()
    del w
    m.fill_(True)
    with ops.use_backend("cuda"):
        adv, ret = ops.gae(r, v, m, gamma=0.99, lam=0.95)
    ea, er = reference.gae(lr, v[-1:].cpu().double(), m[-1:].cpu(), gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv[-1:].cpu().double(), ea, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ret[-1:].cpu().double(), er, rtol=1e-4, atol=1e-3)
    assert not adv[:-1].any()


@pytest.mark.cuda
@pytest.mark.usefixtures("_cuda_backend")
def test_cuda_sample_few_long_rows_past_2_pow_31():
    # 3 rows of 2^30 + 4 entries: the plain draws split each row over blocks (few rows), the
    # filtered and uniform draws run one block per row; row 2 starts past element 2^31
    _need_gpu_gib(12)
    V = (1 << 30) + 4
    z = torch.zeros(3, V, device="cuda", dtype=torch.bfloat16)
    hot = [7, V // 2, V - 3]
    for b, i in enumerate(hot):
        z[b, i] = 40.0  # every other token together has probability ~5e-9
    gen = torch.Generator("cuda").manual_seed(0)
    with ops.use_backend("cuda"):
        for kw in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.0, "top_k": 5},
                   {"temperature": 1.0, "top_p": 0.9}):
            tok, _ = ops.sample(z, generator=gen, **kw)
            assert tok.tolist() == hot, kw
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device="cuda")
    tok, _ = torch.ops.rlhf_fast.sample(z, u, 1.0, 0, 1.0, 0.0)  # the inverse-CDF kernel
    assert tok.tolist() == hot
