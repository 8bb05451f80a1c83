"""AI feedback (RLAIF): a judge that prefers one of two responses or scores one.

Two backends:

* ``http``: an OpenAI-compatible ``/v1/chat/completions`` endpoint (base URL and key from
  the config or ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``), called with ``urllib``; 5xx, 429,
  connection errors and timeouts are retried with exponential back-off. When the server
  returns token log-probs and the answer's first token is its verdict (A or B), the preference
  is P(A) / (P(A) + P(B)) of that token, otherwise 1 / 0 / 0.5 from the text's verdict.
* ``local``: a transformers causal LM; the preference is the softmax over the summed
  log-probs of the continuations " A" and " B" after the prompt template (computed with
  the fused :func:`rlhf_fast.models.logprobs.sequence_logprobs`).

Position bias is mitigated by asking in both orders and averaging
P(A better) = (P(first | A, B) + 1 − P(first | B, A)) / 2. Every answer is cached on disk
in a JSON file keyed by a hash of (backend, model, template, prompt, responses, order), so
a re-run costs nothing.

``rlhf-fast judge ... --out FILE`` adds to an existing output file, as ``rlhf-fast label``
does: the records already there are kept, and only the items this judge (annotator
``judge:MODEL``) has not yet judged there are judged and appended, once each (a pair listed
twice, sides swapped or not, is one item); the file is rewritten atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

from rlhf_fast.trainers.config import typed_config

PAIR_TEMPLATE = (
    "You are comparing two responses to the same prompt.\n\n"
    "Prompt:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Which response is better? Answer with a single letter, A or B.\nAnswer:"
)
SCORE_TEMPLATE = (
    "Rate the response to the prompt on a scale from 1 (bad) to 10 (excellent).\n\n"
    "Prompt:\n{prompt}\n\nResponse:\n{response}\n\nAnswer with a single number.\nScore:"
)


@typed_config()
@dataclasses.dataclass
class JudgeConfig:
    """Judge settings. ``backend`` "http" or "local"; ``model``: the endpoint's model name,
    or a local path / ``tiny:`` spec for "local"; ``cache``: JSON cache path (None: none)."""

    backend: str = "http"
    model: str = "gpt-4o-mini"
    base_url: Optional[str] = None
    api_key: Optional[str] = None
    pair_template: str = PAIR_TEMPLATE
    score_template: str = SCORE_TEMPLATE
    both_orders: bool = True
    max_retries: int = 4
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    timeout: float = 60.0
    max_tokens: int = 4
    cache: Optional[str] = ".rlhf_fast_cache/judge.json"

    def __post_init__(self):
        if self.backend not in ("http", "local"):
            raise ValueError(f"backend must be 'http' or 'local', got {self.backend!r}")
        if not self.model:
            raise ValueError("model must be a non-empty name or path")
        for name, keys in (("pair_template", ("{prompt}", "{a}", "{b}")), ("score_template", ("{prompt}", "{response}"))):
            missing = [k for k in keys if k not in getattr(self, name)]
            if missing:
                raise ValueError(f"{name} must contain {', '.join(keys)}; missing {', '.join(missing)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if isinstance(self.max_tokens, int) and self.max_tokens < 1:  # (an endpoint refuses each request)
            raise ValueError(f"max_tokens must be an int >= 1 (the judge's answer), got {self.max_tokens}")
        # inf / nan would reach socket.settimeout and time.sleep, which fail mid-run
        if not _is_real(self.timeout) or not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {self.timeout!r}")
        if not _is_real(self.backoff) or not math.isfinite(self.backoff) or self.backoff < 0:
            raise ValueError(f"backoff must be a finite number of seconds >= 0, got {self.backoff!r}")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class JudgeError(RuntimeError):
    """The judge could not get an answer (after retries, or a non-retryable HTTP error)."""


class JsonCache:
    """The judge's answers on disk: JSON Lines of ``{"key": K, "value": number}``, one line
    appended (and fsynced) per new answer, so a run of n answers writes O(n) bytes, not the
    O(n^2) of rewriting a whole object each time, and a killed run keeps every finished answer.
    A torn last line (killed mid-append) is dropped. The one-object format of earlier releases
    (a JSON object mapping keys to numbers) is read too and rewritten as lines on the first new
    answer."""

    EXPECTED = ('JSON lines of {"key": ..., "value": number} or one JSON object mapping cache keys '
                'to numbers, as `rlhf-fast judge` writes')

    def __init__(self, path: Optional[str]):
        self.path = path
        self.data: Dict[str, Any] = {}
        self.hits = self.misses = 0
        # the file must be rewritten as lines before the next append: it is in the old
        # one-object format, or ends in a torn line
        self._rewrite = False
        if path and os.path.exists(path):
            self.data, self._rewrite = self._read(path)

    @classmethod
    def _fail(cls, path: str, where: str, what: str) -> ValueError:
        how = "delete it or give another --cache to start over"
        return ValueError(f"judge cache {path}{where}: {what}; expected {cls.EXPECTED} ({how})")

    @classmethod
    def _read(cls, path: str):
        if not os.path.isfile(path):
            raise ValueError(f"judge cache {path}: expected a file, found a folder")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise cls._fail(path, "", "not UTF-8 text") from None
        if not text.strip():
            return {}, False
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if whole is not None and not (isinstance(whole, dict) and set(whole) == {"key", "value"}):
            if not isinstance(whole, dict):
                raise cls._fail(path, "", f"found a JSON {type(whole).__name__}")
            for k, v in whole.items():
                if not _is_real(v):
                    raise cls._fail(path, "", f"entry {k[:16]!r} holds {json.dumps(v)[:40]}")
            return whole, True
        data: Dict[str, Any] = {}
        lines = text.split("\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines):  # the last line, with no newline after it: a torn append
                    return data, True
                raise cls._fail(path, f":{i}", f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not (isinstance(rec, dict) and set(rec) == {"key", "value"} and isinstance(rec["key"], str)
                    and _is_real(rec["value"])):
                raise cls._fail(path, f":{i}", f"found {line.strip()[:40]}")
            data[rec["key"]] = rec["value"]
        return data, not text.endswith("\n")  # an append must start a line

    def get(self, key: str) -> Any:
        """The cached value of ``key`` or None (counts hits and misses)."""
        if key in self.data:
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return None

    @staticmethod
    def _line(key: str, value: Any) -> str:
        return json.dumps({"key": key, "value": value}) + "\n"

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``: one line appended to the file (the whole file
        rewritten atomically, as lines, only the first time after an old-format or torn file)."""
        self.data[key] = value
        if not self.path:
            return
        if self._rewrite:
            from rlhf_fast.trainers.config import atomic_write_text

            atomic_write_text(self.path, "".join(self._line(k, v) for k, v in self.data.items()))
            self._rewrite = False
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(self._line(key, value))
            f.flush()
            os.fsync(f.fileno())


