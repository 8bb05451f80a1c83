"""TPO (TRL's experimental ``TPOTrainer``) as ``rlhf-fast dpo`` loss types: a whole trainer step
(loss, gradient, every logged metric) against TRL's own ``TPOTrainer._compute_loss`` on the same
model and token rows, for each loss type and tpo_alpha 0 / 1; the triple records (text and chat,
explicit and implicit prompt) tokenized as TRL's ``_prepare_dataset``; the gold row cut as TRL's
``DataCollatorForTriplePreference``; padding_free / prefix_sharing equal to the padded step;
learning; bad records and configs refused naming the field."""

import os
import types
from collections import defaultdict

import pytest
import torch

from rlhf_fast.feedback.formats import TripleRecord, load_records
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.reward import synthetic_preference_records
from rlhf_fast.trainers.tpo import encode_triple
from tests.test_dpo import _step_grads
from tests.test_reward import preference_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
TRL_NAME = {"tpo": "sigmoid", "tpo_hinge": "hinge", "tpo_ipo": "ipo", "tpo_l": "tpo-l"}
# TRL's metric names -> ours (TRL logs no separate nll; we add it)
METRICS = {"entropy": "entropy", "logits/chosen": "logits/chosen", "logits/rejected": "logits/rejected",
           "mean_token_accuracy": "mean_token_accuracy", "rewards/chosen": "rewards/chosen",
           "rewards/rejected": "rewards/rejected", "rewards/accuracies": "rewards/accuracy",
           "rewards/margins": "rewards/margin", "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected",
           "num_tokens": "num_tokens"}


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def triples(n=64, seed=1):
    """Synthetic pairs with a gold answer: the chosen one with "good" doubled."""
    return [TripleRecord(r.prompt, " " + r.chosen, " " + r.rejected, reference=" good " + r.chosen)
            for r in synthetic_preference_records(n, seed=seed)]


def _trainer(tmp_path, tok, records=None, name="run", eval_records=(), **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=6, lr=3e-3, warmup_steps=2, eval_every=0,
                log_every=1, max_len=48, max_steps=6, device="cpu", grad_clip=0.0, loss_type="tpo", beta=0.5)
    base.update(kw)
    return DPOTrainer(DPOConfig(**base), train_records=triples() if records is None else records,
                      eval_records=list(eval_records),
                      tokenizer=tok)


def _trl_examples(items):
    return [{"prompt_ids": it["prompt"], "chosen_ids": it["chosen"], "rejected_ids": it["rejected"],
             "reference_ids": it.get("gold", [])} for it in items]


def _trl_step(tr, items):
    """TRL's TPOTrainer._compute_loss (trl/experimental/tpo/tpo_trainer.py) on a stub holding the
    settings, its model ``tr.model``, its inputs TRL's own collator of our items: (loss, metrics)."""
    from trl.experimental.tpo.tpo_trainer import DataCollatorForTriplePreference, TPOTrainer

    cfg = tr.cfg
    inputs = DataCollatorForTriplePreference(pad_token_id=tr.pad_id, include_reference=cfg.tpo_alpha != 0)(
        _trl_examples(items))
    acc = types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = types.SimpleNamespace(model=tr.model, accelerator=acc, beta=cfg.beta, loss_type=TRL_NAME[cfg.loss_type],
                                 label_smoothing=cfg.label_smoothing, tpo_alpha=cfg.tpo_alpha,
                                 tpo_l_gamma=cfg.tpo_l_gamma, _metrics={"train": defaultdict(list)},
                                 _total_train_tokens=0, _tp_size=1)
    tr.model.train()  # TRL logs under "train" (dropout is off either way: disable_dropout)
    loss = TPOTrainer._compute_loss(stub, tr.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}, inputs


STEP_CASES = [dict(loss_type="tpo"), dict(loss_type="tpo", label_smoothing=0.2), dict(loss_type="tpo_hinge"),
              dict(loss_type="tpo_ipo", beta=0.3), dict(loss_type="tpo_l", beta=2.0, tpo_l_gamma=0.7),
              dict(loss_type="tpo_l", beta=2.0, label_smoothing=0.1)]


