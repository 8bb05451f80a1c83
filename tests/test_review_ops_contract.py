"""Review of the public op API contract (DESIGN.md, "Public op API") on the CPU backends.

Some tests pin bugs found in the review (second derivatives through the native ops, NaN
logits, temperature edges, tensor coefficients' dtype, numpy integers). The other tests add coverage the per-op test files lack: an oracle
written here in float64 (not reference.py) for the PPO losses and for the sampling
distribution, and results independent of the thread count and of inference mode.
"""

import math
import warnings

import pytest
import torch

import rlhf_fast.ops as ops

from .conftest import live_cpu_backends

BACKENDS = live_cpu_backends()
NATIVE = [b for b in BACKENDS if b != "torch"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ bug: second derivatives


def _hvp(f, z, backend):
    """(∇²(f(z) + ½|z|²))·v for a fixed random v; f's own term is what is being checked."""
    z = z.detach().clone().requires_grad_(True)
    v = torch.randn(z.shape, dtype=z.dtype, generator=_gen(9))
    with ops.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "autograd kernel was not registered" is the symptom
        y = f(z) + 0.5 * (z * z).sum()
        (g,) = torch.autograd.grad(y, z, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), z)
    return h


_A = torch.randn(2, 3, dtype=torch.float64, generator=_gen(1))
_SECOND_ORDER = {
    "token_logprobs": (lambda z: ops.token_logprobs(z, torch.tensor([0, 1, 2])).sum(),
                       torch.randn(3, 5, dtype=torch.float64, generator=_gen(2))),
    "token_logprobs_entropy": (
        lambda z: ops.token_logprobs(z, torch.tensor([0, 1, 2]), return_entropy=True)[1].sum(),
        torch.randn(3, 5, dtype=torch.float64, generator=_gen(3))),
    "kl_penalty_k3": (lambda z: ops.kl_penalty(z, torch.zeros(6, dtype=torch.float64), "k3").sum(),
                      torch.randn(6, dtype=torch.float64, generator=_gen(4))),
    "ppo_policy_loss": (lambda z: ops.ppo_policy_loss(z, torch.full((2, 3), 0.1, dtype=torch.float64), _A,
                                                      torch.ones(2, 3))[0],
                        0.1 * torch.randn(2, 3, dtype=torch.float64, generator=_gen(5))),
    "ppo_value_loss": (lambda z: ops.ppo_value_loss(z, torch.zeros(2, 3, dtype=torch.float64),
                                                    torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3),
                                                    clip=None)[0],
                       torch.randn(2, 3, dtype=torch.float64, generator=_gen(6))),
}


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("op", sorted(_SECOND_ORDER))
def test_double_backward_is_exact_or_refused(op, backend):
    f, z = _SECOND_ORDER[op]
    expected = _hvp(f, z, "torch")
    try:
        got = _hvp(f, z, backend)
    except (RuntimeError, NotImplementedError):
        return  # refusing a second derivative is fine; a wrong one is not
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ bug: NaN logits skipped


def _nan_block_logits():
    # the first 2048 logits (one block of the C++ online log-sum-exp) are NaN, the rest finite
    x = torch.randn(2, 2048 + 16, generator=_gen(7))
    x[:, :2048] = float("nan")
    return x


@pytest.mark.parametrize("backend", NATIVE)
def test_token_logprobs_nan_logits_give_nan(backend):
    x = _nan_block_logits()
    with ops.use_backend(backend):
        logp, ent = ops.token_logprobs(x, torch.tensor([2050, 2060]), return_entropy=True)
    with ops.use_backend("torch"):
        rl, re = ops.token_logprobs(x, torch.tensor([2050, 2060]), return_entropy=True)
    assert rl.isnan().all() and re.isnan().all()  # the reference's (correct) answer
    assert logp.isnan().all() and ent.isnan().all(), (logp, ent)


@pytest.mark.parametrize("backend", NATIVE)
def test_fused_linear_logprobs_nan_logits_give_nan(backend):
    V, H = 2048 + 16, 4
    weight = torch.randn(V, H, generator=_gen(8))
    weight[:2048] = float("nan")  # a diverged LM head: the logits of these columns are NaN
    hidden = torch.randn(3, H, generator=_gen(9))
    with ops.use_backend(backend):
        logp = ops.fused_linear_logprobs(hidden, weight, torch.tensor([2050, 2051, 2060]))
    assert logp.isnan().all(), logp


# ------------------------------------------------------------------ bug: temperature edges

