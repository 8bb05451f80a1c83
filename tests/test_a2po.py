"""A*-PO (rlhf_fast.trainers.a2po, TRL 1.16's experimental A2POTrainer): Stage 1's V* against
TRL's formula on the rewards of the answers it sampled (num_value_samples per prompt, the
all-incorrect filter), one step's loss, gradient and statistics against TRL's own
``compute_loss`` on the same answers, learning (a simple reward rises; not with lr ≈ 0), V*
computed once and restored on resume (a resumed run equals the straight one), ``rlhf-fast a2po``,
and the refused settings."""

import functools
import json
import math
import os
import types
from collections import defaultdict

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.trainers.a2po import A2POTrainer, a2po_losses, optimal_values
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (A2POConfig, KLConfig, ModelConfig, OptimConfig, PPOConfig, RewardConfig,
                                          RLConfig, RolloutConfig)
from tests.test_online_dpo import _Positioned, grads
from tests.conftest import run_rows
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def make_config(tmp_path, lr=1e-2, steps=2, a2po=None, rollout=None, **kw):
    base = dict(estimator="a2po", steps=steps, output_dir=str(tmp_path / "run"), progress=False, sample_every=1,
                rollout=rollout or RolloutConfig(prompts_per_step=4, group_size=1, max_new_tokens=6),
                ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4), optim=OptimConfig(lr=lr),
                a2po=a2po or A2POConfig(num_value_samples=4, beta2=0.05))
    base.update(kw)
    return RLConfig(**base)


def trainer(tmp_path, reward_fns=(frac_a,), prompts=PROMPTS, **kw):
    pol, tok = make_policy()
    return A2POTrainer(make_config(tmp_path, **kw), pol, tok, prompts=prompts, reward_fns=list(reward_fns))


