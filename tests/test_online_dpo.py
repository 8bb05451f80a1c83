"""Online DPO (rlhf_fast.trainers.online_dpo, TRL 1.16's experimental OnlineDPOTrainer): one step
against TRL's own ``training_step`` run on the same answers (loss, gradient, every logged
statistic), the chosen/rejected rule (ties, missing-eos penalty, a pairwise judge), micro-batch
invariance, learning (a simple reward rises; not with lr ≈ 0), exact resume, ``rlhf-fast
online-dpo`` and ``report``, and the refused settings."""

import functools
import json
import os
import types

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.trainers.online_dpo import (OnlineDPOTrainer, chosen_first_rows, first_is_chosen, online_dpo_losses,
                                           pair_metrics)
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (KLConfig, ModelConfig, OnlineDPOConfig, OptimConfig, PPOConfig, RewardConfig,
                                          RLConfig, RolloutConfig)
from tests.conftest import run_rows
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def make_config(tmp_path, lr=5e-3, steps=2, online_dpo=None, rollout=None, **kw):
    base = dict(estimator="online_dpo", steps=steps, output_dir=str(tmp_path / "run"), progress=False, sample_every=1,
                rollout=rollout or RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6),
                ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=lr),
                online_dpo=online_dpo or OnlineDPOConfig())
    base.update(kw)
    return RLConfig(**base)


def trainer(tmp_path, reward_fns=(frac_a,), **kw):
    pol, tok = make_policy()
    return OnlineDPOTrainer(make_config(tmp_path, **kw), pol, tok, prompts=PROMPTS, reward_fns=list(reward_fns))


def grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# ----------------------------------------------------------------------------- TRL's training_step


class _Positioned(torch.nn.Module):
    """The model as TRL's ``_forward`` calls it (``model(ids, attention_mask=...)``), with the
    position ids of the attention mask: the ones our generation and log-probs use on left-padded
    prompts (transformers' default counts the padding)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return self.model(input_ids, attention_mask=attention_mask, position_ids=pos)


def trl_training_step(tr, batch, penalty=None):
    """TRL OnlineDPOTrainer.training_step itself (trl/experimental/online_dpo/online_dpo_trainer.py)
    on a stand-in trainer whose ``_generate`` hands it our rollout's answers in TRL's layout
    (prompt i's two answers at rows i and N + i; TRL's own ``truncate_right`` mask), with TRL's
    ``_forward`` and ``_calculate_rewards_from_functions`` (frac_a as a TRL reward function).
    Returns (loss, stats); the policy's gradient is left in its ``.grad``."""
    from transformers import TrainerState
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLOnlineDPO
    from trl.experimental.online_dpo.online_dpo_trainer import OnlineDPOConfig as TRLConfig
    from trl.experimental.utils import truncate_right

    P, B = batch.prompt_length, batch.input_ids.shape[0]
    order = torch.cat([torch.arange(0, B, 2), torch.arange(1, B, 2)])  # ours: 2i, 2i+1 → TRL: i, N+i
    ids, am = batch.input_ids[order], batch.attention_mask[order]
    eos = tr._eos_ids()
    completion_ids, completion_mask = truncate_right(ids[:, P:], eos, tr.tokenizer.pad_token_id)
    st = types.SimpleNamespace()
    st.args = TRLConfig(output_dir="unused", missing_eos_penalty=penalty, beta=tr._beta,
                        loss_type=tr.config.online_dpo.loss_type, use_vllm=False, report_to="none", bf16=False)
    st.args.__dict__.update(n_gpu=1, torch_empty_cache_steps=None, gradient_accumulation_steps=1)
    st.beta, st.eos_token_ids, st.max_length = tr._beta, eos, 512
    st._generate = lambda model, prompts, images: (ids[:, :P], am[:, :P], completion_ids, completion_mask, None)
    st._forward = functools.partial(TRLOnlineDPO._forward, st)
    st.ref_model = _Positioned(tr.reference)
    st.processing_class = tr.tokenizer
    st.reward_funcs = [lambda prompts, completions, **kw: frac_a(prompts, completions)]
    st.reward_processing_classes, st.reward_weights = [None], torch.ones(1)
    st.accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t,
                                           backward=lambda loss, **kw: loss.backward())
    st.state = TrainerState()
    st._calculate_rewards_from_functions = functools.partial(TRLOnlineDPO._calculate_rewards_from_functions, st)
    st.stats = {k: [] for k in ("objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/chosen",
                                "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                "logps/rejected", "val/contain_eos_token", "beta", "objective/rlhf_reward",
                                "objective/scores_margin", "objective/scores")}
    prompts = list(batch.prompt_texts[0::2])
    tr.policy.zero_grad(set_to_none=True)
    loss = TRLOnlineDPO.training_step(st, _Positioned(tr.policy), {"prompt": prompts})
    tr.policy.eval()  # (training_step switched it to train mode)
    return float(loss), {k: v[0] for k, v in st.stats.items()}, bool((completion_mask == 0).any())


