"""Reward-model ensembles (``reward.reward_model_ensemble``, Coste et al. 2023; Eisenstein et
al. 2023): each mode is its formula on the members' scores, "sum" is the behaviour before
ensembles, the config refuses what would be silently wrong, a run from folders logs each
model and ``reward/rm_std``, and a NaN from one member reaches ``on_bad_reward``."""

import json
import math
import os
import statistics

import pytest
import torch
import yaml

from rlhf_fast.algorithms import CombinedReward, RewardError, RewardModelReward, RewardSource
from rlhf_fast.algorithms.rewards import RewardModelEnsemble
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import RewardConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SEEDS = (3, 4, 5)


@pytest.fixture(scope="module")
def models():
    """(policy, tokenizer, 3 tiny reward models of different seeds) on the policy's vocabulary."""
    from rlhf_fast.models.tiny import tiny_reward_model

    pol, tok = make_policy()
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    rms = [tiny_reward_model(len(tok), seed=s, **kw).eval() for s in SEEDS]
    return pol, tok, rms


@pytest.fixture(scope="module")
def rm_folders(models, tmp_path_factory):
    """The 3 reward models saved with the tokenizer, as ``reward.reward_model`` takes them."""
    _, tok, rms = models
    root = tmp_path_factory.mktemp("rm_ensemble")
    out = []
    for i, rm in enumerate(rms):
        d = str(root / f"rm{i}")
        rm.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return out


PROMPTS_B = ["q:", "x", "0", "a b", "q:"]
ANSWERS_B = [" a b c", " y z", " 1 2 3 4", " c", " a a a a"]


def _member_scores(rms, tok):
    """``[K][B]`` floats: each model alone, scored on the reward trainer's encoding."""
    return [RewardModelReward(rm, tok)(PROMPTS_B, ANSWERS_B, None) for rm in rms]


@pytest.mark.parametrize("mode", ["mean", "min", "mean_minus_std", "mean_minus_var"])
def test_each_mode_is_its_formula_on_the_members_scores(models, mode):
    _, tok, rms = models
    s = _member_scores(rms, tok)
    cols = list(zip(*s))  # B tuples of K scores
    # the models must disagree, else min / mean / std could not tell the modes apart
    assert all(statistics.pstdev(c) > 1e-4 for c in cols)
    lam = 0.7
    want = {"mean": [statistics.fmean(c) for c in cols],
            "min": [min(c) for c in cols],
            # population std (1/K), the spread of Coste et al.'s UWO
            "mean_minus_std": [statistics.fmean(c) - lam * statistics.pstdev(c) for c in cols],
            "mean_minus_var": [statistics.fmean(c) - lam * statistics.pvariance(c) for c in cols]}[mode]
    ens = RewardModelEnsemble([RewardModelReward(rm, tok) for rm in rms], mode, coef=lam)
    out = CombinedReward([(ens, 2.0)])(PROMPTS_B, ANSWERS_B)
    assert out.per_source["reward_model"].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert out.total.tolist() == pytest.approx([2.0 * w for w in want], rel=1e-5, abs=1e-6)  # one weighted source
    for k in range(len(rms)):  # each member logged as it scores alone
        assert out.per_source[f"rm{k}"].tolist() == pytest.approx(s[k], rel=1e-6, abs=1e-7)
    assert out.per_source["rm_std"].tolist() == pytest.approx([statistics.pstdev(c) for c in cols],
                                                              rel=1e-4, abs=1e-6)


def test_trainer_builds_the_ensemble_with_the_weight_and_the_python_models(models, tmp_path):
    """reward_models=[...] plus a mode: ONE source (the ensemble of every model) weighted
    reward.reward_model_weight, next to the reward functions."""
    pol, tok, rms = models
    rc = RewardConfig(reward_model_weight=0.5, reward_model_ensemble="mean_minus_std", ensemble_coef=2.0)
    cfg = make_config(tmp_path, "grpo", steps=1, reward=rc)
    tr = RLTrainer(cfg, pol, tok, reward_fns=[lambda p, c: [1.0] * len(c)], reward_models=[(m, tok) for m in rms],
                   prompts=PROMPTS)
    (fn, w_fn), (ens, w) = tr.reward.sources
    assert isinstance(ens, RewardModelEnsemble) and w == 0.5 and w_fn == 1.0
    assert ens.mode == "mean_minus_std" and ens.coef == 2.0 and len(ens.members) == 3
    cols = list(zip(*_member_scores(rms, tok)))
    out = tr.reward(PROMPTS_B, ANSWERS_B)
    want = [1.0 + 0.5 * (statistics.fmean(c) - 2.0 * statistics.pstdev(c)) for c in cols]
    assert out.total.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # unset, the coefficient is 1
    cfg = make_config(tmp_path, "grpo", steps=1, reward=RewardConfig(reward_model_ensemble="mean_minus_std"))
    assert RLTrainer(cfg, pol, tok, reward_models=rms[:2], prompts=PROMPTS).reward.sources[0][0].coef == 1.0


