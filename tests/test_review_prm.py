"""Review of the process-reward-model feature (a5558a2: rlhf-fast prm, reward.process_model) and of
the reward models' prompts (282644e). Each test pins one defect the review found, since fixed (the
eval-loss difference from TRL is documented instead)."""

import json
import math
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _main(*argv):
    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Untrained PRM folders as `rlhf-fast prm` saves them (a 2-label token classifier over a tiny
    causal LM's backbone, step_separator "\\n" in config.json): a Llama one and a GPT-2 one with 16
    positions; a tiny policy; a reward function that gives 1. One tokenizer for all (it has a chat
    template that writes the bos)."""
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer
    from rlhf_fast.trainers.prm import token_classifier_from

    d = tmp_path_factory.mktemp("revprm")
    tok = train_tokenizer(sample_texts(32), 300)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for fam, npos in (("llama", 64), ("gpt2", 16)):
        causal = tiny_causal_lm(len(tok), family=fam, hidden_size=32, num_layers=1, num_heads=2, seed=1,
                                max_position_embeddings=npos, **ids)
        prm = token_classifier_from(causal)
        prm.config.step_separator = "\n"
        prm.save_pretrained(str(d / f"prm_{fam}"))
        tok.save_pretrained(str(d / f"prm_{fam}"))
    tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=0, **ids).save_pretrained(
        str(d / "policy"))
    tok.save_pretrained(str(d / "policy"))
    (d / "rw.py").write_text("def one(prompts, completions):\n    return [1.0 for _ in completions]\n")
    return d


def _rl_run(root, name, **reward):
    """An RL run folder (config.yaml, final/policy) of ``root``'s policy, reward section from ``reward``."""
    from rlhf_fast.trainers.config import load_config, save_config
    from rlhf_fast.trainers.rl_config import RLConfig

    run = root / name
    cfg = load_config(RLConfig, None, ["--model.policy", str(root / "policy"), "--data.prompts", "the cat,a dog",
                                       "--steps", "1", "--output_dir", str(run)])
    for k, v in reward.items():
        setattr(cfg.reward, k, v)
    run.mkdir()
    save_config(cfg, str(run / "config.yaml"))
    shutil.copytree(root / "policy", run / "final" / "policy")
    return run


# --------------------------------------------------------------------------- rlhf-fast eval --run

def test_eval_run_scores_with_the_runs_process_model(root, tmp_path):
    """A run trained on a function (weight 1) and a PRM (weight 0.5): `eval --run` promises the run's
    reward sources and weights (as training), so the PRM must score and count 0.5x in the mean."""
    run = _rl_run(root, "with_prm", functions=[f"{root / 'rw.py'}:one"], process_model=str(root / "prm_llama"),
                  process_model_weight=0.5)
    out = tmp_path / "res.json"
    assert _main("eval", "--run", str(run), "--max-new-tokens", "3", "--out", str(out)) == 0
    res = json.loads(out.read_text())
    assert res["reward/one"] == 1.0
    assert "reward/process_model" in res, sorted(res)
    assert res["reward/mean"] == pytest.approx(1.0 + 0.5 * res["reward/process_model"], abs=1e-5)


def test_report_of_an_rl_run_names_its_process_model(root, tmp_path):
    run = _rl_run(root, "report_prm", functions=[], process_model=str(root / "prm_llama"))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/total": 0.5, "reward/process_model": 0.5})
                                       + "\n")
    assert _main("report", str(run), "--out", str(tmp_path / "report.md")) == 0
    page = (tmp_path / "report.md").read_text()
    assert "reward.process_model" in page


# --------------------------------------------------------------------------- the process reward

def test_empty_completion_gets_the_lowest_score(root):
    """An empty answer has no step (it was scored as one empty step, the PRM's probability at a
    separator right after the prompt, a step no training row holds: under `min` it escaped every
    wrong step). It first got NaN; the regression review showed NaN reads as "does not apply"
    under the TRL convention, so it now scores 0, the lowest."""
    from rlhf_fast.algorithms.process_rewards import load_process_reward_model

    src = load_process_reward_model(str(root / "prm_llama"))
    got = src(["the cat", "the cat"], ["", "a b\nc d\n"], None)
    assert math.isfinite(got[1])
    assert got[0] == 0.0, got  # (since the regression review: the lowest score, not NaN)


def test_completion_longer_than_the_prm_positions(root):
    """A GPT-2 PRM with 16 positions: a long answer must not crash the batch (score the steps that
    fit, as the trainer's max_len keeps the row's first tokens, or NaN), and the short answer
    beside it keeps its own score."""
    from rlhf_fast.algorithms.process_rewards import load_process_reward_model

    src = load_process_reward_model(str(root / "prm_gpt2"))
    alone = src(["the cat"], ["a b"], None)
    long = " ".join("abcdefghijklmnopqrstuvwxyz") + "\nw x y z"
    got = src(["the cat", "the cat"], ["a b", long], None)
    assert len(got) == 2 and got[0] == pytest.approx(alone[0], abs=1e-6)


