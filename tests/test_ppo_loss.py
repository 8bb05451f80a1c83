"""ppo_policy_loss and ppo_value_loss: every live CPU backend against reference.py, forward,
statistics and gradients; gradcheck; normalizer and micro-batch invariance; compile."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import _native, reference

from .conftest import live_cpu_backends

BACKENDS = live_cpu_backends()
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CLIPS = [  # (clip_low, clip_high, dual_clip)
    (0.2, None, None),
    (0.2, 0.28, None),
    (0.2, None, 3.0),
    (0.1, 0.3, 2.0),
]
needs_native = pytest.mark.skipif(not _native.has_native(), reason="rlhf_fast._C not built")


def _mask(B, T, g):
    m = torch.rand(B, T, generator=g) < 0.7
    m[0, : T // 2] = False  # left padding
    if B > 2:
        m[2] = False  # a fully masked row
    if B > 3:
        m[3, -1:] = False  # right padding
    return m


def _policy_inputs(B, T, dtype, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    # log-ratios of ~N(0, spread): a good share of tokens on each side of the clip range
    logp = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    return logp.requires_grad_(), old.to(dtype), adv, _mask(B, T, g)


def _value_inputs(B, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = (old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    R = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    return v.requires_grad_(), old.to(dtype), R, _mask(B, T, g)


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _check_stats(got, want, dtype):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == () and got[k].dtype == want[k].dtype, k
        assert not got[k].requires_grad, k
        torch.testing.assert_close(got[k], want[k], **_tol(dtype), msg=k)


# ----------------------------------------------------------------- against reference.py


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clips", CLIPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (6, 7)])
def test_policy_loss_matches_reference(backend, agg, clips, dtype, shape):
    cl, ch, dc = clips
    logp, old, adv, m = _policy_inputs(*shape, dtype)
    kw = dict(clip_low=cl, clip_high=ch, dual_clip=dc, agg=agg)
    with ops.use_backend(backend):
        loss, stats = ops.ppo_policy_loss(logp, old, adv, m, **kw)
    eloss, estats = reference.ppo_policy_loss(logp, old, adv, m, **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, eloss, **_tol(dtype))
    _check_stats(stats, estats, dtype)
    (ga,) = torch.autograd.grad(loss, logp)
    (gb,) = torch.autograd.grad(eloss, logp)
    assert ga.dtype == logp.dtype
    # bf16 gradients: both round an fp32 value to bf16 once; allow one bf16 ulp
    gtol = dict(rtol=8e-3, atol=1e-6) if dtype == torch.bfloat16 else _tol(dtype)
    torch.testing.assert_close(ga, gb, **gtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, None, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37)])
def test_value_loss_matches_reference(backend, agg, clip, dtype, shape):
    v, old, R, m = _value_inputs(*shape, dtype)
    with ops.use_backend(backend):
        loss, stats = ops.ppo_value_loss(v, old, R, m, clip=clip, agg=agg)
    eloss, estats = reference.ppo_value_loss(v, old, R, m, clip=clip, agg=agg)
    torch.testing.assert_close(loss, eloss, **_tol(dtype))
    _check_stats(stats, estats, dtype)
    (ga,) = torch.autograd.grad(loss, v)
    (gb,) = torch.autograd.grad(eloss, v)
    gtol = dict(rtol=8e-3, atol=1e-6) if dtype == torch.bfloat16 else _tol(dtype)
    torch.testing.assert_close(ga, gb, **gtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_follow_reference(backend):
    logp, old, adv, m = _policy_inputs(4, 9, torch.bfloat16, seed=3)
    old32, adv64 = old.float() + 0.01, adv.double()
    with ops.use_backend(backend):
        loss, stats = ops.ppo_policy_loss(logp, old32, adv64, m.to(torch.float32))
    eloss, estats = reference.ppo_policy_loss(logp, old32, adv64, m)
    torch.testing.assert_close(loss, eloss)
    _check_stats(stats, estats, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_log_ratios(backend):
    """Log-ratios beyond ±20 are clamped: finite loss, and no gradient through the clamp."""
    logp = torch.tensor([[-1e4, 0.0, 1e4, 25.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -1.0, -2.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    with ops.use_backend(backend):
        loss, stats = ops.ppo_policy_loss(logp, old, adv, m, dual_clip=3.0)
    eloss, estats = reference.ppo_policy_loss(logp, old, adv, m, dual_clip=3.0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, eloss)
    _check_stats(stats, estats, torch.float32)
    (ga,) = torch.autograd.grad(loss, logp)
    (gb,) = torch.autograd.grad(eloss, logp)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_long_rows_and_closed_bounds(backend, agg, dtype):
    """Rows of 2500 tokens (the C++ kernels work in blocks of 1024: two boundaries and a partial
    block) with holes in the mask, and tokens exactly on the closed bounds, where the gradient
    still passes: log-ratio 0 is ratio 1 = 1 + clip_high when clip_high = 0 (the loss1/loss2 tie,
    half each, both nonzero), log-ratio ±20 on the clamp bound, and for the value loss
    v − old = clip (an err/err_clip tie)."""
    B, T = 3, 2500
    logp, old, adv, m = _policy_inputs(B, T, dtype, seed=21)
    logp = logp.detach()
    tie, hi, lo = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool), torch.zeros(
        B, T, dtype=torch.bool)
    tie[:, 1000:1100:3] = True  # across the first block boundary
    hi[:, 2040:2060:4] = True
    lo[:, 2041:2060:4] = True
    logp[tie] = old[tie]
    old[hi | lo] = 0.0
    logp[hi], logp[lo] = 20.0, -20.0
    adv[hi], adv[lo] = -adv[hi].abs(), adv[lo].abs()  # the signs for which the unclipped branch wins
    m[:, 1020:1030] = True  # the tokens around the boundary are in
    logp.requires_grad_()
    gtol = dict(rtol=8e-3, atol=1e-6) if dtype == torch.bfloat16 else _tol(dtype)
    for dual in (None, 3.0):
        kw = dict(clip_low=0.2, clip_high=0.0, dual_clip=dual, agg=agg)
        with ops.use_backend(backend):
            loss, stats = ops.ppo_policy_loss(logp, old, adv, m, **kw)
        eloss, estats = reference.ppo_policy_loss(logp, old, adv, m, **kw)
        torch.testing.assert_close(loss, eloss, **_tol(dtype))
        _check_stats(stats, estats, dtype)
        (ga,) = torch.autograd.grad(loss, logp)
        (gb,) = torch.autograd.grad(eloss, logp)
        torch.testing.assert_close(ga, gb, **gtol)
        # the bounds carry gradient (with the dual clip the +20 tokens are dual-clipped instead);
        # at -20 it is ~1e-13, below atol, so compared relatively
        on = (tie | lo | (hi if dual is None else tie)) & m
        assert (gb[on] != 0).all()
        torch.testing.assert_close(ga[on], gb[on], rtol=gtol["rtol"], atol=0)

    v, vold, R, _ = _value_inputs(B, T, dtype, seed=22)
    v = v.detach()
    vold[tie], v[tie] = 0.0, 0.25  # v − old = clip exactly
    v.requires_grad_()
    with ops.use_backend(backend):
        vloss, vstats = ops.ppo_value_loss(v, vold, R, m, clip=0.25, agg=agg)
    evloss, evstats = reference.ppo_value_loss(v, vold, R, m, clip=0.25, agg=agg)
    torch.testing.assert_close(vloss, evloss, **_tol(dtype))
    _check_stats(vstats, evstats, dtype)
    (ga,) = torch.autograd.grad(vloss, v)
    (gb,) = torch.autograd.grad(evloss, v)
    torch.testing.assert_close(ga, gb, **gtol)


# ----------------------------------------------------------------- gradcheck (fp64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clips", CLIPS)
def test_policy_gradcheck(backend, agg, clips):
    cl, ch, dc = clips
    logp, old, adv, m = _policy_inputs(4, 6, torch.float64, seed=11)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x: ops.ppo_policy_loss(x, old, adv, m, clip_low=cl, clip_high=ch, dual_clip=dc, agg=agg)[0],
            (logp,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_gradcheck(backend, agg, clip):
    v, old, R, m = _value_inputs(4, 6, torch.float64, seed=12)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: ops.ppo_value_loss(x, old, R, m, clip=clip, agg=agg)[0], (v,))


# ----------------------------------------------------------------- normalizer, micro-batches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_normalizer_as_tensor_or_number(backend, agg):
    logp, old, adv, m = _policy_inputs(5, 8, torch.float32, seed=4)
    for norm in (torch.tensor(13.0), torch.tensor([13.0], dtype=torch.float64), 13):
        with ops.use_backend(backend):
            loss, _ = ops.ppo_policy_loss(logp, old, adv, m, agg=agg, normalizer=norm)
            vloss, _ = ops.ppo_value_loss(logp, old, adv, m, agg=agg, normalizer=norm)
        torch.testing.assert_close(loss, reference.ppo_policy_loss(logp, old, adv, m, agg=agg, normalizer=13.0)[0])
        torch.testing.assert_close(vloss, reference.ppo_value_loss(logp, old, adv, m, agg=agg, normalizer=13.0)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_invariance(backend, agg):
    """8 rows as 4 micro-batches of 2 with the global normalizer: same loss and gradients."""
    logp, old, adv, m = _policy_inputs(8, 11, torch.float32, seed=5)
    v, vold, R, _ = _value_inputs(8, 11, torch.float32, seed=6)
    norm = m.sum().float() if agg == "token-mean" else torch.tensor(8.0)
    with ops.use_backend(backend):
        full, _ = ops.ppo_policy_loss(logp, old, adv, m, agg=agg, dual_clip=3.0)
        vfull, _ = ops.ppo_value_loss(v, vold, R, m, agg=agg)
        gfull, gvfull = torch.autograd.grad(full + vfull, (logp, v))
        parts, vparts = [], []
        for s in range(0, 8, 2):
            sl = slice(s, s + 2)
            parts.append(ops.ppo_policy_loss(logp[sl], old[sl], adv[sl], m[sl], agg=agg, dual_clip=3.0,
                                             normalizer=norm)[0])
            vparts.append(ops.ppo_value_loss(v[sl], vold[sl], R[sl], m[sl], agg=agg, normalizer=norm)[0])
        total, vtotal = sum(parts), sum(vparts)
        gsum, gvsum = torch.autograd.grad(total + vtotal, (logp, v))
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(vtotal, vfull)
    torch.testing.assert_close(gsum, gfull)
    torch.testing.assert_close(gvsum, gvfull)


# ----------------------------------------------------------------- torch.compile, opcheck


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_under_torch_compile(backend):
    logp, old, adv, m = _policy_inputs(3, 7, torch.float32, seed=7)

    def step(lp, old, adv, m, n):
        loss, stats = ops.ppo_policy_loss(lp, old, adv, m, clip_high=0.28, dual_clip=3.0, normalizer=n)
        vloss, _ = ops.ppo_value_loss(lp, old, adv, m, clip=0.2)
        return loss + 0.5 * vloss, stats["clip_frac"]

    n = m.sum().float()
    with ops.use_backend(backend):
        f = torch.compile(step, backend="aot_eager", fullgraph=True)
        out, clip_frac = f(logp, old, adv, m, n)
        (g,) = torch.autograd.grad(out, logp)
    eloss, estats = reference.ppo_policy_loss(logp, old, adv, m, clip_high=0.28, dual_clip=3.0, normalizer=n)
    eout = eloss + 0.5 * reference.ppo_value_loss(logp, old, adv, m, clip=0.2)[0]
    (eg,) = torch.autograd.grad(eout, logp)
    torch.testing.assert_close(out, eout)
    torch.testing.assert_close(clip_frac, estats["clip_frac"])
    torch.testing.assert_close(g, eg)


@needs_native
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_opcheck_native_loss_ops(agg):
    logp, old, adv, m = _policy_inputs(3, 5, torch.float32, seed=8)
    logp = logp.detach().requires_grad_()
    opsn = torch.ops.rlhf_fast
    n = torch.tensor(7.0)
    for norm in (None, n):
        torch.library.opcheck(opsn.ppo_policy_loss_fwd, (logp, old, adv, m, 0.2, 0.28, 3.0, agg, norm))
        torch.library.opcheck(opsn.ppo_policy_loss_fwd, (logp, old, adv, m, 0.2, 0.2, None, agg, norm))
        torch.library.opcheck(opsn.ppo_value_loss_fwd, (logp, old, adv, m, 0.2, agg, norm))
        torch.library.opcheck(opsn.ppo_value_loss_fwd, (logp, old, adv, m, None, agg, norm))
    g = torch.tensor(1.5)
    torch.library.opcheck(opsn.ppo_policy_loss_bwd, (g, logp.detach(), old, adv, m, 0.2, 0.2, None, agg, n))
    torch.library.opcheck(opsn.ppo_value_loss_bwd, (g, logp.detach(), old, adv, m, 0.2, agg, None))


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="agg"):
            ops.ppo_policy_loss(x, x, x, m, agg="sum")
        with pytest.raises(ValueError, match="agg"):
            ops.ppo_value_loss(x, x, x, m, agg="mean")
        with pytest.raises(ValueError, match="mask"):
            ops.ppo_policy_loss(x, x, x, torch.ones(3, 2, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask"):
            ops.ppo_value_loss(x, x, x, torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="dual_clip"):
            ops.ppo_policy_loss(x, x, x, m, dual_clip=0.5)
        with pytest.raises(ValueError, match="advantages"):
            ops.ppo_policy_loss(x, x, torch.zeros(2, 4), m)
        with pytest.raises(ValueError, match="normalizer"):
            ops.ppo_policy_loss(x, x, x, m, normalizer=torch.ones(2))
        with pytest.raises(TypeError, match="logp"):
            ops.ppo_policy_loss(x.long(), x, x, m)


@needs_native
def test_native_ops_validate_too():
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="agg"):
        torch.ops.rlhf_fast.ppo_policy_loss_fwd(x, x, x, m, 0.2, 0.2, None, "bad", None)
    with pytest.raises(ValueError, match="mask"):
        torch.ops.rlhf_fast.ppo_value_loss_fwd(x, x, x, m[:1], 0.2, "token-mean", None)


# ------------------------------------------------------------------ awkward inputs (probe findings)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_out_nan_inf_padding_never_leaks(backend):
    # -inf/NaN at padding (masked-out) positions: the reference used x * mask, so 0 * inf = NaN
    # poisoned the loss, its stats and the gradient; the cpp backend skipped them
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    nan, inf = float("nan"), float("inf")
    lp = torch.tensor([[-1.0, -2.0, -inf], [-1.0, nan, -inf]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -inf], [-1.0, 0.0, -inf]])
    adv = torch.tensor([[1.0, -1.0, inf], [1.0, nan, 0.0]])
    v = torch.tensor([[1.0, 2.0, nan], [1.0, inf, 0.0]], requires_grad=True)
    with ops.use_backend(backend):
        for agg in AGGS:
            loss, st = ops.ppo_policy_loss(lp, old, adv, m, agg=agg)
            (g,) = torch.autograd.grad(loss, lp)
            assert torch.isfinite(loss) and all(torch.isfinite(x) for x in st.values()), (agg, loss, st)
            assert torch.isfinite(g).all() and (g[~m] == 0).all()
            vloss, vst = ops.ppo_value_loss(v, torch.zeros(2, 3), torch.ones(2, 3), m, agg=agg)
            (gv,) = torch.autograd.grad(vloss, v)
            assert torch.isfinite(vloss) and torch.isfinite(vst["values_mean"]) and torch.isfinite(gv).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_batch_loss_is_zero(backend, agg, shape):
    # seq-mean aggregations divided by B = 0 (or B*T = 0): NaN on every backend
    lp = torch.zeros(shape, requires_grad=True)
    with ops.use_backend(backend):
        loss, st = ops.ppo_policy_loss(lp, torch.zeros(shape), torch.zeros(shape), torch.ones(shape), agg=agg)
        vloss, _ = ops.ppo_value_loss(lp, torch.zeros(shape), torch.zeros(shape), torch.ones(shape), agg=agg)
    assert loss.item() == 0.0 and vloss.item() == 0.0
    assert all(x.item() == 0.0 for x in st.values())
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_logp_and_values_are_differentiated(backend):
    # the reference used to give gradients to old_logp, advantages, old_values, returns and a
    # normalizer tensor; the native backends treat them as constants (documented: differentiable
    # in logp / values)
    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(3, 4, generator=g).requires_grad_() for _ in range(3))
    m = torch.ones(3, 4, dtype=torch.bool)
    norm = torch.tensor(4.0, requires_grad=True)
    with ops.use_backend(backend):
        loss, _ = ops.ppo_policy_loss(lp, old, adv, m, normalizer=norm)
        loss.backward()
        vloss, _ = ops.ppo_value_loss(lp, old, adv, m, normalizer=norm)
    assert lp.grad is not None and old.grad is None and adv.grad is None and norm.grad is None
    assert vloss.requires_grad
    torch.autograd.grad(vloss, lp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, match", [
    (dict(dual_clip=float("nan")), "dual_clip"),
    (dict(dual_clip=10 ** 400), "dual_clip"),
    (dict(clip_low=10 ** 400), "clip_low"),
    (dict(clip_high=10 ** 400), "clip_high"),
    (dict(normalizer=10 ** 400), "normalizer"),
    (dict(normalizer=float("inf")), "normalizer"),
    (dict(normalizer=torch.tensor(4.0, device="meta")), "normalizer"),
    (dict(normalizer=torch.tensor(4.0 + 0j)), "normalizer"),
])
def test_bad_scalars_are_named(backend, kwargs, match):
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with ops.use_backend(backend), pytest.raises((ValueError, TypeError), match=match):
        ops.ppo_policy_loss(x, x, x, m, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_huge_clip_is_named(backend):
    x = torch.zeros(2, 3)
    with ops.use_backend(backend), pytest.raises(ValueError, match="clip"):
        ops.ppo_value_loss(x, x, x, torch.ones(2, 3), clip=10 ** 400)
