"""sample: every live CPU backend against reference.sample / reference.process_logits.

Token-for-token equality uses the same generator state (the cpp glue draws the uniforms as the
reference does); the statistical tests draw 1e5 samples from one row repeated 1e5 times.
"""

import math

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch, reference

from .conftest import live_cpu_backends

FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=1),
    dict(temperature=2.0, top_p=0.3),
]


def _ids(f):
    return ",".join(f"{k}={v}" for k, v in f.items())


def _draw(backend, logits, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    with ops.use_backend(backend):
        return ops.sample(logits, generator=g, **kw)


@pytest.mark.parametrize("backend", live_cpu_backends())
@pytest.mark.parametrize("filt", FILTERS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_tokens_as_reference(backend, filt, dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(37, 1013, generator=g, dtype=torch.float64) * 3).to(dtype)
    if dtype == torch.bfloat16:
        # bf16 has many exact ties; tie-free logits are what the equality claim is about
        logits = (torch.randperm(37 * 1013, generator=g).reshape(37, 1013).double() / 4000).to(dtype)
    tok, lp = _draw(backend, logits, 7, **filt)
    g2 = torch.Generator().manual_seed(7)
    ref_tok, ref_lp = reference.sample(logits, generator=g2, **filt)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and tok.shape == (37,)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", live_cpu_backends())
@pytest.mark.parametrize("V", [151936, 262147])
def test_large_vocab_matches_reference(backend, V):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g) * 4
    for filt in (dict(temperature=1.0), dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02)):
        tok, lp = _draw(backend, logits, 3, **filt)
        ref_tok, ref_lp = reference.sample(logits, generator=torch.Generator().manual_seed(3), **filt)
        assert torch.equal(tok, ref_tok), filt
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=5e-5)


def _tv_bound(p: torch.Tensor, n: int) -> float:
    # E[TV] <= ½·Σ sqrt(p_i(1-p_i)/n) (Jensen), and TV has bounded differences 1/n per draw, so
    # McDiarmid puts it above its mean by more than 5/sqrt(n) with probability < 2·exp(-50).
    return 0.5 * float(torch.sqrt(p * (1 - p) / n).sum()) + 5.0 / math.sqrt(n)


@pytest.mark.parametrize("backend", live_cpu_backends())
@pytest.mark.parametrize("filt", FILTERS, ids=_ids)
def test_distribution_of_100k_draws(backend, filt):
    n, V = 100_000, 64
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(4)) * 2
    logits = row.expand(n, V).contiguous()
    tok, lp = _draw(backend, logits, 11, **filt)
    target = reference.process_logits(row, **filt)[0].double()  # [V] log-probs
    p = target.exp()
    counts = torch.bincount(tok, minlength=V).double()
    assert counts[p == 0].sum() == 0, "mass outside the kept set"
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < _tv_bound(p, n), (tv, _tv_bound(p, n))
    torch.testing.assert_close(lp.double(), target[tok], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_ties_follow_the_stable_order(backend):
    # ties at the top-k / top-p boundaries: the reference keeps the lowest indices
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0]]).expand(20000, 8).contiguous()
    for filt in (dict(top_k=3), dict(top_p=0.5), dict(top_k=5, top_p=0.6), dict(min_p=0.5)):
        tok, lp = _draw(backend, logits, 5, **filt)
        target = reference.process_logits(logits[:1], **filt)[0]
        kept = torch.isfinite(target)
        assert kept[tok].all(), filt
        assert set(tok.unique().tolist()) == set(kept.nonzero().flatten().tolist()), filt
        torch.testing.assert_close(lp, target[tok], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_negative_zero_ties_with_zero_at_the_top_k_cut(backend):
    # -0.0 == 0.0: the stable order keeps the lower index (the -0.0 at 1), never the 0.0 at 2
    logits = torch.tensor([[1.0, -0.0, 0.0, -1.0]]).expand(4000, 4).contiguous()
    with ops.use_backend(backend):
        tok, _ = ops.sample(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tok.unique().tolist()) == {0, 1}
    target = reference.process_logits(logits[:1], top_k=2)[0]
    assert torch.isfinite(target).tolist() == [True, True, False, False]


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_greedy_is_argmax(backend):
    logits = torch.randn(9, 301, generator=torch.Generator().manual_seed(6))
    logits[3, 10] = logits[3, 20] = 100.0  # first index on ties
    logits[4] = float("-inf")
    logits[4, 7] = 0.0
    with ops.use_backend(backend):
        tok, lp = ops.sample(logits, temperature=0.0, top_k=5, top_p=0.5)
    assert torch.equal(tok, logits.argmax(-1))
    assert tok[3] == 10 and tok[4] == 7
    assert torch.equal(lp, torch.zeros(9))


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_generator_seed_reproduces(backend):
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(8))
    a = _draw(backend, logits, 123, top_p=0.9)
    b = _draw(backend, logits, 123, top_p=0.9)
    c = _draw(backend, logits, 124, top_p=0.9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_top_k_of_the_whole_vocabulary_or_more_keeps_every_token(backend):
    """top_k >= V filters nothing, as 0 does, whatever its size: one beyond int64 failed in
    the C++ op's argument conversion."""
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3))
    want = _draw(backend, logits, 5, temperature=0.8)
    for k in (50, 51, 2**63, 10**30):
        got = _draw(backend, logits, 5, temperature=0.8, top_k=k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), k


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_neg_inf_logits_are_never_drawn(backend):
    logits = torch.randn(4000, 50, generator=torch.Generator().manual_seed(9))
    logits[:, ::2] = float("-inf")
    tok, lp = _draw(backend, logits, 1, top_p=0.95)
    assert (tok % 2 == 1).all()
    assert torch.isfinite(lp).all()


