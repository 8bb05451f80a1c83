"""``rlhf-fast generate`` on a tiny model saved to a folder: the file it writes against the
engine's own output, chat prompts through the tokenizer's template, batch-size independence,
beam search, and bad input as exit code 2 with one line."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast import cli  # noqa: E402
from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, SamplingParams  # noqa: E402
from rlhf_fast.rollout.generate_cli import _row_seed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
RECORDS = [{"prompt": "hello world", "answer": 1}, {"prompt": [{"role": "user", "content": "the cat sat"}]},
           {"prompt": "one"}, {"prompt": "what is two and three"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama and its tokenizer (with a chat template) saved to a folder, loaded back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(tmp_path_factory.mktemp("gen") / "model")
    tok = train_tokenizer(sample_texts(), 256)
    tok.chat_template = TEMPLATE
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=4,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(p)


def _texts(tok):
    return ["hello world", tok.apply_chat_template(RECORDS[1]["prompt"], tokenize=False, add_generation_prompt=True),
            "one", "what is two and three"]


def _main(*argv):
    """The command's exit code (argparse's errors exit through SystemExit)."""
    try:
        return cli.main(["generate", *argv])
    except SystemExit as e:
        return e.code


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_greedy_with_penalties_equals_the_engine(saved, prompts_file, tmp_path, capsys):
    """Greedy lines hold each prompt as given (a chat stays a chat) and the engine's answer to
    it rendered with the tokenizer's chat template, penalties passed through; no logp."""
    d, model, tok = saved
    out = str(tmp_path / "o.jsonl")
    assert _main("--model", d, "--prompts", prompts_file, "--out", out, "--temperature", "0",
                 "--max_new_tokens", "10", "--repetition_penalty", "1.5", "--no_repeat_ngram_size", "2",
                 "--batch_size", "3", "--device", "cpu") == 0
    assert "wrote 4 responses" in capsys.readouterr().out
    lines = _read(out)
    want = HFRolloutEngine(model, tok).greedy(_texts(tok), max_new_tokens=10, repetition_penalty=1.5,
                                              no_repeat_ngram_size=2)
    plain = HFRolloutEngine(model, tok).greedy(_texts(tok), max_new_tokens=10)
    assert [ln["prompt"] for ln in lines] == [r["prompt"] for r in RECORDS]
    assert [ln["response"] for ln in lines] == want.response_texts != plain.response_texts
    assert [ln["finish_reason"] for ln in lines] == want.finish_reasons
    assert all("logp" not in ln for ln in lines)


def test_sampling_is_per_response_seeded_and_batch_size_free(saved, prompts_file, tmp_path):
    """n responses per prompt, consecutive; each drawn from its own seed, so --batch_size does
    not change the file; logp is the sum of the engine's behaviour log-probs."""
    d, model, tok = saved
    args = ["--model", d, "--prompts", prompts_file, "--n", "2", "--max-new-tokens", "8", "--top_p", "0.9",
            "--presence_penalty", "0.5", "--seed", "5", "--device", "cpu"]
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert _main(*args, "--out", a, "--batch_size", "1") == 0
    assert _main(*args, "--out", b, "--batch_size", "3") == 0
    la, lb = _read(a), _read(b)
    assert len(la) == 8 and [x["response"] for x in la] == [x["response"] for x in lb]
    for x, y in zip(la, lb):
        assert x["logp"] == pytest.approx(y["logp"], abs=1e-4)
    seeds = [_row_seed(5, i, k) for i in range(4) for k in range(2)]
    ref = HFRolloutEngine(model, tok).generate(_texts(tok), SamplingParams(
        n=2, max_new_tokens=8, top_p=0.9, presence_penalty=0.5, sample_seeds=seeds))
    assert [x["response"] for x in la] == ref.response_texts
    torch.testing.assert_close(torch.tensor([x["logp"] for x in la]), ref.behaviour_logp.sum(1), rtol=0, atol=1e-4)
    assert [x["prompt"] for x in la] == [r["prompt"] for r in RECORDS for _ in range(2)]
    assert la[0]["response"] != la[1]["response"] or la[2]["response"] != la[3]["response"]


def test_beam_search_and_txt_prompts(saved, tmp_path):
    d, model, tok = saved
    p = tmp_path / "p.txt"
    p.write_text("hello world\n\nthe cat sat on the\n")
    out = str(tmp_path / "o.jsonl")
    assert _main("--model", d, "--prompts", str(p), "--out", out, "--num_beams", "3", "--max_new_tokens", "6",
                 "--device", "cpu") == 0
    want = HFRolloutEngine(model, tok).beam_search(["hello world", "the cat sat on the"], num_beams=3,
                                                   max_new_tokens=6)
    assert [x["response"] for x in _read(out)] == want.response_texts


def test_tiny_spec_runs(tmp_path, prompts_file):
    out = str(tmp_path / "o.jsonl")
    assert _main("--model", "tiny:llama:hidden_size=32,num_layers=1,num_heads=2", "--prompts", prompts_file,
                 "--out", out, "--max_new_tokens", "3", "--min_new_tokens", "2", "--device", "cpu") == 0
    assert len(_read(out)) == 4


@pytest.mark.parametrize("extra,message", [
    (["--repetition_penalty", "0"], "--repetition_penalty must be a finite number > 0"),
    (["--frequency_penalty", "5"], "--frequency_penalty must be a number in [-2, 2]"),
    (["--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be an int >= 0"),
    (["--num_beams", "2", "--repetition_penalty", "1.2"], "--num_beams 2 (beam search) takes no sampling option; "
                                                           "got --repetition_penalty"),
    (["--num_beams", "2", "--n", "2"], "takes no sampling option; got --n"),
    (["--batch_size", "0"], "--batch_size must be an int >= 1"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--temperature", "x"], "argument --temperature: invalid float value"),
    (["--prompts", "missing.jsonl"], "--prompts not found"),
    (["--model", "no/such/folder"], "neither"),
    (["--device", "tpu"], "device must be"),
])
def test_bad_input_exits_2_with_one_line(saved, prompts_file, tmp_path, capsys, extra, message):
    """Each bad option: exit code 2, one line on stderr naming it; an existing --out is left as it was."""
    d = saved[0]
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    base = {"--model": d, "--prompts": prompts_file, "--out": str(out), "--max_new_tokens": "2"}
    for k, v in zip(extra[::2], extra[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv] + ["--device", "cpu"] * ("--device" not in base)
    rc = _main(*argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert out.read_text() == "old\n"


def test_bad_prompt_record_and_out_folder(saved, tmp_path, capsys):
    d = saved[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert _main("--model", d, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")) == 2
    assert "line 2" in capsys.readouterr().err
    assert _main("--model", d, "--prompts", str(bad), "--out", str(tmp_path)) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
