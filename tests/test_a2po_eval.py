"""A*-PO's evaluation as TRL's (trl/experimental/a2po/a2po_trainer.py): Stage 1 also estimates V*
for the evaluation prompts (TRL's formula on their answers' rewards, never filtered), each
evaluation logs TRL's eval_loss / eval_reward / eval_v_star / eval_advantage /
eval_implicit_reward as ``eval/*`` (TRL's own ``compute_loss`` on the same answers), the
evaluation table is checkpointed (a resume never recomputes it and equals the straight run), and
training is the same with and without evaluation."""

import json
import os

import pytest
import torch

from rlhf_fast.trainers.a2po import A2POTrainer
from rlhf_fast.trainers.checkpoint import latest_checkpoint
from rlhf_fast.trainers.rl_config import A2POConfig, EvalConfig, PPOConfig, RolloutConfig
from tests.test_a2po import Recorder, make_config, trl_compute_loss, trl_v_star
from tests.conftest import run_rows
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

EVAL = ["b", "c d", "q: x", "0 1", "a", "x y"]
TRL_EVAL = ("loss", "reward", "v_star", "advantage", "implicit_reward")


def trainer(tmp_path, reward_fns=(frac_a,), eval_prompts=EVAL, **kw):
    return A2POTrainer(make_config(tmp_path, **kw), *make_policy(), prompts=PROMPTS, eval_prompts=eval_prompts,
                       reward_fns=list(reward_fns))


def test_eval_v_star_is_trls_formula_and_never_filtered(tmp_path):
    """estimate_values("eval") answers every evaluation prompt num_value_samples times and keeps
    TRL's V* of their rewards; filter_all_incorrect leaves the evaluation prompts (TRL filters
    the training dataset only) and the training table alone."""
    rec = Recorder()
    tr = trainer(tmp_path, reward_fns=[rec], a2po=A2POConfig(num_value_samples=3, beta1=0.3,
                                                            filter_all_incorrect=True))
    seeds = {"train": [], "eval": []}
    run = tr._run_engine
    tr._run_engine = lambda which, params, split="train": (seeds[split].append(params.seed)
                                                           or run(which, params, split))
    train_values = tr.estimate_values().clone()
    kept = list(tr.prompts)
    rec.calls.clear()
    values = tr.estimate_values("eval")
    assert seeds["eval"] and not set(seeds["eval"]) & set(seeds["train"])  # its own draws
    seen = [p for c in rec.calls for p in c[0]]
    rewards = torch.tensor([r for c in rec.calls for r in c[2]]).view(len(EVAL), 3)
    assert seen == [p for p in EVAL for _ in range(3)] and len(rec.calls) > 1
    torch.testing.assert_close(values, trl_v_star(rewards, 0.3).double(), rtol=1e-6, atol=1e-7)
    assert values is tr.eval_values and len(values) == len(EVAL)
    assert 0 < int((rewards == 0).all(1).sum()) < len(EVAL)  # an all-incorrect evaluation prompt, kept
    assert tr.prompts == kept and torch.equal(tr.values, train_values)
    m = tr.rollout()[1]
    assert "time/eval_value_estimation" in m and "a2po/prompts_kept" in m


def capture_eval_batches(tr):
    """tr.evaluate(), and the evaluation answers (RolloutBatch per generate call) it scored."""
    seen = []
    run = tr._run_engine

    def spy(which, params, split="train"):
        out = run(which, params, split)
        if split == "eval":
            seen.append(out[0])
        return out

    tr._run_engine = spy
    m = tr.evaluate()
    tr._run_engine = run
    return m, seen


def test_eval_loss_is_trls_compute_loss_on_the_eval_answers(tmp_path):
    """Six evaluation prompts in two generate calls (4 + 2 answers, sampled at eval.temperature
    1.5: some end at an eos, some are cut): eval/loss is TRL's compute_loss on each call's
    answers, rewards and V*, averaged over the answers (TRL's eval_loss when its eval batches are
    full), and eval/reward, eval/v_star, eval/advantage, eval/implicit_reward TRL's statistics;
    the policy is nudged off the reference so the log-ratio is real."""
    tr = trainer(tmp_path, seed=1, eval=EvalConfig(temperature=1.5),
                 rollout=RolloutConfig(prompts_per_step=4, group_size=1, max_new_tokens=10),
                 a2po=A2POConfig(num_value_samples=4, beta1=0.5, beta2=0.3, filter_all_incorrect=False))
    tr.estimate_values()
    tr.estimate_values("eval")
    with torch.no_grad():
        for p in tr.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m, batches = capture_eval_batches(tr)
    assert [b.input_ids.shape[0] for b in batches] == [4, 2]
    assert 0 < sum(int(tr._truncated_rows(b).sum()) for b in batches) < 6
    n, acc = 0, {k: 0.0 for k in TRL_EVAL}
    for b in batches:
        rewards = torch.tensor(frac_a(None, list(b.response_texts)))
        v_star = tr.eval_values[[EVAL.index(p) for p in b.prompt_texts]].float()
        loss, stats = trl_compute_loss(tr, b, rewards, v_star)
        k = len(rewards)
        for name, v in (("loss", loss), ("reward", float(rewards.mean())), ("v_star", float(v_star.mean())),
                        ("advantage", stats["advantage"]), ("implicit_reward", stats["implicit_reward"])):
            acc[name] += v * k
        n += k
    assert m["eval/loss"] == pytest.approx(acc["loss"] / n, rel=1e-5) and m["eval/loss"] > 1e-3
    for k in TRL_EVAL[1:]:
        assert m[f"eval/{k}"] == pytest.approx(acc[k] / n, rel=1e-5, abs=1e-7), k
    assert abs(m["eval/implicit_reward"]) > 1e-3
    assert m["eval/reward"] == pytest.approx(m["eval/reward/total"])