def rollout_with_batch(tr):
    """tr.rollout(), and the RolloutBatch its generation gave (generation order)."""
    seen = []
    gen = tr._generate
    tr._generate = lambda rnd: seen.append(gen(rnd)) or seen[-1]
    data, m = tr.rollout()
    tr._generate = gen
    return data, m, seen[0][0]


# TRL's statistics that sum over the padding after an eos (ours over the answer's tokens only)
PADDED_STATS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("eos", [False, True])
def test_one_step_equals_trl_training_step(tmp_path, loss_type, eos):
    """Loss, gradient and every statistic of TRL's training_step on the same answers. ``eos``
    False: no answer may end early (rollout.min_new_tokens = max_new_tokens), so TRL's padded
    sums are ours too; True: answers with and without eos, a missing-eos penalty of 0.3 that
    must decide some pairs, and the padded sums left out of the comparison."""
    ro = RolloutConfig(prompts_per_step=8, group_size=2, max_new_tokens=6, temperature=1.5,
                       min_new_tokens=0 if eos else 6)
    penalty = 0.3 if eos else None
    tr = trainer(tmp_path, rollout=ro, ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=16),
                 online_dpo=OnlineDPOConfig(beta=0.7, loss_type=loss_type, missing_eos_penalty=penalty), seed=0)
    # a policy whose answers differ in log-prob from the reference's: a real Δ
    with torch.no_grad():
        for p in tr.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data, m, batch = rollout_with_batch(tr)
    trl_loss, trl_stats, padded = trl_training_step(tr, batch, penalty)
    g_trl = grads(tr.policy)
    assert padded == eos
    if eos:
        assert 0 < m["val/contain_eos_token"] < 1
        ids, _, rm = tr._batch_masks(batch)
        raw = torch.tensor(frac_a(None, list(batch.response_texts)))
        penalised = raw - penalty * (~tr.contains_eos(ids, rm)).float()
        assert (first_is_chosen(raw) != first_is_chosen(penalised)).any()  # the penalty decides a pair
    tr.policy.zero_grad(set_to_none=True)
    tr._first_pass, tr._pairs_left = [], 8
    st = tr.policy_backward(data, 4)  # micro-batches of 2 pairs
    assert st["loss"] == pytest.approx(trl_loss, rel=1e-5)
    assert trl_loss > 0.01
    # float32 sums of log-probs from two different heads (ours fused, TRL's log_softmax): measured
    # at most 2e-6 of the largest gradient entry (IPO's, whose gradient scales with Δ − 1/(2β))
    scale = max(float(g.abs().max()) for g in g_trl)
    for a, b in zip(grads(tr.policy), g_trl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    tr.policy.zero_grad(set_to_none=True)
    out = {**m, **tr.update(data)}
    assert out["loss"] == pytest.approx(trl_loss, rel=1e-5)
    for k, v in trl_stats.items():
        if eos and k in PADDED_STATS:
            continue
        assert out[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert abs(trl_stats["rewards/margins"]) > 1e-3  # the reference and the policy differ


def test_the_choice_rule_is_trls():
    """first_is_chosen / chosen_first_rows against TRL training_step's lines (transcribed from
    trl/experimental/online_dpo/online_dpo_trainer.py, in TRL's first-half / second-half layout),
    ties and the missing-eos penalty included."""
    rewards_pairs = torch.tensor([[1.0, 0.5], [0.2, 0.2], [0.0, 0.3], [0.7, 0.9], [0.4, 0.1]])
    contain_eos = torch.tensor([[True, True], [True, False], [False, True], [True, False], [False, True]])
    penalty = 0.25
    N = rewards_pairs.shape[0]
    # TRL's lines (rows i and N + i are prompt i's answers)
    rewards = torch.cat([rewards_pairs[:, 0], rewards_pairs[:, 1]])
    contain = torch.cat([contain_eos[:, 0], contain_eos[:, 1]])
    rewards[~contain] -= penalty
    first_half, second_half = rewards.split(N)
    mask = first_half >= second_half
    batch_range = torch.arange(N)
    chosen_indices = batch_range + (~mask * N)
    rejected_indices = batch_range + (mask * N)
    # ours (rows 2i and 2i + 1)
    ours = rewards_pairs.reshape(-1) - penalty * (~contain_eos.reshape(-1)).float()
    first = first_is_chosen(ours)
    # a tie keeps the first (pair 1); the penalty turns pairs 1 and 3 round
    assert first.tolist() == mask.tolist() == [True, True, False, True, True]
    assert first_is_chosen(rewards_pairs.reshape(-1)).tolist() == [True, True, False, False, True]
    rows = chosen_first_rows(first)
    to_trl = lambda r: (r // 2) + N * (r % 2)  # noqa: E731 - our row 2i + k is TRL's i + k·N
    assert to_trl(rows[0::2]).tolist() == chosen_indices.tolist()
    assert to_trl(rows[1::2]).tolist() == rejected_indices.tolist()


def test_losses_and_metrics_by_hand():
    c, r = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -2.0, -2.0])
    cr, rr = torch.tensor([-3.5, -4.0, -1.0]), torch.tensor([-3.0, -3.0, -1.0])
    d = torch.tensor([1.5, -2.0, 0.0])  # (c − r) − (cr − rr)
    beta = 0.5
    torch.testing.assert_close(online_dpo_losses(c, r, cr, rr, beta), torch.log1p(torch.exp(-beta * d)))
    torch.testing.assert_close(online_dpo_losses(c, r, cr, rr, beta, "ipo"), (d - 1.0) ** 2)
    logp, ref = torch.stack([c, r], 1).reshape(-1), torch.stack([cr, rr], 1).reshape(-1)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 0.0])
    m = pair_metrics(logp, ref, beta, scores)
    kl = torch.tensor([0.5, -1.0, -1.0, 1.0, -1.0, -1.0])  # logp − ref, chosen / rejected of each pair
    assert m["objective/kl"] == pytest.approx(-2.5 / 6)
    assert m["objective/entropy"] == pytest.approx(3.0)
    assert m["objective/non_score_reward"] == pytest.approx(beta * 2.5 / 6)
    assert m["objective/rlhf_reward"] == pytest.approx(float((scores - beta * kl).mean()))
    assert m["rewards/chosen"] == pytest.approx(beta * -1.5 / 3)
    assert m["rewards/rejected"] == pytest.approx(beta * -1.0 / 3)
    assert m["rewards/margins"] == pytest.approx(beta * -0.5 / 3)
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)  # pair 3's tie is no win (TRL: margin > 0)
    assert m["beta"] == beta
    assert m["logps/chosen"] == pytest.approx(-10 / 3) and m["logps/rejected"] == pytest.approx(-8 / 3)
    with pytest.raises(ValueError, match="online_dpo.loss_type"):
        online_dpo_losses(c, r, cr, rr, beta, "hinge")


