import pytest
import torch

from rlhf_fast.models import FAMILIES, sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


def test_tokenizer_roundtrip_and_specials(tok):
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    text = "hello world the cat sat"
    assert tok.decode(tok(text)["input_ids"]) == text
    enc = tok(["a", "hello world the cat"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, 0] == 0 and enc["input_ids"][0, 0] == tok.pad_token_id  # left padding
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("assistant: ") and "user: hi" in chat
    right = train_tokenizer(sample_texts(), 256, padding_side="right")
    enc = right(["a", "hello world"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, -1] == 0


def test_tokenizer_full_byte_alphabet():
    tok = train_tokenizer(sample_texts(), 300)
    assert tok.decode(tok("héllo ✓")["input_ids"]) == "héllo ✓"


def test_tokenizer_bad_input():
    with pytest.raises(TypeError, match="texts"):
        train_tokenizer("abc")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 3)
    with pytest.raises(ValueError, match="padding_side"):
        train_tokenizer(["abc"], padding_side="middle")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_causal_lm_families(tok, family):
    m = tiny_causal_lm(len(tok), family=family, seed=1)
    enc = tok(["hello world", "the cat"], padding=True, return_tensors="pt")
    out = m(**enc)
    assert out.logits.shape == (2, enc["input_ids"].shape[1], len(tok))
    m2 = tiny_causal_lm(len(tok), family=family, seed=1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_tiny_causal_lm_bad_family():
    with pytest.raises(ValueError, match="family"):
        tiny_causal_lm(100, family="bert")


def test_tiny_reward_model(tok):
    rm = tiny_reward_model(len(tok))
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    enc = tok(["hello world", "the cat"], padding=True, return_tensors="pt")
    assert rm(**enc).logits.shape == (2, 1)
