"""Feedback record formats: reading, validation, de-duplication, filtering, rankings → pairs.

Four kinds of record, each with an optional ``annotator`` id:

============  =====================================================================
kind          fields
============  =====================================================================
``sft``       prompt, completion; or messages (a whole conversation, TRL's
              "conversational language modeling" format)
``pairs``     prompt, chosen, rejected, optional margin (number ≥ 0)
``rankings``  prompt, responses (≥ 2 texts), ranking (permutation of their indices,
              best first)
``scores``    prompt, response, score (number)
============  =====================================================================

A prompt is plain text or a chat (a list of ``{"role", "content"}`` messages), rendered
with the tokenizer's chat template by :func:`render_prompt`. Sources: JSONL files, Parquet
files (needs pyarrow), a ``datasets.Dataset`` or a list of dicts. Validation collects
every problem with its file, line and field, then raises one ValueError listing them
(or returns them with ``strict=False``).

An ``sft`` row holding ``messages`` (and neither prompt nor completion) is read as a
:class:`ChatRecord`, a conversation rendered whole by the SFT trainer; every other row
of every kind is read as before.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

KINDS = ("sft", "pairs", "rankings", "scores")

Prompt = Union[str, List[Dict[str, str]]]


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
class PairRecord:
    """A preference: ``chosen`` is better than ``rejected`` by ``margin`` (0 when unknown)."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float = 0.0
    annotator: Optional[str] = None


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
Record = Union[SFTRecord, ChatRecord, PairRecord, RankingRecord, ScoreRecord]


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

def read_rows(source: Any) -> Tuple[str, List[Tuple[int, Any]]]:
    """``(source name, [(line, row), ...])`` from a JSONL/Parquet path, a Dataset or a list.

    Lines that are not valid JSON come back as ``(line, _BadJSON(message))`` so validation
    reports them with the others; blank lines are skipped.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"feedback file not found: {path}")
        if path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
            rows = pq.read_table(path).to_pylist()
            return path, [(i + 1, r) for i, r in enumerate(rows)]
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((i, _BadJSON(f"invalid JSON ({e.msg} at column {e.colno})")))
        return path, out
    if isinstance(source, (list, tuple)):
        return "<list>", [(i + 1, r) for i, r in enumerate(source)]
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # datasets.Dataset
        return "<dataset>", [(i + 1, dict(r)) for i, r in enumerate(source)]
    raise TypeError(f"source must be a path (.jsonl/.parquet), a list of dicts or a datasets.Dataset, "
                    f"got {type(source).__name__}")


class _BadJSON:
    def __init__(self, message: str):
        self.message = message


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
    non-empty str} (extra keys kept); a row with prompt or completion beside it is ambiguous."""
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
    ok = _chat_messages_ok(msgs, "messages", problems, where, check_role=True)
    return [dict(m) for m in msgs] if ok else None


def _chat_messages_ok(msgs: list, field: str, problems: list, where, *, check_role: bool) -> bool:
    """Whether every item of ``msgs`` is {role: str, content: non-empty str} (with
    ``check_role`` a non-empty role too); each problem is added, named ``field[j]``."""
    ok = True
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            problems.append(where(f"{field}[{j}]", "chat message must be {role: str, content: str}"))
            ok = False
        elif check_role and not m["role"].strip():
            problems.append(where(f"{field}[{j}].role", "empty text"))
            ok = False
        elif not m["content"].strip():
            problems.append(where(f"{field}[{j}].content", "empty text"))
            ok = False
    return ok


def _annotator(row: dict, problems: list, where) -> Optional[str]:
    a = row.get("annotator")
    if a is None:
        return None
    if isinstance(a, (int, str)) and not isinstance(a, bool) and str(a).strip():
        return str(a)
    problems.append(where("annotator", f"expected a non-empty id, got {_shown(a)}"))
    return None