_X = torch.tensor([[1.0, 3.0, 2.0, -1.0]])  # argmax 1, least likely 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_tiny_temperature_is_greedy_or_refused(backend):
    with ops.use_backend(backend):
        try:
            tok, logp = ops.sample(_X, temperature=1e-40, generator=_gen(0))
        except ValueError as e:
            assert "temperature" in str(e), str(e)
            return
    assert tok.tolist() == [1] and torch.isfinite(logp).all(), (tok, logp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_tiny_temperature_is_finite_or_refused(backend):
    with ops.use_backend(backend):
        try:
            logp = ops.token_logprobs(_X, torch.tensor([1]), temperature=1e-40)
        except ValueError as e:
            assert "temperature" in str(e), str(e)
            return
    torch.testing.assert_close(logp, torch.zeros(1))


_XINF = torch.tensor([[1.0, float("-inf"), 2.0]])  # a vocabulary-masked (-inf) token


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "sample"])
def test_infinite_temperature_is_refused_or_uniform(op, backend):
    with ops.use_backend(backend):
        try:
            if op == "token_logprobs":
                logp = ops.token_logprobs(_XINF, torch.tensor([0]), temperature=float("inf"))
            else:
                tok, logp = ops.sample(_XINF, temperature=float("inf"), generator=_gen(0))
                assert tok.item() in (0, 2)
        except ValueError as e:
            assert "temperature" in str(e), str(e)
            return
    # the T → inf limit: uniform over the two finite logits
    torch.testing.assert_close(logp, torch.full((1,), -math.log(2.0)))


# ------------------------------------------------------------------ bug: coefficient dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["kl_coef", "entropy_coef"])
def test_tensor_coefficient_keeps_the_float32_loss(name, backend):
    g = _gen(10)
    B, T, H, V = 2, 3, 4, 7
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    old, adv, ref = torch.randn(B, T, generator=g) - 2, torch.randn(B, T, generator=g), torch.randn(B, T) - 2
    coef = {name: torch.tensor([0.1], dtype=torch.float64)}
    with ops.use_backend(backend):
        loss, _ = ops.fused_linear_policy_loss(hidden, weight, labels, old, adv, torch.ones(B, T),
                                               ref_logp=ref, **coef)
    assert loss.dtype == torch.float32 and loss.shape == (), (loss.dtype, loss.shape)


# ------------------------------------------------------------------ coverage: PPO losses vs a float64 oracle


def _agg(tok, m, agg):
    tok = torch.where(m, tok, torch.zeros((), dtype=tok.dtype))
    B, T = tok.shape
    if agg == "token-mean":
        return tok.sum() / max(int(m.sum()), 1)
    if agg == "seq-mean-token-mean":
        return (tok.sum(1) / m.sum(1).clamp(min=1)).sum() / max(B, 1)
    if agg == "seq-mean-token-sum":
        return tok.sum() / max(B, 1)
    return tok.sum() / max(B * T, 1)


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.int32, torch.float32, torch.uint8])
def test_ppo_losses_match_a_float64_oracle(backend, mask_dtype):
    """DESIGN's per-token formulas and the four aggregations, line by line, with 0/1 masks of
    other dtypes than bool (holes, an all-masked row, T = 1 and long rows)."""
    g = _gen(12)
    for B, T in [(1, 1), (3, 1), (4, 7), (2, 1500)]:
        lp = 0.5 * torch.randn(B, T, generator=g)
        old = lp + 0.3 * torch.randn(B, T, generator=g)
        A = torch.randn(B, T, generator=g)
        m = torch.rand(B, T, generator=g) > 0.3
        if B > 1:
            m[-1] = False
        r = torch.exp((lp.double() - old.double()).clamp(-20, 20))
        Ad = A.double()
        for agg in AGGS:
            for cl, ch, dc in [(0.2, None, None), (0.1, 0.3, 3.0)]:
                hi = cl if ch is None else ch
                tok = torch.maximum(-Ad * r, -Ad * r.clamp(1 - cl, 1 + hi))
                if dc is not None:
                    tok = torch.where(Ad < 0, torch.minimum(tok, -Ad * dc), tok)
                with ops.use_backend(backend):
                    loss, _ = ops.ppo_policy_loss(lp, old, A, m.to(mask_dtype), clip_low=cl, clip_high=ch,
                                                  dual_clip=dc, agg=agg)
                torch.testing.assert_close(loss.double(), _agg(tok, m, agg), rtol=1e-5, atol=1e-6)
            v, ov, R = lp, old, A
            vd, ovd, Rd = v.double(), ov.double(), R.double()
            for c in (0.2, None):
                err = (vd - Rd) ** 2
                clipped = (ovd + (vd - ovd).clamp(-c, c) - Rd) ** 2 if c is not None else err
                tok = 0.5 * torch.maximum(err, clipped)
                with ops.use_backend(backend):
                    loss, _ = ops.ppo_value_loss(v, ov, R, m.to(mask_dtype), clip=c, agg=agg)
                torch.testing.assert_close(loss.double(), _agg(tok, m, agg), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ coverage: sampling, exact distribution


def _processed(row, T, k, p, min_p):
    """DESIGN's filters in float64, written from the spec: temperature, top-k, top-p (smallest
    set of most likely tokens whose mass reaches p), min-p (p ≥ min_p·p_max), each renormalised."""
    q = torch.softmax(row.double() / T, -1)
    V = q.shape[0]

    def keep_only(q, keep):
        q = torch.where(keep, q, torch.zeros((), dtype=q.dtype))
        return q / q.sum()

    if 0 < k < V:
        order = torch.argsort(q, descending=True, stable=True)
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[:k]] = True
        q = keep_only(q, keep)
    if p < 1.0:
        order = torch.argsort(q, descending=True, stable=True)
        cum, keep = 0.0, torch.zeros(V, dtype=torch.bool)
        for i in order.tolist():
            keep[i] = True
            cum += q[i].item()
            if cum >= p:
                break
        q = keep_only(q, keep)
    if min_p > 0:
        q = keep_only(q, q >= min_p * q.max())
    return q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,k,p,min_p", [(0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0),
                                         (0.8, 6, 0.7, 0.1), (1.0, 0, 1.0, 0.2)])
