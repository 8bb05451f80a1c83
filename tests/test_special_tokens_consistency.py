"""Special tokens (bos / eos / pad) of what each stage feeds the policy, against TRL 1.16 and
across our own stages: a policy must read the same prompt prefix when it is trained (SFT /
DPO rows, distillation's data rows, SDFT / SDPO teacher and student prompts) and when it
answers (the rollout engine, the eval / generate CLIs).

TRL's rule everywhere (GRPO / RLOO ``_tokenize_prompts``, SFT / DPO / reward ``_tokenize``, SDFT /
SDPO ``_tokenize_prompts``): a chat is ``apply_chat_template(..., tokenize=True)`` — the rendered
text WITHOUT the tokenizer's special tokens, the template writes its own (a bos where it wants
one) —, plain text is ``tokenizer(text)``, with them."""

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from rlhf_fast.models.tiny import CHAT_TEMPLATE, tiny_causal_lm, train_tokenizer  # noqa: E402
from rlhf_fast.trainers.rl_config import (DistillConfig, PPOConfig, RLConfig, RolloutConfig,  # noqa: E402
                                          SDFTConfig, SDPOConfig)
from tests.test_rl_learning import TEXTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# the tiny template without its leading "{{ bos_token }}": Llama-2 / Mistral-v0.1 style templates
# that leave the bos to the tokenizer (add_bos_token), i.e. apply_chat_template(tokenize=True) has none
NO_BOS_TEMPLATE = CHAT_TEMPLATE.replace("{% if bos_token %}{{ bos_token }}{% endif %}", "")
CHAT = [{"role": "user", "content": "q: a"}]


def bos_tokenizer(template: str):
    """A tokenizer that adds a bos on encode (add_bos), with chat template ``template``."""
    tok = train_tokenizer(TEXTS, 48, add_bos=True)
    tok.chat_template = template
    return tok


def policy(tok, seed=0):
    return tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=seed,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)


def trl_chat_ids(tok, messages):
    """TRL's prompt ids of a chat (GRPO / SFT / SDFT / SDPO / GKD): apply_chat_template, tokenized."""
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def engine_prompt_ids(engine, prompts):
    """The attended prompt ids of each row of a greedy 1-token rollout of ``prompts``."""
    b = engine.greedy(list(prompts), max_new_tokens=1)
    P = b.prompt_length
    return [r[m.bool()].tolist() for r, m in zip(b.input_ids[:, :P], b.attention_mask[:, :P])]


def config(tmp_path, estimator, **kw):
    return RLConfig(estimator=estimator, steps=1, output_dir=str(Path(tmp_path) / "run"), progress=False,
                    sample_every=0, rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                    ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4), **kw)


def test_rollout_chat_prompt_has_no_bos_its_template_does_not_write():
    """Template without bos, tokenizer that adds one: SFT / DPO rows (and TRL's GRPO, SFT, DPO)
    hold no bos before the chat, so the rollout (RL, ``rlhf-fast generate`` / ``eval``, which
    hand the engine the prompt rendered by ``render_prompt``) must not add one either; a plain
    text keeps the tokenizer's bos (TRL's GRPO ``processing_class(text=prompts)``)."""
    from rlhf_fast.feedback.formats import render_prompt
    from rlhf_fast.rollout import HFRolloutEngine
    from rlhf_fast.trainers.sft_data import completion_tokens

    tok = bos_tokenizer(NO_BOS_TEMPLATE)
    want = trl_chat_ids(tok, CHAT)
    assert tok.bos_token_id not in want
    sft_prompt, _ = completion_tokens(tok, CHAT, [{"role": "assistant", "content": "a b"}])
    assert sft_prompt == want  # our SFT / DPO / KTO / reward rows
    chat, text = engine_prompt_ids(HFRolloutEngine(policy(tok), tok), [render_prompt(CHAT, tok), "q: b"])
    assert text == tok("q: b")["input_ids"] and text[0] == tok.bos_token_id
    assert chat == want


def test_sdft_teacher_and_student_prompts_hold_the_templates_one_bos(tmp_path):
    """Template that writes the bos, tokenizer that adds one: TRL's SDFT tokenizes the teacher
    prompt with ``apply_chat_template`` (one bos); the student prompt (``generate_from_teacher``)
    is the one the rollout engine encodes (one bos)."""
    from rlhf_fast.rollout import HFRolloutEngine
    from rlhf_fast.trainers.sdft import SDFTTrainer

    tok = bos_tokenizer(CHAT_TEMPLATE)
    records = [{"prompt": CHAT, "privileged_context": "x y"}, {"prompt": CHAT, "privileged_context": "a b"}]
    tr = SDFTTrainer(config(tmp_path, "sdft", sdft=SDFTConfig(distillation_topk=7)), policy(tok), tok,
                     prompts=records)
    teacher = tr._teacher_ids["train"][0]
    assert teacher.count(tok.bos_token_id) == 1 and teacher[0] == tok.bos_token_id
    assert tr._student_ids["train"][0] == trl_chat_ids(tok, CHAT)
    assert tr._student_ids["train"] == engine_prompt_ids(HFRolloutEngine(tr.policy, tok), tr.prompts)


