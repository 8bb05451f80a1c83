"""Four leftovers of an earlier review, each checked against its peer.

- ``rollout.mask_truncated`` with advantage whitening (``ppo.whiten_advantages: true``,
  REINFORCE++'s own): the statistics are over the loss tokens, as verl-tool's
  ``mask_overlong_loss`` (it zeroes the loss mask, of which verl's ``response_mask`` is a view,
  before ``compute_advantage`` whitens over it) and SkyRL's ``apply_overlong_filtering`` (the
  loss masks it zeroes are the masks its advantages are computed over); ``advantages/mean``
  too. (TRL has no token whitening; its RLOO ``normalize_advantages``, our ``'sequence'``,
  keeps every answer, and so do we.)
- ``rollout.dynamic_sampling``: DAPO's filter (verl's ``filter_groups`` on
  ``seq_final_reward``, the rewards the estimator sees) judges a group on the clipped rewards
  (``reward.clip_range`` / ``reward.clip``).
- ``rlhf-fast eval --run``: samples at the run's ``eval.temperature`` unless
  ``--temperature`` says otherwise (greedy without ``--run``).
- ``rule_rewards.normal_answer``: the one normalisation ``answer_match`` and ``vote_key`` share.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.trainers.rl import RLTrainer  # noqa: E402
from rlhf_fast.trainers.rl_config import (DataConfig, KLConfig, PPOConfig, RewardConfig,  # noqa: E402
                                          RolloutConfig)
from tests.test_rl_learning import PROMPTS, make_config, make_policy  # noqa: E402
from tests.test_rl_leftovers import _cut_first_of_each_group  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


# ------------------------------------------------------------------ (a) whitening under mask_truncated

@pytest.mark.parametrize("estimator,whiten", [("grpo", True), ("reinforce++", False), ("grpo", False)])
def test_whitening_statistics_are_over_the_loss_tokens_under_mask_truncated(tmp_path, estimator, whiten):
    """The first answer of each group is truncated (out of the loss): whitened advantages have
    mean 0 and unbiased std 1 over the loss tokens, ``advantages/mean`` is their mean (0).
    Before, the truncated rows' tokens were in the statistics: mean over the loss tokens ≠ 0.
    Unwhitened (grpo), ``advantages/mean`` is the mean over the loss tokens too."""
    pol, tok_ = make_policy()
    cfg = make_config(tmp_path, estimator, steps=1, kl=KLConfig(coef=0.1),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                            mask_truncated=True),
                      ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8,
                                    whiten_advantages=whiten))
    tr = RLTrainer(cfg, pol, tok_, reward_fns=[lambda p, c: [float(len(x)) for x in c]], prompts=PROMPTS)
    _cut_first_of_each_group(tr, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off its reference: a KL in the rewards
        for p in tr.policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    data, m = tr.rollout()
    loss_rm = data.response_mask
    cut = torch.arange(loss_rm.shape[0]) % 4 == 0
    assert not loss_rm[cut].any() and loss_rm[~cut].any(1).all()
    rm = data.old_logp != 0  # every response token, the truncated rows' too
    a = data.advantages[loss_rm].double()
    want = float(a.mean())
    if estimator == "grpo" and not whiten:  # not whitened: the truncated rows keep their advantages
        assert want != pytest.approx(float(data.advantages[rm].double().mean()), abs=1e-3)  # the mask matters
    else:
        assert want == pytest.approx(0.0, abs=1e-5)
        assert float(a.std()) == pytest.approx(1.0, abs=1e-3)
    assert m["advantages/mean"] == pytest.approx(want, abs=1e-5)
    # the ranks' path (one rank's reductions) says the same
    import types

    from rlhf_fast.distributed import DistContext

    stub = types.SimpleNamespace(ctx=DistContext(), device=torch.device("cpu"), critic=None)
    z, B = torch.zeros(rm.shape), rm.shape[0]
    out = RLTrainer._global_rollout_metrics(stub, {}, torch.ones(B), torch.ones(B), z, rm, None,
                                            data.advantages, z, z, None, None, cut, loss_rm=loss_rm)
    assert out["advantages/mean"] == pytest.approx(want, abs=1e-5)


def test_compute_advantages_whiten_mask_keeps_the_returns(tmp_path):
    """``whiten_mask`` changes only the whitening's statistics: the returns stay over ``mask``
    and the advantages are whitened over the ``whiten_mask`` tokens (0 outside them)."""
    from rlhf_fast.algorithms.advantages import compute_advantages
    from rlhf_fast.ops import reference

    g = torch.Generator().manual_seed(0)
    scores, mask = torch.randn(8, generator=g), torch.ones(8, 5, dtype=torch.bool)
    mask[:, 4] = False
    wm = mask.clone()
    wm[::4] = False
    kl = torch.randn(8, 5, generator=g)
    for est in ("grpo", "reinforce++", "reinforce++_baseline"):
        kw = dict(kl=kl, kl_coef=0.1, group_size=4, whiten=est == "grpo")
        adv0, ret0 = compute_advantages(est, scores, mask, **kw)
        adv, ret = compute_advantages(est, scores, mask, whiten_mask=wm, **kw)
        assert torch.equal(ret, ret0)
        # what is whitened: grpo's group advantages, REINFORCE++'s returns
        raw = compute_advantages(est, scores, mask, **{**kw, "whiten": False})[0] if est == "grpo" else ret0
        assert torch.allclose(adv, reference.masked_whiten(raw, wm), atol=1e-6)
        assert not torch.allclose(adv[wm], adv0[wm], atol=1e-3)  # the mask matters
    with pytest.raises(ValueError, match="whiten_mask"):
        compute_advantages("grpo", scores, mask, group_size=4, whiten=True, whiten_mask=wm[:, :3])


# ------------------------------------------------------------------ (b) DAPO's filter after the clip

def test_dynamic_sampling_judges_groups_on_the_clipped_rewards(tmp_path):
    """Every answer scores 5 or 6 (differing in each group) and ``reward.clip_range`` [−1, 1]
    makes them all 1: every group is uniform, carries no signal, and the filter samples the
    maximum rounds (verl's filter_groups judges ``seq_final_reward``, the rewards the
    estimator sees). Judged before the clip, every group looked informative."""
    pol, tok_ = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, data=DataConfig(prompts=PROMPTS, shuffle=False),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                            dynamic_sampling=True, max_sampling_rounds=3),
                      reward=RewardConfig(clip_range=[-1.0, 1.0]))
    tr = RLTrainer(cfg, pol, tok_, reward_fns=[lambda p, c: [5.0 + (i % 2) for i in range(len(c))]],
                   prompts=PROMPTS)
    data, m = tr.rollout()
    assert m["rollout/sampling_rounds"] == 3
    assert m["rollout/uniform_group_frac"] == 1.0
    assert float(data.advantages.abs().max()) == 0.0
    # reward.clip (symmetric, without reward.whiten) the same
    cfg = make_config(tmp_path, "grpo", steps=1, data=DataConfig(prompts=PROMPTS, shuffle=False),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                            dynamic_sampling=True, max_sampling_rounds=2),
                      reward=RewardConfig(clip=1.0))
    tr = RLTrainer(cfg, pol, tok_, reward_fns=[lambda p, c: [5.0 + (i % 2) for i in range(len(c))]],
                   prompts=PROMPTS)
    _, m = tr.rollout()
    assert m["rollout/sampling_rounds"] == 2 and m["rollout/uniform_group_frac"] == 1.0


# ------------------------------------------------------------------ (c) eval --run's temperature

def _run_with_eval_temperature(tmp_path, temperature):
    from rlhf_fast.trainers.rl_config import EvalConfig, ModelConfig, RLConfig

    run = tmp_path / "run"
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(run), progress=False,
                   model=ModelConfig(policy="tiny:llama"),
                   reward=RewardConfig(functions=["tests.test_rl_learning:frac_a"]),
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=2),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4),
                   eval=EvalConfig(temperature=temperature))
    RLTrainer(cfg, prompts=PROMPTS).train()
    return run


def test_eval_run_samples_at_the_runs_eval_temperature(tmp_path, monkeypatch, capsys):
    """``rlhf-fast eval --run`` answered greedily whatever the run's ``eval.temperature``; it
    takes the run's (0.7 here, so ``--n 2`` is allowed), ``--temperature`` still wins, and
    without ``--run`` the default stays greedy."""
    from rlhf_fast import cli
    from rlhf_fast.trainers import evaluate

    run = _run_with_eval_temperature(tmp_path, 0.7)
    seen = []

    def fake(*a, **kw):
        seen.append(kw)
        return {"reward/mean": 0.0}

    monkeypatch.setattr(evaluate, "evaluate_policy", fake)
    assert cli.main(["eval", "--run", str(run)]) == 0, capsys.readouterr().err
    assert seen[-1]["temperature"] == 0.7
    assert cli.main(["eval", "--run", str(run), "--n", "2"]) == 0, capsys.readouterr().err
    assert seen[-1]["temperature"] == 0.7 and seen[-1]["n"] == 2
    assert cli.main(["eval", "--run", str(run), "--temperature", "0"]) == 0
    assert seen[-1]["temperature"] == 0.0
    assert cli.main(["eval", "--run", str(run), "--temperature", "0", "--n", "2"]) == 2  # greedy copies
    prompts = tmp_path / "p.txt"
    prompts.write_text("a b\n")
    assert cli.main(["eval", "--policy", str(run / "final" / "policy"), "--prompts", str(prompts),
                     "--reward-fn", "tests.test_rl_learning:frac_a"]) == 0, capsys.readouterr().err
    assert seen[-1]["temperature"] == 0.0
    assert cli.main(["eval", "--policy", str(run / "final" / "policy"), "--prompts", str(prompts),
                     "--reward-fn", "tests.test_rl_learning:frac_a", "--n", "2"]) == 2


# ------------------------------------------------------------------ (d) one answer normalisation

def test_normal_answer_is_the_key_answer_match_and_vote_key_share():
    r"""``normal_answer`` is public; ``vote_key`` is ``extract_answer`` then ``normal_answer``,
    and ``answer_match`` scores two answers with the same key 1.0."""
    from rlhf_fast.algorithms import rule_rewards as rr
    from rlhf_fast.trainers.evaluate import vote_key

    cases = [("1,000", "number:1000"), (r"\frac{2000}{2}", "number:1000"), ("1000.", "number:1000"),
             (r"\dfrac12", "number:1/2"), ("$5\\%$", "number:5"), (" Yes. ", "text:yes"),
             (r"\sqrt2", "text:\\sqrt{2}"), ("", None), ("  $ ", None), ("1 000", "text:1000")]
    for text, key in cases:
        assert rr.normal_answer(text) == key, text
        if key is not None:
            box = f"so \\boxed{{{text}}}"
            assert vote_key(box) == key
            assert rr.answer_match([""], [box], [text]) == [1.0]
    assert vote_key("no answer here") is None and vote_key(r"\boxed{}") is None
    with pytest.raises(TypeError, match="answer"):
        rr.normal_answer(5)
