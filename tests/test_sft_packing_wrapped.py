"""SFT ``packing_strategy: wrapped`` and ``eval_packing`` against TRL 1.16: ``pack_wrapped`` equals
``trl.pack_dataset(..., strategy="wrapped")`` (ids and labels, across its 1000-row map batches);
the trainer's train and eval rows equal TRL SFTTrainer's prepared datasets for prompt/completion
and text records; the training loss on the wrapped chunks is the cross-entropy of the model on TRL's
collated batch (all-ones attention mask, default positions: attention crosses documents);
``eval_packing`` follows ``packing`` unless set, and under bfd gives the same eval loss packed or
not (the packed path checked to run); the config refuses bad values."""

import copy
import random

import pytest
import torch

from rlhf_fast.feedback.formats import TextRecord
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, collate, sft_loss_sum, synthetic_sft_records
from rlhf_fast.trainers.sft_data import pack_wrapped
from tests.test_sft_losses import tok  # noqa: F401  (fixture: the tokenizer of the synthetic task)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
MAX_LEN = 16  # shorter than two documents: chunks cut documents and hold several


def _labels(row):
    return [t if m else -100 for t, m in zip(row["input_ids"], row["response_mask"])]


def _model(tok):
    from rlhf_fast.models.tiny import tiny_causal_lm

    torch.manual_seed(0)
    return tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)


def _ours(tmp_path, tok, train, evals, name="run", **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_len=MAX_LEN, batch_size=4, max_steps=1,
                warmup_steps=0, eval_every=0, log_every=1, device="cpu", packing=True, packing_strategy="wrapped")
    base.update(kw)
    return SFTTrainer(SFTConfig(**base), train_records=train, eval_records=evals, tokenizer=copy.deepcopy(tok),
                      model=_model(tok))


def _trl(tmp_path, tok, train, evals, **kw):
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=MAX_LEN,
                     packing=True, packing_strategy="wrapped", **kw)
    return TRLTrainer(model=_model(tok), args=args, train_dataset=Dataset.from_list(train),
                      eval_dataset=Dataset.from_list(evals), processing_class=copy.deepcopy(tok))


def test_pack_wrapped_equals_trl_pack_dataset():
    """ids and labels of every chunk, for 2100 documents (three of TRL's 1000-row map batches,
    each ending in a short chunk), a length that divides nothing, and the empty set."""
    from datasets import Dataset
    from trl import pack_dataset

    rng = random.Random(0)
    rows = []
    for _ in range(2100):
        n = rng.randint(1, 9)
        rows.append({"input_ids": [rng.randrange(300) for _ in range(n)],
                     "response_mask": [rng.randint(0, 1) for _ in range(n)]})
    for L in (7, 64):
        ref = pack_dataset(Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                              "labels": [_labels(r) for r in rows]}), L, strategy="wrapped")
        ours = pack_wrapped(rows, L)
        assert [r["input_ids"] for r in ours] == ref["input_ids"]
        assert [_labels(r) for r in ours] == ref["labels"]
        assert sum(len(r["input_ids"]) < L for r in ours) == 3  # the end of each map batch
    assert pack_wrapped([], 7) == []
    with pytest.raises(ValueError, match="seq_length must be a positive int"):
        pack_wrapped(rows, 0)


