"""reward.process_aggregation 'steps': a process reward model's step rewards as dense (token-level)
rewards for GAE / REINFORCE++ (rlhf_fast.algorithms.process_rewards). The placement of a hand
batch (a token spanning a separator, two separators in one token, a truncated last step, a step
past the tokens, an empty answer) against a hand placement and a brute-force prefix decoding of
a real tokenizer; the token rewards and GAE / REINFORCE++ advantages against hand references;
CombinedReward's split of the total; the PRM's step rewards against its logits; one PPO step;
refusals naming the key and the estimator."""

import json
import math
import os

import pytest
import torch

from rlhf_fast.algorithms import CombinedReward, RewardSource
from rlhf_fast.algorithms.advantages import compute_advantages, token_rewards
from rlhf_fast.algorithms.process_rewards import (ProcessRewardModel, split_steps, step_ends, step_token_rewards,
                                                  token_char_ends)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class PieceTokenizer:
    """Tokens are fixed text pieces (id 0 is a special eos that decoding skips), so a test can
    put a separator inside a token."""

    def __init__(self, pieces):
        self.pieces = ["<eos>"] + list(pieces)

    def ids(self, *pieces):
        return [self.pieces.index(p) for p in pieces]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))


PT = PieceTokenizer(["1+1", "=2", "\n", "2+2=", "5\n3", "+1", "a", "\n\nb", "\n", "c", "x"])


def _hand_batch():
    """(ids [3, 9], mask [3, 9], texts, steps, want [3, 9]): left padding then the answers."""
    rows = [PT.ids("1+1", "=2", "\n", "2+2=", "5\n3", "+1"),  # truncated: its last step has no separator
            [0],  # an empty answer (eos only)
            PT.ids("a", "\n\nb", "\n", "c") + [0]]  # "a\n\nb\nc": a blank line, then eos
    T = 9
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = True
    texts = [PT.decode(r) for r in rows]
    assert texts == ["1+1=2\n2+2=5\n3+1", "", "a\n\nb\nc"]
    # (character end, reward); the last row's 0.7 step ends past its tokens (a text longer than they decode to)
    steps = [[(e, v) for e, v in zip(step_ends(texts[0], "\n"), (0.5, -1.0, 2.0))], [],
             [(e, v) for e, v in zip(step_ends(texts[2], "\n"), (0.25, 0.125, 4.0))] + [(99, 0.7)]]
    want = torch.zeros(3, T)
    want[0, 3 + 2] = 0.5  # "1+1=2" ends at its "\n" (token 2 of the answer)
    want[0, 3 + 4] = -1.0  # "2+2=5"'s separator is inside the token "5\n3"
    want[0, 3 + 5] = 2.0  # "3+1", cut without a separator: its last character's token
    want[2, 4 + 1] = 0.25  # "a" ends at the first "\n" of "\n\nb"
    want[2, 4 + 2] = 0.125  # "b" ends at the separator token after it
    want[2, 4 + 3] = 4.0  # "c": the text's end, before the (skipped) eos
    want[2, 4 + 4] = 0.7  # past the tokens: the last response token (the eos)
    return ids, mask, texts, steps, want


def test_step_ends_match_split_steps():
    for text in ["1+1=2\n2+2=5\n3+1", "a\n\nb\nc", "x\n", "\n\n", "", " \nq \n", "ab||cd||", "||x"]:
        for sep in ("\n", "||"):
            ends = step_ends(text, sep)
            assert len(ends) == len(split_steps(text, sep))
            for e, s in zip(ends, split_steps(text, sep)):
                assert text[:e].endswith(s + sep) or (text[:e].endswith(s) and e == len(text))
    assert step_ends("1+1=2\n2+2=5\n3+1", "\n") == [6, 12, 15]
    assert step_ends("a\n\nb\nc", "\n") == [2, 5, 6]


def test_hand_placement():
    ids, mask, texts, steps, want = _hand_batch()
    got = step_token_rewards(PT, ids, mask, texts, steps)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # two steps ending in one token add up there
    two = step_token_rewards(PT, ids[:1], mask[:1], texts[:1], [[(12, 1.0), (11, 0.5)]])
    assert two[0, 3 + 4] == 1.5 and two.sum() == 1.5