def _parse_row(kind: str, row: Any, problems: list, where) -> Optional[Record]:
    if isinstance(row, _BadJSON):
        problems.append(where("<line>", row.message))
        return None
    if not isinstance(row, dict):
        problems.append(where("<line>", f"expected a JSON object, got {type(row).__name__}"))
        return None
    n0 = len(problems)
    if kind == "sft" and row.get("messages") is not None:  # TRL's conversational format
        messages = _check_messages(row, problems, where)
        ann = _annotator(row, problems, where)
        return ChatRecord(messages, ann) if len(problems) == n0 else None
    prompt = _check_prompt(row, problems, where)
    ann = _annotator(row, problems, where)
    if kind == "sft":
        completion = _check_text(row, "completion", problems, where)
        return SFTRecord(prompt, completion, ann) if len(problems) == n0 else None
    if kind == "pairs":
        chosen = _check_text(row, "chosen", problems, where)
        rejected = _check_text(row, "rejected", problems, where)
        margin = row.get("margin", 0.0)
        if margin is None:
            margin = 0.0
        if not _is_number(margin):
            problems.append(where("margin", f"expected a number, got {_shown(margin)}"))
        elif margin < 0:
            problems.append(where("margin", f"must be >= 0, got {margin}"))
        if chosen is not None and chosen == rejected:
            problems.append(where("rejected", "identical to chosen"))
        return PairRecord(prompt, chosen, rejected, float(margin), ann) if len(problems) == n0 else None
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
    dedup: bool = False,
) -> Union[List[Record], Tuple[List[Record], List[Problem]]]:
    """Read and validate feedback records of ``kind`` (one of ``KINDS``) from ``source``.

    With ``strict=True`` (default) any problem raises one ValueError whose first line
    counts them and whose next lines are ``file:line: field: message``; otherwise returns
    ``(valid records, problems)``. A record repeated with the same annotator is a problem
    ("duplicate") unless ``dedup=True``, which drops the repeats silently.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name, rows = read_rows(source)
    problems: List[Problem] = []
    records: List[Record] = []
    seen: Dict[str, int] = {}
    for line, row in rows:
        def where(field, message, _line=line):
            return Problem(name, _line, field, message)

        rec = _parse_row(kind, row, problems, where)
        if rec is None:
            continue
        k = _key(rec)
        if k in seen:
            if not dedup:
                what = "pair" if kind == "pairs" else "record"
                problems.append(where("<record>", f"duplicate {what} (same as line {seen[k]})"))
            continue
        seen[k] = line
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


def record_texts(rec: Record) -> List[str]:
    """The response texts of a record (completion, chosen+rejected, responses or response)."""
    if isinstance(rec, SFTRecord):
        return [rec.completion]
    if isinstance(rec, ChatRecord):
        return [m["content"] for m in rec.messages if m["role"] == "assistant"]
    if isinstance(rec, PairRecord):
        return [rec.chosen, rec.rejected]
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
    template), in characters otherwise. ``None`` means no limit.
    """
    def length(text: str) -> int:
        if tokenizer is None:
            return len(text)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = []
    for r in records:
        p = render_prompt(r.prompt, tokenizer) if tokenizer is not None else (
            r.prompt if isinstance(r.prompt, str) else "".join(m["content"] for m in r.prompt))
        if max_prompt_len is not None and length(p) > max_prompt_len:
            continue
        lens = [length(t) for t in record_texts(r)]
        if max_response_len is not None and max(lens) > max_response_len:
            continue
        if min(lens) < min_response_len:
            continue
        out.append(r)
    return out


def rankings_to_pairs(records: Iterable[RankingRecord], *, adjacent_only: bool = False) -> List[PairRecord]:
    """Every (better, worse) pair implied by each ranking: K·(K−1)/2 pairs per record
    (K−1 with ``adjacent_only``: each response over the next one). Margins are 0; the
    annotator is kept. A pair of two identical texts carries no preference and is left out
    (``load_records`` refuses such rankings; records built in code may hold them)."""
    out = []
    for r in records:
        if not isinstance(r, RankingRecord):
            raise TypeError(f"records must be RankingRecord, got {type(r).__name__}")
        order = r.ranking
        for i in range(len(order)):
            for j in range(i + 1, (i + 2) if adjacent_only else len(order)):
                if j < len(order):
                    better, worse = r.responses[order[i]], r.responses[order[j]]
                    if better != worse:
                        out.append(PairRecord(r.prompt, better, worse, 0.0, r.annotator))
    return out


def render_prompt(prompt: Prompt, tokenizer: Any = None) -> str:
    """The prompt as text: plain text unchanged; a chat rendered with the tokenizer's chat
    template and the generation prompt (or "role: content" lines without a template)."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise TypeError(f"prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def reward_input_ids(tokenizer: Any, prompt: Prompt, response: str, max_len: Optional[int] = None) -> List[int]:
    """The token ids a reward model scores for ``response`` to ``prompt``, as the reward
    trainer encodes them: the rendered prompt (a plain-text prompt with the tokenizer's
    special tokens, e.g. bos; a chat with its template's), the response without special
    tokens, then eos; the last ``max_len`` ids when longer (the score is read at the last
    token, so the end is kept). Score texts with this encoding wherever a trained reward
    model is used: its head was trained at that final eos."""
    ids = tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=isinstance(prompt, str))["input_ids"]
    ids = list(ids) + list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids[-max_len:] if max_len else ids


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int):
    """Token-id lists as ``(input_ids, attention_mask)`` ``[N, max len]`` int64, right-padded with
    ``pad_id``: how reward-model inputs (:func:`reward_input_ids`) are batched, the score then
    read at each row's last attended token."""
    import torch

    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
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


__all__ = ["KINDS", "SFTRecord", "ChatRecord", "PairRecord", "RankingRecord", "ScoreRecord", "Problem", "problems_error",
           "load_records", "read_rows", "dedup_records", "filter_by_length", "rankings_to_pairs", "render_prompt",
           "reward_input_ids", "pad_right",
           "format_problems", "record_texts", "write_jsonl"]
