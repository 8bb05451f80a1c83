"""SFT ``num_train_epochs`` (max_steps from the training rows, logged steps, exact resume) and
``disable_dropout`` (off by default: dropout stays on; on: the training forward is the eval one)."""

import os

import pytest
import torch

from rlhf_fast.feedback.formats import SFTRecord
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, collate, synthetic_sft_records

from .test_sft import TINY

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    """The tokenizer of tests/test_sft.py (byte-level BPE on the synthetic task)."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_steps=1000, batch_size=4, lr=3e-3, warmup_steps=1,
                eval_every=0, log_every=1, max_len=16, device="cpu")
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.parametrize("epochs, batch_size, grad_accum, steps", [(2, 10, 1, 4), (1.5, 4, 2, 5)])
def test_num_train_epochs_sets_the_logged_steps(tmp_path, tok, epochs, batch_size, grad_accum, steps):
    """20 training rows (a 21st record is dropped: its prompt fills max_len, and it must not
    count): ceil(epochs x ceil(ceil(20 / batch_size) / grad_accum)) optimizer steps (transformers':
    an epoch's last step takes the micro-batches left, 5 batches of 4 at 2 a step are 3 steps) are
    logged, the LR schedule ends there, and config.yaml records them."""
    recs = synthetic_sft_records(20) + [SFTRecord("one two three " * 10, "one")]
    cfg = _cfg(tmp_path, "run", num_train_epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
               lr_schedule="linear")
    tr = SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=tok)
    assert len(tr.train_rows) == 20 and tr.dropped == 1 and cfg.max_steps == steps
    tr.train()
    logged = read_metrics(cfg.output_dir)
    assert [m["step"] for m in logged] == list(range(1, steps + 1))
    assert tr.scheduler.get_last_lr()[0] == 0.0  # the linear schedule decays over exactly these steps
    assert logged[-1]["lr"] > 0  # the LR the last step trained with (logged before the scheduler's step)
    text = open(os.path.join(cfg.output_dir, "config.yaml")).read()
    assert f"max_steps: {steps}\n" in text and f"num_train_epochs: {epochs}" in text
    if epochs == 2:  # two whole passes: the second epoch's permutation is used up, no third begun
        assert tr.batches.state() == {"epoch": 1, "pos": 20}


def test_num_train_epochs_run_resumes_exactly(tmp_path, tok):
    """An epochs run stopped at step 3 and resumed (max_steps recomputed from the epochs)
    equals the uninterrupted one: weights and logged losses."""
    recs = synthetic_sft_records(16)

    def run(name, stop_at=None):
        c = _cfg(tmp_path, name, num_train_epochs=1.5, save_every=3)
        t = SFTTrainer(c, train_records=recs, eval_records=[], tokenizer=tok)
        assert c.max_steps == 6
        if stop_at:
            while t.step < stop_at:
                t.train_step()
            t._save()
            t = SFTTrainer(_cfg(tmp_path, name, num_train_epochs=1.5, save_every=3), train_records=recs,
                           eval_records=[], tokenizer=tok)
        t.train()
        return t, read_metrics(c.output_dir)

    full, m_full = run("full")
    resumed, m_res = run("resumed", stop_at=3)
    assert resumed.step == 6 and [m["step"] for m in m_res] == [4, 5, 6]  # (steps 1-3 ran unlogged)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [m["loss"] for m in m_full if m["step"] > 3] == [m["loss"] for m in m_res]


def dropout_model(tok, p: float = 0.5):
    """A tiny Llama for ``tok`` whose attention keeps dropout ``p`` (the tiny models have none)."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)
    model.config.attention_dropout = p
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = p
    return model


@pytest.mark.parametrize("disable", [False, True])
def test_disable_dropout(tmp_path, tok, disable):
    tr = SFTTrainer(_cfg(tmp_path, f"d{disable}", max_steps=1, disable_dropout=disable),
                    train_records=synthetic_sft_records(8), eval_records=[], model=dropout_model(tok), tokenizer=tok)
    b = collate(tr.train_rows, tr.pad_id)

    def logits(train):
        tr.model.train(train)
        with torch.no_grad():
            return tr.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    ref = logits(False)
    same = torch.equal(logits(True), ref) and torch.equal(logits(True), ref)
    assert same == disable  # default: the model's dropout is left on, as TRL's SFT does
    with pytest.raises(ValueError, match="disable_dropout must be true or false"):
        SFTConfig(disable_dropout="no")
    with pytest.raises(ValueError, match="num_train_epochs must be null or a finite number > 0"):
        SFTConfig(num_train_epochs=0)
    from rlhf_fast.trainers.config import load_config

    c = load_config(SFTConfig, None, ["--num_train_epochs", "1.5", "--disable_dropout", "true"])
    assert (c.num_train_epochs, c.disable_dropout) == (1.5, True)
