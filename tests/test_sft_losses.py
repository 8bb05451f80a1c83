"""SFT ``completion_only_loss`` and ``loss_type`` against TRL's own SFTTrainer: the rows (ids,
trained tokens, truncation, dropped rows) TRL prepares from the same prompt/completion data,
and TRL's ``compute_loss`` (nll and dft) on the same weights and batch, loss and gradient, for
one micro-batch and for a step split in two with TRL's ``num_items_in_batch``; then the
trainer's DFT step is micro-batch-split invariant, and bad values are refused."""

import copy

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import cli
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, collate, sft_loss_sum, synthetic_sft_records, tokenize_sft

from .test_sft import TINY

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    """The tokenizer of tests/test_sft.py (byte-level BPE on the synthetic task)."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")

MAX_LEN = 9  # short enough that some prompts fill it (dropped when only the completion trains)


@pytest.fixture(scope="module")
def trl_sft(tok, tmp_path_factory):
    """{completion_only_loss: TRL SFTTrainer} on synthetic_sft_records(12) (loss_type dft)."""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    from rlhf_fast.models.tiny import tiny_causal_lm

    ds = Dataset.from_list([{"prompt": r.prompt, "completion": r.completion} for r in synthetic_sft_records(12)])
    out = {}
    for col in (True, False):
        args = TRLConfig(output_dir=str(tmp_path_factory.mktemp("trl")), completion_only_loss=col, loss_type="dft",
                         report_to="none", use_cpu=True, max_length=MAX_LEN)
        model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)
        out[col] = TRLTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    return out


@pytest.mark.parametrize("completion_only", [True, False])
def test_rows_equal_trls_sft_trainer(tok, trl_sft, completion_only):
    rows, dropped = tokenize_sft(synthetic_sft_records(12), tok, MAX_LEN, completion_only_loss=completion_only)
    ref = trl_sft[completion_only].train_dataset
    assert dropped == 12 - len(ref)
    assert (dropped > 0) == completion_only  # the prompt alone fills max_len: nothing left to train
    assert [r["input_ids"] for r in rows] == [list(x) for x in ref["input_ids"]]
    assert [r["response_mask"] for r in rows] == [[int(t != -100) for t in x] for x in ref["labels"]]
    if not completion_only:
        assert all(sum(r["response_mask"]) == len(r["input_ids"]) for r in rows)


def _our_model(trl_trainer):
    m = copy.deepcopy(trl_trainer.model)  # the same weights; its forward without fused_lm_head is the original
    m.train()
    return m


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("completion_only", [True, False])
def test_loss_and_gradient_equal_trls_compute_loss(tok, trl_sft, loss_type, completion_only):
    """One micro-batch: our sum / count == TRL's compute_loss (which divides by the batch's
    label count), and the gradients agree; DFT differs from NLL (so the switch is live)."""
    tt = trl_sft[completion_only]
    tt.args.loss_type = loss_type
    tt.model.train()
    ours = _our_model(tt)
    rows, _ = tokenize_sft(synthetic_sft_records(12), tok, MAX_LEN, completion_only_loss=completion_only)
    batch = collate(rows, tok.pad_token_id)
    inputs = tt.data_collator([tt.train_dataset[i] for i in range(len(tt.train_dataset))])
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    ref = tt.compute_loss(tt.model, dict(inputs))
    s, nll, n = sft_loss_sum(ours, batch, loss_type=loss_type)
    torch.testing.assert_close(s / n, ref, rtol=1e-5, atol=1e-7)
    if loss_type == "dft":
        assert float(s.detach()) < float(nll)  # each NLL weighted by p < 1
    else:
        assert float(s.detach()) == float(nll)
    g_ref = torch.autograd.grad(ref, list(tt.model.parameters()))
    g_ours = torch.autograd.grad(s / n, list(ours.parameters()))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_split_step_equals_trls_num_items_in_batch(tok, trl_sft):
    """A step of two micro-batches: ours divides by the global trained-token count, as TRL does
    when given ``num_items_in_batch``; the summed losses and gradients agree."""
    tt = trl_sft[True]
    tt.args.loss_type = "dft"
    tt.model.train()
    ours = _our_model(tt)
    rows, _ = tokenize_sft(synthetic_sft_records(12), tok, MAX_LEN)
    examples = [tt.train_dataset[i] for i in range(len(tt.train_dataset))]
    halves = [slice(0, 3), slice(3, len(rows))]
    n_total = sum(int((collate(rows[h], 0)["response_mask"][:, 1:]).sum()) for h in halves)
    ref_loss, ours_loss = 0.0, 0.0
    for h in halves:
        ref = tt.compute_loss(tt.model, dict(tt.data_collator(examples[h])), num_items_in_batch=n_total)
        ref.backward()
        s, _, _ = sft_loss_sum(ours, collate(rows[h], tok.pad_token_id), loss_type="dft")
        (s / n_total).backward()
        ref_loss, ours_loss = ref_loss + float(ref), ours_loss + float(s / n_total)
    assert ours_loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(ours.parameters(), tt.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    tt.model.zero_grad(set_to_none=True)


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_steps=4, batch_size=8, lr=3e-3, warmup_steps=0,
                eval_every=0, log_every=1, max_len=48, device="cpu")
    base.update(kw)
    return SFTConfig(**base)


def test_dft_step_does_not_depend_on_the_micro_batch_split(tmp_path, tok):
    """batch 8 in one micro-batch vs 8 micro-batches of 1 row, loss_type dft: the same
    gradient and logged loss (the global count normalises), and "nll" logged beside it."""
    recs = synthetic_sft_records(8, seed=3)
    out = {}
    for name, kw in (("whole", dict(batch_size=8, grad_accum=1)), ("micro1", dict(batch_size=1, grad_accum=8))):
        tr = SFTTrainer(_cfg(tmp_path, name, grad_clip=0.0, loss_type="dft", **kw), train_records=recs,
                        eval_records=[], tokenizer=tok)
        tr.optimizer.step = lambda: None  # keep the gradients, skip the update
        tr.optimizer.zero_grad = lambda set_to_none=True: None
        m = tr.train_step()
        out[name] = (m, torch.cat([p.grad.flatten() for p in tr.model.parameters()]))
        # the logged nll is the NLL of the same rows (what eval_loss measures)
        b = collate(tr.train_rows, tr.pad_id)
        with torch.no_grad():
            s, nll, n = sft_loss_sum(tr.model, b, loss_type="nll")
        assert m["nll"] == pytest.approx(float(nll) / int(n), rel=1e-5) and m["loss"] < m["nll"]
    torch.testing.assert_close(out["micro1"][1], out["whole"][1], rtol=1e-4, atol=1e-7)
    assert out["micro1"][0]["loss"] == pytest.approx(out["whole"][0]["loss"], rel=1e-6)


def test_completion_only_loss_false_equals_cross_entropy_on_every_token(tmp_path, tok):
    tr = SFTTrainer(_cfg(tmp_path, "all", completion_only_loss=False), train_records=synthetic_sft_records(8),
                    eval_records=[], tokenizer=tok)
    batch = collate(tr.train_rows, tr.pad_id)
    s, _, n = sft_loss_sum(tr.model, batch)
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert int(n) == int(batch["attention_mask"][:, 1:].sum())
    torch.testing.assert_close(s / n, ce, rtol=1e-5, atol=1e-6)


def test_bad_values_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"loss_type must be one of \('nll', 'dft'\), got 'kl'"):
        SFTConfig(loss_type="kl")
    with pytest.raises(ValueError, match="completion_only_loss must be true or false, got 1"):
        SFTConfig(completion_only_loss=1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        sft_loss_sum(None, {}, loss_type="mse")
    assert cli.main(["sft", "none", "--loss_type", "focal", "--output_dir", str(tmp_path / "x")]) == 2
    assert "loss_type must be one of ('nll', 'dft'), got 'focal'" in capsys.readouterr().err
