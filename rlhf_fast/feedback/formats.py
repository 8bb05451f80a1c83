"""Feedback record formats: reading, validation, de-duplication, filtering, rankings → pairs.

Four kinds of record, each with an optional ``annotator`` id:

============  =====================================================================
kind          fields
============  =====================================================================
``sft``       prompt, completion; or messages (a whole conversation, TRL's
              "conversational language modeling" format); or text (TRL's language
              modeling format: every token trains)
``pairs``     prompt, chosen, rejected, optional margin (number ≥ 0); chosen / rejected
              text, or chat messages after a chat prompt (TRL's conversational
              preference format); without prompt, the prompt is their shared start
              (TRL's implicit prompt, :func:`extract_prompt`)
``rankings``  prompt, responses (≥ 2 texts), ranking (permutation of their indices,
              best first)
``scores``    prompt, response, score (number)
============  =====================================================================

A ``pairs`` row may also hold ``reference``, a gold response (TRL's TPO triple-preference format,
read as a :class:`TripleRecord`): text or messages as chosen is; with an implicit prompt it must
start with that prompt, which is cut off as from chosen and rejected.

A prompt is plain text or a chat (a list of ``{"role", "content"}`` messages), rendered
with the tokenizer's chat template by :func:`render_prompt`. Sources: JSONL files (.jsonl, or
.json: JSON lines or one JSON array, as ``datasets``' json loader reads them), Parquet files
(needs pyarrow), a ``Dataset.save_to_disk`` folder, a ``datasets.Dataset`` or a list of dicts;
CSV is refused. Validation collects
every problem with its file, line and field, then raises one ValueError listing them
(or returns them with ``strict=False``).

An ``sft`` row holding ``messages`` (and neither prompt nor completion) is read as a
:class:`ChatRecord`, a conversation rendered whole by the SFT trainer; one holding ``text``
(and nothing else) as a :class:`TextRecord`. A file of ``text`` rows holds no other kind of
sft row (TRL reads one format per dataset): mixing them is a problem at the later line.

A ``pairs`` row's chosen and rejected are both text or both lists of chat messages; messages
need a chat prompt, and the trainers encode them as the chat template writes those turns after
the prompt (content and end of turn, :func:`rlhf_fast.trainers.sft_data.completion_tokens`). A
pairs row without ``prompt`` takes the longest shared start of chosen and rejected as its
prompt (TRL's ``extract_prompt``: whole messages for conversations, characters for text, a space
before the point where they part going to the responses); a pair that shares nothing, or whose
one side is the start of the other, is a problem.

An ``sft`` row ``{"conversations": [{"from", "value"}, ...]}`` (ShareGPT) is read as its
``messages``, as TRL's SFTTrainer converts it (:func:`_sharegpt_row`). A row's ``images`` /
``image``, and a conversational row's own ``tools`` / ``chat_template_kwargs``, which TRL feeds
to a vision processor or the chat template, are problems (:func:`check_unrendered_fields`):
dropped, they would train other tokens than TRL's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

KINDS = ("sft", "pairs", "rankings", "scores")

Prompt = Union[str, List[Dict[str, str]]]
# a pair's response: text, or chat messages (the turns after a chat prompt)
Response = Union[str, List[Dict[str, str]]]


@dataclasses.dataclass
class SFTRecord:
    """A prompt and the completion to imitate."""

    prompt: Prompt
    completion: str
    annotator: Optional[str] = None


@dataclasses.dataclass
class ChatRecord:
    """A whole conversation to imitate (an ``sft`` row ``{"messages": [...]}``): a list of
    ``{"role", "content"}`` messages (other keys of a message, e.g. ``name``, are kept for the
    chat template). Which tokens train is the SFT trainer's choice (``assistant_only_loss``)."""

    messages: List[Dict[str, Any]]
    annotator: Optional[str] = None


@dataclasses.dataclass
class TextRecord:
    """A text to imitate whole (an ``sft`` row ``{"text": ...}``, TRL's language-modeling format):
    no prompt, every token trains."""

    text: str
    annotator: Optional[str] = None


@dataclasses.dataclass
class PairRecord:
    """A preference: ``chosen`` is better than ``rejected`` by ``margin`` (0 when unknown).
    Both responses are text, or both lists of ``{"role", "content"}`` messages (the turns after
    a chat ``prompt``)."""

    prompt: Prompt
    chosen: Response
    rejected: Response
    margin: float = 0.0
    annotator: Optional[str] = None


@dataclasses.dataclass
class TripleRecord(PairRecord):
    """A pair with a gold ``reference`` response (TRL's TPO triple-preference format), text or chat
    messages as chosen and rejected are; read from a pairs row that has ``reference``."""

    reference: Optional[Response] = None


@dataclasses.dataclass
class RankingRecord:
    """``responses[ranking[0]]`` is the best, ``responses[ranking[-1]]`` the worst."""

    prompt: Prompt
    responses: List[str]
    ranking: List[int]
    annotator: Optional[str] = None


@dataclasses.dataclass
class ScoreRecord:
    """An absolute score of one response."""

    prompt: Prompt
    response: str
    score: float
    annotator: Optional[str] = None