def test_sum_is_the_behaviour_before_ensembles(models, rm_folders, tmp_path):
    """The default "sum": every model its own source named as before, each weighted
    reward_model_weight, the total bit for bit the sum built the old way; a single folder
    string is one source "reward_model"."""
    pol, tok, rms = models
    cfg = make_config(tmp_path, "grpo", steps=1, reward=RewardConfig(reward_model_weight=0.3))
    tr = RLTrainer(cfg, pol, tok, reward_models=[(rms[0], tok), (rms[1], tok)], prompts=PROMPTS)
    assert [type(s) for s, _ in tr.reward.sources] == [RewardModelReward] * 2
    assert tr.reward.names == ["reward_model", "reward_model1"]
    old = CombinedReward([(RewardModelReward(rms[0], tok, name="reward_model"), 0.3),
                          (RewardModelReward(rms[1], tok, name="reward_model1"), 0.3)])
    got, want = tr.reward(PROMPTS_B, ANSWERS_B), old(PROMPTS_B, ANSWERS_B)
    assert torch.equal(got.total, want.total)
    assert set(got.per_source) == {"reward_model", "reward_model1"}  # no ensemble logs
    cfg = make_config(tmp_path, "grpo", steps=1, reward=RewardConfig(reward_model=rm_folders[0]))
    tr = RLTrainer(cfg, pol, tok, prompts=PROMPTS)
    assert tr.reward.names == ["reward_model"] and isinstance(tr.reward.sources[0][0], RewardModelReward)
    # a list of folders under "sum": one source each, the same total as each alone
    cfg = make_config(tmp_path, "grpo", steps=1, reward=RewardConfig(reward_model=rm_folders[:2]))
    tr = RLTrainer(cfg, pol, tok, prompts=PROMPTS)
    s = _member_scores(rms[:2], tok)
    assert tr.reward(PROMPTS_B, ANSWERS_B).total.tolist() == pytest.approx(
        [a + b for a, b in zip(*s)], rel=1e-5, abs=1e-6)


def test_config_errors_name_the_field(models, rm_folders, tmp_path):
    with pytest.raises(ValueError, match="reward.reward_model_ensemble must be one of"):
        RewardConfig(reward_model_ensemble="median")
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="reward.ensemble_coef must be a finite number >= 0"):
            RewardConfig(reward_model_ensemble="mean_minus_std", ensemble_coef=bad)
    for mode in ("sum", "mean", "min"):  # a coefficient the mode would ignore
        with pytest.raises(ValueError, match="reward.ensemble_coef applies to .*'mean_minus_std' or 'mean_minus_var' only"):
            RewardConfig(reward_model_ensemble=mode, ensemble_coef=1.0)
    with pytest.raises(ValueError, match=r"reward.reward_model must be a folder or a non-empty list"):
        RewardConfig(reward_model=[])
    with pytest.raises(ValueError, match=r"reward.reward_model\[1\] must be a model folder"):
        RewardConfig(reward_model=["a", ""])
    # the command line gives a list as a comma-separated string
    c = load_config(RLConfig, None, ["--reward.reward_model", "a,b", "--reward.reward_model_ensemble", "min"])
    assert c.reward.reward_model == ["a", "b"]
    # fewer than 2 models for an ensemble: refused by the trainer, which counts both kinds
    pol, tok, rms = models
    for kw, rc in ((dict(reward_models=[rms[0]]), RewardConfig(reward_model_ensemble="mean")),
                   ({}, RewardConfig(reward_model=[rm_folders[0]], reward_model_ensemble="min"))):
        cfg = make_config(tmp_path, "grpo", steps=1, reward=rc)
        with pytest.raises(ValueError, match=r"reward.reward_model_ensemble '\w+' combines several reward "
                                             r"models, got 1"):
            RLTrainer(cfg, pol, tok, prompts=PROMPTS, **kw)
    # each folder checked, naming its place in the list
    notes = tmp_path / "notes"
    notes.mkdir()
    cfg = make_config(tmp_path, "grpo", steps=1,
                      reward=RewardConfig(reward_model=[rm_folders[0], str(notes)], reward_model_ensemble="mean"))
    with pytest.raises(ValueError, match=r"reward.reward_model\[1\] .*: no config.json there"):
        RLTrainer(cfg, pol, tok, prompts=PROMPTS)
    with pytest.raises(ValueError, match="an ensemble needs at least 2 reward models"):
        RewardModelEnsemble([RewardModelReward(rms[0], tok)])
    # the members' log names may not overwrite another source's
    with pytest.raises(ValueError, match=r"\['rm_std'\] are taken twice"):
        CombinedReward([RewardModelEnsemble([RewardModelReward(m, tok) for m in rms[:2]]), _named("rm_std")])


def _named(name):
    def fn(prompts, completions):
        return [0.0] * len(completions)
    fn.__name__ = name
    return fn


