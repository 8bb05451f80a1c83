"""DPO ``truncation_mode`` / ``max_prompt_length`` / ``max_completion_length``: the rows of a
truncated pair against TRL 1.16's ``DataCollatorForPreference`` (``keep_start`` / ``keep_end``,
called on the same untruncated ids) and, for conversational pairs, against TRL's whole
``DPOTrainer._prepare_dataset`` + collator (its drop of over-long prompts included); TRL 0.x's
prompt / completion caps transcribed; the default ``balanced`` mode unchanged; a training step
on keep_end rows (whose two rows keep different prompt tokens); config errors."""

import random

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord, load_records
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, collate_pairs, encode_pair, truncate_pair
from tests.test_pref_formats import _trl_prepare, conv_rows
from tests.test_pref_formats import tok as chat_tok  # noqa: F401  (the ChatML tokenizer fixture)
from tests.test_reward import preference_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
MODES = ("keep_start", "keep_end")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _text_pairs(n=12, seed=0):
    """Text pairs of very different lengths, so every max_len below cuts prompts, responses or both."""
    rng = random.Random(seed)
    words = "the cat dog sat on mat good bad red blue one two".split()
    w = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [PairRecord("describe: " + w(rng.randint(1, 14)), " good " + w(rng.randint(0, 12)), " " + w(rng.randint(1, 9)))
            for _ in range(n)]


def _trl_rows(encoded, max_len, mode):
    """TRL 1.16's collator (trl/trainer/dpo_trainer.py DataCollatorForPreference.torch_call) on
    untruncated ``(prompt, chosen, rejected)`` ids, after TRL's keep_start filter
    (DPOTrainer._prepare_dataset: ``len(prompt_ids) < max_length``)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ex = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in encoded
          if mode != "keep_start" or len(p) < max_len]
    return DataCollatorForPreference(pad_token_id=0, max_length=max_len, truncation_mode=mode)(ex)


def _our_rows(encoded, max_len, mode, **kw):
    items = [x for x in (truncate_pair(p, c, r, max_len, mode, **kw) for p, c, r in encoded) if x is not None]
    return collate_pairs(items, 0)


def _assert_rows_equal(ours, trl):
    """Same rows, as far as each is padded (the widest row sets both widths when they agree)."""
    T = trl["input_ids"].shape[1]
    assert ours["input_ids"].shape == (trl["input_ids"].shape[0], T)
    assert torch.equal(ours["input_ids"], trl["input_ids"])
    assert torch.equal(ours["attention_mask"], trl["attention_mask"])
    assert torch.equal(ours["response_mask"], trl["completion_mask"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_len", [7, 12, 20, 1000])
def test_text_pair_rows_equal_trls_collator(tok, mode, max_len):
    encoded = [encode_pair(tok, r.prompt, r.chosen, r.rejected, None) for r in _text_pairs()]
    _assert_rows_equal(_our_rows(encoded, max_len, mode), _trl_rows(encoded, max_len, mode))


@pytest.mark.parametrize("mode,max_len", [("keep_start", 18), ("keep_start", 34), ("keep_end", 5),
                                          ("keep_end", 18), ("keep_end", 34)])
def test_conversational_rows_equal_trls_whole_pipeline(chat_tok, mode, max_len):
    """TRL's own dataset preparation (tokenize, split at the common prefix, drop over-long
    prompts under keep_start) and collator, against the trainer's items."""
    from trl import DPOTrainer as TRLDPO
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = conv_rows(8, seed=3)
    ref = _trl_prepare(TRLDPO, rows, chat_tok)
    if mode == "keep_start":  # TRL's filter, which _trl_prepare skips (it runs with max_length=None)
        ref = ref.filter(lambda ex: len(ex["prompt_ids"]) < max_len)
    trl = DataCollatorForPreference(pad_token_id=0, max_length=max_len, truncation_mode=mode)(
        [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in ref])
    pairs = load_records(rows, "pairs")
    ours = _our_rows([encode_pair(chat_tok, r.prompt, r.chosen, r.rejected, None) for r in pairs], max_len, mode)
    _assert_rows_equal(ours, trl)
    if mode == "keep_start":
        assert 0 < trl["input_ids"].shape[0] < 2 * len(rows)  # some pairs really were dropped


