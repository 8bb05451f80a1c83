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


@pytest.mark.xfail(strict=True, reason="an RM trained on conversational pairs is scored in RL at other ids")
def test_rl_scores_a_chat_answer_at_the_ids_a_conversational_reward_model_trained_on(monkeypatch):
    """The reward trainer encodes a conversational pair's response as the template's turn and
    an eos after it ("a b<eos>\\n<eos>"); RL scores the policy's answer to that chat prompt
    as the answer text and an eos ("a b<eos>"), so the head is read after tokens it never saw
    in training. TRL reads both at the same ids: its RewardTrainer renders the conversation,
    its GRPO renders the prompt + the answer as an assistant message with the same template."""
    import rlhf_fast.models.loading as loading
    from rlhf_fast.algorithms.rewards import RewardContext, RewardModelReward
    from rlhf_fast.trainers.reward import _encode

    tok = bos_tokenizer(TURN_EOS_TEMPLATE)
    trained = _encode(tok, CHAT, [{"role": "assistant", "content": "a b"}], 512)
    seen = []

    def spy(model, ids, am):
        seen.append(ids[0][am[0].bool()].tolist())
        return torch.zeros(ids.shape[0])

    monkeypatch.setattr(loading, "reward_scores", spy)
    RewardModelReward(torch.nn.Linear(1, 1), tok)(["ignored"], ["a b"], RewardContext(prompts=[CHAT]))
    assert seen[0] == trained


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
