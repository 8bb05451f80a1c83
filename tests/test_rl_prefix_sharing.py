"""RL ``ppo.prefix_sharing``: each prompt computed once per group of its answers.

The log-prob entry with explicit groups (``sequence_logprobs(..., prefix_sharing=True,
prefix_groups=[G, K])``, ragged groups filled with -1, ``row_groups``) and ``policy_loss(...,
prefix_groups=...)`` against the padded path on hand-made groups (answers sharing their first
tokens, answers of one token, tool-result holes in the loss mask, group sizes 2 and 8, llama and
qwen2 with grouped KV heads): values and every gradient. The trainers: the rollout's scoring
(old log-probs, entropies, reference log-probs) equal to the padded run's, in one forward row
shorter by (G − 1)·prompt per group; one update (GRPO, RLOO, PPO with its critic on shared rows too, a composed
loss, GSPO, online DPO) equal to the padded update under the same group-level shuffle — loss,
logged metrics, every gradient and the parameters after; exact resume; refusals named."""

import json
import os

import pytest
import torch

from rlhf_fast.models import llama_forward, tiny_causal_lm
from rlhf_fast.models import logprobs as L
from rlhf_fast.trainers.rl import RLTrainer, _micro_batches
from rlhf_fast.trainers.rl_config import KLConfig, ModelConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

V = 61
# prompts of 1 to ~15 tokens with the 48-token tokenizer of make_policy
PROMPTS = ["a b c d e f g h i j k l m n", "0 1 2 3 4 5 6 7", "x", "q: a b", "x y z w v u t s", "0 1"]


