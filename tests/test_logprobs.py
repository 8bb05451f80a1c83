"""token_logprobs on every live CPU backend against the reference (and an fp64 oracle):
forward and backward, awkward vocabularies, temperature, ignore_index, extreme logits,
torch.compile, opcheck, memory and argument validation."""

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import reference

from .conftest import live_cpu_backends, timeline_memory

BACKENDS = live_cpu_backends()
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="rlhf_fast._C not built")


def _inputs(shape, V, dtype, seed=0, scale=3.0, n_ignore=1):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    flat = labels.view(-1)
    if n_ignore and flat.numel() > 1:
        flat[torch.randperm(flat.numel(), generator=g)[:n_ignore]] = -100
    return logits, labels


def _oracle(logits, labels, temperature, entropy, grads):
    """fp64 reference on the same values (exact inputs), forward outputs and input gradient.
    -inf logits are replaced by -1e30: the same distribution, but the reference's entropy
    backward stays finite (it computes 0·(-inf) there)."""
    x = logits.detach().double().masked_fill(torch.isneginf(logits), -1e30).requires_grad_()
    out = reference.token_logprobs(x, labels, temperature=temperature, return_entropy=entropy)
    outs = out if entropy else (out,)
    (gx,) = torch.autograd.grad(sum((o * g.double()).sum() for o, g in zip(outs, grads)), x)
    return [o.detach() for o in outs], gx


def _run(backend, logits, labels, temperature, entropy, grads):
    x = logits.detach().clone().requires_grad_()
    with ops.use_backend(backend):
        out = ops.token_logprobs(x, labels, temperature=temperature, return_entropy=entropy)
    outs = out if entropy else (out,)
    (gx,) = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, grads)), x)
    return [o.detach() for o in outs], gx


def _assert_near_oracle(ours, torch_low, oracle, atol, what):
    """Error against the fp64 oracle at most twice PyTorch's own (the reference at the same
    precision), plus atol."""
    err = (ours.double() - oracle).abs().max().item()
    base = (torch_low.double() - oracle).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} vs reference's {base:.3g} (atol {atol})"