def test_micro_batches_give_the_same_gradient(tmp_path):
    tr = trainer(tmp_path, online_dpo=OnlineDPOConfig(beta=0.5))
    data, _ = tr.rollout()
    out = []
    for mb in (8, 2, 4):
        tr.policy.zero_grad(set_to_none=True)
        out.append((tr.policy_backward(data, mb)["loss"], grads(tr.policy)))
    for loss, g in out[1:]:
        assert loss == pytest.approx(out[0][0], rel=1e-6)
        for a, b in zip(g, out[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_ties_keep_the_first_answer_and_rows_are_chosen_first(tmp_path):
    """A constant reward ties every pair: each prompt's first answer is chosen, and the rows
    of the update are its answers in generation order; a length reward picks the longer one."""
    tr = trainer(tmp_path, reward_fns=[lambda p, c: [1.0] * len(c)])
    data, m, batch = rollout_with_batch(tr)
    assert torch.equal(data.input_ids, batch.input_ids)
    assert [c["chosen"] for c in tr._last_columns] == [True, False] * 4
    assert m["objective/scores_margin"] == 0.0
    tr = trainer(tmp_path, reward_fns=[lambda p, c: [float(len(x)) for x in c]], seed=5)
    data, m, batch = rollout_with_batch(tr)
    texts = list(batch.response_texts)
    for i in range(4):
        a, b = texts[2 * i], texts[2 * i + 1]
        assert tr._last_columns[2 * i]["chosen"] == (len(a) >= len(b))
        chosen = 2 * i if len(a) >= len(b) else 2 * i + 1
        assert torch.equal(data.input_ids[2 * i], batch.input_ids[chosen])
    assert m["objective/scores_margin"] >= 0


def test_an_unscored_answer_counts_zero(tmp_path):
    """reward.calling_convention trl: an answer whose function returned None scores 0 (TRL's
    nansum over the functions), so it beats a -1 (a NaN would lose every comparison)."""
    def first_unscored(prompts, completions, **kw):
        return [None if i % 2 == 0 else -1.0 for i in range(len(completions))]

    tr = trainer(tmp_path, reward_fns=[first_unscored], reward=RewardConfig(calling_convention="trl"))
    data, m = tr.rollout()
    assert [c["chosen"] for c in tr._last_columns] == [True, False] * 4
    assert m["objective/scores"] == -0.5 and m["objective/scores_margin"] == 1.0
    assert data.scores.tolist() == [0.0, -1.0] * 4


class LongerJudge:
    """A pairwise judge in TRL's BasePairwiseJudge form: prefers the answer with more 'a's
    (0: the first), ties to the second."""

    def judge(self, prompts, completions, shuffle_order=True):
        return [0 if a.count("a") > b.count("a") else 1 for a, b in completions]


def test_a_pairwise_judge_picks_and_needs_no_reward(tmp_path):
    cfg = make_config(tmp_path, online_dpo=OnlineDPOConfig(judge="tests.test_online_dpo:LongerJudge"))
    pol, tok = make_policy()
    tr = OnlineDPOTrainer(cfg, pol, tok, prompts=PROMPTS)
    assert tr.reward is None
    data, m, batch = rollout_with_batch(tr)
    texts = list(batch.response_texts)
    for i in range(4):
        first = texts[2 * i].count("a") > texts[2 * i + 1].count("a")
        assert tr._last_columns[2 * i]["chosen"] == first
    assert "objective/scores" not in m
    out = tr.update(data)
    assert "rewards/accuracies" in out and "objective/rlhf_reward" not in out
    bad = OnlineDPOTrainer(make_config(tmp_path), *make_policy(), prompts=PROMPTS,
                           pairwise_judge=lambda prompts, pairs: [0])
    with pytest.raises(ValueError, match="one int per pair \\(4\\)"):
        bad.rollout()
    import numpy as np

    numpy_judge = OnlineDPOTrainer(make_config(tmp_path), *make_policy(), prompts=PROMPTS,
                                   pairwise_judge=lambda prompts, pairs: np.array([1, 0, -1, 0]))
    numpy_judge.rollout()  # numpy ints are ints; -1 (a failed judgement in TRL's judges) picks the second
    assert [c["chosen"] for c in numpy_judge._last_columns] == [False, True, True, False, False, True, True, False]


def test_tool_results_are_out_of_the_sums(tmp_path):
    """Answers that call a calculator: each answer's summed log-prob (and so the loss) runs over
    the policy's own tokens, not the tool results appended in between."""
    from rlhf_fast.models.logprobs import sequence_logprobs
    from tests.test_rl_tools import CHATS, FirstCallScripted, _holes, calculator, make_policy as tool_policy
    from tests.test_rl_tools import tool_tokenizer

    tok = tool_tokenizer()
    cfg = make_config(tmp_path, rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=80),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=2))
    tr = OnlineDPOTrainer(cfg, tool_policy(tok), tok, prompts=CHATS, tools=[calculator], reward_fns=[frac_a])
    tr.engine = FirstCallScripted(tr.engine, tok)
    data, m = tr.rollout()
    holes = _holes(data)
    assert holes.any() and m["tools/call_count"] == 4
    _, s = tr.dpo_loss(data, 2)
    with torch.no_grad():
        every = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask,
                                  response_mask=data.response_mask | holes)
    own = (every * data.response_mask).sum(1)
    torch.testing.assert_close(s.detach(), own, rtol=1e-5, atol=1e-5)
    assert ((every * holes).sum(1).abs() > 1e-3).all()  # the tool tokens would have counted
    assert torch.isfinite(torch.tensor(tr.update(data)["loss"]))


