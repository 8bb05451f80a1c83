"""DPO ``prefix_sharing``: each pair of a micro-batch laid out once in one packed row, as
``[prompt, chosen, rejected]``, the rejected tokens attending to the prompt and themselves only,
their position ids continuing from the prompt's end.

The attention structure (llama_forward.SharedPrefixSegments) against sdpa under its dense bool
mask and against a hand-written one (forward and backward); each branch's hidden states against
transformers' forward of that branch's row alone (llama, qwen2 with grouped KV heads; with
columns / select and activation checkpointing); the packed row's layout; per-token log-probs and
statistics of awkward pairs (1-token prompts and responses, chosen == rejected, shared first
response tokens, very unequal lengths, keep_end rows with different prompt tokens) against the
padded path; whole DPO steps (sigmoid / ipo / simpo / orpo, ld_alpha, WPO, precompute_ref_logps,
two micro-batches, balanced and keep_end truncation, qwen2) against the padded and padding_free
steps: metrics, every parameter's gradient, eval metrics; one forward of the shorter row for the
policy and the reference; refusals named."""

import random

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord
from rlhf_fast.models import llama_forward, tiny_causal_lm
from rlhf_fast.models import logprobs as L
from rlhf_fast.models.llama_forward import SharedPrefixSegments
from rlhf_fast.trainers import dpo as dpo_mod
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, truncate_pair
from rlhf_fast.trainers.packing import check_prefix_shareable, packed_target_states
from rlhf_fast.trainers.sft import _Batches
from tests.test_dpo import _step_grads
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2,vocab_size=300"
TINY_QWEN2 = "tiny:qwen2:hidden_size=32,num_layers=2,num_heads=4,num_kv_heads=2,vocab_size=300"
V = 97
# awkward groups: 1-token prefix and branches, an empty branch, no prefix, a long second branch
GROUPS = [(1, (1, 1)), (4, (0, 3)), (0, (3, 2)), (5, (2, 0)), (3, (6, 1)), (2, (1, 7)), (6, ())]

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _model(family="llama", kv_heads=None, seed=0):
    m = tiny_causal_lm(V, family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                       intermediate_size=80, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norms too, so a swapped weight shows
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _close(got, want, rel):
    """max |got − want| ≤ rel · max |want| (gradient entries near 0 sum cancelling terms)."""
    assert got.shape == want.shape
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= rel * scale + 1e-12, (err, scale)


# ----------------------------------------------------------------------------- the attention structure


def _spec_mask(groups):
    """The mask the layout means, written out token by token: ``[T, T]`` bool."""
    toks = []  # (group, branch (0: prefix), position)
    for gi, (p, branches) in enumerate(groups):
        toks += [(gi, 0, t) for t in range(p)]
        for bi, n in enumerate(branches, 1):
            toks += [(gi, bi, p + t) for t in range(n)]
    T = len(toks)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i, (gi, bi, pi) in enumerate(toks):
        for j, (gj, bj, pj) in enumerate(toks):
            m[i, j] = gi == gj and (bj == 0 or bj == bi) and pj <= pi
    return m


def test_segments_dense_mask_and_positions_are_the_layout():
    seg = SharedPrefixSegments(GROUPS)
    assert seg.total == sum(p + sum(b) for p, b in GROUPS) and seg.max_len == 9
    assert torch.equal(seg.dense()[0, 0], _spec_mask(GROUPS))
    assert seg.position_ids()[0, :7].tolist() == [0, 1, 1, 0, 1, 2, 3]  # (1, (1, 1)) then (4, (0, 3)) starts
    assert seg.position_ids()[0, 7:10].tolist() == [4, 5, 6]  # the rejected branch continues at p = 4


@pytest.mark.parametrize("bias", [False, True], ids=["bool_mask", "lower_right_bias"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_equals_dense_mask_sdpa_forward_and_backward(kv_heads, bias, monkeypatch):
    """One causal sdpa per prefix + first branch, the other branches over cat(prefix, branch)
    keys: outputs and q / k / v gradients equal sdpa under the dense mask — with the CPU's bool
    mask and with the lower-right causal bias the GPU path passes (run here on the CPU)."""
    monkeypatch.setattr(llama_forward, "_lower_right_bias", lambda device: bias)
    seg = SharedPrefixSegments(GROUPS)
    T, d = seg.total, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, T, d, generator=g, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, T, d, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(1, 4, T, d, generator=g)
    out = llama_forward._attention(q, k, v, seg, 0.3)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    rep = [t.repeat_interleave(4 // kv_heads, 1) for t in (k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(q, *rep, attn_mask=_spec_mask(GROUPS), scale=0.3)
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_segments_are_refused():
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        SharedPrefixSegments([(2, (-1, 3))])
    with pytest.raises(TypeError, match="groups must be"):
        SharedPrefixSegments([3])
    base = L.backbone(_model())
    seg = SharedPrefixSegments([(2, (1, 1))])
    with pytest.raises(ValueError, match="one packed row of 4 tokens"):
        llama_forward.hidden_states(base, torch.ones(1, 5, dtype=torch.long), None, None, segments=seg)
    with pytest.raises(ValueError, match="one packed row"):
        llama_forward.hidden_states(base, torch.ones(2, 2, dtype=torch.long), None, None, segments=seg)


def _groups_row(groups, seed=0):
    """Random ids of a shared-prefix row of ``groups`` and, per group and branch, the indices of
    the row's tokens that make that branch's own row (prefix + branch)."""
    seg = SharedPrefixSegments(groups)
    ids = torch.randint(3, V, (1, seg.total), generator=torch.Generator().manual_seed(seed))
    rows, o = [], 0
    for p, branches in groups:
        s = o + p
        for n in branches or (0,):
            rows.append(list(range(o, o + p)) + list(range(s, s + n)))
            s += n
        o = s
    return seg, ids, [r for r in rows if r]


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 2)])
def test_each_branch_gets_the_states_of_its_own_row(family, kv_heads):
    """The states of prefix + branch in the shared row equal transformers' forward of that row
    alone (positions 0 .. p + l − 1), and the gradients of the whole row equal the sum of the
    separate rows' (a prefix state used by both branches gets both gradients)."""
    base = L.backbone(_model(family, kv_heads))
    params = list(base.parameters())
    seg, ids, rows = _groups_row(GROUPS)
    h = llama_forward.hidden_states(base, ids, None, None, segments=seg)[0]
    g = torch.Generator().manual_seed(5)
    proj = [torch.randn(len(r), h.shape[-1], generator=g) for r in rows]
    loss = sum((h[r] * w).sum() for r, w in zip(rows, proj))
    got = torch.autograd.grad(loss, params)
    want_loss = 0.0
    for r, w in zip(rows, proj):
        alone = base(input_ids=ids[:, r], use_cache=False).last_hidden_state[0]
        torch.testing.assert_close(h[r], alone, rtol=1e-5, atol=1e-5)
        want_loss = want_loss + (alone * w).sum()
    for a, b in zip(got, torch.autograd.grad(want_loss, params)):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("short_queries", [True, False])
def test_columns_and_select_with_segments(short_queries, monkeypatch):
    """``columns`` (the row cut, the last layer's queries from ``a``) and ``select`` give the
    full forward's states there."""
    monkeypatch.setattr(llama_forward, "_short_queries", lambda device: short_queries)
    base = L.backbone(_model("qwen2", 2))
    seg, ids, _ = _groups_row(GROUPS, seed=3)
    with torch.no_grad():
        full = llama_forward.hidden_states(base, ids, None, None, segments=seg)
        a, b = 5, seg.total - 4
        cut = llama_forward.hidden_states(base, ids, None, None, columns=(a, b), segments=seg)
        cols = torch.tensor([0, 3, 3, 7, b - a - 1])
        sel = llama_forward.hidden_states(base, ids, None, None, columns=(a, b), select=(torch.zeros_like(cols), cols),
                                          segments=seg)
    torch.testing.assert_close(cut, full[:, a:b], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sel, full[0, a + cols], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [[0, 1, 9, 10, 11, 20, 30], [2, 5, 6, 14, 15, 16, 17, 24, 25, 37], [36]])
def test_select_computes_the_needed_queries_only(cols, monkeypatch):
    """``select`` alone: the last layer's attention runs each piece's queries from its first
    selected position on only (fewer sdpa query rows), and the selected states and their
    gradients equal the full forward's."""
    base = L.backbone(_model("qwen2", 2))
    params = list(base.parameters())
    seg, ids, _ = _groups_row(GROUPS, seed=4)
    cols = torch.tensor(cols)
    rows = torch.zeros_like(cols)
    w = torch.randn(len(cols), 32, generator=torch.Generator().manual_seed(2))
    full = llama_forward.hidden_states(base, ids, None, None, segments=seg)[0, cols]
    want = torch.autograd.grad((full * w).sum(), params)
    queries, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(llama_forward.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: queries.append(q.shape[2]) or sdpa(q, *a, **k))
    sel = llama_forward.hidden_states(base, ids, None, None, select=(rows, cols), segments=seg)
    torch.testing.assert_close(sel, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad((sel * w).sum(), params), want):
        _close(a, b, 1e-5)
    n = sum(1 for x in seg.pieces() if x)
    first, last = queries[:n], queries[n:]  # the first layer: every query of every piece
    assert sum(first) == seg.total and len(cols) <= sum(last) < seg.total


def test_activation_checkpointing_is_kept_with_segments():
    m = _model()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    base = L.backbone(m)
    seg, ids, _ = _groups_row(GROUPS)
    params = list(base.parameters())
    calls = []
    ckpt = base.layers[0]._gradient_checkpointing_func
    base.layers[0]._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or ckpt(*a, **k)
    got = torch.autograd.grad(llama_forward.hidden_states(base, ids, None, None, segments=seg).square().sum(), params)
    assert calls
    base.layers[0]._gradient_checkpointing_func = ckpt
    m.gradient_checkpointing_disable()
    want = torch.autograd.grad(llama_forward.hidden_states(base, ids, None, None, segments=seg).square().sum(), params)
    for a, b in zip(got, want):
        _close(a, b, 1e-6)


# ----------------------------------------------------------------------------- the packed row of pairs


# (prompt, chosen, rejected) token lists: 1-token prompt and responses, chosen == rejected, first
# response tokens shared, very unequal lengths
PAIRS = [([5], [7], [9]), ([3, 4, 5, 6], [8, 9, 10], [8, 9, 11, 12, 13]), ([1, 2, 3], [4], [4]),
         ([2, 2], list(range(10, 40)), [40]), ([6] * 9, [11, 12], [13]), ([7], [9, 9, 9], [9, 9, 9])]


def _pair_batch(pairs, rejected_prompts=None):
    """Chosen rows then rejected rows, right-padded (collate_pairs' layout)."""
    items = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    for it, rp in zip(items, rejected_prompts or []):
        if rp is not None:
            it["rejected_prompt"] = rp
    return dpo_mod.collate_pairs(items, 0)


def test_packed_row_layout():
    """Each pair once: the tokens the two rows share, the rest of the chosen row, the rest of
    the rejected one; positions as in each row; each target's state is its predecessor's."""
    b = _pair_batch(PAIRS[:3])
    target = L._target_mask(b["attention_mask"], b["response_mask"])
    pk = L.pack_shared_targets(b["input_ids"], b["attention_mask"], target)
    assert pk.segments.groups == [(1, (1, 1)), (6, (1, 3)), (4, (0, 0))]
    assert pk.ids[0].tolist() == [5, 7, 9] + [3, 4, 5, 6, 8, 9, 10, 11, 12, 13] + [1, 2, 3, 4]
    assert pk.position_ids[0].tolist() == [0, 1, 1] + [0, 1, 2, 3, 4, 5, 6, 6, 7, 8] + [0, 1, 2, 3]
    # the prompt's last state (packed 0) predicts both chosen[0] and rejected[0]
    pred = {(int(r), int(c)): int(s) for r, c, s in zip(pk.rows, pk.cols, pk.src)}
    assert pred[(0, 1)] == 0 and pred[(3, 1)] == 0
    assert pred[(4, 6)] == 8 and pred[(4, 7)] == 10  # rejected's own token follows its own state
    assert pred[(2, 3)] == pred[(5, 3)] == 15  # chosen == rejected: one state for both
    # every target's state is that of its predecessor in its own row: same token, same position
    assert torch.equal(pk.ids[0, pk.src], b["input_ids"][pk.rows, pk.cols - 1])
    assert torch.equal(pk.position_ids[0, pk.src], pk.cols - 1)
    with pytest.raises(ValueError, match="pairs of rows"):
        L.pack_shared_targets(b["input_ids"][:5], b["attention_mask"][:5], target[:5])


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 2)])
@pytest.mark.parametrize("full_rows", [False, True], ids=["responses", "orpo_rows"])
def test_token_values_and_gradients_equal_the_padded(family, kv_heads, full_rows):
    """Log-probs, entropy, top-1 and mean logit at every scored token, and the gradients of the
    log-probs, equal the padded path's — also for keep_end rows whose prompts differ (shared
    only as far as they agree) and with ORPO's whole chosen rows."""
    m = _model(family, kv_heads)
    params = list(m.parameters())
    b = _pair_batch(PAIRS + [([3, 4, 5, 6, 7], [8], [9, 9])], rejected_prompts=[None] * 6 + [[5, 6, 7]])
    rm = b["response_mask"].clone()
    if full_rows:
        rm[:7] = b["attention_mask"][:7]
    outs = []
    for kw in ({}, {"prefix_sharing": True}):
        out = L.sequence_logprobs(m, b["input_ids"], b["attention_mask"], response_mask=rm, return_entropy=True,
                                  return_top1=True, return_mean_logit=True, **kw)
        w = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(3))
        outs.append((out, torch.autograd.grad((out[0] * w).sum(), params)))
    (want, gw), (got, gg) = outs
    assert (want[0] != 0).sum() == L._target_mask(b["attention_mask"], rm).sum()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    for a, e in zip(gg, gw):
        _close(a, e, 1e-5)


