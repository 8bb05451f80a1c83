"""The terminal labelling tool driven by scripted input: labels, ties, skips, undo, quit, resume."""

import io
import json
import sys

import pytest

from rlhf_fast import cli
from rlhf_fast.feedback.label import labels_to_pairs, read_labels


def _pairs(tmp_path, n=4):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "a": f"ans A{i}", "b": f"ans B{i}"}) + "\n" for i in range(n)))
    return str(p)


def _run(monkeypatch, argv, answers):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(a + "\n" for a in answers)))
    return cli.main(["label"] + argv)


def test_label_quit_resume_undo(tmp_path, monkeypatch, capsys):
    pairs, out = _pairs(tmp_path), str(tmp_path / "labels.jsonl")
    args = [pairs, "--out", out, "--annotator", "ann"]
    # item0 -> A, item1 -> "what?" (rejected, asked again) then B, then quit
    assert _run(monkeypatch, args, ["a", "what?", "B", "q"]) == 0
    assert "unknown answer" in capsys.readouterr().out
    recs = read_labels(out)
    assert [(r["prompt"], r["label"]) for r in recs] == [("q0", "A"), ("q1", "B")]
    # resume: starts at item 2; tie, then undo (drops the tie), skip item 2, end of input quits
    assert _run(monkeypatch, args, ["t", "u", "s"]) == 0
    assert "resuming: 2 of 4" in capsys.readouterr().out
    recs = read_labels(out)
    assert [(r["prompt"], r["label"]) for r in recs] == [("q0", "A"), ("q1", "B"), ("q2", "skip")]
    # undo across sessions removes item 2's skip; then label 2 and 3
    assert _run(monkeypatch, args, ["u", "b", "a"]) == 0
    assert "all 4 items labelled" in capsys.readouterr().out
    recs = read_labels(out)
    assert [(r["prompt"], r["label"]) for r in recs] == [("q0", "A"), ("q1", "B"), ("q2", "B"), ("q3", "A")]
    pairs_out = labels_to_pairs(out)
    assert [(p.chosen, p.rejected) for p in pairs_out] == [
        ("ans A0", "ans B0"), ("ans B1", "ans A1"), ("ans B2", "ans A2"), ("ans A3", "ans B3")]
    # nothing left: a further run only offers to undo; end of input finishes
    assert _run(monkeypatch, args, []) == 0
    # the last label can be taken back before the session ends: "a" was wrong, "b" replaces it;
    # then Enter finishes (an answer other than undo / quit is refused there)
    assert _run(monkeypatch, args, ["u", "b", "a", "", "t"]) == 0  # "t" is never read
    out_text = capsys.readouterr().out  # (with the empty run's "all 4 items labelled" above)
    assert "unknown answer 'a'" in out_text, out_text
    assert out_text.count("all 4 items labelled") == 3
    assert [(r["prompt"], r["label"]) for r in read_labels(out)][-1] == ("q3", "B")
    # a second annotator labels the same file independently
    assert _run(monkeypatch, [pairs, "--out", out, "--annotator", "other"], ["b"]) == 0
    assert len(read_labels(out)) == 5 and len(labels_to_pairs(out, annotator="other")) == 1


def test_torn_last_line_and_bad_input(tmp_path, monkeypatch, capsys):
    pairs, out = _pairs(tmp_path, 2), tmp_path / "labels.jsonl"
    assert _run(monkeypatch, [pairs, "--out", str(out), "--annotator", "x"], ["a", "q"]) == 0
    with open(out, "a") as f:
        f.write('{"item": 1, "key": "tor')  # crash mid-write
    assert _run(monkeypatch, [pairs, "--out", str(out), "--annotator", "x"], ["b"]) == 0
    assert [r["label"] for r in read_labels(str(out))] == ["A", "B"]
    # --out that is not a labels file (the items file, notes, a one-line text) is refused, untouched
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for target in (pairs, str(notes)):
        before = open(target).read()
        capsys.readouterr()
        assert _run(monkeypatch, [pairs, "--out", target, "--annotator", "x"], ["a"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("itself" in err or "not a labels file" in err), err
        assert open(target).read() == before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _run(monkeypatch, [str(empty), "--out", str(out), "--annotator", "x"], ["a"]) == 2
    assert "no items to label" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "p", "a": "x", "b": "y"}) + "\n")
    assert _run(monkeypatch, [pairs, "--out", str(other), "--annotator", "x"], ["a"]) == 2
    assert f"{other}:1: not a label record" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "a": "x"}) + "\n" + json.dumps({"a": "x", "b": "y"}) + "\n")
    capsys.readouterr()
    assert _run(monkeypatch, [str(bad), "--out", str(out)], []) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    with pytest.raises(ValueError) as e:
        from rlhf_fast.feedback.label import load_items
        load_items(str(bad))
    assert f"{bad}:1: b: missing field" in str(e.value) and f"{bad}:2: prompt: missing field" in str(e.value)


def test_shuffle_sides(tmp_path, monkeypatch):
    from rlhf_fast.feedback.label import load_items

    pairs = _pairs(tmp_path, 40)
    items = load_items(pairs, shuffle_sides=True, seed=1)
    swapped = [it for it in items if it["a"].startswith("ans B")]
    assert 5 < len(swapped) < 35 and load_items(pairs, shuffle_sides=True, seed=1) == items
    out = str(tmp_path / "l.jsonl")
    # always answer "a": the preferred response is whatever was shown as A
    assert _run(monkeypatch, [pairs, "--out", out, "--annotator", "z", "--shuffle-sides", "--seed", "1"], ["a"] * 40) == 0
    chosen = {p.prompt: p.chosen for p in labels_to_pairs(out)}
    assert all(chosen[it["prompt"]] == it["a"] for it in items)


def test_duplicate_items_count_once_and_a_device_out_is_named(tmp_path, monkeypatch, capsys):
    """A pair listed twice is one item: labelling it once leaves nothing remaining (the summary
    said remaining 1 after 'all items labelled'); --out /dev/null is not called a folder."""
    p = tmp_path / "pairs.jsonl"
    row = json.dumps({"prompt": "q", "a": "x", "b": "y"}) + "\n"
    p.write_text(row + row + json.dumps({"prompt": "r", "a": "u", "b": "v"}) + "\n")
    out = str(tmp_path / "labels.jsonl")
    assert _run(monkeypatch, [str(p), "--out", out, "--annotator", "me"], ["a", "b"]) == 0
    text = capsys.readouterr().out
    assert "all 2 items labelled" in text and "'remaining': 0" in text
    assert _run(monkeypatch, [str(p), "--out", "/dev/null", "--annotator", "me"], ["a"]) == 2
    err = capsys.readouterr().err
    assert "expected a labels file, found a device or other special file" in err
