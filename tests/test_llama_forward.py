"""The Llama-family training forward (rlhf_fast/models/llama_forward.py) against the
transformers forward it replaces: hidden states and every parameter's gradient, for each
family, dtype and mask layout; its two autograd functions; the memory it saves; and the
models it must leave to transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.models import ValueModel, llama_forward, sequence_logprobs, tiny_causal_lm  # noqa: E402
from rlhf_fast.models.llama_forward import _RMSNormFn, _SwiGLUDownFn  # noqa: E402
from rlhf_fast.models.logprobs import backbone, default_position_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97


def _model(family, kv_heads=None, dtype=torch.float32, seed=0, **kw):
    m = tiny_causal_lm(V, family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                       intermediate_size=80, seed=seed, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norms and biases too, so a swapped or dropped weight shows
        for p in m.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))
    return m


def _batch(B=5, T=19, seed=0):
    """Rows left-padded, right-padded, both, and one with a hole in the middle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, :4] = 0
    am[1, 15:] = 0
    am[2, :2] = 0
    am[2, 12:] = 0
    am[3, 7:9] = 0
    return ids, am


def _right_padded(ids):
    """An attention mask of ``ids`` that pads on the right only (SFT / reward / DPO batches)."""
    am = torch.ones_like(ids)
    am[1, 15:] = 0
    am[3, 6:] = 0
    return am


def _hf_and_ours(base, ids, am, pos):
    """Hidden states and parameter gradients (of a random projection of the attended rows) from
    the transformers forward and from ours."""
    params = [p for p in base.parameters()]
    sel = am.bool() if am is not None else torch.ones(ids.shape, dtype=torch.bool)
    out = []
    for fn in (lambda: base(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).last_hidden_state,
               lambda: llama_forward.hidden_states(base, ids, am, pos)):
        h = fn()
        proj = torch.randn(h.shape, generator=torch.Generator().manual_seed(7)).to(h.dtype) * sel[..., None]
        grads = torch.autograd.grad((h * proj).float().sum(), params, allow_unused=True)
        out.append((h, grads))
    return out, sel


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("llama", 2), ("qwen2", 1), ("qwen3", 2),
                                             ("mistral", 2)])
def test_hidden_states_and_gradients_equal_transformers_float32(family, kv_heads):
    m = _model(family, kv_heads)
    base = backbone(m)
    ids, am = _batch()
    pos = default_position_ids(am)
    assert llama_forward.supported(base, ids.shape[1])
    ((h_ref, g_ref), (h, g)), sel = _hf_and_ours(base, ids, am, pos)
    assert torch.equal(h, h_ref)  # the same ops in the same order, padding rows included
    with torch.no_grad():  # the in-place MLP taken when nothing needs a gradient
        assert torch.equal(llama_forward.hidden_states(base, ids, am, pos), h_ref)
    for (name, _), a, b in zip(base.named_parameters(), g, g_ref):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bfloat16_error_is_that_of_transformers(family):
    """bf16: the forward matches transformers bit for bit; the gradients round differently
    (our backward runs the norm in float32), so each is compared with the float32 truth: our
    error is at most about transformers' own."""
    m32 = _model(family, 2)
    m16 = _model(family, 2, dtype=torch.bfloat16)
    ids, am = _batch()
    pos = default_position_ids(am)
    ((_, truth), _), sel = _hf_and_ours(backbone(m32), ids, am, pos)
    ((h_ref, g_ref), (h, g)), _ = _hf_and_ours(backbone(m16), ids, am, pos)
    assert torch.equal(h[sel], h_ref[sel])
    for (name, _), a, b, t in zip(backbone(m16).named_parameters(), g, g_ref, truth):
        ours, theirs = (a.float() - t).norm(), (b.float() - t).norm()
        assert ours <= 2 * theirs + 1e-3 * t.norm(), (name, ours.item(), theirs.item())