def test_wpo_states_are_those_of_the_log_probs():
    """packed_target_states(prefix_sharing) feeds the LM head the states sequence_logprobs uses:
    the WPO path's log-probs equal token_logps' bit for bit, and the padded path's to rounding."""
    m = _model()
    b = _pair_batch(PAIRS)
    (ta, la), (tb, lb) = (dpo_mod.wpo_token_logps(m, b, **kw) for kw in ({}, {"prefix_sharing": True}))
    torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    assert torch.equal(tb, dpo_mod.token_logps(m, b, prefix_sharing=True))
    target = L._target_mask(b["attention_mask"], b["response_mask"])
    h, labels, tr, tc = packed_target_states(m, b["input_ids"], b["attention_mask"], target, prefix_sharing=True)
    assert torch.equal(labels, b["input_ids"][tr, tc]) and h.shape == (int(target.sum()), 32)


# ----------------------------------------------------------------------------- whole steps


def _items(max_len, mode, seed=0):
    """Token-level pairs with the awkward shapes above plus random ones, long prompts cut by
    ``truncate_pair(max_len, mode)`` (keep_end: rows of unequal responses keep different prompt
    tokens)."""
    rng = random.Random(seed)
    words = lambda k: [rng.randrange(3, 300) for _ in range(k)]  # noqa: E731
    pairs = [(p, c, r) for p, c, r in PAIRS]
    for i in range(10):
        shared = words(rng.randint(0, 2))
        pairs.append((words(rng.randint(1, 40)), shared + words(rng.randint(1, 20)),
                      shared + words(rng.randint(1, 20 if i % 2 else 2))))
    out = []
    for i, (p, c, r) in enumerate(pairs):
        cut = truncate_pair(p, c, r, max_len, mode)
        out.append({**cut, "margin": 0.0, "weight": 1.0 + (i % 3)})
    return out


