"""``reward.calling_convention: trl`` with ``None`` rewards: rewards, advantages, metrics and
loss as TRL 1.16's.

TRL's lines are not transcribed by hand: :func:`trl_block` cuts them out of TRL's installed
source (``GRPOTrainer._generate_and_score_completions`` in trl/trainer/grpo_trainer.py and
``RLOOTrainer._generate_and_score_completions`` in trl/trainer/rloo_trainer.py, from
``unscorable_mask = ...`` to the advantages' ``nan_to_num``, and the logged reward metrics) and
runs them on a stand-in ``self``. The only edit: TRL's ``+ 1e-4`` under GRPO's std becomes our
``1e-6`` (a documented difference, docs/from_trl.md); RLOO's ``normalize_advantages`` eps is
1e-4 in both. The batches: some answers None for one function, some for every function (TRL
keeps them: reward NaN, out of the statistics, advantage 0), a whole group None, and a group
with a single scored answer."""

import inspect
import math
import textwrap
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf_fast.algorithms import CombinedReward, RewardContext, compute_advantages
from rlhf_fast.algorithms.advantages import global_mean_std, nanstd, normalize_then_sum_advantages
from rlhf_fast.algorithms.rewards import RewardOutput, TRLRewardInputs
from rlhf_fast.trainers.rl import RLTrainer, _informative_groups, _uniform_group_frac
from rlhf_fast.trainers.rl_config import (
    DataConfig,
    KLConfig,
    OptimConfig,
    PPOConfig,
    RewardConfig,
    RLConfig,
    RolloutConfig,
)
from tests.test_rl_tools import make_policy, tok  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

N = None
G = 4
# two reward functions' outputs over 4 groups of 4 answers (rows in group order)
FN_A = [1.0, N, 3.0, N,   N, N, N, N,   0.5, N, N, N,   1.0, 2.0, 2.0, 5.0]
FN_B = [N, 2.0, N, N,     N, N, N, N,   N, N, N, N,     N, 1.0, 0.0, N]
# group 0: row 3 unscored; group 1: every answer unscored; group 2: one scored answer;
# group 3: None for one function only
WEIGHTS = [1.0, 0.5]
# a batch where every function scores every answer once at least (no unscored row)
FN_A_SOME = [1.0, N, 3.0, 2.0, 0.0, 4.0, N, 1.0]
FN_B_SOME = [N, 2.0, 1.0, N, 1.0, N, 3.0, 0.5]


def rpf_of(*cols):
    """TRL's rewards_per_func ``[B, K]``: None -> NaN (``_calculate_rewards``)."""
    return torch.tensor([[math.nan if v is None else v for v in row] for row in zip(*cols)], dtype=torch.float32)


# ------------------------------------------------------------------ TRL's own lines

def trl_block(cls, first: str, last: str, subs=()):
    """The lines of ``cls._generate_and_score_completions`` from the one starting with
    ``first`` to the next starting with ``last``, compiled; ``subs``: (old, new, count) text
    replacements, each checked to occur ``count`` times (so a changed TRL fails loudly)."""
    lines = textwrap.dedent(inspect.getsource(cls._generate_and_score_completions)).splitlines()
    try:
        i = next(k for k, s in enumerate(lines) if s.strip().startswith(first))
        j = next(k for k in range(i + 1, len(lines)) if lines[k].strip().startswith(last))
    except StopIteration:
        raise AssertionError(f"TRL's {cls.__name__}._generate_and_score_completions no longer has {first!r} ... "
                             f"{last!r}") from None
    block = textwrap.dedent("\n".join(lines[i:j + 1]))
    for old, new, count in subs:
        assert block.count(old) == count, (old, block)
        block = block.replace(old, new)
    return compile(block, f"<{cls.__module__}.{cls.__name__}._generate_and_score_completions>", "exec")


def trl_metrics_block(cls):
    return trl_block(cls, "for i, reward_func_name in enumerate(self.reward_func_names):",
                     'self._metrics[mode]["frac_reward_zero_std"]')