def test_sampling_chi_square_against_the_exact_distribution(backend, T, k, p, min_p):
    """2e5 draws from one row: no draw outside the support, a chi-square within 5 standard
    deviations of its degrees of freedom, and the returned logp equal to the exact processed one."""
    V, n = 12, 200_000
    row = 1.5 * torch.randn(V, generator=_gen(0))
    q = _processed(row, T, k, p, min_p)
    with ops.use_backend(backend):
        tok, logp = ops.sample(row.expand(n, V), temperature=T, top_k=k, top_p=p, min_p=min_p,
                               generator=_gen(123))
    counts = torch.bincount(tok, minlength=V).double()
    supp = q > 0
    assert counts[~supp].sum() == 0
    dof = int(supp.sum()) - 1
    chi2 = ((counts - n * q) ** 2 / (n * q))[supp].sum().item()
    assert chi2 < dof + 5 * math.sqrt(2 * max(dof, 1)), (chi2, dof)
    torch.testing.assert_close(logp.double(), q.log()[tok], rtol=0, atol=2e-6)


# ------------------------------------------------------------------ coverage: threads and inference mode


def _all_ops():
    g = _gen(5)
    B, T = 16, 3000
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.2
    lp = 0.1 * torch.randn(B, T, generator=g)
    old, A = lp + 0.1 * torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    x = torch.randn(64, 5000, generator=g)
    return [*ops.gae(r, v, m, gamma=0.99, lam=0.95), ops.discounted_returns(r, m, gamma=0.99),
            ops.masked_mean(r, m), ops.masked_whiten(r, m),
            ops.ppo_policy_loss(lp, old, A, m, agg="seq-mean-token-mean")[0],
            ops.ppo_value_loss(v, r, A, m)[0],
            ops.group_advantages(r.reshape(-1), 8), ops.kl_penalty(lp, old, "k3"),
            *ops.token_logprobs(x, torch.arange(64), return_entropy=True),
            *ops.sample(x, top_p=0.9, top_k=100, generator=_gen(1))]


@pytest.mark.parametrize("backend", NATIVE)
def test_results_do_not_depend_on_threads_or_inference_mode(backend):
    n = torch.get_num_threads()
    try:
        with ops.use_backend(backend):
            torch.set_num_threads(1)
            one = _all_ops()
            torch.set_num_threads(2)
            two = _all_ops()
            with torch.inference_mode():
                inf = _all_ops()
    finally:
        torch.set_num_threads(n)
    for a, b, c in zip(one, two, inf):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------ bug: numpy integers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["group_advantages", "sample", "fused_linear_logprobs"])
def test_numpy_integer_arguments_are_ints(op, backend):
    np = pytest.importorskip("numpy")
    g = _gen(13)
    with ops.use_backend(backend):
        if op == "group_advantages":
            s = torch.randn(6, generator=g)
            torch.testing.assert_close(ops.group_advantages(s, np.int64(3)), ops.group_advantages(s, 3))
        elif op == "sample":
            x = torch.randn(2, 9, generator=g)
            a = ops.sample(x, top_k=np.int64(2), generator=_gen(1))
            b = ops.sample(x, top_k=2, generator=_gen(1))
            assert torch.equal(a[0], b[0])
        else:
            h, w = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
            y = torch.tensor([0, 4, 2])
            torch.testing.assert_close(ops.fused_linear_logprobs(h, w, y, chunk_size=np.int64(1)),
                                       ops.fused_linear_logprobs(h, w, y, chunk_size=1))
