"""verl's validation metrics (``mean@n``, ``best@k`` / ``worst@k``, ``maj@k``) in ``rlhf-fast
eval`` (:func:`evaluate_policy`) and the RL trainer's periodic evaluation, and ``rlhf-fast eval
--run``'s sampling defaults (the run's rollout length, stop strings and penalties)."""

import itertools
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.trainers import evaluate  # noqa: E402
from rlhf_fast.trainers.evaluate import (best_of_k, majority_of_k, validation_ks, validation_metrics,  # noqa: E402
                                         validation_sums, vote_key, worst_of_k)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ------------------------------------------------------------------ the metrics themselves

def _brute(values, k, reduce):
    subs = list(itertools.combinations(values, k))
    return sum(reduce(s) for s in subs) / len(subs)


def test_ks_are_verls():
    """verl's ns: 2, 4, 8, … below n, then n; none for one answer."""
    assert validation_ks(1) == [] and validation_ks(2) == [2] and validation_ks(3) == [2, 3]
    assert validation_ks(6) == [2, 4, 6] and validation_ks(8) == [2, 4, 8]
    with pytest.raises(ValueError, match="n must be"):
        validation_ks(0)


def test_best_and_worst_of_k_are_the_exact_expectation_over_k_subsets():
    """The closed form Σ r_(i)·C(i−1, k−1)/C(n, k) against the mean of the max / min over every
    k-subset (ties included), for every k."""
    rng = random.Random(0)
    for n in (1, 2, 5, 7):
        r = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        for k in range(1, n + 1):
            assert best_of_k(r, k) == pytest.approx(_brute(r, k, max), abs=1e-12)
            assert worst_of_k(r, k) == pytest.approx(_brute(r, k, min), abs=1e-12)
    # hand-computed: [0, 1, 0.5, 0.2, 0.9], k = 2: 10 pairs, maxima sum 7.9
    assert best_of_k([0.0, 1.0, 0.5, 0.2, 0.9], 2) == pytest.approx(0.79)
    assert worst_of_k([0.0, 1.0, 0.5, 0.2, 0.9], 2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="k must be"):
        best_of_k([1.0, 0.0], 3)


def test_best_of_k_of_correct_flags_is_pass_at_k():
    """With 0 / 1 rewards best@k is the unbiased pass@k."""
    flags = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]])
    for k in range(1, 7):
        want = evaluate.pass_at_k(flags.bool(), k)
        got = sum(best_of_k(row, k) for row in flags.float().tolist()) / 2
        assert got == pytest.approx(want, abs=1e-12)


def test_vote_key_normalises_as_answer_match():
    assert vote_key("so 1,000 apples") == vote_key(r"\boxed{1000.0}") == vote_key(r"\boxed{\frac{2000}{2}}")
    assert vote_key("#### 72 apples") == vote_key("it is 72.") != vote_key("71")
    assert vote_key(r"\boxed{ X }") == vote_key(r"\boxed{x}") == "text:x"
    assert vote_key("no number here") is None and vote_key(r"\boxed{}") is None


def test_majority_hand_computed_ties_and_no_answers():
    """maj@k: the mean over every k-subset of the reward of its voted final answer; ties go to
    the answer given first (verl's calc_maj_val); answers without a final answer do not vote;
    a subset without any takes its first answer's reward."""
    # a, b, b, a with rewards 1, 0, 0, 1: pairs (a,b)->a 1, (a,b)->a 1, (a,a) 1, (b,b) 0, (b,a)->b 0, (b,a)->b 0
    assert majority_of_k([1.0, 0.0, 0.0, 1.0], ["a", "b", "b", "a"], 2) == pytest.approx(0.5)
    assert majority_of_k([1.0, 0.0, 0.0, 1.0], ["a", "b", "b", "a"], 4) == 1.0  # 2-2 tie: a, given first
    assert majority_of_k([0.0, 1.0, 1.0, 0.0], ["b", "a", "a", "b"], 4) == 0.0  # b first now
    # None, None, c, d with rewards 0, 0, 0, 1: (N,N) first 0, (N,c) 0, (N,d) 1, (N,c) 0, (N,d) 1, (c,d)->c 0
    assert majority_of_k([0.0, 0.0, 0.0, 1.0], [None, None, "c", "d"], 2) == pytest.approx(2 / 6)
    assert majority_of_k([0.0, 0.0, 0.0, 1.0], [None, None, "c", "d"], 4) == 0.0
    # one None never outvotes: a single 'x' wins against three abstentions
    assert majority_of_k([0.0, 0.0, 0.0, 0.7], [None, None, None, "x"], 4) == 0.7
    assert majority_of_k([0.3, 0.0], [None, None], 2) == 0.3  # no final answer at all: the first answer's
    # the vote's reward is that of the first answer giving the voted answer (verl's vote2vals[maj][0])
    assert majority_of_k([0.2, 0.9, 0.4], ["a", "b", "a"], 3) == 0.2
    # against a brute-force vote over all k-subsets of a random case
    rng = random.Random(1)
    keys = [rng.choice(["p", "q", "r", None]) for _ in range(9)]
    r = [rng.random() for _ in range(9)]

    def vote(sub):
        counts = {}
        for i in sub:
            if keys[i] is not None:
                counts[keys[i]] = counts.get(keys[i], 0) + 1
        if not counts:
            return r[sub[0]]
        top = max(counts.values())
        win = next(keys[i] for i in sub if counts.get(keys[i]) == top)
        return next(r[i] for i in sub if keys[i] == win)

    for k in range(1, 10):
        assert majority_of_k(r, keys, k) == pytest.approx(_brute(range(9), k, vote), abs=1e-12)
    with pytest.raises(ValueError, match="keys must hold"):
        majority_of_k([1.0, 0.0], ["a"], 1)


