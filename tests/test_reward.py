"""Reward trainer: held-out accuracy on a hidden-rule preference (clean and 20% flipped with
label smoothing), rankings (Plackett-Luce) and scores (regression), save_pretrained reload,
annotator weights, CLI."""

import json
import random

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.feedback.formats import PairRecord, RankingRecord, ScoreRecord
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"


# tiny models: one thread is far faster than two on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def preference_tokenizer():
    """A 300-token BPE tokenizer trained on sample texts and the synthetic preference pairs (the
    reward, DPO and KTO tests share it)."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    recs = synthetic_preference_records(200, seed=5)
    return train_tokenizer(sample_texts(64) + [r.prompt + " " + r.chosen + " " + r.rejected for r in recs], 300,
                           padding_side="right")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=16, lr=3e-3, warmup_steps=3, eval_every=0,
                log_every=10, max_len=64)
    base.update(kw)
    return RewardConfig(**base)


def test_pairs_clean_and_noisy(tmp_path, tok):
    held_out = synthetic_preference_records(64, seed=2)  # clean labels
    tr = RewardTrainer(_cfg(tmp_path, "clean", max_steps=25), train_records=synthetic_preference_records(400, seed=1),
                       eval_records=held_out, tokenizer=tok)
    acc0 = tr.evaluate()["eval_accuracy"]
    m = tr.train()
    assert m["eval_accuracy"] >= 0.9, (acc0, m)

    noisy = synthetic_preference_records(400, seed=3, flip=0.2)
    tr = RewardTrainer(_cfg(tmp_path, "noisy", max_steps=32, label_smoothing=0.2), train_records=noisy,
                       eval_records=held_out, tokenizer=tok)
    m = tr.train()
    assert m["eval_accuracy"] >= 0.8, m

    # the saved model reloads with AutoModelForSequenceClassification and scores the same
    from transformers import AutoModelForSequenceClassification

    from rlhf_fast.models.loading import reward_scores
    from rlhf_fast.feedback.formats import pad_right
    from rlhf_fast.trainers.reward import _encode

    re = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "noisy" / "final")).eval()
    seqs = [_encode(tok, r.prompt, r.chosen, 64) for r in held_out[:4]]
    ids, attn = pad_right(seqs, tok.pad_token_id)
    with torch.no_grad():
        hf = re(input_ids=ids, attention_mask=attn).logits[:, 0]
        ours = reward_scores(tr.model.eval(), ids, attn)
    torch.testing.assert_close(hf, ours, rtol=1e-4, atol=1e-5)


def _ranking_records(n, seed):
    rng = random.Random(seed)
    words = "the cat dog sat on mat red blue one two".split()
    out = []
    for _ in range(n):
        resp, counts = [], []
        for c in rng.sample(range(3), 3):  # 0, 1 or 2 "good" words: more is better
            w = [rng.choice(words) for _ in range(rng.randint(3, 6))]
            for _ in range(c):
                w.insert(rng.randint(0, len(w)), "good")
            resp.append(" ".join(w))
            counts.append(c)
        out.append(RankingRecord("rank: " + rng.choice(words), resp, sorted(range(3), key=lambda i: -counts[i])))
    return out


def test_rankings_and_scores(tmp_path, tok):
    tr = RewardTrainer(_cfg(tmp_path, "rank", max_steps=16, data_kind="rankings", batch_size=8),
                       train_records=_ranking_records(160, 1), eval_records=_ranking_records(40, 2), tokenizer=tok)
    before = tr.evaluate()
    after = tr.train()
    assert after["eval_loss"] < before["eval_loss"] and after["eval_accuracy"] >= 0.75, (before, after)

    def scores(n, seed):
        return [ScoreRecord(r.prompt, t, float(r.ranking.index(i) == 0) * 2.0 - float(r.ranking.index(i) == 2) * 2.0)
                for r in _ranking_records(n, seed) for i, t in enumerate(r.responses)]

    tr = RewardTrainer(_cfg(tmp_path, "score", max_steps=16, data_kind="scores"), train_records=scores(100, 3),
                       eval_records=scores(20, 4), tokenizer=tok)
    before = tr.evaluate()
    after = tr.train()
    assert after["eval_loss"] < before["eval_loss"] and after["eval_pearson"] > 0.5, (before, after)
    assert "eval_spearman" in after


def test_annotator_weights_and_config_errors(tmp_path, tok):
    recs = [PairRecord("p", "good one", "bad one", annotator=a) for a in ("u", "v", "w")]
    recs += [PairRecord("p", "bad one", "good one", annotator="x")]
    recs += [PairRecord("q", "good two", "bad two", annotator=a) for a in ("u", "v", "w", "x")]
    tr = RewardTrainer(_cfg(tmp_path, "w", max_steps=1, auto_annotator_weights=True, annotator_weights={"w": 0.5}),
                       train_records=recs, eval_records=[], tokenizer=tok)
    assert tr.weights["w"] == 0.5 and tr.weights["u"] > tr.weights["x"]
    assert [it["weight"] for it in tr.train_items[:4]] == [tr.weights[a] for a in ("u", "v", "w", "x")]
    # activation checkpointing: on the reward model's layers, the same loss as without it
    losses = []
    for name, ckpt in (("plain", False), ("ckpt", True)):
        t = RewardTrainer(_cfg(tmp_path, name, max_steps=1, gradient_checkpointing=ckpt), train_records=recs,
                          eval_records=[], tokenizer=tok)
        assert any(getattr(m, "gradient_checkpointing", False) for m in t.model.modules()) == ckpt
        losses.append(t.train_step()["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for kw, needle in ((dict(label_smoothing=0.5), "label_smoothing"), (dict(data_kind="votes"), "data_kind"),
                       (dict(annotator_weights={"a": -1.0}), "annotator_weights"),
                       (dict(grad_clip=-1.0), "grad_clip"), (dict(lr_schedule="step"), "lr_schedule"),
                       (dict(batch_size=0), "batch_size"), (dict(gradient_checkpointing="yes"), "gradient_checkpointing")):
        with pytest.raises(ValueError, match=needle):
            _cfg(tmp_path, "x", **kw)


def test_cli(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
                            for r in synthetic_preference_records(20, seed=7)))
    cfg = tmp_path / "reward.yaml"
    cfg.write_text(f"model: '{TINY}'\ndata: {data}\nmax_steps: 2\nbatch_size: 4\n")
    assert cli.main(["reward", str(cfg), "--output_dir", str(tmp_path / "out"), "--label_smoothing", "0.1"]) == 0
    assert "eval_accuracy" in capsys.readouterr().out
    log = read_metrics(str(tmp_path / "out"))
    # a fresh run into that folder is refused; resuming it (the default) runs to the new max_steps
    assert cli.main(["reward", str(cfg), "--output_dir", str(tmp_path / "out"), "--resume", "false"]) == 2
    assert "out already holds a run (checkpoints, final, metrics.jsonl)" in capsys.readouterr().err
    assert cli.main(["reward", str(cfg), "--output_dir", str(tmp_path / "out"), "--max_steps", "3"]) == 0
    resumed = read_metrics(str(tmp_path / "out"))
    assert resumed[:len(log)] == log and resumed[-1]["step"] == 3 and len(resumed) > len(log)
    capsys.readouterr()
    assert cli.main(["reward", str(cfg), "--label_smoothing", "0.7"]) == 2
    assert "label_smoothing must be in [0, 0.5)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    assert cli.main(["reward", str(cfg), "--data", str(bad)]) == 2
    assert "1 problem(s)" in capsys.readouterr().err


def test_from_causal_lm_folder_and_label_files(tmp_path, tok, capsys):
    """The usual pipeline: the RM starts from a saved (SFT) causal LM and trains on label files."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    lm = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id)
    lm.save_pretrained(str(tmp_path / "sft"))
    tok.save_pretrained(str(tmp_path / "sft"))
    labels = tmp_path / "labels.jsonl"
    rows = []
    for i, r in enumerate(synthetic_preference_records(12, seed=9)):
        a, b, lab = (r.chosen, r.rejected, "A") if i % 2 else (r.rejected, r.chosen, "B")
        rows.append({"item": i, "key": str(i), "prompt": r.prompt, "a": a, "b": b, "label": lab, "annotator": "h"})
    rows.append({"item": 99, "key": "t", "prompt": "p", "a": "x", "b": "y", "label": "tie", "annotator": "h"})
    labels.write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert cli.main(["reward", "none", "--model", str(tmp_path / "sft"), "--data", str(labels), "--data_kind", "labels",
                     "--max_steps", "2", "--batch_size", "4", "--output_dir", str(tmp_path / "rm")]) == 0
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm" / "final"))
    assert rm.config.num_labels == 1
    cfg = RewardConfig(model=str(tmp_path / "sft"), data=str(labels), data_kind="labels", output_dir=str(tmp_path / "rm2"))
    tr = RewardTrainer(cfg)
    assert len(tr.train_items) + len(tr.eval_items) == 12  # the tie carries no preference
    # the backbone is the saved causal LM's
    torch.testing.assert_close(tr.model.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_eval_loss_is_the_weighted_mean_whatever_the_batch_size(tmp_path, tok):
    """Annotator weights: eval_loss is Σ w·loss / Σ w over all held-out items, as the training
    loss; it does not change with the evaluation batch size (chunks of unequal weight)."""
    recs = synthetic_preference_records(12, seed=4)
    for i, r in enumerate(recs):
        r.annotator = "careful" if i % 3 else "noisy"
    tr = RewardTrainer(_cfg(tmp_path, "wl", max_steps=1, annotator_weights={"careful": 1.0, "noisy": 0.1}),
                       train_records=recs[:4], eval_records=recs, tokenizer=tok)
    tr.model.eval()
    with torch.no_grad():
        scores = tr._scores(tr.eval_items)
        per = [tr.loss([it], [s]).item() for it, s in zip(tr.eval_items, scores)]
    w = [it["weight"] for it in tr.eval_items]
    assert sorted(set(w)) == [0.1, 1.0]
    expected = sum(wi * li for wi, li in zip(w, per)) / sum(w)
    for bs in (1, 5, 64):
        tr.cfg.batch_size = bs
        assert tr.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5), bs