def _autocast_grads(model, ids, am, device_type, ours):
    """Log-probs and parameter gradients of ``model`` under bf16 autocast (the SFT / reward
    trainers' GPU setting), through this forward or through transformers'."""
    from unittest import mock

    model.zero_grad(set_to_none=True)
    use = llama_forward.supported if ours else (lambda *a: False)
    with mock.patch.object(llama_forward, "supported", use), torch.autocast(device_type, dtype=torch.bfloat16):
        logp = sequence_logprobs(model, ids, am)
    logp.sum().backward()
    return logp.detach(), [p.grad.float().clone() for p in model.parameters()]


def _check_autocast(family, device):
    m = _model(family, 2).to(device)
    ids, am = (t.to(device) for t in _batch())
    model_params = list(m.parameters())
    m.zero_grad(set_to_none=True)
    sequence_logprobs(m, ids, am).sum().backward()  # float32, no autocast: the truth
    truth = [p.grad.float().clone() for p in model_params]
    lp_theirs, g_theirs = _autocast_grads(m, ids, am, device, ours=False)
    lp_ours, g_ours = _autocast_grads(m, ids, am, device, ours=True)
    torch.testing.assert_close(lp_ours, lp_theirs, rtol=1e-2, atol=1e-2)
    for (name, _), a, b, t in zip(m.named_parameters(), g_ours, g_theirs, truth):
        assert a.dtype == b.dtype
        ours, theirs = (a - t).norm(), (b - t).norm()
        assert ours <= 2 * theirs + 1e-3 * t.norm(), (name, ours.item(), theirs.item())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bf16_autocast_backward_runs_and_matches_transformers(family):
    """Under autocast a float32 model's matmuls run in bf16: the backward (where autocast is
    off) casts explicitly, and its gradients are as close to the float32 truth as
    transformers' own under autocast."""
    _check_autocast(family, "cpu")


def test_packed_rows_and_no_mask_equal_transformers():
    """No attention mask: plain causal (sdpa's is_causal), and position ids that restart, from
    which transformers builds a block-diagonal mask (packed sequences)."""
    base = backbone(_model("qwen2", 2))
    ids = torch.randint(3, V, (2, 13), generator=torch.Generator().manual_seed(0))
    ((h_ref, g_ref), (h, g)), _ = _hf_and_ours(base, ids, None, None)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    packed_pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]]).expand(2, -1)
    ((h_ref, g_ref), (h, g)), _ = _hf_and_ours(base, ids, None, packed_pos)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the packed sequences really are separate: the second one alone gives the same states
    alone = llama_forward.hidden_states(base, ids[:, 4:7], None, None)
    torch.testing.assert_close(h[:, 4:7], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_one_packed_row_attends_per_sequence(family, monkeypatch):
    """One packed row (B = 1: SFT packing, DPO padding_free) runs one causal sdpa per sequence
    (PackedSegments) instead of a dense [T, T] mask: the states and gradients equal
    transformers' block-diagonal ones, with restarts at any position value and a sequence of one
    token, and equal the dense-mask path of this forward."""
    base = backbone(_model(family, 2))
    ids = torch.randint(3, V, (1, 14), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 7, 8, 9, 10, 11, 0, 1]])
    assert llama_forward._key_mask(None, pos, 14).lengths == [4, 3, 5, 2]
    ((h_ref, g_ref), (h, g)), _ = _hf_and_ours(base, ids, None, pos)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(llama_forward.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append((q.shape[2], k.get("attn_mask"))) or sdpa(q, *a, **k))
    with torch.no_grad():
        seg = llama_forward.hidden_states(base, ids, None, pos)
    assert calls[:4] == [(4, None), (3, None), (5, None), (2, None)]  # per sequence, causal, in order
    key_mask = llama_forward._key_mask
    monkeypatch.setattr(llama_forward, "_key_mask", lambda am, p, T: key_mask(am, p, T).dense())
    with torch.no_grad():
        dense = llama_forward.hidden_states(base, ids, None, pos)
    assert calls[-1][1] is not None  # the dense mask went to sdpa
    torch.testing.assert_close(seg, dense, rtol=1e-5, atol=1e-6)