RECORD_TYPES = {"sft": SFTRecord, "pairs": PairRecord, "rankings": RankingRecord, "scores": ScoreRecord}
Record = Union[SFTRecord, ChatRecord, TextRecord, PairRecord, RankingRecord, ScoreRecord]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One validation problem: where (source, 1-based line or row) and what."""

    source: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"


# --------------------------------------------------------------------------- reading

def saved_dataset_folder(path: str) -> bool:
    """Whether ``path`` is a folder ``datasets``' ``save_to_disk`` wrote (a Dataset's: state.json;
    a DatasetDict's: dataset_dict.json)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def saved_dataset_rows(path: str, key: Optional[str] = None) -> List[Tuple[int, Any]]:
    """``[(row number from 1, row), ...]`` of a ``Dataset.save_to_disk`` folder (needs ``datasets``).
    ValueError naming ``key`` and ``path`` for a DatasetDict's folder (naming its splits: one of
    them is the data) or without ``datasets``."""
    where = f"{key} {path}" if key else path
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise ValueError(f"{where}: a DatasetDict folder (splits {splits}): give one split's folder, e.g. "
                         f"{os.path.join(path, splits[0] if splits else 'train')}")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{where}: reading a save_to_disk folder needs datasets "
                         "(pip install 'rlhf_fast[data]')") from None
    return [(i + 1, dict(r)) for i, r in enumerate(datasets.load_from_disk(path))]


def check_input_file(path: str, key: Optional[str] = None, *, datasets_ok: bool = False) -> None:
    """FileNotFoundError / IsADirectoryError unless ``path`` is a file (or, with ``datasets_ok``, a
    ``save_to_disk`` folder: :func:`saved_dataset_folder`); the message names ``key`` (the config
    key or option that gave the path: ``data``, ``eval_data``) when given."""
    where = f"{key} {path}" if key else path
    if os.path.isdir(path):
        if datasets_ok and saved_dataset_folder(path):
            return
        raise IsADirectoryError(f"{where}: expected a file, found a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file")


def read_rows(source: Any, key: Optional[str] = None) -> Tuple[str, List[Tuple[int, Any]]]:
    """``(source name, [(line, row), ...])`` from a JSONL / JSON / Parquet path (:func:`json_rows`:
    a .json array's rows are numbered by item), a Dataset or a list.

    Lines that are not valid JSON come back as ``(line, _BadJSON(message))`` so validation
    reports them with the others; blank lines are skipped. A ``Dataset.save_to_disk`` folder
    gives its rows (:func:`saved_dataset_rows`); any other path that is no file is refused
    naming ``key`` (:func:`check_input_file`).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        check_input_file(path, key, datasets_ok=True)
        if os.path.isdir(path):
            return path, saved_dataset_rows(path, key)
        if path.lower().endswith(".parquet"):  # (any case, as .json and .csv are told)
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
            rows = pq.read_table(path).to_pylist()
            return path, [(i + 1, r) for i, r in enumerate(rows)]
        refuse_unread_format(path, key)
        return path, json_rows(path, key)[1]
    if isinstance(source, (list, tuple)):
        return "<list>", [(i + 1, r) for i, r in enumerate(source)]
    if isinstance(getattr(source, "column_names", None), dict):  # a DatasetDict iterates its split names
        splits = sorted(source.column_names)
        raise TypeError(f"source is a DatasetDict of the splits {splits}: pass one split "
                        f"(e.g. source[{splits[0]!r}])")
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # datasets.Dataset
        return "<dataset>", [(i + 1, dict(r)) for i, r in enumerate(source)]
    raise TypeError(f"source must be a path (.jsonl/.json/.parquet), a list of dicts or a datasets.Dataset, "
                    f"got {type(source).__name__}")


class _BadJSON:
    def __init__(self, message: str):
        self.message = message


# tabular text that datasets' loaders read and ours do not: refused by name, never misread (as JSON
# lines, or as prompts one per line: the header would become a prompt)
_UNREAD_SUFFIXES = (".csv", ".tsv")


def refuse_unread_format(path: str, key: Optional[str] = None) -> None:
    """ValueError naming ``key`` (the config key or option) and ``path`` for a .csv / .tsv file."""
    if path.lower().endswith(_UNREAD_SUFFIXES):
        where = f"{key} {path}" if key else path
        raise ValueError(f"{where}: CSV / TSV files are not read; convert it to .jsonl or .parquet (e.g. "
                         "datasets.load_dataset('csv', data_files=PATH)['train'].to_json('data.jsonl'))")


def json_rows(path: str, key: Optional[str] = None) -> Tuple[str, List[Tuple[int, Any]]]:
    """``(unit, [(number, row), ...])`` of a JSON file, read as ``datasets``' json loader reads
    one: JSON lines (unit ``"line"``: 1-based line numbers, blank lines skipped, a line that is
    not JSON a ``_BadJSON`` row), or, for a ``.json`` file whose text starts with ``[``, one JSON
    array (unit ``"item"``: 1-based item numbers) — what ``json.dump(rows)`` and
    ``Dataset.to_json(lines=False)`` write. ValueError naming ``key`` and the file when it is
    not UTF-8 text (a .gz, a binary file)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark is no part of the first record)
            text = f.read()
    except UnicodeDecodeError as e:
        where = f"{key} {path}" if key else path
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSON") from None
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            return "line", [(e.lineno, _BadJSON(f"invalid JSON array ({e.msg} at column {e.colno})"))]
        return "item", [(i + 1, r) for i, r in enumerate(items)]
    out = []
    # split at "\n" only (universal newlines turned \r\n and \r into it): str.splitlines would also
    # split inside a JSON string holding a raw U+2028 or U+0085
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((i, _BadJSON(f"invalid JSON ({e.msg} at column {e.colno})")))
    return "line", out