@pytest.mark.parametrize("tpo_alpha", [1.0, 0.0])
@pytest.mark.parametrize("kw", STEP_CASES, ids=["sigmoid", "sigmoid_ls", "hinge", "ipo", "tpo-l", "tpo-l_ls"])
def test_trainer_step_equals_trls(tmp_path, tok, kw, tpo_alpha):
    """Loss, gradient and every metric TRL logs, on the same model and rows; the gold rows are a
    third block of the batch (TRL's layout), and absent at tpo_alpha 0 (TRL skips them)."""
    pytest.importorskip("trl")
    tr = _trainer(tmp_path, tok, tpo_alpha=tpo_alpha, **kw)
    assert tr.reference is None
    items = [tr.train_items[i] for i in tr.batches._perm[:6]]
    batch = tr._batch(items)
    theirs, tm, inputs = _trl_step(tr, items)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :T], inputs["input_ids"])  # the same rows (both right-padded)
    assert batch["input_ids"].shape[0] == (18 if tpo_alpha else 12)
    g_theirs = torch.autograd.grad(theirs, list(tr.model.parameters()))
    m, g_ours = _step_grads(tr)
    assert m["loss"] == pytest.approx(float(theirs.detach()), rel=2e-5)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-6)
    assert set(tm) == set(METRICS)
    for trl_k, ours_k in METRICS.items():
        assert m[ours_k] == pytest.approx(tm[trl_k], rel=1e-4, abs=1e-6), ours_k
    assert ("nll" in m) == (tpo_alpha > 0)


def test_gold_nll_is_the_gold_rows(tmp_path, tok):
    """The NLL term is the gold rows' (not the chosen ones', as CPO's): with a gold answer equal
    to chosen, TPO's tpo_alpha NLL equals CPO's cpo_alpha NLL, and the losses agree."""
    recs = [TripleRecord(r.prompt, r.chosen, r.rejected, reference=r.chosen) for r in triples(24)]
    a = _trainer(tmp_path, tok, recs, "tpo", tpo_alpha=0.7).train_step()
    b = _trainer(tmp_path, tok, recs, "cpo", loss_type="cpo", cpo_alpha=0.7).train_step()
    for k in ("loss", "nll", "rewards/margin", "logps/chosen"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert a["num_tokens"] > b["num_tokens"]  # the gold rows are input tokens too (TRL counts them)


# ------------------------------------------------------------------ records and tokens vs TRL


def _trl_prepare(rows, tok):
    from datasets import Dataset
    from trl.experimental.tpo import TPOTrainer

    fake = types.SimpleNamespace(_tokenize=TPOTrainer._tokenize)
    return list(TPOTrainer._prepare_dataset(fake, Dataset.from_list(rows), tok, types.SimpleNamespace(
        dataset_num_proc=None), "train"))


def _chat_tok():
    from tests.test_pref_formats import CHATML, WORDS
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    t = train_tokenizer(sample_texts(64) + [" ".join(WORDS)] * 8, 400, padding_side="right", add_bos=True)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_text_and_chat_records_tokenize_as_trl(tok):
    """Explicit and implicit prompts, text and conversations: our (prompt, chosen, rejected, gold)
    ids are TRL TPOTrainer._prepare_dataset's (the chat prompt is what all three rows share)."""
    pytest.importorskip("trl")
    text = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected, "reference": r.reference}
            for r in triples(6)]
    implicit = [{"chosen": "describe: red " + w, "rejected": "describe: red dog", "reference": "describe: red " + w
                 + " good"} for w in ("cat", "sun", "mat")]
    chat_tok = _chat_tok()
    chat = [{"prompt": _msgs(("user", f"repeat {w}")), "chosen": _msgs(("assistant", w)),
             "rejected": _msgs(("assistant", "no")), "reference": _msgs(("assistant", w + " " + w))}
            for w in ("red", "blue green", "cat")]
    chat_implicit = [{"chosen": _msgs(("user", "hi"), ("assistant", "one")),
                      "rejected": _msgs(("user", "hi"), ("assistant", "two")),
                      "reference": _msgs(("user", "hi"), ("assistant", "three"))}]
    for rows, t in ((text, tok), (implicit, tok), (chat, chat_tok), (chat_implicit, chat_tok)):
        ref = _trl_prepare(rows, t)
        for rec, r in zip(load_records(rows, "pairs", triples=True), ref):
            assert isinstance(rec, TripleRecord)
            got = encode_triple(t, rec, "tpo")
            assert got == (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], r["reference_ids"])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncated_rows_equal_trls_collator(tmp_path, tok, mode):
    """max_len cuts each row (the gold one too) as TRL's DataCollatorForTriplePreference does."""
    pytest.importorskip("trl")
    from trl.experimental.tpo.tpo_trainer import DataCollatorForTriplePreference

    recs = triples(12)
    full = _trainer(tmp_path, tok, recs, "full", max_len=200)
    cut = _trainer(tmp_path, tok, recs, "cut", max_len=14, truncation_mode=mode)
    assert len(cut.train_items) == len(full.train_items) == 12
    assert any(len(it["prompt"]) + len(it["gold"]) > 14 for it in full.train_items)  # the cut really cuts
    trl = DataCollatorForTriplePreference(pad_token_id=cut.pad_id, max_length=14, truncation_mode=mode)(
        _trl_examples(full.train_items))
    ours = cut._batch(cut.train_items)
    T = trl["input_ids"].shape[1]
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(ours[k][:, :T], trl[k]), k
    assert torch.equal(ours["response_mask"][:, :T] * ours["attention_mask"][:, :T], trl["completion_mask"])