def _trainer(tmp_path, tok, name, items, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=8, lr=3e-3, warmup_steps=0, eval_every=0,
                log_every=1, max_len=48, max_steps=4, device="cpu", grad_clip=0.0, beta=0.3)
    base.update(kw)
    records = [PairRecord("say red", "blue cat", "green dog")] * 4
    tr = DPOTrainer(DPOConfig(**base), train_records=records, eval_records=[], tokenizer=tok)
    tr.train_items, tr.eval_items = list(items), list(items[::2])
    tr.batches = _Batches(len(items), tr.cfg.batch_size, tr.cfg.seed)
    return tr


def _triplets(tmp_path, tok, items, **kw):
    """(padded, padding_free, prefix_sharing) trainers with the same weights and pairs; the
    policy's head sharpened (WPO weights far from 1), a separate reference nudged off the policy
    (rewards not 0); precomputed reference log-probs recomputed for the pairs first."""
    out = []
    for mode in ({}, {"padding_free": True}, {"prefix_sharing": True}):
        tr = _trainer(tmp_path, tok, "x" + "".join(mode), items, **kw, **mode)
        if tr.cfg.precompute_ref_logps:  # of these pairs, by the initial policy (before the head changes)
            tr._precompute(tr.model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            tr.model.get_output_embeddings().weight.mul_(8.0)
            if isinstance(tr.reference, torch.nn.Module) and tr.reference is not tr.model:
                for p in tr.reference.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.append(tr)
    return out


STEP_CASES = [
    dict(loss_type="sigmoid", rpo_alpha=0.5),
    dict(loss_type="ipo", ld_alpha=0.5, grad_accum=2, batch_size=4, truncation_mode="keep_end"),
    dict(loss_type="sigmoid", use_weighting=True, precompute_ref_logps=True),
    dict(loss_type="simpo", cpo_alpha=0.5),
    dict(loss_type="orpo", beta=0.5, truncation_mode="keep_end"),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], model=TINY_QWEN2, use_weighting=True, ld_alpha=0.3),
]
STEP_IDS = ["sigmoid_rpo", "ipo_ld_accum_keep_end", "wpo_precomputed", "simpo", "orpo_keep_end", "qwen2_wpo_ld_sft"]


