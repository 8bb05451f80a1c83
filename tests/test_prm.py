"""Process reward models (rlhf_fast.trainers.prm, TRL 0.x's PRMTrainer) and their use as an RL
reward (reward.process_model, rlhf_fast.algorithms.process_rewards): tokenisation equal to TRL
0.19's tokenize_row, the loss a hand cross-entropy, learning against an lr~0 control, save and
reload, exact resume, the process reward a hand computation per aggregation, an RL step, the CLI,
and bad input refused naming the key."""

import json
import math
import os
from itertools import chain

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.algorithms.process_rewards import (PROCESS_AGGREGATIONS, ProcessRewardModel, aggregate_steps,
                                                  load_process_reward_model, split_steps)
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.prm import (PRMConfig, PRMTrainer, StepwiseRecord, load_stepwise_records,
                                    synthetic_stepwise_records, tokenize_steps)

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# Transcribed from TRL 0.19.1, trl/trainer/prm_trainer.py, PRMTrainer.tokenize_row (a staticmethod;
# TRL 1.x no longer ships PRMTrainer, so the lines are copied here, unchanged but for the names).
def trl_tokenize_row(features, tokenizer, step_separator, max_length, max_prompt_length, max_completion_length,
                     train_on_last_step_only, is_eval):
    prompt_ids = tokenizer(features["prompt"], add_special_tokens=False)["input_ids"]
    completions_ids = [
        tokenizer(completion, add_special_tokens=False)["input_ids"] for completion in features["completions"]
    ]
    if train_on_last_step_only and not is_eval:
        labels = [-100] * (len(features["labels"]) - 1) + [int(features["labels"][-1])]
    else:
        labels = [int(label) for label in features["labels"]]
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [completion + separator_ids for completion in completions_ids]
    labels = [[-100] * (len(completion) - 1) + [label] for completion, label in zip(completions_ids, labels)]
    completion_ids = list(chain(*completions_ids))
    labels = list(chain(*labels))
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_completion_length is not None:
        completion_ids = completion_ids[:max_completion_length]
        labels = labels[:max_completion_length]
    input_ids = prompt_ids + completion_ids
    labels = [-100] * len(prompt_ids) + labels
    if max_length is not None:
        input_ids = input_ids[:max_length]
        labels = labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    recs = synthetic_stepwise_records(200, seed=9)
    return train_tokenizer(sample_texts(64) + [r.prompt + "\n" + "\n".join(r.completions) for r in recs], 300,
                           padding_side="right")


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=16, lr=1e-2, warmup_steps=3, eval_every=0,
                log_every=10, max_len=64)
    base.update(kw)
    return PRMConfig(**base)


RECORDS = [
    {"prompt": "add the numbers:", "completions": ["1+2=3", "2+2=5", "0+1=1"], "labels": [True, False, True]},
    {"prompt": "Which number is larger, 9.8 or 9.11?", "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
     "labels": [True, False]},
    {"prompt": "q", "completions": ["a long step with several words in it"], "labels": [False]},
]


@pytest.mark.parametrize("kw", [
    dict(max_length=None, max_prompt_length=None, max_completion_length=None),
    dict(max_length=1024, max_prompt_length=512, max_completion_length=None),  # TRL's defaults
    dict(max_length=None, max_prompt_length=3, max_completion_length=None),  # the prompt's last tokens
    dict(max_length=None, max_prompt_length=None, max_completion_length=7),  # cut inside a step
    dict(max_length=12, max_prompt_length=4, max_completion_length=20),  # the row's first tokens
])
@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("sep", ["\n", " step "])
def test_tokenize_equals_trl_tokenize_row(tok, kw, last_only, sep):
    for rec in RECORDS:
        for is_eval in (False, True):
            want = trl_tokenize_row(rec, tok, sep, kw["max_length"], kw["max_prompt_length"],
                                    kw["max_completion_length"], last_only, is_eval)
            got = tokenize_steps(tok, rec["prompt"], rec["completions"], rec["labels"], step_separator=sep,
                                 max_len=kw["max_length"], max_prompt_length=kw["max_prompt_length"],
                                 max_completion_length=kw["max_completion_length"], train_on_last_step_only=last_only,
                                 is_eval=is_eval)
            assert got == want, (rec, kw, last_only, is_eval)
    # a tokenizer without bos: none is prepended (TRL's `if tokenizer.bos_token_id is not None`)
    import copy

    nobos = copy.deepcopy(tok)
    nobos.bos_token = None
    assert nobos.bos_token_id is None
    rec = RECORDS[0]
    assert tokenize_steps(nobos, rec["prompt"], rec["completions"], rec["labels"], step_separator=sep) == \
        trl_tokenize_row(rec, nobos, sep, None, None, None, False, False)