def cache_key(*parts: Any) -> str:
    """sha256 of the JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --------------------------------------------------------------------------- backends

class HTTPBackend:
    """OpenAI-compatible chat completions over urllib, with retries and back-off."""

    def __init__(self, cfg: JudgeConfig, sleep=time.sleep):
        self.cfg = cfg
        base = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        base = base.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.api_key = cfg.api_key or os.environ.get("OPENAI_API_KEY")
        self.sleep = sleep
        self.requests = 0

    def _post(self, body: Dict[str, Any]) -> Dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.sleep(self.cfg.backoff * 2 ** (attempt - 1))
            self.requests += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying will not help
                    raise JudgeError(f"{self.url}: {last}: {e.read()[:200].decode(errors='replace')}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError:
                last = "invalid JSON in the response"
        raise JudgeError(f"{self.url}: no answer after {self.cfg.max_retries + 1} attempts (last: {last})")

    def ask(self, text: str, *, want_logprobs: bool) -> Dict[str, Any]:
        """``{"text": answer, "top_logprobs": {token: logp} or None, "token": the answer's first token
        or None}`` for one user message."""
        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": text}],
                "temperature": 0, "max_tokens": self.cfg.max_tokens}
        if want_logprobs:
            body.update(logprobs=True, top_logprobs=5)
        out = self._post(body)
        try:
            choice = out["choices"][0]
            answer = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: unexpected response shape: {json.dumps(out)[:200]}") from None
        top = token = None
        lp = choice.get("logprobs") or {}
        content = lp.get("content") if isinstance(lp, dict) else None
        if content:
            token = content[0].get("token")
            top = {t["token"]: t["logprob"] for t in content[0].get("top_logprobs", []) if "token" in t}
        return {"text": answer, "top_logprobs": top, "token": token}

    def prefer_first(self, text: str) -> float:
        """P(the judge answers A) for the rendered pair prompt ``text``."""
        out = self.ask(text, want_logprobs=True)
        top = out["top_logprobs"]
        verdict = _verdict(out["text"])
        # the first token's alternatives are the judge's odds only when that token is its verdict:
        # after "Response" (of "Response B") an "A" in the top log-probs is no answer
        first = (out.get("token") or "").strip().upper()
        if top and first in ("A", "B") and verdict != 0.5:
            pa = sum(math.exp(v) for k, v in top.items() if k.strip().upper() == "A")
            pb = sum(math.exp(v) for k, v in top.items() if k.strip().upper() == "B")
            if pa + pb > 0:
                return pa / (pa + pb)
        return verdict

    def score(self, text: str) -> float:
        """The number in the judge's answer to the rendered score prompt ``text``."""
        answer = self.ask(text, want_logprobs=False)["text"]
        m = re.search(r"-?\d+(?:\.\d+)?", answer)
        if not m:
            raise JudgeError(f"{self.url}: no number in the judge's answer {answer[:80]!r}")
        return float(m.group())


