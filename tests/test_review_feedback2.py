"""Second review of the feedback stage (labels, agreement, noise-aware losses, AI judges,
rankings -> pairs). Each test pins one defect the review found, since fixed."""

import json
import math

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.feedback import PairRecord, RankingRecord, agreement_stats, rankings_to_pairs
from rlhf_fast.feedback.judge import HTTPBackend, JudgeConfig
from rlhf_fast.feedback.losses import plackett_luce_loss


@pytest.mark.parametrize("ranking", [[0, 0, 1], [0, 1, 3], [1, -1, 1]])
def test_plackett_luce_refuses_a_ranking_that_is_not_a_permutation(ranking):
    # [0, 0, 1] silently gave 2.86 (response 0 ranked twice, response 2 never); [0, 1, 3] failed
    # inside torch.gather with an index error that names no argument
    s = torch.tensor([[1.0, 2.0, 0.5]])
    with pytest.raises(ValueError, match="ranking"):
        plackett_luce_loss(s, torch.tensor([ranking]))


def _reply(content, first_token, top):
    return {"choices": [{"message": {"content": content}, "logprobs": {"content": [
        {"token": first_token, "logprob": top.get(first_token, -0.01),
         "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}]}}]}


def test_http_judge_uses_logprobs_only_when_the_answer_starts_with_the_verdict():
    backend = HTTPBackend(JudgeConfig(cache=None, base_url="http://127.0.0.1:9/v1"))
    # the judge answered "Response B": its first token is "Response"; "A" and "B" are unlikely
    # alternatives of that token (0.6% vs 0.2%), not the judge's verdict — which is B
    backend._post = lambda body: _reply("Response B", "Response", {
        "Response": -0.01, "A": math.log(0.006), "B": math.log(0.002)})
    assert backend.prefer_first("x") == 0.0  # was 0.75: A preferred
    # a verdict token keeps the soft probability
    backend._post = lambda body: _reply("B", "B", {"B": math.log(0.7), "A": math.log(0.3)})
    assert backend.prefer_first("x") == pytest.approx(0.3)


def test_judge_cli_labels_a_repeated_item_once(tmp_path, monkeypatch, capsys):
    # as `rlhf-fast label` does (one item, one label per annotator): the same pair listed twice,
    # once with its sides swapped, is one item; three records of one judge on it would count as
    # three agreeing labels in agreement_stats (lowering the flip-rate estimate)
    def prefer_first(self, text):
        return 1.0 if "good" in text.split("Response A:")[1].split("Response B:")[0] else 0.0

    monkeypatch.setattr(HTTPBackend, "prefer_first", prefer_first)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"prompt": "q", "a": "good", "b": "bad"}, {"prompt": "q", "a": "bad", "b": "good"},
            {"prompt": "q", "a": "good", "b": "bad"}, {"prompt": "r", "a": "good", "b": "bad"}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["judge", str(inp), "--out", str(out), "--model", "m", "--cache", "none"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["label"]) for r in recs] == [("q", "A"), ("r", "A")]
    assert len({r["key"] for r in recs}) == 2
    assert "judged 2 items" in capsys.readouterr().err
    # scores likewise: one score per (prompt, response)
    monkeypatch.setattr(HTTPBackend, "score", lambda self, text: 7.0)
    s_in, s_out = tmp_path / "s.jsonl", tmp_path / "scores.jsonl"
    s_in.write_text("".join(json.dumps({"prompt": "q", "response": r}) + "\n" for r in ("x", "y", "x")))
    common = ["--model", "m", "--cache", "none"]
    assert cli.main(["judge", str(s_in), "--out", str(s_out), "--mode", "scores"] + common) == 0
    assert [json.loads(line)["response"] for line in s_out.read_text().splitlines()] == ["x", "y"]


def test_agreement_treats_a_chat_prompt_with_reordered_keys_as_one_item():
    # record_item_key (the train/eval split) calls these one item; agreement saw two items and
    # measured nothing
    p1 = [{"role": "user", "content": "hi"}]
    p2 = [{"content": "hi", "role": "user"}]
    s = agreement_stats([PairRecord(p1, "a", "b", annotator="x"), PairRecord(p2, "b", "a", annotator="y")])
    assert (s.n_items, s.n_label_pairs, s.agreement) == (1, 1, 0.0)
    assert s.per_annotator["x"]["compared"] == 1


def test_local_judge_score_of_a_judge_sure_of_ten_is_ten():
    from rlhf_fast.feedback.judge import LocalBackend
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    # digits tokenized one by one (Llama-2, Mistral, Qwen2 and our tiny tokenizer): " 1" is a
    # prefix of " 10", so P(" 1") — the log-prob of its tokens — holds all of P(" 10")
    tok = train_tokenizer(sample_texts(8) + ["Score: 10", "Score: 1"], 300, padding_side="right")
    ids = {c: tok(c, add_special_tokens=False)["input_ids"] for c in (" 1", " 10")}
    assert ids[" 10"][:len(ids[" 1"])] == ids[" 1"]
    backend = LocalBackend(None, tok)
    # a judge that answers " 10" with probability 1: the tokens of " 1" then "0" are certain
    backend._continuation_logps = lambda text, conts: [0.0 if c in (" 1", " 10") else -50.0 for c in conts]
    assert backend.score("Score:") == pytest.approx(10.0)  # was 5.5: half the mass read as a 1


def test_agreement_of_conversational_pairs_is_measured():
    # TRL's conversational pairs (responses as message lists) load as PairRecords; agreement_stats
    # sorted the two responses and raised "TypeError: '<' not supported between dict and dict"
    good = [{"role": "assistant", "content": "good"}]
    bad = [{"role": "assistant", "content": "bad"}]
    s = agreement_stats([PairRecord("p", good, bad, annotator="x"), PairRecord("p", good, bad, annotator="y"),
                         PairRecord("p", bad, good, annotator="z")])
    assert (s.n_items, s.n_label_pairs) == (1, 3) and s.agreement == pytest.approx(1 / 3)
    assert s.per_annotator["x"]["agreement"] == 0.5 and s.per_annotator["z"]["agreement"] == 0.0


@pytest.mark.parametrize("ranking", [[1, 0, -1], [0, 0, 1], [0, 5, 1]])
def test_rankings_to_pairs_refuses_a_ranking_that_is_not_a_permutation(ranking):
    # [1, 0, -1] (plackett_luce_loss's padding) made responses[-1], "c", the worst of all three;
    # [0, 0, 1] gave the pair (a, b) twice; [0, 5, 1] an IndexError naming nothing
    with pytest.raises(ValueError, match="ranking"):
        rankings_to_pairs([RankingRecord("p", ["a", "b", "c"], ranking)])