def test_placement_equals_prefix_decoding_of_a_real_tokenizer():
    """A trained BPE whose tokens hold spaces (the separator " "): each step's reward lands on the
    first token whose prefix decodes past the step's end, found by decoding every prefix."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    tok = train_tokenizer(sample_texts(64) + ["1+1=2 2+2=5 3+1=4 the cat", "a b  c d"], 120)
    texts = ["1+1=2 2+2=5 3+1=4", "the cat  sat on", "a b  c d", "x"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == text
        ends = step_ends(text, " ")
        prefix = [tok.decode(ids[:k + 1], skip_special_tokens=True) for k in range(len(ids))]
        brute = [next(k for k, p in enumerate(prefix) if p.startswith(text[:e])) for e in ends]
        assert token_char_ends(tok, ids, text, ends) == brute
    spans = [tok.decode([i]) for i in tok.encode(texts[1], add_special_tokens=False)]
    assert " on" in spans  # the step "sat" ends in a token that holds the separator and the next step's text
    ids = tok.encode(texts[1], add_special_tokens=False)
    assert token_char_ends(tok, ids, texts[1], step_ends(texts[1], " ")) == [3, 5, 8, 8]


def test_token_rewards_and_gae_reinforce_pp_equal_hand_references():
    ids, mask, texts, steps, _ = _hand_batch()
    dense = step_token_rewards(PT, ids, mask, texts, steps)
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([1.0, -0.5, 0.25])
    kl = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g) * mask
    r = token_rewards(scores, mask, kl=kl, kl_coef=0.1, dense=dense)
    hand = dense.clone()
    for b in range(3):
        last = int(mask[b].nonzero().max())
        hand[b, last] = scores[b] + dense[b, last]
    hand = hand - 0.1 * kl * mask
    assert torch.equal(r, hand)
    gamma, lam = 0.9, 0.8
    adv, ret = compute_advantages("gae", scores, mask, values=values, kl=kl, kl_coef=0.1, gamma=gamma, lam=lam,
                                  dense_rewards=dense)
    want_a, want_r = torch.zeros_like(r), torch.zeros_like(r)
    for b in range(3):  # GAE by hand over the response tokens, V after the last one 0
        pos = mask[b].nonzero().flatten().tolist()
        last = 0.0
        for j in reversed(range(len(pos))):
            t = pos[j]
            v_next = float(values[b, pos[j + 1]]) if j + 1 < len(pos) else 0.0
            last = float(hand[b, t]) + gamma * v_next - float(values[b, t]) + gamma * lam * last
            want_a[b, t], want_r[b, t] = last, last + float(values[b, t])
    assert torch.allclose(adv, want_a, atol=1e-5) and torch.allclose(ret, want_r, atol=1e-5)
    adv, ret = compute_advantages("reinforce++", scores, mask, kl=kl, kl_coef=0.1, gamma=1.0, dense_rewards=dense)
    returns = (hand * mask).flip(1).cumsum(1).flip(1) * mask
    x = returns[mask]
    assert torch.allclose(ret, returns, atol=1e-6)
    assert torch.allclose(adv[mask], (x - x.mean()) / torch.sqrt(x.var() + 1e-8), atol=1e-5)
    # rewards outside the response mask (padding) count for nothing
    assert torch.equal(token_rewards(scores, mask, dense=dense + 3.0 * ~mask), token_rewards(scores, mask, dense=dense))
    # no dense rewards: the same tensors as before the option
    assert torch.equal(token_rewards(scores, mask, kl=kl, kl_coef=0.1),
                       token_rewards(scores, mask, kl=kl, kl_coef=0.1, dense=None))


@pytest.mark.parametrize("est", ["grpo", "rloo", "dr_grpo", "reinforce++_baseline"])
def test_group_estimators_refuse_dense_rewards(est):
    from rlhf_fast.trainers.rl_config import RewardConfig, RLConfig, RolloutConfig

    with pytest.raises(ValueError, match=r"reward\.process_aggregation 'steps'.*" + est.replace("+", r"\+")):
        RLConfig(estimator=est, reward=RewardConfig(process_aggregation="steps"),
                 rollout=RolloutConfig(prompts_per_step=2, group_size=2))
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="dense_rewards"):
        compute_advantages(est, torch.zeros(4), mask, group_size=2, dense_rewards=torch.zeros(4, 3))
    for ok in ("gae", "reinforce++"):
        RLConfig(estimator=ok, reward=RewardConfig(process_aggregation="steps"))


def test_shaping_and_tools_refused_with_steps():
    from rlhf_fast.trainers.rl_config import RewardConfig, RLConfig, RolloutConfig

    for kw in (dict(whiten=True), dict(clip=1.0), dict(clip_range=[-1.0, 1.0])):
        with pytest.raises(ValueError, match=r"reward\.(whiten|clip|clip_range).*process_aggregation 'steps'"):
            RewardConfig(process_aggregation="steps", **kw)
        RewardConfig(process_aggregation="min", **kw)  # scalar aggregations keep them
    with pytest.raises(ValueError, match=r"reward\.process_aggregation 'steps'.*rollout\.tools"):
        RLConfig(estimator="gae", reward=RewardConfig(process_aggregation="steps"),
                 rollout=RolloutConfig(tools=["math:sqrt"]))
    with pytest.raises(ValueError, match="reward.process_aggregation"):
        RewardConfig(process_aggregation="sum")


class DenseSource(RewardSource):
    """A dense source: one step per word (separator " "), reward = the word's length (a word "boom"
    raises)."""

    name, dense, extra_names = "dense", True, ("process_steps",)

    def score_steps(self, prompts, completions, ctx):
        if any("boom" in c for c in completions):
            raise RuntimeError("boom")
        steps = [[(e, float(len(s))) for e, s in zip(step_ends(c, " "), split_steps(c, " "))] for c in completions]
        return ([sum(v for _, v in r) for r in steps], {"process_steps": torch.tensor([float(len(r)) for r in steps])},
                steps)

    def __call__(self, prompts, completions, ctx):
        return self.score_steps(prompts, completions, ctx)[0]


@pytest.mark.parametrize("convention", ["ours", "trl"])
def test_combined_reward_keeps_steps_out_of_the_last_token(convention):
    class Other(RewardSource):
        name = "other"

        def __call__(self, prompts, completions, ctx):
            return [10.0 * len(c) for c in completions]

    other = Other()
    cr = CombinedReward([(DenseSource(), 0.5), (other, 2.0)], convention=convention, on_bad_reward="drop")
    out = cr(["p", "p", "p"], ["ab c", "", "x boom"])
    assert out.steps == [[(3, 1.0), (4, 0.5)], [], []]  # weighted; the failed row has none
    assert out.valid.tolist() == [True, True, False]
    assert out.scalar.tolist() == [80.0, 0.0, 0.0]
    assert out.total.tolist() == [81.5, 0.0, 0.0]  # the answer's whole reward, for the logs
    assert out.per_source["dense"][:2].tolist() == [3.0, 0.0] and math.isnan(float(out.per_source["dense"][2]))
    assert out.per_source["process_steps"][:2].tolist() == [2.0, 0.0]
    plain = CombinedReward([(other, 2.0)], convention=convention)(["p"], ["ab"])
    assert plain.steps is None and plain.scalar is None


def _prm_folder(tmp_path, tok, sep=" "):
    """A random tiny 2-label token classifier saved with its tokenizer and step_separator."""
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers.prm import token_classifier_from

    torch.manual_seed(3)
    prm = token_classifier_from(tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3))
    prm.config.step_separator = sep
    path = str(tmp_path / "prm")
    prm.save_pretrained(path)
    tok.save_pretrained(path)
    return path, prm


def test_prm_step_rewards_equal_its_log_probabilities(tmp_path):
    from rlhf_fast.algorithms.process_rewards import load_process_reward_model, step_positions
    from tests.test_rl_learning import make_policy

    _, tok = make_policy()
    path, prm = _prm_folder(tmp_path, tok)
    prompts, comps = ["q:", "x", "0"], ["a b  c", "", "b"]
    src = load_process_reward_model(path, aggregation="steps")
    assert src.dense and src.step_reward == "log"
    sums, extras, steps = src.score_steps(prompts, comps, None)
    for p, c, s, row in zip(prompts, comps, sums, steps):
        ids, pos = step_positions(tok, p, split_steps(c, " "), " ", max_len=prm.config.max_position_embeddings)
        with torch.no_grad():
            lp = torch.log_softmax(prm(input_ids=torch.tensor([ids])).logits[0].float(), -1)[:, 1]
        assert [e for e, _ in row] == step_ends(c, " ")[:len(pos)]
        assert [v for _, v in row] == pytest.approx([float(lp[t]) for t in pos], abs=1e-6)
        assert s == pytest.approx(sum(v for _, v in row), abs=1e-6)
    assert extras["process_steps"].tolist() == [3.0, 0.0, 1.0] and sums[1] == 0.0  # an empty answer: no step
    probs = ProcessRewardModel(src.model, tok, " ", "steps", step_reward="prob").score_steps(prompts, comps, None)[2]
    cent = ProcessRewardModel(src.model, tok, " ", "steps", step_reward="centered").score_steps(prompts, comps, None)[2]
    for a, b, c in zip(steps, probs, cent):
        assert [math.exp(v) for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5)
        assert [v - 0.5 for _, v in b] == pytest.approx([v for _, v in c], abs=1e-7)
    assert src(prompts, comps, None) == sums
    with pytest.raises(ValueError, match="step_reward"):
        ProcessRewardModel(src.model, tok, " ", "steps", step_reward="exp")


@pytest.mark.parametrize("estimator", ["gae", "reinforce++"])
def test_one_rl_step_with_dense_process_rewards(tmp_path, monkeypatch, estimator):
    """One step with the PRM as the only dense source, next to a scalar reward function: the
    dense rewards handed to the estimator sit on response tokens and sum, per answer, to the
    weighted sum of its step rewards; the last token's score is the other source's alone."""
    import rlhf_fast.trainers.rl as rl_mod
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import RewardConfig
    from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

    pol, tok = make_policy()
    path, _ = _prm_folder(tmp_path, tok)
    seen = {}
    real = rl_mod.compute_advantages

    def spy(est, scores, mask, **kw):
        seen.update(scores=scores.clone(), mask=mask.clone(), dense=kw["dense_rewards"].clone())
        return real(est, scores, mask, **kw)

    monkeypatch.setattr(rl_mod, "compute_advantages", spy)
    real_call = CombinedReward.__call__

    def keep_out(self, *a, **k):
        seen["out"] = real_call(self, *a, **k)
        return seen["out"]

    monkeypatch.setattr(CombinedReward, "__call__", keep_out)
    rc = RewardConfig(process_model=path, process_model_weight=0.5, process_aggregation="steps")
    cfg = make_config(tmp_path, estimator, steps=1, reward=rc)
    RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    out, dense, mask = seen["out"], seen["dense"], seen["mask"]
    assert (dense[~mask] == 0).all()
    sums = out.per_source["process_model"]
    assert torch.allclose(dense.sum(1), 0.5 * sums, atol=1e-5)
    assert (sums < 0).any()  # log P(correct) of some step
    assert torch.allclose(seen["scores"], out.per_source["frac_a"], atol=1e-6)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        row = [json.loads(ln) for ln in f][-1]
    assert row["reward/process_steps"] == pytest.approx(float(out.per_source["process_steps"].mean()))
    assert row["reward/process_model"] == pytest.approx(float(sums.mean()), abs=1e-5)
    assert row["reward/total"] == pytest.approx(float(out.total.mean()), abs=1e-5)


def test_process_step_reward_key_reaches_the_source(tmp_path):
    """reward.process_step_reward picks each step's reward (log, prob, centered) of the source
    the RL trainer and `eval --run` load (reward_model_sources); with a scalar aggregation it is
    refused, not ignored."""
    from rlhf_fast.models.loading import reward_model_sources
    from rlhf_fast.trainers.rl_config import RewardConfig
    from tests.test_rl_learning import make_policy

    _, tok = make_policy()
    path, _ = _prm_folder(tmp_path, tok)
    for kind in ("log", "prob", "centered"):
        rc = RewardConfig(process_model=path, process_aggregation="steps", process_step_reward=kind)
        (src, w), = reward_model_sources(rc)
        assert src.step_reward == kind and src.dense and w == 1.0
    with pytest.raises(ValueError, match="reward.process_step_reward 'prob'.*'min'"):
        RewardConfig(process_model=path, process_step_reward="prob")
    with pytest.raises(ValueError, match="reward.process_step_reward"):
        RewardConfig(process_model=path, process_aggregation="steps", process_step_reward="exp")