def test_trainer_rows_are_trl_rows_and_loss_is_cross_entropy(tmp_path, tok):
    """The trainer's training rows are TRL's with is_eval False, its eval rows with is_eval True
    (train_on_last_step_only labels the last step of training rows only); the loss is the mean
    over labelled tokens of -log softmax(logits)[label], computed by hand here."""
    recs = synthetic_stepwise_records(24, seed=3)
    cfg = _cfg(tmp_path, "rows", max_steps=1, train_on_last_step_only=True, max_prompt_length=3,
               max_completion_length=14)
    tr = PRMTrainer(cfg, train_records=recs[:16], eval_records=recs[16:], tokenizer=tok)
    for items, recs_, is_eval in ((tr.train_items, recs[:16], False), (tr.eval_items, recs[16:], True)):
        want = [trl_tokenize_row(vars(r), tok, "\n", 64, 3, 14, True, is_eval) for r in recs_]
        # rows left with no label (the last step cut off) train nothing: dropped
        want = [(w["input_ids"], w["labels"]) for w in want if set(w["labels"]) != {-100}]
        assert [(it["input_ids"], it["labels"]) for it in items] == want
        assert 0 < len(items) < len(recs_) if not is_eval else len(items) == len(recs_)
    items = tr.eval_items  # rows of several lengths: the padded batch is checked too
    with torch.no_grad():
        got = float(tr.loss(items))
        total, n = 0.0, 0
        for it in items:  # one row at a time, no padding
            logits = tr.model(input_ids=torch.tensor([it["input_ids"]])).logits[0].double()  # [T, 2]
            for t, y in enumerate(it["labels"]):
                if y != -100:
                    total += float(torch.logsumexp(logits[t], 0) - logits[t, y])
                    n += 1
    assert n == sum(it["n_labels"] for it in items) > len(items)
    assert got == pytest.approx(total / n, rel=1e-5)
    assert tr.evaluate(items)["eval_loss"] == pytest.approx(total / n, rel=1e-5)


