"""SFT ``eos_token`` / ``pad_token`` / ``chat_template_path`` against TRL 1.16's SFTTrainer on
copies of the same tiny model and tokenizer: the tokenizer's eos / pad and template, the model
config's and generation config's ids, and the prepared rows; a tokenizer folder's template cloned
as ``trl.clone_chat_template`` clones it (added tokens, eos, embeddings resized to a multiple of
64 with the same initial rows); ``final/`` carrying the changed tokenizer and embeddings; LoRA
training the added tokens' rows; and the clear errors (a token not in the vocabulary, a missing
file, a folder without a tokenizer)."""

import copy
import os

import pytest
import torch

from rlhf_fast.feedback.formats import ChatRecord
from rlhf_fast.models.loading import apply_tokenizer_overrides, clone_chat_template
from rlhf_fast.models.tiny import tiny_causal_lm
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records, tokenize_sft
from tests.test_sft_chat import CHATML_GEN, chat_records
from tests.test_sft_losses import tok  # noqa: F401  (fixture: the tokenizer of the synthetic task)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
SOURCE_SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>"]


def _model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return tiny_causal_lm(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2)


def save_source_tokenizer(tok, folder: str) -> str:
    """``folder`` holding a copy of ``tok`` with a ChatML template, eos <|im_end|> and three
    added specials: a tokenizer folder to clone (``chat_template_path``)."""
    src = copy.deepcopy(tok)
    src.add_special_tokens({"additional_special_tokens": SOURCE_SPECIALS})
    src.eos_token = "<|im_end|>"
    src.chat_template = CHATML_GEN
    src.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source_folder(tok, tmp_path_factory):
    return save_source_tokenizer(tok, str(tmp_path_factory.mktemp("source_tok")))


def _trl_trainer(model, tokenizer, rows, tmp_path, **kw):
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=32, **kw)
    return TRLTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _ids(model):
    return (model.config.eos_token_id, model.config.pad_token_id, model.generation_config.eos_token_id,
            model.generation_config.pad_token_id)


@pytest.mark.parametrize("kw", [dict(eos_token="<unk>"), dict(pad_token="<bos>"),
                                dict(eos_token="<bos>", pad_token="<unk>")])
def test_eos_and_pad_tokens_equal_trls(tok, tmp_path, kw):
    """The tokenizer, the model's config and generation config, and the rows (the new eos ends
    every completion) as TRL's SFTTrainer leaves them."""
    recs = synthetic_sft_records(8)
    t_trl, t_ours = copy.deepcopy(tok), copy.deepcopy(tok)
    m_trl, m_ours = _model(tok), _model(tok)
    if "pad_token" not in kw:  # TRL always sets a pad (its own, or eos): give ours the same starting point
        kw_ours = dict(kw, pad_token=tok.pad_token)
    else:
        kw_ours = kw
    trl = _trl_trainer(m_trl, t_trl, [{"prompt": r.prompt, "completion": r.completion} for r in recs], tmp_path, **kw)
    assert apply_tokenizer_overrides(m_ours, t_ours, **kw_ours) == []
    assert (t_ours.eos_token, t_ours.eos_token_id, t_ours.pad_token_id) == (t_trl.eos_token, t_trl.eos_token_id,
                                                                            t_trl.pad_token_id)
    assert _ids(m_ours) == _ids(trl.model)
    rows, _ = tokenize_sft(recs, t_ours, 32)
    assert [r["input_ids"] for r in rows] == [list(x) for x in trl.train_dataset["input_ids"]]
    if "eos_token" in kw:
        assert all(r["input_ids"][-1] == t_ours.convert_tokens_to_ids(kw["eos_token"]) for r in rows)


def test_jinja_template_file_equals_trls(tok, tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_GEN)
    base = copy.deepcopy(tok)
    base.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t_trl, t_ours = copy.deepcopy(base), copy.deepcopy(base)
    recs = chat_records(6, seed=1)
    trl = _trl_trainer(_model(base), t_trl, [{"messages": r.messages} for r in recs], tmp_path,
                       chat_template_path=str(path))
    m = _model(base)
    assert apply_tokenizer_overrides(m, t_ours, chat_template_path=str(path)) == []
    assert t_ours.chat_template == t_trl.chat_template == CHATML_GEN
    assert m.get_input_embeddings().weight.shape[0] == len(base)  # a file adds no token
    rows, _ = tokenize_sft(recs, t_ours, 32)
    assert [r["input_ids"] for r in rows] == [list(x) for x in trl.train_dataset["input_ids"]]


