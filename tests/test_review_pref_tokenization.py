"""Review of the preference trainers' tokenization and logged epoch against TRL 1.16: a text
response (DPO / CPO / ORPO / SimPO chosen and rejected, TPO's gold reference, a KTO completion
and the KL row that borrows it) is encoded as the continuation of its prompt text — TRL's
``tokenize_fn`` (trl/trainer/dpo_trainer.py, trl/trainer/kto_trainer.py,
trl/experimental/tpo/tpo_trainer.py ``_prepare_dataset``: ``prompt_ids = tok(prompt)``,
``tok(prompt + completion + eos)`` cut after the prompt's ids), called here through TRL's own
``_prepare_dataset`` — not alone, which with a SentencePiece tokenizer trains a prefix space
("▁red") the data does not have; byte-level rows are unchanged. The logged ``epoch`` is
transformers' ``state.epoch`` (epochs done, counted in micro-batches), not the epoch's index."""

import types

import pytest

from rlhf_fast.feedback.formats import PairRecord
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, encode_pair
from rlhf_fast.trainers.kto import BinaryRecord, KTOConfig, KTOTrainer

from .test_review_sft import sp_tok  # noqa: F401  (the SentencePiece-style tokenizer fixture)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=16,num_layers=1,num_heads=2,vocab_size=300"
# prompts ending on a token boundary ("\n", ": "), completions written without a leading space
PAIRS = [("repeat: red blue\n", "red blue", "cat dog"), ("say: cat dog\n", "cat dog", "red"),
         ("repeat: the cat\n", "the cat sat", "blue blue"), ("say: the mat\n", "the mat", "dog sat on")]


