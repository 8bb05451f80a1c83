"""Tool calling in rollouts: TRL GRPOTrainer's ``tools`` and ``max_tool_calling_iterations``.

The policy answers; the tool calls in its answer are parsed, the tools run, their results are
rendered with the tokenizer's chat template and appended to the sequence, and generation goes
on from the grown sequence — up to ``max_iterations`` rounds and never past the completion
budget ``params.max_new_tokens``. The result is one :class:`RolloutBatch` whose response holds
the model's tokens and the tool results' tokens; ``response_mask`` (and ``behaviour_logp``) is
0 on the latter: holes in the row that every op treats as absent from the loss, while the
policy still reads them as context (``attention_mask`` 1).

Read top to bottom: tools as callables (names, JSON schemas, loading from ``module:function``)
→ whether a chat template can render a tool exchange → parsing an answer's tool calls (the
tokenizer's response template when it has one, else the Hermes / Qwen ``<tool_call>`` JSON
format) → running them → the token ids of their results (TRL's ``_get_tool_suffix_ids``) → the
multi-turn loop over a :class:`~rlhf_fast.rollout.types.RolloutEngine`
(TRL's ``_tool_call_loop``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .types import Prompts, RolloutBatch, RolloutEngine, SamplingParams

# the Hermes format Qwen2.5 / Qwen3 / many fine-tunes emit: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.+?)\s*</tool_call>", re.S)


# ----------------------------------------------------------------------------- tools as callables


def tool_name(fn: Callable) -> str:
    """The name a model calls ``fn`` by: its ``__name__`` (a bound method's too), as
    transformers' ``get_json_schema`` names it in the prompt."""
    return getattr(fn, "__name__", type(fn).__name__)


def tool_schemas(tools: Sequence[Callable], key: str = "tools") -> List[dict]:
    """The JSON schema of each tool (``transformers.utils.get_json_schema``: name, docstring
    description, typed arguments with their ``Args:`` descriptions), as ``apply_chat_template``
    renders them. A tool it cannot describe (no docstring, an argument without a type hint or
    description) is a ValueError naming ``key[i]``."""
    from transformers.utils import get_json_schema

    out = []
    for i, fn in enumerate(tools):
        try:
            out.append(get_json_schema(fn))
        except Exception as e:  # noqa: BLE001 - DocstringParsingException, TypeHintParsingException, ...
            raise ValueError(f"{key}[{i}] ({tool_name(fn)!r}): transformers.get_json_schema cannot describe it to "
                             f"the model ({e}); give it a Google-style docstring with an Args: entry and a type "
                             f"hint for every argument") from None
    return out


def check_tools(tools: Sequence[Callable], key: str = "tools") -> Dict[str, Callable]:
    """``{name: tool}`` of ``tools`` (callables, sync or async), each described by
    :func:`tool_schemas`; a non-callable is a TypeError, two tools of one name a ValueError
    (a call could not tell them apart), both naming ``key[i]``."""
    out: Dict[str, Callable] = {}
    for i, fn in enumerate(tools):
        if not callable(fn):
            raise TypeError(f"{key}[{i}] must be a callable (a function whose name, type hints and docstring "
                            f"describe it to the model), got {type(fn).__name__}")
        name = tool_name(fn)
        if name in out:
            raise ValueError(f"{key}[{i}]: two tools are named {name!r}; tool names must be unique")
        out[name] = fn
    tool_schemas(tools, key)
    return out


def load_tools(specs: Sequence[str], key: str = "rollout.tools") -> List[Callable]:
    """The callables of ``module:function`` (or ``path/to/file.py:function``) import paths; a
    path that does not import is a ValueError naming ``key[i]``."""
    from rlhf_fast.algorithms import load_callable

    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(load_callable(spec, what="tool"))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{key}[{i}]: expected 'module:function' or 'file.py:function' naming a callable, "
                             f"got {spec!r} ({e})") from None
    return out


# ----------------------------------------------------------------------------- chat templates


