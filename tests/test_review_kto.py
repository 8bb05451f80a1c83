"""Review of the KTO trainer against TRL 1.16's ``KTOTrainer``: the row cut of ``truncation_mode``
(``keep_start`` is TRL's fixed cut, prompts that fill ``max_len`` dropped; ``keep_end`` DPO's),
BinaryRecord labels that are not bools (text "false" trained as desirable), clear errors from the
public loss functions, and two docs/from_trl.md statements (KTO's logged metrics, its epoch count)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_fast.trainers.kto import BinaryRecord, KTOConfig, kl_partners, kto_kl, kto_loss
from tests.test_kto import _trainer, _trl_prepared, tok  # noqa: F401  (tok: the module's tokenizer fixture)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread_per_module")

WORDS = "the cat dog sat on mat big small red blue runs one two three yes no good".split()


def _long_records(n=12):
    """Prompts of 3-17 tokens and completions of 2-9: at max_len 12 some prompts fill the row,
    some rows lose the completion's tail, and balanced would cut some prompts."""
    return [BinaryRecord("describe: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + (5 * i) % 15)),
                         " " + " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(1 + i % 8)), i % 3 != 1)
            for i in range(n)]


def test_keep_start_rows_and_kl_rows_are_trls(tmp_path, tok):  # noqa: F811
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    max_len, recs = 12, _long_records()
    tr = _trainer(tmp_path, tok, records=recs, batch_size=2, grad_accum=2, max_len=max_len,
                  truncation_mode="keep_start")
    # TRL drops the examples whose prompt alone fills max_length, before it builds the KL rows
    kept = [r for r in recs if len(list(tok(r.prompt)["input_ids"])) < max_len]
    assert 0 < len(kept) < len(recs) and len(tr.train_items) == len(kept) and tr.dropped == len(recs) - len(kept)
    perm = tr.batches._perm
    rows = _trl_prepared([kept[i] for i in perm], 4, max_len, tok=tok)  # TRL reads its data in order
    assert len(rows) == len(kept)
    collator = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id, max_length=max_len)
    for s in range(0, len(perm), 4):
        idx = tr.batches.next()
        items = [tr.train_items[i] for i in idx]
        theirs = collator([{k: rows[s + j][k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")}
                           for j in range(len(idx))])
        for key, ours in (("", tr._batch(items)), ("KL_", tr._batch(items, "kl"))):
            assert torch.equal(ours["input_ids"], theirs[key + "input_ids"])
            assert torch.equal(ours["response_mask"], theirs[key + "completion_mask"])
    # the default (balanced) cuts some of these prompts: it is not TRL's cut
    bal = _trainer(tmp_path, tok, "bal", records=recs, batch_size=2, grad_accum=2, max_len=max_len)
    assert len(bal.train_items) == len(recs) and bal.dropped == 0


def test_keep_end_rows_keep_their_last_max_len_tokens(tmp_path, tok):  # noqa: F811
    max_len, recs = 12, _long_records()
    tr = _trainer(tmp_path, tok, records=recs, batch_size=2, grad_accum=2, max_len=max_len,
                  truncation_mode="keep_end", precompute_ref_logps=True, eval_records=recs[:5])
    assert len(tr.train_items) == len(recs)  # nothing dropped: the completion's end is kept
    full_c = [list(tok(r.completion, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id] for r in recs]
    prompts = [list(tok(r.prompt)["input_ids"]) for r in recs]
    partner = kl_partners(tr.batches._perm, 4)
    cut_some = False
    for i, it in enumerate(tr.train_items):
        row = it["prompt"] + it["completion"]
        assert row == (prompts[i] + full_c[i])[-max_len:]
        kl_row = tr._batch([it], "kl")["input_ids"][0].tolist()
        assert kl_row == (prompts[i] + full_c[partner[i]])[-max_len:]
        cut_some |= len(prompts[i]) + len(full_c[partner[i]]) > max_len
    assert cut_some
    m = tr.train_step()  # the precomputed reference log-probs line up with the rows
    assert torch.isfinite(torch.tensor(m["loss"])) and m["kl"] >= 0
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        KTOConfig(output_dir=str(tmp_path / "x"), truncation_mode="left")


def test_loss_functions_name_a_non_tensor_input():
    z = torch.zeros(3)
    d = torch.tensor([True, False, True])
    for args, needle in (((z.tolist(), z, d), "logps"), ((z, None, d), "ref_logps"), ((z, z, [1, 0, 1]), "desirable")):
        with pytest.raises(TypeError, match=needle):
            kto_loss(*args, 0.0, beta=0.1)
    for args, needle in (((z.tolist(), z), "kl_logps"), ((z, None), "ref_kl_logps")):
        with pytest.raises(TypeError, match=needle):
            kto_kl(*args)


def test_docs_do_not_claim_kto_logs_reward_accuracy(tmp_path, tok):  # noqa: F811
    text = (ROOT / "docs" / "from_trl.md").read_text()
    para = text[text.index("Logged metrics. The offline trainers"):text.index("### SFTTrainer / SFTConfig")]
    sentence = " ".join(para[para.index("Two names differ"):].split())
    m = _trainer(tmp_path, tok, max_steps=1).train_step()
    assert "rewards/accuracy" not in m and "rewards/margin" in m
    # the sentence names KTO beside rewards/margin only
    assert "KTO log TRL's `rewards/accuracies`" not in sentence and "KTO" in sentence


def test_record_labels_must_be_bools(tmp_path, tok):  # noqa: F811
    from rlhf_fast.trainers.kto import to_binary

    ok = [BinaryRecord(f"describe: {w}", f" good {w}", lab) for w, lab in (("cat", True), ("dog", False))]
    read = to_binary(ok + [BinaryRecord("p", "c", lab) for lab in (1, 0, np.True_, torch.tensor(False))])
    assert [r.label for r in read] == [True, False, True, False, True, False]  # read as the bools they equal
    assert all(type(r.label) is bool for r in read)
    for bad in ("false", "true", None, 0.5, 2, np.array([True, False])):
        with pytest.raises(TypeError, match=r"records\[2\]\.label must be"):
            to_binary(ok + [BinaryRecord("describe: sun", " no", bad)])
    with pytest.raises(TypeError, match=r"label must be"):  # the trainer's own records, not only the loader's
        _trainer(tmp_path, tok, records=ok * 2 + [BinaryRecord("describe: sun", " no", "false")])


def test_docs_num_train_epochs_row_counts_kto_steps(tmp_path, tok):  # noqa: F811
    """KTO's steps are whole step batches of batch_size × grad_accum examples, never across an
    epoch's end (transformers' count too: ceil(3 batches / 2) = 2 steps an epoch): 10 examples
    at 4 × 2 are steps of 8 and 2, so 2 epochs are 4 steps, where the row's ceil(2 × 3 / 2) is 3."""
    recs = [BinaryRecord(f"describe: {w}", f" good {i}", i % 2 == 0)
            for i, w in enumerate("cat dog sun mat one two red big sky sea".split())]
    tr = _trainer(tmp_path, tok, records=recs, batch_size=4, grad_accum=2, num_train_epochs=2)
    assert tr.cfg.max_steps == 4
    row = next(line for line in (ROOT / "docs" / "from_trl.md").read_text().splitlines()
               if line.startswith("| `num_train_epochs` | `num_train_epochs` |"))
    assert "ceil(epochs × ceil(examples / (`batch_size` × `grad_accum`)))" in row
