"""Review of the README's pipeline as a new user walks it (sft -> feedback -> reward -> RL ->
eval / generate / report): each test here pinned a defect found on the walk and failed before
its fix (auto_annotator_weights ignored for rankings; eval splits that leaked items; dedup false
refusing repeats; label_smoothing ignored for rankings / scores; generate / eval / report writing
over their inputs or the run's files; eval --run ignoring the run's reward models; LoRA runs
naming their base by a relative path; adapters without a local base tracing back; the reference's
reward mean counting unscored answers; label resumes relabelling items shown swapped)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402

from rlhf_fast import cli  # noqa: E402
from rlhf_fast.feedback.formats import PairRecord, RankingRecord  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
WORDS = "the cat dog sat on mat big small red blue runs one two three yes no".split()


class _Stop(Exception):
    """Raised by a spy once it has seen what the test needs (no model is then built)."""


def _items(n):
    """n distinct (prompt, good, fine, bad) items, deterministic."""
    out = []
    for i in range(n):
        w = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(6)]
        out.append((f"describe {i}: " + " ".join(w[:2]), " ".join(w[2:5]) + " good",
                    " ".join(w[1:4]) + " fine", " ".join(w[3:6]) + f" bad {i}"))
    return out


def _rankings(n):
    """Each item ranked by three annotators; carol mostly reverses the order (a noisy labeller)."""
    out = []
    for i, (p, good, fine, bad) in enumerate(_items(n)):
        for ann in ("alice", "bob", "carol"):
            flip = ann == "carol" and i % 5 != 0
            out.append(RankingRecord(p, [good, fine, bad], [2, 1, 0] if flip else [0, 1, 2], ann))
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- noise handling

def test_auto_annotator_weights_apply_to_rankings(tmp_path):
    """The same three annotators' labels as rankings (Plackett-Luce) and as their implied pairs
    (rankings_as_pairs): auto_annotator_weights should down-weight carol, who mostly reverses
    the others' order, in both. It does for the pairs; for rankings the weights map stays empty."""
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer

    recs = _rankings(10)
    common = dict(model=TINY, data_kind="rankings", auto_annotator_weights=True, max_steps=1, batch_size=4,
                  eval_every=0, warmup_steps=0)
    as_pairs = RewardTrainer(RewardConfig(output_dir=str(tmp_path / "p"), rankings_as_pairs=True, **common),
                             train_records=recs, eval_records=[])
    assert as_pairs.weights["carol"] < as_pairs.weights["alice"]  # the pairs path derives the weights
    pl = RewardTrainer(RewardConfig(output_dir=str(tmp_path / "r"), **common), train_records=recs,
                       eval_records=[])
    assert pl.weights.get("carol", 1.0) < pl.weights.get("alice", 1.0)


# --------------------------------------------------------------------------- eval split

def _pairs_rows(n):
    """n items, each labelled by three annotators (the same pair three times): the input of the
    noise handling (auto_annotator_weights, agreement)."""
    rows = []
    for p, good, _, bad in _items(n):
        for ann in ("alice", "bob", "carol"):
            rows.append({"prompt": p, "chosen": good, "rejected": bad, "annotator": ann})
    return rows


def _split_of(monkeypatch, module, build):
    """(train, eval) records the trainer of ``module`` gets from its load_split_records."""
    seen = {}
    real = module.load_split_records

    def spy(*a, **kw):
        seen["split"] = real(*a, **kw)
        raise _Stop

    monkeypatch.setattr(module, "load_split_records", spy)
    with pytest.raises(_Stop):
        build()
    return seen["split"]


def test_reward_eval_fraction_holds_out_whole_items(tmp_path, monkeypatch):
    from rlhf_fast.trainers import reward

    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs_rows(20))
    cfg = reward.RewardConfig(model=TINY, data=data, eval_fraction=0.2, output_dir=str(tmp_path / "rm"))
    train, ev = _split_of(monkeypatch, reward, lambda: reward.RewardTrainer(cfg))
    assert ev, "some records are held out"
    # an item, whoever labelled it
    key = lambda r: (r.prompt, frozenset((r.chosen, r.rejected)))  # noqa: E731
    seen_in_training = {key(r) for r in train}
    assert not [r for r in ev if key(r) in seen_in_training]