def _check(backend, logits, labels, temperature, entropy, atol_out, atol_grad):
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(labels.shape, generator=g) for _ in range(2 if entropy else 1)]
    outs, gx = _run(backend, logits, labels, temperature, entropy, grads)
    ref_outs, ref_gx = (outs, gx) if backend == "torch" else _run("torch", logits, labels, temperature, entropy, grads)
    ora_outs, ora_gx = _oracle(logits, labels, temperature, entropy, grads)
    for o, r, a, name in zip(outs, ref_outs, ora_outs, ("logp", "entropy")):
        assert o.shape == labels.shape and o.dtype == reference.out_dtype(logits.dtype), name
        assert torch.isfinite(o).all(), name
        _assert_near_oracle(o, r, a, atol_out, name)
        # ignore_index positions give exactly 0
        assert (o[labels == -100] == 0).all(), name
    assert gx.dtype == logits.dtype and gx.shape == logits.shape
    assert torch.isfinite(gx).all()
    ref_gx = torch.where(torch.isfinite(ref_gx), ref_gx, ora_gx.to(ref_gx.dtype))
    # Native backwards recompute p = exp(z - lse) from the saved lse, an fp32 number as large
    # as the logits: log p then carries up to ~1 ulp of |lse| that log_softmax's (z - m) - log s
    # does not, so the gradient may be off by about p·eps·|lse|·|g|/T more than the reference.
    acc = reference.out_dtype(logits.dtype)
    if acc == torch.float32:
        z = logits.double().masked_fill(torch.isneginf(logits), -1e30) / temperature
        lse = torch.logsumexp(z, -1).abs().max().item()
        g = max(t.abs().max().item() for t in grads)
        atol_grad = max(atol_grad, 2 * torch.finfo(acc).eps * lse * g / temperature)
    _assert_near_oracle(gx, ref_gx, ora_gx, atol_grad, "grad_logits")
    assert (gx[labels == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [2, 37, 4099])
@pytest.mark.parametrize("shape", [(2, 1), (2, 3)])  # [B, T=1], [B, T]
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(backend, dtype, V, shape, entropy, temperature):
    logits, labels = _inputs(shape, V, dtype, seed=V)
    _check(backend, logits, labels, temperature, entropy, 1e-5, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_float16(backend, entropy):
    logits, labels = _inputs((2, 3), 4099, torch.float16, seed=17)
    _check(backend, logits, labels, 0.7, entropy, 1e-5, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [129920, 151936])
def test_large_vocab(backend, dtype, V):
    logits, labels = _inputs((2,), V, dtype, seed=V, scale=5.0)
    _check(backend, logits, labels, 0.7, True, 1e-4, 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("entropy", [False, True])
def test_extreme_logits(backend, dtype, entropy):
    logits, labels = _inputs((4,), 4099, dtype, seed=3, n_ignore=0)
    logits[0, :7] = 1e4  # a few huge logits: the rest have p = 0 in fp32
    logits[0, 100:110] = -1e4
    logits[1, ::2] = float("-inf")  # half the vocabulary impossible
    logits[2, :] = -1e4
    logits[2, 5] = 1e4  # one-hot distribution, entropy 0
    logits[3, 1:] = float("-inf")
    labels[0], labels[1], labels[2], labels[3] = 3, 1, 5, 0  # labels on reachable tokens
    _check(backend, logits, labels, 1.0, entropy, 1e-4, 1e-6)
    _check(backend, logits, labels, 0.7, entropy, 1e-4, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck(backend, entropy, temperature):
    logits, labels = _inputs((2, 3), 11, torch.float64, seed=7)
    logits.requires_grad_()
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x: ops.token_logprobs(x, labels, temperature=temperature, return_entropy=entropy), (logits,)
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", [0, 1], ids=["only-logp", "only-entropy"])
def test_one_output_unused(backend, used):
    # only one of logp / entropy feeds the loss: the other gets no gradient (a zero one, or None
    # in the native backward through the eager autograd.Function)
    logits, labels = _inputs((2, 4), 37, torch.float32, seed=5 + used)
    x = logits.clone().requires_grad_()
    with ops.use_backend(backend):
        outs = ops.token_logprobs(x, labels, return_entropy=True)
    outs[used].sum().backward()
    y = logits.clone().requires_grad_()
    reference.token_logprobs(y, labels, return_entropy=True)[used].sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    logits, labels = _inputs((2, 3), 37, torch.float32, seed=9)

    def loss(x, y):
        lp, ent = ops.token_logprobs(x, y, temperature=0.7, return_entropy=True)
        return lp.sum() + 0.1 * ent.sum()

    with ops.use_backend(backend):
        f = torch.compile(loss, backend="aot_eager", fullgraph=True)
        x = logits.clone().requires_grad_()
        out = f(x, labels)
        out.backward()
    y = logits.clone().requires_grad_()
    lp, ent = reference.token_logprobs(y, labels, temperature=0.7, return_entropy=True)
    exp = lp.sum() + 0.1 * ent.sum()
    exp.backward()
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("entropy", [False, True])
def test_opcheck(dtype, entropy):
    logits, labels = _inputs((6,), 13, dtype, seed=11)
    fwd = torch.ops.rlhf_fast.token_logprobs_fwd.default
    torch.library.opcheck(fwd, (logits.clone().requires_grad_(), labels, 0.7, entropy, -100))
    logp, ent, lse = fwd(logits, labels, 0.7, entropy, -100)
    gl = torch.randn_like(logp)
    ge = torch.randn_like(ent) if entropy else None
    torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs_bwd.default,
                          (gl, ge, logits, labels, lse, ent, 0.7, -100))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_has_no_rowwise_fp32_temporary(dtype):
    N, V = 64, 32000
    logits, labels = _inputs((N,), V, dtype, seed=13)
    nv_fp32 = N * V * 4
    # the measurement sees the reference's [N, V] temporaries (so it can fail) ...
    ref_peak, ref_big = timeline_memory(lambda: reference.token_logprobs(logits, labels, return_entropy=True))
    assert ref_big >= nv_fp32
    # ... and the native forward allocates only the [N] outputs
    with ops.use_backend("cpp"):
        peak, big = timeline_memory(lambda: ops.token_logprobs(logits, labels, return_entropy=True))
    assert big <= N * 8, f"largest allocation {big} B"
    assert peak <= 3 * N * 8, f"peak {peak} B"


def test_bad_input():
    x = torch.randn(2, 3, 5)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        ops.token_logprobs(x, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="labels"):
        ops.token_logprobs(x, torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="labels"):
        ops.token_logprobs(x, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="logits"):
        ops.token_logprobs(torch.zeros(2, 3, 5, dtype=torch.long), y)
    with pytest.raises(TypeError, match="labels"):
        ops.token_logprobs(x, y.float())
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            ops.token_logprobs(x, y, temperature=t)


@needs_cpp
def test_native_op_rejects_out_of_range_labels():
    # the kernel indexes rows by label, so the op itself refuses bad labels too
    with pytest.raises(ValueError, match="labels"):
        torch.ops.rlhf_fast.token_logprobs_fwd(torch.randn(2, 5), torch.tensor([0, 7]), 1.0, False, -100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(ignore_index=10 ** 30), ValueError, "ignore_index"),
    (dict(ignore_index=-(10 ** 30)), ValueError, "ignore_index"),
    (dict(ignore_index="x"), TypeError, "ignore_index"),
    (dict(ignore_index=None), TypeError, "ignore_index"),
    (dict(ignore_index=True), TypeError, "ignore_index"),
    (dict(return_entropy="no"), TypeError, "return_entropy"),
    (dict(temperature=10 ** 400), ValueError, "temperature"),
])
def test_bad_python_args_are_named(backend, kwargs, exc, match):
    # huge ints overflowed inside _validate/the reference (OverflowError, no argument named);
    # a string return_entropy was read as truthy
    with ops.use_backend(backend), pytest.raises(exc, match=match):
        ops.token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_int_temperature_and_numpy_ignore_index(backend):
    # an int temperature beyond int64 (but a fine float) overflowed in the reference only
    np = pytest.importorskip("numpy")
    logits, labels = torch.randn(2, 5), torch.tensor([1, -100])
    with ops.use_backend(backend):
        got = ops.token_logprobs(logits, labels, temperature=10 ** 30, ignore_index=np.int64(-100))
    want = reference.token_logprobs(logits, labels, temperature=1e30)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("normalizer", [None, 7.0])
def test_policy_loss_heads_only_the_loss_columns_with_the_full_batch_values(agg, normalizer):
    """models.logprobs.policy_loss sends only the columns holding loss tokens through the LM head;
    loss, gradients and the [B, T] log-probs equal those composed from every position's
    log-probs (the prompt columns and a trailing empty column included in the batch)."""
    from rlhf_fast.models.logprobs import policy_loss, sequence_logprobs
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.ops import reference

    torch.manual_seed(0)
    model = tiny_causal_lm(50, hidden_size=16, num_layers=1, num_heads=2)
    B, T = 3, 10
    ids = torch.randint(3, 50, (B, T))
    am = torch.ones(B, T, dtype=torch.bool)
    am[0, :2] = False
    rm = torch.zeros(B, T, dtype=torch.bool)
    rm[0, 4:8], rm[1, 4:6], rm[2, 5:9] = True, True, True  # columns 0-3 and 9 hold no loss token
    g = torch.Generator().manual_seed(1)
    old = torch.randn(B, T, generator=g) * 0.1 - 3
    adv = torch.randn(B, T, generator=g)
    ref = torch.randn(B, T, generator=g) * 0.1 - 3
    kw = dict(agg=agg, normalizer=normalizer, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, clip_low=0.2)

    loss, st = policy_loss(model, ids, am, rm, old, adv, ref_logp=ref, **kw)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    logp, ent = sequence_logprobs(model, ids, am, response_mask=rm, return_entropy=True)
    want, want_st = reference.policy_loss_from_logp(logp, ent, old, adv, rm, ref_logp=ref, **kw)
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st["logp"], logp.detach(), atol=1e-6, rtol=1e-5)
    for k in ("clip_frac", "approx_kl", "kl", "entropy"):
        torch.testing.assert_close(st[k], want_st[k], atol=1e-6, rtol=1e-5)
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)

    # no loss token at all: a zero loss that still has a graph
    model.zero_grad(set_to_none=True)
    loss0, st0 = policy_loss(model, ids, am, torch.zeros_like(rm), old, adv, **kw)
    loss0.backward()
    assert float(loss0) == 0.0 and st0["logp"].shape == (B, T) and not st0["logp"].any()