def test_majority_above_the_exact_limit_is_seeded():
    """Beyond 20 000 subsets, 1 000 seeded draws: the same value every call, within the bounds."""
    r = [float(i % 3 == 0) for i in range(40)]
    keys = [str(i % 3) for i in range(40)]
    a, b = majority_of_k(r, keys, 8), majority_of_k(r, keys, 8)
    assert a == b and 0.0 <= a <= 1.0
    assert majority_of_k(r, keys, 40) == 1.0  # the vote of all n, exact: '0' (14 answers) beats '1' / '2' (13)


def test_validation_metrics_hand_computed_and_invalid_groups_skipped():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    keys = [["a", "b", "b", "a"], [None, None, "c", "d"]]
    m = validation_metrics(rewards, keys)
    assert sorted(m) == ["best@2", "best@4", "maj@2", "maj@4", "mean@4", "worst@2", "worst@4"]
    assert m["mean@4"] == pytest.approx(0.375)
    assert m["best@2"] == pytest.approx((5 / 6 + 3 / 6) / 2)  # 5 of 6 pairs hold a 1; 3 of 6
    assert m["worst@2"] == pytest.approx((1 / 6 + 0) / 2)
    assert m["maj@2"] == pytest.approx((0.5 + 2 / 6) / 2)
    assert m["maj@4"] == pytest.approx(0.5) and m["best@4"] == 1.0 and m["worst@4"] == 0.0
    assert "maj@2" not in validation_metrics(rewards)  # no final answers: no vote
    # a prompt with an answer no source scored is left out of every metric
    valid = torch.tensor([[True] * 4, [True, False, True, True]])
    m = validation_metrics(rewards, keys, valid)
    assert m["mean@4"] == 0.5 and m["maj@4"] == 1.0
    assert validation_sums(rewards, None, torch.zeros(2, 4, dtype=torch.bool))["mean@4"] == (0.0, 0.0)
    assert validation_metrics(torch.tensor([[0.5], [1.0]])) == {"mean@1": 0.75}


# ------------------------------------------------------------------ evaluate_policy / rlhf-fast eval

@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models import sample_texts, train_tokenizer

    t = train_tokenizer(sample_texts(), 256)
    t.padding_side = "left"
    return t


def _model(tok, seed=1):
    from rlhf_fast.models import tiny_causal_lm

    return tiny_causal_lm(len(tok), seed=seed).eval()


def test_evaluate_policy_reports_them_from_its_answers(tok):
    """n = 4 sampled answers: mean@4 / best@k / worst@k of the recorded rewards, maj@k from the
    answers' final answers when every prompt has an 'answer' field; none with n = 1."""
    calls = []

    def digits(prompts, completions, **fields):
        calls.append(list(completions))
        return [float(sum(ch.isdigit() for ch in c)) + 0.1 * len(c) for c in completions]

    prompts = ["1 2 3", "4 5 6"]
    fields = [{"answer": "3"}, {"answer": "6"}]
    res = evaluate.evaluate_policy(_model(tok), tok, prompts, digits, max_new_tokens=6, temperature=1.0, n=4,
                                   seed=3, fields=fields)
    texts = calls[-1]
    r = torch.tensor(digits(None, texts)).view(2, 4)
    keys = [[vote_key(t) for t in texts[i * 4:i * 4 + 4]] for i in range(2)]
    want = validation_metrics(r, keys)
    assert {k: res[k] for k in want} == pytest.approx(want)
    assert res["mean@4"] == pytest.approx(res["reward/mean"])
    assert "maj@4" in res and "best@2" in res and "worst@4" in res
    res = evaluate.evaluate_policy(_model(tok), tok, prompts, digits, max_new_tokens=6, temperature=1.0, n=4,
                                   seed=3)
    assert "best@4" in res and not any(k.startswith("maj@") for k in res)  # no answer field: no vote
    res = evaluate.evaluate_policy(_model(tok), tok, prompts, digits, max_new_tokens=3, fields=fields)
    assert not any("@" in k for k in res)


