"""RL ``ppo.prefix_sharing`` for the PPO critic: a ValueModel's values from the shared-prefix row.

:func:`rlhf_fast.models.shared_values.shared_critic_values` against the padded
``rl.critic_values`` on hand-made groups (answers sharing their first tokens, one-token answers,
tool-result holes, ragged groups; llama and qwen2 with grouped KV heads): the values at every
response token (and TRL's alignment of them, transcribed), zeros elsewhere, and every gradient;
a batch without response tokens still gives each parameter its (zero) gradient. The trainer
(estimator gae): the rollout's values, advantages and returns, and one update (value loss, clip
fraction, the critic's gradients and weights after) equal the padded run's under the same group
shuffle, every critic forward one shared row. A critic it cannot run keeps its padded forward with
a warning naming ``ppo.prefix_sharing``. Two gloo ranks (DDP, FSDP2): in
tests/test_rl_prefix_sharing_distributed.py."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _value_model(family="llama", kv_heads=None):
    from rlhf_fast.models import loading
    from tests.test_rl_prefix_sharing import _model

    vm = loading.ValueModel(_model(family, kv_heads))
    with torch.no_grad():  # a head of the backbone's scale, so its gradient is not all rounding
        vm.value_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
        vm.value_head.bias.fill_(0.1)
    return vm


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]


@pytest.mark.parametrize("family,kv_heads,group_size", [("llama", None, 2), ("qwen2", 2, 4)])
def test_shared_values_and_gradients_equal_the_padded(family, kv_heads, group_size):
    from rlhf_fast.models import logprobs as L
    from rlhf_fast.models.shared_values import shared_critic_values
    from rlhf_fast.trainers.rl import critic_values
    from tests.test_rl_prefix_sharing import _close, _group_batch

    vm = _value_model(family, kv_heads)
    ids, am, rm = _group_batch(group_size)
    B, T = ids.shape
    w = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    groups = torch.arange(B).view(-1, group_size)
    ragged = L.row_groups(torch.tensor([0] * (group_size - 1) + [1] * (B - group_size + 1)))
    outs = {}
    for name, fn in (("padded", lambda: critic_values(vm, ids, am) * rm),
                     ("shared", lambda: shared_critic_values(vm, ids, am, rm, groups)),
                     ("ragged", lambda: shared_critic_values(vm, ids, am, rm, ragged))):
        vm.zero_grad(set_to_none=True)
        v = fn()
        (v * w).sum().backward()
        outs[name] = (v, _grads(vm))
    want, gw = outs["padded"]
    # TRL PPOTrainer.train (trl/trainer/ppo_trainer.py): full_value = value model's output,
    # value = full_value[:, context_length - 1 : -1] (the prompts are left-padded to one width P)
    P = int((~rm).long().cumprod(1).sum(1).min())
    trl = vm(ids, am)[:, P - 1:-1]
    torch.testing.assert_close(want[:, P:], trl * rm[:, P:], rtol=0, atol=0)
    assert bool(rm[:, :P].sum() == 0)
    for name in ("shared", "ragged"):
        got, gg = outs[name]
        assert got.dtype == torch.float32 and got.shape == (B, T)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert bool((got[~rm] == 0).all())  # the prompts and tool holes: not computed
        for a, b in zip(gg, gw):
            _close(a, b)


def test_no_response_token_gives_zero_gradients_everywhere():
    """A blank micro-batch (a rank with no rows left) must reach every parameter, as on the other ranks."""
    from rlhf_fast.models.shared_values import shared_critic_values
    from tests.test_rl_prefix_sharing import _group_batch

    vm = _value_model()
    ids, am, rm = _group_batch(2)
    v = shared_critic_values(vm, ids, am, torch.zeros_like(rm), torch.arange(ids.shape[0]).view(-1, 2))
    assert bool((v == 0).all())
    v.sum().backward()
    assert all(g is not None and bool((g == 0).all()) for g in _grads(vm))


# ----------------------------------------------------------------------------- the trainer


def _spy(monkeypatch, critic_backbone, seen, rows=None):
    """Record, per llama_forward forward of ``critic_backbone``, whether it ran a shared row; in
    ``rows`` the (row length, segments' groups) of every forward, the critic's marked True."""
    from rlhf_fast.models import llama_forward

    real = llama_forward.hidden_states

    def spy(base, ids, *r, **k):
        if base is critic_backbone:
            seen.append(k.get("segments") is not None)
        if rows is not None and k.get("segments") is not None:
            rows.append((base is critic_backbone, ids.shape[1], k["segments"].groups))
        return real(base, ids, *r, **k)

    monkeypatch.setattr(llama_forward, "hidden_states", spy)


@pytest.mark.parametrize("kw", [
    dict(group_size=2, prompts_per_step=2, mini=4, micro=2),
    dict(group_size=4, prompts_per_step=2, mini=8, micro=4,
         ppo=dict(value_clip=None, agg="seq-mean-token-mean", whiten_advantages=True)),
])
def test_ppo_critic_on_shared_rows_equals_the_padded(tmp_path, monkeypatch, kw):
    from tests.test_rl_prefix_sharing import _close, _pair, _same_metrics

    a, b = _pair(tmp_path, estimator="gae", **kw)
    assert b._critic_shared and not a._critic_shared
    seen, rows = [], []
    (da, ma) = a.rollout()
    _spy(monkeypatch, b.critic.backbone, seen, rows)
    db, mb = b.rollout()
    assert seen == [True]  # the scoring pass: one shared row for the critic too, laid out as the policy's
    (c, n, groups), (_, n_pol, groups_pol) = sorted(rows, key=lambda r: not r[0])[:2]
    assert c and (n, groups) == (n_pol, groups_pol) and len(groups) == kw["prompts_per_step"]
    prompt_len = (da.attention_mask & ~da.response_mask).sum(1)[::kw["group_size"]]  # [prompts]
    assert all(p >= int(q) for (p, _), q in zip(groups, prompt_len))  # each prompt once in the row
    for k in ("input_ids", "response_mask", "group"):
        assert torch.equal(getattr(da, k), getattr(db, k)), k
    for k in ("values", "advantages", "returns"):
        torch.testing.assert_close(getattr(db, k), getattr(da, k), rtol=1e-5, atol=1e-6, msg=k)
    assert float(db.values.abs().sum()) > 0
    _same_metrics(ma, mb)
    # the critic's gradient of the whole batch, micro-batched
    for tr, d in ((a, da), (b, db)):
        tr.critic.zero_grad(set_to_none=True)
        cst = tr.critic_backward(d)
        tr.cst = cst
    assert b.cst["value_loss"] == pytest.approx(a.cst["value_loss"], rel=1e-5)
    assert b.cst["value_clip_frac"] == pytest.approx(a.cst["value_clip_frac"], abs=1e-6)
    for p, q in zip(_grads(a.critic), _grads(b.critic)):
        _close(q, p)
    assert any(float(g.abs().sum()) > 0 for g in _grads(a.critic))
    # one update under the same group-level shuffle
    units = b._shuffle_units(db)
    a._shuffle_units = lambda data: units
    seen.clear()
    ua, ub = a.update(da), b.update(db)
    n_micro = ub["policy/updates"] * (b.config.ppo.mini_batch_size // b.config.ppo.micro_batch_size)
    assert seen == [True] * n_micro
    assert "value/loss" in ua
    _same_metrics(ua, ub, rel=2e-5)
    for p, q in zip(a.critic.parameters(), b.critic.parameters()):
        _close(q.detach(), p.detach(), rel=1e-4)


@pytest.mark.parametrize("key", ["prefix_sharing", "padding_free"])
def test_a_critic_it_cannot_run_stays_padded_with_a_warning(tmp_path, key):
    from rlhf_fast.models import loading, tiny_causal_lm
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig
    from tests.test_rl_learning import make_config, make_policy
    from tests.test_rl_prefix_sharing import PROMPTS, _reward

    pol, tok = make_policy()
    gpt2 = loading.ValueModel(tiny_causal_lm(len(tok), family="gpt2", hidden_size=32, num_layers=1,
                                             num_heads=2))
    cfg = make_config(tmp_path, "gae", steps=1, rollout=RolloutConfig(prompts_per_step=2, group_size=2,
                                                                      max_new_tokens=4),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=2, **{key: True}))
    with pytest.warns(RuntimeWarning, match=rf"ppo.{key}: the critic keeps its padded forward .*GPT2"):
        tr = RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS, critic=gpt2)
    assert not tr._critic_shared
    m = tr.step()
    assert "value/loss" in m and m["value/loss"] == m["value/loss"]

    from rlhf_fast.models.shared_values import critic_sharing_reason

    class Custom(loading.ValueModel):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return super().forward(input_ids, attention_mask, position_ids) * 2

    assert "replaces ValueModel's forward" in critic_sharing_reason(Custom(pol), 8)
    assert "not a rlhf_fast ValueModel" in critic_sharing_reason(torch.nn.Linear(2, 1), 8)
    assert critic_sharing_reason(loading.ValueModel(pol), 8) is None
    from rlhf_fast.ops import use_backend

    with use_backend("torch"):
        assert "torch backend" in critic_sharing_reason(loading.ValueModel(pol), 8)


@pytest.mark.cuda
def test_cuda_shared_values_equal_the_padded():
    """On the GPU (fp32, TF32 off) the critic's shared rows take sdpa's lower-right causal bias for
    real: values and gradients equal the padded critic's."""
    from rlhf_fast.models.shared_values import shared_critic_values
    from rlhf_fast.trainers.rl import critic_values
    from tests.test_rl_prefix_sharing import _close, _group_batch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        vm = _value_model("qwen2", 2).cuda()
        ids, am, rm = (t.cuda() for t in _group_batch(4))
        B, T = ids.shape
        w = torch.randn(B, T, generator=torch.Generator().manual_seed(3)).cuda()
        outs = []
        for fn in (lambda: critic_values(vm, ids, am) * rm,
                   lambda: shared_critic_values(vm, ids, am, rm, torch.arange(B, device="cuda").view(-1, 4))):
            vm.zero_grad(set_to_none=True)
            v = fn()
            (v * w).sum().backward()
            outs.append((v.detach(), _grads(vm)))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(outs[1][1], outs[0][1]):
            _close(a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
