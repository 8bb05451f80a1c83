"""ppo.trpo with an MoE policy and ``ppo.router_aux_loss_coef``: the line search judges a step by
the objective whose gradient chose it. policy_backward's gradient is that of the policy loss plus
coef × the mean over the mini-batch's micro-batches of each one's router load-balancing loss
(tests/test_moe_aux_loss.py checks it); the surrogate the line search evaluates is now that same
sum (it was the policy loss alone), checked against the model's own ``aux_loss`` computed by hand,
before and after an accepted step; with the coefficient 0 it is the policy loss alone, as for a
dense model."""

import copy

import pytest
import torch

from rlhf_fast.models import moe_aux
from rlhf_fast.models.logprobs import default_position_ids
from tests.test_moe_aux_loss import mixtral

pytestmark = pytest.mark.usefixtures("one_thread")

COEF = 0.5  # large, so that the term moves the surrogate well beyond float rounding
MICRO = 4


def _trainer(tmp_path, coef=COEF, **ppo):
    from rlhf_fast.models.tiny import train_tokenizer
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import OptimConfig, PPOConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, TEXTS, make_config

    tok = train_tokenizer(TEXTS, 48)
    pol = mixtral(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    cfg = make_config(tmp_path, "grpo", steps=1,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                      ppo=PPOConfig(**{"epochs": 1, "mini_batch_size": 8, "micro_batch_size": MICRO,
                                       "router_aux_loss_coef": coef, "trpo": True, "trpo_max_kl": 1.0, **ppo}),
                      optim=OptimConfig(lr=1e-3))
    return RLTrainer(cfg, pol, tok, reward_fns=[lambda p, c: [float(len(x)) for x in c]], prompts=PROMPTS)


def _norm(tr, data):
    return tr._global_normalizer(data.response_mask, tr.config.ppo.agg)


@torch.no_grad()
def _by_hand(tr, data, coef=COEF):
    """policy loss (the dense surrogate's, one forward of the whole mini-batch) + coef × the mean
    over the micro-batches of MICRO rows of the model's own ``aux_loss`` of each."""
    on, tr.moe = tr.moe, moe_aux.RouterAux(tr.policy, 0.0)
    try:
        policy, st = tr._policy_loss(data, _norm(tr, data), tr._loss_kwargs())
    finally:
        tr.moe = on
    auxes = []
    for s in range(0, data.input_ids.shape[0], MICRO):
        ids, am = data.input_ids[s:s + MICRO], data.attention_mask[s:s + MICRO].long()
        auxes.append(float(tr.policy(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am),
                                     output_router_logits=True).aux_loss))
    return float(policy), coef * sum(auxes) / len(auxes), st["logp"]


def test_the_surrogate_holds_the_aux_term(tmp_path):
    tr = _trainer(tmp_path)
    assert tr.moe.enabled and tr.moe.coef == COEF
    data, _ = tr.rollout()
    assert data.input_ids.shape[0] == 8
    loss, kl = tr._surrogate(data, data.old_logp, _norm(tr, data))
    policy, term, _ = _by_hand(tr, data)
    assert term > 1e-2 * abs(policy) + 1e-3  # the term is visible
    assert loss == pytest.approx(policy + term, rel=1e-5, abs=1e-7)
    assert kl == pytest.approx(0.0, abs=1e-10)  # at the rollout's parameters


def test_the_line_search_improvement_is_loss_plus_coef_aux(tmp_path):
    """_trpo_step after policy_backward, as update() runs it: the surrogates it compares (before
    the step, at the accepted step) are the hand-made loss + coef × aux at those parameters."""
    tr = _trainer(tmp_path)
    data, _ = tr.rollout()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.policy_backward(data)
    before = sum(_by_hand(tr, data)[:2])
    seen, inner = [], tr._surrogate

    def recorded(*a, **kw):
        out = inner(*a, **kw)
        seen.append(out)
        return out

    tr._surrogate = recorded
    st = tr._trpo_step(data)
    tr._surrogate = inner
    assert st["trpo_step_frac"] > 0, seen
    policy, term, logp = _by_hand(tr, data)
    loss0, accepted = seen[0][0], seen[-1][0]
    assert loss0 == pytest.approx(before, rel=1e-5, abs=1e-7)
    assert accepted == pytest.approx(policy + term, rel=1e-5, abs=1e-7)
    assert accepted - loss0 == pytest.approx(policy + term - before, rel=1e-3, abs=1e-6)
    assert accepted <= loss0
    d = logp - data.old_logp
    assert seen[-1][1] == pytest.approx(float((0.5 * d * d)[data.response_mask.bool()].mean()), rel=1e-5)


def test_coef_zero_is_the_policy_loss_alone(tmp_path):
    """An MoE policy with router_aux_loss_coef 0: the term is off and the surrogate is the policy
    loss alone (summed over the update's micro-batches: equal to one forward of the whole
    mini-batch up to float rounding)."""
    tr = _trainer(tmp_path, coef=0.0)
    assert not tr.moe.enabled
    data, _ = tr.rollout()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.policy_backward(data)
    tr.optimizer.step()  # parameters off the rollout's
    loss, _ = tr._surrogate(data, data.old_logp, _norm(tr, data))
    with torch.no_grad():
        want, _ = tr._policy_loss(data, _norm(tr, data), tr._loss_kwargs())
    assert loss == pytest.approx(float(want), rel=1e-6)


def test_update_runs_the_line_search_with_the_term(tmp_path):
    tr = _trainer(tmp_path)
    before = copy.deepcopy(tr.policy.state_dict())
    m = tr.update(tr.rollout()[0])
    assert m["policy/aux_loss"] > 0 and 0 <= m["policy/trpo_step_frac"] <= 1
    moved = any(not torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())
    assert moved == (m["policy/trpo_step_frac"] > 0)