def test_a_shortened_config_runs_its_layers_only():
    """transformers runs ``layers[:config.num_hidden_layers]`` (a model with layers dropped
    from its config): so does this forward."""
    base = backbone(_model("llama", 2))
    base.config.num_hidden_layers = 1
    ids, am = _batch()
    pos = default_position_ids(am)
    ref = base(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).last_hidden_state
    assert torch.equal(llama_forward.hidden_states(base, ids, am, pos), ref)


def test_a_row_with_nothing_attended_stays_finite():
    base = backbone(_model("llama", 2))
    ids, am = _batch()
    am[4] = 0
    h = llama_forward.hidden_states(base, ids, am, default_position_ids(am))
    assert h.isfinite().all()
    h[:4].sum().backward()
    assert all(p.grad.isfinite().all() for p in base.parameters() if p.grad is not None)


def test_sequence_logprobs_and_values_run_through_it(monkeypatch):
    """The trainers' entry points (sequence_logprobs, ValueModel) take this forward for a
    supported model and give what the transformers forward gives."""
    m = _model("llama", 2)
    ids, am = _batch()
    calls = []
    real = llama_forward.hidden_states
    monkeypatch.setattr(llama_forward, "hidden_states", lambda *a: calls.append(1) or real(*a))
    logp = sequence_logprobs(m, ids, am)
    assert calls
    logits = m(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).logits
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    target = am.bool().clone()
    target[:, 0] = False
    target[:, 1:] &= am[:, :-1].bool()
    torch.testing.assert_close(logp[target], want[target[:, 1:]], rtol=1e-5, atol=1e-5)
    critic = ValueModel(m)
    calls.clear()
    values = critic(ids, am)
    assert calls
    h = critic.backbone(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).last_hidden_state
    want_v = critic.value_head(h).squeeze(-1)
    torch.testing.assert_close(values[am.bool()], want_v[am.bool()], rtol=1e-5, atol=1e-6)


