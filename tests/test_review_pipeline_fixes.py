"""The CLI / evaluation / labelling fixes of the pipeline walk (tests/test_review_pipeline_walk.py),
beyond what that file pins: eval --n at greedy decoding, report --out onto the run's other
files, eval --run with the run's weights and reward-model ensembles, label files written with
side-ordered keys."""

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402

from rlhf_fast import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"


def _main(*argv):
    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return e.code


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny policy and two tiny reward models (different seeds), each with its tokenizer."""
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer

    root = tmp_path_factory.mktemp("fixes")
    tok = train_tokenizer(sample_texts(32), 300)
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for name, build, seed in (("policy", tiny_causal_lm, 0), ("rm", tiny_reward_model, 1),
                              ("rm2", tiny_reward_model, 2)):
        build(len(tok), seed=seed, **kw).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    (root / "rw.py").write_text("def one(prompts, completions):\n    return [1.0 for _ in completions]\n")
    return root


def _rl_run(root, name, overrides, **reward):
    """An RL run folder (config.yaml, final/policy) of the policy of ``root``, reward section
    set from ``reward``."""
    import shutil

    from rlhf_fast.trainers.config import load_config, save_config
    from rlhf_fast.trainers.rl_config import RLConfig

    run = root / name
    cfg = load_config(RLConfig, None, ["--model.policy", str(root / "policy"), "--data.prompts", "the cat,a dog",
                                       "--steps", "1", "--output_dir", str(run), *overrides])
    for k, v in reward.items():
        setattr(cfg.reward, k, v)
    run.mkdir()
    save_config(cfg, str(run / "config.yaml"))
    shutil.copytree(root / "policy", run / "final" / "policy")
    return run


# --------------------------------------------------------------------------- eval --n at greedy

def test_eval_refuses_n_answers_at_greedy_decoding(folders, tmp_path, capsys):
    """--n N > 1 at the default --temperature 0 gives N copies of one answer: pass@N would be pass@1."""
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat"}])
    code = _main("eval", "--policy", str(folders / "policy"), "--prompts", prompts, "--n", "3", "--pass-k", "1,3",
                 "--reward-fn", f"{folders / 'rw.py'}:one")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--n 3" in err[0] and "--temperature" in err[0]
    # sampled, the same command runs
    assert _main("eval", "--policy", str(folders / "policy"), "--prompts", prompts, "--n", "3", "--pass-k", "1,3",
                 "--temperature", "1", "--max-new-tokens", "2", "--reward-fn", f"{folders / 'rw.py'}:one") == 0


def test_eval_refuses_out_equal_to_references(folders, tmp_path, capsys):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat"}])
    refs = _write_jsonl(tmp_path / "refs.jsonl", [{"reference": "a cat"}])
    before = open(refs).read()
    code = _main("eval", "--policy", str(folders / "policy"), "--prompts", prompts, "--references", refs,
                 "--reward-fn", f"{folders / 'rw.py'}:one", "--out", refs)
    assert open(refs).read() == before and code == 2
    assert "--references" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval --run rewards

def test_eval_run_weighs_functions_and_reward_model_as_training(folders, tmp_path):
    """A run with a function (weight 2) and a reward model (weight 0.5): both score, weighted."""
    run = _rl_run(folders, "both", [], functions=[f"{folders / 'rw.py'}:one"], weights=[2.0],
                  reward_model=str(folders / "rm"), reward_model_weight=0.5)
    out = tmp_path / "res.json"
    assert _main("eval", "--run", str(run), "--max-new-tokens", "3", "--out", str(out)) == 0
    res = json.loads(out.read_text())
    assert res["reward/one"] == 1.0 and res["reward/reward_model"] != 0.0
    assert res["reward/mean"] == pytest.approx(2.0 * 1.0 + 0.5 * res["reward/reward_model"], abs=1e-5)


def test_eval_run_combines_an_ensemble_as_training(folders, tmp_path):
    """Two reward models in ensemble mode 'min': one source, the element-wise min of the two."""
    import torch

    from rlhf_fast.algorithms import CombinedReward, RewardModelReward
    from rlhf_fast.models.loading import load_reward_model
    from rlhf_fast.trainers.evaluate import evaluate_policy

    run = _rl_run(folders, "ens", [], functions=[], reward_model=[str(folders / "rm"), str(folders / "rm2")],
                  reward_model_ensemble="min", reward_model_weight=0.5)
    out = tmp_path / "res.json"
    assert _main("eval", "--run", str(run), "--max-new-tokens", "3", "--out", str(out), "--split", "train") == 0
    res = json.loads(out.read_text())
    # the same answers scored by each model alone (greedy: the same answers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folders / "policy"))
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(str(folders / "policy")).eval()
    each = []
    for name in ("rm", "rm2"):
        rm = RewardModelReward(load_reward_model(str(folders / name)),
                               AutoTokenizer.from_pretrained(str(folders / name)))
        with torch.no_grad():
            each.append(evaluate_policy(policy, tok, ["the cat", "a dog"], CombinedReward([rm]), max_new_tokens=3))
    assert res["reward/mean"] == pytest.approx(0.5 * res["reward/reward_model"], abs=1e-5)
    assert res["reward/reward_model"] <= min(e["reward/mean"] for e in each) + 1e-5


# --------------------------------------------------------------------------- report --out

@pytest.fixture
def report_run(tmp_path):
    from rlhf_fast.trainers.config import save_config
    from rlhf_fast.trainers.reward import RewardConfig

    run = tmp_path / "run"
    run.mkdir()
    save_config(RewardConfig(model=TINY, max_steps=2, output_dir=str(run)), str(run / "config.yaml"))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    return run


@pytest.mark.parametrize("target", ["config.yaml", "samples.jsonl", "checkpoints/step_2/report.md", "final/x.md",
                                    "plots/report.md"])
def test_report_refuses_out_onto_run_files(report_run, target, capsys):
    before = {p: p.read_bytes() for p in report_run.rglob("*") if p.is_file()}
    assert _main("report", str(report_run), "--out", str(report_run / target), "--no-plots") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in report_run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("target", [None, "notes.md", "../elsewhere.md"])
def test_report_still_writes_markdown_in_or_beside_the_run(report_run, target):
    argv = ["report", str(report_run), "--no-plots"] + ([] if target is None else ["--out", str(report_run / target)])
    assert _main(*argv) == 0
    written = report_run / (target or "report.md")
    assert written.read_text().startswith("#")


# --------------------------------------------------------------------------- label keys

def test_label_resumes_a_file_written_with_side_ordered_keys(tmp_path):
    """A labels file written before keys were side-free (key = hash of prompt, a, b as shown,
    here shown swapped) still counts its items as labelled."""
    from rlhf_fast.feedback.label import item_key, label_pairs, load_items, read_labels

    pairs = _write_jsonl(tmp_path / "items.jsonl", [{"prompt": f"q{i}", "a": f"A{i}", "b": f"B{i}"} for i in range(4)])
    out = tmp_path / "labels.jsonl"

    def old_key(prompt, a, b):  # the key label.item_key gave before (prompt and responses in the order shown)
        return hashlib.sha256(json.dumps([prompt, a, b], sort_keys=True).encode()).hexdigest()[:16]

    old = [{"item": i, "key": old_key(f"q{i}", f"B{i}", f"A{i}"), "prompt": f"q{i}", "a": f"B{i}", "b": f"A{i}",
            "label": "A", "annotator": "ann"} for i in (0, 2)]
    _write_jsonl(out, old)
    answers = iter(["b\n", "b\n", "q\n"])

    class Quiet:
        def print(self, *a, **k):
            pass

        def rule(self, *a, **k):
            pass

    counts = label_pairs(load_items(pairs), str(out), "ann", read_line=lambda: next(answers), console=Quiet())
    labels = read_labels(str(out))
    assert [r["prompt"] for r in labels] == ["q0", "q2", "q1", "q3"]  # only the two new items were shown
    assert counts["labelled"] == 4 and counts["remaining"] == 0
    assert item_key("q1", "A1", "B1") == item_key("q1", "B1", "A1") == labels[2]["key"]
