"""``chat_template_kwargs`` (template variables such as Qwen3's ``enable_thinking``) on the
conversational reward-model path: the reward trainer renders its chat pairs with its config's
``chat_template_kwargs`` and saves them in the model's config next to ``rlhf_fast_reward_format``;
RL's ``RewardModelReward`` scores with the saved ones (the ids the head trained on), and with
the run's ``data.chat_template_kwargs`` only for a model that saved none.

TRL 1.16: ``RewardTrainer`` renders a conversational row with the row's own
``chat_template_kwargs`` column (``RewardConfig`` has no such key); ``GRPOTrainer._calculate_rewards``
renders prompt + completion with the reward processing class's template and the POLICY's
``GRPOConfig.chat_template_kwargs`` — so a reward model trained without them is scored at other
ids there. Ours keeps training-time and scoring-time ids identical."""

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from rlhf_fast.models.tiny import train_tokenizer  # noqa: E402
from tests.test_rl_learning import TEXTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# a template reading a variable as Qwen3's reads enable_thinking: with it false, the generation
# prompt and every assistant turn start with the marker "x y " (both, so a rendered prompt stays a
# token prefix of prompt + answer); each turn closed by the eos, as ChatML's <|im_end|>
NO_THINK = "{% if enable_thinking is defined and not enable_thinking %}x y {% endif %}"
KW_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}" + NO_THINK +
               "{% endif %}{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
               "{% if add_generation_prompt %}assistant: " + NO_THINK + "{% endif %}")
OFF = {"enable_thinking": False}
CHAT = [{"role": "user", "content": "q: a"}]


def turn(text):
    return [{"role": "assistant", "content": text}]


def kw_tokenizer():
    tok = train_tokenizer(TEXTS, 48)
    tok.chat_template = KW_TEMPLATE
    return tok


def trl_ids(tok, messages, **kw):
    """TRL's RewardTrainer ids of a conversation: the template's tokens (with ``kw``), then eos."""
    ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])
    return ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]


def scored_ids(monkeypatch, model, tok, prompt, answer, run_kwargs):
    """The attended ids RL's RewardModelReward hands ``reward_scores`` for ``answer`` to
    ``prompt`` in a run whose ``data.chat_template_kwargs`` are ``run_kwargs``."""
    import rlhf_fast.models.loading as loading
    from rlhf_fast.algorithms.rewards import RewardContext, RewardModelReward

    seen = []

    def spy(model, ids, am):
        seen.append(ids[0][am[0].bool()].tolist())
        return torch.zeros(ids.shape[0])

    monkeypatch.setattr(loading, "reward_scores", spy)
    RewardModelReward(model, tok)(["ignored"], [answer], RewardContext(prompts=[prompt],
                                                                      chat_template_kwargs=run_kwargs))
    return seen[0]


def stub_reward_model(**attrs):
    from transformers import PretrainedConfig

    m = torch.nn.Linear(1, 1)
    m.config = PretrainedConfig(**attrs)
    return m


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-step tiny reward run on conversational pairs with ``chat_template_kwargs: {enable_thinking:
    "false"}`` (the CLI's text, read as YAML): (trainer, its final/ folder)."""
    from rlhf_fast.feedback.formats import PairRecord
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer

    out = tmp_path_factory.mktemp("rm")
    recs = [PairRecord(CHAT, turn("a b"), turn("b a")), PairRecord([{"role": "user", "content": "q: b"}],
                                                                   turn("b"), turn("a"))]
    cfg = RewardConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2", output_dir=str(out),
                       batch_size=2, max_steps=1, eval_every=0, log_every=1, max_len=64, device="cpu",
                       chat_template_kwargs={"enable_thinking": "false"})
    tr = RewardTrainer(cfg, train_records=recs, tokenizer=kw_tokenizer())
    tr.train()
    return tr, out / "final"


def test_reward_input_ids_render_a_conversational_response_with_the_kwargs():
    """A chat answer (messages) rendered with the template variables, as TRL's RewardTrainer
    renders a row with its chat_template_kwargs: the marker in both the prompt's and the turn's
    ids (they were dropped for the response: the prompt and answer disagreed)."""
    from rlhf_fast.feedback.formats import reward_input_ids

    tok = kw_tokenizer()
    with_kw = reward_input_ids(tok, CHAT, turn("a b"), chat_template_kwargs=OFF)
    assert with_kw == trl_ids(tok, CHAT + turn("a b"), **OFF)
    assert with_kw != reward_input_ids(tok, CHAT, turn("a b"))