def _verdict(answer: str) -> float:
    """1.0 for an "A" verdict, 0.0 for "B", 0.5 when unclear: the answer itself when it is the
    one letter (either case, punctuation around it allowed), else the first A, B or b standing
    alone (a lower-case "a" there is the article: "a bit weak, but B is better")."""
    bare = re.fullmatch(r"\W*([ABab])\W*", answer)
    m = bare or re.search(r"\b([ABb])\b", answer)
    if not m:
        return 0.5
    return 1.0 if m.group(1).upper() == "A" else 0.0


class LocalBackend:
    """A transformers causal LM as judge: compares the log-probs of " A" and " B" (and of
    " 1".." 10" for scores) after the rendered template."""

    def __init__(self, model, tokenizer, *, choices=(" A", " B")):
        self.model, self.tokenizer = model, tokenizer
        self.choices = choices

    def _continuation_logps(self, text: str, continuations: Sequence[str]) -> List[float]:
        import torch

        from rlhf_fast.feedback.formats import prompt_token_ids
        from rlhf_fast.models.logprobs import sequence_logprobs

        tok = self.tokenizer
        prefix = prompt_token_ids(tok, [text])[0]  # plain text: the tokenizer's special tokens (a bos)
        rows, masks = [], []
        for c in continuations:
            ids = tok(c, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"continuation {c!r} encodes to no tokens")
            rows.append(prefix + ids)
            masks.append([0] * len(prefix) + [1] * len(ids))
        T = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # right padding: positions of the prefix do not move between continuations
        input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        attn = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        resp = torch.tensor([m + [0] * (T - len(m)) for m in masks])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logp = sequence_logprobs(self.model, input_ids.to(device), attn.to(device), response_mask=resp.to(device))
        return logp.sum(1).tolist()

    def prefer_first(self, text: str) -> float:
        la, lb = self._continuation_logps(text, self.choices)
        return 1.0 / (1.0 + math.exp(lb - la))

    def score(self, text: str) -> float:
        conts = [f" {k}" for k in range(1, 11)]
        lps = self._continuation_logps(text, conts)
        m = max(lps)
        w = [math.exp(v - m) for v in lps]
        # where digits are tokens of their own (Llama-2, Mistral, Qwen2), the ids of " 1" begin
        # those of " 10": P(" 1") holds P(" 10") too, which must not count as a 1
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
        exact = [max(0.0, wi - sum(wj for j, wj in enumerate(w) if j != i and len(ids[j]) > len(ids[i])
                                   and ids[j][:len(ids[i])] == ids[i])) for i, wi in enumerate(w)]
        return sum(k * wk for k, wk in zip(range(1, 11), exact)) / sum(exact)


# --------------------------------------------------------------------------- judge

