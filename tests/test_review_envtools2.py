"""Review of multi-turn tool rollouts (rlhf_fast.rollout.tools, the trainer's tool set-up)
against TRL 1.16's GRPOTrainer: one test per defect found.

1. The Hermes parser (tokenizers without a response template) ran a ``<tool_call>`` the
   model wrote inside its ``<think>`` reasoning: TRL's Qwen3 response template reads it as
   reasoning, runs nothing and keeps the answer's content after ``</think>``.
2. With a chat template whose tool calls are not Hermes JSON blocks (Qwen3.5 / 3.6's XML
   calls, Llama 3.1 / 3.2, GLM-4-MoE, GPT-OSS) every start-up check passed, yet no answer's
   call was ever parsed: the tools silently never ran (``tools/call_frequency`` 0). TRL sets
   the response template of those templates (``add_response_schema``) and runs them; ours
   now refuses such a template at start-up, naming ``tokenizer.response_template``.
3. ``reward.process_aggregation: steps`` with a rollout function's ``env_mask`` holes put every
   step after an environment turn on the answer's last token (tools are refused for the same
   reason; such a batch now is too).
4. With ``rollout.tool_timeout``, an async tool's own ``TimeoutError`` (an HTTP client's) came
   back as "Tool NAME timed out after T s." instead of the tool's ``{"error": str(e)}``.
"""

import copy

import pytest

from rlhf_fast.rollout import SamplingParams
from rlhf_fast.rollout import tools as T
from tests.test_rl_tools import (CHATS, ScriptedEngine, _config, calculator, call_text, ids_of, make_policy,
                                 tok)  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _prompt(tok):
    return ids_of(tok, tok.apply_chat_template(CHATS[0], tools=[calculator], tokenize=False,
                                               add_generation_prompt=True))


# ----------------------------------------------------------------------------- 1. calls inside <think>


@pytest.mark.parametrize("answer", [
    "<think>\nmaybe " + call_text() + "\n</think>\n\nthe answer is 3<|im_end|>",  # a call thought about only
    "<think>\nI will add.\n</think>\n\n" + call_text() + "<|im_end|>",  # reasoning, then a real call
    "<think>\n\n</think>\n\nthe answer is 3<|im_end|>",
])
def test_hermes_parser_reads_think_blocks_as_trl(tok, answer):
    from trl.chat_template_utils import parse_response, qwen3_template

    prompt, ids = _prompt(tok), ids_of(tok, answer)
    ours = T.parse_turn(tok, ids, prompt, [calculator])
    t = copy.deepcopy(tok)
    t.response_template = qwen3_template
    trl = parse_response(t, ids, prefix=prompt, tools=[calculator])
    assert ours.get("tool_calls") == trl.get("tool_calls")
    assert ours["content"].strip() == trl["content"].strip()
    assert (ours.get("reasoning_content") or "").strip() == (trl.get("reasoning_content") or "").strip()


def test_call_inside_think_is_not_run(tok):
    """The whole loop: an answer that only mentions a call in its reasoning runs no tool."""
    eng = ScriptedEngine(tok, lambda p, row: "<think>\nmaybe " + call_text() + "\n</think>\n\nit is 3")
    batch, st = T.tool_rollout(eng, [_prompt(tok)], SamplingParams(max_new_tokens=200), tools=[calculator],
                               tokenizer=tok)
    assert st.calls == 0 and len(eng.calls) == 1
    assert int(batch.response_mask.sum()) == int(batch.attention_mask[:, batch.prompt_length:].sum())  # no holes


# ----------------------------------------------------------------------------- 2. unparsed call formats


