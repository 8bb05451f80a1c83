"""RLTrainer internals: PPO pieces against the reference ops on a recorded batch, micro-batching
independence, exact resume, reward failures, TRPO / early stop / importance sampling options,
and the run folder."""

import json
import math
import os

import pytest
import torch

from rlhf_fast.algorithms import RewardError, token_rewards
from rlhf_fast.ops import reference
from rlhf_fast.trainers.rl import RLTrainer, critic_values
from rlhf_fast.trainers.rl_config import KLConfig, ModelConfig, OptimConfig, PPOConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, estimator="grpo", reward_fns=(frac_a,), **kw):
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    cfg = make_config(tmp_path, estimator, **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=list(reward_fns), prompts=PROMPTS)


def n_chars(prompts, completions):
    """A dense reward: groups rarely tie, so advantages (and updates) are non-zero."""
    return [float(len(c)) for c in completions]


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _perturb(trainer, data):
    """One optimiser step so the current policy differs from old_logp (ratios ≠ 1, clipping active)."""
    trainer.optimizer.zero_grad()
    trainer.policy_backward(data)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batching_gives_the_same_gradient(tmp_path, agg):
    tr = _trainer(tmp_path, "gae", ppo=PPOConfig(agg=agg, mini_batch_size=8, micro_batch_size=8, entropy_coef=0.01),
                  kl=KLConfig(coef=0.1, placement="loss"))
    data, _ = tr.rollout()
    assert data.input_ids.shape[0] == 8
    _perturb(tr, data)
    for model, backward in ((tr.policy, tr.policy_backward), (tr.critic, tr.critic_backward)):
        model.zero_grad(set_to_none=True)
        backward(data, 8)  # 1 x 8
        g1 = _grads(model)
        model.zero_grad(set_to_none=True)
        backward(data, 2)  # 4 x 2
        g2 = _grads(model)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert any(a.abs().sum() > 0 for a in g1)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, monkeypatch):
    """model.gradient_checkpointing: the policy and the critic built from it recompute each
    layer in the update's backward (eval mode, as RL keeps them) and get the gradients of the
    plain run; the frozen reference does not checkpoint."""
    from rlhf_fast.models import llama_forward

    tr = _trainer(tmp_path / "plain", "gae")
    ck = _trainer(tmp_path / "ckpt", "gae", model=ModelConfig(gradient_checkpointing=True))
    assert not tr.policy.training and not ck.policy.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in ck.reference.modules())
    data, _ = tr.rollout()
    calls = []
    real = llama_forward._layer
    monkeypatch.setattr(llama_forward, "_layer", lambda *a: calls.append(1) or real(*a))

    def backward(trainer, which):
        """The gradients of one update of ``which`` on the batch, and the layer runs it took."""
        model = getattr(trainer, which)
        model.zero_grad(set_to_none=True)
        calls.clear()
        getattr(trainer, f"{which}_backward")(data, 8)
        return _grads(model), len(calls)

    for which in ("policy", "critic"):
        (g_plain, n_plain), (g_ckpt, n_ckpt) = backward(tr, which), backward(ck, which)
        for a, b in zip(g_plain, g_ckpt):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert any(a.abs().sum() > 0 for a in g_plain)
        assert n_ckpt == 2 * n_plain > 0, which  # every layer ran again in the backward