def test_sdpo_teacher_prompt_holds_the_templates_one_bos(tmp_path):
    """SDPO's teacher input: TRL's ``_tokenize_teacher_messages`` (``apply_chat_template`` of the
    reprompt, one bos) then the answer; ours had the tokenizer's bos before the template's."""
    from rlhf_fast.trainers.sdpo import SDPOTrainer

    tok = bos_tokenizer(CHAT_TEMPLATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = SDPOTrainer(config(tmp_path, "sdpo", sdpo=SDPOConfig()), policy(tok), tok, prompts=[CHAT, CHAT],
                         reward_fns=[lambda prompts, completions, **k: [1.0] * len(completions)])
    answer = torch.tensor([tok("a b", add_special_tokens=False)["input_ids"]] * 2)
    ids, am, _, _ = tr.teacher_inputs([CHAT, CHAT], answer, torch.ones_like(answer), [1.0, 0.0], [None, None])
    row = ids[1][am[1].bool()].tolist()  # the failed answer, reprompted with the successful one
    assert row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1


def test_distill_data_rows_prompt_is_the_rollouts(tmp_path):
    """``distill.lmbda`` < 1 trains on the data's completions after the prompt "as the rollout
    engine encodes it" (and as TRL's GKD / SFT collator: ``apply_chat_template``): one bos where
    the template writes it, not the tokenizer's second one, so the off-policy and on-policy
    steps condition on the same prompt tokens."""
    from rlhf_fast.trainers.distill import DistillationTrainer
    from tests.test_distill import make_config, make_teacher

    tok = bos_tokenizer(CHAT_TEMPLATE)
    records = [{"prompt": CHAT, "completion": [{"role": "assistant", "content": "a b"}]}] * 4
    cfg = make_config(Path(tmp_path), 1.0, distill=DistillConfig(beta=1.0, lmbda=0.0))
    tr = DistillationTrainer(cfg, policy(tok), tok, prompts=records, teacher_model=make_teacher(tok))
    prompt, completion, _ = tr.completion_ids(0)
    assert prompt == trl_chat_ids(tok, CHAT)
    assert prompt == tr.engine._encode([tr.prompts[0]])[0][0]


# a ChatML-like template: each turn closed by the eos token and a newline (Qwen2.5-Instruct's
# <|im_end|>\n with eos <|im_end|>), so a rendered assistant turn ends with "\n", not with the eos
TURN_EOS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")


def rl_scored_ids(monkeypatch, model, tok, prompt, answer):
    """The attended ids RL's RewardModelReward hands ``reward_scores`` for ``answer`` to ``prompt``."""
    import rlhf_fast.models.loading as loading
    from rlhf_fast.algorithms.rewards import RewardContext, RewardModelReward

    seen = []

    def spy(model, ids, am):
        seen.append(ids[0][am[0].bool()].tolist())
        return torch.zeros(ids.shape[0])

    monkeypatch.setattr(loading, "reward_scores", spy)
    RewardModelReward(model, tok)(["ignored"], [answer], RewardContext(prompts=[prompt]))
    return seen[0]


def stub_reward_model(reward_format=None):
    """A module standing in for a reward model, its config recording ``reward_format`` (or nothing)."""
    from transformers import PretrainedConfig

    m = torch.nn.Linear(1, 1)
    kw = {} if reward_format is None else {"rlhf_fast_reward_format": reward_format}
    m.config = PretrainedConfig(**kw)
    return m


def test_rl_scores_a_chat_answer_at_the_ids_a_conversational_reward_model_trained_on(monkeypatch):
    """The reward trainer encodes a conversational pair's response as the template's turn and
    an eos after it ("a b<eos>\\n<eos>"); RL scored the policy's answer to that chat prompt
    as the answer text and an eos ("a b<eos>"), so the head was read after tokens it never saw
    in training. TRL reads both at the same ids: its RewardTrainer renders the conversation,
    its GRPO renders the prompt + the answer as an assistant message with the same template.
    A model whose config records conversational training now reads the answer as that turn."""
    from rlhf_fast.trainers.reward import _encode

    tok = bos_tokenizer(TURN_EOS_TEMPLATE)
    trained = _encode(tok, CHAT, [{"role": "assistant", "content": "a b"}], 512)
    assert rl_scored_ids(monkeypatch, stub_reward_model("conversational"), tok, CHAT, "a b") == trained
    # a text prompt has no turns: read as text, as the trainer encodes text pairs
    assert rl_scored_ids(monkeypatch, stub_reward_model("conversational"), tok, "q: a", " a b") == \
        _encode(tok, "q: a", " a b", 512)


@pytest.mark.parametrize("reward_format", ["text", "mixed", None])
def test_rl_scores_a_text_or_unmarked_reward_model_at_the_text_ids(monkeypatch, reward_format):
    """A reward model trained on (chat prompt, text response) pairs, on a mix, or whose config
    says nothing (older folders, TRL's, hand-built) is scored as before: rendered prompt, the
    answer text, eos — the ids a text pair trains at."""
    from rlhf_fast.trainers.reward import _encode

    tok = bos_tokenizer(TURN_EOS_TEMPLATE)
    text_ids = _encode(tok, CHAT, "a b", 512)
    assert text_ids != _encode(tok, CHAT, [{"role": "assistant", "content": "a b"}], 512)
    assert rl_scored_ids(monkeypatch, stub_reward_model(reward_format), tok, CHAT, "a b") == text_ids


@pytest.mark.parametrize("conversational", [True, False])
def test_reward_trainer_saves_its_response_format_and_rl_scores_the_folder_with_it(tmp_path, monkeypatch,
                                                                                   conversational):
    """A tiny reward run records in final/'s config whether it trained on conversational or text
    responses; the folder, loaded as RL loads it, is scored at the ids it trained on."""
    from transformers import AutoConfig

    from rlhf_fast.feedback.formats import PairRecord
    from rlhf_fast.models.loading import load_reward_model
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, _encode

    tok = bos_tokenizer(TURN_EOS_TEMPLATE)
    turn = (lambda t: [{"role": "assistant", "content": t}]) if conversational else (lambda t: t)
    recs = [PairRecord(CHAT, turn("a b"), turn("b a")), PairRecord([{"role": "user", "content": "q: b"}],
                                                                   turn("b"), turn("a"))]
    cfg = RewardConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2",
                       output_dir=str(tmp_path / "rm"), batch_size=2, max_steps=1, eval_every=0, log_every=1,
                       max_len=64, device="cpu")
    RewardTrainer(cfg, train_records=recs, tokenizer=tok).train()
    final = tmp_path / "rm" / "final"
    want = "conversational" if conversational else "text"
    assert AutoConfig.from_pretrained(str(final)).rlhf_fast_reward_format == want
    assert rl_scored_ids(monkeypatch, load_reward_model(str(final)), tok, CHAT, "a b") == \
        _encode(tok, CHAT, turn("a b"), 1024)