def trl_grpo(rpf, weights, *, aggregation="sum_then_normalize", scale_rewards="group", eps=1e-6):
    """TRL's GRPO rewards -> advantages -> logged metrics on ``rpf`` ``[B, K]`` (groups of G)."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import nanstd as trl_nanstd

    adv_lines = trl_block(GRPOTrainer, "unscorable_mask = torch.isnan(rewards_per_func)",
                          "advantages = torch.nan_to_num(advantages, nan=0.0)",
                          subs=[("1e-4", "EPS", 3)])  # sum_then_normalize's 1, normalize_then_sum's 2
    me = SimpleNamespace(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
                         reward_weights=torch.tensor(weights), reward_funcs=[None] * len(weights),
                         reward_func_names=[f"f{k}" for k in range(len(weights))],
                         _metrics={"train": defaultdict(list)})
    ns = dict(torch=torch, nanstd=trl_nanstd, self=me, rewards_per_func=rpf.clone(), num_generations=G,
              device="cpu", mode="train", EPS=eps)
    exec(adv_lines, ns)
    exec(trl_metrics_block(GRPOTrainer), ns)
    return ns["advantages"], {k: v[0] for k, v in me._metrics["train"].items()}


def trl_rloo(rpf, weights, *, normalize_advantages=False, reward_clip_range=None, beta=0.0, kl=None):
    """TRL's RLOO rewards (clip, KL in the reward) -> advantages -> logged metrics; ``kl``
    ``[B, T]`` the per-token old − ref log-probs (all tokens in the completion mask)."""
    from trl.trainer.rloo_trainer import RLOOTrainer
    from trl.trainer.utils import nanstd as trl_nanstd

    lines = trl_block(RLOOTrainer, "unscorable_mask = torch.isnan(rewards_per_func)",
                      "is_std_zero = torch.isclose(std_rewards")
    me = SimpleNamespace(reward_weights=torch.tensor(weights), reward_clip_range=reward_clip_range, beta=beta,
                         normalize_advantages=normalize_advantages,
                         reward_func_names=[f"f{k}" for k in range(len(weights))],
                         _metrics={"train": defaultdict(list)})
    B = rpf.shape[0]
    kl = torch.zeros(B, 3) if kl is None else kl
    ns = dict(torch=torch, nanstd=trl_nanstd, self=me, rewards_per_func=rpf.clone(), num_generations=G,
              device="cpu", mode="train", gather=lambda t: t, old_per_token_logps=kl,
              ref_per_token_logps=torch.zeros_like(kl), completion_mask=torch.ones_like(kl))
    exec(lines, ns)
    exec(trl_metrics_block(RLOOTrainer), ns)
    return ns["advantages"], {k: v[0] for k, v in me._metrics["train"].items()}


# ------------------------------------------------------------------ ours, unit level

def _ctx(B):
    return RewardContext(trl=TRLRewardInputs(["p"] * B, ["c"] * B, [[1]] * B))


def ours_scores(cols, weights):
    """Our CombinedReward on functions returning ``cols``, then the trainer's NaN for the
    unscored answers: (scores ``[B]``, RewardOutput)."""
    fns = [(lambda v: (lambda completions, **kw: list(v)))(c) for c in cols]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's "All reward functions returned None" warning
        out = CombinedReward(list(zip(fns, weights)), convention="trl")(["p"] * len(cols[0]), ["c"] * len(cols[0]),
                                                                        _ctx(len(cols[0])))
    return out.total.masked_fill(out.unscored_rows(), math.nan), out


def test_combined_reward_marks_unscored_rows():
    scores, out = ours_scores([FN_A, FN_B], WEIGHTS)
    rpf = rpf_of(FN_A, FN_B)
    unscorable = torch.isnan(rpf).all(dim=1)
    assert out.unscored.tolist() == unscorable.tolist() and unscorable.sum() == 8
    assert out.valid.tolist() == (~unscorable).tolist()  # readers of `valid` leave them out (nanmean)
    trl = (rpf * torch.tensor(WEIGHTS).unsqueeze(0)).nansum(dim=1)  # TRL's total, then NaN where unscorable
    trl[unscorable] = math.nan
    torch.testing.assert_close(scores, trl, equal_nan=True, rtol=0, atol=0)
    # kept across concatenation (dynamic sampling's rounds), None stays None
    cat = RewardOutput.concat([out, out], torch.tensor([0, 3, 16 + 4]))
    assert cat.unscored.tolist() == [False, True, True]
    plain = RewardOutput(total=torch.zeros(2), per_source={}, valid=torch.ones(2, dtype=torch.bool))
    assert RewardOutput.concat([plain, plain]).unscored is None


def test_nanstd_is_trls():
    from trl.trainer.utils import nanstd as trl_nanstd

    x = rpf_of(FN_A, FN_B).view(-1, G, 2)
    for dim in (None, 1):
        torch.testing.assert_close(nanstd(x, dim=dim), trl_nanstd(x, dim=dim), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(nanstd(x, 1, keepdim=True), trl_nanstd(x, 1, keepdim=True), equal_nan=True,
                               rtol=0, atol=0)


def _adv(estimator, scores, **kw):
    a, ret = compute_advantages(estimator, scores, torch.ones(scores.shape[0], 3, dtype=torch.bool),
                                group_size=G, **kw)
    assert torch.isfinite(a).all() and torch.isfinite(ret).all()
    assert (a == a[:, :1]).all()  # one advantage per answer
    return a[:, 0]


CASES = {"unscored": (FN_A, FN_B), "some_none": (FN_A_SOME, FN_B_SOME)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("estimator,scale", [("grpo", None), ("grpo", "group"), ("grpo", "batch"),
                                             ("grpo", "none"), ("dr_grpo", None)])
def test_grpo_advantages_as_trl(case, estimator, scale):
    cols = CASES[case]
    scores, _ = ours_scores(cols, WEIGHTS)
    trl_scale = scale or ("group" if estimator == "grpo" else "none")
    theirs, _ = trl_grpo(rpf_of(*cols), WEIGHTS, scale_rewards=trl_scale)
    ours = _adv(estimator, scores, scale_rewards=scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if case == "unscored":
        assert (ours[4:8] == 0).all() and ours[3] == 0  # unscored: 0, outside the group statistics
        assert ours[8] == 0 if trl_scale == "group" else True  # the group's one scored answer


@pytest.mark.parametrize("case", CASES)
def test_normalize_then_sum_as_trl(case):
    cols = CASES[case]
    scores, out = ours_scores(cols, WEIGHTS)
    rpf = torch.stack([out.per_source[n] for n in out.per_source], dim=1)
    theirs, _ = trl_grpo(rpf_of(*cols), WEIGHTS, aggregation="normalize_then_sum")
    ours = _adv("grpo", scores, multi_objective_aggregation="normalize_then_sum", rewards_per_func=rpf,
                reward_weights=torch.tensor(WEIGHTS))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # TRL's own eps (1e-4) through the public function: the same numbers before nan_to_num
    theirs4, _ = trl_grpo(rpf_of(*cols), WEIGHTS, aggregation="normalize_then_sum", eps=1e-4)
    torch.testing.assert_close(normalize_then_sum_advantages(rpf, torch.tensor(WEIGHTS), G, eps=1e-4).nan_to_num(0.0),
                               theirs4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("normalize,clip,beta", [(False, None, 0.0), (True, None, 0.0), (False, [0.0, 2.0], 0.0),
                                                 (True, [0.5, 3.0], 0.1)])
def test_rloo_advantages_as_trl(case, normalize, clip, beta):
    from rlhf_fast.algorithms.rewards import clip_rewards

    cols = CASES[case]
    scores, _ = ours_scores(cols, WEIGHTS)
    kl = torch.randn(scores.shape[0], 3, generator=torch.Generator().manual_seed(0))
    theirs, _ = trl_rloo(rpf_of(*cols), WEIGHTS, normalize_advantages=normalize, reward_clip_range=clip, beta=beta,
                         kl=kl)
    # the trainer's order: clip_rewards, then the KL summed per answer in compute_advantages
    ours = _adv("rloo", clip_rewards(scores, clip), kl=kl, kl_coef=beta,
                whiten="sequence" if normalize else False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_whiten_and_bad_input():
    scores, _ = ours_scores([FN_A, FN_B], WEIGHTS)
    a = _adv("grpo", scores, whiten=True)
    unscored = torch.isnan(scores)
    assert (a[unscored] == 0).all()  # out of the whitening statistics and kept at 0
    rest = _adv("grpo", scores)[~unscored]
    tokens = rest.repeat_interleave(3)  # masked_whiten's statistics are over the scored answers' tokens
    torch.testing.assert_close(a[~unscored], (rest - tokens.mean()) / torch.sqrt(tokens.var() + 1e-8))
    for est in ("reinforce++", "gae"):
        with pytest.raises(ValueError, match="needs a group estimator"):
            compute_advantages(est, scores, torch.ones(16, 3, dtype=torch.bool), values=torch.zeros(16, 3))
    # NaN entries are out of the batch statistics; none at all: mean 0
    mean, std = global_mean_std(torch.tensor([1.0, math.nan, 3.0]))
    assert (float(mean), float(std)) == (2.0, pytest.approx(2 ** 0.5))
    assert float(global_mean_std(torch.tensor([math.nan]))[0]) == 0.0
    # scores without NaN: the plain path, bit for bit
    s = torch.tensor([0.0, 1.0, 3.0, 2.0])
    assert torch.equal(_adv("grpo", s), compute_advantages("grpo", s, torch.ones(4, 3, dtype=torch.bool),
                                                          group_size=G)[0][:, 0])


def test_group_flags_with_unscored_answers():
    _, out = ours_scores([FN_A, FN_B], WEIGHTS)
    # group 0: 1, 1, 3 scored (informative); 1: none; 2: one; 3: 1, 2.5, 2, 5
    assert _informative_groups(out, G).tolist() == [True, False, False, True]
    _, theirs = trl_grpo(rpf_of(FN_A, FN_B), WEIGHTS)
    # TRL's frac_reward_zero_std: a group with < 2 scored answers has a NaN std, not 0
    assert _uniform_group_frac(out, G) == theirs["frac_reward_zero_std"] == 0.0
    same = [1.0, 1.0, N, N] * 2
    _, out = ours_scores([same], [1.0])
    _, theirs = trl_grpo(rpf_of(same), [1.0])
    assert _uniform_group_frac(out, G) == theirs["frac_reward_zero_std"] == 1.0


# ------------------------------------------------------------------ the trainer, end to end

def _fixed(name, values):
    def fn(completions, **kwargs):
        assert len(completions) == len(values)
        return list(values)
    fn.__name__ = name
    return fn


RECORDS = [{"prompt": f"count to {n}"} for n in (3, 5, 7, 9)]


def _trainer(tmp_path, tok, estimator="grpo", *, agg="token-mean", kl_coef=0.0, placement="loss", **reward):
    cfg = RLConfig(estimator=estimator, steps=2, output_dir=str(tmp_path / "run"), progress=False,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=G, max_new_tokens=6, temperature=1.0),
                   ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=8, agg=agg),
                   optim=OptimConfig(lr=1e-2), kl=KLConfig(coef=kl_coef, placement=placement),
                   data=DataConfig(shuffle=False), reward=RewardConfig(calling_convention="trl", **reward),
                   sample_every=1)
    fns = [_fixed("f0", FN_A), _fixed("f1", FN_B)]
    return RLTrainer(cfg, make_policy(tok), tok, reward_fns=fns, reward_weights=WEIGHTS, prompts=RECORDS)


def _row_advantages(data):
    from rlhf_fast.algorithms.advantages import last_token_index

    rm = data.response_mask.bool()
    assert rm.any(dim=1).all()
    a = data.advantages[torch.arange(rm.shape[0]), last_token_index(rm)]
    assert ((data.advantages == a[:, None]) | ~rm).all() and (data.advantages[~rm] == 0).all()
    return a


@pytest.mark.parametrize("estimator,aggregation", [("grpo", "sum_then_normalize"), ("grpo", "normalize_then_sum"),
                                                   ("rloo", "sum_then_normalize")])
def test_trainer_rollout_as_trl(tmp_path, tok, estimator, aggregation):
    tr = _trainer(tmp_path, tok, estimator, multi_objective_aggregation=aggregation)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data, m = tr.rollout()
    assert any("All reward functions returned None" in str(x.message) for x in w)
    assert data.input_ids.shape[0] == 16 and m["reward/dropped"] == 0  # every answer kept, as TRL
    rpf = rpf_of(FN_A, FN_B)
    if estimator == "rloo":
        adv, metrics = trl_rloo(rpf, WEIGHTS)
    else:
        adv, metrics = trl_grpo(rpf, WEIGHTS, aggregation=aggregation)
    torch.testing.assert_close(_row_advantages(data), adv, rtol=1e-5, atol=1e-6)
    # the logged rewards: TRL's reward (nanmean), reward_std (nanstd), rewards/NAME/mean
    assert m["reward/total"] == pytest.approx(metrics["reward"], rel=1e-6)
    assert m["reward/std"] == pytest.approx(metrics["reward_std"], rel=1e-6)
    for k in ("f0", "f1"):
        assert m[f"reward/{k}"] == pytest.approx(metrics[f"rewards/{k}/mean"], rel=1e-6)
    if aggregation == "sum_then_normalize":  # (normalize_then_sum's TRL zero-std flag is the batch's)
        assert m["rollout/uniform_group_frac"] == metrics["frac_reward_zero_std"]
    assert torch.isnan(data.scores).sum() == 8 and math.isfinite(m["returns/mean"])
    assert [t[2] for t in tr._last_texts][4:8] == [None] * 4  # samples.jsonl: no reward


def test_trainer_loss_counts_unscored_answers(tmp_path, tok):
    """TRL's loss keeps the unscored answers (advantage 0) in its token / row normalisers:
    on-policy (ratio 1, β 0) the per-token loss is −A, so ``dapo`` (our token-mean) is
    Σ −A·mask / Σ mask over the batch and ``grpo`` (seq-mean-token-mean) the mean over answers
    of each one's token mean (grpo_trainer.py ``_compute_loss``)."""
    for agg in ("token-mean", "seq-mean-token-mean"):
        tr = _trainer(tmp_path, tok, agg=agg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, _ = tr.rollout()
        mask = data.response_mask.float()
        kept = ~torch.isnan(data.scores)  # dropping the unscored answers would change the normaliser
        # the scored answers' advantages + 1: group advantages sum to 0 over equal-length answers,
        # where any normaliser gives the same 0 loss; the unscored ones stay at 0
        data.advantages = torch.where(kept[:, None] & data.response_mask.bool(), data.advantages + 1.0,
                                      data.advantages)
        per_token_loss = -data.advantages  # TRL: -min(coef_1·A, coef_2·A) at coef 1
        if agg == "token-mean":
            trl_loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, one process
        else:
            trl_loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()  # grpo
        st = tr.policy_backward(data)
        assert st["loss"] == pytest.approx(float(trl_loss), rel=1e-4, abs=1e-6)
        assert float(trl_loss) != pytest.approx(float(per_token_loss[kept].mul(mask[kept]).sum() / mask[kept].sum()))


def test_trainer_step_end_to_end(tmp_path, tok):
    tr = _trainer(tmp_path, tok, "grpo", kl_coef=0.05)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tr.step()
    assert m["reward/dropped"] == 0 and math.isfinite(m["policy/loss"])
    assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, float) and k.startswith(("policy/", "kl/")))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))
    assert all(torch.isfinite(p).all() for p in tr.policy.parameters())