def test_cloned_folder_template_equals_trl_clone_chat_template(tok, source_folder):
    from trl import clone_chat_template as trl_clone

    t_trl, t_ours = copy.deepcopy(tok), copy.deepcopy(tok)
    m_trl, m_ours = _model(tok), _model(tok)
    torch.manual_seed(7)  # the new embedding rows are drawn around the old ones' mean
    m_trl, t_trl, added_trl = trl_clone(m_trl, t_trl, source_folder)
    torch.manual_seed(7)
    added = clone_chat_template(m_ours, t_ours, source_folder)
    assert added == added_trl and len(added) > len(SOURCE_SPECIALS)  # the specials, then fillers up to 64k rows
    assert t_ours.get_vocab() == t_trl.get_vocab() and t_ours.chat_template == t_trl.chat_template
    assert (t_ours.eos_token, t_ours.eos_token_id) == ("<|im_end|>", t_trl.eos_token_id)
    assert _ids(m_ours) == _ids(m_trl)
    n = m_ours.get_input_embeddings().weight.shape[0]
    assert n % 64 == 0 and n == len(t_ours.get_vocab())
    for a, b in ((m_ours.get_input_embeddings(), m_trl.get_input_embeddings()),
                 (m_ours.get_output_embeddings(), m_trl.get_output_embeddings())):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def _sft(tmp_path, tok, recs, **kw):
    cfg = SFTConfig(model=TINY, output_dir=str(tmp_path / "run"), max_len=40, batch_size=4, max_steps=1,
                    warmup_steps=0, eval_every=0, log_every=1, device="cpu", **kw)
    return SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=copy.deepcopy(tok), model=_model(tok))


def test_final_folder_carries_the_cloned_template_and_eos(tmp_path, tok, source_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recs = [ChatRecord(r.messages) for r in chat_records(8, seed=2)]
    tr = _sft(tmp_path, tok, recs, chat_template_path=source_folder, pad_token="<unk>")
    im_end = tr.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end >= len(tok) and all(im_end in r["input_ids"] for r in tr.train_rows)  # the cloned template's
    tr.train()
    final = os.path.join(tr.run.path, "final")
    t = AutoTokenizer.from_pretrained(final)
    m = AutoModelForCausalLM.from_pretrained(final)
    assert (t.eos_token, t.pad_token, t.chat_template) == ("<|im_end|>", "<unk>", CHATML_GEN)
    assert m.get_input_embeddings().weight.shape[0] == len(t.get_vocab()) == len(tr.tokenizer.get_vocab())
    assert (m.config.eos_token_id, m.config.pad_token_id) == (t.eos_token_id, t.pad_token_id)


def test_lora_trains_the_added_tokens_rows(tmp_path, tok, source_folder):
    recs = [ChatRecord(r.messages) for r in chat_records(8, seed=2)]
    with pytest.warns(UserWarning, match="modules_to_save"):
        tr = _sft(tmp_path, tok, recs, chat_template_path=source_folder, lora={"r": 4})
    im_end = tr.tokenizer.convert_tokens_to_ids("<|im_end|>")
    peft_cfg = tr.model.peft_config["default"]
    assert im_end in peft_cfg.trainable_token_indices["embed_tokens"]
    before = tr.model.get_input_embeddings()(torch.tensor([im_end])).detach().clone()
    tr.train_step()
    after = tr.model.get_input_embeddings()(torch.tensor([im_end])).detach()
    assert not torch.equal(before, after)  # the new token's row trains, though the base is frozen


def test_errors_name_the_key(tmp_path, tok):
    m, t = _model(tok), copy.deepcopy(tok)
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        apply_tokenizer_overrides(m, t, eos_token="<nope>")
    with pytest.raises(ValueError, match="pad_token '<nope>' is not in the tokenizer's vocabulary"):
        apply_tokenizer_overrides(m, t, pad_token="<nope>")
    with pytest.raises(ValueError, match="chat_template_path .*missing.jinja.*: no such template file"):
        _sft(tmp_path, tok, synthetic_sft_records(4), chat_template_path=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="neither a .jinja / .j2 file nor a local tokenizer folder"):
        _sft(tmp_path, tok, synthetic_sft_records(4), chat_template_path="Qwen/Qwen3-0.6B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="chat_template_path .*: no tokenizer files"):
        apply_tokenizer_overrides(m, t, chat_template_path=str(tmp_path / "empty"))
    for key in ("eos_token", "pad_token", "chat_template_path"):
        with pytest.raises(ValueError, match=f"{key} must be null or a non-empty string"):
            SFTConfig(**{key: ""})
    assert t.eos_token == tok.eos_token and t.pad_token == tok.pad_token  # nothing changed on a refusal