class Recorder:
    """frac_a, remembering every call's prompts, completions and rewards."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions):
        out = frac_a(prompts, completions)
        self.calls.append((list(prompts), list(completions), out))
        return out


# ----------------------------------------------------------------------------- Stage 1


def trl_v_star(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """TRL's lines (trl/experimental/a2po/a2po_trainer.py, A2POTrainer._estimate_optimal_values),
    on ``rewards`` [P, n] float32."""
    n = rewards.shape[1]
    v_star = beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(n))
    return v_star


def test_optimal_values_are_trls_formula():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, -2.0, 5.0, 0.1]])
    for beta1 in (0.5, 0.05, 3.0):
        torch.testing.assert_close(optimal_values(rewards, beta1), trl_v_star(rewards, beta1).double(),
                                   rtol=1e-6, atol=1e-6)
    # by hand: β1·log(mean exp(r/β1)); all equal rewards give that reward; a small β1 nears the max
    assert float(optimal_values(torch.tensor([[0.0, 1.0]]), 0.5)) == pytest.approx(0.5 * math.log((1 + math.e**2) / 2))
    assert float(optimal_values(torch.tensor([[0.7, 0.7, 0.7]]), 0.5)) == pytest.approx(0.7)
    assert float(optimal_values(torch.tensor([[0.0, 1.0, 0.0]]), 1e-3)) == pytest.approx(1.0 - 1e-3 * math.log(3))


@pytest.mark.parametrize("filter_all_incorrect", [True, False])
def test_stage1_samples_n_answers_per_prompt_and_keeps_trls_v_star(tmp_path, filter_all_incorrect):
    """Stage 1 answers every training prompt num_value_samples times (prompt-major, several
    generate calls), and its V* is TRL's formula on those answers' rewards; the filter drops the
    prompts whose answers all scored 0 from the training prompts."""
    rec = Recorder()
    prompts = PROMPTS + ["b", "c d", "q: x", "0 1"]
    tr = trainer(tmp_path, reward_fns=[rec], prompts=prompts, a2po=A2POConfig(
        num_value_samples=3, beta1=0.3, filter_all_incorrect=filter_all_incorrect))
    values = tr.estimate_values()
    seen_prompts = [p for c in rec.calls for p in c[0]]
    rewards = torch.tensor([r for c in rec.calls for r in c[2]]).view(len(prompts), 3)
    assert len(rec.calls) > 1 and seen_prompts == [p for p in prompts for _ in range(3)]
    torch.testing.assert_close(values, trl_v_star(rewards, 0.3).double(), rtol=1e-6, atol=1e-7)
    zero = (rewards == 0).all(1)
    assert 0 < int(zero.sum()) < len(prompts)  # the case the filter is for, and not every prompt
    kept = [p for p, z in zip(prompts, zero.tolist()) if not (z and filter_all_incorrect)]
    assert tr.prompts == kept
    m = tr.rollout()[1]  # the step after Stage 1 reports it once
    for (p, _, r), col in zip(tr._last_texts, tr._last_columns):  # each answer's V* is its prompt's
        assert col["v_star"] == pytest.approx(float(values[prompts.index(p)]), rel=1e-6)
    assert m["a2po/prompts_kept"] == len(kept) and m["a2po/prompts_dropped"] == len(prompts) - len(kept)
    assert m["a2po/v_star_mean"] == pytest.approx(float(values.mean()))
    assert "a2po/prompts_kept" not in tr.rollout()[1]


def test_stage1_leaves_training_as_it_was(tmp_path):
    """Stage 1 leaves the random states as it found them (its reward function draws from torch's):
    a run's first step answers and scores as a run whose table was put in place without sampling."""
    def noisy(prompts, completions):
        return torch.rand(len(completions)).tolist()

    a = trainer(tmp_path, reward_fns=[noisy])
    a.estimate_values()
    data_a, _ = a.rollout()
    b = trainer(tmp_path, reward_fns=[noisy])
    b._apply_values(a.values.tolist(), a._all_incorrect)
    data_b, _ = b.rollout()
    assert data_a.input_ids.tolist() == data_b.input_ids.tolist()
    assert data_a.scores.tolist() == data_b.scores.tolist()


def test_every_prompt_filtered_is_refused(tmp_path):
    tr = trainer(tmp_path, reward_fns=[lambda p, c: [0.0] * len(c)])
    with pytest.raises(ValueError, match="a2po.filter_all_incorrect: every one of the 4 training prompts"):
        tr.estimate_values()


def test_num_train_epochs_counts_the_kept_prompts(tmp_path):
    """TRL filters before its Trainer counts steps: 2 epochs over k kept prompts, 2 per step."""
    tr = trainer(tmp_path, num_train_epochs=2.0, rollout=RolloutConfig(prompts_per_step=2, group_size=1,
                                                                         max_new_tokens=6),
                 ppo=PPOConfig(epochs=1, mini_batch_size=2, micro_batch_size=2))
    assert tr.config.steps == 4
    tr.estimate_values()
    k = len(tr.prompts)
    assert k < 4 and tr.config.steps == math.ceil(2 * k / 2)
    assert tr.scheduler.get_last_lr()[0] == pytest.approx(1e-2)


# ----------------------------------------------------------------------------- TRL's compute_loss


def trl_compute_loss(tr, batch, rewards, v_star):
    """TRL A2POTrainer.compute_loss itself (trl/experimental/a2po/a2po_trainer.py) on a stand-in
    trainer, with TRL's ``_get_sequence_logps`` (the reference's too) and TRL's attention mask
    (its ``_prepare_inputs`` lines: the prompt's mask, then 1 up to and including the first eos).
    Returns (loss, metrics); the policy's gradient is left in its ``.grad``."""
    from trl.experimental.a2po import A2POTrainer as TRLA2PO

    P = batch.prompt_length
    prompt_mask, completion_ids = batch.attention_mask[:, :P].long(), batch.input_ids[:, P:]
    # (transcribed from A2POTrainer.__init__ and _prepare_inputs)
    eos_token_ids = tr.policy.generation_config.eos_token_id
    if eos_token_ids is None:
        eos_token_ids = []
    elif isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    if tr.tokenizer.eos_token_id not in eos_token_ids:
        eos_token_ids = [tr.tokenizer.eos_token_id, *eos_token_ids]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    sequence_indices = torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1)
    completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    st = types.SimpleNamespace(args=types.SimpleNamespace(beta2=tr.config.a2po.beta2),
                               model=types.SimpleNamespace(training=True), model_kwarg_keys={"input_ids"},
                               _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    st._get_sequence_logps = functools.partial(TRLA2PO._get_sequence_logps, st)
    with torch.no_grad():
        ref_logps = st._get_sequence_logps(_Positioned(tr.reference), batch.input_ids, attention_mask,
                                           completion_ids.size(1))
    inputs = {"input_ids": batch.input_ids, "attention_mask": attention_mask, "logits_to_keep": completion_ids.size(1),
              "ref_logps": ref_logps, "rewards": rewards, "v_star": v_star}
    tr.policy.zero_grad(set_to_none=True)
    loss = TRLA2PO.compute_loss(st, _Positioned(tr.policy), inputs)
    loss.backward()
    return float(loss.detach()), {k: v[0] for k, v in st._metrics["train"].items()}


def test_one_step_equals_trl_compute_loss(tmp_path):
    """Loss, gradient, implicit_reward and advantage of TRL's compute_loss on our rollout's answers
    (with and without an eos), rewards and V*; the policy nudged off the reference so the
    log-ratio is real."""
    from tests.test_online_dpo import rollout_with_batch

    tr = trainer(tmp_path, rollout=RolloutConfig(prompts_per_step=8, group_size=1, max_new_tokens=6, temperature=1.5),
                 ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8),
                 a2po=A2POConfig(num_value_samples=4, beta1=0.5, beta2=0.3, filter_all_incorrect=False))
    tr.estimate_values()
    with torch.no_grad():
        for p in tr.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data, m, batch = rollout_with_batch(tr)
    rewards = torch.tensor(frac_a(None, list(batch.response_texts)))
    v_star = rewards - data.scores  # the rollout's target is r − V*
    assert torch.equal(v_star, tr.values[[PROMPTS.index(p) for p in batch.prompt_texts]].float())
    assert 0 < int((tr._truncated_rows(batch)).sum()) < 8  # answers that end at an eos, and some cut
    trl_loss, trl_m = trl_compute_loss(tr, batch, rewards, v_star)
    g_trl = grads(tr.policy)
    tr.policy.zero_grad(set_to_none=True)
    tr._first_pass, tr._rows_left = [], 8
    st = tr.policy_backward(data, 3)  # micro-batches of 3, 3, 2 answers
    assert st["loss"] == pytest.approx(trl_loss, rel=1e-5) and trl_loss > 1e-3
    scale = max(float(g.abs().max()) for g in g_trl)
    for a, b in zip(grads(tr.policy), g_trl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    tr.policy.zero_grad(set_to_none=True)
    out = {**m, **tr.update(data)}
    assert out["loss"] == pytest.approx(trl_loss, rel=1e-5)
    assert out["implicit_reward"] == pytest.approx(trl_m["implicit_reward"], rel=1e-5, abs=1e-7)
    assert abs(out["implicit_reward"]) > 1e-3
    assert out["advantage"] == pytest.approx(trl_m["advantage"], rel=1e-6)
    assert out["v_star"] == pytest.approx(float(v_star.mean()))
    assert out["reward"] == pytest.approx(float(rewards.mean()))


def test_losses_by_hand():
    s, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -2.0])
    target = torch.tensor([0.5, -0.25, 0.0])
    torch.testing.assert_close(a2po_losses(s, ref, target, 0.1), torch.tensor([0.16, 0.04, 0.0]))