# --------------------------------------------------------------------------- validation

def _shown(x: Any, limit: int = 60) -> str:
    """``repr(x)``, cut to ``limit`` characters: a problem line stays one readable line."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _is_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # a JSON int beyond float range, e.g. 10**400
        return False


def _check_text(row: dict, name: str, problems: list, where) -> Optional[str]:
    if name not in row or row[name] is None:
        problems.append(where(name, "missing field"))
        return None
    v = row[name]
    if not isinstance(v, str):
        problems.append(where(name, f"expected text, got {type(v).__name__}"))
        return None
    if not v.strip():
        problems.append(where(name, "empty text"))
        return None
    return v


def _check_prompt(row: dict, problems: list, where) -> Optional[Prompt]:
    if "prompt" not in row or row["prompt"] is None:
        problems.append(where("prompt", "missing field"))
        return None
    p = row["prompt"]
    if isinstance(p, str):
        if not p.strip():
            problems.append(where("prompt", "empty text"))
            return None
        return p
    if isinstance(p, list):
        if not p:
            problems.append(where("prompt", "empty chat (no messages)"))
            return None
        ok = _chat_messages_ok(p, "prompt", problems, where, check_role=False)
        return [{"role": m["role"], "content": m["content"]} for m in p] if ok else None
    problems.append(where("prompt", f"expected text or a list of chat messages, got {type(p).__name__}"))
    return None


def _check_messages(row: dict, problems: list, where) -> Optional[List[Dict[str, Any]]]:
    """The ``messages`` of a conversational sft row: a non-empty list of {role: str, content:
    non-empty str} (extra keys kept; an assistant turn with a ``tool_calls`` list may have empty,
    None or no content, as in TRL); a row with prompt or completion beside it is ambiguous."""
    clash = [k for k in ("prompt", "completion") if row.get(k) is not None]
    if clash:
        problems.append(where("messages", f"a conversation cannot also have {' and '.join(clash)} "
                                          "(give either messages or prompt + completion)"))
        return None
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        problems.append(where("messages", "expected a non-empty list of chat messages, got "
                                          + ("an empty list" if isinstance(msgs, list) else type(msgs).__name__)))
        return None
    ok = _chat_messages_ok(msgs, "messages", problems, where, check_role=True, tool_calls=True)
    return [dict(m) for m in msgs] if ok else None


def check_unrendered_fields(row: dict, problems: list, where, *, template: bool = True) -> None:
    """Add a problem for each field of ``row`` that TRL's offline trainers use and ours would drop
    silently, training on other tokens than TRL's: ``images`` / ``image`` (TRL feeds them to a
    vision processor) and, with ``template`` (a conversational row), ``tools`` and
    ``chat_template_kwargs`` (TRL renders the row's chat template with them). Empty values
    change nothing and pass."""
    for name in ("images", "image"):
        if row.get(name) not in (None, [], ""):
            problems.append(where(name, "images are not read here (text-only models; TRL feeds them to a "
                                        "vision processor): drop the field"))
    # where template variables go instead: one set for the run, not per row (commit 70ae0f0)
    keys = ("; template variables for every row are set by the config key data.chat_template_kwargs "
            "(RL / SFT / DPO) or chat_template_kwargs (reward config)")
    for name in ("tools", "chat_template_kwargs") if template else ():
        if row.get(name) not in (None, [], {}, ""):
            problems.append(where(name, f"a row's own {name} are not passed to the chat template here "
                                        "(TRL renders the conversation with them): drop the field, or write "
                                        "what they add into the messages"
                                        + (keys if name == "chat_template_kwargs" else "")))


def _sharegpt_row(row: dict) -> dict:
    """A ShareGPT sft row ``{"conversations": [{"from", "value"}, ...]}`` as TRL's SFTTrainer reads
    it (``trl.data_utils.maybe_convert_to_chatml``): its ``messages``, each message's ``from`` /
    ``value`` keys renamed ``role`` / ``content`` and the roles kept as written (``human`` /
    ``gpt`` stay so, as in TRL: the chat template sees them). Its problems name ``messages[j]``."""
    msgs = row["conversations"]
    if isinstance(msgs, list):
        names = {"from": "role", "value": "content"}
        msgs = [{names.get(k, k): v for k, v in m.items()} if isinstance(m, dict) else m for m in msgs]
    return {**{k: v for k, v in row.items() if k != "conversations"}, "messages": msgs}


def _tool_call_turn(m: Any, field: str, problems: list, where) -> Optional[bool]:
    """Whether ``m`` is an assistant message that calls tools (a non-empty ``tool_calls`` list)
    with empty, None or no ``content``, as TRL's SFTTrainer passes it to the chat template
    (which reads ``tool_calls`` itself); None, with the problem added, when its ``tool_calls`` is
    not a list."""
    if not isinstance(m, dict) or m.get("tool_calls") is None:
        return False
    if not isinstance(m["tool_calls"], list):
        problems.append(where(f"{field}.tool_calls", f"expected a list of tool calls, got "
                                                     f"{type(m['tool_calls']).__name__}"))
        return None
    return bool(m["tool_calls"]) and m.get("role") == "assistant" and m.get("content") in (None, "")


def _chat_messages_ok(msgs: list, field: str, problems: list, where, *, check_role: bool,
                      tool_calls: bool = False) -> bool:
    """Whether every item of ``msgs`` is {role: str, content: non-empty str} (with
    ``check_role`` a non-empty role too); each problem is added, named ``field[j]``. A system
    message may be empty: datasets carry ``{"role": "system", "content": ""}`` and TRL renders it.
    With ``tool_calls`` (sft ``messages``, kept whole for the template) an assistant turn that only
    calls tools may have empty, None or no content."""
    ok = True
    for j, m in enumerate(msgs):
        calls = _tool_call_turn(m, f"{field}[{j}]", problems, where) if tool_calls else False
        if not tool_calls and isinstance(m, dict) and m.get("tool_calls") not in (None, []):
            # a prompt / response keeps only role and content: the calls would be dropped silently
            problems.append(where(f"{field}[{j}].tool_calls", "tool calls are read only in sft "
                                                             "conversations (messages): drop the field"))
            ok = False
        elif calls is None:
            ok = False
        elif calls:
            continue
        elif not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            problems.append(where(f"{field}[{j}]", "chat message must be {role: str, content: str}"))
            ok = False
        elif check_role and not m["role"].strip():
            problems.append(where(f"{field}[{j}].role", "empty text"))
            ok = False
        elif not m["content"].strip() and m["role"] != "system":
            problems.append(where(f"{field}[{j}].content", "empty text"))
            ok = False
    return ok


def _check_response(row: dict, name: str, problems: list, where) -> Optional[Response]:
    """A pair's ``chosen`` / ``rejected``: non-empty text, or a non-empty list of chat messages
    (kept as {role, content}, as a chat prompt is)."""
    v = row.get(name)
    if not isinstance(v, list):
        return _check_text(row, name, problems, where)
    if not v:
        problems.append(where(name, "expected text or a non-empty list of chat messages, got an empty list"))
        return None
    ok = _chat_messages_ok(v, name, problems, where, check_role=True)
    return [{"role": m["role"], "content": m["content"]} for m in v] if ok else None


def extract_prompt(chosen: Response, rejected: Response) -> Tuple[Response, Response, Response]:
    """``(prompt, chosen rest, rejected rest)`` of a pair whose prompt is implicit, the start of
    both responses, split exactly as TRL's ``trl.data_utils.extract_prompt``: the longest common
    prefix of two texts (characters; a space just before the point where they part goes to the
    responses) or of two conversations (whole messages). One side being a start of the other
    has no point where they part: TRL then splits one item before the end of the shorter; the
    caller refuses such pairs (:func:`load_records` reports them)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":  # TRL: "remove space before the prompt"
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _implicit_pair(chosen: Response, rejected: Response, problems: list, where
                   ) -> Tuple[Optional[Response], Optional[Response], Optional[Response]]:
    """The prompt and responses of a pairs row without ``prompt`` (:func:`extract_prompt`), or
    Nones after adding the problem."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        problems.append(where("rejected", "chosen and rejected must both be text or both chat messages"))
        return None, None, None
    n = min(len(chosen), len(rejected))
    if chosen[:n] == rejected[:n]:  # one is the other's start (TRL would cut one item before its end)
        if len(chosen) != len(rejected):
            longer = "rejected" if len(rejected) > len(chosen) else "chosen"
            problems.append(where(longer, f"{'chosen' if longer == 'rejected' else 'rejected'} is the start of "
                                          f"{longer}: no response of its own to compare (implicit prompt)"))
        return None, None, None  # identical: reported by the caller
    prompt, c, r = extract_prompt(chosen, rejected)
    unit = "text" if isinstance(chosen, str) else "message"
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        problems.append(where("prompt", f"missing field (and chosen and rejected share no leading {unit} to take it "
                                        "from as an implicit prompt)"))
        return None, None, None
    if isinstance(c, str) and (not c.strip() or not r.strip()):
        problems.append(where("chosen" if not c.strip() else "rejected", "empty text after the shared prompt"))
        return None, None, None
    return prompt, c, r


def _annotator(row: dict, problems: list, where) -> Optional[str]:
    a = row.get("annotator")
    if a is None:
        return None
    if isinstance(a, (int, str)) and not isinstance(a, bool) and str(a).strip():
        return str(a)
    problems.append(where("annotator", f"expected a non-empty id, got {_shown(a)}"))
    return None


def _parse_pair(row: dict, problems: list, where, triples: bool = False) -> Optional[PairRecord]:
    """A ``pairs`` row: explicit prompt (text or chat) with text or conversational responses, or
    an implicit prompt (no ``prompt``: the shared start of chosen and rejected). ``triples``
    (TPO's data): its ``reference`` is read too, a TripleRecord; otherwise that key, as any
    other, is ignored (a pairs file may carry a column of that name with another meaning)."""
    n0 = len(problems)
    implicit = row.get("prompt") is None and (row.get("chosen") is not None or row.get("rejected") is not None)
    prompt = None if implicit else _check_prompt(row, problems, where)
    ann = _annotator(row, problems, where)
    chosen = _check_response(row, "chosen", problems, where)
    rejected = _check_response(row, "rejected", problems, where)
    if chosen is not None and rejected is not None:
        if chosen == rejected:
            problems.append(where("rejected", "identical to chosen"))
        elif implicit:
            prompt, chosen, rejected = _implicit_pair(chosen, rejected, problems, where)
        elif isinstance(chosen, str) != isinstance(rejected, str):
            problems.append(where("rejected", f"expected {'text' if isinstance(chosen, str) else 'chat messages'} "
                                              "as chosen is: both responses are text or both chat messages"))
        elif isinstance(chosen, list) and isinstance(prompt, str):
            problems.append(where("prompt", "conversational responses (chat messages) need a chat prompt (a list "
                                            "of messages), got text"))
    margin = row.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if not _is_number(margin):
        problems.append(where("margin", f"expected a number, got {_shown(margin)}"))
    elif margin < 0:
        problems.append(where("margin", f"must be >= 0, got {margin}"))
    gold = _gold_response(row, prompt if implicit else None, chosen, problems, where) if triples else None
    check_unrendered_fields(row, problems, where, template=any(isinstance(row.get(k), list) for k in
                                                               ("prompt", "chosen", "rejected")))
    if len(problems) > n0:
        return None
    if gold is not None:
        return TripleRecord(prompt, chosen, rejected, float(margin), ann, gold)
    return PairRecord(prompt, chosen, rejected, float(margin), ann)


def _gold_response(row: dict, implicit_prompt: Optional[Response], chosen: Optional[Response], problems: list,
                   where) -> Optional[Response]:
    """A pairs row's optional ``reference`` (TPO's gold response), checked as chosen is and of its
    kind (text or messages); with an implicit prompt it must start with that prompt, which is cut
    off (TRL's TPO ``_extract_triple_prompt``)."""
    if row.get("reference") is None:
        return None
    gold = _check_response(row, "reference", problems, where)
    if gold is None or chosen is None:
        return None
    if isinstance(gold, str) != isinstance(chosen, str):
        kind = "text" if isinstance(chosen, str) else "chat messages"
        problems.append(where("reference", f"expected {kind} as chosen is"))
        return None
    if implicit_prompt is not None:
        if gold[:len(implicit_prompt)] != implicit_prompt:
            problems.append(where("reference", "does not start with the implicit prompt shared by chosen and "
                                               "rejected (give an explicit prompt)"))
            return None
        gold = gold[len(implicit_prompt):]
        if not gold or (isinstance(gold, str) and not gold.strip()):
            problems.append(where("reference", "empty after the shared prompt"))
            return None
    return gold


def _parse_row(kind: str, row: Any, problems: list, where, triples: bool = False) -> Optional[Record]:
    if isinstance(row, _BadJSON):
        problems.append(where("<line>", row.message))
        return None
    if not isinstance(row, dict):
        problems.append(where("<line>", f"expected a JSON object, got {type(row).__name__}"))
        return None
    n0 = len(problems)
    if kind == "sft" and row.get("messages") is None and row.get("conversations") is not None:
        row = _sharegpt_row(row)  # ShareGPT's {conversations: [{from, value}]}, as TRL's SFTTrainer reads it
    if kind == "sft":  # TRL renders a conversation (messages, or a chat prompt) with the row's tools
        check_unrendered_fields(row, problems, where, template=any(isinstance(row.get(k), list) for k in
                                                                   ("messages", "prompt")))
    if kind == "sft" and row.get("messages") is not None:  # TRL's conversational format
        messages = _check_messages(row, problems, where)
        ann = _annotator(row, problems, where)
        return ChatRecord(messages, ann) if len(problems) == n0 else None
    if kind == "sft" and row.get("text") is not None:  # TRL's language-modeling format
        clash = [k for k in ("prompt", "completion") if row.get(k) is not None]
        if clash:
            problems.append(where("text", f"a text record cannot also have {' and '.join(clash)} "
                                          "(give either text or prompt + completion)"))
            return None
        text = _check_text(row, "text", problems, where)
        ann = _annotator(row, problems, where)
        return TextRecord(text, ann) if len(problems) == n0 else None
    if kind == "pairs":
        return _parse_pair(row, problems, where, triples)
    prompt = _check_prompt(row, problems, where)
    ann = _annotator(row, problems, where)
    if kind == "sft":
        completion = _check_text(row, "completion", problems, where)
        return SFTRecord(prompt, completion, ann) if len(problems) == n0 else None
    if kind == "rankings":
        responses = row.get("responses")
        if responses is None:
            problems.append(where("responses", "missing field"))
        elif not isinstance(responses, list) or len(responses) < 2:
            problems.append(where("responses", "expected a list of at least 2 texts"))
            responses = None
        else:
            first: Dict[str, int] = {}
            for j, r in enumerate(responses):
                if not isinstance(r, str) or not r.strip():
                    problems.append(where(f"responses[{j}]", "empty text" if isinstance(r, str) else
                                          f"expected text, got {type(r).__name__}"))
                elif r in first:  # one text at two ranks: the ranking would prefer it to itself
                    problems.append(where(f"responses[{j}]", f"identical to responses[{first[r]}]"))
                else:
                    first[r] = j
        ranking = row.get("ranking")
        if ranking is None:
            problems.append(where("ranking", "missing field"))
        elif (not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
              or (responses is not None and sorted(ranking) != list(range(len(responses))))):
            k = len(responses) if responses is not None else "K"
            problems.append(where("ranking", f"not a permutation of 0..{k if k == 'K' else k - 1}: {_shown(ranking)}"))
        return RankingRecord(prompt, list(responses), list(ranking), ann) if len(problems) == n0 else None
    if kind == "scores":
        response = _check_text(row, "response", problems, where)
        score = row.get("score")
        if score is None:
            problems.append(where("score", "missing field"))
        elif not _is_number(score):
            problems.append(where("score", f"not a number: {_shown(score)}"))
        return ScoreRecord(prompt, response, float(score), ann) if len(problems) == n0 else None
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _key(rec: Record) -> str:
    """A hashable identity of a record's content (annotator included)."""
    return json.dumps(dataclasses.asdict(rec), sort_keys=True)


def format_problems(problems: Sequence[Problem], limit: int = 20) -> str:
    """One line per problem (the first ``limit``), then a count of the rest."""
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more problems")
    return "\n".join(lines)


def problems_error(name: str, what: str, problems: Sequence[Problem]) -> ValueError:
    """The ValueError for invalid input: a first line that a CLI prints alone (the count and the
    first problem), then every problem on a line of its own (``format_problems``)."""
    first = problems[0]
    return ValueError(f"{name}: {len(problems)} problem(s) in {what} (first: line {first.line}: {first.field}: "
                      f"{first.message})\n" + format_problems(problems))


def load_records(
    source: Any,
    kind: str,
    *,
    strict: bool = True,
    dedup: Optional[bool] = None,
    triples: bool = False,
    key: Optional[str] = None,
) -> Union[List[Record], Tuple[List[Record], List[Problem]]]:
    """Read and validate feedback records of ``kind`` (one of ``KINDS``) from ``source``.
    ``triples`` (``pairs`` only; TPO's data): each row's ``reference`` gold response is read
    and checked too (a :class:`TripleRecord`); without it a ``reference`` key is ignored.

    With ``strict=True`` (default) any problem raises one ValueError whose first line
    counts them and whose next lines are ``file:line: field: message``; otherwise returns
    ``(valid records, problems)``. A record repeated with the same annotator is a problem
    ("duplicate") with ``dedup=None`` (default); ``dedup=True`` drops the repeats silently and
    ``dedup=False`` keeps them (a trainer's ``dedup: false``). ``key``: the config
    key or option that named a path ``source``, for the error when it is no file.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name, rows = read_rows(source, key)
    problems: List[Problem] = []
    records: List[Record] = []
    seen: Dict[str, int] = {}
    first_of: Dict[bool, int] = {}  # sft: the first line of a text record (True) and of another form (False)
    for line, row in rows:
        def where(field, message, _line=line):
            return Problem(name, _line, field, message)

        rec = _parse_row(kind, row, problems, where, triples=triples)
        if rec is None:
            continue
        if kind == "sft":  # the first record's form (text, or not) is the file's: each other one is a problem
            is_text = isinstance(rec, TextRecord)
            if (not is_text) in first_of:
                forms = ("a prompt/completion or messages record", "a {\"text\"} record")
                problems.append(where("text" if is_text else "<record>",
                                      f"{forms[is_text]} in a file whose line {first_of[not is_text]} is "
                                      f"{forms[not is_text]}: text records cannot be mixed with other sft records "
                                      "(one format per file, as TRL's dataset_text_field)"))
                continue
            first_of.setdefault(is_text, line)
        k = _key(rec)
        if k in seen and dedup is not False:
            if dedup is None:
                what = "pair" if kind == "pairs" else "record"
                problems.append(where("<record>", f"duplicate {what} (same as line {seen[k]})"))
            continue
        seen.setdefault(k, line)
        records.append(rec)
    if strict:
        if problems:
            raise problems_error(name, f"{kind} records", problems)
        return records
    return records, problems


def dedup_records(records: Sequence[Record], *, ignore_annotator: bool = False) -> List[Record]:
    """Records with exact repeats removed (first kept); ``ignore_annotator`` merges annotators."""
    out, seen = [], set()
    for r in records:
        k = _key(dataclasses.replace(r, annotator=None) if ignore_annotator else r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def record_item_key(rec: Any) -> Optional[tuple]:
    """The item a preference / score record judges, whoever judged it and however: its prompt and
    its responses unordered (a pair's chosen and rejected, a ranking's responses), a score's
    prompt and response, or a KTO binary record's prompt and completion (every annotator's
    thumbs on one side); None for another record (each one its own item). A hashable tuple, for
    splits that keep every label of an item on one side (:func:`rlhf_fast.trainers.common.split_records`)."""
    def text(x):
        return x if isinstance(x, str) else json.dumps(x, sort_keys=True)

    if isinstance(rec, PairRecord):
        return ("pair", text(rec.prompt), tuple(sorted((text(rec.chosen), text(rec.rejected)))))
    if isinstance(rec, RankingRecord):
        return ("ranking", text(rec.prompt), tuple(sorted(text(r) for r in rec.responses)))
    if isinstance(rec, ScoreRecord):
        return ("score", text(rec.prompt), text(rec.response))
    # KTO's BinaryRecord lives in rlhf_fast.trainers.kto, which imports this module; when that is
    # not loaded no record can be one (and this module stays free of torch)
    kto = sys.modules.get("rlhf_fast.trainers.kto")
    if kto is not None and isinstance(rec, kto.BinaryRecord):
        return ("binary", text(rec.prompt), text(rec.completion))
    return None


def response_text(response: Response) -> str:
    """A response as plain text: itself, or the contents of its messages joined by newlines
    (for lengths in characters and for training a tiny tokenizer, not for encoding)."""
    return response if isinstance(response, str) else "\n".join(m["content"] for m in response)


def comparable_pairs(records: Sequence[Any]) -> List[Any]:
    """``records`` with every conversational response of a PairRecord replaced by its JSON text,
    as :func:`rlhf_fast.feedback.agreement.agreement_stats` keys an item's responses (it reads
    message lists that way itself)."""
    out = []
    for r in records:
        if isinstance(r, PairRecord) and not (isinstance(r.chosen, str) and isinstance(r.rejected, str)):
            as_text = lambda x: x if isinstance(x, str) else json.dumps(x, sort_keys=True)  # noqa: E731
            r = dataclasses.replace(r, chosen=as_text(r.chosen), rejected=as_text(r.rejected))
        out.append(r)
    return out


def record_texts(rec: Record) -> List[str]:
    """The response texts of a record (completion, chosen+rejected, responses or response)."""
    if isinstance(rec, SFTRecord):
        return [rec.completion]
    if isinstance(rec, ChatRecord):
        return [m.get("content") or "" for m in rec.messages if m["role"] == "assistant"]  # a tool call: None
    if isinstance(rec, TextRecord):
        return [rec.text]
    if isinstance(rec, PairRecord):
        return [response_text(rec.chosen), response_text(rec.rejected)]
    if isinstance(rec, RankingRecord):
        return list(rec.responses)
    return [rec.response]


def filter_by_length(
    records: Sequence[Record],
    *,
    tokenizer: Any = None,
    max_prompt_len: Optional[int] = None,
    max_response_len: Optional[int] = None,
    min_response_len: int = 1,
) -> List[Record]:
    """Keep records whose prompt and every response fit the limits.

    Lengths are in tokens when ``tokenizer`` is given (prompt rendered with its chat
    template), in characters otherwise. ``None`` means no limit. A conversation without an
    assistant text has no response to limit (kept when its prompt fits).
    """
    def length(text: str) -> int:
        if tokenizer is None:
            return len(text)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = []
    for r in records:
        prompt = getattr(r, "prompt", "")  # a conversation or a text record has none of its own
        p = render_prompt(prompt, tokenizer) if tokenizer is not None else (
            prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt))
        if max_prompt_len is not None and length(p) > max_prompt_len:
            continue
        texts = record_texts(r)
        if isinstance(r, ChatRecord):  # an assistant turn that only calls tools (content None) is no answer
            texts = [t for t in texts if t]
        lens = [length(t) for t in texts]  # (none for a conversation without an answer: all fit)
        if max_response_len is not None and lens and max(lens) > max_response_len:
            continue
        if lens and min(lens) < min_response_len:
            continue
        out.append(r)
    return out


def rankings_to_pairs(records: Iterable[RankingRecord], *, adjacent_only: bool = False) -> List[PairRecord]:
    """Every (better, worse) pair implied by each ranking: K·(K−1)/2 pairs per record
    (K−1 with ``adjacent_only``: each response over the next one). Margins are 0; the
    annotator is kept. A pair of two identical texts carries no preference and is left out
    (``load_records`` refuses such rankings; records built in code may hold them). A ranking that
    is not a permutation of the responses' indices is a ValueError."""
    out = []
    for r in records:
        if not isinstance(r, RankingRecord):
            raise TypeError(f"records must be RankingRecord, got {type(r).__name__}")
        order = r.ranking
        if sorted(order) != list(range(len(r.responses))):  # -1 would read the last response as the worst
            raise ValueError(f"ranking must be a permutation of 0..{len(r.responses) - 1} (the indices of the "
                             f"responses, best first), got {_shown(order)}")
        for i in range(len(order)):
            for j in range(i + 1, (i + 2) if adjacent_only else len(order)):
                if j < len(order):
                    better, worse = r.responses[order[i]], r.responses[order[j]]
                    if better != worse:
                        out.append(PairRecord(r.prompt, better, worse, 0.0, r.annotator))
    return out