@pytest.mark.parametrize("kw", STEP_CASES, ids=STEP_IDS)
def test_step_and_eval_equal_the_padded(tmp_path, tok, kw):
    """One optimizer step: every metric and every parameter's gradient equal the padded step's
    and the padding_free step's; then the eval metrics equal too."""
    kw = dict(kw)
    items = _items(48, kw.pop("truncation_mode", "balanced"))
    pad, pf, ps = _triplets(tmp_path, tok, items, **kw)
    (ma, ga), (mb, gb), (mc, gc) = _step_grads(pad), _step_grads(pf), _step_grads(ps)
    assert ma.keys() == mc.keys()
    for k in ma:
        assert mc[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k
        assert mc[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), k
    if not ps.cfg.reference_free:
        assert abs(ma["rewards/margin"]) > 1e-4  # the reference differs from the policy: a real test
    for x, y, z in zip(ga, gb, gc):
        _close(z, x, 2e-5)
        _close(z, y, 2e-5)
    ea, ec = pad.evaluate(), ps.evaluate()
    assert ea.keys() == ec.keys() and "eval_loss" in ea
    for k in ea:
        assert ec[k] == pytest.approx(ea[k], rel=1e-4, abs=1e-6), k


def test_policy_and_reference_run_one_shorter_row(tmp_path, tok, monkeypatch):
    """Each micro-batch is one forward of the shared-prefix row for the policy and one for the
    reference, with every prompt token once: fewer tokens than the padding-free row."""
    items = _items(48, "balanced")[:8]
    shapes = []
    real = L.hidden_states

    def spy(model, input_ids, *a, **k):
        shapes.append((tuple(input_ids.shape), k.get("segments") is not None))
        return real(model, input_ids, *a, **k)

    monkeypatch.setattr(L, "hidden_states", spy)
    pf, ps = (_trainer(tmp_path, tok, n, items, **{n: True}) for n in ("padding_free", "prefix_sharing"))
    pf.train_step()
    assert len(shapes) == 2 and not any(s for _, s in shapes)
    n_free = shapes[0][0][1]
    shapes.clear()
    ps.train_step()
    assert len(shapes) == 2 and all(s for _, s in shapes) and all(sh[0] == 1 for sh, _ in shapes)
    saved = sum(len(it["prompt"]) for it in items)  # no keep_end here: both rows share the whole prompt
    assert shapes[0][0][1] <= n_free - saved


# ----------------------------------------------------------------------------- refusals


def test_config_and_models_it_cannot_run_are_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="prefix_sharing"):
        DPOConfig(prefix_sharing="yes")
    assert DPOConfig().prefix_sharing is False
    both = _trainer(tmp_path, tok, "both", _items(48, "balanced")[:8], prefix_sharing=True, padding_free=True)
    assert both.cfg.pack_kwargs == {"packed": True, "prefix_sharing": True}  # accepted: prefix sharing packs anyway
    m = L.unwrap(both.model)
    from rlhf_fast.ops import use_backend

    with use_backend("torch"), pytest.raises(ValueError, match="prefix_sharing: true needs .*torch backend"):
        check_prefix_shareable("prefix_sharing", 48, m)
    with use_backend("torch"), pytest.raises(ValueError, match="prefix_sharing"):
        L.sequence_logprobs(m, torch.ones(2, 3, dtype=torch.long), prefix_sharing=True)
    m.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="prefix_sharing: true needs .*final_logit_softcapping"):
        check_prefix_shareable("prefix_sharing", 48, m)
    m.config.final_logit_softcapping = None
    check_prefix_shareable("prefix_sharing", 48, None, m)
    # a peft (LoRA) policy runs transformers' forward: refused when the trainer starts
    with pytest.raises(ValueError, match="prefix_sharing: true needs .*peft"):
        _trainer(tmp_path, tok, "lora", _items(48, "balanced")[:4], prefix_sharing=True, lora={})
    seg = SharedPrefixSegments([(2, (1, 1))])
    m.model.layers[0].register_forward_hook(lambda *a: None)  # a hook llama_forward would skip
    with pytest.raises(ValueError, match="prefix_sharing: the shared-prefix row runs only through"):
        L.hidden_states(m, torch.ones(1, 4, dtype=torch.long), None, segments=seg)