def test_ppo_internals_match_reference_ops(tmp_path):
    """On a recorded batch: log-probs, rewards, GAE, policy loss (asymmetric + dual clip,
    entropy bonus, k3 KL in the loss) and value loss equal the reference composition."""
    ppo = PPOConfig(mini_batch_size=8, micro_batch_size=4, clip_low=0.1, clip_high=0.3, dual_clip=3.0,
                    entropy_coef=0.01, gamma=0.97, lam=0.9, value_clip=0.2)
    tr = _trainer(tmp_path, "gae", ppo=ppo, kl=KLConfig(coef=0.05, placement="reward"))
    data, _ = tr.rollout()
    ids, am, rm = data.input_ids, data.attention_mask, data.response_mask

    def ref_logp_entropy(model):
        logits = model(input_ids=ids, attention_mask=am.long(),
                       position_ids=(am.long().cumsum(1) - 1).clamp(min=0)).logits.float()
        lp, ent = reference.token_logprobs(logits[:, :-1], ids[:, 1:], return_entropy=True)
        z = torch.zeros(ids.shape[0], 1)
        return torch.cat([z, lp], 1) * rm, torch.cat([z, ent], 1) * rm

    with torch.no_grad():
        lp0, _ = ref_logp_entropy(tr.policy)
        lr0, _ = ref_logp_entropy(tr.reference)
    torch.testing.assert_close(data.old_logp, lp0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data.ref_logp, lr0, rtol=1e-4, atol=1e-5)
    # rewards: score on the last token, −β·k1 everywhere; then GAE with the critic's values
    kl = reference.kl_penalty(lp0, lr0, "k1") * rm
    r = token_rewards(data.scores, rm, kl=kl, kl_coef=0.05)
    adv, ret = reference.gae(r, data.values, rm, gamma=0.97, lam=0.9)
    torch.testing.assert_close(data.advantages, adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data.returns, ret, rtol=1e-4, atol=1e-5)

    # the loss with KL in the loss (k3), evaluated after one update so ratios ≠ 1
    tr.config.kl.placement = "loss"
    _perturb(tr, data)
    tr.policy.zero_grad(set_to_none=True)
    st = tr.policy_backward(data)
    g_ours = _grads(tr.policy)
    tr.policy.zero_grad(set_to_none=True)
    lp, ent = ref_logp_entropy(tr.policy)
    tok, ratio, clipped, dual = reference.ppo_token_loss(lp, data.old_logp, data.advantages, clip_low=0.1,
                                                         clip_high=0.3, dual_clip=3.0)
    total = tok + 0.05 * reference.kl_penalty(lp, data.ref_logp, "k3") - 0.01 * ent
    loss = reference.aggregate(total, rm, "token-mean")
    loss.backward()
    g_ref = _grads(tr.policy)
    assert st["loss"] == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6)
    assert st["clip_frac"] == pytest.approx(float(reference.masked_mean(clipped.float(), rm)), abs=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    # value loss
    tr.critic.zero_grad(set_to_none=True)
    vs = tr.critic_backward(data)
    v = critic_values(tr.critic, ids, am)  # V(s_t): the critic's output at t − 1
    vl, _ = reference.ppo_value_loss(v, data.values, data.returns, rm, clip=0.2)
    assert vs["value_loss"] == pytest.approx(float(vl.detach()), rel=1e-4, abs=1e-7)


def test_critic_values_are_those_of_the_state_before_each_token(tmp_path):
    """The baseline of the action at response position t is V(s_t), s_t = input_ids[:, :t]: the
    critic's output at t − 1 (TRL's full_value[:, context_length - 1 : -1], verl's
    values[:, -response_length - 1 : -1]). Its output at t has read the action itself, which
    biases the policy gradient and, at the last token, cancels the score."""
    tr = _trainer(tmp_path, "gae", reward_fns=[n_chars])
    data, _ = tr.rollout()
    ids, am, rm = data.input_ids, data.attention_mask, data.response_mask
    with torch.no_grad():
        raw = tr.critic(ids, am).float()
    shifted = torch.cat([torch.zeros_like(raw[:, :1]), raw[:, :-1]], dim=1)
    torch.testing.assert_close(data.values, shifted * rm, rtol=1e-5, atol=1e-6)
    # the value at each row's first response token sees the prompt only: other response tokens
    # leave it unchanged
    first = rm.float().argmax(dim=1)
    rows = torch.arange(ids.shape[0])
    V = tr.policy.get_input_embeddings().num_embeddings
    other = torch.where(rm, (ids + 1) % V, ids)
    with torch.no_grad():
        v2 = critic_values(tr.critic, other, am)
    torch.testing.assert_close(v2[rows, first], data.values[rows, first], rtol=1e-5, atol=1e-6)


def test_dr_grpo_loss_is_normalised_by_the_generation_budget(tmp_path):
    """seq-mean-token-sum-norm (Dr.GRPO) divides the token sum by rows × rollout.max_new_tokens,
    a constant (TRL: B · max_completion_length), not by the batch's padded width, which
    counts prompt columns too: extra padding columns leave the loss as it was."""
    from rlhf_fast.models.logprobs import sequence_logprobs

    ppo = PPOConfig(agg="seq-mean-token-sum-norm", mini_batch_size=8, micro_batch_size=4)
    tr = _trainer(tmp_path, "dr_grpo", reward_fns=[n_chars], ppo=ppo)
    data, _ = tr.rollout()
    B, L = data.input_ids.shape
    budget = tr.config.rollout.max_new_tokens
    assert L > budget  # the prompt columns: B·L is not the Dr.GRPO constant
    _perturb(tr, data)  # ratios ≠ 1: with equal lengths the sum of −A alone is 0
    tr.policy.zero_grad(set_to_none=True)
    st = tr.policy_backward(data)
    with torch.no_grad():
        lp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask,
                               response_mask=data.response_mask)
    tok, *_ = reference.ppo_token_loss(lp, data.old_logp, data.advantages)
    want = reference.aggregate(tok, data.response_mask, "seq-mean-token-sum-norm", normalizer=B * budget)
    assert abs(float(want)) > 1e-4
    assert st["loss"] == pytest.approx(float(want), rel=1e-4, abs=1e-7)
    # three more (left) padding columns: the same rows, the same loss
    pad = {k: getattr(data, k) for k in data.__dataclass_fields__}
    for k, v in pad.items():
        if v is not None and v.dim() == 2:
            fill = tr.tokenizer.pad_token_id if k == "input_ids" else 0
            pad[k] = torch.cat([torch.full((B, 3), fill, dtype=v.dtype), v], dim=1)
    st_pad = tr.policy_backward(type(data)(**pad))
    assert st_pad["loss"] == pytest.approx(st["loss"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_resume_equals_uninterrupted(tmp_path, estimator):
    kw = dict(steps=4, save_every=2, kl=KLConfig(coef=0.02, controller="adaptive", target=1.0, horizon=50))
    kw_r = dict(kw)
    a = _trainer(tmp_path / "a", estimator, **kw)
    a.config.reward.whiten = True
    a.train()
    b = _trainer(tmp_path / "b", estimator, **kw_r)
    b.config.reward.whiten = True
    b.train(steps=2)  # stopped after the checkpoint at step 2
    with open(os.path.join(b.config.output_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "rew')  # and died writing the next record: the torn line is dropped
    cfg = b.config
    cfg.resume = cfg.output_dir
    pol, tok = make_policy()  # a fresh process would rebuild the initial policy
    c = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)
    c.train()

    def rows(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per"))} for ln in f]

    ra, rb = rows(a.config.output_dir), rows(cfg.output_dir)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert ra == rb
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def test_a_resume_that_cannot_load_leaves_the_run_as_it_was(tmp_path):
    """Resuming with a model of another size is one ValueError naming the checkpoint, and the
    run's config.yaml and metrics are untouched; so is a damaged optimiser file."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    b = _trainer(tmp_path, "grpo", steps=1)
    b.train()
    run = b.config.output_dir
    files = {n: open(os.path.join(run, n)).read() for n in ("config.yaml", "metrics.jsonl")}
    cfg = b.config
    cfg.resume = run
    _, tok = make_policy()
    other = tiny_causal_lm(len(tok), hidden_size=16, num_layers=2, num_heads=2, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with pytest.raises(ValueError, match="checkpoint .*cannot restore model 'policy'"):
        RLTrainer(cfg, other, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    assert {n: open(os.path.join(run, n)).read() for n in files} == files
    from rlhf_fast.trainers.checkpoint import latest_checkpoint

    opt = os.path.join(latest_checkpoint(run), "optimizers", "policy.pt")
    with open(opt, "r+b") as f:
        f.truncate(50)
    pol, tok = make_policy()
    with pytest.raises(ValueError, match="cannot restore optimizer 'policy'.*damaged \\(remove that folder to resume "
                                         "from the previous checkpoint\\)"):
        RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    assert {n: open(os.path.join(run, n)).read() for n in files} == files
    # a new run (no resume) into that folder is refused before it writes anything
    cfg.resume = None
    pol, tok = make_policy()
    with pytest.raises(ValueError, match=f"output_dir {run} already holds a run \\(checkpoints, final, metrics.jsonl\\): "
                                         f"continue it \\(resume: {run}, or --resume {run}\\)"):
        RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    assert {n: open(os.path.join(run, n)).read() for n in files} == files


def test_a_resume_below_the_runs_step_is_refused(tmp_path):
    """steps below the checkpoint's step would train nothing and record a config shorter than
    the run's log: refused, config.yaml kept; a resume records where the run really is."""
    b = _trainer(tmp_path, "grpo", steps=2)
    b.train()
    run = b.config.output_dir
    saved = open(os.path.join(run, "config.yaml")).read()
    cfg = b.config
    cfg.resume, cfg.steps, cfg.output_dir = run, 1, str(tmp_path / "elsewhere")
    pol, tok = make_policy()
    with pytest.raises(ValueError, match=r"steps \(1\) is below step 2, which the run in .* has reached"):
        RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    assert open(os.path.join(run, "config.yaml")).read() == saved
    cfg.steps = 3
    pol, tok = make_policy()
    RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig

    again = load_config(RLConfig, os.path.join(run, "config.yaml"))
    assert (again.steps, again.output_dir) == (3, run) and not os.path.exists(tmp_path / "elsewhere")


def test_prompts_files_and_rollout_length_are_checked(tmp_path):
    """A prompts file's problems name the setting, the file and the line; a response length
    beyond the policy's positions is refused before anything is allocated."""
    from rlhf_fast.trainers.rl import load_prompts
    from rlhf_fast.trainers.rl_config import DataConfig

    cases = {"bad.jsonl": (b"not json\n", r"bad.jsonl, line 1: not a JSON object"),
             "num.jsonl": (b'{"p": 1}\n{"prompt": 5}\n', r"num.jsonl, line 1: expected an object with a field 'prompt' \(data.prompt_key\) holding text"),
             "empty.txt": (b"\n \n", r"empty.txt holds no prompts"),
             "bin.txt": (b"\xff\xfe\n", r"bin.txt: not UTF-8 text")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"data.prompts_file .*{msg}"):
            load_prompts(DataConfig(prompts_file=str(tmp_path / name)))
    with pytest.raises(IsADirectoryError, match="is a folder; expected a .txt or .jsonl file"):
        load_prompts(DataConfig(prompts_file=str(tmp_path)))
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n')
    assert load_prompts(DataConfig(prompts_file=str(tmp_path / "ok.jsonl"))) == ["a", "b"]
    positions = make_policy()[0].config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"rollout.max_new_tokens \({positions + 1}\) is more than the policy's "
                                         rf"max_position_embeddings \({positions}\)"):
        _trainer(tmp_path, rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=positions + 1))


def test_train_in_parts_continues_its_own_run(tmp_path):
    """train(steps=k) again on the same trainer continues the run it started (not a new one)."""
    tr = _trainer(tmp_path, "grpo", steps=3)
    tr.train(steps=1)
    tr.train(steps=2)
    with open(os.path.join(tr.config.output_dir, "metrics.jsonl")) as f:
        assert [json.loads(ln)["step"] for ln in f] == [1, 2, 3]


def test_bad_rewards_raise_or_drop(tmp_path):
    def nan_reward(prompts, completions):
        return [float("nan")] + [1.0] * (len(completions) - 1)

    def failing(prompts, completions):
        raise RuntimeError("grader crashed")

    tr = _trainer(tmp_path / "a", reward_fns=[nan_reward])
    with pytest.raises(RewardError, match="nan_reward"):
        tr.step()
    tr = _trainer(tmp_path / "b", reward_fns=[failing])
    with pytest.raises(RewardError, match="failing.*grader crashed"):
        tr.step()
    tr = _trainer(tmp_path / "c", reward_fns=[nan_reward, frac_a])
    tr.config.reward.on_bad_reward = "drop"
    tr.reward.on_bad_reward = "drop"
    seen = []
    real_update = tr.kl_ctl.update
    tr.kl_ctl.update = lambda kl, n: (seen.append(n), real_update(kl, n))[1]
    m = tr.step()
    assert m["reward/dropped"] == 1 and math.isfinite(m["reward/total"])
    assert m["reward/frac_a"] >= 0
    # the KL controller counts the samples the step kept (the dropped group's are gone)
    assert seen and 0 < seen[0] < tr.config.rollout.prompts_per_step * tr.config.rollout.group_size
    tr = _trainer(tmp_path / "d", reward_fns=[failing])
    tr.reward.on_bad_reward = "drop"
    with pytest.raises(RewardError, match="every sample"):
        tr.step()
    with pytest.raises(ValueError, match="no reward source"):
        _trainer(tmp_path / "e", reward_fns=[])


def test_trpo_step_respects_the_kl_bound(tmp_path):
    from rlhf_fast.models.logprobs import sequence_logprobs

    ppo = PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8, trpo=True, trpo_max_kl=1e-4)
    tr = _trainer(tmp_path, "grpo", reward_fns=[n_chars], ppo=ppo, optim=OptimConfig(lr=5e-2))
    data, _ = tr.rollout()
    m = tr.update(data)
    with torch.no_grad():
        lp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=data.response_mask)
    d = lp - data.old_logp
    assert float(reference.masked_mean(0.5 * d * d, data.response_mask)) <= 1e-4 + 1e-7
    assert 0.0 <= m["policy/trpo_step_frac"] < 1.0  # lr 5e-2 overshoots: it had to backtrack