class RenderedChat(str):
    """A chat prompt rendered to text by :func:`render_prompt` (a ``str`` in every other
    respect). Its token ids are the text's WITHOUT the tokenizer's special tokens
    (:func:`prompt_token_ids`): the chat template writes its own, a bos where it has one — as
    ``apply_chat_template(tokenize=True)``, TRL's trainers and our SFT / DPO / reward rows
    encode a rendered chat, so generation reads the prefix training did."""

    __slots__ = ()


def prompt_token_ids(tokenizer: Any, texts: Sequence[str]) -> List[List[int]]:
    """The token ids (one int list per text) of prompts as the policy reads them, at generation
    and in training alike: a :class:`RenderedChat` without the tokenizer's special tokens (its
    template wrote its own), plain text with them (e.g. a bos; TRL's ``tokenizer(text)``), except
    that a plain text already starting with the bos token (a chat rendered elsewhere) keeps one
    bos, not two. The rollout engine, SDFT / SDPO's teacher and student prompts, distillation's
    data rows and the local judge encode prompts with it."""
    texts = list(texts)
    out: List[List[int]] = [[] for _ in texts]
    for chat in (True, False):  # one batched call per kind
        idx = [i for i, t in enumerate(texts) if isinstance(t, RenderedChat) == chat]
        if idx:
            enc = tokenizer([str(texts[i]) for i in idx], add_special_tokens=not chat)["input_ids"]
            for i, ids in zip(idx, enc):
                out[i] = list(ids)
    bos, bos_text = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if bos is not None and isinstance(bos_text, str) and bos_text:
        out = [p[1:] if not isinstance(t, RenderedChat) and len(p) > 1 and p[0] == p[1] == bos
               and t.startswith(bos_text) else p for p, t in zip(out, texts)]
    return out