def _tiny_run(tmp_path, **rollout):
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import ModelConfig, PPOConfig, RewardConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS

    run = tmp_path / "run"
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(run), progress=False,
                   model=ModelConfig(policy="tiny:llama"),
                   reward=RewardConfig(functions=["tests.test_rl_learning:frac_a"]),
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, **rollout),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    RLTrainer(cfg, prompts=PROMPTS).train()
    return run


def test_eval_run_samples_as_the_run_did(tmp_path, monkeypatch, capsys):
    """``rlhf-fast eval --run`` generated 16 tokens (the flag's default) without the run's stop
    strings or min_new_tokens; it takes the run's rollout.max_new_tokens, stop_strings, top-k /
    top-p and penalties, and --max-new-tokens / --stop still win."""
    from rlhf_fast import cli

    run = _tiny_run(tmp_path, max_new_tokens=3, stop_strings=["b"], min_new_tokens=1, top_k=5)
    seen = []

    def fake(*a, **kw):
        seen.append(kw)
        return {"reward/mean": 0.0}

    monkeypatch.setattr(evaluate, "evaluate_policy", fake)
    assert cli.main(["eval", "--run", str(run)]) == 0, capsys.readouterr().err
    kw = seen[-1]
    assert kw["max_new_tokens"] == 3
    assert kw["sampling"]["stop_strings"] == ("b",) and kw["sampling"]["min_new_tokens"] == 1
    assert kw["sampling"]["top_k"] == 5
    assert cli.main(["eval", "--run", str(run), "--max-new-tokens", "7", "--stop", "zz"]) == 0
    assert seen[-1]["max_new_tokens"] == 7 and seen[-1]["sampling"]["stop_strings"] == ("zz",)
    assert evaluate.run_sampling(None, type("A", (), {"max_new_tokens": None, "stop": None})()) == (16, {})
    assert cli.main(["eval", "--run", str(run), "--stop", ""]) == 2  # an empty stop string: refused


def test_eval_run_really_stops_at_the_runs_length(tmp_path, capsys):
    """End to end: the answers are at most the run's rollout.max_new_tokens (2) long."""
    from rlhf_fast import cli

    run = _tiny_run(tmp_path, max_new_tokens=2)
    out = tmp_path / "res.json"
    assert cli.main(["eval", "--run", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["length/max"] <= 2


# ------------------------------------------------------------------ the RL trainer's evaluation

def test_rl_eval_logs_them_for_groups(tmp_path):
    """eval.group_size 4 at temperature 1: ``eval/mean@4``, ``eval/best@k``, ``eval/worst@k`` and
    (every evaluation prompt with an answer) ``eval/maj@k`` of the recorded answers' rewards;
    none for group_size 1, no maj without answers."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import EvalConfig, PPOConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, make_config, make_policy

    calls = []

    def recorded(prompts, completions, **fields):
        out = [float(len(c)) + 0.5 * float(any(ch.isdigit() for ch in c)) for c in completions]
        calls.append((list(completions), out))
        return out

    ev = [{"prompt": "q: a", "answer": "1"}, {"prompt": "0 1", "answer": "2"}, {"prompt": "x y", "answer": "0"}]

    def trainer(eval_prompts, group_size=4):
        pol, tok = make_policy()
        cfg = make_config(tmp_path, "grpo", steps=1, rollout=RolloutConfig(prompts_per_step=2, group_size=2,
                                                                          max_new_tokens=5),
                          ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4),
                          eval=EvalConfig(group_size=group_size, temperature=1.0))
        return RLTrainer(cfg, pol, tok, reward_fns=[recorded], prompts=PROMPTS, eval_prompts=eval_prompts)

    tr = trainer(ev)
    calls.clear()
    m = tr.evaluate()
    texts = [t for c, _ in calls for t in c]
    rewards = torch.tensor([x for _, r in calls for x in r]).view(3, 4)
    keys = [[vote_key(t) for t in texts[i * 4:i * 4 + 4]] for i in range(3)]
    want = {f"eval/{k}": v for k, v in validation_metrics(rewards, keys).items()}
    assert sorted(want) == ["eval/best@2", "eval/best@4", "eval/maj@2", "eval/maj@4", "eval/mean@4",
                            "eval/worst@2", "eval/worst@4"]
    assert {k: m[k] for k in want} == pytest.approx(want, rel=1e-9)
    assert m["eval/mean@4"] == pytest.approx(m["eval/reward/total"])
    m = trainer([e["prompt"] for e in ev]).evaluate()
    assert "eval/best@4" in m and not any(k.startswith("eval/maj@") for k in m)
    m = trainer(ev, group_size=1).evaluate()
    assert not any("@" in k for k in m)