def test_early_stop_and_importance_sampling(tmp_path):
    ppo = PPOConfig(epochs=4, mini_batch_size=4, micro_batch_size=2, target_kl=1e-6, is_cap=2.0)
    tr = _trainer(tmp_path, "rloo", reward_fns=[n_chars], ppo=ppo)
    m = tr.step()
    assert m["policy/early_stopped"] == 1 and m["policy/updates"] < 8
    assert m["is_weight/mean"] == pytest.approx(1.0, abs=1e-3)  # sampler and trainer agree
    assert m["logprob_gap/mean"] < 1e-4


def test_run_folder(tmp_path):
    tr = _trainer(tmp_path, "grpo", steps=3, sample_every=1, save_every=2)
    tr.train()
    run = tr.config.output_dir
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "final/policy/config.json"):
        assert os.path.exists(os.path.join(run, name)), name
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000002", "step_00000003"]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f]
    need = ["reward/total", "reward/frac_a", "kl/seq", "kl/coef", "entropy", "policy/clip_frac", "policy/approx_kl",
            "response_length/mean", "tokens_per_second", "time/generate", "time/logprobs", "time/update",
            "logprob_gap/mean", "logprob_gap/max", "policy/loss"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(k in recs[-1] for k in need), [k for k in need if k not in recs[-1]]
    try:
        import tensorboard  # noqa: F401

        assert any(n.startswith("events") for n in os.listdir(os.path.join(run, "tb")))
    except ImportError:
        pass
    with open(os.path.join(run, "samples.jsonl")) as f:
        s = [json.loads(ln) for ln in f]
    assert {"step", "prompt", "completion", "reward"} <= set(s[0])


def test_reward_model_and_judge_sources_are_logged_each(tmp_path):
    from rlhf_fast.feedback.judge import Judge, JudgeConfig
    from rlhf_fast.models.tiny import tiny_reward_model

    class LengthBackend:  # a stand-in judge model: longer answers score higher
        def score(self, text):
            return float(len(text))

        def prefer_first(self, text):
            return 0.5

    pol, tok = make_policy()
    rm = tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id)
    judge = Judge(JudgeConfig(backend="local", model="stub", cache=None), backend=LengthBackend())
    cfg = make_config(tmp_path, "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], reward_models=[rm], judge=judge, prompts=PROMPTS)
    data, m = tr.rollout()
    for k in ("reward/frac_a", "reward/reward_model", "reward/judge"):
        assert math.isfinite(m[k]), k
    # the reward model scores the rollout's own tokens: compare with a direct call
    from rlhf_fast.models.loading import reward_scores

    with torch.no_grad():
        direct = reward_scores(rm, data.input_ids, data.attention_mask.long())
    assert m["reward/reward_model"] == pytest.approx(float(direct.mean()), abs=1e-5)


def test_reward_rollout_and_data_settings_are_checked_naming_the_key():
    """Values that failed only in the first step, with a message naming no setting ("n must be a
    positive int", "stop_strings must be non-empty strings", "every prompt must have at least
    one token"), or not at all (a negative length target), are refused by the config."""
    from rlhf_fast.trainers.rl_config import DataConfig, RewardConfig

    with pytest.raises(ValueError, match="reward.repetition_ngram must be an int > 0, got 0"):
        RewardConfig(repetition_ngram=0)
    with pytest.raises(ValueError, match="reward.length_target must be an int >= 0, got -5"):
        RewardConfig(length_target=-5)
    with pytest.raises(ValueError, match=r"rollout.stop_strings\[1\] must be a non-empty string, got ''"):
        RolloutConfig(stop_strings=["\n", ""])
    with pytest.raises(ValueError, match=r"data.prompts\[1\] must be a non-empty string, got ''"):
        DataConfig(prompts=[" ", ""])
    assert RewardConfig(length_target=0, repetition_ngram=1).length_target == 0


def test_a_damaged_trainer_state_or_a_new_lr_on_resume(tmp_path):
    """extra.json missing a key is one ValueError naming the file and what to do (it was a bare
    KeyError: 'prompt_pos'), the run untouched; a resume with another optim.lr trains at it."""
    from rlhf_fast.trainers.checkpoint import latest_checkpoint

    b = _trainer(tmp_path, "grpo", steps=1)
    b.train()
    run = b.config.output_dir
    files = {n: open(os.path.join(run, n)).read() for n in ("config.yaml", "metrics.jsonl")}
    extra_path = os.path.join(latest_checkpoint(run), "extra.json")
    good = open(extra_path).read()
    with open(extra_path, "w") as f:
        json.dump({k: v for k, v in json.loads(good).items() if k != "prompt_pos"}, f)
    cfg = b.config
    cfg.resume, cfg.steps = run, 2
    pol, tok = make_policy()
    with pytest.raises(ValueError, match=r"step_00000001: extra.json lacks 'prompt_pos' .* remove that folder"):
        RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    assert {n: open(os.path.join(run, n)).read() for n in files} == files
    with open(extra_path, "w") as f:
        f.write(good)
    cfg.optim.lr = cfg.optim.lr * 7
    pol, tok = make_policy()
    c = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)
    c.train()
    assert c.optimizer.param_groups[0]["initial_lr"] == cfg.optim.lr
    assert c.scheduler.base_lrs == [cfg.optim.lr]