def render_prompt(prompt: Prompt, tokenizer: Any = None, tools: Optional[Sequence[Any]] = None,
                  chat_template_kwargs: Optional[Dict[str, Any]] = None) -> str:
    """The prompt as text: plain text unchanged; a chat rendered with the tokenizer's chat
    template and the generation prompt (or "role: content" lines without a template), as a
    :class:`RenderedChat` (encoded without the tokenizer's special tokens: :func:`prompt_token_ids`).
    ``tools``: callables (or JSON schemas) the template describes to the model, as
    ``apply_chat_template(tools=...)`` renders them; ``chat_template_kwargs``: extra variables
    the template reads (e.g. ``{"enable_thinking": False}`` for Qwen3), TRL's
    ``chat_template_kwargs`` (chats with a template only, for both)."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise TypeError(f"prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        kw = {"tools": list(tools)} if tools else {}
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kw,
                                             **(chat_template_kwargs or {}))
        return RenderedChat(text)
    return RenderedChat("".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: ")


# the config attribute in which the reward trainer records the form of the responses it trained
# on: "text", "conversational" (chat messages) or "mixed"; RL scores a text answer to a chat prompt
# as an assistant message where it says "conversational" (RewardModelReward)
REWARD_FORMAT_ATTR = "rlhf_fast_reward_format"
# and the config attribute in which it records its ``chat_template_kwargs`` (a mapping, {} for
# none): RewardModelReward renders chats with them, so RL scores at the ids the head trained on
REWARD_TEMPLATE_KWARGS_ATTR = "rlhf_fast_reward_chat_template_kwargs"


def reward_input_ids(tokenizer: Any, prompt: Prompt, response: Response, max_len: Optional[int] = None,
                     chat_template_kwargs: Optional[Dict[str, Any]] = None) -> List[int]:
    """The token ids a reward model scores for ``response`` to ``prompt``, as the reward
    trainer encodes them: a plain-text prompt and the response tokenized as one text with the
    tokenizer's special tokens (e.g. bos), as TRL's RewardTrainer tokenizes prompt + chosen; a
    chat prompt rendered with its template (its special tokens) then the response without
    special tokens; then eos, unless the ids already end with it (TRL's ``add_eos``); the last
    ``max_len`` ids when longer (the score is read at the last
    token, so the end is kept). A conversational response (chat messages) is the tokens the
    chat template writes for those turns after the prompt (content and end of turn,
    :func:`rlhf_fast.trainers.sft_data.completion_tokens`; TRL's RewardTrainer ids), and
    the eos still follows (where the turn does not end with it): the head is always read at an eos. Score texts with this encoding
    wherever a trained reward model is used: its head was trained at that final eos (and, for a
    model whose config's :data:`REWARD_FORMAT_ATTR` is "conversational", with the answer to a
    chat prompt as an assistant message, as it was trained).
    ``chat_template_kwargs``: extra variables the chat template reads, for a chat prompt and a
    conversational response alike (the reward trainer's ``chat_template_kwargs``; in RL those
    the model saved, :data:`REWARD_TEMPLATE_KWARGS_ATTR`, else the run's ``data.chat_template_kwargs``)."""
    if not isinstance(response, str):
        from rlhf_fast.trainers.sft_data import completion_tokens

        p, (c,) = completion_tokens(tokenizer, prompt, response, chat_template_kwargs=chat_template_kwargs)
        ids = p + c  # the whole conversation as the template renders it
    else:
        text = render_prompt(prompt, tokenizer, chat_template_kwargs=chat_template_kwargs)
        if isinstance(prompt, str):  # one text, as TRL's prompt + chosen: an implicit prompt may end mid-word
            ids = list(tokenizer(text + response)["input_ids"])
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = list(ids) + list(tokenizer(response, add_special_tokens=False)["input_ids"])
    # TRL's add_eos: none added where the sequence already ends with it
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids[-max_len:] if max_len else ids


def padded_length(longest: int, pad_to_multiple_of: Optional[int] = None) -> int:
    """``longest`` rounded up to a multiple of ``pad_to_multiple_of`` (None: as it is)."""
    m = pad_to_multiple_of or 1
    return -(-longest // m) * m


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, pad_to_multiple_of: Optional[int] = None):
    """Token-id lists as ``(input_ids, attention_mask)`` ``[N, T]`` int64, right-padded with
    ``pad_id`` to T = the longest, rounded up to a multiple of ``pad_to_multiple_of``: how
    reward-model inputs (:func:`reward_input_ids`) are batched, the score then read at each
    row's last attended token."""
    import torch

    ids = torch.full((len(seqs), padded_length(max(len(s) for s in seqs), pad_to_multiple_of)), pad_id,
                     dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
    return ids, attn


def write_jsonl(records: Iterable[Any], path: str) -> None:
    """Write records (dataclasses or dicts) as JSONL atomically."""
    from rlhf_fast.trainers.config import atomic_write_text

    lines = [json.dumps(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


__all__ = ["KINDS", "SFTRecord", "ChatRecord", "TextRecord", "PairRecord", "TripleRecord", "Response",
           "extract_prompt",
           "response_text", "comparable_pairs", "RankingRecord", "ScoreRecord", "Problem", "problems_error",
           "load_records", "read_rows", "json_rows", "refuse_unread_format", "check_unrendered_fields",
           "check_input_file", "dedup_records",
           "filter_by_length", "rankings_to_pairs",
           "record_item_key", "render_prompt", "RenderedChat", "prompt_token_ids", "reward_input_ids",
           "pad_right",
           "format_problems", "record_texts", "write_jsonl"]