# ----------------------------------------------------------------------------- learning


def mean_reward(tmp_path, lr, steps=24):
    pol, tok = make_policy()
    cfg = make_config(tmp_path, lr=lr, steps=steps, sample_every=0,
                      rollout=RolloutConfig(prompts_per_step=8, group_size=2, max_new_tokens=6),
                      ppo=PPOConfig(epochs=2, mini_batch_size=16, micro_batch_size=16))
    hist = OnlineDPOTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a]).train()
    r = [h["reward/total"] for h in hist]
    return r[0], sum(r[:5]) / 5, sum(r[-5:]) / 5


def test_the_reward_rises(tmp_path):
    """frac_a over 24 steps (first 5 → last 5 steps' mean), measured over seeds 0–3: lr 1e-2
    0.02 → 0.98–1.0; lr 1e-12 (the config refuses 0) 0.02 → 0.02–0.03."""
    start, first, last = mean_reward(tmp_path / "a", 1e-2)
    assert last > first + 0.5 and last > 0.6, (first, last)
    start0, first0, last0 = mean_reward(tmp_path / "b", 1e-12)
    assert start0 == pytest.approx(start)  # the same policy and answers at the first step
    assert last0 < 0.15, (first0, last0)


# ----------------------------------------------------------------------------- beta per epoch