def test_trpo_centres_the_trust_region_on_the_rollout_policy(tmp_path):
    """TRPO's constraint is KL(π_old ‖ π_θ) to the policy that sampled the batch: with several
    mini-batches and epochs, every accepted step leaves its mini-batch within trpo_max_kl of the
    rollout policy (a bound on each step's own move lets the steps add up past it), and a
    refused step leaves the parameters as they were."""
    from rlhf_fast.models.logprobs import sequence_logprobs

    max_kl = 1e-3
    ppo = PPOConfig(epochs=3, mini_batch_size=4, micro_batch_size=4, trpo=True, trpo_max_kl=max_kl,
                    trpo_backtrack_steps=4)
    tr = _trainer(tmp_path, "grpo", reward_fns=[n_chars], ppo=ppo, optim=OptimConfig(lr=1e-3))
    data, _ = tr.rollout()
    seen, inner = [], tr._trpo_step

    def checked(mini):
        before = [p.detach().clone() for p in tr.policy.parameters()]
        st = inner(mini)
        with torch.no_grad():
            lp = sequence_logprobs(tr.policy, mini.input_ids, mini.attention_mask, response_mask=mini.response_mask)
        d = lp - mini.old_logp
        same = all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))
        seen.append((st["trpo_step_frac"], float(reference.masked_mean(0.5 * d * d, mini.response_mask)), same))
        return st

    tr._trpo_step = checked
    m = tr.update(data)
    assert m["policy/updates"] == 6 and len(seen) == 6
    accepted = [kl for frac, kl, _ in seen if frac > 0]
    assert len(accepted) >= 3, seen
    assert max(accepted) <= max_kl * (1 + 1e-3) + 1e-7, seen
    assert all(same for frac, _, same in seen if frac == 0), seen


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_lora_policy_resumes_exactly(tmp_path):
    """A peft (LoRA) policy: its checkpoint holds the adapters under the model's own keys (peft's
    save_pretrained folder did not load back), so the resumed run equals the uninterrupted one."""
    pytest.importorskip("peft")
    from rlhf_fast.models.loading import load_policy

    lora_cfg = {"r": 4, "target_modules": ["q_proj", "v_proj"]}

    def trainer(name, from_config=False, **kw):
        pol, tok = make_policy()
        torch.manual_seed(0)  # the same adapter initialisation in every run
        if not from_config:
            pol = load_policy(pol, lora=lora_cfg)
        cfg = make_config(tmp_path / name, "grpo", steps=4, save_every=2, lr=2e-2,
                          rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5), **kw)
        if from_config:
            cfg.model.lora = dict(lora_cfg)
        return RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)

    a = trainer("a")
    a.train()
    b = trainer("b")
    b.train(steps=2)
    c = trainer("b", resume=b.config.output_dir)
    c.train()
    lora = {n: p for n, p in a.policy.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    start = dict(trainer("x").policy.named_parameters())
    assert all(not torch.equal(p, start[n]) for n, p in lora.items() if "lora_B" in n)  # the adapters trained
    for (n, p), (_, q) in zip(a.policy.named_parameters(), c.policy.named_parameters()):
        assert torch.equal(p, q), n
    # model.lora in the config: the same adapters, the same run
    d = trainer("d", from_config=True)
    assert not isinstance(d.reference, torch.nn.Module)  # the base with adapters disabled: no copy
    d.train()
    for (n, p), (_, q) in zip(a.policy.named_parameters(), d.policy.named_parameters()):
        assert torch.equal(p, q), n
    pol, tok = make_policy()
    cfg = make_config(tmp_path / "e", "grpo", steps=1)
    cfg.model.lora = dict(lora_cfg)
    with pytest.raises(ValueError, match="model.lora: the policy already has peft adapters"):
        RLTrainer(cfg, load_policy(pol, lora=lora_cfg), tok, reward_fns=[frac_a], prompts=PROMPTS)


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_no_kl_term_means_no_reference_model_and_the_same_training(tmp_path, placement, monkeypatch):
    """kl.coef 0 with the fixed controller (DAPO; TRL's beta 0): no reference is built and none
    runs, no kl/* metric is logged, and training is what it is with a reference whose KL term
    weighs 0. model.reference or a reference passed in still gives one (for its KL metrics)."""
    from rlhf_fast.models import logprobs as lp_mod
    from rlhf_fast.models.loading import make_reference

    kw = dict(steps=2, kl=KLConfig(coef=0.0, placement=placement))
    a = _trainer(tmp_path / "a", "grpo", reward_fns=(n_chars,), **kw)
    assert a.reference is None
    policies = {id(a.policy)}
    calls = []
    real = lp_mod.sequence_logprobs

    def counted(model, *args, **kwargs):
        calls.append(id(model) in policies)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lp_mod, "sequence_logprobs", counted)
    ha = a.train()
    assert calls and all(calls), "only the policy ran a forward"
    assert all(not {"kl/seq", "kl/token", "policy/kl"} & set(m) and m["kl/coef"] == 0.0 for m in ha)
    monkeypatch.setattr(lp_mod, "sequence_logprobs", real)

    pol, tok = make_policy()
    cfg = make_config(tmp_path / "b", "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                      **kw)
    b = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS, reference=make_reference(pol))
    assert b.reference is not None
    hb = b.train()
    assert all("kl/seq" in m for m in hb) and hb[-1]["kl/seq"] != 0.0
    for ma, mb in zip(ha, hb):
        assert set(mb) - set(ma) == {"kl/seq", "kl/token", "policy/kl"}
        for k, v in ma.items():
            if not k.startswith(("time/", "tokens_per")):
                assert v == pytest.approx(mb[k], rel=1e-6, abs=1e-7), k
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # any KL term keeps the reference
    for kl in (KLConfig(coef=0.01), KLConfig(coef=0.0, controller="adaptive"), KLConfig(coef=0.0, ref_sync_steps=1)):
        assert _trainer(tmp_path / "c", "grpo", steps=1, kl=kl).reference is not None
