"""Review of the reward trainer against TRL 1.16's RewardTrainer and transformers'
sequence-classification forward: a response that already ends in the eos gets no second one (TRL's
``add_eos``), and the model config's ``pad_token_id`` is the id the trainer pads with (TRL sets it
from the tokenizer), so transformers' forward on the trained model reads the token the trainer read."""

import copy

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord, load_records, pad_right
from rlhf_fast.models.loading import reward_scores

from tests.test_reward import preference_tokenizer
from tests.test_reward_tokenizer_overrides import _ours, _rm, _text_rows, _trl

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def test_a_response_ending_in_eos_gets_no_second_eos_as_trls_add_eos(tmp_path, tok):
    """TRL's add_eos appends the eos only to a text that does not end with it; ours appended one
    always, so such pairs were scored at a doubled eos (not TRL's rows)."""
    rows = [{**r, "chosen": r["chosen"] + tok.eos_token} for r in _text_rows(4)]
    trl = _trl(tmp_path, _rm(tok), copy.deepcopy(tok), rows)
    ours = _ours(tmp_path, _rm(tok), copy.deepcopy(tok), load_records(rows, "pairs"))
    assert [it["seqs"] for it in ours.train_items] == [[list(r["chosen_ids"]), list(r["rejected_ids"])]
                                                        for r in trl.train_dataset]
    assert ours.train_items[0]["seqs"][0][-2:] != [tok.eos_token_id] * 2


def test_config_pad_id_is_the_padding_id_so_transformers_reads_the_trained_token(tmp_path, tok):
    """A model whose config names another pad id than the tokenizer's: TRL sets the config's to the
    tokenizer's; ours kept it, so transformers' forward (the saved model in TRL / plain
    transformers) read a padding position of every right-padded shorter row."""
    model = _rm(tok)
    model.config.pad_token_id = 5  # not the tokenizer's pad (0)
    recs = [PairRecord("describe: cat", " good dog", " bad cat sat on the mat"), PairRecord("describe: mat", " good", " no")]
    tr = _ours(tmp_path, model, copy.deepcopy(tok), recs)
    assert tr.model.config.pad_token_id == tr.pad_id == tok.pad_token_id
    seqs = [s for it in tr.train_items for s in it["seqs"]]
    ids, attn = pad_right(seqs, tr.pad_id)
    with torch.no_grad():
        hf = tr.model.eval()(input_ids=ids, attention_mask=attn).logits[:, 0]
        torch.testing.assert_close(hf, reward_scores(tr.model, ids, attn), rtol=1e-5, atol=1e-6)


def test_implicit_prompt_text_pair_is_tokenised_whole_as_trls_rows(tmp_path, tok):
    """TRL's RewardTrainer tokenises a text pair whole (prompt + response, then its eos); an
    implicit prompt is cut where the two texts part, often inside a word ("... go|od dog" /
    "... go|ne red"), and ours tokenised the two pieces apart: "Ġ go od" where TRL (and an RL
    rollout's prompt + " good dog") has "Ġgood", so the head trained on other tokens than it scores."""
    rows = [{"chosen": "describe: cat good dog", "rejected": "describe: cat gone red"},
            {"chosen": "describe: the mat good", "rejected": "describe: the mat bad"}]
    trl = _trl(tmp_path, _rm(tok), copy.deepcopy(tok), rows)
    ours = _ours(tmp_path, _rm(tok), copy.deepcopy(tok), load_records(rows, "pairs"))
    assert [it["seqs"] for it in ours.train_items] == [[list(r["chosen_ids"]), list(r["rejected_ids"])]
                                                        for r in trl.train_dataset]