# ----------------------------------------------------------------------------- learning


def mean_reward(tmp_path, lr, steps=24):
    cfg = make_config(tmp_path, lr=lr, steps=steps, sample_every=0,
                      rollout=RolloutConfig(prompts_per_step=8, group_size=1, max_new_tokens=6),
                      ppo=PPOConfig(epochs=2, mini_batch_size=8, micro_batch_size=8),
                      a2po=A2POConfig(num_value_samples=8, beta2=0.01, filter_all_incorrect=False))
    hist = A2POTrainer(cfg, *make_policy(), prompts=PROMPTS, reward_fns=[frac_a]).train()
    r = [h["reward"] for h in hist]
    return sum(r[:5]) / 5, sum(r[-5:]) / 5


def test_the_reward_rises(tmp_path):
    """frac_a over 24 steps (first 5 → last 5 steps' mean reward), measured: lr 1e-2 0.01 → 0.88;
    lr 1e-12 (the config refuses 0) stays near 0."""
    first, last = mean_reward(tmp_path / "a", 1e-2)
    assert last > first + 0.5 and last > 0.6, (first, last)
    first0, last0 = mean_reward(tmp_path / "b", 1e-12)
    assert last0 < 0.1, (first0, last0)


# ----------------------------------------------------------------------------- run folder


