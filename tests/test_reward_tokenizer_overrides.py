"""Reward ``eos_token`` / ``pad_token`` / ``chat_template_path`` against TRL 1.16's RewardTrainer on
copies of the same tiny sequence-classification model and tokenizer: the tokenizer's eos / pad and
template, the model config's ids (no generation config on either side) and the prepared rows (text
pairs end in the new eos, as TRL's ``add_eos``; conversations are TRL's ids plus our eos); a
tokenizer folder's template cloned as TRL's trainer clones it (added tokens, embeddings resized to
a multiple of 64 with the same rows); ``final/`` carrying the changed tokenizer and embeddings; LoRA
training the added tokens' rows and ``final/`` merging them; the clear errors."""

import copy
import os

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord, load_records
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer

from tests.test_pref_formats import conv_rows
from tests.test_reward import TINY, preference_tokenizer
from tests.test_sft_chat import CHATML_GEN
from tests.test_sft_tokenizer_overrides import save_source_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")



@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


@pytest.fixture(scope="module")
def chat_tok(tok):
    """The preference tokenizer with the ChatML specials (conversational pairs need a template)."""
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML_GEN
    return t


@pytest.fixture(scope="module")
def source_folder(tok, tmp_path_factory):
    return save_source_tokenizer(tok, str(tmp_path_factory.mktemp("source_tok")))


def _rm(tok):
    from rlhf_fast.models.tiny import tiny_reward_model

    return tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _text_rows(n=6):
    # responses open with a space, so TRL's prompt + response text tokenises as our two parts
    words = "the cat dog sat on mat big small red blue".split()
    return [{"prompt": f"describe: {words[i % 10]} {words[(i + 3) % 10]}", "chosen": f" good {words[(i + 1) % 10]}",
             "rejected": f" {words[(i + 5) % 10]} {words[(i + 7) % 10]} no"} for i in range(n)]


def _trl(tmp_path, model, tokenizer, rows, **kw):
    import warnings

    from datasets import Dataset
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer as TRLTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates its pad_token (still applied)
        args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=None, **kw)
    return TRLTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _ours(tmp_path, model, tokenizer, records, name="run", **kw):
    cfg = RewardConfig(model=TINY, output_dir=str(tmp_path / name), max_len=10_000, batch_size=4, max_steps=1,
                       warmup_steps=0, eval_every=0, log_every=1, device="cpu", **kw)
    return RewardTrainer(cfg, model=model, tokenizer=tokenizer, train_records=records, eval_records=[])


def _ids(model):
    return (model.config.eos_token_id, model.config.pad_token_id, getattr(model, "generation_config", None))


@pytest.mark.parametrize("kw", [dict(eos_token="<unk>"), dict(pad_token="<bos>"),
                                dict(eos_token="<bos>", pad_token="<unk>")])
def test_eos_and_pad_tokens_equal_trls(tmp_path, tok, kw):
    """The tokenizer, the model config's ids, and the scored rows (chosen and rejected end in the
    new eos) as TRL's RewardTrainer leaves them."""
    rows = _text_rows()
    t_trl, t_ours = copy.deepcopy(tok), copy.deepcopy(tok)
    trl = _trl(tmp_path, _rm(tok), t_trl, rows, **kw)
    ours = _ours(tmp_path, _rm(tok), t_ours, load_records(rows, "pairs"), **kw)
    assert (t_ours.eos_token, t_ours.eos_token_id, t_ours.pad_token, t_ours.pad_token_id) == (
        t_trl.eos_token, t_trl.eos_token_id, t_trl.pad_token, t_trl.pad_token_id)
    assert _ids(ours.model) == _ids(trl.model) and _ids(ours.model)[2] is None
    assert ours.pad_id == t_trl.pad_token_id
    assert [it["seqs"] for it in ours.train_items] == [[list(r["chosen_ids"]), list(r["rejected_ids"])]
                                                        for r in trl.train_dataset]
    if "eos_token" in kw:
        eos = t_ours.convert_tokens_to_ids(kw["eos_token"])
        assert eos != tok.eos_token_id and all(s[-1] == eos for it in ours.train_items for s in it["seqs"])


def test_jinja_template_file_equals_trls(tmp_path, chat_tok):
    """A .jinja file becomes the template as TRL sets it (no token added); conversational rows
    are TRL's ids through that template, then our eos."""
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_GEN.replace("{{ m.role }}\n", "{{ m.role }}:\n").replace("assistant\n", "assistant:\n"))
    rows = conv_rows(4)
    t_trl, t_ours = copy.deepcopy(chat_tok), copy.deepcopy(chat_tok)
    trl = _trl(tmp_path, _rm(chat_tok), t_trl, rows, chat_template_path=str(path))
    ours = _ours(tmp_path, _rm(chat_tok), t_ours, load_records(rows, "pairs"), chat_template_path=str(path))
    assert t_ours.chat_template == t_trl.chat_template == path.read_text() != chat_tok.chat_template
    assert ours.model.get_input_embeddings().weight.shape[0] == len(chat_tok)  # a file adds no token
    eos = t_ours.eos_token_id
    assert [it["seqs"] for it in ours.train_items] == [[list(r["chosen_ids"]) + [eos], list(r["rejected_ids"]) + [eos]]
                                                        for r in trl.train_dataset]