def test_chat_prompt_reaches_the_prm_with_one_bos(root):
    """reward.process_model renders a chat prompt with the PRM tokenizer's template (282644e);
    tokenize_steps then prepends the tokenizer's bos to that text, which already starts with the
    template's bos. reward_input_ids (the reward models' encoding) keeps the template's alone."""
    from rlhf_fast.algorithms.process_rewards import load_process_reward_model
    from rlhf_fast.algorithms.rewards import RewardContext

    src = load_process_reward_model(str(root / "prm_llama"))
    bos = src.tokenizer.bos_token_id
    seen = []
    h = src.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        chat = [{"role": "user", "content": "the cat"}]
        src(["rendered by the policy"], ["a b\n"], RewardContext(prompts=[chat]))
    finally:
        h.remove()
    row = seen[0][0].tolist()
    assert row[0] == bos
    assert row[1] != bos, row[:4]


def test_chat_completion_with_a_tool_call_is_scored(root):
    from rlhf_fast.algorithms.process_rewards import load_process_reward_model

    src = load_process_reward_model(str(root / "prm_llama"))
    turns = [{"role": "assistant", "content": None,
              "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
             {"role": "tool", "name": "add", "content": "3"},
             {"role": "assistant", "content": "1+2=3"}]
    got = src(["add 1 and 2"], [turns], None)
    assert len(got) == 1 and math.isfinite(got[0])


# --------------------------------------------------------------------------- rlhf-fast prm metrics

def test_eval_loss_is_the_token_mean_as_documented(tmp_path):
    """TRL's PRMTrainer leaves eval_loss to transformers' Trainer.evaluation_loop (transformers
    trainer.py: ``losses = self.gather_function(losses.repeat(batch_size))`` per batch, then
    ``metrics["eval_loss"] = losses.mean()``): each row weighs its batch's mean loss, so the number
    depends on the eval batch size. Ours is the mean over every labelled token (the same whatever
    the batch size); the review found the difference undocumented: docs/from_trl.md now says so."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer
    from rlhf_fast.trainers.prm import PRMConfig, PRMTrainer, StepwiseRecord

    tok = train_tokenizer(sample_texts(32) + ["1+1=2\n2+2=4\n0+1=1"], 300, padding_side="right")
    # batch 1: two rows of 3 steps; batch 2: one row of 1 step (different label counts)
    ev = [StepwiseRecord("add:", ["1+1=2", "2+2=5", "0+1=1"], [True, False, True]),
          StepwiseRecord("add:", ["2+1=3", "1+1=4", "0+0=0"], [True, False, True]),
          StepwiseRecord("add:", ["2+2=4"], [False])]
    cfg = PRMConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2", output_dir=str(tmp_path / "r"),
                    batch_size=2, max_steps=1, eval_every=0, warmup_steps=0, max_len=64)
    tr = PRMTrainer(cfg, train_records=ev, eval_records=ev, tokenizer=tok)
    items = tr.eval_items
    with torch.no_grad():
        batch_means = [float(tr.loss(items[i:i + 2])) for i in range(0, len(items), 2)]  # the model's loss
    sizes = [len(items[i:i + 2]) for i in range(0, len(items), 2)]
    trl = sum(m * n for m, n in zip(batch_means, sizes)) / sum(sizes)
    with torch.no_grad():
        token_mean = float(tr.loss(items))  # one batch: the mean over all labelled tokens
    ours = tr.evaluate()["eval_loss"]
    assert ours == pytest.approx(token_mean, rel=1e-5) and abs(ours - trl) > 1e-3, (ours, trl, batch_means)
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "from_trl.md").read_text()
    assert "batch's mean loss" in doc


def test_truncation_that_drops_every_row_names_the_keys(tmp_path):
    """Rows whose labels all fall to max_len / max_prompt_length / max_completion_length are dropped
    (prm.py: ``if it["n_labels"]``); when none is left the error must say which keys did it (the CLI
    prints it as its one line: `rlhf-fast prm CFG --max_len 2` gives the same words)."""
    from rlhf_fast.trainers.prm import PRMConfig, PRMTrainer, synthetic_stepwise_records

    cfg = PRMConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2", output_dir=str(tmp_path / "r"),
                    batch_size=4, max_steps=1, eval_every=0, warmup_steps=0, max_len=3)
    with pytest.raises(ValueError, match="max_len"):
        PRMTrainer(cfg, train_records=synthetic_stepwise_records(8, seed=1), eval_records=[])