def test_evaluate_before_training_estimates_the_table(tmp_path):
    """TRL's first use: evaluate() before any step estimates the evaluation table (and only it)."""
    tr = trainer(tmp_path)
    m = tr.evaluate()
    assert tr.eval_values is not None and tr.values is None and "eval/loss" in m




def test_resume_restores_the_eval_table_and_equals_uninterrupted(tmp_path):
    def fresh(name, **kw):
        cfg = make_config(tmp_path / name, steps=4, save_every=2, eval_every=2, eval=EvalConfig(temperature=1.0),
                          ppo=PPOConfig(epochs=1, mini_batch_size=2, micro_batch_size=2), **kw)
        return A2POTrainer(cfg, *make_policy(), prompts=PROMPTS, eval_prompts=EVAL, reward_fns=[frac_a])

    a = fresh("a")
    a.train()
    b = fresh("b")
    b.train(steps=2)
    c = fresh("b", resume=b.config.output_dir)
    c.estimate_values = lambda split="train": pytest.fail(f"a resumed run recomputed V* ({split})")
    c.train()
    assert c.eval_values.tolist() == a.eval_values.tolist() and len(a.eval_values) == len(EVAL)
    with open(os.path.join(latest_checkpoint(c.config.output_dir), "extra.json")) as f:
        assert json.load(f)["a2po"]["eval_v_star"] == a.eval_values.tolist()
    ra, rc = run_rows(a.config.output_dir), run_rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4] and all(f"eval/{k}" in rc[1] for k in TRL_EVAL)
    assert "eval/loss" in rc[3] and "eval/loss" not in rc[2]
    assert ra == rc


def test_training_is_the_same_with_and_without_evaluation(tmp_path):
    """Evaluation prompts (their Stage 1 and an evaluation after every step, sampled at
    temperature 1, a reward function drawing from torch's random stream) leave the training
    metrics, the V* table and the weights as a run without evaluation prompts; that run
    checkpoints no evaluation table."""
    def noisy(prompts, completions):
        return [a + 0.1 * float(torch.rand(())) for a in frac_a(prompts, completions)]

    def run(name, eval_prompts, **kw):
        cfg = make_config(tmp_path / name, steps=3, save_every=3,
                          ppo=PPOConfig(epochs=2, mini_batch_size=2, micro_batch_size=1), **kw)
        tr = A2POTrainer(cfg, *make_policy(), prompts=PROMPTS, eval_prompts=eval_prompts, reward_fns=[noisy])
        tr.train()
        return tr, run_rows(cfg.output_dir)

    a, ra = run("eval", EVAL, eval_every=1, eval=EvalConfig(temperature=1.0, group_size=2))
    b, rb = run("plain", None)
    assert b.eval_values is None and a.eval_values is not None
    assert all("eval/loss" in r for r in ra)
    assert [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in ra] == rb
    assert a.values.tolist() == b.values.tolist()
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(p, q)
    with open(os.path.join(latest_checkpoint(b.config.output_dir), "extra.json")) as f:
        assert "eval_v_star" not in json.load(f)["a2po"]


def test_a_checkpoint_without_the_eval_table(tmp_path):
    """A run resumed from a checkpoint written without the evaluation table (no evaluation
    prompts then) evaluates the rewards only, with a warning; a table of another number of
    evaluation prompts is refused."""
    ppo = PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4)
    cfg = make_config(tmp_path, steps=1, save_every=1, ppo=ppo)
    A2POTrainer(cfg, *make_policy(), prompts=PROMPTS, reward_fns=[frac_a]).train()
    c = trainer(tmp_path, steps=2, eval_every=1, resume=cfg.output_dir, ppo=ppo)
    with pytest.warns(UserWarning, match="no V\\* table for the evaluation prompts"):
        c.train()
    rows = run_rows(cfg.output_dir)
    assert "eval/reward/total" in rows[-1] and "eval/loss" not in rows[-1]
    with pytest.raises(ValueError, match="a V\\* table of 3 evaluation prompts for a run of 6"):
        c._apply_eval_values([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        trainer(tmp_path / "x").estimate_values("test")
    with pytest.raises(ValueError, match="no evaluation prompts"):
        trainer(tmp_path / "y", eval_prompts=None).estimate_values("eval")


def test_eval_logs_maj_at_k_when_the_prompts_have_answers(tmp_path):
    """eval.group_size 2 with an ``answer`` field on every evaluation prompt: A*-PO's eval logs
    verl's maj@k beside mean@G / best@k, as RLTrainer's (it passed no answer texts: no maj@k)."""
    ev = [{"prompt": p, "answer": "1"} for p in EVAL[:4]]
    tr = trainer(tmp_path, eval_prompts=ev, eval=EvalConfig(temperature=1.0, group_size=2))
    m = tr.evaluate()
    assert {"eval/mean@2", "eval/best@2", "eval/maj@2"} <= set(m)