def test_balanced_truncation_keeps_the_pair_rows(tmp_path, tok):
    """Our default truncation: the chosen / rejected rows as DPO's; the gold row by the same rule
    on its own, within max_len."""
    recs = triples(12)
    tpo = _trainer(tmp_path, tok, recs, "tpo", max_len=14)
    cpo = _trainer(tmp_path, tok, recs, "cpo", max_len=14, loss_type="cpo")
    for a, b in zip(tpo.train_items, cpo.train_items):
        assert (a["prompt"], a["chosen"], a["rejected"]) == (b["prompt"], b["chosen"], b["rejected"])
        assert len(a.get("gold_prompt", a["prompt"])) + len(a["gold"]) <= 14 and a["gold"]


# ------------------------------------------------------------------ packing, learning


def test_padding_free_and_prefix_sharing_equal_padded(tmp_path, tok, monkeypatch):
    """The gold rows in one packed row (padding_free), or sharing each pair's prompt with its
    chosen and rejected rows (prefix_sharing: groups of three rows): the padded step's loss,
    gradients and metrics up to float rounding."""
    from rlhf_fast.models import logprobs

    groups, real = [], logprobs.pack_shared_targets
    monkeypatch.setattr(logprobs, "pack_shared_targets", lambda *a: groups.append(a[3]) or real(*a))
    recs = triples(12)
    base_m, base_g = _step_grads(_trainer(tmp_path, tok, recs, "pad", loss_type="tpo_l", beta=2.0))
    for kw in (dict(padding_free=True), dict(prefix_sharing=True)):
        m, g = _step_grads(_trainer(tmp_path, tok, recs, next(iter(kw)), loss_type="tpo_l", beta=2.0, **kw))
        for k in ("loss", "nll", "rewards/margin", "entropy", "logits/chosen", "mean_token_accuracy", "num_tokens"):
            assert m[k] == pytest.approx(base_m[k], rel=1e-4, abs=1e-6), (kw, k)
        for a, b in zip(g, base_g):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # each pair's chosen, rejected and gold rows share one prompt in the packed row
    assert groups and torch.equal(groups[0], torch.tensor([[i, 6 + i, 12 + i] for i in range(6)]))


def test_training_lowers_the_loss_and_the_gold_nll(tmp_path, tok):
    tr = _trainer(tmp_path, tok, triples(96), max_steps=30, batch_size=16, lr=5e-3, beta=0.5)
    first = tr.train_step()
    for _ in range(28):
        tr.train_step()
    last = tr.train_step()
    assert last["loss"] < 0.8 * first["loss"], (first["loss"], last["loss"])
    assert last["nll"] < first["nll"] and last["rewards/margin"] > first["rewards/margin"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_resume_is_exact_with_eval(tmp_path, tok):
    """LoRA adapters train on the three rows; an interrupted run resumed from its checkpoint ends
    with the weights and metrics (eval ones too: eval_nll is the gold rows') of one that was not."""
    pytest.importorskip("peft")
    from tests.test_trainer_common import untimed_metrics

    recs = triples(24)

    def run(name, stop):
        kw = dict(max_steps=4, save_every=2, batch_size=4, lora={"r": 4}, loss_type="tpo_ipo", tpo_alpha=0.5)
        t = _trainer(tmp_path, tok, recs, name, recs[:4], **kw)
        if stop < 4:
            while t.step < stop:
                t.train_step()
            t._save()
            t = _trainer(tmp_path, tok, recs, name, recs[:4], **kw)
        t.train()
        return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}, \
            untimed_metrics(str(tmp_path / name))

    full, log_full = run("full", 4)
    resumed, log_res = run("resumed", 2)
    assert full and all(torch.equal(full[n], resumed[n]) for n in full)
    late = [m for m in log_full if m["step"] > 2]
    assert late == [m for m in log_res if m["step"] > 2] and "eval_nll" in late[-1]