def test_resume_restores_v_star_and_equals_uninterrupted(tmp_path):
    def fresh(name, **kw):
        cfg = make_config(tmp_path / name, steps=4, save_every=2,
                          ppo=PPOConfig(epochs=2, mini_batch_size=2, micro_batch_size=1), **kw)
        return A2POTrainer(cfg, *make_policy(), prompts=PROMPTS, reward_fns=[frac_a])

    a = fresh("a")
    a.train()
    b = fresh("b")
    b.train(steps=2)
    c = fresh("b", resume=b.config.output_dir)
    c.estimate_values = lambda: pytest.fail("a resumed run recomputed V*")
    c.train()
    assert c.values.tolist() == a.values.tolist() and c.prompts == a.prompts and len(a.prompts) < len(PROMPTS)
    from rlhf_fast.trainers.checkpoint import latest_checkpoint

    with open(os.path.join(latest_checkpoint(c.config.output_dir), "extra.json")) as f:
        assert json.load(f)["a2po"]["v_star"] == a.values.tolist()

    rows = run_rows  # metrics.jsonl without the wall-clock timings

    ra, rc = rows(a.config.output_dir), rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4] and "a2po/v_star_mean" in rc[0]
    assert ra == rc
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def test_cli_a2po_writes_a_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["a2po", "none", "--output_dir", run, "--progress", "false", "--steps", "2", "--sample_every", "1",
            "--reward.functions", "tests.test_rl_learning:frac_a", "--rollout.max_new_tokens", "4", "--ppo.epochs", "1",
            "--a2po.num_value_samples", "2", "--a2po.beta2", "0.05", "--a2po.filter_all_incorrect", "false"]
    assert main(args) == 0
    assert "rlhf-fast a2po:" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("loss", "grad_norm", "reward", "v_star", "advantage", "implicit_reward"):
        assert k in rows[-1]
    import yaml

    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["estimator"] == "a2po" and saved["a2po"]["beta2"] == 0.05
    assert saved["rollout"]["group_size"] == 1 and saved["rollout"]["prompts_per_step"] == 8  # the command's defaults
    assert main(["a2po", "--resume", run, "--steps", "3"]) == 0
    assert [json.loads(ln)["step"] for ln in open(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3]
    # rlhf-fast report knows the run's kind: its key settings and A*-PO's metrics on the page
    assert main(["report", run]) == 0
    page = open(os.path.join(run, "report.md"), encoding="utf-8").read()
    assert "a2po.beta2" in page and "v_star" in page and "implicit_reward" in page
    assert main(["a2po", "none", "--output_dir", str(tmp_path / "x"), "--rollout.group_size", "2",
                 "--reward.functions", "tests.test_rl_learning:frac_a"]) == 2
    assert "rollout.group_size must be 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("bad,match", [
    (dict(rollout=RolloutConfig(group_size=2)), "rollout.group_size must be 1 for estimator 'a2po'"),
    (dict(kl=KLConfig(coef=0.1)), "kl.coef: A\\*-PO has no KL term"),
    (dict(model=ModelConfig(reference="some/folder")), "model.reference: A\\*-PO"),
    (dict(ppo=PPOConfig(clip_low=0.1, mini_batch_size=4, micro_batch_size=4)), "ppo.clip_low: no effect in A\\*-PO"),
    (dict(model=ModelConfig(critic="some/folder")), "model.critic"),
    (dict(reward=RewardConfig(whiten=True)), "reward.whiten"),
    (dict(reward=RewardConfig(on_bad_reward="drop")), "reward.on_bad_reward 'drop'"),
    (dict(rollout=RolloutConfig(group_size=1, mask_truncated=True)), "rollout.mask_truncated"),
    (dict(estimator="grpo", rollout=RolloutConfig(group_size=2), ppo=PPOConfig(), a2po=A2POConfig(beta2=0.1)),
     "a2po.beta2 apply to estimator 'a2po'"),
])
def test_settings_without_meaning_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **bad)