class Judge:
    """Preferences and scores from a backend, cached, with position-bias mitigation."""

    def __init__(self, cfg: JudgeConfig, backend: Any = None, *, tokenizer: Any = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.cache = JsonCache(cfg.cache)  # first: a bad cache file is refused before a model loads
        if backend is None:
            if cfg.backend == "http":
                backend = HTTPBackend(cfg)
            else:
                from rlhf_fast.trainers.common import load_causal_lm

                model, tok = load_causal_lm(cfg.model)
                backend = LocalBackend(model, tok)
                self.tokenizer = self.tokenizer or tok
        self.backend = backend

    def _render_prompt(self, prompt: Any) -> str:
        from .formats import render_prompt

        # chats are shown to the judge as plain "role: content" lines, not a model template
        return render_prompt(prompt, None) if not isinstance(prompt, str) else prompt

    def _first(self, prompt: Any, first: str, second: str) -> float:
        text = self.cfg.pair_template.format(prompt=self._render_prompt(prompt), a=first, b=second)
        key = cache_key("pair", self.cfg.backend, self.cfg.model, self.cfg.pair_template, prompt, first, second)
        hit = self.cache.get(key)
        if hit is not None:
            return float(hit)
        p = float(self.backend.prefer_first(text))
        self.cache.put(key, p)
        return p

    def compare(self, prompt: Any, a: str, b: str) -> float:
        """P(``a`` is better than ``b``) in [0, 1]; averaged over both orders when
        ``both_orders`` (a judge that always picks the first answer gives 0.5)."""
        p = self._first(prompt, a, b)
        if self.cfg.both_orders:
            p = 0.5 * (p + 1.0 - self._first(prompt, b, a))
        return p

    def score(self, prompt: Any, response: str) -> float:
        """The judge's score of ``response`` (cached)."""
        text = self.cfg.score_template.format(prompt=self._render_prompt(prompt), response=response)
        key = cache_key("score", self.cfg.backend, self.cfg.model, self.cfg.score_template, prompt, response)
        hit = self.cache.get(key)
        if hit is not None:
            return float(hit)
        s = float(self.backend.score(text))
        self.cache.put(key, s)
        return s

    def label_items(self, items: Sequence[Dict[str, Any]], *, tie_band: float = 0.05) -> List[Dict[str, Any]]:
        """Label records (the format of ``rlhf-fast label``) for items ``{prompt, a, b}``:
        label "A" when P(A) > 0.5 + tie_band, "B" when < 0.5 − tie_band, else "tie"."""
        from .label import item_key

        _check_tie_band(tie_band, "tie_band")
        out = []
        for i, it in enumerate(items):
            p = self.compare(it["prompt"], it["a"], it["b"])
            label = "A" if p > 0.5 + tie_band else "B" if p < 0.5 - tie_band else "tie"
            out.append({"item": it.get("item", i), "key": it.get("key") or item_key(it["prompt"], it["a"], it["b"]),
                        "prompt": it["prompt"], "a": it["a"], "b": it["b"], "label": label,
                        "annotator": f"judge:{self.cfg.model}", "p_a": round(p, 6)})
        return out


# --------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    """CLI arguments of ``rlhf-fast judge`` (explicit options override the YAML config)."""
    parser.add_argument("input", help="JSONL: {prompt, a, b} per line (pairs) or {prompt, response} (scores)")
    parser.add_argument("--out", required=True, help="output JSONL (label records or score records); an existing "
                        "file is added to: items this judge already judged there are kept, not judged again")
    parser.add_argument("--mode", choices=("pairs", "scores"), default="pairs")
    parser.add_argument("--config", default=None, help="YAML with JudgeConfig fields")
    parser.add_argument("--backend", choices=("http", "local"), default=None)
    parser.add_argument("--model", default=None, help="endpoint model name, or a local path / tiny: spec")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default $OPENAI_BASE_URL)")
    parser.add_argument("--cache", default=None, help="cache file of the answers (JSON lines, one appended per answer)")
    parser.add_argument("--max-retries", default=None)
    parser.add_argument("--backoff", default=None, type=_seconds(">= 0"),
                        help="seconds before the first retry (doubles each time)")
    parser.add_argument("--timeout", default=None, type=_seconds("> 0"), help="seconds per HTTP request")
    parser.add_argument("--single-order", action="store_true", help="ask in one order only (no position-bias mitigation)")
    parser.add_argument("--tie-band", type=float, default=0.05)


def _seconds(bound: str):
    """An argparse type: a finite number of seconds ``bound`` ("> 0" or ">= 0"); argparse
    turns the error into one line naming the option (exit 2)."""
    import argparse

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not (v > 0 if bound == "> 0" else v >= 0):
            raise argparse.ArgumentTypeError(f"expected a finite number of seconds {bound}, got {text!r}")
        return v

    return parse


def _check_tie_band(value, name: str) -> None:
    # outside [0, 0.5) one side's label could never be given (or every item would be a tie)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 0.5:
        raise ValueError(f"{name} must be a number in [0, 0.5), got {value!r}")