@pytest.mark.parametrize("form", ["prompt_completion", "text"])
def test_trainer_rows_equal_trl_sft_trainer(tmp_path, tok, form):
    """Train rows, and eval rows packed (eval_packing null follows packing) or not, equal the
    input_ids / labels of TRL SFTTrainer's train_dataset / eval_dataset (packing=True,
    packing_strategy="wrapped", its default shuffle_dataset=False)."""
    recs = synthetic_sft_records(14, seed=3)
    if form == "text":
        recs = [TextRecord(r.prompt + r.completion) for r in recs]
        rows = [{"text": r.text} for r in recs]
    else:
        rows = [{"prompt": r.prompt, "completion": r.completion} for r in recs]
    train, evals = recs[:10], recs[10:]
    evals_rows = {}
    for eval_packing in (None, False):
        trl = _trl(tmp_path, tok, rows[:10], rows[10:], eval_packing=eval_packing)
        ours = _ours(tmp_path, tok, train, evals, name=f"run{eval_packing}", eval_packing=eval_packing)
        for mine, ref in ((ours.train_rows, trl.train_dataset), (ours.eval_rows, trl.eval_dataset)):
            assert [r["input_ids"] for r in mine] == [list(x) for x in ref["input_ids"]]
            assert [_labels(r) for r in mine] == [list(x) for x in ref["labels"]]
        assert len(ours.train_rows) == -(-sum(len(r) for r in trl.train_dataset["input_ids"]) // MAX_LEN)
        assert all(len(r["input_ids"]) == MAX_LEN for r in ours.train_rows[:-1])
        evals_rows[eval_packing] = [r["input_ids"] for r in ours.eval_rows]
    assert evals_rows[None] != evals_rows[False]  # chunks across documents vs one (cut) row per document


def test_wrapped_loss_is_cross_entropy_on_trls_collated_rows(tmp_path, tok):
    """The loss of a step over every chunk == the model's own cross-entropy (TRL's compute_loss)
    on TRL's DataCollatorForLanguageModeling batch of its wrapped rows: all-ones attention
    mask, no position ids, so each chunk is one causal sequence across its documents: the same
    tokens scored one document per row give another loss."""
    recs = synthetic_sft_records(10, seed=4)
    rows = [{"prompt": r.prompt, "completion": r.completion} for r in recs]
    trl = _trl(tmp_path, tok, rows, rows[:2])
    n = len(trl.train_dataset)
    batch = trl.data_collator([trl.train_dataset[i] for i in range(n)])
    assert "position_ids" not in batch and bool(batch["attention_mask"][:-1].all())
    model = _model(tok)
    with torch.no_grad():
        ref = model(**batch).loss
    ours = _ours(tmp_path, tok, recs, [], batch_size=n)
    assert len(ours.train_rows) == n
    # documents inside a chunk see the ones before them: scored one document per row (each
    # chunk split after every eos), the same tokens get another loss
    docs = []
    for r in ours.train_rows:
        ids, mk = r["input_ids"], r["response_mask"]
        cut = [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t == tok.eos_token_id] + [len(ids)]
        docs += [{"input_ids": ids[a:z], "response_mask": mk[a:z]} for a, z in zip(cut, cut[1:])]
    with torch.no_grad():
        s, _, cnt = sft_loss_sum(ours.model, collate(ours.train_rows, ours.pad_id))
        s2, _, c2 = sft_loss_sum(ours.model, collate(docs, ours.pad_id))
    assert int(c2) == int(cnt) and len(docs) > n  # the same trained tokens (each prompt starts untrained)
    assert abs(float(s2 / c2) - float(s / cnt)) > 1e-4
    m = ours.train_step()  # the step's loss, before its update
    torch.testing.assert_close(torch.tensor(m["loss"]), ref.float(), rtol=1e-5, atol=1e-6)
    assert m["tokens"] == int((batch["labels"][:, 1:] != -100).sum())


def test_eval_packing_follows_packing_and_bfd_keeps_the_eval_loss(tmp_path, tok, monkeypatch):
    """eval_packing null packs the eval set when packing does (TRL's rule), true / false override
    it; under bfd the eval loss is the same packed or not, and the packed forward really runs."""
    import rlhf_fast.models.logprobs as lp

    recs = synthetic_sft_records(20, seed=5)
    calls = []
    real = lp._pack
    monkeypatch.setattr(lp, "_pack", lambda *a: calls.append(1) or real(*a))
    losses = {}
    for packing, eval_packing, packed in ((False, None, False), (True, None, True), (True, False, False),
                                          (False, True, True)):
        tr = _ours(tmp_path, tok, recs[:8], recs[8:], name=f"e{packing}{eval_packing}", packing=packing,
                   packing_strategy="bfd", eval_packing=eval_packing, max_len=48, batch_size=5)
        calls.clear()
        losses[(packing, eval_packing)] = tr.evaluate()["eval_loss"]
        assert bool(calls) == packed, (packing, eval_packing)
        assert len(tr.eval_rows) == 12  # bfd packs at the forward: the rows stay one per document
    ref = losses[(False, None)]
    for v in losses.values():
        assert v == pytest.approx(ref, rel=1e-5)


def test_wrapped_eval_packing_without_train_packing(tmp_path, tok):
    """packing false with eval_packing true and strategy wrapped: documents train, the eval set is chunks."""
    recs = synthetic_sft_records(16, seed=6)
    tr = _ours(tmp_path, tok, recs[:8], recs[8:], packing=False, eval_packing=True)
    assert len(tr.train_rows) == 8 and len(tr.eval_rows) < 8
    assert all(len(r["input_ids"]) == MAX_LEN for r in tr.eval_rows[:-1])
    assert tr._packed == {"train": False, "eval": False}
    assert tr.evaluate()["eval_tokens"] > 0


def test_config_values_and_errors():
    assert SFTConfig().packs("train") is None and SFTConfig().packs("eval") is None  # the defaults pack nothing
    assert SFTConfig(packing=True).packs("eval") == "bfd"
    assert SFTConfig(packing=True, eval_packing=False).packs("eval") is None
    assert SFTConfig(eval_packing=True, packing_strategy="wrapped").packs("eval") == "wrapped"
    assert SFTConfig(eval_packing=True, packing_strategy="wrapped").packs("train") is None
    with pytest.raises(ValueError, match=r"packing_strategy must be one of \('bfd', 'wrapped'\), got 'bfd_split'"):
        SFTConfig(packing=True, packing_strategy="bfd_split")
    with pytest.raises(ValueError, match="eval_packing must be true, false or null"):
        SFTConfig(eval_packing="yes")
    with pytest.raises(ValueError, match="packing must be true or false"):
        SFTConfig(packing="wrapped")
    with pytest.raises(ValueError, match="truncation_mode 'keep_end' has no effect with packing_strategy 'wrapped'"):
        SFTConfig(packing=True, packing_strategy="wrapped", truncation_mode="keep_end")
    SFTConfig(packing_strategy="wrapped", truncation_mode="keep_end")  # nothing packed: keep_end still cuts rows