def test_a_beta_list_takes_one_per_epoch(tmp_path):
    """β [0.5, 0.2, 0.1] with 4 prompts, 2 per step: epoch = step // 2 (the last past the end)."""
    tr = trainer(tmp_path, steps=6, online_dpo=OnlineDPOConfig(beta=[0.5, 0.2, 0.1]), sample_every=0,
                 rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                 ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    assert [tr.beta_of_step(s) for s in range(8)] == [0.5, 0.5, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1]
    assert [h["beta"] for h in tr.train()] == [0.5, 0.5, 0.2, 0.2, 0.1, 0.1]
    assert OnlineDPOConfig(beta=[0.3]).beta == 0.3  # TRL: a one-item list is its number


# ----------------------------------------------------------------------------- run folder


def test_resume_equals_uninterrupted(tmp_path):
    def fresh(name, **kw):
        pol, tok = make_policy()
        cfg = make_config(tmp_path / name, steps=4, save_every=2, online_dpo=OnlineDPOConfig(beta=[0.3, 0.1]),
                          ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=2), **kw)
        return OnlineDPOTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a])

    a = fresh("a")
    a.train()
    b = fresh("b")
    b.train(steps=2)
    c = fresh("b", resume=b.config.output_dir)
    c.train()

    rows = run_rows  # metrics.jsonl without the wall-clock timings

    ra, rc = rows(a.config.output_dir), rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4]
    assert ra == rc
    assert [r["beta"] for r in ra] == [0.3, 0.1, 0.1, 0.1] and ra[-1]["policy/updates"] == 4
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)
    assert os.path.isfile(os.path.join(a.config.output_dir, "final", "policy", "config.json"))