def test_distributed_metrics_equal_one_process(tmp_path, tok):
    """``_global_rollout_metrics`` (every rank's rows through all-reduces) gives the one-process
    reward metrics with unscored answers, here on two simulated ranks, one without any."""
    tr = _trainer(tmp_path, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, m = tr.rollout()  # no shaping: raw == scores

    def args(rows):
        d = data.select(rows)
        zeros = torch.zeros_like(d.advantages)
        return ({}, d.scores, d.scores, zeros, d.response_mask, None, d.advantages, d.returns, zeros, None, None,
                torch.zeros(len(rows), dtype=torch.bool))

    def me(ctx):
        return SimpleNamespace(ctx=ctx, critic=None, device=torch.device("cpu"))

    ranks = [args(torch.arange(0, 12)), args(torch.arange(12, 16))]
    vecs, mxs = [], []
    record = SimpleNamespace(all_reduce_sum=lambda t: vecs.append(t) or t, all_reduce_max=lambda t: mxs.append(t) or t)
    for a in ranks:
        RLTrainer._global_rollout_metrics(me(record), *a)
    reduced = SimpleNamespace(all_reduce_sum=lambda t: sum(vecs), all_reduce_max=lambda t: torch.stack(mxs).amax(0))
    g = RLTrainer._global_rollout_metrics(me(reduced), *ranks[0])
    for k in ("reward/total", "reward/shaped", "reward/std", "returns/mean", "advantages/mean"):
        assert g[k] == pytest.approx(m[k], rel=1e-5, abs=1e-7), k