# ----------------------------------------------------------------------------- the benchmark's switch


def test_e2e_dpo_step_takes_prefix_sharing():
    """benchmarks/e2e.py's ``dpo_prefix_sharing`` runs our DPO step with it: the same loss as
    without, the reference phase still timed (its call passes the keyword through the wrapper)."""
    from dataclasses import replace

    from rlhf_fast.benchmarks import e2e

    with pytest.raises(ValueError, match="dpo_prefix_sharing"):
        e2e.E2EConfig(dpo_prefix_sharing="yes")
    cfg = e2e.E2EConfig.quick()
    plain, shared = e2e.RLHFFastDPOStep(cfg), e2e.RLHFFastDPOStep(replace(cfg, dpo_prefix_sharing=True))
    assert shared.trainer.cfg.prefix_sharing and not plain.trainer.cfg.prefix_sharing
    a, b = plain.step(), shared.step()
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["reference"] > 0 and b["tokens"] == a["tokens"]


# ----------------------------------------------------------------------------- groups of K rows; the reward model


def test_groups_of_rows_read_through_left_padding_and_holes():
    """pack_shared_rows with groups of 3 rows, left padding and a hole: each row's attended
    tokens in order, the common leading tokens once, ``at`` the packed place of each token (-1 at
    padding), positions each token's place among its row's attended tokens."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 9, 0, 0, 0], [5, 0, 6, 7, 4, 0],
                        [3, 4, 0, 0, 0, 0], [1, 2, 3, 0, 0, 0], [3, 4, 5, 6, 0, 0]])
    am = (ids != 0).long()
    sr = L.pack_shared_rows(ids, am, torch.tensor([[0, 1, 2], [3, 5, 4]]))
    assert sr.segments.groups == [(2, (2, 1, 2)), (0, (2, 4, 3))]
    assert sr.ids[0].tolist() == [5, 6, 7, 8, 9, 7, 4] + [3, 4, 3, 4, 5, 6, 1, 2, 3]
    assert sr.position_ids[0].tolist() == [0, 1, 2, 3, 2, 2, 3] + [0, 1, 0, 1, 2, 3, 0, 1, 2]
    assert sr.at[0].tolist() == [-1, -1, 0, 1, 2, 3] and sr.at[2].tolist() == [0, -1, 1, 5, 6, -1]
    assert sr.at[4].tolist() == [13, 14, 15, -1, -1, -1]
    for rows in (torch.tensor([[0, 1], [2, 3], [4, 4]]), torch.arange(5).view(5, 1)):
        with pytest.raises(ValueError, match="each of the 6 rows once"):
            L.pack_shared_rows(ids, am, rows)


def _reward_model(family, kv_heads):
    from rlhf_fast.models.tiny import tiny_reward_model

    m = tiny_reward_model(V, family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                          intermediate_size=80)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 2)])
def test_reward_scores_and_gradients_equal_the_padded(family, kv_heads):
    """The score head at each row's last token of the shared row equals reward_scores of the
    padded batch (rows 2i, 2i + 1 a pair, as the reward trainer lays them out), gradients too."""
    from rlhf_fast.feedback.formats import pad_right
    from rlhf_fast.models.loading import reward_scores
    from rlhf_fast.trainers.reward import shared_reward_scores

    m = _reward_model(family, kv_heads)
    params = list(m.parameters())
    seqs = [s for p, c, r in PAIRS + [([3, 4, 5, 6, 7], [8], [9, 9])] for s in (p + c, p + r)]
    seqs[-1] = [5, 6, 7, 9, 9]  # a pair cut to keep its end: different prompt tokens, shared as far as they agree
    ids, am = pad_right(seqs, 0)
    w = torch.randn(len(seqs), generator=torch.Generator().manual_seed(0))
    want = reward_scores(m, ids, am)
    got = shared_reward_scores(m, ids, am, torch.arange(len(seqs)).view(-1, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad((got * w).sum(), params), torch.autograd.grad((want * w).sum(), params)):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(grad_accum=2, batch_size=4, center_rewards_coefficient=0.1)],
                         ids=["plain", "accum_centred"])
def test_reward_step_and_eval_equal_the_padded(tmp_path, tok, kw):
    """RewardConfig.prefix_sharing: one optimizer step's metrics and gradients, and the eval
    metrics, equal the padded trainer's."""
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

    records = synthetic_preference_records(24, seed=3)
    out = []
    for shared in (False, True):
        base = dict(model="tiny:qwen2:hidden_size=32,num_layers=2,num_heads=4,num_kv_heads=2",
                    output_dir=str(tmp_path / f"rm{int(shared)}"), batch_size=8, lr=3e-3, warmup_steps=0,
                    eval_every=0, log_every=1, max_len=16, max_steps=3, device="cpu", grad_clip=0.0,
                    prefix_sharing=shared)
        base.update(kw)
        tr = RewardTrainer(RewardConfig(**base), train_records=records, eval_records=records[:9], tokenizer=tok)
        assert any(len(it["seqs"][0]) == 16 for it in tr.train_items)  # some rows cut to max_len (end kept)
        out.append((tr, _step_grads(tr)))
    _assert_same_step_and_eval(*out)