def test_cli_online_dpo_writes_a_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["online-dpo", "none", "--output_dir", run, "--progress", "false", "--steps", "2", "--sample_every", "1",
            "--reward.functions", "tests.test_rl_learning:frac_a", "--rollout.max_new_tokens", "4", "--ppo.epochs", "1",
            "--online_dpo.beta", "0.2", "--online_dpo.missing_eos_penalty", "0.5"]
    assert main(args) == 0
    assert "rlhf-fast online-dpo:" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("loss", "rewards/accuracies", "objective/kl", "objective/scores", "val/contain_eos_token", "beta"):
        assert k in rows[-1]
    import yaml

    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["estimator"] == "online_dpo" and saved["online_dpo"]["beta"] == 0.2
    assert saved["rollout"]["group_size"] == 2  # the command's default
    assert main(["online-dpo", "--resume", run, "--steps", "3"]) == 0
    assert [json.loads(ln)["step"] for ln in open(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3]
    assert main(["report", run]) == 0
    capsys.readouterr()
    page = open(os.path.join(run, "report.md")).read()
    assert "- **Kind**: online-dpo (estimator online\\_dpo)\n" in page
    assert "| `online_dpo.beta` | 0.2 |" in page and "| `rewards/accuracies` |" in page
    # another group size is refused by name, and so is an RL command on this run
    assert main(["online-dpo", "none", "--output_dir", str(tmp_path / "x"), "--rollout.group_size", "4",
                 "--reward.functions", "tests.test_rl_learning:frac_a"]) == 2
    assert "rollout.group_size must be 2" in capsys.readouterr().err
    assert main(["grpo", os.path.join(run, "config.yaml"), "--output_dir", str(tmp_path / "y")]) == 2
    assert "online_dpo.beta, online_dpo.missing_eos_penalty apply to estimator 'online_dpo'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("bad,match", [
    (dict(rollout=RolloutConfig(group_size=4)), "rollout.group_size must be 2 for estimator 'online_dpo'"),
    (dict(kl=KLConfig(coef=0.1)), "kl.coef: online DPO has no KL term"),
    (dict(kl=KLConfig(ref_sync_steps=2)), "kl.ref_sync_steps"),
    (dict(ppo=PPOConfig(clip_low=0.1, mini_batch_size=8, micro_batch_size=8)), "ppo.clip_low: no effect in online"),
    (dict(model=ModelConfig(critic="some/folder")), "model.critic"),
    (dict(reward=RewardConfig(whiten=True)), "reward.whiten"),
    (dict(reward=RewardConfig(clip=1.0)), "reward.clip"),
    (dict(reward=RewardConfig(on_bad_reward="drop")), "reward.on_bad_reward 'drop'"),
    (dict(rollout=RolloutConfig(group_size=2, mask_truncated=True)), "rollout.mask_truncated"),
    (dict(ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=1)), "ppo.micro_batch_size must be even"),
    (dict(estimator="grpo", rollout=RolloutConfig(group_size=2), online_dpo=OnlineDPOConfig(loss_type="ipo")),
     "online_dpo.loss_type apply to estimator 'online_dpo'"),
])
def test_settings_without_meaning_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **bad)


@pytest.mark.parametrize("kw,match", [
    (dict(beta=0.0), "online_dpo.beta must be a finite number > 0"),
    (dict(beta=[0.1, -1.0]), "online_dpo.beta\\[1\\]"),
    (dict(beta=[]), "non-empty list"),
    (dict(beta="x"), "online_dpo.beta must be a number > 0 or a list"),
    (dict(loss_type="hinge"), "online_dpo.loss_type must be one of"),
    (dict(missing_eos_penalty=float("nan")), "online_dpo.missing_eos_penalty"),
    (dict(judge="nocolon"), "online_dpo.judge must be 'module:name'"),
    (dict(judge="a:b", missing_eos_penalty=1.0), "with online_dpo.judge the judge alone picks"),
])
def test_bad_online_dpo_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        OnlineDPOConfig(**kw)


