"""Review of evaluation metrics (``rlhf-fast eval`` / :func:`evaluate_policy`): the win-rate's
draws and the reward means over answers a reward source dropped."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402

from rlhf_fast.algorithms.rewards import CombinedReward  # noqa: E402
from rlhf_fast.trainers import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

PROMPTS = ["hello there", "how are you"]


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models import sample_texts, train_tokenizer

    t = train_tokenizer(sample_texts(), 256)
    t.padding_side = "left"
    return t


def _model(tok, seed):
    from rlhf_fast.models import tiny_causal_lm

    return tiny_causal_lm(len(tok), seed=seed).eval()


def _recording(calls):
    """A reward (ours convention) recording each call's completions; reward = length."""
    def fn(prompts, completions):
        calls.append(list(completions))
        return [float(len(c)) for c in completions]

    return fn


def test_win_rate_draws_policy_and_reference_answers_independently(tok):
    """The reference's answers must be drawn independently of the policy's: one seed for both
    couples the draws (two equal policies gave equal answers, every pair a tie, win-rate
    exactly 0.5; a better policy measured 0.72 where independent draws give 0.67 — the demo's
    finding, 344e4bd). Here policy == reference in weights, sampled at temperature 1."""
    calls = []
    res = evaluate.evaluate_policy(_model(tok, 1), tok, PROMPTS, _recording(calls), reference=_model(tok, 1),
                                   max_new_tokens=6, temperature=1.0, n=4, seed=0)
    assert len(calls) == 2  # the policy's answers, then the reference's
    pol, ref = calls
    assert len(pol) == len(ref) == 8
    assert pol != ref  # coupled: the reference repeated the policy's 8 answers word for word
    assert 0.0 <= res["win_rate"] <= 1.0


def test_reward_means_skip_answers_a_source_dropped(tok):
    """A reward with ``on_bad_reward="drop"`` (ours convention): a dropped answer (NaN reward) is
    left out of ``reward/mean`` / ``reward/std`` and ``reference/reward_mean`` as the RL
    trainer's ``eval/reward/total`` leaves it out — not averaged in as its placeholder 0."""
    def fn(prompts, completions):
        return [float("nan"), 1.0]

    reward = CombinedReward([fn], on_bad_reward="drop")
    res = evaluate.evaluate_policy(_model(tok, 1), tok, PROMPTS, reward, reference=_model(tok, 2),
                                   max_new_tokens=3)
    assert res["reward/mean"] == 1.0  # was 0.5: the dropped answer counted as reward 0
    assert res["reward/std"] == 0.0
    assert res["reference/reward_mean"] == 1.0
    assert res["win_rate"] == 0.5  # the one pair scored on both sides: a tie


def test_prompts_given_as_one_text_is_refused(tok):
    """``prompts="hello"`` evaluated 5 one-character prompts ("h", "e", ...) and reported
    ``num_prompts`` 5: a TypeError naming ``prompts`` instead, as the overlap metrics refuse a
    text for their lists."""
    with pytest.raises(TypeError, match="prompts must be a list"):
        evaluate.evaluate_policy(_model(tok, 1), tok, "hello", lambda p, c: [0.0] * len(c), max_new_tokens=2)


def test_eval_run_drops_bad_rewards_as_the_run_did(tmp_path, capsys):
    """A run with ``reward.on_bad_reward: drop`` skipped NaN rewards in training and in its
    ``eval/reward/total``; ``rlhf-fast eval --run`` refused them (exit 2, advising an
    ``on_bad_reward`` the command has no flag for). It scores as the run did: the NaN answers
    left out of the reward mean."""
    import json

    from rlhf_fast import cli
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import ModelConfig, PPOConfig, RewardConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS

    run = tmp_path / "run"
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(run), progress=False,
                   model=ModelConfig(policy="tiny:llama"),
                   reward=RewardConfig(functions=["tests.test_rl_learning:frac_a"], on_bad_reward="drop"),
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=3),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    RLTrainer(cfg, prompts=PROMPTS).train()
    (tmp_path / "rw.py").write_text("def odd_nan(prompts, completions):\n"
                                    "    return [float('nan') if i % 2 else 2.0 for i in range(len(completions))]\n")
    out = tmp_path / "res.json"
    code = cli.main(["eval", "--run", str(run), "--reward-fn", f"{tmp_path / 'rw.py'}:odd_nan",
                     "--max-new-tokens", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["reward/mean"] == 2.0 and res["reference/reward_mean"] == 2.0


def test_pass_at_k_refuses_scores_that_are_not_correct_flags():
    """``correct`` holds flags (bool, or 0 / 1): rewards handed in instead ([0.5, 0.7]: c summed
    to 1.2, truncated to 1) gave pass@1 = 0.5 silently; a ValueError naming ``correct``."""
    import torch

    assert evaluate.pass_at_k(torch.tensor([[1, 0], [1, 1]]), 1) == 0.75  # 0 / 1 ints are flags
    with pytest.raises(ValueError, match="correct must hold"):
        evaluate.pass_at_k(torch.tensor([[0.5, 0.7]]), 1)


def test_eval_on_bad_reward_drop_without_a_run(tok, tmp_path, capsys):
    """A NaN reward stopped ``rlhf-fast eval --policy`` with "set on_bad_reward='drop'", an
    option the command lacked: ``--on-bad-reward drop`` leaves those answers out of the means."""
    import json

    from rlhf_fast import cli

    _model(tok, 1).save_pretrained(str(tmp_path / "policy"))
    tok.save_pretrained(str(tmp_path / "policy"))
    (tmp_path / "prompts.txt").write_text("hello there\nhow are you\n")
    (tmp_path / "rw.py").write_text("def odd_nan(prompts, completions):\n"
                                    "    return [float('nan') if i % 2 else 2.0 for i in range(len(completions))]\n")
    argv = ["eval", "--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.txt"),
            "--reward-fn", f"{tmp_path / 'rw.py'}:odd_nan", "--max-new-tokens", "2"]
    assert cli.main(argv) == 2 and "non-finite reward" in capsys.readouterr().err
    out = tmp_path / "res.json"
    assert cli.main(argv + ["--on-bad-reward", "drop", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["reward/mean"] == 2.0
