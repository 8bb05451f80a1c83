"""fused_linear_logprobs and fused_linear_policy_loss on every live CPU backend against the
reference (and an fp64 oracle): forward, gradients to hidden/weight/bias, chunking,
torch.compile, opcheck, memory (one chunk of logits) and argument validation; ``return_top1``
(the label is its row's first argmax) against the logits' argmax, ties included, with the other
outputs and the gradients unchanged by it."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import reference

from .conftest import live_cpu_backends, timeline_memory

BACKENDS = live_cpu_backends()
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="rlhf_fast._C not built")


def _head(N, H, V, dtype, seed=0, bias=True, n_ignore=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if n_ignore and N > 1:
        labels[torch.randperm(N, generator=g)[:n_ignore]] = -100
    return hidden, weight, b, labels


def _run(backend, hidden, weight, bias, labels, grads, **kw):
    """Outputs and gradients (hidden, weight, bias) of sum(out_i · grads_i); ``backend=None``
    runs the reference in fp64 on the same values (the oracle)."""
    leaves = [t.detach().clone() for t in (hidden, weight, bias) if t is not None]
    if backend is None:
        leaves = [t.double() for t in leaves]
    leaves = [t.requires_grad_() for t in leaves]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    if backend is None:
        out = reference.fused_linear_logprobs(h, w, labels, bias=b, **kw)
    else:
        with ops.use_backend(backend):
            out = ops.fused_linear_logprobs(h, w, labels, bias=b, **kw)
    outs = out if kw.get("return_entropy") else (out,)
    loss = sum((o * gr.to(o.dtype)).sum() for o, gr in zip(outs, grads))
    gs = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(gs)


def _near(ours, ref, oracle, atol, what, rtol=0.0):
    """Error against the fp64 oracle at most twice the reference's own, plus atol (and rtol of
    the oracle, for low-precision outputs whose rounding differs element by element)."""
    err = ((ours.double() - oracle).abs() - rtol * oracle.abs()).max().item()
    base = (ref.double() - oracle).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} vs reference's {base:.3g} (atol {atol}, rtol {rtol})"


def _check(backend, hidden, weight, bias, labels, atol_out, atol_grad, **kw):
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(labels.shape, generator=g) for _ in range(2 if kw.get("return_entropy") else 1)]
    outs, gs = _run(backend, hidden, weight, bias, labels, grads, **kw)
    ref_outs, ref_gs = (outs, gs) if backend == "torch" else _run("torch", hidden, weight, bias, labels, grads, **kw)
    ora_outs, ora_gs = _run(None, hidden, weight, bias, labels, grads, **kw)
    for o, r, a, name in zip(outs, ref_outs, ora_outs, ("logp", "entropy")):
        assert o.shape == labels.shape and o.dtype == reference.out_dtype(hidden.dtype), name
        assert (o[labels == -100] == 0).all(), name
        _near(o, r, a, atol_out, name)
    for t, gt, r, a, name in zip((hidden, weight, bias), gs, ref_gs, ora_gs, ("hidden", "weight", "bias")):
        assert gt.dtype == t.dtype and gt.shape == t.shape, name
        assert torch.isfinite(gt).all(), name
        # the gradient scale grows with the rows summed into it (weight, bias: all N tokens)
        # bf16 gradients: the native kernels round dlogits to bf16 as the reference does, but
        # not always to the same neighbour, and weight/bias sum N of them: allow 2 bf16 ulps
        rtol = 2 * torch.finfo(gt.dtype).eps if gt.dtype in (torch.bfloat16, torch.float16) else 0.0
        _near(gt, r, a, atol_grad * (1 if name == "hidden" else labels.numel()), f"grad_{name}", rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [2, 37, 4099])
@pytest.mark.parametrize("chunk_size,bias", [(None, False), (3, True)])
@pytest.mark.parametrize("entropy,temperature", [(False, 1.0), (True, 0.7)])
def test_matches_reference(backend, dtype, V, chunk_size, bias, entropy, temperature):
    hidden, weight, b, labels = _head(7, 16, V, dtype, seed=V, bias=bias)
    _check(backend, hidden, weight, b, labels, 2e-5, 2e-5, temperature=temperature, return_entropy=entropy,
           chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [129920, 151936])
def test_large_vocab(backend, V):
    hidden, weight, b, labels = _head(3, 8, V, torch.float32, seed=V, n_ignore=0)
    _check(backend, hidden, weight, b, labels, 1e-4, 1e-5, temperature=0.7, return_entropy=True, chunk_size=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_through_bias(backend):
    # a bias of -inf masks tokens out; ±1e4 makes the distribution (nearly) one-hot
    hidden, weight, b, labels = _head(5, 8, 257, torch.float32, seed=2, n_ignore=0)
    b[::3] = float("-inf")
    b[1] = 1e4
    b[2] = -1e4
    labels[:] = torch.tensor([1, 4, 5, 7, 8])
    outs, gs = _run(backend, hidden, weight, b, labels, [torch.ones(5), torch.ones(5)], return_entropy=True)
    ora_outs, ora_gs = _run(None, hidden, weight, b.masked_fill(torch.isneginf(b), -1e30), labels,
                            [torch.ones(5), torch.ones(5)], return_entropy=True)
    for o, a in zip(outs + gs, ora_outs + ora_gs):
        a = a.masked_fill(a.abs() > 1e29, 0)  # the oracle's -1e30 stand-in carries no gradient either way
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck(backend, entropy, bias):
    hidden, weight, b, labels = _head(5, 4, 9, torch.float64, seed=3, bias=bias)
    args = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]

    def f(h, w, bb=None):
        return ops.fused_linear_logprobs(h, w, labels, bias=bb, temperature=0.7, return_entropy=entropy, chunk_size=2)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    hidden, weight, b, labels = _head(6, 8, 37, torch.float32, seed=4)

    def loss(h, w, bb, y):
        lp, ent = ops.fused_linear_logprobs(h, w, y, bias=bb, return_entropy=True, chunk_size=4)
        return lp.sum() + 0.1 * ent.sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    with ops.use_backend(backend):
        out = torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves, labels)
        out.backward()
    ref = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    lp, ent = reference.fused_linear_logprobs(ref[0], ref[1], labels, bias=ref[2], return_entropy=True)
    exp = lp.sum() + 0.1 * ent.sum()
    exp.backward()
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    for a, r in zip(leaves, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(dtype, bias):
    hidden, weight, b, labels = _head(5, 4, 11, dtype, seed=5, bias=bias)
    fwd = torch.ops.rlhf_fast.fused_linear_logprobs_fwd.default
    req = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    torch.library.opcheck(fwd, (req[0], req[1], req[2], labels, 0.7, True, -100, 2))
    torch.library.opcheck(fwd, (req[0], req[1], req[2], labels, 0.7, False, -100, 2, True))
    logp, ent, lse, amax = fwd(hidden, weight, b, labels, 0.7, True, -100, 2)
    assert amax.shape == (0,)  # not asked for: nothing computed
    logits = hidden @ weight.t() + (b if b is not None else 0)
    assert torch.equal(fwd(hidden, weight, b, labels, 0.7, True, -100, 2, True)[3], logits.argmax(-1))
    torch.library.opcheck(torch.ops.rlhf_fast.fused_linear_logprobs_bwd.default,
                          (torch.randn_like(logp), torch.randn_like(ent), hidden, weight, b, labels, lse, ent, 0.7,
                           -100, 2))


@needs_cpp
def test_holds_one_chunk_of_logits():
    N, H, V, C = 512, 16, 4096, 32
    hidden, weight, b, labels = _head(N, H, V, torch.float32, seed=6)
    chunk, full, w_bytes = C * V * 4, N * V * 4, V * H * 4
    hidden.requires_grad_()
    weight.requires_grad_()

    def step(backend):
        with ops.use_backend(backend):
            lp, ent = ops.fused_linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True, chunk_size=C)
        (lp.sum() + ent.sum()).backward()

    # the measurement sees the reference's full [N, V] logits (so it can fail) ...
    ref_peak, ref_big = timeline_memory(lambda: step("torch"))
    assert ref_big >= full
    # ... while the native op never has more than about one chunk of logits alive: at most
    # the chunk, its gradient, the fp32 weight-gradient accumulator and [N, H] / [N] tensors
    peak, big = timeline_memory(lambda: step("cpp"))
    assert big <= max(chunk, w_bytes), f"largest allocation {big} B, one chunk {chunk} B"
    budget = 2 * chunk + 2 * w_bytes + 2 * N * H * 4 + 16 * N * 4
    assert peak <= budget, f"peak {peak} B > {budget} B (full logits {full} B)"
    assert peak < full / 2


@needs_cpp
def test_auto_chunk_is_bounded():
    # chunk_size=None: one chunk of fp32 logits stays <= 32 MiB, whatever N
    N, H, V = 1024, 4, 32768 * 2  # full logits 256 MiB; auto chunk = 128 rows = 32 MiB
    hidden, weight, _, labels = _head(N, H, V, torch.float32, seed=8, bias=False)
    with ops.use_backend("cpp"):
        peak, big = timeline_memory(lambda: ops.fused_linear_logprobs(hidden, weight, labels))
    assert big <= 32 * 2**20 + 4096, big
    assert peak <= 32 * 2**20 + 64 * N, peak


def _policy_inputs(B, T, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight, b, labels = _head(B * T, H, V, dtype, seed=seed)
    hidden = hidden.reshape(B, T, H)
    labels = labels.reshape(B, T)
    old_logp = -torch.rand(B, T, generator=g) * 5
    ref_logp = -torch.rand(B, T, generator=g) * 5
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    mask[labels == -100] = False
    return hidden, weight, b, labels, old_logp, ref_logp, adv, mask


def _composed_policy_loss(hidden, weight, b, labels, old_logp, ref_logp, adv, mask, *, kl_coef, kl_kind,
                          entropy_coef, temperature, agg, normalizer, **clip):
    """The fused loss as a composition of separate reference ops (the spec of the fused op)."""
    B, T, H = hidden.shape
    logp, ent = reference.fused_linear_logprobs(hidden.reshape(B * T, H), weight, labels.reshape(-1), bias=b,
                                                temperature=temperature, return_entropy=True)
    logp, ent = logp.reshape(B, T), ent.reshape(B, T)
    tok = reference.ppo_token_loss(logp, old_logp, adv, **clip)[0]
    tok = tok + kl_coef * reference.kl_penalty(logp, ref_logp, kl_kind) - entropy_coef * ent
    loss = reference.aggregate(tok, mask, agg, normalizer)
    _, stats = reference.ppo_policy_loss(logp, old_logp, adv, mask, agg=agg, normalizer=normalizer, **clip)
    stats["kl"] = reference.masked_mean(reference.kl_penalty(logp, ref_logp, kl_kind), mask)
    stats["entropy"] = reference.masked_mean(ent, mask)
    return loss, stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", reference.AGG_MODES)
@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_policy_loss_equals_composition(backend, agg, kl_kind):
    hidden, weight, b, labels, old_logp, ref_logp, adv, mask = _policy_inputs(3, 5, 8, 37, torch.float32, seed=10)
    kw = dict(kl_coef=0.1, kl_kind=kl_kind, entropy_coef=0.01, temperature=0.7, agg=agg,
              normalizer=torch.tensor(11.0))
    clip = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    with ops.use_backend(backend):
        loss, stats = ops.fused_linear_policy_loss(leaves[0], leaves[1], labels, old_logp, adv, mask,
                                                   ref_logp=ref_logp, bias=leaves[2], chunk_size=4, **kw, **clip)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    exp, exp_stats = _composed_policy_loss(*ref_leaves, labels, old_logp, ref_logp, adv, mask, **kw, **clip)
    exp_grads = torch.autograd.grad(exp, ref_leaves)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)
    for name in ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max", "kl", "entropy"):
        torch.testing.assert_close(stats[name], exp_stats[name], rtol=1e-5, atol=1e-6, msg=name)
    assert stats["logp"].shape == labels.shape and not stats["logp"].requires_grad
    for g, e, name in zip(grads, exp_grads, ("hidden", "weight", "bias")):
        # atol on the gradient's scale: the k3 term's bias gradient sums terms of ~1e4 that cancel
        # to ~0.1 (float32 summation order differs between CPUs: 1.5e-5 off on an AMD EPYC)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_without_ref_and_default_normalizer(backend):
    hidden, weight, _, labels, old_logp, _, adv, mask = _policy_inputs(2, 3, 4, 7, torch.float64, seed=12)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with ops.use_backend(backend):
        loss, stats = ops.fused_linear_policy_loss(*leaves, labels, old_logp.double(), adv.double(), mask,
                                                   entropy_coef=0.05)
    exp, _ = _composed_policy_loss(hidden, weight, None, labels, old_logp.double(), ref_logp=old_logp.double(),
                                   adv=adv.double(), mask=mask, kl_coef=0.0, kl_kind="k1", entropy_coef=0.05,
                                   temperature=1.0, agg="token-mean", normalizer=None)
    torch.testing.assert_close(loss, exp)
    assert stats["kl"] == 0
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h, w: ops.fused_linear_policy_loss(h, w, labels, old_logp.double(), adv.double(), mask,
                                                      entropy_coef=0.05)[0], tuple(leaves))


# ----------------------------------------------------------------------------- return_top1


def _tied_head(dtype, bias):
    """Integer-valued hidden / weight / bias, so every logit is exact in any dtype, with ties for
    the row max: W rows 5, 20 and 33 equal and largest for rows 0-3 (labels 5: the first of the
    tie, top-1; 20, 33: later ones, not; 11: not a max), row 4 ignored, row 5 all-zero hidden
    (every logit is the bias: without bias all tie, label 0 the first), row 6 the label at its
    row's argmax. Returns (hidden, weight, bias, labels, expected top1)."""
    g = torch.Generator().manual_seed(11)
    N, H, V = 8, 4, 37
    weight = torch.randint(-2, 3, (V, H), generator=g).float()
    weight[[5, 20, 33]] = 3.0
    hidden = torch.randint(1, 4, (N, H), generator=g).float()
    hidden[5] = 0.0
    hidden[6:] = -hidden[6:]
    b = torch.randint(-1, 2, (V,), generator=g).float() if bias else None
    if b is not None:
        b[[5, 20, 33]] = 0.0
    logits = hidden @ weight.t() + (b if b is not None else 0)
    labels = torch.tensor([5, 20, 33, 11, -100, 0, int(logits[6].argmax()), int(logits[7].argmin())])
    expected = (logits.argmax(-1) == labels) & (labels != -100)
    assert expected[:4].tolist() == [True, False, False, False] and expected[6] and not expected[7]
    if b is None:  # the all-zero row: every column ties, the first one wins
        assert bool(expected[5])
    return hidden.to(dtype), weight.to(dtype), (b.to(dtype) if b is not None else None), labels, expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_top1_ties_go_to_the_first_max(backend, dtype, bias, chunk_size):
    hidden, weight, b, labels, expected = _tied_head(dtype, bias)
    with ops.use_backend(backend):
        logp, ent, top1 = ops.fused_linear_logprobs(hidden, weight, labels, bias=b, temperature=0.7,
                                                    return_entropy=True, return_top1=True, chunk_size=chunk_size)
    assert top1.dtype == torch.bool and top1.shape == labels.shape
    assert top1.tolist() == expected.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [2, 37, 4099])