def test_trainer_argument_errors(tmp_path):
    pol, tok = make_policy()
    with pytest.raises(ValueError, match="no reward source"):
        OnlineDPOTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS)
    with pytest.raises(ValueError, match="online_dpo.judge: cannot import"):
        OnlineDPOTrainer(make_config(tmp_path, online_dpo=OnlineDPOConfig(judge="no_such_mod:j")), pol, tok,
                         prompts=PROMPTS)
    with pytest.raises(ValueError, match="both set"):
        OnlineDPOTrainer(make_config(tmp_path, online_dpo=OnlineDPOConfig(judge="tests.test_online_dpo:LongerJudge")),
                         pol, tok, prompts=PROMPTS, pairwise_judge=LongerJudge())
    with pytest.raises(TypeError, match="pairwise_judge must be a pairwise judge"):
        OnlineDPOTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, pairwise_judge=3)
    with pytest.raises(ValueError, match="critic=...: online DPO has no critic"):
        OnlineDPOTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, reward_fns=[frac_a], critic=object())
    with pytest.raises(ValueError, match="estimator 'online_dpo': online DPO trains with .*OnlineDPOTrainer"):
        RLTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, reward_fns=[frac_a])


def test_two_fsdp2_ranks_match_one_process(tmp_path):
    """``torchrun`` with 2 gloo ranks and FSDP2 (policy and reference sharded; mini-batches of
    whole pairs over the ranks, a rank whose share runs out feeding blank micro-batches) logs the
    numbers of one process: the pair count, the pairs' statistics and the evaluation are global.
    (DDP measured equal too.)"""
    from tests.torchrun_launch import torchrun

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("count:\nlist:\ngo:\nwrite:\na b\nc d\nthe cat\nhello\n")
    common = ["none", "--progress", "false", "--steps", "2", "--reward.functions", "tests.test_rl_learning:frac_a",
              "--rollout.max_new_tokens", "4", "--rollout.per_sample_seeds", "true", "--rollout.prompts_per_step", "4",
              "--ppo.epochs", "2", "--ppo.mini_batch_size", "4", "--ppo.micro_batch_size", "2", "--eval_every", "2",
              "--data.eval_fraction", "0.25", "--data.prompts_file", str(prompts), "--sample_every", "0"]
    assert main(["online-dpo", *common, "--output_dir", str(tmp_path / "one")]) == 0
    r = torchrun(["-m", "rlhf_fast.cli"], "online-dpo", *common, "--output_dir", str(tmp_path / "two"),
                 "--distributed.strategy", "fsdp2")
    assert r.returncode == 0, r.stderr[-3000:]

    def rows(run):
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per", "step_time"))}
                for ln in open(tmp_path / run / "metrics.jsonl")]

    one, two = rows("one"), rows("two")
    assert len(one) == len(two) == 2 and "eval/reward/total" in one[-1] and "rewards/accuracies" in one[-1]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            # (rewards/*: β × a difference of float32 sums of ~-12, rounded per micro-batch: 5e-8 apart)
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_lora_reference_is_the_policy_without_its_adapters(tmp_path):
    """model.lora: the reference is the policy with its adapters off — the same log-probs at the
    first step (fresh adapters add nothing: objective/kl 0), apart after an update."""
    pol, tok = make_policy()
    cfg = make_config(tmp_path, lr=3e-2, model=ModelConfig(lora={"r": 4}), sample_every=0)
    hist = OnlineDPOTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a]).train()
    assert hist[0]["objective/kl"] == 0.0 and hist[0]["rewards/margins"] == 0.0
    assert hist[0]["rewards/accuracies"] == 0.0  # every pair ties: none counts (TRL: margin > 0)
    assert abs(hist[1]["objective/kl"]) > 1e-4