def test_reward_response_format_of_records():
    """Every response chat messages: conversational; every one text: text; both: mixed."""
    from rlhf_fast.feedback.formats import PairRecord, RankingRecord, ScoreRecord
    from rlhf_fast.trainers.reward import reward_response_format

    msg = [{"role": "assistant", "content": "a"}]
    conv, text = PairRecord(CHAT, msg, msg + msg), PairRecord(CHAT, "a", "b")
    assert reward_response_format([conv, conv]) == "conversational"
    others = [ScoreRecord("p", "r", 1.0), RankingRecord("p", ["a", "b"], [0, 1])]
    assert reward_response_format([text, *others]) == "text"
    assert reward_response_format([conv, text]) == "mixed"


def test_local_judge_reads_its_prompt_with_the_tokenizers_bos(monkeypatch):
    """The local judge's prompt is plain text (the pair / score template filled in): the model
    reads it with the tokenizer's special tokens, as ``tokenizer(text)`` / transformers'
    pipelines / TRL's plain-text prompts give it — a Llama-style model (add_bos_token) scored
    without its bos reads another distribution. Ours encoded it with add_special_tokens=False."""
    import rlhf_fast.models.logprobs as logprobs
    from rlhf_fast.feedback.judge import LocalBackend

    tok = bos_tokenizer(CHAT_TEMPLATE)
    seen = []

    def spy(model, ids, am, response_mask=None, **kw):
        seen.extend(r[m.bool()].tolist() for r, m in zip(ids, am))
        return torch.zeros(ids.shape, dtype=torch.float32)

    monkeypatch.setattr(logprobs, "sequence_logprobs", spy)
    LocalBackend(policy(tok), tok).prefer_first("q: a or b?")
    want = tok("q: a or b?")["input_ids"]
    assert want[0] == tok.bos_token_id
    assert len(seen) == 2 and all(r[:len(want)] == want for r in seen)
