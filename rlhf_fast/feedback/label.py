"""Human labelling in the terminal: ``rlhf-fast label PAIRS.jsonl --out LABELS.jsonl --annotator NAME``.

Shows a prompt and two responses (A and B) with rich and reads one answer a line:
``a`` / ``b`` (preferred response), ``t`` (tie), ``s`` (skip), ``u`` (undo the last label),
``q`` (quit; end of input also quits). Each label is appended to the output file with
write + flush + fsync, so a crash loses at most the item on screen; undo rewrites the file
atomically. Re-running with the same output file and annotator resumes at the first
item not yet labelled. Works with scripted stdin (one answer per line).

Input lines: ``{"prompt", "a", "b"}`` (also ``response_a``/``response_b``, ``responses``
[2] or ``chosen``/``rejected``). Output lines: ``{"item", "key", "prompt", "a", "b",
"label": "A"|"B"|"tie"|"skip", "annotator"}``; :func:`labels_to_pairs` turns them into
:class:`~rlhf_fast.feedback.formats.PairRecord`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from .formats import PairRecord, Problem, _BadJSON, _check_prompt, problems_error, read_rows, render_prompt

ANSWERS = {"a": "A", "b": "B", "t": "tie", "tie": "tie", "s": "skip", "skip": "skip",
           "u": "undo", "undo": "undo", "q": "quit", "quit": "quit"}


def item_key(prompt: Any, a: str, b: str) -> str:
    """A stable id of an item: its prompt and its two responses unordered, so an item shown with
    its sides swapped (``--shuffle-sides``, another ``--seed``) is the same item."""
    return hashlib.sha256(json.dumps([prompt, sorted([a, b])], sort_keys=True).encode()).hexdigest()[:16]


def _record_key(rec: Dict[str, Any]) -> str:
    """The :func:`item_key` of a label record, computed from its prompt and responses: files
    written before keys were side-free carry keys of the order shown."""
    return item_key(rec["prompt"], rec["a"], rec["b"])


def _response_problem(v: Any) -> str:
    """What is wrong with a response to label that is not non-empty text."""
    if v is None:
        return "missing field"
    if isinstance(v, list):  # TRL's conversational pairs: dpo / reward read them, labelling shows texts
        return "expected text, got a list of chat messages (items to label are text pairs)"
    return "empty text" if isinstance(v, str) else f"expected text, got {type(v).__name__}"


def load_items(path: str, *, shuffle_sides: bool = False, seed: int = 0) -> List[Dict[str, Any]]:
    """Items ``{"item", "key", "prompt", "a", "b"}`` from a pairs file; ValueError listing
    every malformed line (file:line: field: message). ``shuffle_sides`` swaps A and B for a
    seeded half of the items, so a labeller's position bias does not follow the file."""
    name, rows = read_rows(path, "PAIRS")
    rng = random.Random(seed)
    items, problems = [], []
    for line, row in rows:
        if not isinstance(row, dict):  # (a line that is no JSON keeps the parser's message)
            problems.append(Problem(name, line, "<line>", row.message if isinstance(row, _BadJSON)
                                    else f"expected a JSON object, got {type(row).__name__}"))
            continue
        a = b = None
        for ka, kb in (("a", "b"), ("response_a", "response_b"), ("chosen", "rejected")):
            if ka in row or kb in row:
                a, b = row.get(ka), row.get(kb)
                fields = (ka, kb)
                break
        else:
            if isinstance(row.get("responses"), list) and len(row["responses"]) == 2:
                a, b = row["responses"]
                fields = ("responses[0]", "responses[1]")
            else:
                problems.append(Problem(name, line, "a", "missing field (need a/b, response_a/response_b, "
                                                          "chosen/rejected or responses[2])"))
                continue
        prompt = row.get("prompt")
        n0 = len(problems)  # text or chat messages, checked as a pairs file's prompt (a list of anything
        # else was labelled, then crashed the session or made the labels file unreadable)
        _check_prompt(row, problems, lambda field, message, _line=line: Problem(name, _line, field, message))
        ok = len(problems) == n0
        for f, v in zip(fields, (a, b)):
            if not isinstance(v, str) or not v.strip():
                problems.append(Problem(name, line, f, _response_problem(v)))
                ok = False
        if ok and a == b:  # no preference to give: data_kind pairs refuses it too
            problems.append(Problem(name, line, fields[1], f"identical to {fields[0]}"))
            ok = False
        if not ok:
            continue
        if shuffle_sides and rng.random() < 0.5:
            a, b = b, a
        items.append({"item": len(items), "key": item_key(prompt, a, b), "prompt": prompt, "a": a, "b": b})
    if problems:
        raise problems_error(name, "pairs to label", problems)
    return items