@pytest.mark.parametrize("kw,match", [
    (dict(num_value_samples=0), "a2po.num_value_samples must be an int > 0"),
    (dict(num_value_samples=True), "a2po.num_value_samples must be an int > 0"),
    (dict(num_value_samples=2.0), "a2po.num_value_samples must be an int > 0"),
    (dict(beta1=0.0), "a2po.beta1 must be a finite number > 0"),
    (dict(beta1=float("nan")), "a2po.beta1"),
    (dict(beta2=-1e-3), "a2po.beta2 must be a finite number > 0"),
    (dict(filter_all_incorrect="yes"), "a2po.filter_all_incorrect must be true or false"),
])
def test_bad_a2po_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        A2POConfig(**kw)


def test_trainer_argument_errors(tmp_path):
    pol, tok = make_policy()
    with pytest.raises(ValueError, match="no reward source"):
        A2POTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS)
    with pytest.raises(ValueError, match="critic=...: A\\*-PO has no critic"):
        A2POTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, reward_fns=[frac_a], critic=object())
    with pytest.raises(ValueError, match="reference=...: A\\*-PO's reference is a frozen copy"):
        A2POTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, reward_fns=[frac_a], reference=pol)
    with pytest.raises(ValueError, match="estimator 'a2po': A\\*-PO trains with .*A2POTrainer"):
        RLTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, reward_fns=[frac_a])
    with pytest.raises(TypeError, match="config must be an RLConfig"):
        A2POTrainer({"estimator": "a2po"}, pol, tok)


def test_two_ddp_ranks_match_one_process(tmp_path):
    """``torchrun`` with 2 gloo ranks and DDP: each rank answers its share of Stage 1 and the V*
    table is all-gathered (per-answer seeds: the same answers as one process), then the steps,
    their answers' mean squared error over both ranks and the evaluation log the numbers of one
    process (the evaluation's A*-PO loss on V* estimated by both ranks too); both runs checkpoint the
    same tables."""
    from tests.torchrun_launch import torchrun

    from rlhf_fast.trainers.checkpoint import latest_checkpoint

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("count:\nlist:\ngo:\nwrite:\na b\nc d\nthe cat\nhello\nq: a\nx y\n")
    common = ["none", "--progress", "false", "--steps", "2", "--reward.functions", "tests.test_rl_learning:frac_a",
              "--rollout.max_new_tokens", "4", "--rollout.per_sample_seeds", "true", "--rollout.prompts_per_step", "4",
              "--ppo.epochs", "2", "--ppo.mini_batch_size", "2", "--ppo.micro_batch_size", "1", "--eval_every", "2",
              "--data.eval_fraction", "0.2", "--data.prompts_file", str(prompts), "--sample_every", "0",
              "--a2po.num_value_samples", "3", "--a2po.beta2", "0.05"]
    assert main(["a2po", *common, "--output_dir", str(tmp_path / "one")]) == 0
    r = torchrun(["-m", "rlhf_fast.cli"], "a2po", *common, "--output_dir", str(tmp_path / "two"),
                 "--distributed.strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]

    def rows(run):
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per", "step_time"))}
                for ln in open(tmp_path / run / "metrics.jsonl")]

    def table(run):
        with open(os.path.join(latest_checkpoint(str(tmp_path / run)), "extra.json")) as f:
            return json.load(f)["a2po"]

    assert table("one") == table("two") and len(table("one")["v_star"]) == 8
    one, two = rows("one"), rows("two")
    assert len(one) == len(two) == 2 and "eval/reward/total" in one[-1] and "a2po/prompts_kept" in one[0]
    assert "eval/loss" in one[-1] and len(table("one")["eval_v_star"]) == 2  # the evaluation prompts' V* too
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