def _assert_same_step_and_eval(padded, shared):
    """Two reward trainers' ``(trainer, (step metrics, gradients))``: the same metrics and
    gradients, and the same eval metrics."""
    (pad, (ma, ga)), (ps, (mb, gb)) = padded, shared
    assert ma.keys() == mb.keys()
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k
    for x, y in zip(ga, gb):
        _close(y, x, 2e-5)
    ea, eb = pad.evaluate(), ps.evaluate()
    for k in ea:
        assert eb[k] == pytest.approx(ea[k], rel=1e-4, abs=1e-6), k


def _rankings(n, seed=0):
    """Rankings of 2 to 4 responses (some sharing their first words) under long-ish prompts."""
    import random

    from rlhf_fast.feedback.formats import RankingRecord

    rng = random.Random(seed)
    words = "red blue green cat dog sun moon one two three".split()
    out = []
    for i in range(n):
        k = 2 + i % 3
        responses = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(k)]
        ranking = list(range(k))
        rng.shuffle(ranking)
        out.append(RankingRecord(" ".join(rng.choice(words) for _ in range(6)), responses, ranking))
    return out


def test_reward_rankings_step_and_eval_equal_the_padded(tmp_path, tok, monkeypatch):
    """RewardConfig.prefix_sharing with data_kind rankings (Plackett-Luce): each ranking's K
    responses one group of the shared row (2 to 4 rows, -1 filling the shorter groups); one step's
    metrics and gradients, and the eval metrics, equal the padded trainer's."""
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer

    records = _rankings(12, seed=4)
    out, groups = [], []
    for shared in (False, True):
        cfg = RewardConfig(model="tiny:qwen2:hidden_size=32,num_layers=2,num_heads=4,num_kv_heads=2",
                           data_kind="rankings", output_dir=str(tmp_path / f"rk{int(shared)}"), batch_size=6, lr=3e-3,
                           warmup_steps=0, eval_every=0, log_every=1, max_len=24, max_steps=3, device="cpu",
                           grad_clip=0.0, center_rewards_coefficient=0.1, prefix_sharing=shared)
        tr = RewardTrainer(cfg, train_records=records, eval_records=records[:5], tokenizer=tok)
        if shared:
            real = L.pack_shared_rows
            monkeypatch.setattr(L, "pack_shared_rows", lambda ids, am, g: groups.append(g) or real(ids, am, g))
        out.append((tr, _step_grads(tr)))
    assert groups and {int(n) for g in groups for n in (g >= 0).sum(1)} == {2, 3, 4}  # -1 fills the shorter ones
    _assert_same_step_and_eval(*out)