def _model(family="llama", kv_heads=None, seed=0):
    m = tiny_causal_lm(V, family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                       intermediate_size=48, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norms too, so a swapped weight shows
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


# Weights after Adam steps: Adam divides a gradient by its own size, so one that cancels to
# ~1e-10 (float noise of the summation order, which differs between CPUs) moves its weight by a
# share of lr either way; a real layout error moves weights by ~lr (here 5e-3), 10x this bound
ADAM_REL = 5e-3


def _close(got, want, rel=2e-5):
    """max |got − want| ≤ rel · max |want| (gradients of cancelling terms near 0)."""
    assert got.shape == want.shape
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= rel * scale + 1e-9, (err, scale)


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# ----------------------------------------------------------------------------- hand-made groups


def _group_batch(group_size, seed=0, n_groups=3):
    """A rollout-like batch of ``n_groups`` prompts (left-padded, 1..9 tokens) each answered
    ``group_size`` times (right-padded, 1..7 tokens; some answers start alike, one group's answers
    are identical, each group has a one-token answer), the response mask with a tool-result hole
    in some rows. Returns (ids, am, rm) ``[B, T]``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for gi in range(n_groups):
        prompt = torch.randint(3, V, (1 + (4 * gi + 3) % 9,), generator=g).tolist()
        stem = torch.randint(3, V, (2,), generator=g).tolist()  # the first tokens several answers share
        for k in range(group_size):
            if gi == 1:
                ans = stem + [7]  # all answers alike: the whole row is the group's shared part
            elif k == 0:
                ans = [int(torch.randint(3, V, (1,), generator=g))]  # one token
            else:
                n = int(torch.randint(1, 6, (1,), generator=g))
                ans = (stem if k % 2 else []) + torch.randint(3, V, (n,), generator=g).tolist()
            rows.append((prompt, ans))
    P = max(len(p) for p, _ in rows)
    A = max(len(a) for _, a in rows)
    B, T = len(rows), P + A
    ids = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.bool)
    rm = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, P - len(p):P], ids[i, P:P + len(a)] = torch.tensor(p), torch.tensor(a)
        am[i, P - len(p):P + len(a)] = True
        rm[i, P:P + len(a)] = True
        if len(a) >= 4 and i % 3 == 0:
            rm[i, P + 1:P + 3] = False  # a tool result: attended, not scored
    return ids, am, rm


def test_row_groups_and_ragged_groups():
    got = L.row_groups(torch.tensor([0, 0, 1, 1, 1, 2]))
    assert got.tolist() == [[0, 1, -1], [2, 3, 4], [5, -1, -1]]
    assert L.row_groups(torch.tensor([3, 3, 3, 3])).tolist() == [[0, 1, 2, 3]]
    ids, am, rm = _group_batch(4)
    full = L.pack_shared_rows(ids, am, torch.arange(12).view(3, 4))
    # the same groups with a filler column: the same row
    ragged = L.pack_shared_rows(ids, am, torch.cat([torch.arange(12).view(3, 4), torch.full((3, 2), -1)], 1))
    assert torch.equal(full.ids, ragged.ids) and torch.equal(full.at, ragged.at)
    assert [(p, b + (0, 0)) for p, b in full.segments.groups] == ragged.segments.groups
    # a ragged group (rows 4..6 of a group of 4, row 7 alone) shares only among its own rows
    part = L.pack_shared_rows(ids, am, torch.tensor([[0, 1, 2, 3], [4, 5, 6, -1], [7, -1, -1, -1],
                                                     [8, 9, 10, 11]]))
    assert part.segments.groups[2][0] == int(am[7].sum()) and part.segments.groups[2][1] == (0, 0, 0, 0)
    for bad in (torch.tensor([[0, 1], [1, 2]]), torch.tensor([[-1, 0], [1, 2]]), torch.tensor([[0, -1, 1]]),
                torch.tensor([[0.0, 1.0]]), torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match="prefix_groups"):
            L._check_groups(bad, 3)
    with pytest.raises(ValueError, match="prefix_groups needs prefix_sharing=True"):
        L.sequence_logprobs(_model(), ids, am, response_mask=rm, prefix_groups=torch.arange(12).view(3, 4))


@pytest.mark.parametrize("family,kv_heads,group_size", [("llama", None, 2), ("llama", None, 8), ("qwen2", 2, 4)])
def test_group_logprobs_and_gradients_equal_the_padded(family, kv_heads, group_size):
    """Old log-probs, entropies, top-1 and mean logits of groups of answers, and the gradient of
    their weighted sum, equal the padded path's (fp32); ragged groups too."""
    model = _model(family, kv_heads)
    ids, am, rm = _group_batch(group_size)
    B = ids.shape[0]
    w = torch.randn(B, ids.shape[1], generator=torch.Generator().manual_seed(3))
    stats = dict(return_entropy=True, return_top1=True, return_mean_logit=True)
    groups = torch.arange(B).view(-1, group_size)
    ragged = L.row_groups(torch.tensor([0] * (group_size - 1) + [1] * (B - group_size + 1)))
    outs = {}
    for name, kw in (("padded", {}), ("shared", dict(prefix_sharing=True, prefix_groups=groups)),
                     ("ragged", dict(prefix_sharing=True, prefix_groups=ragged))):
        model.zero_grad(set_to_none=True)
        out = L.sequence_logprobs(model, ids, am, response_mask=rm, temperature=0.7, **stats, **kw)
        (out[0] * w).sum().backward()
        outs[name] = (out, _grads(model))
    (want, gw) = outs["padded"]
    for name in ("shared", "ragged"):
        got, gg = outs[name]
        for a, b in zip(got, want):
            if a.dtype == torch.bool:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert all(bool((a == 0).all()) for a in (got[0][~rm], got[1][~rm]))  # the tool holes stay 0
        for a, b in zip(gg, gw):
            _close(a, b)


@pytest.mark.parametrize("agg,level", [("token-mean", "token"), ("seq-mean-token-mean", "token"),
                                       ("seq-mean-token-sum", "token"), ("seq-mean-token-sum-norm", "token"),
                                       ("seq-mean-token-mean", "sequence")])
def test_policy_loss_equals_the_padded(agg, level):
    model = _model("qwen2", 2)
    ids, am, rm = _group_batch(4, seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        old = L.sequence_logprobs(model, ids, am, response_mask=rm) + 0.1 * torch.randn(ids.shape, generator=g) * rm
        ref = old + 0.05 * torch.randn(ids.shape, generator=g) * rm
    adv = torch.randn(ids.shape, generator=g) * rm
    kw = dict(ref_logp=ref, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, clip_low=0.1, clip_high=0.3,
              dual_clip=3.0, agg=agg, importance_sampling_level=level, normalizer=None)
    res = []
    for share in ({}, {"prefix_groups": torch.arange(ids.shape[0]).view(-1, 4)}):
        model.zero_grad(set_to_none=True)
        loss, st = L.policy_loss(model, ids, am, rm, old, adv, **kw, **share)
        loss.backward()
        res.append((loss, st, _grads(model)))
    (l0, s0, g0), (l1, s1, g1) = res
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    assert set(s0) == set(s1)
    for k in s0:
        torch.testing.assert_close(torch.as_tensor(s1[k]), torch.as_tensor(s0[k]), rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(g1, g0):
        _close(a, b)


# ----------------------------------------------------------------------------- the trainers


def _reward(prompts, completions):
    """Dense: the answers of a group rarely tie, so advantages (and gradients) are not zero."""
    return [float(sum(map(ord, c)) % 13) + 0.1 * len(c) for c in completions]


def _trainer(tmp_path, shared, estimator="grpo", group_size=4, prompts_per_step=2, mini=None, micro=None,
             ppo=None, **kw):
    pol, tok = make_policy()
    batch = group_size * prompts_per_step
    ppo = dict(epochs=2, mini_batch_size=mini or batch, micro_batch_size=micro or group_size, **(ppo or {}))
    kw.setdefault("kl", KLConfig(coef=0.05, placement="loss"))
    cfg = make_config(tmp_path, estimator, steps=2,
                      rollout=RolloutConfig(prompts_per_step=prompts_per_step, group_size=group_size,
                                            max_new_tokens=5),
                      ppo=PPOConfig(prefix_sharing=shared, **ppo), **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)


def _pair(tmp_path, **kw):
    return _trainer(tmp_path / "padded", False, **kw), _trainer(tmp_path / "shared", True, **kw)


_TIMES = ("time/", "tokens_per", "step_time")


def _same_metrics(a, b, rel=1e-5):
    keys = {k for k in a if not k.startswith(_TIMES)}
    assert keys == {k for k in b if not k.startswith(_TIMES)}
    for k in sorted(keys):
        assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-6), k


def test_rollout_scoring_equals_the_padded_in_a_shorter_row(tmp_path, monkeypatch):
    """The rollout's old log-probs, entropies (the ``entropy`` metric and the high-entropy mask)
    and reference log-probs equal the padded run's; each of the two forwards is one row, shorter
    than the batch's attended tokens by (G − 1) × each group's shared part, which holds its prompt."""
    kw = dict(group_size=4, prompts_per_step=3, ppo=dict(top_entropy_quantile=0.5))
    a, b = _pair(tmp_path, **kw)
    da, ma = a.rollout()
    rows = []
    real = llama_forward.hidden_states
    monkeypatch.setattr(llama_forward, "hidden_states",
                        lambda base, ids, *r, **k: rows.append((tuple(ids.shape), k.get("segments"))) or
                        real(base, ids, *r, **k))
    db, mb = b.rollout()
    for k in ("input_ids", "attention_mask", "response_mask", "entropy_mask", "group"):
        assert torch.equal(getattr(da, k), getattr(db, k)), k
    for k in ("old_logp", "ref_logp", "advantages", "returns"):
        torch.testing.assert_close(getattr(db, k), getattr(da, k), rtol=1e-5, atol=1e-5, msg=k)
    _same_metrics(ma, mb)
    assert "entropy" in mb and "rollout/entropy_threshold" in mb
    assert len(rows) == 2  # the policy's and the reference's forward
    am = da.attention_mask
    prompt_len = (am & ~da.response_mask).sum(1)  # [B] (no tool results here: every answer token scored)
    for (shape, seg) in rows:
        assert seg is not None and shape[0] == 1 and len(seg.groups) == 3
        shared = torch.tensor([p for p, _ in seg.groups])
        assert bool((shared >= prompt_len.view(3, 4)[:, 0]).all())
        assert shape[1] == int(am.sum()) - 3 * int(shared.sum()) < int(am.sum()) - 3 * int(prompt_len[::4].sum()) + 1


def _one_update(a, b, da, db):
    """One update of each trainer on its batch, the padded one under the shared one's group-level
    shuffle; then the first mini-batch's gradient again, micro-batched. Compared."""
    units = b._shuffle_units(db)
    G = b.config.rollout.group_size
    assert units == [G] * (db.input_ids.shape[0] // G)
    a._shuffle_units = lambda data: units
    shared = []
    real = llama_forward.hidden_states

    def spy(base, ids, *r, **k):
        shared.append(k.get("segments") is not None)
        return real(base, ids, *r, **k)

    ua = a.update(da)
    llama_forward.hidden_states = spy
    try:
        ub = b.update(db)
    finally:
        llama_forward.hidden_states = real
    # every policy forward of the update one shared row, and the critic's (gae) too, as many
    n = ua["policy/updates"] * (b.config.ppo.mini_batch_size // b.config.ppo.micro_batch_size)
    if b.config.ppo.trpo:  # and the line search's surrogate forwards
        assert all(shared) and len(shared) > n
    else:
        assert all(shared) and len(shared) == (2 * n if b.critic is not None else n)
    _same_metrics(ua, ub, rel=2e-5)
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):  # (Adam scales rounding up near 0 gradients)
        _close(q.detach(), p.detach(), rel=1e-4)
    for tr, d in ((a, da), (b, db)):
        tr.policy.zero_grad(set_to_none=True)
        tr.policy_backward(d)
    for p, q in zip(_grads(a.policy), _grads(b.policy)):
        _close(q, p)
    assert any(float(p.abs().sum()) > 0 for p in _grads(a.policy))
    return ua, ub


@pytest.mark.parametrize("estimator,kw", [
    ("grpo", dict(group_size=8, prompts_per_step=2, mini=8, micro=8)),
    ("rloo", dict(group_size=2, prompts_per_step=3, mini=6, micro=2, kl=KLConfig(coef=0.05, placement="reward"))),
    ("gae", dict(group_size=2, prompts_per_step=2, mini=4, micro=2, ppo=dict(whiten_advantages=True))),
    ("grpo", dict(ppo=dict(policy_loss="cispo", clip_high=5.0, top_entropy_quantile=0.6))),  # composed loss
    ("grpo", dict(ppo=dict(importance_sampling_level="sequence", agg="seq-mean-token-mean"))),  # GSPO
    ("dr_grpo", dict(ppo=dict(trpo=True, agg="seq-mean-token-sum-norm"))),  # the line search's surrogate too
])
def test_one_update_equals_the_padded_under_the_group_shuffle(tmp_path, estimator, kw):
    a, b = _pair(tmp_path, estimator=estimator, **kw)
    (da, _), (db, _) = a.rollout(), b.rollout()
    ua, _ = _one_update(a, b, da, db)
    assert ua["policy/updates"] == 2 * (da.input_ids.shape[0] // a.config.ppo.mini_batch_size)
    if estimator == "gae":  # the critic on shared rows too: the same value loss (compared above)
        assert "value/loss" in ua


def test_update_micro_batches_hold_whole_groups(tmp_path):
    tr = _trainer(tmp_path, True, group_size=2, prompts_per_step=4, mini=4, micro=2)
    data, _ = tr.rollout()
    units = tr._shuffle_units(data)
    perm = tr._permutation(torch.Generator().manual_seed(0), 8, units)
    assert sorted(perm.tolist()) == list(range(8)) and bool((perm.view(-1, 2)[:, 0] % 2 == 0).all())
    assert bool((perm.view(-1, 2)[:, 1] == perm.view(-1, 2)[:, 0] + 1).all())
    for d, real, _ in _micro_batches(data.select(perm[:4]), 2, None):
        assert d.group.unique().numel() == 1
    # rows dropped from a group (gae drops single answers): the remaining runs are the units
    d = data.select(torch.tensor([0, 1, 2, 4, 5, 7]))
    assert tr._shuffle_units(d) == [2, 1, 2, 1]


def online_dpo_trainer(folder, prompts, max_new_tokens: int, **ppo):
    """One step's online DPO trainer of the tiny policy (4 prompts × 2 answers, two epochs of
    micro-batches of 2), ``ppo`` the PPOConfig switch under test (prefix_sharing / padding_free)."""
    from rlhf_fast.trainers.online_dpo import OnlineDPOTrainer
    from rlhf_fast.trainers.rl_config import OnlineDPOConfig, OptimConfig

    pol, tok = make_policy()
    cfg = RLConfig(estimator="online_dpo", steps=1, output_dir=str(folder), progress=False,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=max_new_tokens),
                   ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=2, **ppo),
                   optim=OptimConfig(lr=5e-3), online_dpo=OnlineDPOConfig(beta=0.5))
    return OnlineDPOTrainer(cfg, pol, tok, prompts=prompts, reward_fns=[_reward])


def test_online_dpo_equals_the_padded(tmp_path):
    a, b = (online_dpo_trainer(tmp_path / str(on), PROMPTS, 6, prefix_sharing=on) for on in (False, True))
    seen = []
    real = llama_forward.hidden_states

    def spy(base, ids, *r, **k):
        seen.append(k.get("segments") is not None)
        return real(base, ids, *r, **k)

    llama_forward.hidden_states, old = spy, llama_forward.hidden_states
    try:
        ma, mb = a.step(), b.step()
    finally:
        llama_forward.hidden_states = old
    assert seen.count(True) == seen.count(False) > 0  # every forward of b shared, none of a
    _same_metrics(ma, mb, rel=2e-5)
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        _close(q.detach(), p.detach(), rel=ADAM_REL)


def test_resume_with_prefix_sharing_is_exact(tmp_path):
    kw = dict(group_size=2, prompts_per_step=2, mini=2, micro=2)

    def build(path, **extra):
        tr = _trainer(path, True, **kw)
        tr.config.steps, tr.config.save_every = 3, 2
        for k, v in extra.items():
            setattr(tr.config, k, v)
        return tr

    a = build(tmp_path / "a")
    a.train()
    b = build(tmp_path / "b")
    b.train(steps=2)
    cfg = b.config
    cfg.resume = cfg.output_dir
    pol, tok = make_policy()
    c = RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)
    c.train()

    def rows(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(ln).items() if not k.startswith(_TIMES)} for ln in f]

    assert rows(a.config.output_dir) == rows(cfg.output_dir)
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def test_refusals_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"ppo.prefix_sharing must be true or false"):
        PPOConfig(prefix_sharing="yes")
    for ro, mini, micro, key in ((RolloutConfig(prompts_per_step=2, group_size=4), 8, 2, "micro_batch_size"),
                                 (RolloutConfig(prompts_per_step=3, group_size=4), 6, 6, "mini_batch_size")):
        with pytest.raises(ValueError, match=rf"ppo.prefix_sharing .* ppo.{key} .* multiple of rollout.group_size"):
            RLConfig(estimator="grpo", rollout=ro,
                     ppo=PPOConfig(mini_batch_size=mini, micro_batch_size=micro, prefix_sharing=True))