def test_cpp_rejects_nan_and_undefined_rows():
    if "cpp" not in live_cpu_backends():
        pytest.skip("rlhf_fast._C not built")
    bad = torch.randn(3, 10)
    bad[1, 4] = float("nan")
    with ops.use_backend("cpp"):
        for t in (1.0, 0.0):
            with pytest.raises(ValueError, match="NaN"):
                ops.sample(bad, temperature=t)
        pinf = torch.randn(2, 10)
        pinf[0, 1] = float("inf")
        with pytest.raises(ValueError, match="inf"):
            ops.sample(pinf)
        with pytest.raises(ValueError, match="-inf"):
            ops.sample(torch.full((2, 5), float("-inf")), top_p=0.5)


def test_cpp_opcheck():
    if "cpp" not in live_cpu_backends():
        pytest.skip("rlhf_fast._C not built")
    logits = torch.randn(5, 77)
    u = torch.rand(5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.rlhf_fast.sample.default, (logits, u, 0.8, 10, 0.9, 0.05),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample(x, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample(x, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(x, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample(x, top_k=-1)
    with pytest.raises(ValueError, match="min_p"):
        ops.sample(x, min_p=1.5)
    with pytest.raises(ValueError, match="min_p"):
        ops.sample(x, min_p=-0.1)
    with pytest.raises(ValueError, match="logits"):
        ops.sample(torch.randn(10))
    with pytest.raises(TypeError, match="logits"):
        ops.sample(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="generator"):
        ops.sample(x, generator=1)


def test_cpp_is_the_automatic_cpu_backend():
    if "cpp" not in live_cpu_backends():
        pytest.skip("rlhf_fast._C not built")
    assert _dispatch.select("sample", torch.device("cpu"))[0] == "cpp"


@pytest.mark.parametrize("backend", live_cpu_backends())
@pytest.mark.parametrize("filt", [dict(temperature=1.0), dict(temperature=0.7, top_k=10, top_p=0.9, min_p=0.02)])
def test_sample_with_uniforms_equals_one_row_calls_with_their_generators(backend, filt):
    from rlhf_fast.ops.sampling import sample_with_uniforms

    logits = torch.randn(7, 301, generator=torch.Generator().manual_seed(11))
    seeds = [3, 1, 4, 1, 5, 9, 2]
    with ops.use_backend(backend):
        one = [ops.sample(logits[i:i + 1], generator=torch.Generator().manual_seed(s), **filt)
               for i, s in enumerate(seeds)]
        u = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds])
        tok, lp = sample_with_uniforms(logits, u, **filt)
        # a row's draw does not depend on the other rows: the reversed batch gives the reversed result
        tok_r, lp_r = sample_with_uniforms(logits.flip(0), u.flip(0), **filt)
    assert torch.equal(tok, torch.cat([t for t, _ in one]))
    assert torch.equal(lp, torch.cat([v for _, v in one]))
    assert torch.equal(tok_r, tok.flip(0)) and torch.equal(lp_r, lp.flip(0))


def test_sample_with_uniforms_checks_its_uniforms():
    from rlhf_fast.ops.sampling import sample_with_uniforms

    x = torch.randn(3, 10)
    for bad in (torch.rand(2, dtype=torch.float64), torch.zeros(3, dtype=torch.long), torch.rand(3, 1),
                torch.tensor([0.1, 1.0, 0.2]), torch.tensor([0.1, -0.1, 0.2]), [0.1, 0.2, 0.3]):
        with pytest.raises(ValueError, match="uniforms"):
            sample_with_uniforms(x, bad)
    with pytest.raises(ValueError, match="top_p"):
        sample_with_uniforms(x, torch.rand(3), top_p=0.0)


def _count_sample_kernel(monkeypatch, backend: str) -> list:
    """Make ``backend`` the automatic choice for sample, as a stand-in kernel that records
    its calls (in the returned list) and returns zeros."""
    calls = []

    def kernel(logits, **kw):
        calls.append(backend)
        return torch.zeros(logits.shape[0], dtype=torch.long), torch.zeros(logits.shape[0])

    real_select = _dispatch.select
    monkeypatch.setattr(_dispatch, "select",
                        lambda op, device: (backend, kernel) if op == "sample" else real_select(op, device))
    return calls


def test_automatic_triton_choice_sends_filtered_draws_to_the_reference(monkeypatch):
    """Where the automatic choice is Triton (a GPU without the CUDA kernels), top-k / top-p
    draws run the sort-based reference (measured faster); plain temperature sampling, min-p
    and greedy stay on the kernel, and a forced Triton backend always runs it."""
    calls = _count_sample_kernel(monkeypatch, "triton")
    logits = torch.randn(3, 50)
    cases = [(dict(top_p=0.9), "reference"), (dict(top_k=5), "reference"), (dict(min_p=0.1), "triton"),
             (dict(top_k=50), "triton"), (dict(), "triton"), (dict(temperature=0.0, top_p=0.5), "triton")]
    for kw, want in cases:
        calls.clear()
        tok, logp = ops.sample(logits, generator=torch.Generator().manual_seed(0), **kw)
        assert calls == ([want] if want == "triton" else []), kw
        if want == "reference":  # the reference's own draw for the same generator
            ref = reference.sample(logits, generator=torch.Generator().manual_seed(0), **kw)
            assert torch.equal(tok, ref[0]) and torch.equal(logp, ref[1])
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    calls.clear()
    ops.sample(logits, top_p=0.9)
    assert calls == ["triton"]


def test_automatic_cuda_choice_sends_few_long_filtered_rows_to_the_reference(monkeypatch):
    """Where the automatic choice is the CUDA kernel, top-k / top-p draws of at most 8 rows
    of a vocabulary of at least 65536 run the sort-based reference (measured faster there);
    more rows, a shorter vocabulary, plain temperature sampling and a forced cuda backend run
    the kernel."""
    calls = _count_sample_kernel(monkeypatch, "cuda")
    cases = [((8, 65536), dict(top_p=0.9), "reference"), ((1, 65536), dict(top_k=50, top_p=0.9), "reference"),
             ((9, 65536), dict(top_p=0.9), "cuda"), ((8, 65535), dict(top_p=0.9), "cuda"),
             ((1, 65536), dict(), "cuda"), ((1, 65536), dict(min_p=0.1), "cuda"),
             ((1, 65536), dict(temperature=0.0, top_k=5), "cuda")]
    for shape, kw, want in cases:
        logits = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        calls.clear()
        tok, logp = ops.sample(logits, generator=torch.Generator().manual_seed(0), **kw)
        assert calls == ([want] if want == "cuda" else []), (shape, kw)
        if want == "reference":
            ref = reference.sample(logits, generator=torch.Generator().manual_seed(0), **kw)
            assert torch.equal(tok, ref[0]) and torch.equal(logp, ref[1])
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda")
    calls.clear()
    ops.sample(torch.randn(1, 65536), top_p=0.9)
    assert calls == ["cuda"]


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_tiny_top_p_keeps_the_most_likely_token(backend):
    # top_p=1e-300 rounds to 0 against float32 probabilities: the reference kept nothing and
    # returned NaN log-probs (cpp: the argmax, logp 0)
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    with ops.use_backend(backend):
        tok, logp = ops.sample(logits, top_p=1e-300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tok, logits.argmax(-1)) and torch.equal(logp, torch.zeros(4))


@pytest.mark.parametrize("backend", live_cpu_backends())
def test_logits_requiring_grad_and_huge_int_temperature(backend):
    # the reference returned a logp attached to the graph (cpp detached); an int temperature
    # beyond int64 overflowed in the reference only
    logits = torch.randn(3, 6, requires_grad=True)
    with ops.use_backend(backend):
        _, logp = ops.sample(logits, top_k=2, generator=torch.Generator().manual_seed(0))
        tok, _ = ops.sample(logits, temperature=10 ** 30, generator=torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match="temperature"):
            ops.sample(logits, temperature=10 ** 400)
    assert not logp.requires_grad and tok.shape == (3,)