def test_reward_config_reads_chat_template_kwargs():
    """The key exists (TRL's RewardConfig has none: TRL reads a row's own column), its text
    values are read as YAML, and apply_chat_template's own arguments are refused by name."""
    from rlhf_fast.trainers.reward import RewardConfig

    assert RewardConfig().chat_template_kwargs == {}
    assert RewardConfig(chat_template_kwargs={"enable_thinking": "false"}).chat_template_kwargs == OFF
    from rlhf_fast.trainers.config import load_config

    cli = load_config(RewardConfig, None, ["--chat_template_kwargs.enable_thinking", "false"])
    assert cli.chat_template_kwargs == OFF  # the bool, not the text 'false' (which a template reads as true)
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        RewardConfig(chat_template_kwargs={"add_generation_prompt": True})
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        RewardConfig(chat_template_kwargs=["enable_thinking"])


def test_reward_trainer_encodes_pairs_with_its_chat_template_kwargs(trained):
    """Each conversational pair is the template's rendering with the config's kwargs, then eos:
    TRL's ids of the same row with ``chat_template_kwargs: {enable_thinking: false}``."""
    tr, _ = trained
    chosen, rejected = tr.train_items[0]["seqs"]
    assert chosen == trl_ids(tr.tokenizer, CHAT + turn("a b"), **OFF)
    assert rejected == trl_ids(tr.tokenizer, CHAT + turn("b a"), **OFF)


def test_reward_trainer_saves_its_kwargs_and_rl_scores_at_the_trained_ids(trained, monkeypatch):
    """final/'s config records the kwargs next to the response format; loaded as RL loads it, the
    model is scored with them whatever the run's data.chat_template_kwargs (here none: TRL's
    GRPO would render without the marker, ids the head never saw)."""
    from transformers import AutoConfig

    from rlhf_fast.models.loading import load_reward_model

    tr, final = trained
    cfg = AutoConfig.from_pretrained(str(final))
    assert cfg.rlhf_fast_reward_format == "conversational"
    assert cfg.rlhf_fast_reward_chat_template_kwargs == OFF
    rm = load_reward_model(str(final))
    want = tr.train_items[0]["seqs"][0]
    assert scored_ids(monkeypatch, rm, tr.tokenizer, CHAT, "a b", {}) == want
    assert scored_ids(monkeypatch, rm, tr.tokenizer, CHAT, "a b", OFF) == want


def test_saved_empty_kwargs_win_over_the_runs(monkeypatch):
    """A model trained without template variables (saved {}) is scored without them even when
    the RL run sets some for its policy: its ids stay the trained ones."""
    tok = kw_tokenizer()
    rm = stub_reward_model(rlhf_fast_reward_format="conversational", rlhf_fast_reward_chat_template_kwargs={})
    assert scored_ids(monkeypatch, rm, tok, CHAT, "a b", OFF) == trl_ids(tok, CHAT + turn("a b"))


@pytest.mark.parametrize("reward_format", ["conversational", "text"])
def test_a_model_without_saved_kwargs_is_scored_with_the_runs(monkeypatch, reward_format):
    """An older or TRL folder (no saved kwargs) is scored with the run's data.chat_template_kwargs,
    as TRL's GRPO passes them to the reward model's template: the conversational answer turn
    carries the marker too (it was dropped for it), a text answer follows the rendered prompt."""
    from rlhf_fast.feedback.formats import render_prompt

    tok = kw_tokenizer()
    rm = stub_reward_model(rlhf_fast_reward_format=reward_format)
    got = scored_ids(monkeypatch, rm, tok, CHAT, "a b", OFF)
    if reward_format == "conversational":
        assert got == trl_ids(tok, CHAT + turn("a b"), **OFF)
    else:
        p = tok(render_prompt(CHAT, tok, chat_template_kwargs=OFF), add_special_tokens=False)["input_ids"]
        assert got == list(p) + list(tok("a b", add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
