"""The AI judge against a fake OpenAI-compatible server on 127.0.0.1 (failures, retries,
timeouts, cache hits, position bias) and against a tiny local model."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.feedback.judge import HTTPBackend, Judge, JudgeConfig, JudgeError, LocalBackend


# tiny models: one thread is far faster than two on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class FakeServer:
    """Chat completions that prefer the response containing "good" (or always "A" when
    ``biased``), with scripted failures: a list of "500", "429", "400", "slow" consumed in order."""

    def __init__(self):
        self.requests, self.failures, self.biased, self.logprobs = [], [], False, False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                fail = outer.failures.pop(0) if outer.failures else None
                if fail == "slow":
                    time.sleep(0.6)
                if fail in ("500", "429", "400"):
                    self.send_response(int(fail))
                    self.end_headers()
                    self.wfile.write(b"fail")
                    return
                text = body["messages"][0]["content"]
                if "Score:" in text:
                    answer = "7" if "good" in text.split("Response:")[1] else "2"
                    choice = {"message": {"content": answer}}
                else:
                    a = text.split("Response A:")[1].split("Response B:")[0]
                    verdict = "A" if outer.biased or "good" in a else "B"
                    choice = {"message": {"content": verdict}}
                    if outer.logprobs:
                        pa = 0.9 if verdict == "A" else 0.2
                        choice["logprobs"] = {"content": [{"token": verdict, "top_logprobs": [
                            {"token": "A", "logprob": math.log(pa)}, {"token": "B", "logprob": math.log(1 - pa)}]}]}
                data = json.dumps({"choices": [choice]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _cfg(server, tmp_path, **kw):
    base = dict(backend="http", model="fake-judge", base_url=server.url, api_key="sk-test", backoff=0.01,
                timeout=0.3, max_retries=3, cache=str(tmp_path / "cache.json"))
    base.update(kw)
    return JudgeConfig(**base)


def test_compare_both_orders_retries_and_cache(server, tmp_path):
    sleeps = []
    cfg = _cfg(server, tmp_path)
    judge = Judge(cfg, HTTPBackend(cfg, sleep=sleeps.append))
    server.failures = ["500", "429"]
    assert judge.compare("q", "a good answer", "a poor answer") == 1.0
    assert sleeps == [0.01, 0.02]  # exponential back-off
    assert len(server.requests) == 4  # 2 failures + both orders
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["auth"] == "Bearer sk-test" and server.requests[0]["body"]["model"] == "fake-judge"
    assert judge.compare("q", "meh", "so good") == 0.0
    n = len(server.requests)
    # a fresh judge on the same cache file asks nothing
    judge2 = Judge(cfg, HTTPBackend(cfg))
    assert judge2.compare("q", "a good answer", "a poor answer") == 1.0
    assert judge2.compare("q", "meh", "so good") == 0.0
    assert len(server.requests) == n and judge2.cache.hits == 4 and judge2.cache.misses == 0
    # a different template is a different cache key
    cfg3 = _cfg(server, tmp_path, pair_template="P {prompt}\nResponse A:{a}\nResponse B:{b}\nAnswer:")
    Judge(cfg3, HTTPBackend(cfg3)).compare("q", "a good answer", "a poor answer")
    assert len(server.requests) == n + 2


def test_position_bias_and_logprobs(server, tmp_path):
    server.biased = True  # always answers "A"
    both = _cfg(server, tmp_path, cache=None)
    assert Judge(both).compare("q", "x", "y") == 0.5
    one = _cfg(server, tmp_path, cache=None, both_orders=False)
    assert Judge(one).compare("q", "x", "y") == 1.0
    server.biased = False
    server.logprobs = True
    p = Judge(both).compare("q", "good", "bad")  # P(A)=0.9 in order 1, P(A)=0.2 in order 2
    assert p == pytest.approx(0.5 * (0.9 + 1 - 0.2))


def test_failures(server, tmp_path):
    cfg = _cfg(server, tmp_path, cache=None)
    server.failures = ["400"]
    with pytest.raises(JudgeError, match="HTTP 400"):
        Judge(cfg).compare("q", "x", "y")
    assert len(server.requests) == 1  # a client error is not retried
    server.requests.clear()
    server.failures = ["500"] * 10
    with pytest.raises(JudgeError, match="after 4 attempts"):
        Judge(cfg).compare("q", "x", "y")
    assert len(server.requests) == 4
    server.failures = ["slow"]  # the first attempt times out, the retry answers
    assert Judge(cfg).score("q", "good stuff") == 7.0
    with pytest.raises(ValueError, match="pair_template"):
        JudgeConfig(pair_template="no fields")


def test_cli_pairs_and_scores(server, tmp_path, monkeypatch, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "q1", "a": "good one", "b": "bad one"}) + "\n"
                     + json.dumps({"prompt": "q2", "a": "bad", "b": "good"}) + "\n")
    out = tmp_path / "labels.jsonl"
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    args = ["judge", str(items), "--out", str(out), "--model", "m", "--cache", str(tmp_path / "c.json"), "--backoff", "0"]
    assert cli.main(args) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["label"] for r in recs] == ["A", "B"] and recs[0]["annotator"] == "judge:m"
    assert server.requests[0]["auth"] == "Bearer env-key"
    n = len(server.requests)
    assert cli.main(args) == 0 and len(server.requests) == n  # already in --out: kept, not judged again
    assert "judged 0 items" in capsys.readouterr().err
    out2 = tmp_path / "labels2.jsonl"
    assert cli.main(args[:3] + [str(out2)] + args[4:]) == 0 and len(server.requests) == n
    assert "cache hits 4, misses 0" in capsys.readouterr().err
    from rlhf_fast.feedback.label import labels_to_pairs
    assert [(p.chosen, p.rejected) for p in labels_to_pairs(str(out))] == [("good one", "bad one"), ("good", "bad")]
    scores_in = tmp_path / "s.jsonl"
    scores_in.write_text(json.dumps({"prompt": "q", "response": "good"}) + "\n" + json.dumps({"prompt": "q", "response": "x"}) + "\n")
    scores_out = tmp_path / "scores.jsonl"
    assert cli.main(["judge", str(scores_in), "--out", str(scores_out), "--mode", "scores", "--cache", "none"]) == 0
    assert [json.loads(l)["score"] for l in scores_out.read_text().splitlines()] == [7.0, 2.0]
    server.failures = ["500"] * 10
    assert cli.main(["judge", str(items), "--out", str(out), "--cache", "none", "--max-retries", "1", "--backoff", "0"]) == 1
    assert cli.main(["judge", str(items), "--out", str(out), "--max-retries", "many"]) == 2
    assert "max_retries" in capsys.readouterr().err
    # outputs that cannot be written, the input as output and empty or broken input are refused
    # before anything is judged (no request is sent) and leave the files as they were
    server.failures = []
    n, before = len(server.requests), items.read_text()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n{oops\n")
    for argv, needle in (([str(items), "--out", str(tmp_path)], f"--out {tmp_path}: expected a file, found a folder"),
                         ([str(items), "--out", str(items / "x.jsonl")], f"{items} is a file, not a folder"),
                         ([str(items), "--out", str(items)], "is the input file itself"),
                         ([str(items), "--out", str(out), "--cache", str(items)], "is the input file"),
                         ([str(empty), "--out", str(out)], "no items to judge"),
                         ([str(empty), "--out", str(scores_out), "--mode", "scores"], "no items to judge"),
                         ([str(broken), "--out", str(scores_out), "--mode", "scores"], f"{broken}:2: invalid JSON")):
        capsys.readouterr()
        assert cli.main(["judge"] + argv + ([] if "--cache" in argv else ["--cache", "none"])) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert len(server.requests) == n and items.read_text() == before


def test_local_judge_matches_direct_computation(tmp_path):
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(sample_texts(32) + ["Answer: A", "Answer: B"], 300, padding_side="right")
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=0)
    cfg = JudgeConfig(backend="local", model="tiny", cache=str(tmp_path / "c.json"), both_orders=False)
    judge = Judge(cfg, LocalBackend(model, tok))
    p = judge.compare("the cat", "sat", "ran")
    text = cfg.pair_template.format(prompt="the cat", a="sat", b="ran")

    def direct(cont):  # independent oracle: full logits, log_softmax
        ids = tok(text + cont, add_special_tokens=False)["input_ids"]
        n_prefix = len(tok(text, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        return sum(lp[t - 1, ids[t]].item() for t in range(n_prefix, len(ids)))

    assert p == pytest.approx(1 / (1 + math.exp(direct(" B") - direct(" A"))), abs=1e-5)
    assert 0 < p < 1
    s = judge.score("the cat", "sat")
    assert 1.0 <= s <= 10.0
    assert Judge(cfg, LocalBackend(model, tok)).compare("the cat", "sat", "ran") == p  # cache hit


def test_cli_local_tiny_judge(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"prompt": f"q{i}", "a": "yes", "b": "no"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    assert cli.main(["judge", str(items), "--out", str(out), "--backend", "local", "--cache", "none",
                     "--model", "tiny:llama:hidden_size=16,num_layers=1,num_heads=2,vocab_size=300"]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(recs) == 3 and all(0.0 <= r["p_a"] <= 1.0 and r["label"] in ("A", "B", "tie") for r in recs)


@pytest.mark.parametrize("band", [-0.1, 0.5, 0.7, float("nan")])
def test_tie_band_outside_zero_to_half_is_refused(band):
    from rlhf_fast.feedback.judge import Judge

    with pytest.raises(ValueError, match=r"tie_band must be a number in \[0, 0.5\)"):
        Judge.label_items(None, [], tie_band=band)


def _items(path, pairs):
    path.write_text("".join(json.dumps({"prompt": q, "a": a, "b": b}) + "\n" for q, a, b in pairs))
    return path


def test_cli_judge_adds_to_an_existing_labels_file(server, tmp_path, monkeypatch, capsys):
    # as `rlhf-fast label` does: earlier labels (a human's and the judge's) are kept, only items
    # this judge has not judged there are judged and appended
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    out = tmp_path / "labels.jsonl"
    human = {"item": 0, "key": "k0", "prompt": "q0", "a": "x", "b": "y", "label": "B", "annotator": "ann"}
    out.write_text(json.dumps(human) + "\n")
    common = ["--model", "m", "--cache", "none", "--backoff", "0"]
    first = _items(tmp_path / "first.jsonl", [("q1", "good one", "bad one")])
    assert cli.main(["judge", str(first), "--out", str(out)] + common) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert recs[0] == human and [r["label"] for r in recs] == ["B", "A"]
    n = len(server.requests)
    both = _items(tmp_path / "both.jsonl", [("q1", "good one", "bad one"), ("q2", "bad", "good")])
    assert cli.main(["judge", str(both), "--out", str(out)] + common) == 0
    assert len(server.requests) == n + 2  # only q2 (both orders) was asked
    assert "judged 1 items" in capsys.readouterr().err
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert recs[0] == human and [(r["prompt"], r["label"]) for r in recs] == [("q0", "B"), ("q1", "A"), ("q2", "B")]
    # scores are added the same way; a file of the other mode is refused before any request
    s_in = tmp_path / "s.jsonl"
    s_in.write_text(json.dumps({"prompt": "q", "response": "good"}) + "\n")
    s_out = tmp_path / "scores.jsonl"
    assert cli.main(["judge", str(s_in), "--out", str(s_out), "--mode", "scores"] + common) == 0
    s_in.write_text(s_in.read_text() + json.dumps({"prompt": "q", "response": "x"}) + "\n")
    assert cli.main(["judge", str(s_in), "--out", str(s_out), "--mode", "scores"] + common) == 0
    assert [json.loads(l)["score"] for l in s_out.read_text().splitlines()] == [7.0, 2.0]
    n, before = len(server.requests), out.read_text()
    capsys.readouterr()
    assert cli.main(["judge", str(s_in), "--out", str(out), "--mode", "scores"] + common) == 2
    err = capsys.readouterr().err
    assert f"--out {out}:1: not a score record" in err and len(err.strip().splitlines()) == 1, err
    assert cli.main(["judge", str(both), "--out", str(s_out)] + common) == 2
    err = capsys.readouterr().err
    assert f"{s_out}:1: not a label record" in err and len(err.strip().splitlines()) == 1, err
    assert len(server.requests) == n and out.read_text() == before


@pytest.mark.parametrize("option,value", [("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "0"),
                                          ("--timeout", "-1"), ("--backoff", "inf"), ("--backoff", "-1")])
def test_cli_refuses_timeouts_that_are_not_finite_positive_seconds(tmp_path, capsys, option, value):
    items = _items(tmp_path / "items.jsonl", [("q", "a", "b")])
    with pytest.raises(SystemExit) as e:
        cli.main(["judge", str(items), "--out", str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1",
                  "--cache", "none", "--max-retries", "0", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a finite number of seconds" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0, got inf"):
        JudgeConfig(timeout=float("inf"))
    with pytest.raises(ValueError, match="backoff must be a finite number of seconds >= 0, got nan"):
        JudgeConfig(backoff=float("nan"))


@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "found a JSON list"),
    ('{"a": 1}\n{"b": 2}\n', ':1: found {"a": 1}'),
    ('{"key": "a", "value": 1}\n{"key": "b", "value": 2\n{"key": "c", "value": 3}\n', ":2: invalid JSON"),
    ('{"k": "seven"}', "entry 'k' holds \"seven\""),
])
def test_cli_names_a_bad_cache_file_and_what_it_should_hold(tmp_path, capsys, content, needle):
    items = _items(tmp_path / "items.jsonl", [("q", "a", "b")])
    cache = tmp_path / "cache.json"
    cache.write_text(content)
    assert cli.main(["judge", str(items), "--out", str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1",
                     "--cache", str(cache)]) == 2
    err = capsys.readouterr().err
    assert f"judge cache {cache}" in err and needle in err and "mapping cache keys to numbers" in err, err
    assert len(err.strip().splitlines()) == 1 and cache.read_text() == content


def test_cache_appends_one_line_per_answer_and_survives_a_torn_append(tmp_path, monkeypatch):
    """Each new answer is one appended line (the whole file was rewritten per answer: O(n^2)
    bytes over a run); a torn last line is dropped and the next answer rewrites the file whole."""
    from rlhf_fast.feedback import judge as judge_mod
    from rlhf_fast.trainers import config as config_mod

    path = tmp_path / "c" / "cache.json"
    rewrites = []
    real = config_mod.atomic_write_text
    monkeypatch.setattr(config_mod, "atomic_write_text", lambda p, t: (rewrites.append(p), real(p, t)))
    cache = judge_mod.JsonCache(str(path))
    for i in range(5):
        cache.put(f"k{i}", i / 10)
    assert rewrites == [] and len(path.read_text().splitlines()) == 5
    assert judge_mod.JsonCache(str(path)).data == {f"k{i}": i / 10 for i in range(5)}
    with open(path, "a") as f:
        f.write('{"key": "k5", "val')  # killed mid-append
    torn = judge_mod.JsonCache(str(path))
    assert torn.data == {f"k{i}": i / 10 for i in range(5)}
    torn.put("k6", 0.6)
    assert len(rewrites) == 1
    assert judge_mod.JsonCache(str(path)).data == {**{f"k{i}": i / 10 for i in range(5)}, "k6": 0.6}


@pytest.mark.parametrize("old", ['{"k0": 0.25, "k1": 1}', "{}", '{"key": "k0", "value": 0.25}'])
def test_cache_reads_the_one_object_format_and_a_last_line_without_newline(tmp_path, old):
    from rlhf_fast.feedback.judge import JsonCache

    path = tmp_path / "cache.json"
    path.write_text(old)
    cache = JsonCache(str(path))
    before = dict(cache.data)
    cache.put("k2", 0.5)
    assert JsonCache(str(path)).data == {**before, "k2": 0.5}
    assert all(line.startswith('{"key": ') for line in path.read_text().splitlines())