@pytest.mark.parametrize("chunk_size,bias", [(None, False), (3, True)])
@pytest.mark.parametrize("entropy,temperature", [(False, 1.0), (True, 0.7)])
def test_top1_is_the_logits_argmax_and_changes_nothing_else(backend, V, chunk_size, bias, entropy, temperature):
    hidden, weight, b, labels = _head(9, 16, V, torch.float32, seed=V + 1, bias=bias)
    logits = hidden @ weight.t() + (b if b is not None else 0)
    labels[::2] = logits.argmax(-1)[::2]  # about half the rows are top-1
    labels[1] = -100
    expected = (logits.argmax(-1) == labels) & (labels != -100)
    kw = dict(temperature=temperature, return_entropy=entropy, chunk_size=chunk_size)

    def run(top1):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b) if t is not None]
        with ops.use_backend(backend):
            out = ops.fused_linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None,
                                            **kw, **({"return_top1": True} if top1 else {}))
        out = list(out) if (entropy or top1) else [out]
        flags = out.pop() if top1 else None
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(out))
        return [o.detach() for o in out], torch.autograd.grad(loss, leaves), flags

    outs, grads, _ = run(False)
    outs1, grads1, top1 = run(True)
    assert top1.tolist() == expected.tolist() and 0 < int(top1.sum()) < len(labels)
    assert not top1.requires_grad
    for a, c in zip(outs + list(grads), outs1 + list(grads1)):
        assert torch.equal(a, c)  # the same values, bit for bit, with or without top-1