def supports_tool_calling(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a whole tool exchange (user → assistant
    with ``tool_calls`` → tool) keeping the call's name, its arguments and the tool's answer;
    many templates drop one of them silently. TRL's ``supports_tool_calling``
    (trl/chat_template_utils.py), for tokenizers."""
    from jinja2 import TemplateError

    if getattr(tokenizer, "chat_template", None) is None:
        return False
    name, key, val, content = "tool_name_a8f3e2b1", "tool_arg_key_b9d4f5c2", "tool_arg_val_d6e7a9f3", "tool_content_c4f9a8e2"
    calls = [{"type": "function", "function": {"name": name, "arguments": {key: val}}}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "name": name, "content": content}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError:
        return False
    except TypeError:  # templates that want the arguments as a JSON string
        calls[0]["function"]["arguments"] = f'{{"{key}": "{val}"}}'
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError:
            return False
    return all(s in rendered for s in (name, key, val, content))


def tool_suffix_ids(tokenizer, tool_messages: Sequence[dict], chat_template: Optional[str] = None,
                    chat_template_kwargs: Optional[Dict[str, Any]] = None) -> List[int]:
    """The token ids the chat template writes after an assistant turn (cut after its eos) for
    ``tool_messages`` (``{"role": "tool", "name", "content"}``) and the next assistant
    header: what is appended to a row after its tool calls ran. TRL's
    ``GRPOTrainer._get_tool_suffix_ids`` (trl/trainer/grpo_trainer.py), text models: the
    difference of a dummy conversation rendered with and without the tool messages. A
    template that renders the earlier turns differently once tool messages follow (not
    prefix-preserving) is a ValueError. ``chat_template_kwargs``: extra template variables
    (e.g. ``enable_thinking``), passed to both renderings as TRL does."""
    calls = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    kw = dict(tokenize=True, return_dict=False, chat_template=chat_template, **(chat_template_kwargs or {}))
    prefix = list(tokenizer.apply_chat_template(dummy, add_generation_prompt=False, **kw))
    full = list(tokenizer.apply_chat_template(dummy + list(tool_messages), add_generation_prompt=True, **kw))
    # templates that write "<eos>\n" after a turn: the model's turn ends at the eos it generated
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if eos:
        prefix = prefix[:eos[-1] + 1]
    if full[:len(prefix)] != prefix:
        raise ValueError("the chat template is not prefix-preserving: the turns before a tool message render "
                         "differently once it follows (the tool results could not be appended to the answer)")
    return full[len(prefix):]


# ----------------------------------------------------------------------------- parsing answers


def _check_calls(calls) -> None:
    """TRL's ``_validate_tool_calls``: every call names a function; missing arguments are ``{}``."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ValueError("tool_calls must be a list or None.")
    for i, c in enumerate(calls):
        if not isinstance(c, dict):
            raise ValueError(f"tool_calls[{i}] must be a dict.")
        f = c.get("function", c)
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ValueError(f"tool_calls[{i}] must name a function.")
        if f.get("arguments") is None:
            f["arguments"] = {}


def _hermes_turn(tokenizer, ids: Sequence[int]) -> dict:
    """An answer in the Hermes format parsed as TRL's Qwen response template parses it: the
    text before the first ``<tool_call>`` is the content, each ``<tool_call>`` block a JSON
    object ``{"name", "arguments"}``; a leading ``<think>`` block is ``reasoning_content``
    (the calls in it are thought, not made). A block that is not such an object is a ValueError
    (the caller then keeps the answer as plain text, without calls)."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    for s in specials:  # special tokens end the turn; tool tags are plain text in Hermes vocabularies
        text = text.replace(s, "")
    reasoning = None
    if text.startswith("<think>"):
        # Qwen3's reasoning block (TRL's qwen3 response template): what it holds, a <tool_call> the
        # model only thought about included, is reasoning_content, not calls; unclosed, it is all
        reasoning, sep, rest = text[len("<think>"):].partition("</think>")
        reasoning, text = reasoning.strip(), rest.lstrip() if sep else ""
    out = {"role": "assistant", "reasoning_content": reasoning} if reasoning else {"role": "assistant"}
    blocks = _TOOL_CALL_RE.findall(text)
    if not blocks:
        return {**out, "content": text}
    calls = []
    for b in blocks:
        obj = json.loads(b)  # ValueError on malformed JSON
        if not isinstance(obj, dict):
            raise ValueError("a tool call must be a JSON object")
        if isinstance(obj.get("arguments"), str):  # some fine-tunes write the arguments as a JSON string
            try:
                obj["arguments"] = json.loads(obj["arguments"])
            except ValueError:
                pass  # left as text: calling the tool with it fails, counted as a failure
        calls.append({"type": "function", "function": obj})
    content = text[:text.index("<tool_call>")]
    return {**out, "content": content[:-1] if content.endswith("\n") else content, "tool_calls": calls}


def _parse_with_template(tokenizer, ids, prefix, tools) -> Optional[dict]:
    """``tokenizer.parse_response`` with the tokenizer's ``response_template`` (transformers >=
    5.13: ``prefix`` and, from 5.15, ``tools`` to type the arguments) or legacy
    ``response_schema``."""
    params = inspect.signature(tokenizer.parse_response).parameters
    kw = {}
    if getattr(tokenizer, "response_template", None) is not None and "prefix" in params:
        kw["prefix"] = list(prefix or [])
        if "tools" in params and tools:
            kw["tools"] = list(tools)
    return tokenizer.parse_response(list(ids), **kw)


def parse_turn(tokenizer, ids: Sequence[int], prefix: Optional[Sequence[int]] = None,
               tools: Optional[Sequence[Callable]] = None) -> dict:
    """One generated assistant turn (token ids) as a message ``{"role": "assistant", "content":
    str, "tool_calls"?: [{"type": "function", "function": {"name", "arguments"}}]}``.

    With the tokenizer's ``response_template`` (or legacy ``response_schema``) it is
    ``tokenizer.parse_response`` (``prefix``: the ids before the turn; ``tools``: the tools, to
    type the arguments), else the Hermes / Qwen ``<tool_call>{json}</tool_call>`` format. As
    TRL's ``parse_response``: a turn that does not parse (a malformed call) is plain text with
    no calls, the eos is dropped from the content, and missing arguments become ``{}``."""
    try:
        if getattr(tokenizer, "response_template", None) is not None \
                or getattr(tokenizer, "response_schema", None) is not None:
            parsed = _parse_with_template(tokenizer, ids, prefix, tools)
            if parsed is None:  # a turn truncated before any content
                raise ValueError("parse_response returned None")
        else:
            parsed = _hermes_turn(tokenizer, ids)
        if isinstance(parsed.get("content"), str) and tokenizer.eos_token:
            parsed["content"] = parsed["content"].removesuffix(tokenizer.eos_token)
        if not parsed.get("content"):
            parsed["content"] = ""
        if "tool_calls" in parsed:
            _check_calls(parsed["tool_calls"])
    except (ValueError, TypeError):
        parsed = {"role": "assistant", "content": tokenizer.decode(list(ids), skip_special_tokens=True)}
    return parsed


def check_call_parsing(tokenizer, tools: Sequence[Callable],
                       chat_template_kwargs: Optional[Dict[str, Any]] = None) -> None:
    """ValueError when a tool call written as the chat template writes an assistant's
    ``tool_calls`` does not parse back to that call (:func:`parse_turn`): the model's calls
    would never run. TRL sets the response template of the templates it knows
    (``add_response_schema``: Qwen3.5, Llama 3.1, GLM-4-MoE, GPT-OSS, ...); here the Hermes
    parser is the fallback, and a template in another format must bring its
    ``tokenizer.response_template``. A template that renders an answer apart from its
    generation prompt (or not at all) cannot be checked this way and passes."""
    from jinja2 import TemplateError

    name = tool_name(tools[0])
    call = [{"type": "function", "function": {"name": name, "arguments": {}}}]
    user = [{"role": "user", "content": "dummy"}]
    kw = dict(tokenize=True, return_dict=False, tools=list(tools), **(chat_template_kwargs or {}))
    try:
        head = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, **kw))
        full = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "", "tool_calls": call}],
                                                  **kw))
    except (TemplateError, TypeError, ValueError):
        return
    if full[:len(head)] != head:
        return
    turn = full[len(head):]
    if tokenizer.eos_token_id in turn:  # the model's turn ends at its eos (the template may write "\n" after)
        turn = turn[:turn.index(tokenizer.eos_token_id) + 1]
    parsed = parse_turn(tokenizer, turn, head, tools)
    if [c.get("function", c).get("name") for c in parsed.get("tool_calls") or []] != [name]:
        raise ValueError(f"an answer's tool call as this chat template writes it "
                         f"({tokenizer.decode(turn, skip_special_tokens=False)!r}) is not parsed back to the call, "
                         f"so no call of the model would run: set tokenizer.response_template to the template's "
                         f"response format (transformers' parse_response; "
                         f"trl.chat_template_utils.add_response_schema(tokenizer) sets it for the templates TRL "
                         f"knows) — without one, calls are read in the Hermes / Qwen2.5 "
                         f"<tool_call>{{json}}</tool_call> format")


# ----------------------------------------------------------------------------- running tools


_LOOP: Dict[str, Any] = {}  # this process's event loop for async tools / get_reward, and its pid
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for async calls, started on first use in a daemon thread and
    kept (TRL's ``start_event_loop_in_daemon``): what an async tool keeps across calls (a client
    session, a semaphore) stays bound to one live loop. A forked child starts its own."""
    with _LOOP_LOCK:
        loop = _LOOP.get("loop")
        if loop is None or loop.is_closed() or _LOOP.get("pid") != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rlhf_fast-async-tools", daemon=True).start()
            _LOOP.update(loop=loop, pid=os.getpid())
        return loop