def test_reward_refusals_name_prefix_sharing(tmp_path, tok):
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

    with pytest.raises(ValueError, match="prefix_sharing applies to pairs and rankings"):
        RewardConfig(prefix_sharing=True, data_kind="scores")
    RewardConfig(prefix_sharing=True, data_kind="rankings", rankings_as_pairs=True)
    RewardConfig(prefix_sharing=True, data_kind="rankings")
    with pytest.raises(ValueError, match="prefix_sharing must be true or false"):
        RewardConfig(prefix_sharing=1)
    with pytest.raises(ValueError, match="prefix_sharing: true needs .*peft"):
        RewardTrainer(RewardConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2", lora={},
                                   prefix_sharing=True, output_dir=str(tmp_path / "lora"), device="cpu"),
                      train_records=synthetic_preference_records(8), eval_records=[], tokenizer=tok)


def test_reward_trainer_shares_each_pairs_prompt(tmp_path, tok, monkeypatch):
    """The reward trainer's forward is one row of every pair's tokens with the two rows' common
    leading tokens once."""
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

    tr = RewardTrainer(RewardConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2", batch_size=6,
                                    prefix_sharing=True, output_dir=str(tmp_path / "rm"), device="cpu", max_len=24),
                       train_records=synthetic_preference_records(6, seed=1), eval_records=[], tokenizer=tok)
    shapes, real = [], L.hidden_states
    monkeypatch.setattr(L, "hidden_states", lambda m, ids, *a, **k: shapes.append(tuple(ids.shape)) or real(m, ids, *a,
                                                                                                              **k))
    tr._scores(tr.train_items)

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    want = sum(len(c) + len(r) - common(c, r) for c, r in (it["seqs"] for it in tr.train_items))
    assert shapes == [(1, want)] and want < sum(len(s) for it in tr.train_items for s in it["seqs"])


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cuda_attention_equals_dense_mask_sdpa(kv_heads, dtype):
    """On the GPU the rejected branches take torch's lower-right causal bias (the fused sdpa
    kernels) for real: outputs and q / k / v gradients equal sdpa under the dense bool mask."""
    seg = SharedPrefixSegments(GROUPS * 3)
    T, d = seg.total, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, T, d, generator=g, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, T, d, generator=g, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(2))
    w = torch.randn(1, 4, T, d, generator=g, device="cuda", dtype=dtype)
    out = llama_forward._attention(q, k, v, seg, 0.125)
    grads = torch.autograd.grad((out.float() * w.float()).sum(), (q, k, v))
    rep = [t.detach().float().repeat_interleave(4 // kv_heads, 1).requires_grad_() for t in (k, v)]
    qf = q.detach().float().requires_grad_()
    mask = _spec_mask(GROUPS * 3).cuda()
    want = torch.nn.functional.scaled_dot_product_attention(qf, *rep, attn_mask=mask, scale=0.125)
    gq, gk, gv = torch.autograd.grad((want * w.float()).sum(), (qf, *rep))
    gk, gv = (t.unflatten(1, (kv_heads, 4 // kv_heads)).sum(2) for t in (gk, gv))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), want, **tol)
    for a, b in zip(grads, (gq, gk, gv)):
        torch.testing.assert_close(a.float(), b, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("qwen2", 2)])
def test_cuda_token_values_and_gradients_equal_the_padded(family, kv_heads):
    """The DPO log-prob path with prefix_sharing on the GPU (fp32, TF32 off) equals the padded path."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = _model(family, kv_heads).cuda()
        params = list(m.parameters())
        b = {k: t.cuda() for k, t in _pair_batch(PAIRS).items()}
        outs = []
        for kw in ({}, {"prefix_sharing": True}):
            out = L.sequence_logprobs(m, b["input_ids"], b["attention_mask"], response_mask=b["response_mask"],
                                      return_entropy=True, **kw)
            w = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(3)).cuda()
            outs.append((out, torch.autograd.grad((out[0] * w).sum(), params)))
        (want, gw), (got, gg) = outs
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
        for a, e in zip(gg, gw):
            _close(a, e, 1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