def test_cloned_folder_equals_trls_trainer(tmp_path, tok, source_folder):
    """A tokenizer folder: the vocabulary, template and eos, the model config's ids and the
    resized embeddings (the same rows: both trainers seed first, then clone) as TRL's RewardTrainer."""
    rows = _text_rows(4)
    t_trl, t_ours = copy.deepcopy(tok), copy.deepcopy(tok)
    trl = _trl(tmp_path, _rm(tok), t_trl, rows, chat_template_path=source_folder, seed=0)
    ours = _ours(tmp_path, _rm(tok), t_ours, load_records(rows, "pairs"), chat_template_path=source_folder, seed=0)
    assert t_ours.get_vocab() == t_trl.get_vocab() and t_ours.chat_template == t_trl.chat_template == CHATML_GEN
    assert (t_ours.eos_token, t_ours.eos_token_id) == ("<|im_end|>", t_trl.eos_token_id)
    assert _ids(ours.model) == _ids(trl.model)
    n = ours.model.get_input_embeddings().weight.shape[0]
    assert n % 64 == 0 and n == len(t_ours.get_vocab()) > len(tok)
    torch.testing.assert_close(ours.model.get_input_embeddings().weight, trl.model.get_input_embeddings().weight,
                               rtol=0, atol=0)
    assert [it["seqs"] for it in ours.train_items] == [[list(r["chosen_ids"]), list(r["rejected_ids"])]
                                                        for r in trl.train_dataset]  # text pairs end in <|im_end|>


def test_final_folder_carries_the_cloned_template_and_pad(tmp_path, tok, source_folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tr = _ours(tmp_path, _rm(tok), copy.deepcopy(tok), load_records(_text_rows(), "pairs"),
               chat_template_path=source_folder, pad_token="<unk>")
    tr.train()
    final = os.path.join(tr.run.path, "final")
    t = AutoTokenizer.from_pretrained(final)
    m = AutoModelForSequenceClassification.from_pretrained(final)
    assert (t.eos_token, t.pad_token, t.chat_template) == ("<|im_end|>", "<unk>", CHATML_GEN)
    assert m.get_input_embeddings().weight.shape[0] == len(t.get_vocab()) == len(tr.tokenizer.get_vocab())
    assert (m.config.eos_token_id, m.config.pad_token_id) == (t.eos_token_id, t.pad_token_id)


def test_lora_trains_the_added_tokens_rows_and_final_merges_them(tmp_path, tok, source_folder):
    """With lora the cloned tokens' embedding rows train (TRL's trainable_token_indices) while the
    base embedding stays; final/ is a plain model whose rows are the trained ones."""
    from transformers import AutoModelForSequenceClassification

    recs = [PairRecord(r["prompt"], r["chosen"], r["rejected"]) for r in _text_rows(8)]
    tr = _ours(tmp_path, _rm(tok), copy.deepcopy(tok), recs, chat_template_path=source_folder, lora={"r": 4},
               lr=3e-2)
    im_end = tr.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tr.model.peft_config["default"].trainable_token_indices["embed_tokens"]
    rows = torch.tensor([im_end, 5])
    before = tr.model.get_input_embeddings()(rows).detach().clone()
    tr.train()
    after = tr.model.get_input_embeddings()(rows).detach()
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # the new row only
    m = AutoModelForSequenceClassification.from_pretrained(os.path.join(tr.run.path, "final"))
    torch.testing.assert_close(m.get_input_embeddings()(rows), after, rtol=0, atol=1e-6)


def test_errors_name_the_key(tmp_path, tok, source_folder):
    recs = load_records(_text_rows(2), "pairs")
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        _ours(tmp_path, _rm(tok), copy.deepcopy(tok), recs, eos_token="<nope>")
    with pytest.raises(ValueError, match="pad_token '<nope>' is not in the tokenizer's vocabulary"):
        _ours(tmp_path, _rm(tok), copy.deepcopy(tok), recs, pad_token="<nope>")
    with pytest.raises(ValueError, match="chat_template_path .*missing.jinja.*: no such template file"):
        _ours(tmp_path, _rm(tok), copy.deepcopy(tok), recs, chat_template_path=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="neither a .jinja / .j2 file nor a local tokenizer folder"):
        RewardTrainer(RewardConfig(output_dir=str(tmp_path / "hub"), chat_template_path="Qwen/Qwen3-0.6B",
                                   device="cpu"), train_records=recs, eval_records=[])
    for key in ("eos_token", "pad_token", "chat_template_path"):
        with pytest.raises(ValueError, match=f"{key} must be null or a non-empty string"):
            RewardConfig(**{key: ""})
    import peft

    pm = peft.get_peft_model(_rm(tok), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"))
    t = copy.deepcopy(tok)
    with pytest.raises(ValueError, match="not with a peft model passed as model"):
        _ours(tmp_path, pm, t, recs, chat_template_path=source_folder)
    assert t.get_vocab() == tok.get_vocab() and t.chat_template == tok.chat_template  # nothing changed on a refusal