@pytest.fixture(scope="module")
def byte_tok():
    """A GPT-2-style byte-level BPE tokenizer (no prefix space), bos prepended."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(32) + [p + c + " " + r for p, c, r in PAIRS] * 4, 300, padding_side="right",
                           add_bos=True)


def _toks(request, kind):
    return request.getfixturevalue("sp_tok" if kind == "sp" else "byte_tok")


def _trl_rows(trainer_cls, rows, tok, **self_attrs):
    """TRL 1.16's own ``_prepare_dataset`` of ``trainer_cls`` (eos added, then its ``tokenize_fn``)
    on a stub, no truncation."""
    from accelerate import PartialState
    from datasets import Dataset

    PartialState()  # accelerate's logger needs it
    block = self_attrs.pop("block", 2)
    fake = types.SimpleNamespace(_tokenizer=tok, **self_attrs)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end",
                                 per_device_train_batch_size=block)
    return list(trainer_cls._prepare_dataset(fake, Dataset.from_list(rows), tok, args, "train"))


def _alone(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("kind", ["sp", "byte"])
def test_text_pair_ids_are_trls(request, kind, tmp_path):
    """encode_pair / DPOTrainer items == TRL DPOTrainer's prompt_ids / chosen_ids / rejected_ids;
    SentencePiece: the response has no "▁" prefix space (alone it would); byte-level: unchanged."""
    pytest.importorskip("trl")
    from trl import DPOTrainer as TRLDPO

    tok = _toks(request, kind)
    ref = _trl_rows(TRLDPO, [dict(prompt=p, chosen=c, rejected=r) for p, c, r in PAIRS], tok)
    for (p, c, r), t in zip(PAIRS, ref):
        ours = encode_pair(tok, p, c, r, None)
        assert ours == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
        alone = (_alone(tok, c), _alone(tok, r))
        assert (ours[1:] == alone) == (kind == "byte")  # SentencePiece alone: "▁red", not "red"
        assert tok.decode(ours[0] + ours[1], skip_special_tokens=True) == p + c
    # a response that already ends with the eos text gets no second eos (TRL's add_eos)
    p, c, r = PAIRS[0]
    t = _trl_rows(TRLDPO, [dict(prompt=p, chosen=c + tok.eos_token, rejected=r)], tok)[0]
    assert encode_pair(tok, p, c + tok.eos_token, r, None) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
    assert t["chosen_ids"].count(tok.eos_token_id) == 1
    # the trainer's items (CPO / ORPO / SimPO share them: the same _encode)
    tr = DPOTrainer(DPOConfig(model=TINY, output_dir=str(tmp_path / "d"), batch_size=2, max_len=64, device="cpu"),
                    train_records=[PairRecord(p, c, r) for p, c, r in PAIRS], eval_records=[], tokenizer=tok)
    assert [(it["prompt"], it["chosen"], it["rejected"]) for it in tr.train_items] == \
           [(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in ref]


@pytest.mark.parametrize("kind", ["sp", "byte"])
def test_tpo_gold_ids_are_trls(request, kind):
    """TPO's text triple (gold ``reference`` too) == TRL TPOTrainer._prepare_dataset's ids."""
    pytest.importorskip("trl")
    from trl.experimental.tpo import TPOTrainer

    from rlhf_fast.trainers.tpo import encode_triple

    tok = _toks(request, kind)
    rows = [dict(prompt=p, chosen=c, rejected=r, reference=c + " " + r) for p, c, r in PAIRS]
    ref = _trl_rows(TPOTrainer, rows, tok, _tokenize=TPOTrainer._tokenize)
    for row, t in zip(rows, ref):
        rec = types.SimpleNamespace(**row)
        assert encode_triple(tok, rec, "tpo") == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"],
                                                  t["reference_ids"])


@pytest.mark.parametrize("kind", ["sp", "byte"])
def test_kto_rows_and_kl_rows_are_trls(request, kind, tmp_path):
    """KTO's rows and KL rows (a prompt with the previous example's completion of its block, as
    encoded after that example's own prompt) == TRL KTOTrainer._prepare_dataset's prompt_ids,
    completion_ids and KL_completion_ids."""
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer as TRLKTO

    tok = _toks(request, kind)
    recs = [BinaryRecord(p, y, i % 2 == 0) for i, (p, c, r) in enumerate(PAIRS) for y in (c, r)]
    tr = KTOTrainer(KTOConfig(model=TINY, output_dir=str(tmp_path / "k"), batch_size=2, grad_accum=2, max_len=64,
                              device="cpu"), train_records=recs, eval_records=[], tokenizer=tok)
    perm = tr.batches._perm  # TRL reads its data in order, KL partners within blocks of its per-device batch
    ref = _trl_rows(TRLKTO, [dict(prompt=recs[i].prompt, completion=recs[i].completion, label=recs[i].label)
                             for i in perm], tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0,
                    block=4)
    for i, t in zip(perm, ref):
        it = tr.train_items[i]
        assert (it["prompt"], it["completion"], it["kl"]) == (t["prompt_ids"], t["completion_ids"],
                                                              t["KL_completion_ids"])
    if kind == "sp":  # the KL row's borrowed completion has no prefix space either
        assert any(tr.train_items[i]["kl"] != _alone(tok, recs[i].completion) for i in range(len(recs)))


def test_chat_prompt_with_text_responses_follows_the_rendered_prompt_text(sp_tok):  # noqa: F811
    """A chat prompt with text responses (TRL 1.16 refuses the mix: list + str): the same rule on
    the prompt rendered by the chat template — rendered text + response + eos encoded whole
    (no special tokens: the template writes its own), cut after the rendered prompt's ids."""
    tok = sp_tok
    old = tok.chat_template
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:\n{% endif %}")
    try:
        prompt = [{"role": "user", "content": "repeat: red blue"}]
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        full = tok(text + "red blue" + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert full[:len(p)] == p
        enc = encode_pair(tok, prompt, "red blue", "red blue", None)
        assert enc == (p, full[len(p):], full[len(p):]) and enc[1] != _alone(tok, "red blue")
    finally:
        tok.chat_template = old


def test_a_token_merging_across_the_boundary_keeps_the_prompt(byte_tok):
    """"the ca" + "t sat" merge (" cat"): TRL cuts the prompt where the encodings part; the
    response is encoded alone instead and the prompt kept (the ids generation conditions on),
    as SFT's continuation_ids does."""
    prompt = "repeat: the ca"
    head, full = byte_tok(prompt)["input_ids"], byte_tok(prompt + "t sat")["input_ids"]
    assert full[:len(head)] != head  # the merge
    p, c, r = encode_pair(byte_tok, prompt, "t sat", " red", None)
    assert p == head
    assert c == _alone(byte_tok, "t sat") and r == byte_tok(prompt + " red" + byte_tok.eos_token)["input_ids"][len(p):]


def _pairs(n):
    return [PairRecord(*PAIRS[i % len(PAIRS)]) for i in range(n)]


def test_dpo_logs_the_epochs_done(tmp_path, byte_tok):
    """transformers' ``state.epoch``: 8 pairs in micro-batches of 2, 2 a step: 0.5, 1.0, 1.5 (the
    0-based epoch index gave 0, 0, 1)."""
    tr = DPOTrainer(DPOConfig(model=TINY, output_dir=str(tmp_path / "d"), batch_size=2, grad_accum=2, max_len=64,
                              max_steps=3, warmup_steps=0, eval_every=0, device="cpu"),
                    train_records=_pairs(8), eval_records=[], tokenizer=byte_tok)
    assert [tr.train_step()["epoch"] for _ in range(3)] == [0.5, 1.0, 1.5]


def test_kto_logs_the_epochs_done_in_micro_batches(tmp_path, byte_tok):
    """10 examples, micro-batches of 2, 2 a step: transformers counts 5 micro-batches an epoch —
    0.4, 0.8, 1.0 (the short last step), 1.4; not steps of 4 (1/3, 2/3, ...)."""
    recs = [BinaryRecord(p, y, i % 2 == 0) for i, (p, c, r) in enumerate(PAIRS + PAIRS[:1]) for y in (c, r)]
    tr = KTOTrainer(KTOConfig(model=TINY, output_dir=str(tmp_path / "k"), batch_size=2, grad_accum=2, max_len=64,
                              max_steps=4, warmup_steps=0, eval_every=0, device="cpu"),
                    train_records=recs, eval_records=[], tokenizer=byte_tok)
    assert len(tr.train_items) == 10
    assert [round(tr.train_step()["epoch"], 6) for _ in range(4)] == [0.4, 0.8, 1.0, 1.4]
