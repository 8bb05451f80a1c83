"""SFT token rows for conversations: ``{"messages": [...]}`` rendered with the tokenizer's chat
template, and the mask of the tokens that train; and the tokens of conversational responses
(preference pairs, KTO completions) after their prompt, by the same rule (:func:`completion_tokens`);
and the fixed-length chunks of SFT's ``packing_strategy: wrapped`` (:func:`pack_wrapped`).

The mask works with any chat template, with or without ``{% generation %}`` markers: the
conversation's prefixes are rendered message by message and their token ids compared. Assistant
turn k (``messages[k]``) trains the tokens after ``messages[:k]`` rendered with the generation
prompt (for an assistant turn that opens the conversation, k = 0, after what the template writes
before its content), up to the end of ``messages[:k+1]``: its content and whatever the template writes to
close the turn (an end-of-turn token such as ``<|im_end|>`` / ``<|eot_id|>``, and the separator
after it). The end-of-turn token must train, or the model never learns to stop; the role header
(the generation prompt) must not, since at inference it is given, not generated. Where a
template's ``{% generation %}`` block holds exactly content and close (TRL's llama3 training
template, for one) this is the mask of transformers' ``return_assistant_tokens_mask``; TRL's
ChatML training templates also put the newline that ends the generation prompt inside the
block, one token this mask leaves out.

A template is usable when each rendered prefix is a token prefix of the whole conversation
(appending messages does not re-render earlier ones); one that is not (e.g. one that drops
the reasoning of earlier assistant turns) raises a ValueError naming the message, rather than
training on a misaligned mask.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple


def _render_ids(tokenizer, messages: Sequence[Dict[str, Any]], add_generation_prompt: bool,
                chat_template_kwargs: Optional[Dict[str, Any]] = None) -> List[int]:
    """Token ids of ``messages`` rendered by the chat template, as ``apply_chat_template(...,
    tokenize=True)`` encodes them (the rendered text without the tokenizer's special tokens:
    the template writes its own, e.g. bos). ValueError (not jinja's TemplateError) when the
    template refuses the messages (its ``raise_exception``: Gemma's "System role not
    supported", Mistral's roles that must alternate). ``chat_template_kwargs``: extra variables
    the template reads (e.g. ``{"enable_thinking": False}``)."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **(chat_template_kwargs or {}))
    except TemplateError as e:
        raise ValueError(f"the chat template refuses the conversation ({type(e).__name__}: {e})") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def continuation_ids(tokenizer, prompt_text: str, prompt_ids: Sequence[int], text: str, *,
                     add_special_tokens: bool) -> List[int]:
    """The token ids (int list) of ``text`` written after ``prompt_text``, whose ids are
    ``prompt_ids`` (encoded with ``add_special_tokens``): ``prompt_text + text`` encoded whole
    and the prompt's ids cut off, where they start it (TRL's SFT / OpenRLHF's rule); else — a
    token merging across the boundary — ``text`` encoded alone (no special tokens), so the
    prompt keeps the ids generation conditions on. Not alone first: a SentencePiece tokenizer
    (Llama-2, Mistral-v0.1, Phi-3) writes a prefix space before the first word of every text it
    encodes, "red" alone is "▁red" where after "\\n" it is "red"."""
    full = list(tokenizer(prompt_text + text, add_special_tokens=add_special_tokens)["input_ids"])
    n = len(prompt_ids)
    if len(full) > n and full[:n] == list(prompt_ids):
        return full[n:]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _divergence(tokenizer, prefix: List[int], full: List[int]) -> str:
    n = 0
    while n < min(len(prefix), len(full)) and prefix[n] == full[n]:
        n += 1
    return (f"at token {n}: the prefix renders {tokenizer.decode(prefix[n:n + 8])!r}, the whole conversation "
            f"{tokenizer.decode(full[n:n + 8])!r}")


# an assistant content no template writes by itself: where it lands in the rendered turn, the header ends
_CONTENT_MARK = "<<rlhf_fast:assistant_content>>"
# the fields of an assistant message that hold what the model generates (besides content): left out of
# the opening turn rendered for its header, where a template writing them before the content would put them
_GENERATED_FIELDS = ("reasoning_content", "reasoning", "thinking", "tool_calls")


def _opening_head(tokenizer, message: Dict[str, Any]) -> List[int]:
    """The token ids (int list) the chat template writes before the content of ``message``, an
    assistant turn that opens the conversation: its header (a bos, a default system prompt, the
    role line), which the mask leaves out as it leaves out a later turn's generation prompt.
    ``messages[:0]`` cannot be rendered (transformers refuses an empty conversation), so the turn
    is rendered with a marker for its content and the text before the marker encoded; ValueError
    when the template does not write the content as given."""
    header_only = {k: v for k, v in message.items() if k not in _GENERATED_FIELDS}
    text = tokenizer.apply_chat_template([{**header_only, "content": _CONTENT_MARK}], tokenize=False,
                                         add_generation_prompt=False)
    at = text.find(_CONTENT_MARK)
    if at < 0:
        raise ValueError("the template does not write an opening assistant message's content as given")
    return list(tokenizer(text[:at], add_special_tokens=False)["input_ids"])


def check_chat_template(tokenizer) -> None:
    """ValueError unless ``tokenizer`` has a chat template (conversational records need one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the data holds conversations ({'messages': [...]}) but the tokenizer has no chat template: "
                         "use a model folder whose tokenizer has one, or set tokenizer.chat_template")


def chat_tokens(tokenizer, messages: Sequence[Dict[str, Any]], *, assistant_only: bool) -> Tuple[List[int], List[int]]:
    """``(input_ids, mask)`` of one conversation, two int lists of the same length: the ids as
    ``apply_chat_template(messages, tokenize=True)`` gives them, and 1 where the token trains.
    ``assistant_only`` False: every token; True: the tokens of every assistant turn (content
    and the template's end of turn, see the module docstring). ValueError when the tokenizer
    has no chat template, or when the template is not prefix-stable where the mask needs it."""
    check_chat_template(tokenizer)
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    if not assistant_only:
        return full, [1] * len(full)
    mask = [0] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:  # (transformers renders no empty conversation: an opening turn's header is found in it)
            head = (_render_ids(tokenizer, messages[:k], add_generation_prompt=True) if k
                    else _opening_head(tokenizer, m))
            turn = _render_ids(tokenizer, messages[:k + 1], add_generation_prompt=False)
        except Exception as e:  # a template that cannot render this prefix (e.g. no message before the turn)
            raise ValueError(f"assistant_only_loss: the chat template cannot render the conversation up to "
                             f"messages[{k}] ({type(e).__name__}: {e}), which the per-turn mask needs") from None
        for name, ids in (("with the generation prompt", head), ("", turn)):
            if full[:len(ids)] != ids:
                what = f"messages[:{k}] {name}" if k else "messages[0]'s header"  # (k 0: _opening_head)
                what = what if name else f"messages[:{k + 1}]"
                raise ValueError(f"assistant_only_loss: the chat template is not prefix-stable: {what} does not render "
                                 f"as the start of the whole conversation ({_divergence(tokenizer, ids, full)}); "
                                 "use a template that renders earlier messages the same whatever follows, "
                                 "or assistant_only_loss: false")
        if len(turn) < len(head):
            raise ValueError(f"assistant_only_loss: messages[{k}] renders shorter than its generation prompt")
        for t in range(len(head), len(turn)):
            mask[t] = 1
    return full, mask


_warned_split = False


def completion_tokens(tokenizer, prompt: Sequence[Dict[str, Any]], *completions: Sequence[Dict[str, Any]],
                      chat_template_kwargs: Optional[Dict[str, Any]] = None
                      ) -> Tuple[List[int], List[List[int]]]:
    """``(prompt ids, [completion ids, ...])`` of a chat prompt and one or more completions (lists
    of messages: a pair's chosen and rejected, a KTO completion), int lists. The rule of an
    assistant turn's mask in :func:`chat_tokens`: the prompt rendered with the generation prompt,
    then what the template writes for the completion's turns after it — content and end of turn
    (no eos is added), so the model learns to end its turn; prompt + completion ids are exactly
    ``apply_chat_template(prompt + completion, tokenize=True)``. Where the rendered prompt is not
    a token prefix of a rendered prompt + completion (a template that renders the prompt alone
    differently, or a token merging across the boundary, e.g. "assistant: " + "hi" → " hi"), the
    prompt is cut to the tokens all of them share and each completion starts there, with a
    warning — TRL's DPO / KTO ``common_prefix_length`` rule, so the ids equal TRL's for any
    template (the sft mask refuses such templates instead: it has no prompt to cut).
    ``chat_template_kwargs``: extra template variables, for the prompt and every completion alike
    (the reward trainer's ``chat_template_kwargs``, as TRL renders a row with its own)."""
    global _warned_split
    check_chat_template(tokenizer)
    if isinstance(prompt, str):
        raise ValueError("conversational completions (chat messages) need a chat prompt (a list of messages), got text")
    kw = chat_template_kwargs
    head = _render_ids(tokenizer, prompt, add_generation_prompt=True, chat_template_kwargs=kw)
    fulls = [_render_ids(tokenizer, list(prompt) + list(c), add_generation_prompt=False,
                         chat_template_kwargs=kw) for c in completions]
    n = len(head)
    for full in fulls:
        k = 0
        while k < min(n, len(full)) and head[k] == full[k]:
            k += 1
        n = k
    if n < len(head) and not _warned_split:
        _warned_split = True
        warnings.warn(f"the chat template's prompt is not a token prefix of prompt + completion "
                      f"({_divergence(tokenizer, head, fulls[0])}): the completion starts where they part and the "
                      f"prompt's last {len(head) - n} token(s) are left out, as TRL does (shown once)", stacklevel=2)
    return head[:n], [full[n:] for full in fulls]


# datasets' ``Dataset.map(batched=True)`` hands TRL's ``_pack_wrapped`` (trl/data_utils.py) 1000
# rows at a time (its default batch_size) and each call wraps only its own rows, so TRL's chunks
# restart at every 1000th document; kept, so the rows equal TRL's for any number of documents
WRAP_BLOCK = 1000


def pack_wrapped(rows: Sequence[Dict[str, List[int]]], seq_length: int, *, block: int = WRAP_BLOCK
                 ) -> List[Dict[str, List[int]]]:
    """TRL's ``pack_dataset(..., strategy="wrapped")``: the token rows ``{"input_ids",
    "response_mask"}`` (int lists of equal length per row) concatenated in order and cut into
    chunks of ``seq_length`` tokens (the last of each ``block`` of rows shorter), documents
    split wherever a boundary falls; each chunk's mask cut alike. The chunks then train as
    ordinary rows: one causal attention over the chunk, positions 0..len-1, so a token attends
    to the documents before it in its chunk (TRL's collator gives wrapped rows an all-ones
    attention mask and no per-document position ids)."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length <= 0:
        raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
    out: List[Dict[str, List[int]]] = []
    for b in range(0, len(rows), block):
        ids = [t for r in rows[b:b + block] for t in r["input_ids"]]
        mask = [m for r in rows[b:b + block] for m in r["response_mask"]]
        out += [{"input_ids": ids[i:i + seq_length], "response_mask": mask[i:i + seq_length]}
                for i in range(0, len(ids), seq_length)]
    return out


__all__ = ["chat_tokens", "check_chat_template", "completion_tokens", "continuation_ids", "pack_wrapped",
           "WRAP_BLOCK"]