def test_dpo_rankings_eval_fraction_holds_out_whole_rankings(tmp_path, monkeypatch):
    from rlhf_fast.trainers import dpo

    rows = [{"prompt": p, "responses": [good, fine, bad], "ranking": [0, 1, 2]}
            for p, good, fine, bad in _items(20)]
    data = _write_jsonl(tmp_path / "rankings.jsonl", rows)
    cfg = dpo.DPOConfig(model=TINY, data=data, data_kind="rankings", eval_fraction=0.2,
                        output_dir=str(tmp_path / "d"))
    train, ev = _split_of(monkeypatch, dpo, lambda: dpo.DPOTrainer(cfg))
    assert ev and all(isinstance(r, PairRecord) for r in ev)
    train_prompts = {r.prompt for r in train}
    assert not [r for r in ev if r.prompt in train_prompts]


# --------------------------------------------------------------------------- lost work

def _main(*argv):
    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama and its tokenizer saved to a folder (what `rlhf-fast sft` leaves in final/)."""
    from tests.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("walk") / "model")


def test_generate_refuses_out_equal_to_prompts(saved_model, tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}, {"prompt": "one two"}])
    before = open(prompts).read()
    code = _main("generate", "--model", saved_model, "--prompts", prompts, "--out", prompts,
                 "--max_new_tokens", "2")
    assert open(prompts).read() == before, "the prompts file was overwritten"
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_eval_refuses_out_equal_to_prompts(saved_model, tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}, {"prompt": "one two"}])
    before = open(prompts).read()
    code = _main("eval", "--policy", saved_model, "--prompts", prompts, "--max-new-tokens", "2",
                 "--reward-fn",
                 "rlhf_fast.algorithms.rule_rewards:letter_a_fraction", "--out", prompts)
    assert open(prompts).read() == before, "the prompts file was overwritten"
    assert code == 2


def test_report_refuses_out_onto_the_runs_own_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    from rlhf_fast.trainers.config import save_config
    from rlhf_fast.trainers.reward import RewardConfig

    save_config(RewardConfig(model=TINY, max_steps=2, output_dir=str(run)), str(run / "config.yaml"))
    metrics = '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    (run / "metrics.jsonl").write_text(metrics)
    code = _main("report", str(run), "--out", str(run / "metrics.jsonl"), "--no-plots")
    assert (run / "metrics.jsonl").read_text() == metrics, "the run's metrics were overwritten by the report"
    assert code == 2


# --------------------------------------------------------------------------- messages

def test_labels_file_of_ties_is_not_called_empty(tmp_path, capsys):
    rows = [{"item": i, "key": f"k{i}", "prompt": f"p {i}", "a": "x y", "b": "y z", "label": "tie",
             "annotator": "judge:m"} for i in range(4)]
    data = _write_jsonl(tmp_path / "labels.jsonl", rows)
    code = _main("reward", "none", "--model", TINY, "--data", data, "--data_kind", "labels",
                 "--max_steps", "1",
                 "--output_dir", str(tmp_path / "rm"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "empty" not in err[0] and ("tie" in err[0] or "A or B" in err[0] or "A/B" in err[0])


# --------------------------------------------------------------------------- eval --run

@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """An RL run folder as `rlhf-fast ppo --reward.reward_model RM` leaves it (the README's walk:
    PPO against the trained reward model, no reward function): config.yaml, final/policy."""
    import shutil

    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer
    from rlhf_fast.trainers.config import load_config, save_config
    from rlhf_fast.trainers.rl_config import RLConfig

    root = tmp_path_factory.mktemp("rm_run")
    tok = train_tokenizer(sample_texts(32), 300)
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
    for name, build in (("policy", tiny_causal_lm), ("rm", tiny_reward_model)):
        build(len(tok), **kw).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    run = root / "run"
    cfg = load_config(RLConfig, None, ["--model.policy", str(root / "policy"), "--reward.reward_model",
                                       str(root / "rm"), "--data.prompts", "the cat,a dog", "--steps", "1",
                                       "--output_dir", str(run)])
    cfg.reward.functions = []
    run.mkdir()
    save_config(cfg, str(run / "config.yaml"))
    shutil.copytree(root / "policy", run / "final" / "policy")
    return root, run


def test_eval_run_scores_with_the_runs_reward_model(rm_run, tmp_path, capsys):
    root, run = rm_run
    out = tmp_path / "res.json"
    code = _main("eval", "--run", str(run), "--max-new-tokens", "3", "--out", str(out))
    assert code == 0, capsys.readouterr().err
    assert "reward/reward_model" in json.loads(out.read_text())


# --------------------------------------------------------------------------- LoRA folders

def test_lora_final_names_its_base_by_an_absolute_path(saved_model, tmp_path, monkeypatch):
    import shutil

    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

    shutil.copytree(saved_model, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    SFTTrainer(SFTConfig(model="base", lora={"r": 2}, max_steps=1, batch_size=2, eval_every=0, warmup_steps=0,
                         output_dir="sft_lora")).train()
    adapter_cfg = json.loads((tmp_path / "sft_lora" / "final" / "adapter_config.json").read_text())
    base = adapter_cfg["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.samefile(base, tmp_path / "base")


def test_generate_adapter_without_local_base_is_one_line(saved_model, tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_model),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = "runs/sft/final"  # relative: not here
    peft_model.save_pretrained(str(adapter))
    AutoTokenizer.from_pretrained(saved_model).save_pretrained(str(adapter))  # as sft's final/ holds it
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}])
    capsys.readouterr()
    try:
        code = _main("generate", "--model", str(adapter), "--prompts", prompts,
                     "--out", str(tmp_path / "o.jsonl"),
                     "--max_new_tokens", "2")
    except Exception as e:  # what the console script shows as a traceback, exit 1
        code = f"traceback: {type(e).__name__}"
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- dedup

def test_dedup_false_keeps_repeated_records(tmp_path, monkeypatch):
    from rlhf_fast.trainers import reward

    rows = _pairs_rows(4)[::3]  # one label per item
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows + rows[:1])  # the first pair given twice
    cfg = reward.RewardConfig(model=TINY, data=data, dedup=False, eval_fraction=0.0,
                              output_dir=str(tmp_path / "rm"))
    train, ev = _split_of(monkeypatch, reward, lambda: reward.RewardTrainer(cfg))
    assert len(train) + len(ev) == len(rows) + 1


# --------------------------------------------------------------------------- eval with TRL rewards

def _every_other(prompts, completions, **kw):
    """A TRL reward function that applies to half of the prompts (None elsewhere)."""
    return [1.0 if p.endswith("cat") else None for p in prompts]


def test_eval_reference_reward_mean_skips_unscored_answers_as_the_policys():
    import torch

    from rlhf_fast.algorithms import CallableReward, CombinedReward
    from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer
    from rlhf_fast.trainers.evaluate import evaluate_policy

    tok = train_tokenizer(sample_texts(), 256)
    tok.padding_side = "left"
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).eval()
    reward = CombinedReward([CallableReward(_every_other, convention="trl")], convention="trl")
    with torch.no_grad():
        res = evaluate_policy(model, tok, ["the cat", "a dog", "one cat", "two dogs"], reward,
                              reference=model,
                              max_new_tokens=2)
    assert res["reward/mean"] == pytest.approx(1.0)
    # the same model, the same answers
    assert res["reference/reward_mean"] == pytest.approx(res["reward/mean"])


# --------------------------------------------------------------------------- label resume

def test_label_resume_does_not_relabel_items_shown_swapped(tmp_path, monkeypatch, capsys):
    import io
    import sys

    from rlhf_fast.feedback.label import read_labels

    pairs = _write_jsonl(tmp_path / "items.jsonl",
                         [{"prompt": f"q{i}", "a": f"ans A{i}", "b": f"ans B{i}"} for i in range(12)])
    out = str(tmp_path / "labels.jsonl")

    def session(extra, answers):
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(a + "\n" for a in answers)))
        return cli.main(["label", pairs, "--out", out, "--annotator", "ann", *extra])

    assert session(["--shuffle-sides"], ["a"] * 12 + ["q"]) == 0  # every item labelled
    assert session([], ["a"] * 12 + ["q"]) == 0  # the same annotator comes back, without the flag
    labels = read_labels(out)
    assert len(labels) == 12, f"{len(labels) - 12} items labelled twice"


# --------------------------------------------------------------------------- label smoothing

@pytest.mark.parametrize("kind", ["rankings", "scores"])
def test_label_smoothing_is_applied_or_refused(tmp_path, kind):
    import torch

    from rlhf_fast.feedback.formats import ScoreRecord
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer

    recs = _rankings(4) if kind == "rankings" else [ScoreRecord(p, g, 1.0) for p, g, _, _ in _items(8)]
    losses = []
    for eps in (0.0, 0.3):
        try:
            cfg = RewardConfig(model=TINY, data_kind=kind, label_smoothing=eps, max_steps=1, batch_size=4,
                               eval_every=0,
                               warmup_steps=0, output_dir=str(tmp_path / f"rm{eps}"))
        except ValueError as e:  # a refusal naming the key is a fix too
            assert "label_smoothing" in str(e)
            return
        tr = RewardTrainer(cfg, train_records=recs, eval_records=[])
        with torch.no_grad():
            losses.append(float(tr.loss(tr.train_items)))
    assert losses[0] != losses[1]