_LABEL_FIELDS = ("key", "prompt", "a", "b", "label")


def read_labels(path: str) -> List[Dict[str, Any]]:
    """Label records of ``path`` ([] when absent). A torn last line (a crash mid-write: a
    record cut short, no newline after it) is dropped and the file rewritten; any other line
    that is not a label record is a ValueError naming the file and line, so a file that is
    not a labels file is never rewritten or appended to."""
    from rlhf_fast.trainers.config import atomic_write_text

    if not os.path.exists(path):
        return []
    if not os.path.isfile(path):
        found = "a folder" if os.path.isdir(path) else "a device or other special file"
        raise ValueError(f"{path}: expected a labels file, found {found}")
    with open(path, encoding="utf-8-sig") as f:  # (a file edited by hand may start with a byte-order mark)
        text = f.read()
    # split at "\n" only (universal newlines turned \r\n and \r into it), as json_rows: str.splitlines
    # would also split inside a JSON string holding a raw U+2028 or U+0085
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and line.lstrip().startswith("{") and not text.endswith("\n"):
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in out))
                break
            raise ValueError(f"{path}:{i + 1}: invalid JSON: not a labels file") from None
        missing = [k for k in _LABEL_FIELDS if k not in rec] if isinstance(rec, dict) else list(_LABEL_FIELDS)
        if missing or rec["label"] not in ("A", "B", "tie", "skip"):
            raise ValueError(f"{path}:{i + 1}: not a label record (expected the fields {', '.join(_LABEL_FIELDS)} "
                             f"with label A, B, tie or skip, as `rlhf-fast label` and `rlhf-fast judge` write)")
        bad = _label_record_problem(rec)
        if bad:
            raise ValueError(f"{path}:{i + 1}: {bad}")
        out.append(rec)
    return out