def _saved_bytes(fn, params):
    """Bytes of the tensors autograd saves during ``fn()``, the parameters' storage excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_it_keeps_less_for_the_backward_than_transformers():
    """The point of the two autograd functions: an RMSNorm that keeps its input and rstd,
    and a SwiGLU that keeps gate and up, not their products. With the MLP 2.5× the hidden size
    the saved activations shrink by more than a quarter."""
    base = backbone(_model("llama", 2))
    ids, am = _batch(B=8, T=32)
    pos = default_position_ids(am)
    params = list(base.parameters())
    theirs = _saved_bytes(lambda: base(input_ids=ids, attention_mask=am, position_ids=pos,
                                       use_cache=False).last_hidden_state, params)
    ours = _saved_bytes(lambda: llama_forward.hidden_states(base, ids, am, pos), params)
    assert ours < 0.75 * theirs, (ours, theirs)


def test_without_gradients_it_peaks_no_higher_than_transformers():
    """Reference log-probs and values run without autograd: intermediates are dropped as soon
    as they are used and the MLP runs in place, so the forward's transient peak is at most
    transformers' (it was 30% higher while a layer's q / k / v / o stayed referenced)."""
    from rlhf_fast.benchmarks.common import profiler_extra_peak_bytes

    base = backbone(_model("llama", 2))
    ids, am = _batch(B=8, T=48)
    pos = default_position_ids(am)
    with torch.no_grad():
        def theirs():
            return base(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).last_hidden_state

        def ours():
            return llama_forward.hidden_states(base, ids, am, pos)

        theirs(), ours()  # warm-up: lazily built tables
        assert profiler_extra_peak_bytes(ours) <= profiler_extra_peak_bytes(theirs)


@pytest.mark.parametrize("bias", [False, True])
def test_autograd_functions_pass_gradcheck(bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-5), (x, w))
    gate = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    wd = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bd = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    args = (gate, up, wd) + ((bd,) if bias else ())
    assert torch.autograd.gradcheck(lambda a, b, c, *d: _SwiGLUDownFn.apply(a, b, c, d[0] if d else None), args)
    # only some inputs needing a gradient (a frozen projection, say)
    y = _SwiGLUDownFn.apply(gate, up, wd.detach(), None)
    dg, du = torch.autograd.grad(y.sum(), (gate, up))
    ref_dg, ref_du = torch.autograd.grad((nn.functional.silu(gate) * up @ wd.detach().t()).sum(), (gate, up))
    torch.testing.assert_close((dg, du), (ref_dg, ref_du))


def _set_attn(m, impl):
    m.config._attn_implementation = impl
    m.model.config._attn_implementation = impl


def test_models_it_must_leave_to_transformers(monkeypatch):
    m = _model("llama", 2)
    base = backbone(m)
    T = 19
    assert llama_forward.supported(base, T)
    # a forward hook somewhere inside: it would be skipped
    handle = base.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not llama_forward.supported(base, T)
    handle.remove()
    # backward hooks (on a module, on the activation, or global) and the activation's hooks
    for mod in (base.layers[0].mlp, base.layers[1].self_attn.q_proj, base.norm):
        handle = mod.register_full_backward_hook(lambda *a: None)
        assert not llama_forward.supported(base, T)
        handle.remove()
    handle = base.layers[0].mlp.act_fn.register_forward_hook(lambda *a: None)
    assert not llama_forward.supported(base, T)
    handle.remove()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *a: None)
    assert not llama_forward.supported(base, T)
    handle.remove()
    assert llama_forward.supported(base, T)
    # a module of a class it does not know (a kernel library's norm, say)
    real = base.layers[0].input_layernorm
    base.layers[0].input_layernorm = nn.LayerNorm(32)
    assert not llama_forward.supported(base, T)
    base.layers[0].input_layernorm = real
    # an attention implementation other than sdpa / eager
    _set_attn(m, "flex_attention")
    assert not llama_forward.supported(base, T)
    _set_attn(m, "eager")
    assert llama_forward.supported(base, T)
    _set_attn(m, "sdpa")
    # attention dropout while training
    base.train()
    base.config.attention_dropout = 0.1
    assert not llama_forward.supported(base, T)
    base.config.attention_dropout = 0.0
    assert llama_forward.supported(base, T)
    # checkpointing switched on without transformers' checkpoint function to run a layer under
    base.gradient_checkpointing = True
    assert not llama_forward.supported(base, T)
    base.gradient_checkpointing = False
    base.eval()
    # the op backend forced to the PyTorch references
    with ops.use_backend("torch"):
        assert not llama_forward.supported(base, T)
    # a sliding window shorter than the input
    mis = backbone(_model("mistral", 2))
    mis.config.sliding_window = 8
    assert not llama_forward.supported(mis, T) and llama_forward.supported(mis, 8)
    # other families
    assert not llama_forward.supported(backbone(tiny_causal_lm(V, family="gpt2", hidden_size=32, num_heads=4)), T)


def test_transformers_output_capturing_hooks_keep_it():
    """A forward asked for hidden states installs transformers' output-capturing hooks on the
    layers for good; they record nothing in our forward, so it must stay on (it was off for the
    rest of the run after one such call) and give the transformers forward's states."""
    m = _model("llama", 2)
    base = backbone(m)
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        m(ids, output_hidden_states=True)
    assert any(h.__module__.startswith("transformers.utils.output_capturing")
               for mod in base.modules() for h in mod._forward_hooks.values())
    assert llama_forward.supported(base, 11)
    am = torch.ones_like(ids)
    with torch.no_grad():
        ours = llama_forward.hidden_states(base, ids, am, default_position_ids(am))
        want = base(input_ids=ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_kept_and_gives_the_same_gradients(reentrant):
    """With transformers' activation checkpointing on, each layer runs under its checkpoint
    function (the user's use_reentrant choice included): the same states and gradients as
    without it, and the recompute happens in the backward."""
    m = _model("qwen3", 2)
    base = backbone(m)
    ids, am = _batch()
    pos = default_position_ids(am)
    ((h_plain, g_plain),), _ = _ours_only(base, ids, am, pos)
    _enable_checkpointing(m, reentrant)
    m.train()
    assert llama_forward.supported(base, ids.shape[1])
    calls = []
    real = llama_forward._layer
    llama_forward._layer = lambda *a: calls.append(torch.is_grad_enabled()) or real(*a)
    try:
        ((h, g),), _ = _ours_only(base, ids, am, pos)
    finally:
        llama_forward._layer = real
    # each layer ran twice: in the forward (without autograd under the reentrant checkpoint)
    # and again in the backward, with it
    n = len(base.layers)
    assert len(calls) == 2 * n and calls[n:] == [True] * n and calls[:n] == [not reentrant] * n
    # the embedding's hooks run (checkpointing's enable_input_require_grads among them)
    seen = []
    handle = base.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    llama_forward.hidden_states(base, ids, am, pos)
    handle.remove()
    assert seen == [ids.shape + (32,)]
    assert torch.equal(h, h_plain)
    for (name, _), a, b in zip(base.named_parameters(), g, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_reentrant_checkpointing_in_eval_mode_is_left_off_as_transformers_does():
    """transformers checkpoints only while training; we also do in eval mode, but only with the
    non-reentrant function: the reentrant one would refuse autograd.grad there."""
    m = _model("llama", 2)
    base = backbone(m)
    _enable_checkpointing(m, reentrant=True)
    m.eval()
    ids, am = _batch()
    ((h_ref, g_ref), (h, g)), _ = _hf_and_ours(base, ids, am, default_position_ids(am))  # autograd.grad
    assert torch.equal(h, h_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_call_as_forward_refuses_to_bypass_an_instance_forward():
    m = _model("llama", 2)
    m.forward = lambda *a, **k: None  # an autocast wrapper, say
    with pytest.raises(ValueError, match="instance-level forward"):
        llama_forward.call_as_forward(m, lambda: 0)
    assert "forward" in m.__dict__  # left as it was
    layer = backbone(m).layers[0]
    assert llama_forward.call_as_forward(layer, lambda x: x + 1, torch.zeros(1)).item() == 1
    assert "forward" not in layer.__dict__


def _enable_checkpointing(m, reentrant: bool) -> None:
    """transformers' activation checkpointing on ``m`` (renamed in transformers 5)."""
    enable = getattr(m, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _ours_only(base, ids, am, pos):
    """Our hidden states and parameter gradients, as the second half of _hf_and_ours (through
    .backward(): the reentrant checkpoint takes no autograd.grad)."""
    params = list(base.parameters())
    sel = am.bool()
    h = llama_forward.hidden_states(base, ids, am, pos)
    proj = torch.randn(h.shape, generator=torch.Generator().manual_seed(7)).to(h.dtype) * sel[..., None]
    for p in params:
        p.grad = None
    (h * proj).float().sum().backward()
    return [(h.detach(), [p.grad for p in params])], sel


def test_peft_adapters_are_left_to_transformers():
    peft = pytest.importorskip("peft")
    m = _model("llama", 2)
    lora = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not llama_forward.supported(backbone(lora), 19)
    ids, am = _batch()
    logp = sequence_logprobs(lora, ids, am)  # runs, through the transformers forward
    assert logp.isfinite().all()


def test_grouped_heads_repeated_or_not_give_the_same_attention():
    """The KV-head repeat taken with a mask on a GPU computes what sdpa's grouped heads do."""
    from rlhf_fast.models.llama_forward import _attention, _key_mask

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, n, 9, 8, generator=g) for n in (6, 2, 2))
    am = torch.ones(3, 9, dtype=torch.long)
    am[0, :3] = 0
    am[1, 7:] = 0
    mask = _key_mask(am, default_position_ids(am), 9)
    for m in (mask, None):
        torch.testing.assert_close(_attention(q, k, v, m, 0.3, repeat_kv=True),
                                   _attention(q, k, v, m, 0.3, repeat_kv=False), rtol=1e-5, atol=1e-6)


def test_eager_attention_gives_the_same_states():
    m = _model("llama", 2)
    ids, am = _batch()
    pos = default_position_ids(am)
    _set_attn(m, "eager")
    ref = m.model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).last_hidden_state
    h = llama_forward.hidden_states(m.model, ids, am, pos)
    torch.testing.assert_close(h[am.bool()], ref[am.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_bf16_autocast_backward_matches_transformers():
    _check_autocast("qwen2", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_hidden_states_and_gradients_match_transformers(dtype):
    m = _model("qwen2", 2, dtype=dtype).cuda()
    base = backbone(m)
    ids, am = (t.cuda() for t in _batch(B=6, T=40))
    pos = default_position_ids(am)
    ((h_ref, g_ref), (h, g)), sel = _hf_and_ours(base, ids, am, pos)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(h[sel].float(), h_ref[sel].float(), **tol)
    assert h.isfinite().all()
    for a, b in zip(g, g_ref):
        scale = b.float().abs().max().clamp(min=1e-3)
        assert ((a.float() - b.float()).abs().max() / scale).item() < (1e-3 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 1)])
def test_right_padded_rows_take_plain_causal_attention_with_the_same_results(family, kv_heads):
    """SFT / reward / DPO batches pad on the right only: no mask (sdpa's causal kernel), and
    every attended position and every gradient as transformers' masked attention gives them."""
    base = backbone(_model(family, kv_heads))
    ids, _ = _batch()
    am = _right_padded(ids)
    am[4, 1:] = 0
    pos = default_position_ids(am)
    assert llama_forward._key_mask(am, pos, ids.shape[1]) is None
    assert llama_forward._key_mask(_batch()[1], pos, ids.shape[1]) is not None  # left padding or holes: masked
    ((h_ref, g_ref), (h, g)), sel = _hf_and_ours(base, ids, am, pos)
    torch.testing.assert_close(h[sel], h_ref[sel], rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(base.named_parameters(), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family,kv_heads,layout", [("llama", None, "mixed"), ("qwen2", 1, "right"),
                                                    ("qwen3", 2, "right"), ("llama", 2, "packed")])
@pytest.mark.parametrize("columns", [(0, 19), (6, 19), (6, 14), (0, 1), (18, 19)])
@pytest.mark.parametrize("short_queries", [True, False])
def test_columns_give_those_states_and_their_gradients(family, kv_heads, layout, columns, short_queries,
                                                       monkeypatch):
    """``columns=(a, b)``: the states of columns [a, b) only (later columns not computed, the
    last layer's queries from a on), equal to the full forward's up to rounding, with the
    gradients of a loss on them; masked (left padding, holes), plain causal (right padding)
    and packed rows; with the last layer's queries cut to the columns (the CPU) or not (CUDA)."""
    monkeypatch.setattr(llama_forward, "_short_queries", lambda device: short_queries)
    base = backbone(_model(family, kv_heads))
    ids, am = _batch()
    if layout == "right":
        am = _right_padded(ids)
        pos = default_position_ids(am)
    elif layout == "packed":
        am = None
        pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]]).expand(5, -1)
    else:
        pos = default_position_ids(am)
    a, b = columns
    params = list(base.parameters())
    sel = (am.bool() if am is not None else torch.ones(ids.shape, dtype=torch.bool))[:, a:b]
    proj = torch.randn(5, b - a, 32, generator=torch.Generator().manual_seed(7)) * sel[..., None]
    h_full = llama_forward.hidden_states(base, ids, am, pos)[:, a:b]
    g_full = torch.autograd.grad((h_full * proj).sum(), params, allow_unused=True)
    h = llama_forward.hidden_states(base, ids, am, pos, columns=columns)
    assert h.shape == (5, b - a, 32)
    torch.testing.assert_close(h[sel], h_full[sel], rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad((h * proj).sum(), params, allow_unused=True)
    for (name, _), x, y in zip(base.named_parameters(), g, g_full):
        if y is None:
            assert x is None or not x.any(), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(llama_forward.hidden_states(base, ids, am, pos, columns=columns)[sel],
                                   h_full[sel], rtol=1e-5, atol=1e-5)


def test_columns_out_of_range_are_refused():
    base = backbone(_model("llama"))
    ids, am = _batch()
    for bad in ((3, 3), (-1, 4), (0, 20), (5, 2)):
        with pytest.raises(ValueError, match="columns"):
            llama_forward.hidden_states(base, ids, am, default_position_ids(am), columns=bad)


def test_columns_keep_activation_checkpointing():
    m = _model("llama")
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    base = backbone(m)
    ids, am = _batch()
    pos = default_position_ids(am)
    params = list(base.parameters())
    h = llama_forward.hidden_states(base, ids, am, pos, columns=(4, 17))
    g = torch.autograd.grad(h[am[:, 4:17].bool()].sum(), params, allow_unused=True)
    m.gradient_checkpointing_disable()
    h_ref = llama_forward.hidden_states(base, ids, am, pos)[:, 4:17]
    g_ref = torch.autograd.grad(h_ref[am[:, 4:17].bool()].sum(), params, allow_unused=True)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,kv_heads,layout", [("llama", None, "mixed"), ("qwen2", 1, "right")])
@pytest.mark.parametrize("short_queries", [True, False])
def test_select_gives_those_rows_and_their_gradients(family, kv_heads, layout, short_queries, monkeypatch):
    """``select=(rows, cols)`` with ``columns``: the states ``h[rows, cols]`` ``[N, H]`` (the last
    layer's work after attention on those rows only), as the full forward gives them, with
    the gradients of a loss on them; also through logprobs.hidden_states' transformers path."""
    from rlhf_fast.models import logprobs

    monkeypatch.setattr(llama_forward, "_short_queries", lambda device: short_queries)
    m = _model(family, kv_heads)
    base = backbone(m)
    ids, am = _batch()
    if layout == "right":
        am = _right_padded(ids)
    pos = default_position_ids(am)
    a, b = 5, 18
    rows, cols = am[:, a:b].bool().nonzero(as_tuple=True)
    params = list(base.parameters())
    proj = torch.randn(rows.numel(), 32, generator=torch.Generator().manual_seed(3))
    h_full = llama_forward.hidden_states(base, ids, am, pos)[:, a:b][rows, cols]
    g_full = torch.autograd.grad((h_full * proj).sum(), params, allow_unused=True)
    h = llama_forward.hidden_states(base, ids, am, pos, columns=(a, b), select=(rows, cols))
    assert h.shape == (rows.numel(), 32)
    torch.testing.assert_close(h, h_full, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad((h * proj).sum(), params, allow_unused=True)
    for (name, _), x, y in zip(base.named_parameters(), g, g_full):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    with ops.use_backend("torch"):  # transformers' forward, then the same columns and rows
        h_hf = logprobs.hidden_states(m, ids, am, pos, columns=(a, b), select=(rows, cols))
    torch.testing.assert_close(h_hf, h_full, rtol=1e-5, atol=1e-5)


def test_rope_of_queries_shorter_than_the_keys_is_that_of_their_positions():
    """The last layer's queries cover the last Tq of the keys' T positions: their RoPE (C++
    kernel, either build, forward and backward) is that of the same positions in a full one."""
    g = torch.Generator().manual_seed(0)
    B, T, Tq, d = 3, 11, 4, 8
    q = torch.randn(B, T, 2, d, generator=g).transpose(1, 2)
    k = torch.randn(B, T, 1, d, generator=g).transpose(1, 2)
    cos, sin = torch.randn(B, 1, T, d, generator=g), torch.randn(B, 1, T, d, generator=g)
    full_q, full_k = llama_forward._rope_qk(q, k, cos, sin)
    qs = q[:, :, T - Tq:].detach().requires_grad_()
    kk = k.detach().requires_grad_()
    got_q, got_k = llama_forward._rope_qk(qs, kk, cos, sin)
    assert torch.equal(got_q, full_q[:, :, T - Tq:]) and torch.equal(got_k, full_k)
    gq, gk = torch.randn(got_q.shape, generator=g), torch.randn(got_k.shape, generator=g)
    torch.autograd.backward((got_q, got_k), (gq, gk))
    ref_q, ref_k = (x.detach().requires_grad_() for x in (qs, kk))
    torch.autograd.backward(llama_forward._rope(ref_q, *llama_forward._tail(cos, sin, Tq)), gq)
    torch.autograd.backward(llama_forward._rope(ref_k, cos, sin), gk)
    torch.testing.assert_close(qs.grad, ref_q.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kk.grad, ref_k.grad, rtol=1e-6, atol=1e-6)
