"""``rlhf-fast eval --reward-model``: a trained reward model scores the policy's answers with the
encoding it was trained on (prompt, response, eos; score at the eos), and ``--references`` adds
BLEU / ROUGE of the answers."""

import json

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.trainers import evaluate


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer

    root = tmp_path_factory.mktemp("eval_rm")
    tok = train_tokenizer(sample_texts(32), 300)
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
    tiny_causal_lm(len(tok), **kw).save_pretrained(str(root / "policy"))
    tok.save_pretrained(str(root / "policy"))
    tiny_reward_model(len(tok), seed=3, **kw).save_pretrained(str(root / "rm"))
    tok.save_pretrained(str(root / "rm"))
    (root / "prompts.txt").write_text("the cat\na dog\n")
    (root / "refs.jsonl").write_text(json.dumps({"reference": "sat on the mat"}) + "\n"
                                     + json.dumps({"references": ["runs fast", "is big"]}) + "\n")
    return root, tok


def test_eval_scores_with_the_reward_trainer_encoding(folders, tmp_path, monkeypatch):
    from rlhf_fast.models.loading import load_reward_model, reward_scores
    from rlhf_fast.feedback.formats import pad_right
    from rlhf_fast.trainers.reward import _encode

    root, tok = folders
    seen = {}
    real = evaluate.evaluate_policy

    def spy(policy, tokenizer, prompts, reward, **kw):
        seen["reward"], seen["kw"] = reward, kw
        return real(policy, tokenizer, prompts, reward, **kw)

    monkeypatch.setattr(evaluate, "evaluate_policy", spy)
    out = tmp_path / "res.json"
    assert cli.main(["eval", "--policy", str(root / "policy"), "--prompts", str(root / "prompts.txt"),
                     "--reward-model", str(root / "rm"), "--references", str(root / "refs.jsonl"),
                     "--max-new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for k in ("overlap/bleu", "overlap/rouge1", "overlap/rouge2", "overlap/rougeL"):
        assert k in res and res[k] >= 0.0
    assert seen["kw"]["references"] == [["sat on the mat"], ["runs fast", "is big"]]

    # the reward source scores (prompt, response) exactly as RewardTrainer encodes a training pair
    prompts, responses = ["the cat", "a dog"], [" sat on the mat", " runs"]
    rm = load_reward_model(str(root / "rm")).eval()
    ids, attn = pad_right([_encode(tok, p, r, 1024) for p, r in zip(prompts, responses)], tok.pad_token_id)
    with torch.no_grad():
        expected = reward_scores(rm, ids, attn).tolist()
    got = seen["reward"](prompts, responses).total.tolist()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_references_must_match_the_prompts(folders, tmp_path, capsys):
    root, _ = folders
    (tmp_path / "one.txt").write_text("only one\n")
    assert cli.main(["eval", "--policy", str(root / "policy"), "--prompts", str(root / "prompts.txt"),
                     "--reward-model", str(root / "rm"), "--references", str(tmp_path / "one.txt")]) == 2
    assert "1 references for 2 prompts" in capsys.readouterr().err


def test_overlap_of_n_answers_per_prompt(folders):
    """With n answers per prompt every answer is compared with its own prompt's references."""
    from transformers import AutoModelForCausalLM

    root, tok = folders
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(str(root / "policy")).eval()
    texts = {}

    def reward(prompts, completions):
        texts["p"], texts["c"] = list(prompts), list(completions)
        return [0.0] * len(completions)

    refs = ["sat on the mat", "runs fast"]
    res = evaluate.evaluate_policy(policy, tok, ["the cat", "a dog"], reward, max_new_tokens=4, temperature=1.0, n=3,
                                   references=refs)
    assert texts["p"] == ["the cat"] * 3 + ["a dog"] * 3
    want = evaluate.overlap_metrics(texts["c"], [refs[0]] * 3 + [refs[1]] * 3)
    assert {k[len("overlap/"):]: v for k, v in res.items() if k.startswith("overlap/")} == want


def test_pass_at_k_is_the_unbiased_estimate():
    correct = torch.tensor([[True, False, False, False],   # c = 1 of n = 4
                            [True, True, True, True],      # c = 4
                            [False, False, False, False]])  # c = 0
    # k = 1: c/n; k = 2: 1 - C(3,2)/C(4,2) = 0.5 for the first prompt
    assert evaluate.pass_at_k(correct, 1) == pytest.approx((0.25 + 1 + 0) / 3)
    assert evaluate.pass_at_k(correct, 2) == pytest.approx((0.5 + 1 + 0) / 3)
    assert evaluate.pass_at_k(correct, 4) == pytest.approx((1 + 1 + 0) / 3)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n=4\]"):
        evaluate.pass_at_k(correct, 5)


def test_eval_passes_prompt_fields_and_reports_pass_at_k(folders, tmp_path, capsys):
    root, tok = folders
    recs = [{"prompt": "the cat", "answer": "yes"}, {"prompt": [{"role": "user", "content": "a dog"}], "answer": "no"},
            {"prompt": "the dog", "answer": "yes"}]
    path = tmp_path / "recs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "rw.py").write_text(
        "def by_answer(prompts, completions, answer):\n"
        "    return [1.0 if a == 'yes' else 0.0 for a in answer]\n")
    out = tmp_path / "res.json"
    assert cli.main(["eval", "--policy", str(root / "policy"), "--prompts", str(path),
                     "--reward-fn", f"{tmp_path / 'rw.py'}:by_answer", "--n", "3", "--temperature", "1",
                     "--pass-k", "1,3", "--max-new-tokens", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    # the reward reads each answer's own prompt's field: 2 of 3 prompts are always right
    assert res["pass@1"] == pytest.approx(2 / 3) and res["pass@3"] == pytest.approx(2 / 3)
    assert res["reward/mean"] == pytest.approx(2 / 3)
    assert cli.main(["eval", "--policy", str(root / "policy"), "--prompts", str(path),
                     "--reward-fn", f"{tmp_path / 'rw.py'}:by_answer", "--n", "2", "--pass-k", "4"]) == 2
    assert "--pass-k values must be ints in [1, --n=2]" in capsys.readouterr().err