def _run_coroutines(coros: List[Any]) -> List[Any]:
    """Results (or exceptions) of ``coros``, run concurrently on :func:`_event_loop` (another
    thread's loop, so it works whether or not the caller is inside a running loop: a notebook)."""
    async def gather():
        return await asyncio.gather(*coros, return_exceptions=True)

    return asyncio.run_coroutine_threadsafe(gather(), _event_loop()).result()


class _ToolTimeout(Exception):
    """A tool call passed ``rollout.tool_timeout`` (apart from a TimeoutError the tool raises)."""


def _timed_out(name: str, timeout: float) -> dict:
    return {"error": f"Tool {name} timed out after {timeout:g} s."}


def _call_within(fn: Callable, kwargs: dict, timeout: Optional[float]) -> Any:
    """``fn(**kwargs)``, or _ToolTimeout when it has not returned within ``timeout`` seconds (it
    then runs on in a daemon thread, its result dropped: Python cannot stop a thread)."""
    if timeout is None:
        return fn(**kwargs)
    box: Dict[str, Any] = {}

    def target():
        try:
            box["out"] = fn(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=target, name="rlhf_fast-tool", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise _ToolTimeout
    if "err" in box:
        raise box["err"]
    return box["out"]


async def _await_within(awaitable, timeout: float) -> Any:
    """``awaitable``'s result, or _ToolTimeout (the awaitable cancelled) after ``timeout`` s."""
    # (not wait_for: it would take a TimeoutError the tool raises itself, an HTTP client's, for ours)
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise _ToolTimeout
    return task.result()


def run_tool_calls(calls: Sequence[dict], tools: Dict[str, Callable],
                   timeout: Optional[float] = None) -> Tuple[List[Tuple[str, Any]], int]:
    """Run one turn's ``calls`` (as :func:`parse_turn` gives them) with ``tools`` ``{name: fn}``.

    Returns ``([(name, result), ...], failures)``. As TRL's ``_tool_call_loop``: a call of an
    unknown tool, bad arguments or a tool that raises gives ``{"error": str(exception)}`` and
    counts as a failure; async tools of the turn run concurrently, and their results follow
    those of the sync tools (TRL's order, which fixes the order of the tool messages).
    ``timeout`` (seconds per call; None: none, as TRL): a call still running then gives
    ``{"error": "Tool NAME timed out after T s."}`` and counts as a failure (a sync tool runs
    in a thread for it, left running in the background; an async one is cancelled)."""
    results: List[Tuple[str, Any]] = []
    pending: List[Tuple[str, Any]] = []
    failures = 0
    for call in calls:
        if call.get("type", "function") != "function":
            failures += 1
            results.append((call.get("name", "unknown"), {"error": f"Unsupported tool call type: {call['type']}"}))
            continue
        f = call.get("function", call)  # (a parser's flat {"name", "arguments"}: _check_calls takes it)
        name = f["name"]
        try:
            if name not in tools:
                raise ValueError(f"Tool {name} not found.")
            args = f.get("arguments")
            out = _call_within(tools[name], {} if args is None else args, timeout)
            if inspect.isawaitable(out):
                pending.append((name, out if timeout is None else _await_within(out, timeout)))
            else:
                results.append((name, out))
        except _ToolTimeout:
            failures += 1
            results.append((name, _timed_out(name, timeout)))
        except Exception as e:  # noqa: BLE001 - any tool error goes back to the model, as in TRL
            failures += 1
            results.append((name, {"error": str(e)}))
    if pending:
        for (name, _), out in zip(pending, _run_coroutines([c for _, c in pending])):
            if isinstance(out, BaseException):
                failures += 1
                out = _timed_out(name, timeout) if isinstance(out, _ToolTimeout) else {"error": str(out)}
            results.append((name, out))
    return results, failures


def tool_messages(results: Sequence[Tuple[str, Any]]) -> List[dict]:
    """``{"role": "tool", "name", "content"}`` of each result: ``str(result)`` (TRL's
    rendering; a list of content blocks is kept as is)."""
    return [{"role": "tool", "name": name, "content": r if isinstance(r, list) else str(r)} for name, r in results]


# ----------------------------------------------------------------------------- the multi-turn loop


@dataclass
class ToolRolloutStats:
    """What :func:`tool_rollout` did. calls / failures: tool calls run and those that failed;
    rows: answers; iterations: rounds of tool execution + continued generation; messages: per
    answer, its turns as chat messages (assistant turns as :func:`parse_turn` gives them, then
    the tool messages), what TRL passes reward functions as ``completions``."""

    calls: int = 0
    failures: int = 0
    rows: int = 0
    iterations: int = 0
    messages: List[List[dict]] = field(default_factory=list)


def _mix_seed(seed: int, turn: int) -> int:
    """The sampling seed of a row's ``turn``-th continuation (1, 2, ...) from its own seed: a
    splitmix64 step, so a row's turns depend only on its seed, not on which rows continue."""
    x = (seed + turn * 0x9E3779B97F4A7C15) % (2**64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (2**64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (2**64)
    return (x ^ (x >> 31)) >> 1


def _turn_params(params: SamplingParams, rows: Sequence[int], turn: int, max_new_tokens: int) -> SamplingParams:
    """The sampling of continuation ``turn`` for the answers ``rows``: the rollout's, one sample
    each, its seeds derived from the rows' own (or the batch's)."""
    kw: Dict[str, Any] = {"n": 1, "max_new_tokens": max_new_tokens, "sample_seeds": None, "seed": None,
                          # (a continuation shorter than min_new_tokens cannot end early: the same tokens as
                          # TRL's full-length turn cut to the room; SamplingParams refuses a larger value)
                          "min_new_tokens": min(params.min_new_tokens, max_new_tokens)}
    if params.sample_seeds is not None:
        kw["sample_seeds"] = tuple(_mix_seed(params.sample_seeds[i], turn) for i in rows)
    elif params.seed is not None:
        kw["seed"] = _mix_seed(params.seed % (2**64), turn)
    return dataclasses.replace(params, **kw)


@dataclass
class _Row:
    """One answer as it grows: its prompt ids, completion ids (model and tool tokens), the
    loss mask over them (0 on tool tokens), the behaviour log-probs, the finish reason."""

    prompt: List[int]
    ids: List[int]
    mask: List[int]
    logp: List[float]
    reason: str
    messages: List[dict]
    grown: bool = False


def _rows_of(batch: RolloutBatch) -> List[_Row]:
    P = batch.prompt_length
    reasons = batch.finish_reasons if len(batch.finish_reasons) == batch.batch_size else [""] * batch.batch_size
    out = []
    for i in range(batch.batch_size):
        pm = batch.attention_mask[i, :P].bool()
        rm = batch.response_mask[i, P:].bool()
        ids = batch.input_ids[i, P:][rm].tolist()
        out.append(_Row(prompt=batch.input_ids[i, :P][pm].tolist(), ids=ids, mask=[1] * len(ids),
                        logp=batch.behaviour_logp[i, P:][rm].float().tolist(), reason=reasons[i], messages=[]))
    return out


def _pack(first: RolloutBatch, rows: List[_Row], tokenizer, pad_id: int, elapsed: float) -> RolloutBatch:
    """The grown rows as a RolloutBatch laid out like ``first`` (its left-padded prompts)."""
    P, dev = first.prompt_length, first.input_ids.device
    R = max(1, max(len(r.ids) for r in rows))
    B = len(rows)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    attn = torch.zeros(B, R, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.long)
    logp = torch.zeros(B, R, dtype=torch.float32)
    for i, r in enumerate(rows):
        n = len(r.ids)
        resp[i, :n] = torch.tensor(r.ids, dtype=torch.long)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(r.mask, dtype=torch.long)
        logp[i, :n] = torch.tensor(r.logp, dtype=torch.float32) * mask[i, :n]
    texts = [tokenizer.decode(r.ids, skip_special_tokens=True) if r.grown else t
             for r, t in zip(rows, first.response_texts)]
    num = int(mask.sum())
    zeros = torch.zeros_like(first.attention_mask[:, :P])
    return RolloutBatch(
        input_ids=torch.cat([first.input_ids[:, :P], resp.to(dev)], 1),
        attention_mask=torch.cat([first.attention_mask[:, :P], attn.to(dev)], 1),
        response_mask=torch.cat([zeros, mask.to(dev)], 1),
        behaviour_logp=torch.cat([zeros.float(), logp.to(dev)], 1),
        prompt_texts=list(first.prompt_texts), response_texts=texts, group_index=first.group_index,
        num_generated_tokens=num, tokens_per_second=num / max(elapsed, 1e-9), prompt_length=P,
        finish_reasons=[r.reason for r in rows] if len(first.finish_reasons) == B else [])


def _cap(row: _Row, suffix: Sequence[int], budget: int, max_length: Optional[int]) -> int:
    """How many tokens ``row`` may generate after ``suffix`` (>= 0): its own completion budget
    left, and its own positions left under ``max_length``."""
    cap = budget - len(row.ids) - len(suffix)
    if max_length is not None:
        cap = min(cap, max_length - len(row.prompt) - len(row.ids) - len(suffix))
    return max(0, cap)


def _room_calls(go: Sequence[int], lengths: Sequence[int], caps: Sequence[int],
                max_length: Optional[int]) -> List[Tuple[List[int], int]]:
    """The generate calls continuing the rows ``go`` (sequence ``lengths``, own rooms ``caps``):
    ``[(rows, max_new_tokens), ...]``. A call generates up to its largest room and each row is
    cut to its own afterwards (with per-row seeds its tokens are those of a call of its own);
    only ``max_length`` splits the rows: a call's longest sequence plus its room must fit in the
    positions (left padding puts every row at the longest one's width), so a row near the limit
    gets a call of its own room instead of cutting every other row to it. Without a position
    limit, or when the rows fit together: one call, of the largest room (at least 1)."""
    order = sorted(range(len(go)), key=lambda k: -caps[k])
    out = []
    while order:
        room, top, take, rest = max(1, caps[order[0]]), 0, [], []
        for k in order:
            if not take or max_length is None or max(top, lengths[k]) + room <= max_length:
                take.append(k)
                top = max(top, lengths[k])
            else:
                rest.append(k)
        out.append(([go[k] for k in sorted(take)], room))
        order = rest
    return out


def tool_rollout(engine: RolloutEngine, prompts: Prompts, params: SamplingParams, *, tools: Sequence[Callable],
                 tokenizer, max_iterations: Optional[int] = None, max_length: Optional[int] = None,
                 row_tools: Optional[Sequence[Sequence[Callable]]] = None,
                 sync_any: Optional[Callable[[bool], bool]] = None,
                 chat_template_kwargs: Optional[Dict[str, Any]] = None,
                 tool_timeout: Optional[float] = None) -> Tuple[RolloutBatch, ToolRolloutStats]:
    """Generate with tool calls: TRL GRPOTrainer's ``_tool_call_loop`` over ``engine``.

    ``engine.generate(prompts, params)`` answers first (exactly the call made without tools).
    Then, while some answer's last turn holds tool calls and fewer than ``max_iterations``
    rounds ran (None: no limit; 0: tools are never run): each such answer's calls run
    (:func:`run_tool_calls`), their results are appended as the chat template renders them
    (:func:`tool_suffix_ids`), and the answer goes on from the grown sequence (one sample,
    seeded from the answer's own seed and the round). A result that would take the completion
    (model and tool tokens) past ``params.max_new_tokens`` — or the sequence to ``max_length``
    positions — is rolled back and the answer ends as it was; a continuation is cut at the
    answer's own budget and positions left (finish reason "length"), whatever the other
    answers' rooms (:func:`_room_calls`: rows near ``max_length`` get calls of their own).

    ``tools``: the callables (``row_tools``: one list per answer instead, e.g. the methods of
    each answer's environment). ``sync_any(flag) -> bool``: whether any rank has an answer to
    continue (distributed runs: every rank then makes the same generate calls, which FSDP2's
    weight gathering needs; a rank with none makes a one-token call it discards).
    ``chat_template_kwargs``: template variables for rendering the tool results
    (:func:`tool_suffix_ids`), those the prompts were rendered with. ``tool_timeout``: seconds
    per tool call (:func:`run_tool_calls`; None: no limit).

    Returns the RolloutBatch (``[B, P+R]``, R ≤ ``params.max_new_tokens``; ``response_mask`` and
    ``behaviour_logp`` 0 on tool tokens; ``response_texts`` the whole completion, tool turns
    included, decoded without special tokens; ``num_generated_tokens`` the model's tokens) —
    the first call's batch itself when no tool result was appended — and the
    :class:`ToolRolloutStats`.
    """
    t0 = time.perf_counter()
    sync_any = sync_any or bool
    first = engine.generate(prompts, params)
    rows = _rows_of(first)
    B = len(rows)
    per_row = [list(t) for t in row_tools] if row_tools is not None else [list(tools)] * B
    if len(per_row) != B:
        raise ValueError(f"row_tools must have one list of tools per answer ({B}), got {len(per_row)}")
    by_name = [{tool_name(f): f for f in ts} for ts in per_row]
    stats = ToolRolloutStats(rows=B)
    for i, r in enumerate(rows):
        r.messages.append(parse_turn(tokenizer, r.ids, r.prompt, per_row[i]))
    active = [i for i, r in enumerate(rows) if r.messages[-1].get("tool_calls")]
    budget = params.max_new_tokens
    limit = float("inf") if max_iterations is None else max_iterations
    pad_id = getattr(engine, "pad_id", None)
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                else tokenizer.eos_token_id)
    calls: List[Tuple[List[int], int]] = []  # this round's generate calls still to make: (rows, room)
    suffixes: Dict[int, List[int]] = {}
    # every rank makes the same sync_any calls and generate calls (one per pass): a rank with
    # more calls this round, or a new round, continues; one with neither makes a discarded call
    while sync_any(bool(calls) or (bool(active) and stats.iterations < limit)):
        if not calls and active and stats.iterations < limit:
            go, suffixes = [], {}
            for i in sorted(active):
                r = rows[i]
                results, failed = run_tool_calls(r.messages[-1]["tool_calls"], by_name[i], tool_timeout)
                stats.calls += len(results)
                stats.failures += failed
                msgs = tool_messages(results)
                suffix = tool_suffix_ids(tokenizer, msgs, chat_template_kwargs=chat_template_kwargs)
                grown = len(r.ids) + len(suffix)
                if grown > budget or (max_length is not None and len(r.prompt) + grown >= max_length):
                    continue  # rolled back: the answer ends with its tool call
                r.messages.extend(msgs)
                suffixes[i] = suffix
                go.append(i)
            stats.iterations += 1
            active = []
            calls = _room_calls(go, [len(rows[i].prompt) + len(rows[i].ids) + len(suffixes[i]) for i in go],
                                [_cap(rows[i], suffixes[i], budget, max_length) for i in go], max_length)
        if not sync_any(bool(calls)):
            break
        if not calls:  # another rank continues: make the same call, discard it
            engine.generate([rows[0].prompt[:1]], SamplingParams(temperature=0.0, max_new_tokens=1))
            continue
        go, room = calls.pop(0)
        seqs = [rows[i].prompt + rows[i].ids + suffixes[i] for i in go]
        more = engine.generate(seqs, _turn_params(params, go, stats.iterations, room))
        for i, n in zip(go, _rows_of(more)):
            r, s = rows[i], suffixes[i]
            left = _cap(r, s, budget, max_length)  # this row's own room, whatever the call's
            ids, logp, reason = n.ids[:left], n.logp[:left], n.reason
            if len(n.ids) > left or not ids:
                reason = "length"
            prefix = r.prompt + r.ids + s
            r.ids, r.mask, r.logp = r.ids + s + ids, r.mask + [0] * len(s) + [1] * len(ids), r.logp + [0.0] * len(s) + logp
            r.reason, r.grown = reason, True
            if ids:  # (a continuation cut to nothing adds no turn)
                r.messages.append(parse_turn(tokenizer, ids, prefix, per_row[i]))
                if r.messages[-1].get("tool_calls"):
                    active.append(i)
    stats.messages = [r.messages for r in rows]
    if not any(r.grown for r in rows):
        return first, stats
    return _pack(first, rows, tokenizer, pad_id, time.perf_counter() - t0), stats


__all__ = ["ToolRolloutStats", "check_call_parsing", "check_tools", "load_tools", "parse_turn", "run_tool_calls",
           "supports_tool_calling", "tool_messages", "tool_name", "tool_rollout", "tool_schemas", "tool_suffix_ids"]