@pytest.mark.parametrize("key", ["prefix_sharing", "padding_free"])
def test_models_it_cannot_run_are_refused_naming_the_key(tmp_path, key):
    """Both switches run the policy through rlhf_fast's own forward: a model it cannot run is
    refused at the trainer's start, naming the switch."""
    from rlhf_fast.ops import use_backend

    def trainer(folder, policy=None, **kw):
        pol, tok = policy or make_policy()
        cfg = make_config(tmp_path / folder, "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4),
                          ppo=PPOConfig(**{key: True}), **kw)
        return RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)

    pol, tok = make_policy()
    pol.config.logits_scaling = 2.0  # an unfusable head (Granite's)
    with pytest.raises(ValueError, match=rf"ppo.{key}: true needs .*logits_scaling"):
        trainer("h", (pol, tok))
    with use_backend("torch"), pytest.raises(ValueError, match=rf"ppo.{key}: true needs .*torch backend"):
        trainer("t")
    with pytest.raises(ValueError, match=rf"ppo.{key}: true needs .*not one rlhf_fast.models.llama_forward"):
        trainer("l", model=ModelConfig(lora={"r": 4}))


def test_e2e_grpo_step_takes_prefix_sharing(monkeypatch):
    """benchmarks/e2e.py's ``rl_prefix_sharing`` runs our GRPO step with it (its reference pass and
    update on shared rows): the same rollout (reward, tokens) as without."""
    from dataclasses import replace

    from rlhf_fast.benchmarks import e2e

    with pytest.raises(ValueError, match="rl_prefix_sharing"):
        e2e.E2EConfig(rl_prefix_sharing="yes")
    cfg = e2e.E2EConfig.quick()
    plain, shared = e2e.RLHFFastStep(cfg, "grpo"), e2e.RLHFFastStep(replace(cfg, rl_prefix_sharing=True), "grpo")
    assert shared.trainer.config.ppo.prefix_sharing and not plain.trainer.config.ppo.prefix_sharing
    a = plain.step()
    seen = []
    real = llama_forward.hidden_states
    monkeypatch.setattr(llama_forward, "hidden_states",
                        lambda base, ids, *r, **k: seen.append(k.get("segments") is not None) or
                        real(base, ids, *r, **k))
    b = shared.step()
    assert b["tokens"] == a["tokens"] and b["reward"] == a["reward"]
    assert seen and all(seen)