@needs_cpp
def test_top1_under_torch_compile():
    hidden, weight, b, labels, expected = _tied_head(torch.float32, True)

    def f(h, w, bb, y):
        lp, top1 = ops.fused_linear_logprobs(h, w, y, bias=bb, return_top1=True, chunk_size=3)
        return lp.sum(), top1

    with ops.use_backend("cpp"):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        loss, top1 = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves, labels)
        loss.backward()
    assert top1.tolist() == expected.tolist() and leaves[1].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_of_no_rows_and_bad_flag(backend):
    h, w, _, _ = _head(4, 8, 11, torch.float32, seed=0)
    with ops.use_backend(backend):
        lp, top1 = ops.fused_linear_logprobs(h[:0], w, torch.zeros(0, dtype=torch.long), return_top1=True)
        assert lp.shape == top1.shape == (0,) and top1.dtype == torch.bool
        with pytest.raises(TypeError, match="return_top1"):
            ops.fused_linear_logprobs(h, w, torch.zeros(4, dtype=torch.long), return_top1="yes")


def test_bad_input():
    h, w, b, y = _head(4, 8, 11, torch.float32, seed=0)
    with pytest.raises(ValueError, match="labels"):
        ops.fused_linear_logprobs(h, w, torch.full((4,), 11))
    with pytest.raises(ValueError, match="labels"):
        ops.fused_linear_logprobs(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        ops.fused_linear_logprobs(h, torch.randn(11, 7), y)
    with pytest.raises(TypeError, match="weight"):
        ops.fused_linear_logprobs(h, w.double(), y)
    with pytest.raises(TypeError, match="hidden"):
        ops.fused_linear_logprobs(h.long(), w, y)
    with pytest.raises(ValueError, match="bias"):
        ops.fused_linear_logprobs(h, w, y, bias=torch.zeros(10))
    with pytest.raises(ValueError, match="temperature"):
        ops.fused_linear_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.fused_linear_logprobs(h, w, y, chunk_size=0)
    hb, wb, _, yb, old, ref, adv, mask = _policy_inputs(2, 3, 8, 11, torch.float32)
    with pytest.raises(ValueError, match="old_logp"):
        ops.fused_linear_policy_loss(hb, wb, yb, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="agg"):
        ops.fused_linear_policy_loss(hb, wb, yb, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="hidden"):
        ops.fused_linear_policy_loss(hb.reshape(6, 8), wb, yb, old, adv, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_dtype_must_match_hidden(backend):
    # a float64 bias gave float64 log-probs on the reference and float32 on cpp
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with ops.use_backend(backend), pytest.raises(TypeError, match="bias"):
        ops.fused_linear_logprobs(h, w, torch.zeros(4, dtype=torch.long), bias=torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_chunk_size_is_whole_batch_and_bool_refused(backend):
    # chunk_size=10**30 failed with an opaque "Expected a value of type 'int'" on cpp
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 4])
    with ops.use_backend(backend):
        got = ops.fused_linear_logprobs(h, w, y, chunk_size=10 ** 30)
        with pytest.raises(ValueError, match="chunk_size"):
            ops.fused_linear_logprobs(h, w, y, chunk_size=True)
        with pytest.raises(ValueError, match="ignore_index"):
            ops.fused_linear_logprobs(h, w, y, ignore_index=10 ** 30)
    torch.testing.assert_close(got, reference.fused_linear_logprobs(h, w, y))


def _awkward_policy_inputs(B=2, T=3, H=4, V=5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), torch.randint(0, V, (B, T), generator=g),
            torch.randn(B, T, generator=g) - 2, torch.randn(B, T, generator=g), torch.ones(B, T, dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_coef=float("nan")), "kl_coef"),
    (dict(kl_coef="0.1"), "kl_coef"),
    (dict(kl_coef=None), "kl_coef"),
    (dict(entropy_coef=float("inf")), "entropy_coef"),
    (dict(entropy_coef=10 ** 400), "entropy_coef"),
    (dict(normalizer=-1), "normalizer"),
    (dict(normalizer=torch.ones(3)), "normalizer"),
    (dict(dual_clip=float("nan")), "dual_clip"),
    (dict(clip_low=10 ** 400), "clip_low"),
])
def test_policy_loss_bad_scalars_are_named(backend, kwargs, match):
    # kl_coef / entropy_coef / normalizer were not checked at all (NaN loss, opaque errors,
    # a [3] "loss" from a vector normalizer)
    with ops.use_backend(backend), pytest.raises((ValueError, TypeError), match=match):
        ops.fused_linear_policy_loss(*_awkward_policy_inputs(), ref_logp=torch.zeros(2, 3), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_empty_batch_and_padding(backend, agg):
    h, w, y, old, adv, m = _awkward_policy_inputs(B=0)
    with ops.use_backend(backend):
        loss, _ = ops.fused_linear_policy_loss(h, w, y, old, adv, m, agg=agg)
        assert loss.item() == 0.0
        # -inf old_logp / ref_logp and NaN advantages at padding (masked-out) positions
        h, w, y, old, adv, m = _awkward_policy_inputs()
        m[1, 1:] = False
        old[1, 1:], adv[1, 1:] = float("-inf"), float("nan")
        ref = torch.zeros(2, 3)
        ref[1, 1:] = float("-inf")
        h.requires_grad_()
        loss, st = ops.fused_linear_policy_loss(h, w, y, old, adv, m, ref_logp=ref, kl_coef=0.1, agg=agg)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(st["kl"]) and torch.isfinite(h.grad).all()


def _triton_live():
    from rlhf_fast.ops import _dispatch

    return _dispatch.backend_available("triton")[0] and not torch.cuda.is_available()


@pytest.mark.skipif(not _triton_live(), reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1)")
def test_triton_strided_bias_and_empty_rows():
    # an expanded (stride-0) bias gave silently wrong log-probs on the Triton kernel, and
    # N = 0 rows raised ZeroDivisionError in its launcher
    g = torch.Generator().manual_seed(0)
    h, w, y = torch.randn(6, 4, generator=g), torch.randn(7, 4, generator=g), torch.randint(0, 7, (6,), generator=g)
    for bias in (torch.randn(1, generator=g).expand(7), torch.randn(14, generator=g)[::2]):
        with ops.use_backend("triton"):
            got = ops.fused_linear_logprobs(h, w, y, bias=bias)
        torch.testing.assert_close(got, reference.fused_linear_logprobs(h, w, y, bias=bias))
    with ops.use_backend("triton"):
        lp, ent = ops.fused_linear_logprobs(h[:0], w, y[:0], return_entropy=True)
    assert lp.shape == ent.shape == (0,)