def test_two_step_run_from_folders_logs_each_model_and_the_disagreement(models, rm_folders, tmp_path):
    """A YAML config listing 2 folders with mean_minus_std: 2 steps run; each step logs
    reward/rm0, reward/rm1, reward/rm_std (>= 0, the mean of the per-completion std) and the
    ensemble's own reward/reward_model = mean − coef·std in the mean over completions."""
    pol, tok, _ = models
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump({
        "estimator": "grpo", "steps": 2, "output_dir": str(tmp_path / "run"), "progress": False,
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
        "ppo": {"epochs": 1, "mini_batch_size": 4, "micro_batch_size": 4},
        "reward": {"reward_model": rm_folders[:2], "reward_model_ensemble": "mean_minus_std",
                   "ensemble_coef": 0.5}}))
    cfg = load_config(RLConfig, str(path))
    assert cfg.reward.reward_model == rm_folders[:2]
    tr = RLTrainer(cfg, pol, tok, prompts=PROMPTS)
    tr.train()
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("reward/rm0", "reward/rm1", "reward/rm_std", "reward/reward_model"):
            assert math.isfinite(r[k]), k
        assert r["reward/rm_std"] > 0
        # per completion: ens = mean − 0.5·std; averaged over completions: linear, so exact
        want = (r["reward/rm0"] + r["reward/rm1"]) / 2 - 0.5 * r["reward/rm_std"]
        assert r["reward/reward_model"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    # K = 2: the population std of a completion is |s0 − s1| / 2 (the sample std would be √2 times it)
    out = tr.reward(PROMPTS_B, ANSWERS_B)
    assert torch.allclose(out.per_source["rm_std"], (out.per_source["rm0"] - out.per_source["rm1"]).abs() / 2,
                          rtol=1e-5, atol=1e-6)


class _Stub(RewardSource):
    """A member with fixed scores ``[B]``, as a reward model with a broken row would give."""

    def __init__(self, vals):
        self.vals, self.name = vals, "stub"

    def __call__(self, prompts, completions, ctx):
        if len(completions) == 1:  # scored one row at a time (CombinedReward isolating a failure)
            return [self.vals[PROMPTS_B.index(prompts[0])]]
        return list(self.vals)


@pytest.mark.parametrize("mode", ["mean", "min", "mean_minus_std", "mean_minus_var"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_score_from_one_member_reaches_on_bad_reward(mode, bad):
    """One member's NaN (or +inf, which min would otherwise hide behind the other member) makes
    that completion's ensemble reward NaN: "raise" names the member, "drop" drops that row only."""
    prompts, answers = PROMPTS_B[:4], ANSWERS_B[:4]
    good, broken = _Stub([1.0, 2.0, 3.0, 4.0]), _Stub([1.5, bad, 0.5, 4.0])
    with pytest.raises(RewardError, match=r"'reward_model' returned a non-finite reward .* sample 1 .*member\(s\) rm1="):
        CombinedReward([RewardModelEnsemble([good, broken], mode)])(prompts, answers)
    out = CombinedReward([RewardModelEnsemble([good, broken], mode)], on_bad_reward="drop")(prompts, answers)
    assert out.valid.tolist() == [True, False, True, True]
    assert out.dropped["reward_model"] == 1 and out.total[1] == 0.0
    assert math.isnan(out.per_source["rm_std"][1]) and out.per_source["rm0"][1] == 2.0


def test_a_member_that_raises_is_isolated_row_by_row_under_drop():
    """A member raising on a batch: "drop" rescores row by row, keeping the members' logs."""

    class Flaky(_Stub):
        def __call__(self, prompts, completions, ctx):
            if "x" in prompts:
                raise RuntimeError("boom")
            return super().__call__(prompts, completions, ctx)

    prompts, answers = PROMPTS_B[:4], ANSWERS_B[:4]
    ens = RewardModelEnsemble([_Stub([1.0, 2.0, 3.0, 4.0]), Flaky([3.0, 0.0, 5.0, 6.0])], "min")
    out = CombinedReward([ens], on_bad_reward="drop")(prompts, answers)
    assert out.valid.tolist() == [True, False, True, True]
    assert out.per_source["reward_model"].tolist()[::2] == [1.0, 3.0]
    assert out.per_source["rm1"].tolist()[2:] == [5.0, 6.0] and math.isnan(out.per_source["rm1"][1])


def test_a_nan_reward_model_in_a_run_is_seen_by_on_bad_reward(models, tmp_path):
    """In the trainer: one reward model whose head gives NaN stops the step under "raise",
    naming the member; the rest of the ensemble does not mask it."""
    import copy

    pol, tok, rms = models
    broken = copy.deepcopy(rms[1])
    with torch.no_grad():
        broken.score.weight.fill_(float("nan"))
    cfg = make_config(tmp_path, "grpo", steps=1, rollout=RolloutConfig(prompts_per_step=2, group_size=4,
                                                                       max_new_tokens=4),
                      reward=RewardConfig(reward_model_ensemble="min"))
    tr = RLTrainer(cfg, pol, tok, reward_models=[(rms[0], tok), (broken, tok)], prompts=PROMPTS)
    with pytest.raises(RewardError, match=r"'reward_model' returned a non-finite reward .*member\(s\) rm1=nan"):
        tr.rollout()
