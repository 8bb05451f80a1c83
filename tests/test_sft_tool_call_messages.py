"""SFT conversations whose assistant turn only calls a tool (``tool_calls`` with empty, None or
missing ``content``), as TRL's SFTTrainer accepts them: the loader keeps them as written, the
ids are ``apply_chat_template``'s on the same messages and the assistant-only mask is
transformers' ``{% generation %}`` mask (the tool-call turn trains as an assistant turn, the
``tool`` result does not); malformed tool calls still raise a ValueError naming the field."""

import json

import pytest

from rlhf_fast.feedback.formats import load_records, record_texts
from rlhf_fast.trainers.sft import record_text
from rlhf_fast.trainers.sft_data import chat_tokens

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SPECIALS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
# ChatML that writes an assistant's tool calls inside its {% generation %} block, as Qwen-style templates do
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CALL = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]


def _conversation(assistant_call):
    return [{"role": "user", "content": "what is 2 plus 3"}, assistant_call,
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "assistant", "content": "it is 5"}]


CALL_TURNS = {"empty": {"role": "assistant", "content": "", "tool_calls": CALL},
              "none": {"role": "assistant", "content": None, "tool_calls": CALL},
              "missing": {"role": "assistant", "tool_calls": CALL}}


@pytest.fixture(scope="module")
def tool_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    tok = train_tokenizer(sample_texts(32) + ["what is 2 plus 3 add it is 5 assistant user tool"], 300,
                          padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _load(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(str(path), "sft")


@pytest.mark.parametrize("form", sorted(CALL_TURNS))
def test_tool_call_turn_loads_and_renders_as_apply_chat_template(tmp_path, tool_tok, form):
    messages = _conversation(CALL_TURNS[form])
    (rec,) = _load(tmp_path, [{"messages": messages}])
    assert rec.messages == messages  # kept as written: the template reads tool_calls itself
    ids, mask = chat_tokens(tool_tok, rec.messages, assistant_only=True)
    ref = tool_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"]) and mask == list(ref["assistant_masks"])
    call_id = tool_tok.convert_tokens_to_ids("<tool_call>")
    assert call_id in ids and mask[ids.index(call_id)] == 1  # the tool-call turn trains
    five = tool_tok.apply_chat_template(messages[:3], tokenize=True)
    assert not any(mask[len(tool_tok.apply_chat_template(messages[:2], tokenize=True)):len(five)])  # tool result
    assert isinstance(record_text(rec), str) and record_texts(rec) == ["", "it is 5"]


@pytest.mark.parametrize("bad, field", [
    ({"role": "assistant", "content": "", "tool_calls": {"name": "add"}}, "messages[1].tool_calls"),
    ({"role": "assistant", "content": None}, "messages[1]"),
    ({"role": "assistant"}, "messages[1]"),
    ({"role": "assistant", "content": "", "tool_calls": []}, "messages[1]"),
    ({"role": "assistant", "content": "ok", "tool_calls": "add(2, 3)"}, "messages[1].tool_calls"),
])
def test_malformed_tool_calls_are_refused(tmp_path, bad, field):
    with pytest.raises(ValueError, match=r"d\.jsonl:1: " + field.replace("[", r"\[").replace("]", r"\]")):
        _load(tmp_path, [{"messages": _conversation(bad)}])


@pytest.mark.parametrize("kind", ["pairs", "sft"])
def test_tool_calls_outside_sft_messages_are_refused_not_dropped(tmp_path, kind):
    """A prompt or a pair's response keeps only role and content: a tool call there is refused
    (naming the field), not silently dropped from what trains."""
    turn = {"role": "assistant", "content": "", "tool_calls": CALL}
    row = ({"prompt": "add 2 and 3", "chosen": [turn], "rejected": [{"role": "assistant", "content": "6"}]}
           if kind == "pairs" else {"prompt": [{"role": "user", "content": "add"}, turn], "completion": "5"})
    field = r"chosen\[0\]\.tool_calls" if kind == "pairs" else r"prompt\[1\]\.tool_calls"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: " + field):
        load_records(str(path), kind)