@pytest.mark.parametrize("template", ["qwen3_5_nothink_chat_template", "llama3_1_chat_template"])
def test_template_whose_calls_are_not_parsed_is_refused(tmp_path, tok, template):
    """Such a template passed every check and the tools never ran; now it is refused naming
    the response template to set — and with TRL's template for it set, the run starts and an
    answer's call (as the chat template writes it) parses to the call."""
    import trl.chat_template_utils as C

    from rlhf_fast.trainers.rl import RLTrainer

    t = copy.deepcopy(tok)
    t.chat_template = getattr(C, template)
    cfg = _config(tmp_path)
    with pytest.raises(ValueError, match="response_template"):
        RLTrainer(cfg, make_policy(t), t, reward_fns=[lambda prompts, completions: [0.0] * len(prompts)],
                  prompts=CHATS, tools=[calculator])
    C.add_response_schema(t)  # TRL's response template of this chat template
    RLTrainer(cfg, make_policy(t), t, reward_fns=[lambda prompts, completions: [0.0] * len(prompts)],
              prompts=CHATS, tools=[calculator])
    call = [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1+2"}}}]
    head = t.apply_chat_template(CHATS[0], tools=[calculator], tokenize=False, add_generation_prompt=True)
    full = t.apply_chat_template(CHATS[0] + [{"role": "assistant", "content": "", "tool_calls": call}],
                                 tools=[calculator], tokenize=False)
    assert full.startswith(head)
    parsed = T.parse_turn(t, ids_of(t, full[len(head):]), ids_of(t, head), [calculator])
    assert parsed.get("tool_calls") == call


def test_hermes_templates_still_start(tmp_path, tok):
    """The check refuses only what it cannot parse: the Hermes template of these tests (and
    Qwen2.5's) starts as before."""
    import trl.chat_template_utils as C

    from rlhf_fast.trainers.rl import RLTrainer

    for template in (tok.chat_template, C.qwen2_5_chat_template):
        t = copy.deepcopy(tok)
        t.chat_template = template
        RLTrainer(_config(tmp_path), make_policy(t), t, prompts=CHATS, tools=[calculator],
                  reward_fns=[lambda prompts, completions: [0.0] * len(prompts)])


# ----------------------------------------------------------------------------- 3. dense rewards over env tokens


def test_step_rewards_refuse_environment_holes(tmp_path, tok):
    """``reward.process_aggregation: steps`` maps each step's end in the answer's text to the
    policy's token that ends it; tools are refused for that reason (their text is not the
    policy's tokens). A rollout function's ``env_mask`` holes are the same case: the text holds
    the environment's tokens, the mask does not, so every step after an environment turn
    landed on the answer's last token. Here a step ending at " answer" (after the
    environment's "\\n3\\n") was put on the eos."""
    from types import SimpleNamespace

    import torch

    from tests.test_rl_rollout_func import Scripted
    from tests.test_rl_rollout_func import _trainer as rf_trainer

    tr = rf_trainer(tmp_path, tok, Scripted(tok))
    batch, _, _ = tr._generate(0)
    ids, am, rm = tr._batch_masks(batch)
    holes = (am & ~rm)[:, batch.prompt_length:].any(1)
    assert holes.any()
    texts = batch.response_texts
    out = SimpleNamespace(steps=[[(t.find(" answer") + len(" answer"), 1.0)] if " answer" in t else []
                                 for t in texts])
    with pytest.raises(ValueError, match="process_aggregation"):
        tr._step_rewards(batch, out, torch.arange(batch.batch_size), ids, rm)
    # the rows without environment tokens still get their step rewards, on the token ending " answer"
    keep = (~holes).nonzero(as_tuple=True)[0]
    dense = tr._step_rewards(batch, out, keep, ids[keep], rm[keep])
    for j, i in enumerate(keep.tolist()):
        cols = dense[j].nonzero(as_tuple=True)[0].tolist()
        if " answer" not in texts[i]:
            assert cols == []
            continue
        P = batch.prompt_length
        k = cols[0] - P  # the step's token ends " answer" and the text before it is shorter
        assert len(cols) == 1 and tok.decode(ids[i, P:P + k + 1]).endswith(" answer")
        assert not tok.decode(ids[i, P:P + k]).endswith(" answer")


# ----------------------------------------------------------------------------- 4. an async tool's own TimeoutError


async def upstream(q: str) -> str:
    """Ask a service that answers with a timeout of its own.

    Args:
        q: The question.
    """
    raise TimeoutError("upstream 504")


def test_async_tools_own_timeout_error_is_its_error():
    """With ``rollout.tool_timeout`` an async tool that raises a TimeoutError of its own (an
    HTTP client's) at once was reported as ``Tool upstream timed out after 30 s.``: a wrong
    message to the model. TRL (and our sync path) give the tool's ``{"error": str(e)}``."""
    calls = [{"type": "function", "function": {"name": "upstream", "arguments": {"q": "x"}}}]
    for timeout in (None, 30.0):
        res, failures = T.run_tool_calls(calls, {"upstream": upstream}, timeout)
        assert res == [("upstream", {"error": "upstream 504"})] and failures == 1


def test_observation_after_content_blocks_is_one_more_text_block():
    """reset()'s observation after a last message whose content is a list of blocks is appended
    as a text block, as TRL's GRPOTrainer does (it raised a TypeError: list + str); the record is
    left untouched."""
    from rlhf_fast.rollout.environments import with_observation

    prompt = [{"role": "user", "content": [{"type": "text", "text": "Guess the number."}]}]
    got = with_observation(prompt, " It is between 1 and 10.")
    assert got == [{"role": "user", "content": [{"type": "text", "text": "Guess the number."},
                                                {"type": "text", "text": " It is between 1 and 10."}]}]
    assert prompt == [{"role": "user", "content": [{"type": "text", "text": "Guess the number."}]}]
    assert with_observation([{"role": "user", "content": "a"}], "b") == [{"role": "user", "content": "ab"}]