# ------------------------------------------------------------------ refusals


def test_missing_or_bad_reference_refused(tmp_path, tok):
    recs = triples(8)
    recs[3] = synthetic_preference_records(8, seed=2)[3]  # a plain pair: no gold answer
    with pytest.raises(ValueError, match=r"pair 3 .*needs a `reference`"):
        _trainer(tmp_path, tok, recs)
    _trainer(tmp_path, tok, recs, "cpo", loss_type="cpo")  # other losses ignore a gold answer
    for row, needle in (({"prompt": "p", "chosen": "a", "rejected": "b", "reference": 3}, "reference: expected text"),
                        ({"prompt": "p", "chosen": "a", "rejected": "b", "reference": ""}, "reference: empty"),
                        ({"prompt": "p", "chosen": "a", "rejected": "b", "reference": _msgs(("assistant", "x"))},
                         "reference: expected text as chosen is"),
                        ({"chosen": "say a", "rejected": "say b", "reference": "do c"},
                         "reference: does not start with the implicit prompt")):
        with pytest.raises(ValueError, match=needle):
            load_records([row], "pairs", triples=True)
        # without triples (every command but TPO) the key is another column, ignored as before
        assert type(load_records([row], "pairs")[0]).__name__ == "PairRecord"
    assert type(load_records([{"prompt": "p", "chosen": "a", "rejected": "b"}], "pairs", triples=True)[0]).__name__ \
        == "PairRecord"


def test_config_errors_name_the_field(tmp_path):
    for kw, needle in ((dict(loss_type="tpo", tpo_alpha=-1.0), "tpo_alpha must be"),
                       (dict(loss_type="tpo", tpo_alpha=float("nan")), "tpo_alpha must be a finite number"),
                       (dict(loss_type="cpo", tpo_alpha=0.5), "tpo_alpha applies to loss_type"),
                       (dict(loss_type="simpo", tpo_l_gamma=0.2), "tpo_l_gamma applies to loss_type"),
                       (dict(loss_type="tpo", tpo_l_gamma=0.2), "tpo_l_gamma applies to loss_type 'tpo_l' only"),
                       (dict(loss_type="tpo", cpo_alpha=0.0), "cpo_alpha must be left unset"),
                       (dict(loss_type="tpo_l", simpo_gamma=0.1), "simpo_gamma must be left unset"),
                       (dict(loss_type="tpo_hinge", label_smoothing=0.1), "label_smoothing"),
                       (dict(loss_type="tpo_ipo", rpo_alpha=0.5), "rpo_alpha must be left unset.*tpo_alpha"),
                       (dict(loss_type="tpo", ref_model="x"), "ref_model must be left unset"),
                       (dict(loss_type="tpo", alpha=0.3), "alpha"),
                       (dict(loss_type=["tpo", "sft"]), "must be used alone"),
                       (dict(loss_type="tpo", data_kind="rankings"), "data_kind must be 'pairs'"),
                       (dict(loss_type="tpo-l"), "loss_type must be one of")):
        with pytest.raises(ValueError, match=needle):
            DPOConfig(output_dir=str(tmp_path / "x"), **kw)


def test_yaml_config_runs_through_the_dpo_command(tmp_path, tok):
    """`rlhf-fast dpo tpo.yaml` reads the TPO keys (the CLI is DPO's) and a JSONL of triples."""
    import json

    from rlhf_fast.trainers.config import load_config

    data = tmp_path / "triples.jsonl"
    data.write_text("".join(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected,
                                        "reference": r.reference}) + "\n" for r in triples(16)))
    y = tmp_path / "tpo.yaml"
    y.write_text(f"model: '{TINY}'\ndata: {data}\noutput_dir: {tmp_path / 'run'}\nloss_type: tpo_l\nbeta: 2.0\n"
                 "tpo_alpha: 0.5\ntpo_l_gamma: 0.4\nmax_steps: 2\nbatch_size: 4\ndevice: cpu\neval_fraction: 0\n")
    cfg = load_config(DPOConfig, str(y))
    assert (cfg.loss_type, cfg.tpo_alpha, cfg.tpo_l_gamma, cfg.nll_weight) == ("tpo_l", 0.5, 0.4, 0.5)
    m = DPOTrainer(cfg, tokenizer=tok).train()
    assert m["nll"] > 0
