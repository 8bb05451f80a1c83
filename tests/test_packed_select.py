"""The packed row's ``select`` forward (``padding_free`` / ``packing``): ``sequence_logprobs(...,
packed=True)`` asks llama_forward for the states that predict a target only
(``logprobs.packed_states``), so the last layer computes its queries from each sequence's first
such state on (``PackedSegments.queries_from``) and everything after attention for those states.

Checked: the select states and gradients against the full packed forward's (llama_forward level,
for awkward selections: a sequence with none, a one-token sequence, a first query at 0, a single
last query; with ``columns`` too); the last layer's attention calls (which queries run); and the
per-token log-probs, entropies and every parameter's gradient of packed select == packed full ==
padded, float32 and bfloat16 (its error against the float32 truth at most about the padded
path's own), MHA and GQA, rows of very different lengths and a row with no target."""

import pytest
import torch

from rlhf_fast.models import llama_forward, tiny_causal_lm
from rlhf_fast.models import logprobs as L
from rlhf_fast.models.llama_forward import PackedSegments

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
V = 97


def _model(family="llama", kv_heads=None, dtype=torch.float32, seed=0):
    m = tiny_causal_lm(V, family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                       intermediate_size=80, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norms too, so a swapped or dropped weight shows
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.to(dtype)


def _close(got, want, rel):
    """max |got − want| ≤ rel · max |want| (gradient entries near 0 sum cancelling terms)."""
    assert got.shape == want.shape
    got, want = got.detach().float(), want.detach().float()
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= rel * scale + 1e-12, (err, scale)


# ----------------------------------------------------------------------------- llama_forward level

# sequence lengths of one packed row: a one-token sequence, a long one, short ones
LENGTHS = [5, 1, 23, 2, 9, 14]
SELECTIONS = {
    "each_tail": [3, 4, 5, 18, 23, 28, 30, 35, 39, 45, 52, 53],  # the later part of each
    "none_in_some": [6, 27, 28, 30, 43, 53],  # sequences 0, 1 and 4 without a selected state
    "from_zero": [0, 1, 2, 5, 6, 29, 30, 31, 40],  # first queries at each sequence's start
    "last_only": [4, 28, 30, 39, 53],  # one query per sequence, its last
}


def _packed_row(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (1, sum(LENGTHS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids, pos


def _states_and_grads(base, fn):
    h = fn()
    proj = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
    params = list(base.parameters())
    return h, torch.autograd.grad((h * proj).sum(), params, allow_unused=True)


@pytest.mark.parametrize("bias", [False, True], ids=["cpu_mask", "lower_right_bias"])
@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("which", sorted(SELECTIONS))
def test_select_states_and_gradients_equal_the_full_packed_forward(kv_heads, which, bias, monkeypatch):
    """Also with the shortened queries' mask as torch's lower-right causal bias (off the CPU)."""
    monkeypatch.setattr(llama_forward, "_lower_right_bias", lambda device: bias)
    base = L.backbone(_model(kv_heads=kv_heads))
    ids, pos = _packed_row()
    cols = torch.tensor(SELECTIONS[which])
    assert isinstance(llama_forward._key_mask(None, pos, ids.shape[1]), PackedSegments)
    sel = (torch.zeros_like(cols), cols)
    h_full, g_full = _states_and_grads(base, lambda: llama_forward.hidden_states(base, ids, None, pos)[sel])
    h, g = _states_and_grads(base, lambda: llama_forward.hidden_states(base, ids, None, pos, select=sel))
    _close(h, h_full, 1e-5)
    for (name, _), x, y in zip(base.named_parameters(), g, g_full):
        assert (x is None) == (y is None), name
        if y is not None:
            _close(x, y, 1e-5)


def test_select_with_columns_equals_the_full_packed_forward():
    """``columns`` starting after 0 (the dense-mask rows of the last layer, not queries_from)
    with ``select`` counted from the columns' start."""
    base = L.backbone(_model(kv_heads=2))
    ids, pos = _packed_row()
    cols = torch.tensor(SELECTIONS["each_tail"])
    h_full = llama_forward.hidden_states(base, ids, None, pos)[0, cols]
    with torch.no_grad():
        h = llama_forward.hidden_states(base, ids, None, pos, columns=(3, 54), select=(torch.zeros_like(cols),
                                                                                       cols - 3))
    _close(h, h_full.detach(), 1e-5)


def test_queries_from_gives_each_sequences_first_selected_query():
    seg = llama_forward._key_mask(None, _packed_row()[1], sum(LENGTHS))
    assert seg.lengths == LENGTHS and seg.first_queries is None
    # sequences start at 0, 5, 6, 29, 31, 40; a sequence without a selected state: its length
    assert seg.queries_from(torch.tensor(SELECTIONS["each_tail"])).first_queries == [3, 0, 12, 1, 4, 5]
    assert seg.queries_from(torch.tensor(SELECTIONS["none_in_some"])).first_queries == [5, 1, 0, 1, 9, 3]
    assert seg.queries_from(torch.tensor([53, 0])).first_queries == [0, 1, 23, 2, 9, 13]  # any order
    assert seg.first_queries is None  # a new structure, the layers before keep every query


def test_the_last_layer_runs_only_the_queries_select_needs(monkeypatch):
    """Layer 0: one causal sdpa per sequence over all of it; the last layer: per sequence with a
    selected state, its queries from the first selected one on (none for the others)."""
    base = L.backbone(_model())
    ids, pos = _packed_row()
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(llama_forward.F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: calls.append((q.shape[2], k.shape[2])) or sdpa(q, k, *a, **kw))
    cols = torch.tensor(SELECTIONS["none_in_some"])
    with torch.no_grad():
        llama_forward.hidden_states(base, ids, None, pos, select=(torch.zeros_like(cols), cols))
    assert calls == [(n, n) for n in LENGTHS] + [(23, 23), (1, 2), (11, 14)]


def test_sequence_logprobs_packed_asks_for_the_target_states_only(monkeypatch):
    """The packed branch passes ``select`` (the packed index of each state that predicts a
    target); with no target at all, the full forward (every weight keeps its zero gradient)."""
    m = _model()
    ids, am, rm = _batch()
    seen, real = [], L.hidden_states
    monkeypatch.setattr(L, "hidden_states", lambda *a, **kw: seen.append(kw.get("select")) or real(*a, **kw))
    L.sequence_logprobs(m, ids, am, response_mask=rm, packed=True)
    pk = L.pack_targets(ids, am, L._target_mask(am, rm))
    assert len(seen) == 1 and torch.equal(seen[0][1], pk.src) and not seen[0][0].any()
    seen.clear()
    lp = L.sequence_logprobs(m, ids, am, response_mask=torch.zeros_like(rm), packed=True)
    assert seen == [None] and not lp.any()
    lp.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


# ----------------------------------------------------------------------------- sequence_logprobs

def _batch(B=6, T=40, seed=0):
    """Right-padded rows of very different lengths (3 to 40 tokens), responses of 1 to 30 tokens;
    row 4 has no response token (no target)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    lengths, prompts = [40, 3, 22, 9, 15, 31], [10, 2, 21, 1, 15, 6]
    am = torch.zeros(B, T, dtype=torch.long)
    rm = torch.zeros(B, T, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        am[i, :n] = 1
        rm[i, p:n] = 1
    rm[4] = 0
    return ids * am, am, rm


def _full_packed_states(model, pk):
    """The packed path before ``select``: every state of the packed row, then the target ones."""
    return L.hidden_states(model, pk.ids, None, pk.position_ids)[0][pk.src]


def _logp_and_grads(model, ids, am, rm, packed):
    model.zero_grad(set_to_none=True)
    lp, ent = L.sequence_logprobs(model, ids, am, response_mask=rm, packed=packed, return_entropy=True)
    w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3))
    ((lp * w).sum() + ent.sum()).backward()
    return lp.detach(), ent.detach(), [p.grad.float().clone() for p in model.parameters()]


def _three_ways(model, monkeypatch):
    """(padded, packed full, packed select) log-probs, entropies and gradients."""
    ids, am, rm = _batch()
    padded = _logp_and_grads(model, ids, am, rm, False)
    select = _logp_and_grads(model, ids, am, rm, True)
    with monkeypatch.context() as mp:
        mp.setattr(L, "packed_states", _full_packed_states)
        full = _logp_and_grads(model, ids, am, rm, True)
    assert not padded[0][4].any() and not select[0][4].any() and select[0][0].count_nonzero() == 30
    return padded, full, select


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 2), ("qwen3", 1)])
def test_packed_select_equals_packed_full_and_padded_float32(family, kv_heads, monkeypatch):
    model = _model(family, kv_heads)
    padded, full, select = _three_ways(model, monkeypatch)
    for other in (full, padded):
        torch.testing.assert_close(select[0], other[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(select[1], other[1], rtol=1e-5, atol=1e-5)
        for (name, _), x, y in zip(model.named_parameters(), select[2], other[2]):
            _close(x, y, 1e-5)


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 2)])
def test_packed_select_bfloat16_error_is_that_of_the_padded_path(family, kv_heads, monkeypatch):
    """bf16 rounds each path differently (other matmul shapes): each is compared with the
    float32 truth, and packed select's error is at most about twice the padded path's (and the
    packed full path's) plus a small floor."""
    truth = _three_ways(_model(family, kv_heads), monkeypatch)[0]
    model = _model(family, kv_heads, dtype=torch.bfloat16)
    padded, full, select = _three_ways(model, monkeypatch)
    for i in (0, 1):
        err = lambda out: float((out[i] - truth[i]).abs().max())  # noqa: E731
        assert err(select) <= 2 * max(err(padded), err(full)) + 1e-3 * float(truth[i].abs().max()), \
            (i, err(select), err(padded), err(full))
    for (name, _), s, p, f, t in zip(model.named_parameters(), select[2], padded[2], full[2], truth[2]):
        ours, theirs = (s - t).norm(), max((p - t).norm(), (f - t).norm())
        assert ours <= 2 * theirs + 1e-3 * t.norm(), (name, float(ours), float(theirs))


@pytest.mark.cuda
@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 2)])
def test_cuda_packed_select_equals_padded(family, kv_heads):
    """On the GPU (fp32, TF32 off) the packed row's selected last layer takes sdpa's lower-right
    causal bias for real: log-probs, entropies and gradients equal the padded path's."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = _model(family, kv_heads).cuda()
        ids, am, rm = (t.cuda() for t in _batch())
        outs = []
        for packed in (False, True):
            model.zero_grad(set_to_none=True)
            lp, ent = L.sequence_logprobs(model, ids, am, response_mask=rm, packed=packed, return_entropy=True)
            w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3)).cuda()
            ((lp * w).sum() + ent.sum()).backward()
            outs.append((lp.detach(), ent.detach(), [p.grad.float().clone() for p in model.parameters()]))
        (lp0, e0, g0), (lp1, e1, g1) = outs
        torch.testing.assert_close(lp1, lp0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(e1, e0, rtol=1e-4, atol=1e-4)
        for x, y in zip(g1, g0):
            _close(x, y, 1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