def test_keep_end_keeps_the_eos_and_each_rows_own_prompt(tok):
    p, c, r = list(range(10, 20)), [30, 31, 32, tok.eos_token_id], [40, tok.eos_token_id]
    cut = truncate_pair(p, c, r, 8, "keep_end")
    assert cut == {"prompt": p[-4:], "chosen": c, "rejected": r, "rejected_prompt": p[-6:]}
    long_c = list(range(50, 62)) + [tok.eos_token_id]  # longer than max_len: no prompt left in its row
    cut = truncate_pair(p, long_c, r, 8, "keep_end")
    assert cut["prompt"] == [] and cut["chosen"] == long_c[-8:] and cut["rejected_prompt"] == p[-6:]
    assert truncate_pair(p, c, r, 8, "keep_start") is None  # the prompt fills the row: dropped, as TRL
    assert truncate_pair(p, c, r, 12, "keep_start") == {"prompt": p, "chosen": c[:2], "rejected": r}


def test_prompt_and_completion_caps_as_trl_0x(tok):
    """max_prompt_length / max_completion_length: TRL 0.x's DPOTrainer.tokenize_row, transcribed
    (eos appended first, then ``prompt[-max_prompt_length:]``, ``chosen[:max_completion_length]``),
    then the row cut of the mode."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    encoded = [encode_pair(tok, r.prompt, r.chosen, r.rejected, None) for r in _text_pairs(seed=1)]
    for mode in MODES:
        capped = [(p[-5:], c[:4], r[:4]) for p, c, r in encoded]  # TRL 0.x tokenize_row's two slices
        trl = DataCollatorForPreference(pad_token_id=0, max_length=8, truncation_mode=mode)(
            [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in capped])
        _assert_rows_equal(_our_rows(encoded, 8, mode, max_prompt_length=5, max_completion_length=4), trl)
    p, c, r = encoded[0]
    got = truncate_pair(p, c, r, 1000, max_prompt_length=2, max_completion_length=1)
    assert got == {"prompt": p[-2:], "chosen": c[:1], "rejected": r[:1]}


def test_balanced_default_is_unchanged(tok):
    """The default mode is encode_pair's cut of before (the prompt's end down to half of max_len,
    then the responses' start), for every max_len."""
    for rec in _text_pairs(seed=2):
        full = encode_pair(tok, rec.prompt, rec.chosen, rec.rejected, None)
        for max_len in (3, 7, 12, 30):
            p, c, r = full
            longest = max(len(c), len(r))
            if len(p) + longest > max_len:  # the rule of before, transcribed
                keep = max(1, min(len(p), max(max_len - longest, max_len // 2)))
                p, c, r = p[-keep:], c[: max_len - keep], r[: max_len - keep]
            assert encode_pair(tok, rec.prompt, rec.chosen, rec.rejected, max_len) == (p, c, r)
            assert truncate_pair(*full, max_len) == {"prompt": p, "chosen": c, "rejected": r}


def _trainer(tmp_path, tok, **kw):
    cfg = DPOConfig(model=TINY, output_dir=str(tmp_path / "run"), batch_size=6, lr=3e-3, warmup_steps=0,
                    eval_every=0, log_every=1, max_len=10, max_steps=1, device="cpu", eval_fraction=0.0, **kw)
    return DPOTrainer(cfg, train_records=_text_pairs(), eval_records=[], tokenizer=tok)


@pytest.mark.parametrize("mode", MODES)
def test_trainer_rows_equal_trls_and_a_step_trains(tmp_path, tok, mode):
    tr = _trainer(tmp_path, tok, truncation_mode=mode)
    encoded = [encode_pair(tok, r.prompt, r.chosen, r.rejected, None) for r in _text_pairs()]
    _assert_rows_equal(collate_pairs(tr.train_items, 0), _trl_rows(encoded, 10, mode))
    if mode == "keep_end":
        assert any("rejected_prompt" in it for it in tr.train_items)  # the two rows really differ somewhere
        assert all(it["chosen"][-1] == tok.eos_token_id for it in tr.train_items)
    else:
        assert tr.dropped == sum(len(p) >= 10 for p, _, _ in encoded) > 0
    m = tr.train_step()
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0


def test_trainer_default_items_are_encode_pairs(tmp_path, tok):
    tr = _trainer(tmp_path, tok)
    want = [encode_pair(tok, r.prompt, r.chosen, r.rejected, 10) for r in _text_pairs()]
    assert [(it["prompt"], it["chosen"], it["rejected"]) for it in tr.train_items] == want
    assert not any("rejected_prompt" in it for it in tr.train_items)


def test_config_errors_name_the_field(tmp_path):
    for kw, needle in ((dict(truncation_mode="left"), "truncation_mode must be one of"),
                       (dict(max_prompt_length=0), "max_prompt_length must be null or an int >= 1"),
                       (dict(max_completion_length=2.5), "max_completion_length must be null or an int >= 1"),
                       (dict(max_completion_length=True), "max_completion_length")):
        with pytest.raises(ValueError, match=needle):
            DPOConfig(model=TINY, output_dir=str(tmp_path / "x"), **kw)
