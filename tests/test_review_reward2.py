"""Second review of reward-model scoring (training, RL) against TRL 1.16 and transformers 5.25.

An encoder reward model (BERT, DeBERTa, RoBERTa: a ``classifier`` head reading the first token
through a pooler) must be scored by its own forward, not by its head on the last token's state.

Open (kept as a strict xfail for the lead): with pad == eos (a tokenizer without a pad token,
padded with its eos, as TRL's RewardTrainer sets it) transformers' forward, so TRL's RewardTrainer,
reads the token BEFORE the trailing eos; the README documents that ours trains and scores at the
eos. A reward model TRL trained that way is then scored in RL at a position its head never saw."""

import pytest
import torch

from rlhf_fast.algorithms.rewards import RewardContext, RewardModelReward
from rlhf_fast.feedback.formats import pad_right, reward_input_ids
from rlhf_fast.models.loading import reward_scores

from tests.test_reward import preference_tokenizer
from tests.test_reward_tokenizer_overrides import _rm

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def eos_pad_tok():
    """The preference tokenizer padding with its eos (a tokenizer without a pad token, as TRL sets it)."""
    t = preference_tokenizer()
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id
    return t


def _hf_scores(model, ids, attn):
    """transformers' own sequence-classification forward: the score TRL trains and reads."""
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=attn).logits[:, 0].float()


@pytest.mark.xfail(strict=True, reason="open: pad == eos, RL reads the eos, where a TRL-trained head never "
                                        "read (the README keeps ours at the eos)")
def test_pad_equal_to_eos_rl_scores_where_transformers_reads(eos_pad_tok):
    """RewardModelReward on a reward model whose config pads with the eos (as TRL saves one):
    TRL trained its head where transformers' forward reads (the token before the eos), so RL's
    score of each (prompt, answer) should be that forward of the same right-padded rows."""
    torch.manual_seed(0)
    model = _rm(eos_pad_tok).eval()
    prompts = ["describe: cat dog", "describe: the big red mat"]
    answers = [" good dog", " the cat sat on the mat no"]
    got = RewardModelReward(model, eos_pad_tok)(prompts, answers, RewardContext())
    ids, attn = pad_right([reward_input_ids(eos_pad_tok, p, a) for p, a in zip(prompts, answers)],
                          eos_pad_tok.pad_token_id)
    torch.testing.assert_close(torch.tensor(got), _hf_scores(model, ids, attn), rtol=1e-5, atol=1e-6)


def _encoder_rm(kind, vocab=100):
    """A tiny encoder reward model (one label): BERT (pooler + classifier), DeBERTa-v2 (context
    pooler + classifier), RoBERTa (classification head on the first token)."""
    import transformers as tf

    cls, conf = {"bert": (tf.BertForSequenceClassification, tf.BertConfig),
                 "deberta-v2": (tf.DebertaV2ForSequenceClassification, tf.DebertaV2Config),
                 "roberta": (tf.RobertaForSequenceClassification, tf.RobertaConfig)}[kind]
    torch.manual_seed(0)
    return cls(conf(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=1, max_position_embeddings=64, pad_token_id=0)).eval()


@pytest.mark.parametrize("kind", ["bert", "deberta-v2", "roberta"])
def test_encoder_reward_model_scores_are_its_own_forward(kind):
    """An encoder reward model (e.g. OpenAssistant's DeBERTa-v3 reward models, which load_reward_model
    and reward.reward_model accept) scores a sequence from its first token through its pooler: the
    score is the model's own forward, as TRL's GRPO reads ``reward_func(**inputs).logits[:, 0]``. Ours
    fed the LAST token's state to the classifier without the pooler (BERT, DeBERTa: other numbers;
    RoBERTa, whose head indexes the first token: IndexError)."""
    model = _encoder_rm(kind)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 90, (3, 7), generator=g)
    attn = torch.ones_like(ids)
    ids[1, 5:], attn[1, 5:] = 0, 0  # a shorter row, right-padded
    with torch.no_grad():
        got = reward_scores(model, ids, attn)
    torch.testing.assert_close(got, _hf_scores(model, ids, attn), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoder_reward_model_reads_left_padded_rows_as_right_padded(kind):
    """An encoder reads its first position, so a left-padded batch (the rollout's own ids, the
    tokenizer-less path of RewardModelReward) is scored as the same rows right-padded, not at a
    pad token."""
    model = _encoder_rm(kind)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 90, (3, 7), generator=g)
    right, attn_r = ids.clone(), torch.ones_like(ids)
    right[1, 4:], attn_r[1, 4:] = 0, 0
    left = torch.zeros_like(ids)
    attn_l = torch.zeros_like(ids)
    left[1, 3:], attn_l[1, 3:] = ids[1, :4], 1
    left[[0, 2]], attn_l[[0, 2]] = ids[[0, 2]], 1
    with torch.no_grad():
        got = reward_scores(model, left, attn_l)
    torch.testing.assert_close(got, _hf_scores(model, right, attn_r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "deberta-v2"])
def test_encoder_reward_model_in_rl_scores_as_its_forward(kind):
    """RewardModelReward (reward.reward_model in RL, rlhf-fast eval) on an encoder reward model:
    each answer's score is the model's forward of its (prompt, answer) row, batched or alone."""
    tok = preference_tokenizer()
    model = _encoder_rm(kind, vocab=len(tok))
    prompts = ["describe: cat dog", "describe: the big red mat"]
    answers = [" good dog", " the cat sat on the mat no"]
    got = RewardModelReward(model, tok)(prompts, answers, RewardContext())
    want = [float(_hf_scores(model, *pad_right([reward_input_ids(tok, p, a)], tok.pad_token_id))[0])
            for p, a in zip(prompts, answers)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_reward_model_reward_checks_its_arguments():
    """RewardModelReward called directly (it is public, as score_texts uses it): B prompts and a
    different number of completions must be a ValueError (zip scored the first B and dropped the
    rest silently), and no tokenizer with no rollout context a ValueError naming what it needs
    (an AttributeError on None)."""
    tok = preference_tokenizer()
    torch.manual_seed(0)
    model = _rm(tok).eval()
    with pytest.raises(ValueError, match="same length"):
        RewardModelReward(model, tok)(["describe: a", "describe: b"], [" good", " no", " x"], None)
    with pytest.raises(ValueError, match="same length"):
        RewardModelReward(model, tok)(["describe: a", "describe: b"], [" good", " no"],
                                      RewardContext(prompts=["describe: a"]))
    with pytest.raises(ValueError, match="tokenizer or the rollout's input_ids"):
        RewardModelReward(model)(["describe: a"], [" good"], None)