def test_learns_saves_reloads_and_scores_as_rl_reward(tmp_path, tok):
    """Held-out step accuracy rises far above an lr~0 control on additions whose steps are
    decidable from their text; final/ reloads with AutoModelForTokenClassification (same logits,
    step_separator in its config); the RL process reward is the hand computation per aggregation."""
    from transformers import AutoModelForTokenClassification

    train, held = synthetic_stepwise_records(600, seed=1), synthetic_stepwise_records(64, seed=2)
    runs = {}
    for name, lr in (("trained", 1e-2), ("control", 1e-9)):
        tr = PRMTrainer(_cfg(tmp_path, name, max_steps=30, lr=lr, step_separator="\n"), train_records=train,
                        eval_records=held, tokenizer=tok)
        runs[name] = (tr, tr.train())
    tr, m = runs["trained"]
    ctrl = runs["control"][1]
    assert m["eval_accuracy"] >= 0.85 and ctrl["eval_accuracy"] <= 0.65, (m, ctrl)
    assert m["eval_solution_accuracy"] > ctrl["eval_solution_accuracy"] + 0.15, (m, ctrl)
    assert m["eval_loss"] < ctrl["eval_loss"] - 0.2
    logged = read_metrics(tr.run.path)
    assert logged[-1]["step"] == 30 and "eval_solution_accuracy" in logged[-1]

    final = os.path.join(tr.run.path, "final")
    re = AutoModelForTokenClassification.from_pretrained(final).eval()
    assert re.config.step_separator == "\n" and re.config.num_labels == 2
    ids = torch.tensor([tr.eval_items[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(re(input_ids=ids).logits, tr.model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)

    # the RL reward: split at the separator, P(label 1) at each separator's last token, aggregated
    prompts = ["add the numbers:", "add the numbers:", "add the numbers:", "add the numbers:"]
    completions = ["1+1=2\n2+2=8\n", "0+2=2\n\n1+0=1", "2+2=9", "1+2=3\n"]
    from transformers import AutoTokenizer

    rtok = AutoTokenizer.from_pretrained(final)
    hand = []
    for p, c in zip(prompts, completions):
        steps = [s for s in c.split("\n") if s]  # (a blank line between steps is no step)
        row = trl_tokenize_row({"prompt": p, "completions": steps, "labels": [True] * len(steps)}, rtok, "\n",
                               None, None, None, False, True)
        with torch.no_grad():
            probs = torch.softmax(re(input_ids=torch.tensor([row["input_ids"]])).logits[0].double(), -1)[:, 1]
        hand.append([float(probs[t]) for t, y in enumerate(row["labels"]) if y != -100])
    assert [len(h) for h in hand] == [2, 2, 1, 1]
    want = {"min": [min(h) for h in hand], "last": [h[-1] for h in hand],
            "mean": [sum(h) / len(h) for h in hand], "prod": [math.prod(h) for h in hand]}
    assert set(want) == set(PROCESS_AGGREGATIONS)
    # trained: the wrong second step of the first completion scores low, both of the second high
    assert hand[0][1] < 0.5 < min(hand[1])
    for agg in PROCESS_AGGREGATIONS:
        src = load_process_reward_model(final, aggregation=agg)
        assert src.separator == "\n"
        assert src(prompts, completions, None) == pytest.approx(want[agg], rel=1e-5, abs=1e-6), agg
    assert [aggregate_steps([torch.tensor([])], agg)[0] for agg in PROCESS_AGGREGATIONS] == [0.0] * 4  # no step
    assert split_steps("a\nb\n", "\n") == ["a", "b"] and split_steps("a\n \nb", "\n") == ["a", "b"]
    assert split_steps("", "\n") == [] and split_steps("\n\n", "\n") == []
    assert load_process_reward_model(final)(["p"], [" \n"], None)[0] == 0.0  # no step: the lowest score


def test_rl_step_with_process_model(tmp_path, tok):
    """An RL (GRPO) run whose only reward is reward.process_model: one step runs and logs the
    source; its weight scales it."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import RewardConfig
    from tests.test_rl_learning import PROMPTS, make_config, make_policy

    tr = PRMTrainer(_cfg(tmp_path, "prm", max_steps=2), train_records=synthetic_stepwise_records(32, seed=1),
                    eval_records=[], tokenizer=tok)
    tr.train()
    final = os.path.join(tr.run.path, "final")
    pol, ptok = make_policy()
    rc = RewardConfig(process_model=final, process_model_weight=0.5, process_aggregation="mean")
    cfg = make_config(tmp_path, "grpo", steps=1, reward=rc)
    rl = RLTrainer(cfg, pol, ptok, prompts=PROMPTS)
    (src, w), = rl.reward.sources
    assert isinstance(src, ProcessRewardModel) and w == 0.5 and src.aggregation == "mean"
    out = rl.reward(["q:", "x"], ["a b\nc", "y"])
    assert out.total.tolist() == pytest.approx([0.5 * v for v in src(["q:", "x"], ["a b\nc", "y"], None)], rel=1e-6)
    rl.train()
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    assert rows[-1]["step"] == 1 and 0.0 <= rows[-1]["reward/process_model"] <= 1.0


def test_resume_is_exact(tmp_path, tok):
    """Interrupted at step 3 and resumed == 6 steps uninterrupted (weights and logged losses)."""
    recs = synthetic_stepwise_records(60, seed=4)

    def run(name, steps):
        c = _cfg(tmp_path, name, max_steps=6, save_every=3, batch_size=8, grad_accum=2)
        t = PRMTrainer(c, train_records=recs, eval_records=[], tokenizer=tok)
        if steps < 6:
            while t.step < steps:
                t.train_step()
            t._save()
            t = PRMTrainer(c, train_records=recs, eval_records=[], tokenizer=tok)
        # (a run restarted from step 0 would end with the same weights: count the steps it trains)
        trained, step = [], t.train_step
        t.train_step = lambda: trained.append(1) or step()
        t.train()
        assert len(trained) == (6 - steps if steps < 6 else 6)
        return [p.detach().clone() for p in t.model.parameters()], read_metrics(c.output_dir)

    full, m_full = run("full", 6)
    resumed, m_res = run("resumed", 3)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    assert [m["loss"] for m in m_full if m["step"] > 3] == [m["loss"] for m in m_res if m["step"] > 3]


def test_cli(tmp_path, capsys):
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(vars(r)) + "\n" for r in synthetic_stepwise_records(24, seed=7)))
    cfg = tmp_path / "prm.yaml"
    cfg.write_text(f"model: '{TINY}'\ndata: {data}\nmax_steps: 2\nbatch_size: 4\neval_fraction: 0.2\n")
    assert cli.main(["prm", str(cfg), "--output_dir", str(tmp_path / "out"), "--step_separator", " ; "]) == 0
    assert "eval_solution_accuracy" in capsys.readouterr().out
    with open(tmp_path / "out" / "final" / "config.json") as f:
        assert json.load(f)["step_separator"] == " ; "
    assert cli.main(["prm", str(cfg), "--max_prompt_length", "0"]) == 2
    assert "max_prompt_length" in capsys.readouterr().err
    # `rlhf-fast report` tells a PRM run from a DPO one (both configs hold max_prompt_length), shows
    # the separator as text, and a DPO run is refused in the PRM run's folder
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.md").read_text()
    assert "- **Kind**: prm" in page and '| `step_separator` | " ; " |' in page
    assert "| `eval_solution_accuracy` |" in page
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(f"model: '{TINY}'\nmax_steps: 1\n")
    capsys.readouterr()
    assert cli.main(["dpo", str(dpo), "--output_dir", str(tmp_path / "out")]) == 2
    assert "holds a run of rlhf-fast prm" in capsys.readouterr().err


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p", "completions": ["a"]}, r"labels: missing"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]},
     r"labels: expected one label per step: 2 completions, 1 labels"),
    ({"prompt": "p", "completions": ["a"], "labels": [1]}, r"labels: expected a list of true/false"),
    ({"prompt": "p", "completions": ["a"], "labels": ["yes"]}, r"labels: expected a list of true/false"),
    ({"prompt": "p", "completions": "a", "labels": [True]}, r"completions: expected a non-empty list"),
    ({"completions": ["a"], "labels": [True]}, r"prompt: missing"),
])
def test_bad_records_name_the_key_and_field(tmp_path, tok, row, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completions": ["a"], "labels": [True]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"^data: 1 problem\(s\) in .*bad.jsonl \(first: line 2: " + needle):
        PRMTrainer(_cfg(tmp_path, "bad", data=str(path)), tokenizer=tok)
    assert not os.path.exists(tmp_path / "bad")  # refused before the run folder is made
    with pytest.raises(ValueError, match=r"^train_records: .*" + needle):
        load_stepwise_records([row], "train_records")


def test_bad_config_and_folders_name_the_key(tmp_path, tok):
    from rlhf_fast.models.tiny import tiny_causal_lm, tiny_reward_model
    from rlhf_fast.trainers.rl_config import RewardConfig

    for kw, needle in ((dict(step_separator=""), "step_separator must be a non-empty string"),
                       (dict(max_prompt_length=0), "max_prompt_length must be null or an int >= 1"),
                       (dict(max_completion_length=1.5), "max_completion_length must be null"),
                       (dict(train_on_last_step_only="yes"), "train_on_last_step_only")):
        with pytest.raises(ValueError, match=needle):
            _cfg(tmp_path, "x", **kw)
    with pytest.raises(ValueError,
                       match=r"reward.process_aggregation must be one of \('min', 'last', 'mean', 'prod'\)"):
        RewardConfig(process_aggregation="median")
    with pytest.raises(ValueError, match="reward.process_model must be a PRM folder"):
        RewardConfig(process_model="")
    with pytest.raises(ValueError, match="reward.process_model_weight"):
        RewardConfig(process_model_weight=float("nan"))
    assert RewardConfig().process_aggregation == "min"
    # folders that are not 2-label token classifiers: a causal LM, a reward model
    for name, m in (("causal", tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)),
                    ("seqcls", tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2))):
        d = str(tmp_path / name)
        m.save_pretrained(d)
        tok.save_pretrained(d)
        with pytest.raises(ValueError, match=r"^reward.process_model .*not a process reward model; expected a "
                                             r"token-classification model with 2 labels"):
            load_process_reward_model(d)
    with pytest.raises(ValueError, match=r"reward.process_model .*expected a local model folder"):
        load_process_reward_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model: expected a token-classification model with 2 labels"):
        PRMTrainer(_cfg(tmp_path, "m"), model=tiny_causal_lm(len(tok)), tokenizer=tok,
                   train_records=[StepwiseRecord("p", ["a"], [True])], eval_records=[])