def _label_record_problem(rec: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a label record's prompt and responses ("field: message"), or None: a
    hand-edited file must not reach the trainers with a number for a response or with A = B."""
    prompt = rec["prompt"]
    if not isinstance(prompt, (str, list)) or not prompt or (isinstance(prompt, str) and not prompt.strip()):
        return f"prompt: expected non-empty text or chat messages, got {prompt!r}"
    for f in ("a", "b"):
        if not isinstance(rec[f], str) or not rec[f].strip():
            return f"{f}: expected non-empty text, got {rec[f]!r}"
    if rec["a"] == rec["b"] and rec["label"] in ("A", "B"):
        return "b: identical to a (a preference between two identical responses teaches nothing)"
    return None


def _append(path: str, record: Dict[str, Any]) -> None:
    # a last record without its newline (written by another tool, or cut before it) must not
    # run into this one: the file would no longer read
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        lead = b""
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            lead = b"" if f.read(1) == b"\n" else b"\n"
        f.write(lead + (json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def label_pairs(
    items: List[Dict[str, Any]],
    out: str,
    annotator: str,
    *,
    read_line: Callable[[], str],
    console: Any = None,
    tokenizer: Any = None,
) -> Dict[str, int]:
    """Run the labelling loop over ``items`` (from :func:`load_items`), appending to ``out``.

    ``read_line`` returns the next answer line ("" at end of input). Returns counts
    ``{"labelled", "remaining", "A", "B", "tie", "skip", "undone"}`` for this annotator.
    """
    from rlhf_fast.trainers.config import atomic_write_text

    if not isinstance(annotator, str) or not annotator.strip():
        raise ValueError(f"annotator must be a non-empty name, got {annotator!r}")
    if console is None:
        from rich.console import Console

        console = Console()
    from rich.panel import Panel

    all_labels = read_labels(out)
    by_key = {it["key"]: it for it in items}
    mine = [r for r in all_labels if r.get("annotator") == annotator and _record_key(r) in by_key]
    done = {_record_key(r) for r in mine}
    undone = 0
    if done:
        console.print(f"[dim]resuming: {len(done)} of {len(items)} already labelled by {annotator}[/dim]")
    while True:
        pending = [it for it in items if it["key"] not in done]
        it = pending[0] if pending else None
        if it is None:
            # the last label can still be taken back before the session ends
            console.print(f"[green]all {len(by_key)} items labelled[/green]")
            prompt = "[bold]u[/bold]ndo the last label, or Enter / [bold]q[/bold] to finish > "
        else:
            console.rule(f"item {it['item'] + 1} of {len(items)}  ({len(done)} labelled)")
            console.print(Panel(render_prompt(it["prompt"], tokenizer), title="prompt", expand=True))
            console.print(Panel(it["a"], title="A", border_style="cyan", expand=True))
            console.print(Panel(it["b"], title="B", border_style="magenta", expand=True))
            prompt = ("[bold]a[/bold]/[bold]b[/bold] better, [bold]t[/bold]ie, [bold]s[/bold]kip, "
                      "[bold]u[/bold]ndo, [bold]q[/bold]uit > ")
        while True:
            console.print(prompt, end="")
            line = read_line()
            if line == "" or (it is None and not line.strip()):
                answer = "quit"  # end of input, or Enter once all are labelled
                break
            answer = ANSWERS.get(line.strip().lower())
            if answer is not None and (it is not None or answer in ("undo", "quit")):
                break
            console.print(f"[red]unknown answer {line.strip()!r}[/red]")
        if answer == "quit":
            break
        if answer == "undo":
            if not mine:
                console.print("[yellow]nothing to undo[/yellow]")
                if it is None:
                    break
                continue
            last = mine.pop()
            # drop exactly that record (the last of this annotator) and rewrite atomically
            idx = max(i for i, r in enumerate(all_labels) if r is last)
            del all_labels[idx]
            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in all_labels))
            last_key = _record_key(last)
            done.discard(last_key)
            undone += 1
            # show the undone item next, even if earlier ones were skipped by resume
            items = [by_key[last_key]] + [x for x in items if x["key"] != last_key]
            continue
        rec = {"item": it["item"], "key": it["key"], "prompt": it["prompt"], "a": it["a"], "b": it["b"],
               "label": answer, "annotator": annotator, "time": round(time.time(), 3)}
        _append(out, rec)
        all_labels.append(rec)
        mine.append(rec)
        done.add(it["key"])
    counts = {k: sum(r["label"] == k for r in mine) for k in ("A", "B", "tie", "skip")}
    # a pair listed twice in the file is one item (one key), labelled once
    counts.update(labelled=len(done), remaining=len(by_key) - len(done), undone=undone)
    console.print(f"saved to {out}: {counts}")
    return counts


def labels_to_pairs(path: str, *, annotator: Optional[str] = None) -> List[PairRecord]:
    """PairRecords (chosen, rejected) from a labels file: A/B labels only (ties and skips
    carry no preference); only ``annotator``'s when given."""
    out = []
    for r in read_labels(path):
        if annotator is not None and r.get("annotator") != annotator:
            continue
        if r.get("label") == "A":
            out.append(PairRecord(r["prompt"], r["a"], r["b"], 0.0, r.get("annotator")))
        elif r.get("label") == "B":
            out.append(PairRecord(r["prompt"], r["b"], r["a"], 0.0, r.get("annotator")))
    return out


def add_arguments(parser) -> None:
    """CLI arguments of ``rlhf-fast label``."""
    parser.add_argument("pairs", help="JSONL of items to label: {prompt, a, b} per line")
    parser.add_argument("--out", required=True, help="labels JSONL (appended; resumed when it exists)")
    parser.add_argument("--annotator", default=os.environ.get("USER", "anonymous"), help="your annotator id")
    parser.add_argument("--shuffle-sides", action="store_true", help="swap A/B for a seeded half of the items")
    parser.add_argument("--seed", type=int, default=0)


def run(args, stdin: Optional[TextIO] = None) -> int:
    """Entry point of ``rlhf-fast label``; answers are read from ``stdin`` (default sys.stdin)."""
    stream = stdin if stdin is not None else sys.stdin
    from rlhf_fast.trainers.config import check_output_path

    check_output_path(args.out, "--out")
    if os.path.exists(args.out) and os.path.exists(args.pairs) and os.path.samefile(args.out, args.pairs):
        raise ValueError(f"--out {args.out} is the items file itself; write the labels to another file")
    items = load_items(args.pairs, shuffle_sides=args.shuffle_sides, seed=args.seed)
    if not items:
        raise ValueError(f"{args.pairs}: no items to label (the file holds no records)")
    label_pairs(items, args.out, args.annotator, read_line=stream.readline)
    return 0


__all__ = ["load_items", "label_pairs", "labels_to_pairs", "read_labels", "item_key", "add_arguments", "run"]
