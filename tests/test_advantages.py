"""gae, discounted_returns, group_advantages, masked_mean, masked_whiten: every live CPU
backend against reference.py, and against plain Python loops written here (an oracle
independent of reference.py) on hypothesis-generated rows."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast import ops
from rlhf_fast.ops import _native, reference

from .conftest import live_cpu_backends

BACKENDS = live_cpu_backends()
needs_native = pytest.mark.skipif(not _native.has_native(), reason="rlhf_fast._C not built")


def _masks(B, T, g):
    """Right padding, left padding, holes, a fully masked row and a full row, cycled over B."""
    m = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        k = b % 5
        if k == 0:  # right padding
            m[b, : max(1, T - b - 1)] = True
        elif k == 1:  # left padding
            m[b, T // 2 :] = True
        elif k == 2:  # holes (multi-turn)
            m[b] = torch.rand(T, generator=g) < 0.6
        elif k == 3:  # fully masked row
            pass
        else:
            m[b] = True
    return m


SHAPES = [(1, 1), (5, 1), (5, 37), (7, 6)]


# ----------------------------------------------------------------- against reference.py


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gae_and_returns_match_reference(backend, shape, dtype):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    m = _masks(*shape, g)
    for mask in (m, m.to(torch.float32), m.to(torch.int64)):
        with ops.use_backend(backend):
            adv, ret = ops.gae(r, v, mask, gamma=0.99, lam=0.9)
            dr = ops.discounted_returns(r, mask, gamma=0.97)
        ea, er = reference.gae(r, v, m, gamma=0.99, lam=0.9)
        ed = reference.discounted_returns(r, m, gamma=0.97)
        want = reference.out_dtype(dtype)
        assert adv.dtype == ret.dtype == dr.dtype == want
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adv, ea, **tol)
        torch.testing.assert_close(ret, er, **tol)
        torch.testing.assert_close(dr, ed, **tol)
        assert (adv[~m] == 0).all() and (ret[~m] == 0).all() and (dr[~m] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_mixed_dtypes(backend):
    g = torch.Generator().manual_seed(2)
    r = torch.randn(3, 9, generator=g).to(torch.bfloat16)
    v = torch.randn(3, 9, generator=g)
    m = _masks(3, 9, g)
    with ops.use_backend(backend):
        adv, ret = ops.gae(r, v, m)
    ea, er = reference.gae(r, v, m)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, ea)
    torch.testing.assert_close(ret, er)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["grpo", "rloo", "dr_grpo"])
@pytest.mark.parametrize("group_size", [1, 2, 5])
@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_advantages_match_reference(backend, kind, group_size, normalize_std, dtype):
    if kind == "rloo" and group_size == 1:
        pytest.skip("rloo needs groups of two")
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(4 * group_size, generator=g) * 3 + 1).to(dtype)
    s[:group_size] = s[0]  # one constant group: std 0, eps keeps it finite
    with ops.use_backend(backend):
        out = ops.group_advantages(s, group_size, kind=kind, normalize_std=normalize_std, eps=1e-6)
    exp = reference.group_advantages(s, group_size, kind=kind, normalize_std=normalize_std, eps=1e-6)
    assert out.dtype == reference.out_dtype(dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, exp, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_stats_match_reference(backend, shape, dtype, shift_mean):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    m = torch.rand(shape, generator=g) < 0.7
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for mask in (m, m.to(torch.uint8), torch.zeros_like(m)):
        with ops.use_backend(backend):
            mean = ops.masked_mean(x, mask)
            wh = ops.masked_whiten(x, mask, shift_mean=shift_mean)
        assert mean.shape == () and mean.dtype == reference.out_dtype(dtype)
        torch.testing.assert_close(mean, reference.masked_mean(x, mask), **tol)
        torch.testing.assert_close(wh, reference.masked_whiten(x, mask, shift_mean=shift_mean), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mean_gradient(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(4, 7, generator=g) < 0.5
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a: ops.masked_mean(a, m), (x,))
        (ga,) = torch.autograd.grad(ops.masked_mean(x, m), x)
    (gb,) = torch.autograd.grad(reference.masked_mean(x, m), x)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_advantage_ops_keep_the_graph_when_inputs_require_grad(backend):
    r = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, dtype=torch.float64)
    m = torch.ones(2, 5, dtype=torch.bool)
    with ops.use_backend(backend):
        adv, _ = ops.gae(r, v, m)
    (gr,) = torch.autograd.grad(adv.sum(), r)
    assert torch.isfinite(gr).all()


# ----------------------------------------------------------------- independent oracle


def _oracle_gae(r, v, m, gamma, lam):
    """Per row, over the unmasked tokens only, as if the masked ones were absent."""
    B, T = len(r), len(r[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if m[b][t]]
        next_value, last = 0.0, 0.0
        for t in reversed(idx):
            delta = r[b][t] + gamma * next_value - v[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
            next_value = v[b][t]
    ret = [[adv[b][t] + v[b][t] if m[b][t] else 0.0 for t in range(T)] for b in range(B)]
    return adv, ret


def _oracle_returns(r, m, gamma):
    out = []
    for rb, mb in zip(r, m):
        row = [0.0] * len(rb)
        g = 0.0
        for t in reversed([t for t in range(len(rb)) if mb[t]]):
            g = rb[t] + gamma * g
            row[t] = g
        out.append(row)
    return out


def _oracle_group(s, G, kind, normalize_std, eps):
    out = []
    for i in range(0, len(s), G):
        grp = s[i : i + G]
        mean = sum(grp) / G
        for x in grp:
            if kind == "rloo":
                out.append(x - (sum(grp) - x) / (G - 1))
            elif kind == "dr_grpo" or not normalize_std:
                out.append(x - mean)
            elif G == 1:
                out.append(0.0)
            else:
                std = math.sqrt(sum((y - mean) ** 2 for y in grp) / (G - 1))
                out.append((x - mean) / (std + eps))
    return out


floats = st.floats(-10, 10, allow_nan=False, width=32)
discount = st.floats(0, 1)


@st.composite
def rows(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 10))
    r = draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B))
    v = draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B))
    m = draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B))
    return r, v, m


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=50, deadline=None)
@given(data=rows(), gamma=discount, lam=discount)
def test_gae_property(backend, data, gamma, lam):
    r, v, m = data
    rt, vt, mt = (torch.tensor(r, dtype=torch.float64), torch.tensor(v, dtype=torch.float64),
                  torch.tensor(m, dtype=torch.bool))
    with ops.use_backend(backend):
        adv, ret = ops.gae(rt, vt, mt, gamma=gamma, lam=lam)
    ea, er = _oracle_gae(r, v, m, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ea, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ret, torch.tensor(er, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=50, deadline=None)
@given(data=rows(), gamma=discount)
def test_discounted_returns_property(backend, data, gamma):
    r, _, m = data
    with ops.use_backend(backend):
        out = ops.discounted_returns(torch.tensor(r, dtype=torch.float64), torch.tensor(m), gamma=gamma)
    torch.testing.assert_close(out, torch.tensor(_oracle_returns(r, m, gamma), dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=50, deadline=None)
@given(G=st.integers(1, 6), n_groups=st.integers(1, 4), kind=st.sampled_from(["grpo", "rloo", "dr_grpo"]),
       normalize_std=st.booleans(), data=st.data())
def test_group_advantages_property(backend, G, n_groups, kind, normalize_std, data):
    if kind == "rloo" and G == 1:
        G = 2
    s = data.draw(st.lists(floats, min_size=G * n_groups, max_size=G * n_groups))
    with ops.use_backend(backend):
        out = ops.group_advantages(torch.tensor(s, dtype=torch.float64), G, kind=kind, normalize_std=normalize_std,
                                   eps=1e-6)
    exp = torch.tensor(_oracle_group(s, G, kind, normalize_std, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(out, exp, rtol=1e-7, atol=1e-7)


def test_gae_padding_is_invisible():
    """A row's advantages do not depend on where its tokens sit among masked positions."""
    g = torch.Generator().manual_seed(6)
    r = torch.randn(1, 5, generator=g, dtype=torch.float64)
    v = torch.randn(1, 5, generator=g, dtype=torch.float64)
    for backend in BACKENDS:
        with ops.use_backend(backend):
            a0, _ = ops.gae(r, v, torch.ones(1, 5, dtype=torch.bool))
            # left padding + holes: scatter the same 5 tokens into 11 positions
            pos = torch.tensor([1, 2, 5, 8, 10])
            R, V = torch.randn(1, 11, dtype=torch.float64) * 100, torch.randn(1, 11, dtype=torch.float64) * 100
            R[0, pos], V[0, pos] = r[0], v[0]
            M = torch.zeros(1, 11, dtype=torch.bool)
            M[0, pos] = True
            a1, _ = ops.gae(R, V, M)
        torch.testing.assert_close(a1[0, pos], a0[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- native op checks


@needs_native
def test_opcheck_native_advantage_ops():
    g = torch.Generator().manual_seed(7)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    m = torch.rand(3, 6, generator=g) < 0.6
    x = torch.randn(3, 6, generator=g, requires_grad=True)
    opsn = torch.ops.rlhf_fast
    torch.library.opcheck(opsn.gae, (r, v, m, 0.99, 0.95))
    torch.library.opcheck(opsn.discounted_returns, (r, m, 0.9))
    torch.library.opcheck(opsn.group_advantages, (torch.randn(6, generator=g), 3, "grpo", True, 1e-6))
    torch.library.opcheck(opsn.masked_mean, (x, m))
    torch.library.opcheck(opsn.masked_whiten, (r, m, False, 1e-8))


@needs_native
def test_gae_under_torch_compile():
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    m = torch.rand(3, 6) < 0.6

    def f(r, v, m):
        adv, ret = ops.gae(r, v, m, gamma=0.9, lam=0.8)
        return ops.masked_whiten(adv, m), ret

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(r, v, m)
    ea, er = reference.gae(r, v, m, gamma=0.9, lam=0.8)
    torch.testing.assert_close(out[0], reference.masked_whiten(ea, m))
    torch.testing.assert_close(out[1], er)


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    r, v, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="group_size"):
            ops.group_advantages(torch.zeros(6), 4)
        with pytest.raises(ValueError, match="kind"):
            ops.group_advantages(torch.zeros(6), 3, kind="ppo")
        with pytest.raises(ValueError, match="mask"):
            ops.gae(r, v, torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask"):
            ops.masked_whiten(r, torch.ones(3, dtype=torch.bool))
        with pytest.raises(ValueError, match="gamma"):
            ops.gae(r, v, m, gamma=1.5)
        with pytest.raises(ValueError, match="gamma"):
            ops.discounted_returns(r, m, gamma=-0.1)
        with pytest.raises(ValueError, match="lam"):
            ops.gae(r, v, m, lam=2.0)
        with pytest.raises(ValueError, match="values"):
            ops.gae(r, torch.zeros(2, 4), m)
        with pytest.raises(TypeError, match="rewards"):
            ops.discounted_returns(torch.zeros(2, 3, dtype=torch.long), m)


@needs_native
def test_native_ops_validate_too():
    """The C++ kernels check their own arguments, for callers of torch.ops.rlhf_fast directly."""
    opsn = torch.ops.rlhf_fast
    with pytest.raises(ValueError, match="group_size"):
        opsn.group_advantages(torch.zeros(6), 4, "grpo", True, 1e-6)
    with pytest.raises(ValueError, match="kind"):
        opsn.group_advantages(torch.zeros(6), 3, "x", True, 1e-6)
    with pytest.raises(ValueError, match="gamma"):
        opsn.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.5, 0.9)
    with pytest.raises(ValueError, match="mask"):
        opsn.discounted_returns(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool), 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_stats_ignore_padding_values(backend):
    # the reference multiplied by the mask: inf/NaN padding gave NaN (masked_whiten's masked-out
    # outputs too, documented as 0); cpp skips masked-out entries
    x = torch.tensor([[1.0, 2.0, float("nan")], [1.0, float("inf"), 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    with ops.use_backend(backend):
        mean = ops.masked_mean(x, m)
        w = ops.masked_whiten(x, m)
        xg = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(ops.masked_mean(xg, m.float()), xg)
    assert mean.item() == pytest.approx(4 / 3)
    assert torch.isfinite(w).all() and (w[~m] == 0).all()
    assert torch.equal(g, m.float() / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mean_bad_dim_and_group(backend):
    x, m = torch.randn(2, 3), torch.ones(2, 3)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="dim"):
            ops.masked_mean(x, m, 5)
        with pytest.raises(TypeError, match="dim"):
            ops.masked_mean(x, m, "a")
        with pytest.raises(TypeError, match="group"):
            ops.masked_mean(x, m, group="x")
        with pytest.raises(TypeError, match="shift_mean"):
            ops.masked_whiten(x, m, shift_mean="no")
        with pytest.raises(ValueError, match="eps"):
            ops.masked_whiten(x, m, eps=10 ** 400)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [10 ** 30, 2 ** 63, 2 ** 40])
def test_group_advantages_empty_with_huge_group(backend, group_size):
    # B = 0: any group size divides it; 2**63 and beyond failed inside reshape / the op schema
    with ops.use_backend(backend):
        if group_size > 2 ** 63 - 1:
            with pytest.raises(ValueError, match="group_size"):
                ops.group_advantages(torch.zeros(0), group_size)
        else:
            out = ops.group_advantages(torch.zeros(0), group_size)
            assert out.shape == (0,) and out.dtype == torch.float32
        with pytest.raises(TypeError, match="normalize_std"):
            ops.group_advantages(torch.zeros(4), 2, normalize_std="no")
        with pytest.raises(ValueError, match="eps"):
            ops.group_advantages(torch.zeros(4), 2, eps=10 ** 400)


def test_a_forced_backend_that_cannot_run_on_the_device_says_so():
    # forcing `triton` (or `cuda`) with CPU tensors outside the interpreter takes the automatic
    # choice: a benchmark must not time `cpp` under another name without a word
    import warnings

    from rlhf_fast.ops import _dispatch

    if _dispatch._runs_on("triton", torch.device("cpu")):
        pytest.skip("the Triton interpreter runs CPU tensors")
    _dispatch._warn_not_on_device.cache_clear()
    r = torch.zeros(2, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with ops.use_backend("triton"):
            adv, _ = ops.gae(r, r, torch.ones(2, 3, dtype=torch.bool))
    assert any("does not run on cpu tensors" in str(x.message) for x in w)
    assert adv.shape == (2, 3)