def run(args) -> int:
    """Entry point of ``rlhf-fast judge``: labels or scores every line of the input that this
    judge has not yet judged in ``--out`` and adds the results to it."""
    from rlhf_fast.trainers.config import atomic_write_text, check_output_path, load_config

    # before any item is judged: results that cannot be written would be lost
    _check_tie_band(args.tie_band, "--tie-band")
    check_output_path(args.out, "--out")
    if os.path.exists(args.out) and os.path.exists(args.input) and os.path.samefile(args.out, args.input):
        raise ValueError(f"--out {args.out} is the input file itself; write the judgements to another file")
    overrides = []
    for name in ("backend", "model", "base_url", "cache", "max_retries", "backoff", "timeout"):
        v = getattr(args, name, None)
        if v is not None:
            overrides += [f"--{name}", str(v)]
    if getattr(args, "single_order", False):
        overrides += ["--both_orders", "false"]
    cfg = load_config(JudgeConfig, args.config, overrides)
    if cfg.cache:
        check_output_path(cfg.cache, "--cache")
        if os.path.exists(cfg.cache):
            for name, other in (("the input file", args.input), ("--out", args.out)):
                if os.path.exists(other) and os.path.samefile(cfg.cache, other):
                    raise ValueError(f"--cache {cfg.cache} is {name}; keep the cache in a file of its own")
    # what --out already holds is kept; a file that is not this mode's output is refused
    existing = _read_existing(args.out, args.mode)
    judge = Judge(cfg)
    try:
        new, kept = _judge_file(judge, cfg, args, existing)
    except JudgeError as e:  # the endpoint failed: one line, exit 1 (not a usage error)
        print(f"rlhf-fast judge: error: {e}", file=sys.stderr)
        return 1
    if new:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in existing + new))
    note = f"; {kept} already judged there, kept" if kept else ""
    print(f"judged {len(new)} items -> {args.out}{note} (cache hits {judge.cache.hits}, "
          f"misses {judge.cache.misses})", file=sys.stderr)
    return 0


def _read_existing(path: str, mode: str) -> List[Dict[str, Any]]:
    """The records an existing ``--out`` holds ([] when absent): label records for
    ``pairs``, score records for ``scores``; ValueError naming the file and line otherwise."""
    from .label import read_labels

    how = "give a new --out or one that judge wrote in this --mode"
    if mode == "pairs":
        try:
            return read_labels(path)
        except ValueError as e:
            raise ValueError(f"--out {e}; {how}") from None
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not (isinstance(rec, dict) and "prompt" in rec and isinstance(rec.get("response"), str)
                    and _is_real(rec.get("score"))):
                raise ValueError(f"--out {path}:{i + 1}: not a score record (expected the fields prompt, response "
                                 f"and a numeric score, as `rlhf-fast judge --mode scores` writes); {how}")
            out.append(rec)
    return out


def _first_of_each(items: Sequence[Any], keys: Sequence[str], done: set) -> List[Any]:
    """``items`` whose key is not in ``done``, each key's first only (a repeat is the same item)."""
    seen, out = set(done), []
    for key, it in zip(keys, items):
        if key not in seen:
            seen.add(key)
            out.append(it)
    return out


def _judge_file(judge: Judge, cfg: JudgeConfig, args, existing: Sequence[Dict[str, Any]]):
    """``(new records, number of input items already judged in existing)`` for the input."""
    from .formats import load_records
    from .label import _record_key, load_items

    annotator = f"judge:{cfg.model}"
    if args.mode == "pairs":
        items = load_items(args.input)
        # keys recomputed from each record's texts: files written before keys were side-free
        done = {_record_key(r) for r in existing if r.get("annotator") == annotator}
        # a pair listed twice (sides swapped or not) is one item, judged once, as `rlhf-fast label` labels it
        todo = _first_of_each(items, [it["key"] for it in items], done)
        out = judge.label_items(todo, tie_band=args.tie_band)
        kept = len({it["key"] for it in items} & done)
    else:
        from rlhf_fast.feedback.formats import _BadJSON, read_rows

        # as every data file (and the pairs mode's INPUT): JSON lines, a .json array, Parquet, ...
        _, rows = read_rows(args.input, "INPUT")
        items = []
        for n, r in rows:
            if isinstance(r, _BadJSON):
                raise ValueError(f"{args.input}:{n}: {r.message}")
            if not isinstance(r, dict) or "prompt" not in r or not isinstance(r.get("response"), str):
                raise ValueError(f"{args.input}:{n}: response: missing field (need prompt and response)")
            items.append(r)
        done = {cache_key(r["prompt"], r["response"]) for r in existing if r.get("annotator") == annotator}
        keys = [cache_key(r["prompt"], r["response"]) for r in items]
        todo = _first_of_each(items, keys, done)  # one score per (prompt, response)
        kept = len(set(keys) & done)
        out = [{"prompt": r["prompt"], "response": r["response"], "score": judge.score(r["prompt"], r["response"]),
                "annotator": annotator} for r in todo]
        load_records(out, "scores")  # the output must itself be valid score records
    if not items:
        raise ValueError(f"{args.input}: no items to judge (the file holds no records)")
    return out, kept


__all__ = ["JudgeConfig", "Judge", "JudgeError", "HTTPBackend", "LocalBackend", "JsonCache", "cache_key",
           "PAIR_TEMPLATE", "SCORE_TEMPLATE", "add_arguments", "run"]
